"""`sara compare`: budget matching, pairing, the paired statistics, reuse, --plan/--report-only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import one_line_error, run_cli

TINY = {
    "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
    "adapter": {"method": "lora", "targets": "q_proj,v_proj"},
    "data": {"train_file": "builtin:mawps-quickstart", "limit": 40, "template": "plain", "cutoff_len": 64,
             "train_on_inputs": False},
    "train": {"output_dir": "runs/unused", "max_steps": 3, "per_device_train_batch_size": 4,
              "logging_steps": 1, "save_steps": 100},
}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare-recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _comparison(recipe_path, methods, budget, out, seeds="0", lr=None, grid=None, holdout=8):
    from sara_cli.comparison import plan
    from sara_cli.comparison.run import setup
    from sara_cli.recipe import load_recipe

    arms = plan.parse_arms(methods)
    rates, grids = plan.parse_rates(lr, grid, arms)
    return setup(load_recipe(recipe_path), arms, plan.parse_seeds(seeds), plan.parse_budget(budget), rates,
                 grids, holdout, None, None, out, None)


# -- budget matching -----------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["lora-rank=2", "params=6144"])
def test_every_method_meets_the_budget_by_an_independent_count(tiny_recipe, tmp_path, budget, one_thread):
    """Each arm's adapters, built for real on the tiny model, count within 2% of the budget."""
    from transformers import AutoModelForCausalLM

    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import count_parameters, inject_adapters
    from sara_cli.comparison.run import size_arms
    from sara_cli.model.builtin import model_path

    comparison = _comparison(tiny_recipe, "lora,pissa,sorsa,sara,mosara", budget, tmp_path / "c")
    size_arms(comparison)
    folder = model_path("builtin:tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "v_proj"))]
    target = 2 * sum(o + i for o, i in shapes) if budget.startswith("lora") else 6144
    for label, size in comparison.sizes.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        options = {k: v for k, v in size["adapter"].items() if k not in ("method", "targets")}
        inject_adapters(model, size["adapter"]["method"], options, "q_proj,v_proj",
                        weights=CheckpointWeights(folder, "cpu"))
        trainable, _ = count_parameters(model)
        assert abs(trainable - target) <= 0.02 * target, (label, trainable, target)
        assert trainable == size["params"], label  # the plan's formula agrees with the model
        assert size["reached"] is True


def test_a_method_that_cannot_reach_the_budget_says_so(tiny_recipe, tmp_path):
    """LoRA's count moves in steps of 2,048 on the tiny model: 3,100 is out of its reach (rank 2, 4,096, is nearest)."""
    from sara_cli.comparison.run import size_arms

    comparison = _comparison(tiny_recipe, "lora,sara", "params=3100", tmp_path / "c")
    size_arms(comparison)
    lora, sara = comparison.sizes["lora"], comparison.sizes["sara"]
    assert lora["reached"] is False and lora["params"] == 4096 and lora["target"] == 3100
    assert sara["reached"] is True and abs(sara["params"] - 3100) <= 62


def test_a_budget_no_method_can_meet_is_one_line(tiny_recipe, tmp_path):
    result = run_cli("compare", tiny_recipe, "--methods", "sara,mosara", "--budget", "params=10",
                     "--out", tmp_path / "c", "--dry-run")
    one_line_error(result, "no method can meet --budget params=10", stdout_empty=False)
    assert not (tmp_path / "c").exists()


def test_an_arm_with_its_own_size_keeps_it(tiny_recipe, tmp_path):
    from sara_cli.comparison.run import size_arms

    comparison = _comparison(tiny_recipe, "lora,sara:tau=0.01,lora:rank=1", "lora-rank=2", tmp_path / "c")
    size_arms(comparison)
    assert comparison.sizes["sara:tau=0.01"]["adapter"]["tau"] == 0.01
    assert comparison.sizes["sara:tau=0.01"]["target"] is None
    assert comparison.sizes["lora:rank=1"]["adapter"]["rank"] == 1
    assert comparison.sizes["lora:rank=1"]["adapter"]["alpha"] == 2.0  # alpha / r = 2 at every rank
    assert comparison.sizes["lora"]["adapter"]["rank"] == 2


# -- statistics ----------------------------------------------------------------------------------

def test_paired_difference_against_a_hand_computation():
    from sara_cli.comparison.report import paired_difference

    reference = {0: 1.0, 1: 2.0, 2: 3.0}
    other = {0: 1.5, 1: 2.1, 2: 3.6, 7: 9.0}  # seed 7 has no partner and is left out
    d = paired_difference(reference, other)
    # differences 0.5, 0.1, 0.6: mean 0.4; deviations 0.1, -0.3, 0.2 -> variance 0.14 / 2 = 0.07
    std = math.sqrt(0.07)
    half = 4.303 * std / math.sqrt(3)  # t(0.975, 2) = 4.303
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.4)
    assert d["std"] == pytest.approx(std)
    assert d["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert paired_difference({0: 1.0}, {0: 2.0})["ci95"] is None  # one seed: no interval


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--methods", "lora,dora"], "unknown method 'dora'"),
    (["--methods", "lora,sara", "--seeds", "0,1,0"], "--seeds repeats 0"),
    (["--methods", "lora,sara:rank=2"], "'rank' is not a sara setting"),
    (["--methods", "lora,sara", "--budget", "rank=2"], "--budget must be none"),
    (["--methods", "lora,sara", "--lr-grid", "lora=1e-3:1e-2"], "missing sara"),
    (["--methods", "lora,sara", "--lr", "lora=3e-4", "--lr-grid", "lora=1e-3:1e-2,sara=1e-2:1e-1"],
     "lora has a rate in --lr and a grid"),
    (["--methods", "lora,sara", "--limit", "5"], "add --task"),
    (["--methods", "lora,sara", "--task", "mawps", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_input_is_one_line_before_any_work(tiny_recipe, tmp_path, args, fragment):
    result = run_cli("compare", tiny_recipe, *args, "--out", tmp_path / "c")
    one_line_error(result, fragment)
    assert not (tmp_path / "c").exists()


def test_a_folder_holding_other_files_is_refused(tiny_recipe, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    result = run_cli("compare", tiny_recipe, "--methods", "lora,sara", "--out", tmp_path / "c", "--dry-run")
    one_line_error(result, "is not empty and holds no comparison")


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded_batches():
    """The token ids of every training batch, per run folder."""
    from sara_cli.training.trainer import SaraTrainer

    batches: dict[str, list] = {}
    original = SaraTrainer.training_step

    def record(self, model, inputs, *args, **kwargs):
        batches.setdefault(Path(self.args.output_dir).name, []).append(inputs["input_ids"].clone())
        return original(self, model, inputs, *args, **kwargs)

    SaraTrainer.training_step = record
    yield batches
    SaraTrainer.training_step = original


COMPARE = ["--methods", "lora,sara", "--seeds", "0,1", "--budget", "lora-rank=2", "--holdout", "8",
           "--lr", "lora=1e-2,sara=3e-2"]


@pytest.fixture(scope="module")
def direct(tiny_recipe, tmp_path_factory, recorded_batches, one_thread):
    out = tmp_path_factory.mktemp("compare") / "direct"
    result = run_cli("compare", tiny_recipe, *COMPARE, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _losses(out: Path) -> dict:
    summary = json.loads((out / "compare.json").read_text())
    return {a["arm"]: a["losses"] for a in summary["arms"]}


@pytest.mark.e2e
def test_compare_two_methods_two_seeds(direct):
    summary = json.loads((direct / "compare.json").read_text())
    assert [a["arm"] for a in summary["arms"]] == ["lora", "sara"]
    assert summary["missing"] == []
    results = {p.stem: json.loads(p.read_text()) for p in (direct / "results").glob("*.json")}
    assert sorted(results) == ["lora-lr0.01-seed0", "lora-lr0.01-seed1", "sara-lr0.03-seed0", "sara-lr0.03-seed1"]
    loss = {name: r["holdout"]["loss"] for name, r in results.items()}
    assert all(math.isfinite(v) for v in loss.values())
    # the report's paired difference is sara - lora seed by seed, from the result files
    sara = summary["arms"][1]
    expected = [loss["sara-lr0.03-seed0"] - loss["lora-lr0.01-seed0"], loss["sara-lr0.03-seed1"] - loss["lora-lr0.01-seed1"]]
    assert sara["difference"]["differences"] == pytest.approx(expected)
    assert sara["difference"]["mean"] == pytest.approx(sum(expected) / 2)
    assert sara["learning_rate"] == 0.03 and summary["arms"][0]["learning_rate"] == 0.01
    # every variant is a normal run, trained from its own recipe, with its held-out records scored
    for result in results.values():
        assert Path(result["run"], "adapter", "sara_config.json").is_file()
        assert result["holdout"]["records"] == 8
        assert result["cost"]["steps"] == 3
    assert {r["cost"]["trainable_params"] for r in results.values()} <= {4096, 4112}
    assert (direct / "compare.md").read_text().count("| lora |") >= 2
    assert (direct / "compare.png").stat().st_size > 0


@pytest.mark.e2e
def test_the_same_seed_sees_the_same_batches(direct, recorded_batches):
    import torch

    for seed in (0, 1):
        lora, sara = recorded_batches[f"lora-lr0.01-seed{seed}"], recorded_batches[f"sara-lr0.03-seed{seed}"]
        assert len(lora) == len(sara) == 3
        for a, b in zip(lora, sara):
            assert torch.equal(a, b)
    # and the check can fail: another seed draws other records
    assert not torch.equal(recorded_batches["lora-lr0.01-seed0"][0], recorded_batches["lora-lr0.01-seed1"][0])


@pytest.mark.e2e
def test_a_rerun_reuses_the_finished_variants(tiny_recipe, direct, recorded_batches):
    before = {k: len(v) for k, v in recorded_batches.items()}
    losses = _losses(direct)
    result = run_cli("compare", tiny_recipe, *COMPARE, "--out", direct)
    assert result.exit_code == 0, result.output
    assert {k: len(v) for k, v in recorded_batches.items()} == before  # nothing trained
    assert _losses(direct) == losses


@pytest.mark.e2e
def test_a_changed_setting_is_refused(tiny_recipe, direct):
    result = run_cli("compare", tiny_recipe, "train.max_steps=4", *COMPARE, "--out", direct)
    one_line_error(result, "holds another comparison", "train differ", stdout_empty=False)


@pytest.mark.e2e
def test_plan_then_report_only_gives_the_direct_report(tiny_recipe, direct, tmp_path):
    out = tmp_path / "planned"
    result = run_cli("compare", tiny_recipe, *COMPARE, "--out", out, "--plan")
    assert result.exit_code == 0, result.output
    commands = [line.split() for line in result.stdout.splitlines() if line.startswith("sara train ")]
    assert len(commands) == 4
    for command in commands:
        trained = run_cli(*command[1:])
        assert trained.exit_code == 0, trained.output
    result = run_cli("compare", tiny_recipe, *COMPARE, "--out", out, "--report-only")
    assert result.exit_code == 0, result.output
    planned, direct_losses = _losses(out), _losses(direct)
    assert planned.keys() == direct_losses.keys()
    for arm in planned:
        assert planned[arm] == pytest.approx(direct_losses[arm], rel=1e-5)


def test_accuracy_is_paired_by_seed_against_the_reference():
    from sara_cli.comparison.report import summarize

    size = {"adapter": {"method": "lora", "rank": 2}, "params": 10, "target": None, "reached": None}
    state = {"arms": ["lora", "sara"], "sizes": {"lora": size, "sara": size}, "identity": {"budget": "none"},
             "holdout_data": "h.json", "seeds": [0, 1, 2]}
    accuracy = {("lora", 0): 0.50, ("lora", 1): 0.40, ("lora", 2): 0.45,
                ("sara", 0): 0.55, ("sara", 1): 0.40, ("sara", 2): 0.55}
    results = [{"name": f"{arm}-{seed}", "arm": arm, "seed": seed, "learning_rate": 0.01, "grid_point": False,
                "holdout": {"loss": 1.0}, "cost": {}, "accuracy": {"svamp": {"accuracy": value, "n": 20}}}
               for (arm, seed), value in accuracy.items()]
    found = summarize(state, results, [], {})["arms"][1]["accuracy"]["svamp"]
    # differences 0.05, 0.00, 0.10: mean 0.05, std 0.05, half-width 4.303 * 0.05 / sqrt(3)
    assert found["mean"] == pytest.approx(1.5 / 3) and found["n"] == 20
    assert found["difference"]["differences"] == pytest.approx([0.05, 0.0, 0.10])
    half = 4.303 * 0.05 / math.sqrt(3)
    assert found["difference"]["ci95"] == pytest.approx([0.05 - half, 0.05 + half])


def test_a_diverged_grid_point_is_never_chosen():
    from sara_cli.comparison.report import _chosen

    grid = [{"learning_rate": rate, "grid_point": True, "holdout": {"loss": loss}}
            for rate, loss in ((1e-3, 0.9), (1e-2, float("nan")), (1e-1, 0.7))]
    assert _chosen(grid) == 1e-1
    assert _chosen(grid[:2]) == 1e-3


@pytest.mark.e2e
def test_a_recorded_comparison_from_before_data_tokenize_was_joint(tiny_recipe, direct, tmp_path):
    state = json.loads((direct / "comparison.json").read_text())
    del state["identity"]["data"]["tokenize"]  # as written before the setting existed
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "comparison.json").write_text(json.dumps(state))
    result = run_cli("compare", tiny_recipe, *COMPARE, "--out", tmp_path / "old", "--dry-run")
    one_line_error(result, "holds another comparison", "data differ", stdout_empty=False)
    result = run_cli("compare", tiny_recipe, "data.tokenize=joint", *COMPARE, "--out", tmp_path / "old", "--dry-run")
    assert result.exit_code == 0, result.output


@pytest.mark.e2e
def test_task_accuracy_is_added_to_finished_variants(tiny_recipe, direct, recorded_batches):
    """Asked for later, accuracy is scored from the finished runs, which are not trained again."""
    before = {k: len(v) for k, v in recorded_batches.items()}
    scoring = ["--task", "mawps", "--limit", "2", "--max-new-tokens", "4"]
    result = run_cli("compare", tiny_recipe, *COMPARE, *scoring, "--out", direct)
    assert result.exit_code == 0, result.output
    assert {k: len(v) for k, v in recorded_batches.items()} == before  # nothing trained
    results = [json.loads(p.read_text()) for p in (direct / "results").glob("*.json")]
    assert len(results) == 4
    for found in results:
        assert found["accuracy"]["mawps"]["n"] == 2 and found["accuracy"]["mawps"]["max_new_tokens"] == 4
    summary = json.loads((direct / "compare.json").read_text())
    assert summary["arms"][1]["accuracy"]["mawps"]["difference"]["seeds"] == ["0", "1"]
    assert "| mawps | difference |" in (direct / "compare.md").read_text()
    # another --limit scores again; a variant whose run folder is gone is named, not retrained
    gone = direct / "runs" / "sara-lr0.03-seed1"
    gone.rename(gone.with_name("moved"))
    try:
        result = run_cli("compare", tiny_recipe, *COMPARE, "--task", "mawps", "--limit", "1", "--max-new-tokens", "4",
                         "--out", direct)
    finally:
        gone.with_name("moved").rename(gone)
    assert result.exit_code == 0, result.output
    assert "no mawps accuracy for sara-lr0.03-seed1: its run folder" in " ".join(result.output.split())
    assert {k: len(v) for k, v in recorded_batches.items()} == before
    summary = json.loads((direct / "compare.json").read_text())
    assert summary["arms"][0]["accuracy"]["mawps"]["n"] == 1
    assert "sara-lr0.03-seed1 (mawps accuracy)" in summary["missing"]


@pytest.mark.e2e
def test_a_task_file_is_scored_by_its_path(tiny_recipe, direct, tmp_path):
    """An ad-hoc task is named after its file but found again by its path when scored."""
    task_file = tmp_path / "sums.json"
    task_file.write_text(json.dumps([{"instruction": "What is 1 plus 1?", "answer": "2"}]))
    result = run_cli("compare", tiny_recipe, *COMPARE, "--task", task_file, "--max-new-tokens", "2", "--out", direct)
    assert result.exit_code == 0, result.output
    for path in (direct / "results").glob("*.json"):
        assert json.loads(path.read_text())["accuracy"]["sums"]["n"] == 1
