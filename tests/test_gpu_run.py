"""bench/gpu_run.py, the one command for a lent GPU (issue 23), kept from rotting without one.

`--smoke` runs every step of both phases on a tiny CPU model (the sara commands in-process, the
rest as processes, as on the GPU) and one suite; tests/test_bench.py already runs every suite in
smoke mode. The other tests pin down the rules a GPU call relies on: exit code and last lines
recorded, a timeout ends the step's processes, a failure skips only what needs it, the budget
stops new steps, and the setup installs only the wheels a machine lacks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sara_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
try:
    from bench import gpu_run, gpu_steps
finally:
    sys.path.remove(str(REPO))

E2E = ["model", "train-sara", "train-mosara", "train-lora", "train-pissa", "train-sorsa", "train-sara-4bit",
       "merge-bf16", "merge-fp32", "export-peft", "eval-fast", "eval-llm-adapters", "route-map", "chat", "analyze", "routed-inference"]
STEP_KEYS = {"name", "phase", "group", "status", "exit_code", "seconds", "command", "tail", "log", "note", "targets"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(completed process, results, out folder) of one `--smoke` call."""
    folder = tmp_path_factory.mktemp("gpu-run")
    out = folder / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SARA_HOME": str(folder / "sara_home")}
    proc = subprocess.run([sys.executable, "bench/gpu_run.py", "--smoke", "--suites", "eval", "--out", str(out),
                           "--workdir", str(folder / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    path = out / "results-phase-all.json"
    return proc, json.loads(path.read_text()) if path.is_file() else None, out


@pytest.mark.e2e
def test_smoke_runs_every_command_end_to_end(smoke):
    proc, results, out = smoke
    assert results is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == ["setup", "environment", *E2E, "suite-eval"]
    for name, step in steps.items():
        assert set(step) == STEP_KEYS
        assert step["status"] == "ok", (name, step["note"], step["tail"])
        if name != "setup":  # --smoke installs nothing
            assert step["exit_code"] == 0 and (out / step["log"]).is_file(), name
            # A random model's chat answer is mostly ids past the tokenizer's 1024, which decode to nothing.
            assert step["tail"] or name == "chat", name
    assert "--smoke" in steps["setup"]["note"]
    assert steps["train-sara"]["command"].startswith("python -m sara_cli --debug train ")
    assert results["environment"]["device"] == "cpu" and results["environment"]["import datasets"] == "ok"
    assert results["meta"]["smoke"] is True and results["meta"]["phase"] == "all"
    routed = json.loads((out / "suites" / "routed-inference.json").read_text())
    routed = routed[0] if isinstance(routed, list) else routed
    assert routed["experts"] == 5 and set(routed["seconds_per_token"]) >= {"base", "fast"}


@pytest.mark.e2e
def test_smoke_records_suite_targets_and_a_summary(smoke):
    _, results, out = smoke
    targets = results["targets"]
    assert targets and all(t["suite"] == "eval" for t in targets)
    assert targets == next(s for s in results["steps"] if s["name"] == "suite-eval")["targets"]
    assert (out / "suites" / "eval.json").is_file()
    summary = (out / "summary-phase-all.md").read_text()
    for name in ["setup", "environment", *E2E, "suite-eval"]:
        assert re.search(rf"^\| {name} \| ok \|", summary, re.M), name
    assert "not judged (smoke)" in summary and "fast vs llm-adapters" in summary


def test_every_bench_suite_has_a_row_in_the_step_table():
    """A suite added to bench/run.py without a row in gpu_steps.SUITES would never run on the GPU."""
    help_text = subprocess.run([sys.executable, "bench/run.py", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    choices = re.search(r"--suite \{([\w,-]+)\}", help_text).group(1).split(",")
    assert sorted(c for c in choices if c != "all") == sorted(name for name, _, _ in gpu_steps.SUITES)
    assert {phase for _, phase, _ in gpu_steps.SUITES} == {1, 2}


def test_a_failing_step_records_its_exit_code_and_last_lines(tmp_path):
    step = gpu_steps.Step("boom", 1, "e2e", ["-c", "import sys\nfor i in range(40): print(f'line {i}')\n"
                                                   "sys.exit(3)"], 60)
    outcome = gpu_run.run_step(step, {}, time.monotonic() + 600, tmp_path, inline=False)
    assert (outcome.status, outcome.exit_code) == ("failed", 3)
    assert outcome.tail == [f"line {i}" for i in range(40 - gpu_run.TAIL_LINES, 40)]
    assert outcome.command.startswith("python -c")


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child-survived"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    step = gpu_steps.Step("slow", 1, "e2e", ["-c", code], timeout_s=1.0, min_s=0)
    started = time.monotonic()
    outcome = gpu_run.run_step(step, {}, time.monotonic() + 600, tmp_path, inline=False)
    assert outcome.status == "timeout" and outcome.exit_code is None
    assert time.monotonic() - started < 10
    time.sleep(4)
    assert not marker.exists()  # the whole process group went


def test_a_failure_skips_only_the_steps_that_need_it(tmp_path):
    failed = gpu_run.Outcome("train-sara", 1, "e2e", "failed", exit_code=1)
    ok = gpu_run.Outcome("train-lora", 1, "e2e", "ok", exit_code=0)
    done = {"train-sara": failed, "train-lora": ok}
    merge = gpu_steps.Step("merge-bf16", 1, "e2e", ["-c", "pass"], 60, needs=("train-sara",))
    export = gpu_steps.Step("export-peft", 1, "e2e", ["-c", "pass"], 60, needs=("train-lora",))
    skipped = gpu_run.run_step(merge, done, time.monotonic() + 600, tmp_path, inline=False)
    assert skipped.status == "skipped" and "train-sara" in skipped.note and skipped.exit_code is None
    assert gpu_run.run_step(export, done, time.monotonic() + 600, tmp_path, inline=False).status == "ok"


def test_no_step_starts_once_the_budget_is_nearly_spent(tmp_path):
    step = gpu_steps.Step("suite-merge", 2, "suite", ["-c", "pass"], 180, min_s=45)
    deadline = time.monotonic() + gpu_run.RESERVE_S + 30  # 30 s left, the step needs 45
    outcome = gpu_run.run_step(step, {}, deadline, tmp_path, inline=False)
    assert outcome.status == "skipped" and outcome.note.startswith("budget")
    assert not (tmp_path / "suite-merge.log").exists()


def test_a_call_past_its_budget_stops_and_writes_what_it_has(tmp_path):
    """A budget too small for any suite: setup and environment run, the suite is skipped with the
    reason, the results and summary are written, and the exit code says not everything ran."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_run.py", "--phase", "2", "--smoke", "--suites", "eval",
                           "--budget-s", "50", "--out", str(out), "--workdir", str(tmp_path / "work")], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = {s["name"]: s for s in json.loads((out / "results-phase-2.json").read_text())["steps"]}
    assert list(steps) == ["setup", "environment", "suite-eval"]  # phase 2: no end-to-end steps
    assert steps["suite-eval"]["status"] == "skipped" and steps["suite-eval"]["note"].startswith("budget")
    assert "| suite-eval | skipped |" in (out / "summary-phase-2.md").read_text()
    assert gpu_run.read_state(tmp_path / "work") == {"left": ["eval"]}  # for the next call


def test_the_second_call_also_runs_what_the_first_left_for_its_budget(tmp_path):
    plan = gpu_steps.Plan(smoke=False, out=tmp_path, workdir=tmp_path, wheels=tmp_path, install=[],
                          bitsandbytes=False)
    names = [s.name for s in gpu_steps.suite_steps(plan, None, {2}, ["train"])]
    assert names == ["suite-train", "suite-merge", "suite-eval", "suite-init", "suite-memory"]
    assert gpu_steps.suite_steps(plan, None, {2}, ["train"])[0].note == "left by an earlier call's budget"
    assert [s.name for s in gpu_steps.suite_steps(plan, ["eval"], {2}, ["train"])] == ["suite-eval"]
    skipped = gpu_run.Outcome("suite-train", 1, "suite", "skipped", note="budget: 30 s left, ...")
    gpu_run.update_state(tmp_path, skipped)
    assert gpu_run.read_state(tmp_path) == {"left": ["train"]}
    gpu_run.update_state(tmp_path, gpu_run.Outcome("suite-train", 1, "suite", "failed", exit_code=1))
    assert gpu_run.read_state(tmp_path) == {"left": []}  # it ran: a rerun after a fix is named with --suites


def test_setup_installs_only_the_wheels_this_machine_lacks(tmp_path):
    for name in ("surely_not_installed_pkg-1.0-py3-none-any.whl", "pytest-0.1-py3-none-any.whl",
                 "pytest-999.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = [w.name for w in gpu_steps.wheels_to_install(tmp_path)]
    assert chosen == ["pytest-999.0-py3-none-any.whl", "surely_not_installed_pkg-1.0-py3-none-any.whl"]
    plan = gpu_steps.Plan(smoke=False, out=tmp_path, workdir=tmp_path, wheels=tmp_path,
                          install=[tmp_path / n for n in chosen], bitsandbytes=False)
    setup = gpu_steps.setup_steps(plan)[0]
    assert setup.argv[:6] == ["-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    assert setup.argv[6:] == [str(tmp_path / n) for n in chosen]


def test_gpu_plan_trains_in_bf16_with_checkpointing_and_slices_the_7b_shape(tmp_path):
    plan = gpu_steps.Plan(smoke=False, out=tmp_path / "out", workdir=tmp_path, wheels=tmp_path / "none",
                          install=[], bitsandbytes=False)
    for method in gpu_steps.METHODS:
        recipe = gpu_steps.recipe(plan, method)
        assert recipe["model"]["dtype"] == "bfloat16" and recipe["train"]["bf16"] is True
        assert recipe["train"]["gradient_checkpointing"] is True and 10 <= recipe["train"]["max_steps"] <= 20
    gpu_steps.write_recipes(plan)  # every recipe the GPU call trains from passes sara's own checks
    for path in sorted((tmp_path / "e2e" / "recipes").glob("*.yaml")):
        recipe = load_recipe(path, [])
        assert recipe.model.dtype == "bfloat16" and recipe.train.bf16 is True, path.name
    assert load_recipe(tmp_path / "e2e" / "recipes" / "sara-4bit.yaml", []).model.load_in_4bit is True
    steps = {s.name: s for s in gpu_steps.e2e_steps(plan)}
    assert steps["train-sara-4bit"].argv is None and "bitsandbytes" in steps["train-sara-4bit"].note
    assert "--device" in steps["analyze"].argv and steps["analyze"].argv[-3] == "cuda"
    assert "--hidden-size" in steps["model"].argv and steps["model"].argv[steps["model"].argv.index(
        "--hidden-size") + 1] == "1024"
    suites = gpu_steps.suite_steps(plan, None, {1})
    assert [s.name for s in suites] == ["suite-analyze", "suite-train"]
    argv = suites[0].argv
    assert argv[argv.index("--layers") + 1] == str(gpu_steps.SLICE_LAYERS) and 4 <= gpu_steps.SLICE_LAYERS <= 8
    assert [s.name for s in gpu_steps.suite_steps(plan, ["merge"], {1})] == ["suite-merge"]


def test_list_prints_the_gpu_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_run.py", "--phase", "1", "--list", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["setup", "environment", *E2E, "suite-analyze", "suite-train"]
    assert "--device cuda" in next(line for line in lines if " analyze " in line and "sara_cli" in line)
    assert "--layers 8" in next(line for line in lines if "suite-analyze" in line)
    assert not out.exists() and not (tmp_path / "work").exists()
