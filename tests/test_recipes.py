"""Recipes: every file in recipes/ validates, every paper recipe dry-runs on a tiny model with the
parameter count its method's formula gives, and a bad recipe fails with one line per problem.

The expected counts come from numpy float64 SVDs of the tiny checkpoints' weights, not from
sara's spectrum code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sara_cli.cli.app import app
from sara_cli.errors import SaraError
from sara_cli.recipe import METHOD_DEFAULTS, load_recipe, set_override, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PARAMETER_LINE = re.compile(r"trainable params:\s*([\d,]+)\s*\|\|\s*all params:\s*([\d,]+)\s*\|\|"
                            r"\s*trainable%:\s*([\d.]+)")

LLAMA7B = {"model.name_or_path": "yahma/llama-7b-hf", "model.dtype": "bfloat16",
           "adapter.targets": "q_proj,v_proj", "adapter.dropout": 0.05, "data.template": "alpaca",
           "data.cutoff_len": 256, "data.val_set_size": 120, "train.batch": 16, "train.num_train_epochs": 3,
           "train.lr_scheduler_type": "linear", "train.warmup_steps": 100, "train.optim": "adamw_torch",
           "train.seed": 42}
MATH = {**LLAMA7B, "data.train_file": "math_10k.json"}
COMMONSENSE = {**LLAMA7B, "data.train_file": "commonsense_170k.json"}
E2E = {"model.name_or_path": "openai-community/gpt2-medium", "adapter.targets": "c_attn",
       "data.columns": {"instruction": "mr", "output": "ref"}, "data.template": "plain", "train.batch": 16,
       "train.num_train_epochs": 5, "train.warmup_steps": 500, "train.weight_decay": 0.01,
       "train.label_smoothing_factor": 0.1, "train.seed": 314}
# The paper settings each shipped recipe must encode (SARA Tables 6-8; the SORSA script).
PAPER = {
    "llama7b-math-sara.yaml": {**MATH, "adapter.method": "sara", "adapter.tau": 0.01, "train.learning_rate": 3e-3},
    "llama7b-math-mosara.yaml": {**MATH, "adapter.method": "mosara", "adapter.tau": 0.5, "adapter.num_experts": 5,
                                 "train.learning_rate": 3e-2},
    "llama7b-math-lora.yaml": {**MATH, "adapter.method": "lora", "adapter.rank": 10, "adapter.alpha": 20,
                               "train.learning_rate": 3e-4},
    "llama7b-math-pissa.yaml": {**MATH, "adapter.method": "pissa", "adapter.rank": 10, "train.learning_rate": 3e-4},
    "llama7b-commonsense-sara.yaml": {**COMMONSENSE, "adapter.method": "sara", "adapter.tau": 0.09,
                                      "train.learning_rate": 1e-3},
    "llama7b-commonsense-mosara.yaml": {**COMMONSENSE, "adapter.method": "mosara", "adapter.tau": 0.8,
                                        "adapter.num_experts": 5, "train.learning_rate": 3e-2},
    "gpt2m-e2e-sara.yaml": {**E2E, "adapter.method": "sara", "adapter.tau": 0.012, "train.learning_rate": 8e-3},
    "gpt2m-e2e-mosara.yaml": {**E2E, "adapter.method": "mosara", "adapter.tau": 0.5, "adapter.num_experts": 3,
                              "train.learning_rate": 7e-2},
    "llama2-7b-sorsa.yaml": {"model.name_or_path": "meta-llama/Llama-2-7b-hf", "adapter.method": "sorsa",
                             "adapter.rank": 128, "adapter.gamma": 4e-4, "adapter.sorsa_update": "reference",
                             "adapter.svd": "full", "train.learning_rate": 3e-5,
                             "adapter.targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "train.lr_scheduler_type": "cosine", "train.warmup_ratio": 0.03, "train.bf16": True},
}


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """One-line errors: `main(["--debug"])` elsewhere in the session leaves the flag set."""
    from sara_cli.cli import app as cli

    monkeypatch.setitem(cli.DEBUG, "on", False)
    monkeypatch.setitem(cli.DEBUG, "argv", False)


def setting(recipe, dotted: str):
    if dotted == "train.batch":
        return recipe.train.per_device_train_batch_size * recipe.train.gradient_accumulation_steps
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def minimal(method: str = "sara", **adapter) -> dict:
    return {"model": {"name_or_path": "m"}, "adapter": {"method": method, **adapter},
            "data": {"train_file": "d.json"}, "train": {"output_dir": "o"}}


def problems(raw: dict) -> list[str]:
    """The problem lines of the SaraError that validate() raises for `raw`."""
    with pytest.raises(SaraError) as info:
        validate(raw, "r.yaml")
    message = str(info.value)
    if "\n" not in message:  # a single problem is one line: "r.yaml: <problem>"
        assert message.startswith("r.yaml: "), message
        return [message[len("r.yaml: "):]]
    header, *lines = message.split("\n")
    assert header == f"r.yaml has {len(lines)} problems:" and len(lines) > 1
    return [line.strip() for line in lines]


# -- every recipe in recipes/ ----------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    for key in METHOD_DEFAULTS[recipe.adapter.method]:
        assert getattr(recipe.adapter, key) is not None, key
    text = path.read_text()
    assert text.startswith("# ") and f"sara train recipes/{path.name}" in text  # a header saying how to run it


def test_paper_recipes_are_all_shipped():
    assert set(PAPER) <= {p.name for p in RECIPES}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_settings(name):
    path = ROOT / "recipes" / name
    recipe = load_recipe(path)
    for dotted, expected in PAPER[name].items():
        assert setting(recipe, dotted) == expected, dotted
    for line in path.read_text().splitlines():  # a short comment on each knob
        if re.match(r"^  [a-z_0-9]+: \S", line):
            assert "#" in line, f"{name}: no comment on {line.strip()!r}"


def test_docs_document_every_field_and_recipe():
    from sara_cli.recipe import SECTIONS

    docs = (ROOT / "docs" / "recipes.md").read_text()
    for section, schema in SECTIONS.items():
        body = docs.split(f"### `{section}`\n", 1)[1].split("\n### ", 1)[0]
        documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", body, flags=re.M))
        assert documented == set(schema.model_fields), section
    for path in RECIPES:
        assert f"| `{path.name}` |" in docs, f"docs/recipes.md does not list {path.name}"


# -- dry runs on the tiny models -------------------------------------------------------------------

def k_for_tau(W: np.ndarray, tau: float) -> int:
    """The SARA rank rule, independently: smallest k with sum_{i<=k} s_i >= tau * sum_i s_i."""
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    cumulative = np.cumsum(s)
    threshold = tau * cumulative[-1]
    assert np.min(np.abs(cumulative - threshold)) > 1e-6 * cumulative[-1]  # no tie to round either way
    return int(np.searchsorted(cumulative, threshold)) + 1


def expected_trainable(model_dir: Path, adapter) -> int:
    """The method's parameter formula summed over the targeted weights of the checkpoint."""
    from safetensors.numpy import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    targets = adapter.targets.split(",") if isinstance(adapter.targets, str) else adapter.targets
    gpt2 = any(".attn.c_attn." in name for name in weights)
    total, matched = 0, 0
    for name, W in weights.items():
        if not any(name.endswith(f".{t}.weight") for t in targets):
            continue
        matched += 1
        W = W.T if gpt2 else W  # GPT-2's Conv1D stores (in, out)
        out_features, in_features = W.shape
        if adapter.method == "sara":  # U (out, k), Vh (k, in), lambda (k,)
            k = k_for_tau(W, adapter.tau)
            total += k * (out_features + in_features) + k
        elif adapter.method == "mosara":  # Lambda (m, k), v (out,), router (k, 1) and (1, m)
            k, m = k_for_tau(W, adapter.tau), adapter.num_experts
            total += m * k + out_features + k + m
        elif adapter.method == "lora":  # A (r, in), B (out, r)
            total += adapter.rank * (in_features + out_features)
        elif adapter.method == "pissa":  # A (r, in), B (out, r), r capped by the matrix
            r = min(adapter.rank, in_features, out_features)
            total += r * (in_features + out_features)
        elif adapter.method == "sorsa":  # U (out, r), s (r,), Vh (r, in), r capped by the matrix
            r = min(adapter.rank, in_features, out_features)
            total += r * (in_features + out_features) + r
    assert matched > 0
    return total


def base_parameter_count(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def tiny_data(path: Path, columns: dict, n: int) -> Path:
    """n instruction records under the recipe's column names, as JSON or CSV."""
    import pandas as pd

    instruction, output = columns.get("instruction", "instruction"), columns.get("output", "output")
    rows = [{instruction: f"What is {i} plus {i}?", output: f"The answer is {2 * i}."} for i in range(n)]
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_dry_run_on_tiny_model(name, llama_dir, gpt2_dir, tmp_path):
    from transformers import AutoTokenizer

    from sara_cli.data.dataset import prepare

    path = ROOT / "recipes" / name
    original = load_recipe(path)
    model_dir = gpt2_dir if name.startswith("gpt2") else llama_dir
    suffix = ".csv" if original.data.train_file.endswith(".csv") else ".json"
    data = tiny_data(tmp_path / f"train{suffix}", original.data.columns, n=125)
    output_dir = tmp_path / "run"
    overrides = [f"model.name_or_path={model_dir}", "model.revision=", "model.dtype=float32",
                 f"data.train_file={data}", f"train.output_dir={output_dir}", "train.bf16=false"]

    result = CliRunner().invoke(app, ["train", str(path), *overrides, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "nothing trained" in result.output
    match = PARAMETER_LINE.search(result.output)
    assert match, result.output
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    recipe = load_recipe(path, overrides)
    assert trainable == expected_trainable(model_dir, recipe.adapter)
    assert total == base_parameter_count(model_dir) + trainable
    assert float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert not (output_dir / "adapter").exists() and not any(output_dir.glob("checkpoint-*"))

    # The recipe's data settings (columns, template, val_set_size, limit) work on such a file.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, evaluation = prepare(recipe.data, tokenizer, recipe.train.seed)
    held_out = recipe.data.val_set_size
    assert len(train) == 125 - held_out and (evaluation is None) == (held_out == 0)
    assert max(len(ids) for ids in train["input_ids"]) <= recipe.data.cutoff_len


def test_sorsa_recipe_switches_to_math_10k_by_overrides():
    recipe = load_recipe(ROOT / "recipes" / "llama2-7b-sorsa.yaml",
                         ["data.train_file=math_10k.json", "data.columns={}", "data.limit=null"])
    assert (recipe.data.train_file, recipe.data.columns, recipe.data.limit) == ("math_10k.json", {}, None)


# -- validation: every problem at once -------------------------------------------------------------

def test_all_problems_reported_at_once():
    raw = minimal("sara", tau=0)
    raw["train"].update(learnin_rate=1e-3, per_device_train_batch_size=0)
    lines = problems(raw)
    assert len(lines) == 3
    assert any(line.startswith("adapter.tau: got 0;") for line in lines)
    assert any(line.startswith("train.per_device_train_batch_size: got 0;") for line in lines)
    assert any(line.startswith("train.learnin_rate: unknown key") for line in lines)


@pytest.mark.parametrize("section, key, suggestion", [("adapter", "taus", "tau"),
                                                      ("train", "learnin_rate", "learning_rate"),
                                                      ("data", "cutoff_length", "cutoff_len"),
                                                      ("model", "dtyp", "dtype")])
def test_unknown_key_did_you_mean(section, key, suggestion):
    raw = minimal()
    raw[section][key] = 1
    assert problems(raw) == [f"{section}.{key}: unknown key; did you mean '{suggestion}'?"]


def test_unknown_section():
    assert problems({**minimal(), "trainer": {}}) == ["trainer: unknown section; did you mean 'train'?"]
    lines = problems({**minimal(), "zzz": {}})
    assert lines[0].startswith("zzz: unknown section; allowed: adapter, data, model, train")


def test_missing_required_fields():
    raw = minimal()
    del raw["model"]["name_or_path"]
    del raw["train"]
    assert sorted(problems(raw)) == ["model.name_or_path: required but missing", "train: required but missing"]


@pytest.mark.parametrize("method, key, value, owners", [("lora", "tau", 0.1, "sara, mosara"),
                                                        ("sara", "rank", 8, "lora, pissa, sorsa"),
                                                        ("pissa", "gamma", 1e-4, "sorsa"),
                                                        ("sara", "num_experts", 3, "mosara")])
def test_setting_of_another_method_is_an_error(method, key, value, owners):
    assert problems(minimal(method, **{key: value})) == [
        f"adapter.{key}: does not apply to method '{method}' (it is a setting of {owners}); remove it"]


@pytest.mark.parametrize("section, key, value", [("adapter", "tau", 0), ("adapter", "tau", 1.5),
                                                 ("train", "learning_rate", 0),
                                                 ("train", "per_device_train_batch_size", 0),
                                                 ("adapter", "dropout", 1), ("data", "cutoff_len", 4),
                                                 ("adapter", "method", "dora")])
def test_out_of_range_values(section, key, value):
    raw = minimal()
    raw[section][key] = value
    [line] = problems(raw)
    assert line.startswith(f"{section}.{key}: got {value!r};")


def test_resolved_recipe_validates_again():
    # The resolved dump lists every adapter key, null where the method does not use it.
    for method in METHOD_DEFAULTS:
        recipe = validate(minimal(method))
        assert validate(recipe.resolved()).resolved() == recipe.resolved()


def test_zero_init_up_with_zero_lambda_cannot_train():
    [line] = problems(minimal("sara", zero_init="up", init_lambda="zeros"))
    assert line.startswith("adapter.zero_init:") and "gradient" in line
    assert problems(minimal("sara", zero_init="up")) == [line]  # init_lambda defaults to zeros
    assert problems(minimal("sara", zero_init="up", init_lambda=None, use_lambda=None)) == [line]
    validate(minimal("sara", zero_init="up", init_lambda="ones"))
    validate(minimal("sara", zero_init="up", use_lambda=False))
    validate(minimal("sara", zero_init="up", init_lambda="random"))  # lambda != 0: U gets a gradient


def test_settings_that_would_silently_override_each_other():
    raw = minimal()
    raw["train"].update(warmup_ratio=0.03, warmup_steps=100, bf16=True, fp16=True)
    raw["data"].update(eval_file="e.json", val_set_size=120)
    lines = problems(raw)
    assert [line.split(":")[0] for line in lines] == ["data.val_set_size", "train.warmup_ratio", "train.fp16"]
    raw["train"].update(warmup_steps=0, fp16=False)
    raw["data"]["val_set_size"] = 0
    validate(raw)


def test_method_defaults_filled():
    assert validate(minimal("sara")).adapter.model_dump(exclude_none=True) == {
        "method": "sara", "targets": "q_proj,v_proj", "dropout": 0.0, "tau": 0.01, "use_lambda": True,
        "init_lambda": "zeros", "zero_init": "none"}
    mosara = validate(minimal("mosara")).adapter
    assert (mosara.tau, mosara.num_experts, mosara.v_position) == (0.5, 5, "after")
    sorsa = validate(minimal("sorsa")).adapter
    assert (sorsa.gamma, sorsa.rank, sorsa.tau, sorsa.sorsa_update, sorsa.svd) == (4e-4, 8, None, "reference", "full")
    assert validate(minimal("pissa")).adapter.svd == "lowrank"
    lora = validate(minimal("lora")).adapter
    assert (lora.rank, lora.alpha, lora.gamma) == (8, 16.0, None)
    assert validate(minimal("sara", tau=0.2)).adapter.tau == 0.2  # a given value is kept


# -- files and overrides ---------------------------------------------------------------------------

def test_missing_recipe_file(tmp_path):
    with pytest.raises(SaraError, match=r"recipe .*nope\.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: m\nadapter:\n  method: sara\n  targets: [q_proj\ndata: {}\n")
    with pytest.raises(SaraError, match=r"broken\.yaml is not valid YAML at line 6"):
        load_recipe(path)


def test_recipe_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- adapter\n")
    with pytest.raises(SaraError, match="a recipe is a YAML mapping"):
        load_recipe(path, ["adapter.tau=0.1"])


def test_overrides_are_parsed_as_yaml(tmp_path):
    raw = minimal()
    for override in ["adapter.tau=0.02", "train.learning_rate=1e-3", "train.bf16=false",
                     "adapter.targets=[q_proj, k_proj]", "data.limit=null", "model.revision="]:
        set_override(raw, override)
    recipe = validate(raw)
    assert isinstance(recipe.adapter.tau, float) and recipe.adapter.tau == 0.02
    # YAML 1.1 reads 1e-3 (no dot) as a string; the schema still takes it as a number.
    assert recipe.train.learning_rate == pytest.approx(1e-3) and isinstance(recipe.train.learning_rate, float)
    assert (recipe.train.bf16, recipe.adapter.targets, recipe.data.limit, recipe.model.revision) == (
        False, ["q_proj", "k_proj"], None, None)


@pytest.mark.parametrize("override, message", [
    ("bad-override", "is not section.key=value"), ("tau=0.1", "is not section.key=value"),
    ("adaptor.tau=0.1", "unknown section 'adaptor'; did you mean 'adapter'")])
def test_bad_overrides_rejected(override, message):
    with pytest.raises(SaraError, match=re.escape(message)):
        set_override(minimal(), override)


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(SaraError) as info:
        set_override(minimal(), "adapter.targets=[q_proj")
    message = str(info.value)
    assert "\n" not in message
    assert "override 'adapter.targets=[q_proj'" in message and "not valid YAML" in message
    assert "adapter.targets=[q_proj,v_proj]" in message  # the expected form


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_a_non_finite_override_names_the_override_and_the_range(tmp_path, value):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(minimal()))
    with pytest.raises(SaraError) as info:
        load_recipe(path, [f"adapter.tau={value}"])
    assert str(info.value) == (f"{path}: adapter.tau: got {yaml.safe_load(value)!r} (from the override "
                               f"adapter.tau={value}); input should be a finite number; expected a number "
                               "with 0 < tau <= 1")


def test_max_steps_zero_trains_nothing_and_is_refused(tmp_path):
    raw = minimal()
    raw["train"]["max_steps"] = 0
    [line] = problems(raw)
    assert line.startswith("train.max_steps: got 0, which trains nothing")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(minimal()))
    with pytest.raises(SaraError, match="train.max_steps: got 0"):
        load_recipe(path, ["train.max_steps=0"])


def test_recipe_errors_come_before_any_heavy_import(tmp_path):
    """Missing file, YAML syntax, schema and overrides are all reported before torch loads."""
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(minimal()))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {name_or_path: m\n")
    bad_schema = tmp_path / "schema.yaml"
    bad_schema.write_text(json.dumps(minimal(tau=2)))
    cases = [[str(tmp_path / "nope.yaml")], [str(bad_yaml)], [str(bad_schema)],
             [str(good), "adapter.targets=[q_proj"], [str(good), "adapter.tau=nan"],
             [str(good), "train.report_to=wandbb"]]
    code = ("import json, sys\n"
            "from sara_cli.cli.app import main\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    sys.argv = ['sara', 'train', *args]\n"
            "    try:\n        main()\n    except SystemExit as exc:\n        assert exc.code == 2, exc.code\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert result.stderr.count("error:") == len(cases) and "Traceback" not in result.stderr


def test_override_applies_to_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(minimal("mosara")))  # JSON is YAML
    recipe = load_recipe(path, ["adapter.tau=0.3", "adapter.num_experts=2"])
    assert (recipe.adapter.tau, recipe.adapter.num_experts) == (0.3, 2)


# -- the CLI: one line per problem, non-zero exit, no traceback ------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_cli_lists_every_problem_without_traceback(tmp_path):
    raw = minimal("lora", tau=0.1)
    raw["adapter"]["rnak"] = 4
    raw["train"]["learning_rate"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    result = invoke(path, "--dry-run")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == f"error: {path} has 3 problems:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "adapter.tau", "adapter.rnak", "train.learning_rate"]
    assert "did you mean 'rank'?" in lines[2]


@pytest.mark.parametrize("case", ["missing", "invalid-yaml", "bad-override"])
def test_cli_one_line_errors(tmp_path, case):
    path = tmp_path / "r.yaml"
    args = [path, "--dry-run"]
    if case == "invalid-yaml":
        path.write_text("model: {name_or_path: m\n")
    elif case == "bad-override":
        path.write_text(json.dumps(minimal()))
        args.insert(1, "bad-override")
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
