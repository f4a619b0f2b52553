"""One target resolver for analyze and train, on a mixture-of-experts base (Qwen3-MoE, whose
experts are 3-D parameters and whose router is no nn.Linear in transformers 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _save, one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    return _save(Qwen3MoeForCausalLM(config).eval(), tmp_path_factory.mktemp("tiny-moe"))


def train_dry_run(moe_dir: Path, tmp_path: Path, targets: str):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"{i}+1?", "input": "", "output": str(i + 1)} for i in range(4)]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(moe_dir), "dtype": "float32"},
        "adapter": {"method": "sara", "targets": targets, "tau": 0.5},
        "data": {"train_file": str(data), "cutoff_len": 32},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
    }))
    return run_cli("train", recipe, "--dry-run")


def test_analyze_and_train_select_the_same_matrices_and_name_what_they_leave_out(moe_dir, tmp_path):
    from sara_cli.recipe import validate
    from sara_cli.training.train import build

    out = tmp_path / "k.json"
    analyzed = run_cli("analyze", moe_dir, "--targets", "all-linear", "--json", out)
    assert analyzed.exit_code == 0, analyzed.output
    matrices = {m["name"] for m in json.loads(out.read_text())["matrices"]}

    recipe = validate({"model": {"name_or_path": str(moe_dir), "dtype": "float32"},
                       "adapter": {"method": "sara", "targets": "all-linear", "tau": 0.5},
                       "data": {"train_file": "builtin:mawps-quickstart"},
                       "train": {"output_dir": str(tmp_path / "unused")}})
    _, _, layers, _ = build(recipe)
    assert matrices == set(layers)
    assert matrices == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}

    said = " ".join(analyzed.stdout.split())
    for kind in ("mlp.experts.gate_up_proj (3-D, in Qwen3MoeExperts, 2 layers)", "mlp.gate.weight (2-D, in Qwen3MoeTopKRouter"):
        assert kind in said
    dry = train_dry_run(moe_dir, tmp_path, "all-linear")
    assert dry.exit_code == 0, dry.output
    assert "all-linear left out" in " ".join(dry.stdout.split()) and "mlp.experts.down_proj (3-D" in " ".join(dry.stdout.split())


@pytest.mark.parametrize("command", ["analyze", "train"])
def test_an_expert_projection_as_target_is_refused_alike(command, moe_dir, tmp_path):
    result = (run_cli("analyze", moe_dir, "--targets", "gate_proj") if command == "analyze"
              else train_dry_run(moe_dir, tmp_path, "gate_proj"))
    one_line_error(result, "target 'gate_proj' matches no linear layer", "k_proj, o_proj, q_proj, v_proj",
                   "mlp.experts.gate_up_proj", stdout_empty=False)
    assert result.exit_code == 2


def test_the_default_targets_on_a_fused_attention_name_the_module_to_use(gpt2_dir):
    result = run_cli("analyze", gpt2_dir)
    one_line_error(result, "target 'q_proj' matches no linear layer", "fuses the query, key and value",
                   "target c_attn")
    assert result.exit_code == 2
