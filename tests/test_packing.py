"""Packing: packs of at most cutoff_len tokens, per-record positions, no attention across records,
and the same loss as padded batches of the same records.

The references are computed separately: each record run alone through the model, padded
batches through DataCollatorForSeq2Seq, and the attention weights of the eager kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, tiny_gpt2, tiny_llama
from sara_cli.errors import SaraError
from sara_cli.data.packing import PackCollator, check_isolation, collator_for, plan_packs

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")


def features(lengths, seed: int = 0, masked: int = 2) -> list[dict]:
    """Records of random tokens; the first `masked` labels of each are -100 (a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(4, 1024, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE] * masked + ids[masked:]})
    return rows


def padded_batch(tokenizer, rows: list[dict]) -> dict:
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt", padding=True)
    return collate([dict(r) for r in rows])


# -- planning packs --------------------------------------------------------------------------------

def test_best_fit_decreasing_by_hand():
    # 6 opens pack A (4 free), 5 opens B (5 free), 4 fills A exactly, 3 goes to B (2 free), 2 fills B.
    assert plan_packs([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # Best fit, not first fit: 3 joins 7 (3 free), not 6 (4 free, and first in the input).
    assert plan_packs([6, 7, 3], 10) == [[1, 2], [0]]
    assert plan_packs([7, 6, 3], 10) == [[0, 2], [1]]


def test_packs_cover_every_record_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    packs = plan_packs(lengths, 64)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 64 for pack in packs)
    assert len(packs) < 0.6 * 500  # random lengths up to the capacity: about two per pack
    assert plan_packs(lengths, 64) == packs  # deterministic
    with pytest.raises(ValueError, match="more than the pack size"):
        plan_packs([65], 64)


# -- the collator ----------------------------------------------------------------------------------

def test_collator_rows_restart_positions_and_mask_record_starts():
    rows = features([3, 2, 4])
    batch = PackCollator(pad_token_id=3)([rows[:2], rows[2:]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would hide the packing
    assert batch["input_ids"].shape == (2, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert batch["input_ids"][1].tolist() == rows[2]["input_ids"] + [3]
    # Each record's first label is -100 (nothing predicts it from the record before), as is padding.
    assert batch["labels"][0].tolist() == [IGNORE] + rows[0]["labels"][1:] + [IGNORE] + rows[1]["labels"][1:]
    assert batch["labels"][1].tolist() == [IGNORE] + rows[2]["labels"][1:] + [IGNORE]


def test_collator_flatten_for_flash_attention():
    rows = features([3, 2, 4])
    batch = PackCollator(pad_token_id=3, flatten=True)([rows[:2], rows[2:]])
    assert batch["input_ids"].shape == (1, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and batch["max_length_q"] == 4


def test_collator_follows_the_attention_kernel(tokenizer):
    model = tiny_llama(attn_implementation="sdpa")
    assert not collator_for(model, tokenizer).flatten
    model.config._attn_implementation = "flash_attention_2"  # only read, never run on the CPU
    assert collator_for(model, tokenizer).flatten


# -- the same loss, and no attention across records ------------------------------------------------

@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(tokenizer, kernel):
    model = tiny_llama(attn_implementation=kernel)
    model.config.use_cache = False
    rows = features([9, 4, 7, 3, 6, 5], seed=1)
    packs = plan_packs([len(r["input_ids"]) for r in rows], 16)
    assert len(packs) < len(rows)  # records do share sequences
    with torch.no_grad():
        padded = model(**padded_batch(tokenizer, rows)).loss
        for flatten in (False, True):  # flattened: what flash kernels get; sdpa/eager read it too
            batch = PackCollator(tokenizer.pad_token_id, flatten)([[rows[i] for i in p] for p in packs])
            packed = model(**batch).loss
            torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)


def test_no_token_attends_across_a_record_boundary(tokenizer):
    model = tiny_llama(attn_implementation="eager")
    model.config.use_cache = False
    rows = features([4, 3, 5])
    batch = PackCollator(tokenizer.pad_token_id)([rows[:2], rows[2:]])  # row 1: 5 tokens, row 0: 4+3 (+0)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
    # Which record each position of each row belongs to (padding is its own block).
    owner = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 3, 3]])
    same = owner[:, :, None] == owner[:, None, :]  # (B, L, L)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for layer in out.attentions:  # (B, heads, L, L)
        assert layer[~(same & causal)[:, None].expand_as(layer)].abs().max() == 0
        assert torch.allclose(layer.sum(-1), torch.ones_like(layer.sum(-1)))


@pytest.mark.parametrize("build", [lambda: tiny_llama(attn_implementation="sdpa"),
                                   lambda: tiny_llama(attn_implementation="eager"), lambda: tiny_gpt2()],
                         ids=["llama-sdpa", "llama-eager", "gpt2"])
def test_isolation_check_passes_where_records_keep_to_themselves(tokenizer, build):
    model = build()
    model.config.use_cache = False
    assert check_isolation(model, collator_for(model, tokenizer)) < 1e-5


def test_isolation_check_refuses_attention_across_records(tokenizer, monkeypatch):
    # With a KV cache, transformers 5 builds a plain causal mask: packed records see each other.
    model = tiny_llama(attn_implementation="sdpa")
    model.config.use_cache = True
    with pytest.raises(SaraError, match=r"data\.packing: with the sdpa attention kernel.*attend to each other"):
        check_isolation(model, collator_for(model, tokenizer))
    # The same when the mask code ignores position_ids (as a kernel or model without support would).
    import transformers.masking_utils as masking

    model.config.use_cache = False
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    model.train()
    with pytest.raises(SaraError, match="data.packing: false"):
        check_isolation(model, collator_for(model, tokenizer))
    assert model.training  # the check runs in eval mode and restores the mode it found


# -- through the Trainer ---------------------------------------------------------------------------

def test_one_packed_step_equals_one_padded_step(tmp_path, llama_dir):
    """All records in one batch both ways: the same loss (the Trainer divides the summed token
    loss by the number of target tokens) and the same adapter after the step."""
    from safetensors.torch import load_file

    from conftest import run_cli

    records = [{"instruction": f"Add {i} and {2 * i}.", "input": "", "output": f"{3 * i}"} for i in range(10)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    results = {}
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        recipe = tmp_path / f"r-{packing}.yaml"
        recipe.write_text(json.dumps({
            "model": {"name_or_path": str(llama_dir), "dtype": "float32"},
            "adapter": {"method": "lora", "targets": "q_proj,v_proj", "rank": 4, "alpha": 8},
            "data": {"train_file": str(data), "cutoff_len": 128, "train_on_inputs": False, "packing": packing},
            "train": {"output_dir": str(out), "learning_rate": 1e-2, "max_steps": 1, "logging_steps": 1,
                      "per_device_train_batch_size": 16, "seed": 3}}))
        result = run_cli("train", recipe)
        assert result.exit_code == 0, result.output
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        results[packing] = (next(r["loss"] for r in log if "loss" in r),
                            load_file(str(out / "adapter" / "adapter_model.safetensors")))
    assert "packed into" in result.output
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, tensor in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], tensor, rtol=0, atol=1e-6)
    assert Path(out / "adapter").is_dir()
