"""The run's environment record, one table per suite, and the results file."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from bench.harness import REPO, Settings, SuiteResult, Target


def environment(settings: Settings, argv: list[str]) -> dict:
    """GPU, library versions, date and the exact command of this run."""
    import torch
    import transformers

    from sara_cli import __version__

    gpu = torch.cuda.get_device_name(0) if settings.device == "cuda" else None
    return {
        "smoke": settings.smoke,
        "note": ("CPU smoke check: tiny model, one repeat; the numbers are not performance evidence"
                 if settings.smoke else "GPU benchmark run"),
        "device": settings.device, "gpu": gpu, "cpu": _cpu_name(),
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": _version_of("peft"), "sara": __version__, "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/run.py " + shlex.join(argv),
        "model": settings.model.label() + f", {settings.dtype_name}",
        "eval_model": settings.eval_model.label() + f", {settings.dtype_name}",
        "repeats": settings.repeats, "warmup": settings.warmup, "budget_s": settings.budget_s,
    }


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(path: Path, meta: dict, results: dict[str, SuiteResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "suites": {name: r.to_json() for name, r in results.items()}}
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- the table -------------------------------------------------------------------------------------

def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _extra(extra: dict) -> str:
    parts = []
    for key, value in extra.items():
        if isinstance(value, float):
            value = _number(value)
        if isinstance(value, (int, str, bool)) or value is None:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def verdict(target: Target, smoke: bool) -> str:
    """met / MISSED / not measured; a --smoke run judges only the correctness checks."""
    if smoke and target.timing:
        return "not judged (smoke)"
    text = {True: "met", False: "MISSED", None: "not measured"}[target.met]
    return text + (f" ({target.note})" if target.note else "")


def rows(result: SuiteResult, smoke: bool) -> tuple[list[list[str]], list[list[str]]]:
    """(measurement rows, target rows) as text cells."""
    measured = []
    for m in result.measurements:
        if m.skipped:
            measured.append([m.name, m.scope, "skipped", "-", "-", m.skipped])
            continue
        ratio = f"{_number(m.ratio)}x {m.baseline}" if m.ratio is not None else "-"
        measured.append([m.name, m.scope, f"{_number(m.value)} {m.unit}", str(len(m.runs)), ratio,
                         _extra(m.extra)])
    targets = []
    for t in result.targets:
        value = t.value if isinstance(t.value, bool) else _number(t.value)
        targets.append([t.name, "", f"{value} {t.unit}".strip(), "", f"{t.op} {t.limit}", verdict(t, smoke)])
    return measured, targets


HEADERS = ["measurement", "scope", "median", "runs", "ratio vs baseline", "notes"]


def print_table(result: SuiteResult, smoke: bool) -> None:
    """One table per suite: measurements, then a section with the targets."""
    measured, targets = rows(result, smoke)
    title = f"{result.suite} ({result.seconds:.1f} s)"
    if smoke:
        title += " - CPU smoke check, not performance evidence"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text where rich is missing
        print(f"\n== {title}")
        for row in [HEADERS] + measured + targets:
            print(" | ".join(row))
        if result.error:
            print(f"ERROR: {result.error}")
        return
    table = Table(title=title, show_lines=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in measured:
        table.add_row(*row)
    if targets:
        table.add_section()
        for row in targets:
            table.add_row(*row, style="green" if row[-1].startswith("met") else
                          "red" if row[-1].startswith("MISSED") else "yellow")
    console = Console(width=200)
    console.print(table)
    if result.error:
        console.print(f"[bold red]{result.suite} failed:[/] {result.error}", highlight=False)
