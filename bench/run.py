"""Benchmark sara against PEFT on one CUDA GPU (issue 7); method and results in docs/benchmarks.md.

    python bench/run.py --suite all --out results.json           # the benchmark, on a CUDA GPU
    python bench/run.py --suite all --smoke --out /tmp/r.json    # every suite on a tiny CPU model (CI)

Suites: analyze, init, train, memory, merge, eval. Each prints one table (measurements, then the
issue's targets) and all of them go into one JSON file with the GPU, versions, date and command.
The benchmark imports no `datasets` (the GPU machine has none); the run fails if anything did.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

# The repository root replaces bench/ at the head of the path: `bench` and `sara_cli` import from
# this checkout (installed or not), and bench's module names cannot shadow anyone else's.
sys.path[0] = str(Path(__file__).resolve().parents[1])
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_name, _value)

from bench import suite_analyze, suite_eval, suite_init, suite_memory, suite_merge, suite_train  # noqa: E402
from bench.harness import SuiteResult, full_settings, load_peft, smoke_settings  # noqa: E402
from bench.models import ModelPool  # noqa: E402
from bench.report import environment, print_table, write_results  # noqa: E402

# In this order: merge frees the 7B model the earlier suites share; eval builds its own.
SUITES = {"analyze": suite_analyze.run, "init": suite_init.run, "train": suite_train.run,
          "memory": suite_memory.run, "merge": suite_merge.run, "eval": suite_eval.run}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="all", choices=[*SUITES, "all"], help="which suite (default all)")
    parser.add_argument("--out", type=Path, default=Path("results.json"),
                        help="results JSON (default results.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU, one repeat: "
                        "checks that the scripts run; the numbers mean nothing")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement after the "
                        "warm-up (default 3; 1 with --smoke)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop repeating a measurement once the "
                        "next run would take it past this many seconds (default 120)")
    parser.add_argument("--slow", action="store_true", help="also time naive SVD and PEFT full-SVD PiSSA on "
                        "all-linear (several minutes each)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baselines")
    parser.add_argument("--layers", type=int, default=None, help="a slice of the 7B-shaped model: its real "
                        "layer shapes, this many of the 32 layers (the ratios against PEFT are per layer)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="eval suite: the first N gsm8k prompts "
                        "(default 64)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=None, help="eval suite: new tokens per "
                        "prompt (default: the task's 256)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the saved checkpoint, adapters and "
                        "logs go (default: $TMPDIR/sara-bench, a fresh temporary folder with --smoke)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    for flag, value in (("--layers", args.layers), ("--eval-prompts", args.eval_prompts),
                        ("--eval-max-new-tokens", args.eval_max_new_tokens)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.layers is not None and args.smoke:
        parser.error("--layers slices the 7B-shaped GPU model; --smoke uses its own tiny model")
    return args


def run_suite(name: str, settings, pool, peft, peft_reason) -> SuiteResult:
    """One suite; a crash becomes an error entry so the other suites still run."""
    started = time.perf_counter()
    try:
        result = SUITES[name](settings, pool, peft, peft_reason)
    except Exception as exc:  # report and go on: one broken suite must not hide the others
        result = SuiteResult(name, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}")
    result.link()
    result.seconds = time.perf_counter() - started
    return result


def datasets_report(results: dict[str, SuiteResult]) -> dict:
    """Whether this process, or any sara command it timed, imported `datasets`."""
    children = [m.extra["imports_datasets"] for r in results.values() for m in r.measurements
                if m.extra.get("imports_datasets") is not None]
    return {"bench process": "datasets" in sys.modules, "sara commands": any(children) if children else None}


def summary(results: dict[str, SuiteResult], smoke: bool) -> str:
    verdicts = [t.met for r in results.values() for t in r.targets if not (smoke and t.timing)]
    text = (f"{verdicts.count(True)} met, {verdicts.count(False)} missed, "
            f"{verdicts.count(None)} not measured")
    return f"correctness checks (timing targets are not judged in --smoke): {text}" if smoke else f"targets: {text}"


def run_all(args: argparse.Namespace, argv: list[str], settings) -> int:
    peft, peft_reason = load_peft(settings)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    meta = environment(settings, argv)
    pool = ModelPool(settings)
    results = {}
    for name in names:
        results[name] = run_suite(name, settings, pool, peft, peft_reason)
        print_table(results[name], settings.smoke)
    pool.release()
    meta["peft_baselines"] = "run" if peft is not None else f"skipped: {peft_reason}"
    meta["datasets_imported"] = imported = datasets_report(results)
    write_results(args.out, meta, results)
    print(summary(results, settings.smoke) + f"; wrote {args.out}")
    failed = [n for n, r in results.items() if r.error]
    if failed:
        print(f"error: suite(s) failed: {', '.join(failed)}", file=sys.stderr)
    broken = [t.name for r in results.values() for t in r.targets if not t.timing and t.met is False]
    if broken:  # a missed timing target is a finding; a failed correctness check is a bug
        print(f"error: correctness check(s) failed: {'; '.join(broken)}", file=sys.stderr)
    if any(imported.values()):
        print(f"error: `datasets` was imported ({imported}); the GPU machine has none", file=sys.stderr)
    return 1 if failed or broken or any(imported.values()) else 0


def sized(settings, args: argparse.Namespace):
    """Settings with the model slice and the eval sizes the command line asked for."""
    changes = {}
    if args.layers is not None:
        changes["model"] = replace(settings.model, num_hidden_layers=args.layers)
    if args.eval_prompts is not None:
        changes["eval_prompts"] = args.eval_prompts
    if args.eval_max_new_tokens is not None:
        changes["eval_max_new_tokens"] = args.eval_max_new_tokens
    return replace(settings, **changes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU and none is visible; run with --smoke to check the "
              "scripts on the CPU", file=sys.stderr)
        return 2
    if args.smoke:
        # A tiny model gains nothing from threads, and on a busy CI runner OpenMP's spinning
        # threads make a 64 x 64 eigh take 100 ms instead of 0.2 ms. Children inherit this.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    temporary = args.workdir is None and args.smoke
    workdir = (Path(tempfile.mkdtemp(prefix="sara-bench-smoke-")) if temporary else
               args.workdir or Path(tempfile.gettempdir()) / "sara-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    use_peft = not args.no_peft
    settings = (smoke_settings(workdir, args.repeats or 1, use_peft) if args.smoke else
                full_settings(workdir, args.repeats or 3, args.budget_s, args.slow, use_peft))
    settings = sized(settings, args)
    try:
        return run_all(args, argv, settings)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
