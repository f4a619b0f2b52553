"""The benchmark suite (bench/, docs/benchmarks.md) in --smoke mode, so the scripts cannot rot.

The real suites time a 7B-shaped model on a GPU; here every suite runs on a tiny CPU model and
only the plumbing is checked: the exit code, the shape of the results file, identical k between
`sara analyze` and the naive SVD route, and that PEFT stays optional.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITES = ["analyze", "init", "train", "memory", "merge", "eval"]
EXPECTED = {  # measurement keys each suite must report (measured or skipped with a reason)
    "analyze": ["command-qv", "call-qv", "naive-qv", "command-all-linear", "call-all-linear", "naive-all-linear"],
    "init": [f"{k}-{s}" for s in ("qv", "all-linear")
             for k in ("spectrum", "sara", "mosara", "pissa", "peft-pissa", "peft-pissa-niter-4")],
    "train": ["peft-lora-r8", "sara-lora-r8", "sara-sara", "peft-lora-matched", "mosara-m1", "mosara-m5",
              "mosara-m9"],
    "memory": ["bf16-sara", "bf16-sara-lora", "bf16-peft-lora", "4bit-sara", "4bit-sara-lora", "4bit-peft-qlora",
               "4bit-peft-qlora-matched"],
    "merge": ["plain", "sara-merge", "sara-merge-no-verify"],
    "eval": ["fast", "llm-adapters"],
}
MEASUREMENT_KEYS = {"key", "name", "scope", "unit", "runs", "warmup_s", "baseline", "ratio", "extra", "skipped",
                    "median"}
TARGET_KEYS = {"name", "op", "limit", "unit", "value", "note", "timing", "met"}
META_KEYS = {"smoke", "device", "gpu", "torch", "transformers", "peft", "date", "command", "model",
             "repeats", "peft_baselines", "datasets_imported"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(completed process, parsed results) of one `--suite all --smoke` run."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "r.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SARA_HOME": str(folder / "sara_home")}
    proc = subprocess.run([sys.executable, "bench/run.py", "--suite", "all", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.is_file() else None


def test_smoke_run_succeeds(smoke):
    proc, results = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results is not None
    for suite in SUITES:  # one table per suite, labelled as a smoke check
        assert f"{suite} (" in proc.stdout
    assert "not performance evidence" in proc.stdout


def test_every_suite_reports_its_measurements_and_targets(smoke):
    _, results = smoke
    assert list(results["suites"]) == SUITES
    for suite, keys in EXPECTED.items():
        report = results["suites"][suite]
        assert report["status"] == "ok", report["error"]
        measurements = {m["key"]: m for m in report["measurements"]}
        assert sorted(measurements) == sorted(keys), suite
        for m in measurements.values():
            assert set(m) == MEASUREMENT_KEYS
            assert (m["median"] is not None and m["runs"]) or m["skipped"], (suite, m["key"])
            if m["baseline"] and m["median"] is not None and measurements[m["baseline"]]["median"]:
                assert m["ratio"] == pytest.approx(m["median"] / measurements[m["baseline"]]["median"])
        assert report["targets"], suite
        for target in report["targets"]:
            assert set(target) == TARGET_KEYS
            assert target["met"] in (True, False, None)


def test_identical_k_between_sara_analyze_and_naive_svd(smoke):
    _, results = smoke
    report = results["suites"]["analyze"]
    identical = [t for t in report["targets"] if t["name"].startswith("identical k")]
    assert len(identical) == 2  # q/v and all-linear: --smoke runs the slow baselines too
    assert all(t["met"] is True for t in identical)
    for m in report["measurements"]:
        if m["key"].startswith("naive-"):
            assert m["extra"]["k mismatches"] == 0


def test_run_records_its_environment_and_imports_no_datasets(smoke):
    _, results = smoke
    meta = results["meta"]
    assert META_KEYS <= set(meta)
    assert meta["smoke"] is True and meta["device"] == "cpu" and meta["repeats"] == 1
    assert meta["command"].startswith("python bench/run.py")
    # The GPU machine has no `datasets`: neither the bench nor the sara commands it runs may need it.
    assert meta["datasets_imported"] == {"bench process": False, "sara commands": False}


def test_peft_baselines_are_skipped_with_a_reason_without_peft(tmp_path):
    """PEFT is optional: without it the sara side still runs and dependent targets read 'not measured'."""
    sys.path.insert(0, str(REPO))
    try:
        from bench import suite_train
        from bench.harness import smoke_settings
        from bench.models import ModelPool
    finally:
        sys.path.remove(str(REPO))
    settings = smoke_settings(tmp_path, repeats=1, use_peft=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --smoke does: spinning threads only slow a tiny model down
    try:
        result = suite_train.run(settings, ModelPool(settings), None, "peft is not installed")
    finally:
        torch.set_num_threads(threads)
    measurements = {m.key: m for m in result.measurements}
    assert measurements["peft-lora-r8"].skipped == "peft is not installed"
    assert measurements["sara-lora-r8"].value is not None
    versus_peft = [t for t in result.targets if "PEFT" in t.name]
    assert versus_peft and all(t.met is None and "peft is not installed" in t.note for t in versus_peft)
    assert next(t for t in result.targets if t.name.startswith("Mo-SARA m 9")).met is not None
