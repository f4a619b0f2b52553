"""Compare two models on the same text: the adapter model and its merged checkpoint.

Figures: the largest absolute logit difference over real (non-padding) tokens, the share of
positions whose greedy next token agrees, and the mean token loss of each model. In float32 the
limit comes from the model itself: its noise floor is how far its logits move when every adapted
base weight moves by one unit in the last place (docs/merge.md, "The criterion").
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from sara_cli.adapters.checkpoint import load_adapter_model, read_config
from sara_cli.errors import SaraError
from sara_cli.model.loading import TRAIN_SETTING, device_for_inference, load_checkpoint, load_tokenizer

VERIFY_TEXT = ["The quick brown fox jumps over the lazy dog.",
               "Question: what is 12 plus 30? Answer: 42.",
               "Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request."]
# bf16/fp16: rounding moves logits by a fraction of a percent per layer; a broken merge moves them
# by their own size. Fail only past 10% of the logits' spread (see docs/merge.md).
HALF_PRECISION_TOLERANCE = 0.10
# float32: a correct merge differs from the adapter model by rounding alone, which measured at
# 0.1 to 1 times the noise floor; fail past this multiple of it (see docs/merge.md).
FLOOR_MULTIPLE = 10.0


@dataclass
class Outputs:
    logits: list  # per batch: (B, T, V) float32 CPU
    masks: list  # per batch: (B, T) bool
    loss: float  # mean token loss over all real tokens


def next_token_loss(logits, labels) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of scored tokens); labels of -100 are skipped.

    logits (B, T, V) float32, labels (B, T): position t predicts labels[t + 1].
    """
    import torch

    shifted = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted,
                                              ignore_index=-100, reduction="sum")
    return float(total), int((shifted != -100).sum())


def run_model(model, tokenizer, texts: list[str], batch_size: int = 4, max_length: int = 256,
              keep_logits: bool = True) -> Outputs:
    """Logits and mean next-token loss of `model` over `texts`, kept on the CPU.

    With keep_logits=False only the loss is kept: calibration data (up to 256 records) would
    otherwise hold records x tokens x vocabulary floats, gigabytes for a 50k vocabulary.
    """
    import torch

    from sara_cli.adapters.gates import batches

    device = next(model.parameters()).device
    logits, masks, total_loss, total_tokens = [], [], 0.0, 0
    with torch.no_grad():
        for batch in batches(tokenizer, texts, batch_size, max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch).logits.float()  # (B, T, V)
            mask = batch["attention_mask"].bool()
            loss_sum, tokens = next_token_loss(out, batch["input_ids"].masked_fill(~mask, -100))
            total_loss += loss_sum
            total_tokens += tokens
            if keep_logits:
                logits.append(out.cpu())
                masks.append(mask.cpu())
    return Outputs(logits, masks, total_loss / max(total_tokens, 1))


def compare(reference: Outputs, candidate: Outputs, tolerance: float = 0.0) -> dict:
    """max |logit difference|, greedy agreement, loss of each and the change.

    A greedy flip at a position whose reference top-2 margin is at most 2 * tolerance is a near
    tie: moving each logit by at most `tolerance` can overturn it. `flips_beyond_ties` counts the
    others, flips no difference within the tolerance can explain.
    """
    import torch

    max_diff, agree, total, spread, beyond = 0.0, 0, 0, 0.0, 0
    for ref, cand, mask in zip(reference.logits, candidate.logits, reference.masks):
        ref_real, cand_real = ref[mask], cand[mask]  # (N, V)
        max_diff = max(max_diff, float((ref_real - cand_real).abs().max()))
        spread = max(spread, float(ref_real.max() - ref_real.min()))
        same = ref_real.argmax(-1) == cand_real.argmax(-1)  # (N,)
        top2 = torch.topk(ref_real, 2, dim=-1).values  # (N, 2)
        margin = top2[:, 0] - top2[:, 1]
        agree += int(same.sum())
        beyond += int((~same & (margin > 2 * tolerance)).sum())
        total += ref_real.shape[0]
    return {"max_abs_logit_diff": max_diff, "greedy_agreement": agree / max(total, 1),
            "flips_beyond_ties": beyond, "tokens": total, "logit_spread": spread,
            "loss_adapter": reference.loss, "loss_merged": candidate.loss,
            "loss_change": candidate.loss - reference.loss}


def perturb_adapted_weights(model, seed: int = 0) -> None:
    """Move every adapted base weight one unit in the last place, up or down at random (in place).

    That is the size of the rounding a correct merge makes in each weight it writes.
    """
    import torch

    from sara_cli.adapters.inject import adapter_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            W = layer.base_layer.weight
            up = (torch.rand(W.shape, generator=generator) < 0.5).to(W.device)
            W.copy_(torch.where(up, torch.nextafter(W, W.new_tensor(float("inf"))),
                                torch.nextafter(W, W.new_tensor(float("-inf")))))


def noise_floor(model, tokenizer, texts: list[str], reference: Outputs) -> float:
    """max |logit change| of the adapter model when its adapted weights move by one ulp each.

    Run after `reference` was taken on the same model and texts; leaves the model perturbed.
    """
    perturb_adapted_weights(model)
    return compare(reference, run_model(model, tokenizer, texts))["max_abs_logit_diff"]


def free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_merged(folder, dtype_name: str, trust_remote_code: bool = False):
    """The merged checkpoint through plain transformers, as a user would load it; a base with its
    own model code runs it only when the run was trained with model.trust_remote_code."""
    return load_checkpoint(folder, dtype_name, device_for_inference(), trust_remote_code, TRAIN_SETTING)[0]


def trusts_code(adapter_dir: Path) -> bool:
    """The run's recorded model.trust_remote_code."""
    return bool(read_config(adapter_dir)["base_model"].get("trust_remote_code"))


# -- the merge's checks ------------------------------------------------------------------------

def verification_texts(config: dict, limit: int = 4, base_dir: Path | None = None) -> list[str]:
    """A few of the run's own training texts (its first file, as trained) when the data is at
    hand, else built-in text. A chat run's texts are rendered with the base's tokenizer."""
    from sara_cli.data.dataset import load_records, record_texts

    data = (config.get("recipe") or {}).get("data") or {}
    first = data.get("train_file")
    entry = first[0] if isinstance(first, list) and first and isinstance(first[0], dict) else {"path": first}
    if not entry.get("path"):
        return VERIFY_TEXT
    settings = {**data, **{k: v for k, v in entry.items() if v is not None}}
    try:
        template = settings.get("template", "alpaca")
        trust = bool(config["base_model"].get("trust_remote_code"))
        tokenizer = load_tokenizer(base_dir, trust) if template == "chat" and base_dir else None
        records = load_records(entry["path"], settings.get("split") or data.get("train_split", "train"),
                               limit, settings.get("columns"))
        texts = [record_texts(dict(r), template, tokenizer)[1] for r in records]
        return texts or VERIFY_TEXT
    except Exception:  # the data may be gone or on another machine; the check still runs
        return VERIFY_TEXT


def mean_routing(adapter_dir: Path, base: str, dtype_name: str, calibration: str, config: dict,
                 texts: list[str]):
    """Mean gate per Mo-SARA layer over the calibration data, and the routed model's outputs.

    Returns ({module: (m,) mean gate}, routed outputs on `texts`, routed outputs on calibration).
    """
    from sara_cli.data.dataset import load_records, record_texts
    from sara_cli.adapters.gates import collect_gates

    records = load_records(calibration, limit=256)
    template = (config.get("recipe") or {}).get("data", {}).get("template", "alpaca")
    # The merge writes into the full-precision base: average the gates over that model.
    model, tokenizer, _ = load_adapter_model(adapter_dir, base, dtype_name, device_for_inference(),
                                             full_precision=True)
    calibration_texts = [record_texts(dict(r), template, tokenizer)[1] for r in records]
    gates = collect_gates(model, tokenizer, calibration_texts)
    mean_gates = {name: g.mean(dim=0) for name, g in gates.items()}
    routed = run_model(model, tokenizer, texts)
    routed_calibration = run_model(model, tokenizer, calibration_texts, keep_logits=False)
    free(model)
    return mean_gates, routed, routed_calibration, calibration_texts


def check_merged(adapter_dir: Path, base_ref: str, staging: Path, dtype_name: str, texts: list[str],
                 routed=None, routed_calibration=None, calibration_texts=()) -> dict:
    """Run the adapter model and the merged checkpoint on `texts`; fail on a real mismatch
    (`judge`). Mo-SARA (routed and calibration texts given): report only.

    The reference is the adapter on the full-precision base, which is what the merge writes
    into. A run trained on a 4-bit/8-bit base is also run as trained, and its distance from the
    merged model is reported under "as_trained" (never a failure: that gap is the quantization's).
    """
    trust = trusts_code(adapter_dir)
    merged = load_merged(staging, dtype_name, trust)
    tokenizer = load_tokenizer(staging, trust)
    check_finite(merged, "merged tensor {name} holds NaN or inf")
    merged_out = run_model(merged, tokenizer, texts)
    merged_calibration = (run_model(merged, tokenizer, list(calibration_texts), keep_logits=False)
                          if calibration_texts else None)
    free(merged)
    if merged_calibration is not None:
        figures = compare(routed, merged_out)
        figures["dtype"] = dtype_name
        figures["calibration_loss_routed"] = routed_calibration.loss
        figures["calibration_loss_merged"] = merged_calibration.loss
        figures["calibration_loss_change"] = merged_calibration.loss - routed_calibration.loss
        figures["exact"] = False
    else:
        floor = None
        if routed is None:
            routed, floor = adapter_outputs(adapter_dir, base_ref, dtype_name, texts)
        figures = judge(routed, merged_out, floor, dtype_name, "merged")
    quantization = (read_config(adapter_dir).get("base_model") or {}).get("quantization")
    if quantization:
        model, tokenizer, _ = load_adapter_model(adapter_dir, base_ref, None, device_for_inference())
        figures["as_trained"] = {"quantization": quantization,
                                 **compare(run_model(model, tokenizer, texts), merged_out)}
        free(model)
    return figures


def check_finite(model, message: str) -> None:
    """Raise SaraError(`message` with {name}) for the first floating tensor holding NaN or inf."""
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise SaraError(message.format(name=name) + "; the adapter is broken")


def adapter_outputs(adapter_dir: Path, base_ref: str, dtype_name: str, texts: list[str]) -> tuple[Outputs, float | None]:
    """The adapter model (on the full-precision base) on `texts`: the reference every merge and
    export is checked against, and in float32 its noise floor (`noise_floor`), else None."""
    model, tokenizer, _ = load_adapter_model(adapter_dir, base_ref, dtype_name, device_for_inference(),
                                             full_precision=True)
    outputs = run_model(model, tokenizer, texts)
    floor = noise_floor(model, tokenizer, texts, outputs) if dtype_name == "float32" else None
    free(model)
    return outputs, floor


def judge(reference: Outputs, candidate: Outputs, floor: float | None, dtype_name: str, what: str) -> dict:
    """`compare`'s figures for an exact merge or export, with figures["passed"]; or raise.

    float32 (floor given): the tolerance is FLOOR_MULTIPLE times the adapter model's noise floor;
    fail when the logits differ by more, or when a greedy token flips where the reference's top-2
    margin exceeds twice the tolerance. bf16/fp16: fail only past HALF_PRECISION_TOLERANCE of the
    logit spread.

    Raises:
        SaraError: the figures are past the limit (`what` names the model checked).
    """
    import torch

    spread = max(float(ref[mask].max() - ref[mask].min()) for ref, mask in zip(reference.logits, reference.masks))
    if floor is not None:
        # A floor of 0 would mean the adapted weights do not reach the logits; fall back to one
        # float32 rounding of the logits' spread rather than demand bit-identical output.
        tolerance = max(FLOOR_MULTIPLE * floor, float(torch.finfo(torch.float32).eps) * spread)
        limit = f"{tolerance:.3g} = {FLOOR_MULTIPLE:g} x the noise floor {floor:.3g}"
    else:
        tolerance = HALF_PRECISION_TOLERANCE * max(spread, 1e-6)
        limit = f"{tolerance:.3g} = {HALF_PRECISION_TOLERANCE:.0%} of the logit spread"
    figures = compare(reference, candidate, tolerance)
    figures.update(noise_floor=floor, tolerance=tolerance, dtype=dtype_name)
    ok = figures["max_abs_logit_diff"] <= tolerance and figures["flips_beyond_ties"] == 0
    figures["passed"] = ok
    if not ok:
        raise SaraError(f"verification failed: {what} logits differ from the adapter model's by "
                        f"{figures['max_abs_logit_diff']:.3g} (limit {limit}), greedy agreement "
                        f"{figures['greedy_agreement']:.1%} with {figures['flips_beyond_ties']} flips "
                        "beyond near-ties; nothing was written")
    return figures


def apply_lora_export(model, export_dir: Path, transposed: bool) -> None:
    """Add each module's exported lora_B @ lora_A to its weight, read back from the written file:
    the model a LoRA server computes (scale 1), summed in float32 and cast once."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(Path(export_dir) / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    with torch.no_grad():
        for key, A in state.items():
            if not key.endswith(suffix):
                continue
            module = key[len(prefix):-len(suffix)]
            B = state[f"{prefix}{module}.lora_B.weight"]
            weight = model.get_submodule(module).weight
            delta = (B @ A).to(weight.device)  # (out, in), float32
            weight.copy_((weight.float() + (delta.T if transposed else delta)).to(weight.dtype))


def check_export(adapter_dir: Path, base_ref: str, export_dir: Path, dtype_name: str, texts: list[str],
                 transposed: bool, exact: bool, reference: Outputs | None = None) -> dict:
    """Run the adapter model and the base with the exported LoRA factors on `texts`.

    Args:
        exact: the export should reproduce the adapter (no --max-rank truncation, no Mo-SARA
            mean routing): judged by `judge`. Otherwise the figures are only reported.
        reference: the adapter model's outputs on `texts` when already computed (Mo-SARA).

    Raises:
        SaraError: NaN/inf in the exported model, or an exact export past `judge`'s limit.
    """
    trust = trusts_code(adapter_dir)
    exported = load_merged(base_ref, dtype_name, trust)
    apply_lora_export(exported, export_dir, transposed)
    check_finite(exported, "exported LoRA factors make {name} NaN or inf")
    exported_out = run_model(exported, load_tokenizer(base_ref, trust), texts)
    free(exported)
    floor = None
    if reference is None:
        reference, floor = adapter_outputs(adapter_dir, base_ref, dtype_name, texts)
    if exact:
        figures = judge(reference, exported_out, floor, dtype_name, "exported LoRA")
    else:
        figures = compare(reference, exported_out)
        figures["dtype"] = dtype_name
    figures["exact"] = exact
    return figures
