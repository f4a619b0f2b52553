"""What every suite shares: settings, timing, result records, the results table, subprocesses.

Timing rule (docs/benchmarks.md, "Methodology"): a measurement runs once untimed as a warm-up
(skipped for the slow baselines and in --smoke), then up to `repeats` timed runs, each between
two device synchronisations; the median is reported. It stops repeating early when the next run
would take it past `budget_s`, so a one-minute baseline is timed once instead of eating the
machine's time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A suite could not run (a failed command, a missing GPU); the message says why."""


# -- settings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    """The size of a LlamaForCausalLM built from its config."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int

    def label(self) -> str:
        return (f"Llama hidden {self.hidden_size}, {self.num_hidden_layers} layers, "
                f"intermediate {self.intermediate_size}, vocab {self.vocab_size}")


LLAMA_7B = LlamaShape(4096, 32, 11008, 32000, 32, 32)  # Llama-2-7B
LLAMA_1B = LlamaShape(2048, 22, 5632, 32000, 32, 4)  # TinyLlama-1.1B
TINY = LlamaShape(64, 2, 172, 1024, 4, 4)  # --smoke: the bundled tokenizer's vocabulary


@dataclass(frozen=True)
class Settings:
    """Everything that differs between a GPU run and a --smoke run."""

    smoke: bool
    device: str  # "cuda" or "cpu"
    dtype_name: str  # "bfloat16" or "float32"
    model: LlamaShape  # analyze, init, train, merge
    eval_model: LlamaShape
    repeats: int
    warmup: bool
    budget_s: float  # per measurement
    slow: bool  # also the slow baselines on all-linear
    use_peft: bool
    workdir: Path
    train_batch: int
    train_seq: int
    train_warmup_steps: int
    train_steps: int
    eval_prompts: int
    eval_batch: int
    eval_max_new_tokens: int | None  # None: the task's own budget (256 for gsm8k)
    seed: int = 0

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


def full_settings(workdir: Path, repeats: int, budget_s: float, slow: bool, use_peft: bool) -> Settings:
    """The GPU run the issue asks for: 7B-shaped bf16 model on CUDA."""
    return Settings(smoke=False, device="cuda", dtype_name="bfloat16", model=LLAMA_7B, eval_model=LLAMA_1B,
                    repeats=repeats, warmup=True, budget_s=budget_s, slow=slow, use_peft=use_peft,
                    workdir=workdir, train_batch=4, train_seq=512, train_warmup_steps=3, train_steps=10,
                    eval_prompts=64, eval_batch=16, eval_max_new_tokens=None)


def smoke_settings(workdir: Path, repeats: int, use_peft: bool) -> Settings:
    """Every code path on a tiny float32 model on the CPU; the numbers mean nothing."""
    return Settings(smoke=True, device="cpu", dtype_name="float32", model=TINY, eval_model=TINY,
                    repeats=repeats, warmup=False, budget_s=60.0, slow=True, use_peft=use_peft,
                    workdir=workdir, train_batch=2, train_seq=32, train_warmup_steps=1, train_steps=2,
                    eval_prompts=4, eval_batch=2, eval_max_new_tokens=8)


def load_peft(settings: Settings):
    """(peft module, None) or (None, why the PEFT baselines are skipped)."""
    if not settings.use_peft:
        return None, "--no-peft was given"
    try:
        import peft
    except ImportError as exc:
        return None, f"peft is not installed ({exc})"
    return peft, None


# -- timing ----------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@dataclass
class Runs:
    seconds: list[float]
    warmup_s: float | None
    values: list  # what the timed function returned, per timed run


def measure(fn: Callable[[], Any], settings: Settings, *, warmup: bool | None = None,
            setup: Callable[[], None] | None = None, teardown: Callable[[], None] | None = None) -> Runs:
    """Time `fn` (wall clock between device synchronisations); setup/teardown are not timed.

    Args:
        warmup: run once untimed first; default `settings.warmup`. Pass False for baselines so
            slow that kernel start-up is noise (the suite warms the kernels up once instead).
    """
    def once():
        if setup is not None:
            setup()
        synchronize(settings.device)
        start = time.perf_counter()
        value = fn()
        synchronize(settings.device)
        elapsed = time.perf_counter() - start
        if teardown is not None:
            teardown()
        return elapsed, value

    warmup_s = once()[0] if (settings.warmup if warmup is None else warmup) else None
    seconds, values = [], []
    while len(seconds) < settings.repeats:
        elapsed, value = once()
        seconds.append(elapsed)
        values.append(value)
        if sum(seconds) + elapsed > settings.budget_s:  # the next run would pass the budget
            break
    return Runs(seconds, warmup_s, values)


def warm_kernels(device: str) -> None:
    """Initialise cuBLAS/cuSOLVER (or LAPACK) once, so no first measurement pays for it."""
    import torch

    n = 1024 if device == "cuda" else 64
    A = torch.randn(n, n, device=device)
    G = (A @ A.T).double()
    torch.linalg.eigvalsh(G)
    torch.linalg.eigh(G)
    torch.linalg.svdvals(A)
    torch.linalg.svd(A, full_matrices=False)
    torch.svd_lowrank(A, q=24, niter=4)
    (A.bfloat16() @ A.bfloat16()).float().sum().item()
    synchronize(device)


# -- results ---------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One timed thing. `runs` holds per-run values in `unit`; `value` is their median."""

    key: str
    name: str
    scope: str  # "q/v", "all-linear" or "-"
    unit: str  # "s", "s/step" or "tokens/s"
    runs: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    baseline: str | None = None  # key of the measurement this one is compared with
    ratio: float | None = None  # value / baseline value, filled by SuiteResult.link
    extra: dict = field(default_factory=dict)
    skipped: str | None = None  # why it was not measured

    @property
    def value(self) -> float | None:
        return None if self.skipped or not self.runs else statistics.median(self.runs)

    def to_json(self) -> dict:
        return {**asdict(self), "median": self.value}


@dataclass
class Target:
    """A target from issue 7: `value op limit`; `met` is None when it could not be measured."""

    name: str
    op: str  # ">=", "<=", "<" or "=="
    limit: float | bool
    unit: str
    value: float | bool | None = None
    note: str = ""
    timing: bool = True  # False for correctness checks (identical k), which --smoke judges too

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        if self.op == ">=":
            return self.value >= self.limit
        if self.op == "<=":
            return self.value <= self.limit
        if self.op == "<":
            return self.value < self.limit
        return self.value == self.limit

    def to_json(self) -> dict:
        return {**asdict(self), "met": self.met}


def ratio_target(name: str, numerator: Measurement, denominator: Measurement, op: str, limit: float,
                 unit: str = "x", values: tuple[float | None, float | None] | None = None) -> Target:
    """numerator / denominator against `limit`.

    Args:
        values: (numerator, denominator) to divide instead of the two medians, e.g. a peak
            memory kept in `extra`; None in either means it was not measured on this device.
    """
    missing = [m for m in (numerator, denominator) if m.skipped]
    if missing:
        return Target(name, op, limit, unit, None, f"{missing[0].name} skipped: {missing[0].skipped}")
    top, bottom = values if values is not None else (numerator.value, denominator.value)
    if top is None or bottom is None or bottom == 0:
        return Target(name, op, limit, unit, None, "no value on this device")
    return Target(name, op, limit, unit, top / bottom)


@dataclass
class SuiteResult:
    suite: str
    measurements: list[Measurement] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def add(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        return measurement

    def get(self, key: str) -> Measurement:
        return next(m for m in self.measurements if m.key == key)

    def link(self) -> None:
        """Fill each measurement's ratio against its baseline."""
        for m in self.measurements:
            base = self.get(m.baseline) if m.baseline else None
            if base is not None and m.value is not None and base.value:
                m.ratio = m.value / base.value

    def to_json(self) -> dict:
        return {"suite": self.suite, "status": "error" if self.error else "ok", "error": self.error,
                "seconds": round(self.seconds, 3), "info": self.info,
                "measurements": [m.to_json() for m in self.measurements],
                "targets": [t.to_json() for t in self.targets]}


def from_runs(key: str, name: str, scope: str, runs: Runs, unit: str = "s", **kwargs) -> Measurement:
    return Measurement(key, name, scope, unit, runs.seconds, runs.warmup_s, **kwargs)


# -- subprocesses ----------------------------------------------------------------------------------

def child_env() -> dict:
    """Offline, quiet, and able to import sara_cli from this checkout without an install."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_process(args: list[str], log: Path, check_imports: bool = False) -> dict:
    """Run `python ARGS` to completion under bench/peak_memory.py.

    Returns {"peak_mib": its own peak resident memory, "imports_datasets": whether it imported
    `datasets` (None unless check_imports, which runs it with -X importtime)}.

    Raises:
        BenchError: a non-zero exit; the message holds the end of the log.
    """
    report = log.with_suffix(".peak.json")
    report.unlink(missing_ok=True)
    command = [sys.executable, *(["-X", "importtime"] if check_imports else []),
               str(REPO / "bench" / "peak_memory.py"), str(report), *args]
    with open(log, "w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                    cwd=REPO).returncode
    text = log.read_text(errors="replace")
    if returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise BenchError(f"`python {' '.join(args)}` exited with {returncode}:\n{tail}")
    imported = any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "datasets"
                   for line in text.splitlines()) if check_imports else None
    return {"peak_mib": json.loads(report.read_text())["peak_mib"], "imports_datasets": imported}


def datasets_imports(values: list[dict]) -> bool | None:
    """Whether any run of a checked subprocess imported `datasets` (None: not checked)."""
    checked = [v["imports_datasets"] for v in values if v.get("imports_datasets") is not None]
    return any(checked) if checked else None
