"""4-bit and 8-bit bases (bitsandbytes on the CPU): every method trains on a 4-bit tiny Llama,
its init comes from the full-precision files, PiSSA/SORSA quantize their residual (QPiSSA), each
run merges into the full-precision base and loads without sara, and eval/route-map load it as
trained. Independent computations: numpy float64 and bitsandbytes' own quantize/dequantize.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

pytest.importorskip("bitsandbytes")  # in the dev extra; CI installs it

from conftest import _save, one_line_error, run_cli, tiny_llama  # noqa: E402
from sara_cli.adapters import checkpoint
from sara_cli.evaluation import evaluate  # noqa: E402
from sara_cli.errors import SaraError  # noqa: E402
from sara_cli.adapters.inject import adapter_layers  # noqa: E402
from sara_cli.recipe import validate  # noqa: E402
from sara_cli.training.train import build  # noqa: E402
from test_merge import CHILD, adapter_state, tensors  # noqa: E402

METHODS = ("sara", "mosara", "lora", "pissa", "sorsa")
ADAPTER = {
    "sara": {"tau": 0.3},
    "mosara": {"tau": 0.3, "num_experts": 3},
    "lora": {"rank": 4, "alpha": 8.0},
    "pissa": {"rank": 4},
    "sorsa": {"rank": 4},
}
RECORDS = [{"instruction": f"Add {i} and {i + 3}.", "input": "", "output": f"The sum is {2 * i + 3}."}
           for i in range(8)]


def recipe(folder, base, data, method, model=None, train=None):
    return {
        "model": {"name_or_path": str(base), "dtype": "float32", "load_in_4bit": True, **(model or {})},
        "adapter": {"method": method, "targets": "q_proj,v_proj", **ADAPTER[method]},
        "data": {"train_file": str(data), "cutoff_len": 64},
        "train": {"output_dir": str(folder / f"run-{method}"), "max_steps": 2, "learning_rate": 0.05,
                  "lr_scheduler_type": "constant", "per_device_train_batch_size": 4, "logging_steps": 1,
                  "save_steps": 1000, "seed": 0, **(train or {})},
    }


def quantized_modules(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Linear")}


# -- fixtures: one 4-bit run and one merge per method --------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def data_file(work):
    path = work / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def runs(work, llama_dir, data_file, one_thread):
    """{method: (run folder, train CLI output)}; SARA also checkpoints its activations."""
    import yaml

    done = {}
    for method in METHODS:
        extra = {"gradient_checkpointing": True} if method == "sara" else None
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(work, llama_dir, data_file, method, train=extra)))
        result = run_cli("train", path)
        assert result.exit_code == 0, result.output
        done[method] = (work / f"run-{method}", result.output)
    return done


@pytest.fixture(scope="module")
def merged(work, runs, data_file):
    done = {}
    for method, (run, _) in runs.items():
        out = work / f"merged-{method}"
        extra = ["--routing", "mean", "--calibration", data_file] if method == "mosara" else []
        done[method] = (out, run_cli("merge", run, "--out", out, *extra))
    return done


# -- training -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_4bit_base(method, runs):
    run, output = runs[method]
    config = checkpoint.read_config(run / "adapter")
    assert config["base_model"]["quantization"] == "4bit"
    assert config["base_model"]["compute_dtype"] == "float32"
    assert "4-bit NF4, double quantization" in " ".join(output.split())
    losses = [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_adapters_fp32_norms_fp32_beside_a_4bit_bf16_base(work, llama_dir, data_file):
    model, _, layers, _ = build(validate(recipe(work, llama_dir, data_file, "sara", model={"dtype": "bfloat16"},
                                                train={"bf16": True})))
    assert {type(layer.base_layer).__name__ for layer in layers.values()} == {"Linear4bit"}
    assert layers["model.layers.0.self_attn.q_proj"].base_layer.compute_dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if "sara_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif "norm" in name:
            assert p.dtype == torch.float32 and not p.requires_grad, name
        elif "embed" in name or "lm_head" in name:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name


@pytest.mark.parametrize("method", METHODS)
def test_init_on_4bit_equals_init_on_the_full_precision_base(method, work, llama_dir, data_file):
    """The factors come from the files, never from the dequantized 4-bit weights."""
    full = recipe(work, llama_dir, data_file, method, model={"load_in_4bit": False})
    four = recipe(work, llama_dir, data_file, method)
    reference = checkpoint.adapter_tensors(build(validate(full))[0])
    quantized = checkpoint.adapter_tensors(build(validate(four))[0])
    assert reference.keys() == quantized.keys()
    for key in reference:
        assert torch.equal(reference[key], quantized[key]), key


def test_qpissa_quantizes_the_residual_and_reports_both_errors(work, llama_dir, data_file):
    import bitsandbytes.functional as bnbf

    model, _, layers, meta = build(validate(recipe(work, llama_dir, data_file, "pissa")))
    files = load_numpy(str(llama_dir / "model.safetensors"))
    for name, layer in layers.items():
        W = files[f"{name}.weight"].astype(np.float64)
        principal = layer.pissa_B0.double().numpy() @ layer.pissa_A0.double().numpy()
        # bitsandbytes quantizing the float64 residual ourselves, then dequantizing
        packed, state = bnbf.quantize_4bit(torch.from_numpy(W - principal).float(), blocksize=64,
                                           compress_statistics=True, quant_type="nf4")
        expected = bnbf.dequantize_4bit(packed, state).double().numpy()
        got = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)
        packed_w, state_w = bnbf.quantize_4bit(torch.from_numpy(W).float(), blocksize=64,
                                               compress_statistics=True, quant_type="nf4")
        q_w = bnbf.dequantize_4bit(packed_w, state_w).double().numpy()
        norm = np.linalg.norm(W)
        errors = meta["quantization_error"][name]
        assert errors["weight"] == pytest.approx(np.linalg.norm(W - q_w) / norm, rel=1e-5)
        assert errors["residual"] == pytest.approx(np.linalg.norm(W - principal - expected) / norm, rel=1e-5)


def test_qpissa_error_is_smaller_on_a_spectrum_with_a_principal_part(tmp_path, data_file):
    """Weights with a dominant rank-4 part (as trained weights have) lose far less to 4 bits when
    only the residual is quantized."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                out_f, in_f = proj.weight.shape
                U = torch.linalg.qr(torch.randn(out_f, 4, generator=gen))[0]
                V = torch.linalg.qr(torch.randn(in_f, 4, generator=gen))[0]
                proj.weight.copy_((U * torch.tensor([4.0, 3.0, 2.0, 1.5])) @ V.T
                                  + 0.01 * torch.randn(out_f, in_f, generator=gen))
    base = _save(model, tmp_path / "planted")
    meta = build(validate(recipe(tmp_path, base, data_file, "pissa")))[3]
    for errors in meta["quantization_error"].values():
        assert errors["residual"] < 0.2 * errors["weight"], errors


def test_dry_run_reports_the_base_memory_as_loaded(work, llama_dir, data_file):
    import yaml

    path = work / "dry.yaml"
    path.write_text(yaml.safe_dump(recipe(work, llama_dir, data_file, "lora",
                                          train={"output_dir": str(work / "dry")})))
    result = run_cli("train", path, "--dry-run")
    assert result.exit_code == 0, result.output
    found = re.search(r"base memory as loaded: ([\d.,]+) MiB \(4-bit NF4", " ".join(result.output.split()))
    assert found, result.output
    # independent count: float32 embeddings, head and norms; 4 bits per weight in every linear
    cfg = tiny_llama().config
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
    linear = n * (h * h * 2 + 2 * h * kv + 3 * h * i)
    full = (2 * v * h + (2 * n + 1) * h) * 4 + linear // 2
    assert float(found.group(1).replace(",", "")) == pytest.approx(full / 2**20, abs=0.05)


# -- merge, eval, route-map -------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_a_4bit_run_merges_into_the_full_precision_base(method, runs, merged, llama_dir):
    out, result = merged[method]
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "as trained on the 4bit base" in text
    if method == "mosara":
        return  # mean routing: an approximation, reported by test_merge
    assert "[passed]" in text  # against the adapter on the full-precision base, float32 criterion
    config, grouped = adapter_state(runs[method][0])
    base, new = tensors(llama_dir), tensors(out)
    for module in config["ranks"]:
        t = grouped[module]
        update = {"sara": lambda: (t["sara_U"] * t["sara_lambda"]) @ t["sara_Vh"],
                  "lora": lambda: 2.0 * t["lora_B"] @ t["lora_A"],
                  "pissa": lambda: t["pissa_B"] @ t["pissa_A"] - t["pissa_B0"] @ t["pissa_A0"],
                  "sorsa": lambda: ((t["sorsa_U"] * t["sorsa_S"]) @ t["sorsa_Vh"]
                                    - (t["sorsa_U0"] * t["sorsa_S0"]) @ t["sorsa_Vh0"])}[method]()
        assert np.abs(update).max() > 1e-4, f"{module} did not train"
        expected = base[f"{module}.weight"].double().numpy() + update
        np.testing.assert_allclose(new[f"{module}.weight"].double().numpy(), expected, rtol=0, atol=2e-6)
    assert base.keys() == new.keys()


def test_merged_4bit_runs_load_without_sara(merged, work, llama_dir):
    ids = work / "ids.npy"
    np.save(ids, np.arange(4, 20)[None, :])
    jobs = [(str(out), str(ids), str(work / f"plain-{m}.npy")) for m, (out, r) in merged.items() if r.exit_code == 0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    child = subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(jobs)], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert len(child.stdout.strip().splitlines()) == len(METHODS)
    for _, _, target in jobs:
        assert np.isfinite(np.load(target)).all()


@pytest.mark.parametrize("method", ["pissa", "lora"])
def test_eval_loads_a_4bit_run_as_trained(method, runs, llama_dir):
    run = runs[method][0]
    model, _, description, _ = evaluate.load_model(str(run), device="cpu")
    layers = adapter_layers(model)
    assert {type(layer.base_layer).__name__ for layer in layers.values()} == {"Linear4bit"}
    assert not any(layer.merged for layer in layers.values())  # kept as a branch, not folded in
    fresh = build(validate(json.loads(json.dumps(checkpoint.read_config(run / "adapter")["recipe"]))))[0]
    checkpoint.load_adapter_tensors(fresh, run / "adapter")
    ids = torch.arange(4, 20)[None, :]
    with torch.no_grad():  # the training model (same 4-bit residual) and the eval model agree
        torch.testing.assert_close(model(ids).logits, fresh.eval()(ids).logits, rtol=0, atol=1e-5)


def test_route_map_on_a_4bit_mosara_run(runs, tmp_path):
    result = run_cli("route-map", runs["mosara"][0], "--task", "boolq", "--limit", "2", "--out", tmp_path / "map")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "map" / "route-map.json").is_file()


def test_an_8bit_sorsa_run_trains_and_merges(work, llama_dir, data_file):
    import yaml

    spec = recipe(work, llama_dir, data_file, "sorsa", model={"load_in_4bit": False, "load_in_8bit": True})
    spec["train"]["output_dir"] = str(work / "run-8bit")
    path = work / "8bit.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cli("train", path).exit_code == 0
    model = build(validate(spec))[0]
    assert "Linear8bitLt" in quantized_modules(model)
    result = run_cli("merge", work / "run-8bit", "--out", work / "merged-8bit")
    assert result.exit_code == 0, result.output
    assert "[passed]" in result.output and "as trained on the 8bit base" in " ".join(result.output.split())


# -- bad input --------------------------------------------------------------------------------------

def test_4bit_and_8bit_together_is_a_recipe_error(work, llama_dir, data_file):
    with pytest.raises(SaraError, match="load_in_4bit and load_in_8bit are both true"):
        validate(recipe(work, llama_dir, data_file, "sara", model={"load_in_8bit": True}))


def test_missing_bitsandbytes_is_one_line(work, llama_dir, data_file, monkeypatch):
    import importlib.util

    import yaml

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    path = work / "nobnb.yaml"
    path.write_text(yaml.safe_dump(recipe(work, llama_dir, data_file, "sara")))
    one_line_error(run_cli("train", path), "model.load_in_4bit", "bitsandbytes", "sara-cli[quantization]")


def test_a_prequantized_checkpoint_is_refused_with_the_way_out(work, llama_dir, data_file, tmp_path):
    import shutil

    import yaml

    folder = tmp_path / "prequantized"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, folder, data_file, "sara")))
    one_line_error(run_cli("train", path), "is quantized (bitsandbytes)", "model.load_in_4bit: true",
                   stdout_empty=False)
