"""What bench/gpu_run.py runs, as a table of steps (issue 23; docs/benchmarks.md, "On a lent GPU").

A step is one `python ...` command with a time limit; gpu_run runs them in order, records each
one's exit code and last lines, and goes on after a failure. One more case is one line:
- a sara command end to end: a `Step` in `e2e_steps`;
- a benchmark suite of bench/run.py: a row in `SUITES` (its name, its phase, its time limit).

Phase 1 (the first call, about 8 minutes) sets up, runs every command end to end on a small Llama
and the quickest suites; phase 2 (the second call, same warm machine) runs the other suites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO, LlamaShape

# bench/run.py's suites: (name, phase, time limit in seconds), in the order they run. Phase 2
# puts the suites behind issue 23's targets first, so a short budget drops init and memory. The
# limits are estimates, about twice what each should take on an H100 with `suite_argv`'s
# settings (not yet measured); a suite that reaches its limit is killed and recorded as timed out.
SUITES = [
    ("analyze", 1, 180),  # saves the 7B-shaped slice that merge (and memory) read
    ("train", 1, 150),
    ("merge", 2, 150),
    ("eval", 2, 120),
    ("init", 2, 150),
    ("memory", 2, 150),
]
SLICE_LAYERS = 8  # of the 7B shape's 32: the real layer shapes, a 3.8 GB checkpoint instead of 13.5 GB

# Adapter settings per method, the same on the GPU and in --smoke.
METHODS = {
    "sara": {"tau": 0.01},
    "mosara": {"tau": 0.5, "num_experts": 5},
    "lora": {"rank": 8, "alpha": 16.0},
    "pissa": {"rank": 8},
    "sorsa": {"rank": 8},
}
GPU_MODEL = LlamaShape(1024, 4, 2816, 32000, 16, 8)  # every kernel large enough to run on the GPU
SMOKE_MODEL = LlamaShape(64, 2, 176, 32000, 4, 2)  # the GPU vocabulary: ids past the tokenizer's 1024 too


@dataclass(frozen=True)
class Step:
    """One command of a call. `argv` follows `python`; None means there is nothing to run (`note`
    says why). A step whose `needs` did not all succeed is skipped, and so is one that would start
    with less than `min_s` seconds of the budget left."""

    name: str
    phase: int
    group: str  # "setup", "e2e" or "suite"
    argv: list[str] | None
    timeout_s: float
    needs: tuple[str, ...] = ()
    min_s: float = 15.0
    note: str = ""
    env: tuple[tuple[str, str], ...] = ()  # set for this step's process only


@dataclass(frozen=True)
class Plan:
    """Everything that differs between a GPU call and a --smoke call."""

    smoke: bool
    out: Path  # results, summaries, logs (small; comes back from the GPU machine)
    workdir: Path  # models, runs, merged checkpoints (large; stays on the machine)
    wheels: Path
    install: list[Path]  # wheels the setup step installs (the ones this machine lacks)
    bitsandbytes: bool

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def dtype(self) -> str:
        return "float32" if self.smoke else "bfloat16"

    @property
    def model(self) -> LlamaShape:
        return SMOKE_MODEL if self.smoke else GPU_MODEL

    @property
    def e2e(self) -> Path:
        return self.workdir / "e2e"


def sara(*args) -> list[str]:
    """`python -m sara_cli --debug ...`: a failure leaves its traceback in the log."""
    return ["-m", "sara_cli", "--debug", *map(str, args)]


def setup_steps(plan: Plan) -> list[Step]:
    if plan.smoke:
        install = None, "--smoke uses this machine's packages"
    elif not plan.wheels.is_dir():
        install = None, f"no wheel folder {plan.wheels}: nothing to install"
    elif not plan.install:
        install = None, f"every wheel in {plan.wheels} is installed already"
    else:
        install = ["-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
                   *map(str, plan.install)], ""
    # An image whose Python is "externally managed" (PEP 668) refuses a plain pip install; this is a
    # throwaway machine. pip older than 23.0.1 ignores the variable.
    return [Step("setup", 0, "setup", install[0], 240, min_s=0, note=install[1],
                 env=(("PIP_BREAK_SYSTEM_PACKAGES", "1"),)),
            Step("environment", 0, "setup", ["-c", "from bench.gpu_steps import print_environment; "
                                                   "print_environment()"], 120, min_s=0)]


def e2e_steps(plan: Plan) -> list[Step]:
    """Every sara command on the small model: train (all methods), merge, export, eval, route-map,
    chat, analyze, and a 4-bit run."""
    w, shape, n = plan.e2e, plan.model, 4 if plan.smoke else 8  # n: eval examples per task
    tokens = 16 if plan.smoke else 64

    def run(method: str) -> Path:
        return w / "runs" / method

    build = ["bench/small_model.py", w / "model", "--device", plan.device, "--dtype", plan.dtype,
             "--hidden-size", shape.hidden_size, "--intermediate-size", shape.intermediate_size,
             "--layers", shape.num_hidden_layers, "--heads", shape.num_attention_heads,
             "--kv-heads", shape.num_key_value_heads, "--vocab-size", shape.vocab_size]
    steps = [Step("model", 1, "e2e", list(map(str, build)), 180)]
    for method in METHODS:
        steps.append(Step(f"train-{method}", 1, "e2e", sara("train", w / "recipes" / f"{method}.yaml", "--overwrite"),
                          240, needs=("model",)))
    steps.append(Step("train-sara-4bit", 1, "e2e",
                      sara("train", w / "recipes" / "sara-4bit.yaml", "--overwrite") if plan.bitsandbytes else None,
                      240, needs=("model",), note="" if plan.bitsandbytes else "bitsandbytes is not installed"))
    steps += [
        Step("merge-bf16", 1, "e2e", sara("merge", run("sara"), "--out", w / "merged-bf16", "--dtype", "bfloat16",
                                          "--overwrite"), 180, needs=("train-sara",)),
        Step("merge-fp32", 1, "e2e", sara("merge", run("sara"), "--out", w / "merged-fp32", "--dtype", "float32",
                                          "--overwrite"), 180, needs=("train-sara",)),
        Step("export-peft", 1, "e2e", sara("merge", run("lora"), "--format", "peft-lora", "--out", w / "peft-lora",
                                           "--overwrite"), 180, needs=("train-lora",)),
        Step("eval-fast", 1, "e2e", sara("eval", run("sara"), "--task", "svamp,boolq", "--limit", n, "--protocol",
                                         "fast", "--max-new-tokens", tokens, "--out", w / "eval-fast"),
             180, needs=("train-sara",)),
        Step("eval-llm-adapters", 1, "e2e", sara("eval", w / "merged-bf16", "--task", "svamp", "--limit", n // 2,
                                                 "--protocol", "llm-adapters", "--max-new-tokens", tokens,
                                                 "--out", w / "eval-llm-adapters"), 180, needs=("merge-bf16",)),
        Step("route-map", 1, "e2e", sara("route-map", run("mosara"), "--task", "svamp,boolq", "--limit", n,
                                         "--out", w / "route-map"), 180, needs=("train-mosara",)),
        Step("chat", 1, "e2e", sara("chat", run("sara"), "--prompt", "What is 12 plus 30?", "--max-new-tokens",
                                    tokens), 120, needs=("train-sara",)),
        Step("analyze", 1, "e2e", sara("analyze", w / "model", "--tau", "0.01", "--tau", "0.5", "--targets",
                                       "all-linear", "--device", plan.device, "--json", w / "analyze.json"),
             120, needs=("model",)),
        # Routed (unmerged) Mo-SARA m 5 on q/v against the base, per generated token (issue 22).
        Step("routed-inference", 1, "e2e", list(map(str, [
            "bench/routed_inference.py", "--base", w / "model", "--device", plan.device, "--dtype", plan.dtype,
            "--experts", 5, "--targets", "q_proj,v_proj", "--new-tokens", 8 if plan.smoke else 64,
            "--rounds", 1 if plan.smoke else 5, "--out", plan.out / "suites" / "routed-inference.json"])),
             180, needs=("model",)),
    ]
    return steps


def suite_steps(plan: Plan, names: list[str] | None, phases: set[int], left: list[str] = ()) -> list[Step]:
    """bench/run.py, one suite per process.

    Args:
        names: exactly these suites, whatever their phase (a rerun); None: the suites of `phases`,
            after the suites in `left`.
        left: suites an earlier call on this machine skipped for its budget: the second call
            does the rest of the first one too.
    """
    if names is not None:
        chosen = [row for row in SUITES if row[0] in names]
    else:
        chosen = [row for row in SUITES if row[0] in left]
        chosen += [row for row in SUITES if row[1] in phases and row[0] not in left]
    return [Step(f"suite-{name}", phase, "suite", suite_argv(plan, name), timeout_s, min_s=45,
                 note="left by an earlier call's budget" if name in left and names is None else "")
            for name, phase, timeout_s in chosen]


def suite_argv(plan: Plan, name: str) -> list[str]:
    argv = ["bench/run.py", "--suite", name, "--out", str(plan.out / "suites" / f"{name}.json"),
            "--workdir", str(plan.workdir / "bench")]
    if plan.smoke:
        return argv + ["--smoke"]
    # Up to 3 timed repeats, none started past 20 s; eval: 16 prompts (one batch of the fast
    # protocol) x 64 new tokens, so the one-prompt-at-a-time beam search takes well under a minute.
    return argv + ["--layers", str(SLICE_LAYERS), "--repeats", "3", "--budget-s", "20", "--eval-prompts", "16",
                   "--eval-max-new-tokens", "64"]


def wheels_to_install(folder: Path) -> list[Path]:
    """The wheels in `folder` whose distribution is missing here or older than the wheel.

    The image's own packages (torch, transformers, ...) are never carried, so they are never
    replaced; a newer copy of a small shared one (typing-extensions) is what pydantic needs.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    chosen = []
    for wheel in sorted(folder.glob("*.whl")):
        name, wheel_version = wheel.name.split("-")[:2]  # distribution-version-...: names use "_"
        try:
            installed = version(name)
        except PackageNotFoundError:
            chosen.append(wheel)
            continue
        try:
            if Version(installed) < Version(wheel_version):
                chosen.append(wheel)
        except InvalidVersion:
            continue
    return chosen


# -- recipes ---------------------------------------------------------------------------------------

def write_recipes(plan: Plan) -> None:
    """One recipe per method (and the 4-bit one) under WORKDIR/e2e/recipes. JSON is valid YAML."""
    folder = plan.e2e / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    for method in METHODS:
        (folder / f"{method}.yaml").write_text(json.dumps(recipe(plan, method), indent=2) + "\n")
    four_bit = recipe(plan, "sara", name="sara-4bit")
    four_bit["model"]["load_in_4bit"] = True
    (folder / "sara-4bit.yaml").write_text(json.dumps(four_bit, indent=2) + "\n")


def recipe(plan: Plan, method: str, name: str | None = None) -> dict:
    steps, batch = (2, 2) if plan.smoke else (10, 4)
    train = {"output_dir": str(plan.e2e / "runs" / (name or method)), "learning_rate": 1e-3, "max_steps": steps,
             "per_device_train_batch_size": batch, "logging_steps": 1, "save_steps": 1000,
             "gradient_checkpointing": True, "seed": 0}
    if not plan.smoke:
        train["bf16"] = True
    return {"model": {"name_or_path": str(plan.e2e / "model"), "dtype": plan.dtype},
            "adapter": {"method": method, "targets": "q_proj,v_proj", "dropout": 0.05, **METHODS[method]},
            "data": {"train_file": "builtin:mawps-quickstart", "cutoff_len": 64 if plan.smoke else 256,
                     "limit": steps * batch},
            "train": train}


# -- the environment step --------------------------------------------------------------------------

PACKAGES = ["torch", "transformers", "accelerate", "peft", "safetensors", "typer", "rich", "pydantic",
            "datasets", "pyarrow", "huggingface-hub", "bitsandbytes"]


def print_environment() -> None:
    """Run as its own process after the setup: the device and versions, one JSON line last."""
    import platform
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from sara_cli import __version__

    info = {"sara": __version__, "python": platform.python_version(), "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cuda": torch.version.cuda, "repo": str(REPO)}
    for package in PACKAGES:
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    for module in ("pydantic", "datasets"):  # what sara needs that the GPU image lacks
        try:
            import_module(module)
            info[f"import {module}"] = "ok"
        except Exception as exc:  # report any failure: the train steps will show its effect
            info[f"import {module}"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(info))
    for key, value in info.items():
        print(f"{key}: {value}")
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, transformers {info['transformers']}")
