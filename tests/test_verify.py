"""Merge verification: the float32 tolerance comes from the model's own noise floor, greedy flips at
near-ties are not failures, and on a deep model (24 layers of width 256) a correct merge passes
while a 0.1% error in one layer's merged weight fails.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import _save, tiny_llama
from sara_cli.adapters import checkpoint
from sara_cli.merging import merge as merge_module
from sara_cli.merging import verify
from sara_cli.errors import SaraError
from sara_cli.adapters.inject import inject_adapters

DEEP = dict(num_hidden_layers=24, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2)
CORRUPTED = "model.layers.12.self_attn.v_proj.weight"


def outputs(*logits: torch.Tensor) -> verify.Outputs:
    """Outputs over one batch of shape (1, N, V), every position real."""
    stacked = torch.stack(logits)[None]  # (1, N, V)
    return verify.Outputs([stacked], [torch.ones(stacked.shape[:2], dtype=torch.bool)], 0.0)


# -- near-tie-aware greedy agreement ---------------------------------------------------------------

def test_greedy_flips_at_near_ties_are_not_counted():
    reference = outputs(torch.tensor([2.0, 2.0 - 1e-6, 0.0]),  # top-2 margin 1e-6: a near tie
                        torch.tensor([3.0, 1.0, 0.0]),  # margin 2
                        torch.tensor([0.0, 1.0, 5.0]))
    candidate = outputs(torch.tensor([2.0 - 1e-6, 2.0, 0.0]),  # flipped by a 1e-6 move
                        torch.tensor([3.0, 3.5, 0.0]),  # flipped by a 2.5 move
                        torch.tensor([0.0, 1.0, 5.0]))
    tight = verify.compare(reference, candidate, tolerance=1e-6)
    assert tight["greedy_agreement"] == pytest.approx(1 / 3)
    assert tight["flips_beyond_ties"] == 1  # margin 2 > 2e-6; margin 1e-6 <= 2e-6 is a tie
    assert verify.compare(reference, candidate, tolerance=0.0)["flips_beyond_ties"] == 2
    assert verify.compare(reference, candidate, tolerance=1.0)["flips_beyond_ties"] == 0
    assert tight["max_abs_logit_diff"] == pytest.approx(2.5)


def test_a_loss_only_pass_keeps_no_logits_and_scores_like_numpy(llama_dir):
    """Calibration runs (256 records) keep only the loss: kept logits would be records x tokens x
    vocabulary floats. The loss is the token-weighted mean next-token cross-entropy, checked in
    float64 numpy on logits from a separate pass."""
    from sara_cli.model.loading import load_tokenizer

    model, tokenizer = tiny_llama().eval(), load_tokenizer(llama_dir)
    texts = ["one two three four five six seven", "eight nine", "ten eleven twelve thirteen fourteen"]
    loss_only = verify.run_model(model, tokenizer, texts, batch_size=2, keep_logits=False)
    assert loss_only.logits == [] and loss_only.masks == []
    full = verify.run_model(model, tokenizer, texts, batch_size=2)
    total, count = 0.0, 0
    for logits, mask, ids in zip(full.logits, full.masks,
                                 (tokenizer(texts[i:i + 2], return_tensors="pt", padding=True)["input_ids"]
                                  for i in (0, 2))):
        z = logits.double().numpy()
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        for b in range(z.shape[0]):
            real = mask[b].numpy()
            for t in range(z.shape[1] - 1):
                if real[t + 1]:
                    total -= logp[b, t, int(ids[b, t + 1])]
                    count += 1
    assert count > 10
    assert loss_only.loss == pytest.approx(total / count, rel=1e-6)


# -- the noise floor --------------------------------------------------------------------------------

def test_perturbation_moves_every_adapted_weight_by_exactly_one_ulp():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    inject_adapters(model, "lora", {"rank": 2, "alpha": 2.0}, "0")
    before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    verify.perturb_adapted_weights(model)
    after = {n: p.detach().numpy() for n, p in model.named_parameters()}
    W, W1 = before["0.base_layer.weight"], after["0.base_layer.weight"]
    step = W1 - W
    up, down = np.nextafter(W, np.float32(np.inf)) - W, np.nextafter(W, np.float32(-np.inf)) - W
    assert np.all((step == up) | (step == down))
    assert 0.2 < float((step == up).mean()) < 0.8  # both directions, at random
    for name in before:  # nothing but the adapted base weight moved
        if name != "0.base_layer.weight":
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


# -- a deep model: a correct merge passes, a 0.1% error in one layer fails --------------------------

@pytest.fixture(scope="module")
def deep_adapter(tmp_path_factory):
    """A 24-layer, width-256 Llama and a LoRA adapter on q/v whose update is about 10% of W."""
    from sara_cli.recipe import validate
    from sara_cli.training.train import build

    root = tmp_path_factory.mktemp("deep")
    base = _save(tiny_llama(**DEEP), root / "base")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": "Add 2 and 5.", "input": "", "output": "The sum is 7."}] * 4))
    recipe = validate({"model": {"name_or_path": str(base), "dtype": "float32"},
                       "adapter": {"method": "lora", "targets": "q_proj,v_proj", "rank": 4, "alpha": 4.0},
                       "data": {"train_file": str(data)}, "train": {"output_dir": str(root / "run")}})
    model, _, layers, meta = build(recipe)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        ratios = [float(l.delta_weight().norm() / l.base_weight().norm()) for l in layers.values()]
    assert 0.03 < min(ratios) and max(ratios) < 0.3, ratios
    folder = root / "run" / "adapter"
    checkpoint.save_adapter(model, folder, meta)
    return folder


def test_deep_model_correct_merge_passes_and_a_one_layer_error_fails(deep_adapter, tmp_path, monkeypatch,
                                                                   one_thread):
    report = merge_module.merge(deep_adapter, tmp_path / "merged")
    v = report.verification
    assert v["passed"] and v["flips_beyond_ties"] == 0
    assert v["tolerance"] == pytest.approx(verify.FLOOR_MULTIPLE * v["noise_floor"])
    assert 0 < v["max_abs_logit_diff"] <= 3 * v["noise_floor"]  # rounding alone: about the floor

    real_stream = merge_module.stream_merge

    def one_layer_off(base_dir, staging, updates, *args, **kwargs):
        """Add an error of 0.1% of ||W||_F, rank 1, to one of the 48 merged weights."""
        from safetensors import safe_open

        with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
            W = f.get_tensor(CORRUPTED)  # (out, in)
        B, A, scale = updates[CORRUPTED]
        gen = torch.Generator().manual_seed(1)
        b, a = torch.randn(W.shape[0], 1, generator=gen), torch.randn(1, W.shape[1], generator=gen)
        b = b * (1e-3 * float(W.norm()) / float((b @ a).norm()))
        updates = {**updates, CORRUPTED: (torch.cat([B * scale, b], dim=1), torch.cat([A, a], dim=0), 1.0)}
        return real_stream(base_dir, staging, updates, *args, **kwargs)

    monkeypatch.setattr(merge_module, "stream_merge", one_layer_off)
    with pytest.raises(SaraError, match=r"verification failed.*noise floor") as failure:
        merge_module.merge(deep_adapter, tmp_path / "broken")
    diff, limit = map(float, re.search(r"by (\S+) \(limit (\S+) =", str(failure.value)).groups())
    print(f"one layer 0.1% off: diff {diff:.3g}, limit {limit:.3g}, correct merge {v['max_abs_logit_diff']:.3g}")
    assert diff > 2 * limit  # not a near miss
    assert not (tmp_path / "broken").exists()
