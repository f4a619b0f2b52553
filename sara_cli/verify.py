"""Compare two models on the same text: the adapter model and its merged checkpoint.

Figures: the largest absolute logit difference over real (non-padding) tokens, the share of
positions whose greedy next token agrees, and the mean token loss of each model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass


@dataclass
class Outputs:
    logits: list  # per batch: (B, T, V) float32 CPU
    masks: list  # per batch: (B, T) bool
    loss: float  # mean token loss over all real tokens


def device_for_inference() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_model(model, tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 256) -> Outputs:
    """Logits and mean next-token loss of `model` over `texts`, kept on the CPU."""
    import torch

    from sara_cli.gates import batches

    device = next(model.parameters()).device
    logits, masks, total_loss, total_tokens = [], [], 0.0, 0
    with torch.no_grad():
        for batch in batches(tokenizer, texts, batch_size, max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch).logits.float()  # (B, T, V)
            mask = batch["attention_mask"].bool()
            shift_logits, shift_labels = out[:, :-1], batch["input_ids"][:, 1:]
            shift_mask = mask[:, 1:]
            losses = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                                       reduction="none")  # (B, T-1)
            total_loss += float(losses[shift_mask].sum())
            total_tokens += int(shift_mask.sum())
            logits.append(out.cpu())
            masks.append(mask.cpu())
    return Outputs(logits, masks, total_loss / max(total_tokens, 1))


def compare(reference: Outputs, candidate: Outputs) -> dict:
    """max |logit difference|, greedy agreement, loss of each and the change."""
    import torch

    max_diff, agree, total, spread = 0.0, 0, 0, 0.0
    for ref, cand, mask in zip(reference.logits, candidate.logits, reference.masks):
        ref_real, cand_real = ref[mask], cand[mask]  # (N, V)
        max_diff = max(max_diff, float((ref_real - cand_real).abs().max()))
        spread = max(spread, float(ref_real.max() - ref_real.min()))
        agree += int((ref_real.argmax(-1) == cand_real.argmax(-1)).sum())
        total += ref_real.shape[0]
    return {"max_abs_logit_diff": max_diff, "greedy_agreement": agree / max(total, 1),
            "tokens": total, "logit_spread": spread, "loss_adapter": reference.loss,
            "loss_merged": candidate.loss, "loss_change": candidate.loss - reference.loss}


def free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_merged(folder, dtype_name: str):
    """The merged checkpoint through plain transformers, as a user would load it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name) if dtype_name in ("bfloat16", "float16", "float32") else "auto"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device_for_inference()).eval()


def load_tokenizer(folder):
    """AutoTokenizer with a pad token (unk, else EOS) for batched runs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
