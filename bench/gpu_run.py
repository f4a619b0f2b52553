"""Prove every sara command on a CUDA GPU and run the benchmark suites, in two timed calls (issue 23).

    python bench/gpu_run.py --phase 1 --budget-s 400 --out $OUT/gpu   # setup, end to end, analyze + train
    python bench/gpu_run.py --phase 2 --budget-s 180 --out $OUT/gpu   # merge, eval, init, memory suites
    python bench/gpu_run.py --smoke --suites eval --out /tmp/gpu-smoke # the same on a tiny CPU model (CI)
    python bench/gpu_run.py --phase 1 --list --out /tmp/x              # the steps and commands, run nothing

The steps are the table in bench/gpu_steps.py. Each runs as its own process with a time limit; its
exit code, time and last lines go into OUT/results-phase-P.json and OUT/summary-phase-P.md (its
whole output into OUT/logs/), both rewritten after every step, so a call cut short still leaves
what it did. A failed step does not stop the others; only the steps that need its output are
skipped. No step starts once the budget is nearly spent. Large files (models, runs, merges, the
7B-shaped slice) go to --workdir, which stays on the machine between calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":  # as in bench/run.py: `bench` and `sara_cli` import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import gpu_steps  # noqa: E402
from bench.gpu_steps import Plan, Step  # noqa: E402
from bench.harness import REPO, child_env  # noqa: E402

TAIL_LINES = 25
RESERVE_S = 10.0  # kept back from the budget to write the results after a step is cut off


@dataclass
class Outcome:
    """What one step did. status: ok, failed, timeout or skipped."""

    name: str
    phase: int
    group: str
    status: str
    exit_code: int | None = None
    seconds: float = 0.0
    command: str | None = None
    tail: list[str] = field(default_factory=list)
    log: str | None = None  # relative to the output folder
    note: str = ""
    targets: list[dict] = field(default_factory=list)  # suite steps: the suite's targets


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/gpu_run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="all", choices=["1", "2", "all"],
                        help="1: setup, end to end and the quick suites; 2: the other suites (default all)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting steps so the call ends "
                        "within this many seconds (default 400; give the device call 30 s more)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results, summary and logs")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for models, runs and checkpoints "
                        "(default $TMPDIR/sara-gpu-run; keep it between the two calls)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install offline, "
                        "--no-deps (default .whl)")
    parser.add_argument("--suites", default=None, help="comma-separated bench/run.py suites to run in this "
                        "call whatever their phase, or 'none' (default: the phase's own)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, no setup: checks that "
                        "the script runs (CI); nothing it measures means anything")
    parser.add_argument("--list", action="store_true", help="print the steps this call would run, with their "
                        "commands and limits, and exit (runs nothing; needs no GPU)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    known = [name for name, _, _ in gpu_steps.SUITES]
    if args.suites is not None:
        args.suites = [] if args.suites == "none" else [s.strip() for s in args.suites.split(",") if s.strip()]
        unknown = [s for s in args.suites if s not in known]
        if unknown:
            parser.error(f"--suites: unknown suite(s) {', '.join(unknown)}; allowed: {', '.join(known)} or none")
    return args


def plan_steps(args: argparse.Namespace, plan: Plan) -> list[Step]:
    phases = {1, 2} if args.phase == "all" else {int(args.phase)}
    steps = gpu_steps.setup_steps(plan)
    if 1 in phases:
        steps += gpu_steps.e2e_steps(plan)
    return steps + gpu_steps.suite_steps(plan, args.suites, phases, read_state(plan.workdir)["left"])


# -- what earlier calls left -----------------------------------------------------------------------

STATE_NAME = "gpu-run-state.json"


def read_state(workdir: Path) -> dict:
    """{"left": suites an earlier call on this machine skipped for its budget}."""
    try:
        return {"left": list(json.loads((workdir / STATE_NAME).read_text())["left"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"left": []}


def update_state(workdir: Path, outcome: Outcome) -> None:
    """A suite skipped for the budget is left for the next call; one that started is not."""
    state = read_state(workdir)
    suite = outcome.name.removeprefix("suite-")
    state["left"] = [name for name in state["left"] if name != suite]
    if outcome.status == "skipped" and outcome.note.startswith("budget"):
        state["left"].append(suite)
    elif outcome.status == "skipped":
        return
    replace_text(workdir / STATE_NAME, json.dumps(state) + "\n")


# -- running one step ------------------------------------------------------------------------------

def run_step(step: Step, done: dict[str, Outcome], deadline: float, logs: Path, inline: bool) -> Outcome:
    """Run `step` unless it has nothing to run, a step it needs failed, or the budget is spent."""
    outcome = Outcome(step.name, step.phase, step.group, "skipped", note=step.note)
    if step.argv is None:
        outcome.status = "ok" if step.group == "setup" else "skipped"
        return outcome
    outcome.command = "python " + shlex.join(step.argv)
    failed = [n for n in step.needs if n not in done or done[n].status != "ok"]
    if failed:
        outcome.note = f"needs {', '.join(failed)}, which did not succeed"
        return outcome
    left = deadline - time.monotonic() - RESERVE_S
    if left < step.min_s:
        outcome.note = f"budget: {max(left, 0):.0f} s left, the step needs at least {step.min_s:.0f} s"
        return outcome
    log = logs / f"{step.name}.log"
    outcome.log = f"{logs.name}/{log.name}"
    started = time.monotonic()
    if inline and step.argv[:2] == ["-m", "sara_cli"]:
        outcome.exit_code = run_inline(step.argv[2:], log)
    else:
        outcome.exit_code = run_process(step.argv, log, min(step.timeout_s, left), dict(step.env))
    outcome.seconds = round(time.monotonic() - started, 2)
    outcome.tail = tail(log)
    if outcome.exit_code is None:
        outcome.status = "timeout"
        outcome.note = f"killed after {min(step.timeout_s, left):.0f} s"
    else:
        outcome.status = "ok" if outcome.exit_code == 0 else "failed"
    return outcome


def run_process(argv: list[str], log: Path, timeout_s: float, env: dict | None = None) -> int | None:
    """`python ARGV` in the repository root, all output to `log`; its exit code, None on timeout.

    The step runs in its own process group, so a timeout also ends the processes it started.
    """
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**child_env(), **(env or {})}, start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def run_inline(args: list[str], log: Path) -> int:
    """A sara command in this process through Typer's runner, as the CLI tests run it (--smoke: it
    saves each command's ~8 s of imports on a small CPU)."""
    from typer.testing import CliRunner

    from sara_cli.cli.app import app

    result = CliRunner().invoke(app, args)
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text += "".join(traceback.format_exception(result.exception))
    log.write_text(text)
    return result.exit_code


def tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log, each cut to 300 characters."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    kept = [line.rstrip()[:300] for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return kept[-lines:]


def suite_targets(path: Path) -> list[dict]:
    """The targets in one bench/run.py results file, each with its suite's name."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [{"suite": suite, **target} for suite, report in data.get("suites", {}).items()
            for target in report.get("targets", [])]


# -- the call --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    if args.smoke:
        os.environ["OMP_NUM_THREADS"] = "1"  # as bench/run.py --smoke; the child processes inherit it
    workdir = args.workdir or Path(tempfile.gettempdir()) / ("sara-gpu-run-smoke" if args.smoke else "sara-gpu-run")
    wheels = args.wheels.resolve()
    plan = Plan(smoke=args.smoke, out=args.out.resolve(), workdir=workdir.resolve(), wheels=wheels,
                install=gpu_steps.wheels_to_install(wheels) if wheels.is_dir() else [],
                bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)
    if args.list:
        for step in plan_steps(args, plan):
            command = "python " + shlex.join(step.argv) if step.argv else f"(nothing to run: {step.note})"
            print(f"phase {step.phase}  {step.name:<18} limit {step.timeout_s:4.0f} s  {command}")
        return 0
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    gpu_steps.write_recipes(plan)
    meta = {"command": "python bench/gpu_run.py " + " ".join(argv), "phase": args.phase, "smoke": args.smoke,
            "budget_s": args.budget_s, "workdir": str(plan.workdir),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "note": ("CPU smoke check: tiny model; nothing measured means anything" if args.smoke else
                     "GPU run")}
    outcomes = run_call(plan_steps(args, plan), plan, args.phase, meta, started, started + args.budget_s)
    print("\n" + (plan.out / f"summary-phase-{args.phase}.md").read_text())
    bad = [o.name for o in outcomes if o.status in ("failed", "timeout")
           or (o.status == "skipped" and o.note.startswith(("budget", "needs")))]
    if bad:
        print(f"error: step(s) not done: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def run_call(steps: list[Step], plan: Plan, phase: str, meta: dict, started: float,
             deadline: float) -> list[Outcome]:
    """Every step in order; the results are rewritten after each one."""
    logs = plan.out / "logs"
    outcomes: dict[str, Outcome] = {}
    environment: dict = {}
    for step in steps:
        print(f"[{time.monotonic() - started:6.1f} s] {step.name} ...", flush=True)
        try:
            outcome = run_step(step, outcomes, deadline, logs, inline=plan.smoke)
        except Exception as exc:  # a fault of this script must not lose the other steps
            outcome = Outcome(step.name, step.phase, step.group, "failed", note=f"{type(exc).__name__}: {exc}")
        if step.group == "suite":
            update_state(plan.workdir, outcome)
            if outcome.exit_code is not None:
                outcome.targets = suite_targets(plan.out / "suites" / f"{step.name.removeprefix('suite-')}.json")
        if step.name == "environment" and outcome.status == "ok":
            environment = last_json_line(logs / "environment.log")
        outcomes[step.name] = outcome
        print_outcome(outcome)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        write_results(plan.out, phase, meta, environment, list(outcomes.values()))
    return list(outcomes.values())


def print_outcome(outcome: Outcome) -> None:
    """One line per step; the last lines of a failure; the device line of the environment step."""
    if outcome.name == "environment" and outcome.tail:
        print(f"    {outcome.tail[-1]}")  # device, torch, CUDA, transformers
    print(f"    {outcome.status}" + (f" (exit {outcome.exit_code})" if outcome.exit_code else "")
          + f", {outcome.seconds:.1f} s" + (f": {outcome.note}" if outcome.note else ""))
    if outcome.status in ("failed", "timeout"):
        print("    " + "\n    ".join(outcome.tail[-8:]))
    sys.stdout.flush()


def last_json_line(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}


def git_commit() -> str | None:
    from bench.report import _git_commit

    return _git_commit()


# -- results ---------------------------------------------------------------------------------------

def write_results(out: Path, phase: str, meta: dict, environment: dict, outcomes: list[Outcome]) -> None:
    """OUT/results-phase-P.json and OUT/summary-phase-P.md, each replaced whole."""
    data = {"meta": meta, "environment": environment, "steps": [asdict(o) for o in outcomes],
            "targets": [t for o in outcomes for t in o.targets]}
    replace_text(out / f"results-phase-{phase}.json", json.dumps(data, indent=2) + "\n")
    replace_text(out / f"summary-phase-{phase}.md", summary_markdown(meta, environment, outcomes))


def replace_text(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    staging.replace(path)


def verdict(target: dict, smoke: bool) -> str:
    if smoke and target.get("timing", True):
        return "not judged (smoke)"
    text = {True: "met", False: "MISSED", None: "not measured"}[target.get("met")]
    return text + (f" ({target['note']})" if target.get("note") else "")


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(meta: dict, environment: dict, outcomes: list[Outcome]) -> str:
    versions = ", ".join(f"{k} {environment.get(k)}" for k in ("torch", "cuda", "transformers", "peft",
                                                                "pydantic", "datasets", "bitsandbytes"))
    lines = [f"# sara on {environment.get('device', 'an unknown device')}: phase {meta['phase']}", "",
             f"- {meta['note']}", f"- command: `{meta['command']}`",
             f"- date {meta['date']}, commit {meta['git_commit']}, {meta.get('elapsed_s', 0)} s of "
             f"{meta['budget_s']:.0f} s budget", f"- {versions}", "",
             "| step | status | exit | seconds | last line or note |", "| --- | --- | ---: | ---: | --- |"]
    for o in outcomes:
        last = o.note if o.status == "skipped" or not o.tail else (o.tail[-1] + (f" ({o.note})" if o.note else ""))
        lines.append(f"| {o.name} | {o.status} | {'' if o.exit_code is None else o.exit_code} | "
                     f"{o.seconds:.1f} | {cell(last)} |")
    targets = [t for o in outcomes for t in o.targets]
    if targets:
        lines += ["", "| suite | target | value | limit | verdict |", "| --- | --- | ---: | --- | --- |"]
        for t in targets:
            value = t["value"] if isinstance(t["value"], (bool, type(None))) else f"{t['value']:.3g}"
            lines.append(f"| {t['suite']} | {cell(t['name'])} | {value} {t['unit']} | {t['op']} {t['limit']} | "
                         f"{cell(verdict(t, meta['smoke']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
