"""bench/compact_files.py and bench/routed_inference.py on the tiny Llama, so the scripts cannot rot.

Only the plumbing and the figures that do not depend on timing are checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compact_files_bench(llama_dir, tmp_path, monkeypatch):
    from bench import compact_files

    monkeypatch.setenv("SARA_HOME", str(tmp_path / "home"))
    result = compact_files.main(["--base", str(llama_dir), "--tau", "0.5", "--out", str(tmp_path / "c.json")])
    assert result["bytes"]["compact"] < result["bytes"]["full"]
    assert result["max_abs_logit_diff"] <= 1e-5 and result["modules"] == 4
    assert (tmp_path / "c.json").is_file()
    row = next(r for r in result["llama7b_qv"] if r["k"] == 512)
    # 64 modules x 512 x (4096 + 4096) float32 vectors: what the compact file leaves out
    assert row["full"] - row["compact"] == 64 * 512 * 8192 * 4


def test_routed_inference_bench(llama_dir):
    from bench import routed_inference

    result = routed_inference.measure(base=str(llama_dir), rounds=1, new_tokens=3, batch_size=2)
    assert set(result["seconds_per_token"]) == {"base", "reference", "fast"}
    assert all(value > 0 for value in result["cpu_seconds_per_token"].values())
    assert result["max_abs_logit_diff_fast_vs_reference"] <= 1e-4
    from sara_cli.adapters.mosara import MoSaraLayer

    assert MoSaraLayer.fast_inference  # the class-wide switch is restored


def test_compact_files_bench_on_a_trained_run(trained_mosara_run, tmp_path):
    from bench import compact_files

    result = compact_files.main(["--run", str(trained_mosara_run)])
    assert result["bytes"]["compact"] < result["bytes"]["full"]
    assert result["max_abs_logit_diff"] <= 1e-5
