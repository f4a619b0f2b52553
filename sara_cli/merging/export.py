"""Write the merge outputs that are not weights: a PEFT LoRA adapter and the model card."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sara_cli import __version__


# vLLM's `--max-lora-rank` takes only these values (vllm/config/lora.py); 512 is the largest.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ModuleExport:
    """One module of a PEFT export: its rank before and after `--max-rank`, and the share of the
    update's squared Frobenius norm the exported factors keep (1.0 when not truncated)."""

    rank: int
    exported_rank: int
    kept_energy: float


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest vLLM `--max-lora-rank` that serves an adapter whose largest rank is `rank`;
    None above 512 (vLLM cannot serve it: serve the merged checkpoint, or export with --max-rank)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def truncate(B, A, max_rank: int | None):
    """The best rank-`max_rank` factors of delta W = B A (Eckart-Young), in float64.

    With B = Qb Rb and A^T = Qa Ra (thin QR), B A = Qb (Rb Ra^T) Qa^T, so the SVD of the small
    (q, q) core U S Vh gives delta W's singular values S and vectors Qb U, Qa Vh^T without ever
    forming the (out, in) matrix. Keeping the top N: B' = Qb U_N diag(S_N), A' = Vh_N Qa^T.

    Args:
        B: (out, q); A: (q, in).

    Returns:
        (B' (out, n), A' (n, in), kept energy sum(S_N^2) / sum(S^2)); the inputs unchanged with
        energy 1.0 when q <= max_rank or max_rank is None.
    """
    import torch

    q = A.shape[0]
    if max_rank is None or q <= max_rank:
        return B, A, 1.0
    Qb, Rb = torch.linalg.qr(B.double())  # (out, q), (q, q)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, q), (q, q)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # (q, q), (q,), (q, q)
    total = float((S**2).sum())
    kept = float((S[:max_rank] ** 2).sum()) / total if total > 0 else 1.0
    return Qb @ (U[:, :max_rank] * S[:max_rank]), Vh[:max_rank] @ Qa.T, kept


def write_peft_lora(folder: Path, updates: dict, mapping: dict, base_ref: str, fan_in_fan_out: bool,
                    revision: str | None = None, max_rank: int | None = None) -> dict[str, ModuleExport]:
    """A standard PEFT LoRA adapter holding delta W = B A per module, scale 1.

    Each module keeps its own rank through `rank_pattern`, and `alpha_pattern` sets alpha = r so
    PEFT's scale alpha / r is 1 (the scale of LoRA itself is folded into B). The top-level `r` and
    `lora_alpha` are the largest rank: servers that read only those (vLLM checks `r` against
    --max-lora-rank and applies lora_alpha / r to every module) see the true largest rank and
    still apply scale 1. The update is against the ORIGINAL base weights, so any LoRA server can
    apply it to the unmodified model. Modules above `max_rank` are truncated by `truncate`.

    Returns:
        {module: ModuleExport}.
    """
    import torch
    from safetensors.torch import save_file

    tensors, rank_pattern, exported = {}, {}, {}
    for name, (B, A, scale) in updates.items():
        module = mapping[name]
        B_out, A_out, kept = truncate(B * scale, A, max_rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A_out.to(torch.float32).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B_out.to(torch.float32).contiguous()
        rank_pattern[module] = int(A_out.shape[0])
        exported[module] = ModuleExport(int(A.shape[0]), int(A_out.shape[0]), kept)
    top = max(rank_pattern.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref, "revision": revision,
        "r": top, "lora_alpha": top, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({m.split(".")[-1] for m in rank_pattern}),
        "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return exported


def export_summary(exported: dict[str, ModuleExport], max_rank: int | None) -> dict:
    """Figures for the summary and the model card: ranks, truncation, the vLLM rank to serve it."""
    top = max(m.exported_rank for m in exported.values())
    truncated = {name: m for name, m in exported.items() if m.exported_rank < m.rank}
    return {"max_rank": max_rank, "rank": top, "min_rank": min(m.exported_rank for m in exported.values()),
            "vllm_max_lora_rank": vllm_max_lora_rank(top),
            "truncated": {name: {"rank": m.rank, "exported_rank": m.exported_rank, "kept_energy": m.kept_energy}
                          for name, m in truncated.items()}}


def _figures(report, fmt: str) -> list[str]:
    v = report.verification
    if not v:
        return ["- not verified (`--no-verify`)"]
    against = "the merged weights" if fmt == "hf" else "the exported LoRA factors applied to the base"
    lines = [f"- dtype: {v['dtype']}", f"- compared: {against} against the adapter model",
             f"- largest absolute logit difference: {v['max_abs_logit_diff']:.3g} over {v['tokens']} tokens",
             f"- greedy next-token agreement: {v['greedy_agreement']:.2%}"]
    if "calibration_loss_change" in v:
        lines.append(f"- calibration loss: routed {v['calibration_loss_routed']:.4f}, merged "
                     f"{v['calibration_loss_merged']:.4f} (change {v['calibration_loss_change']:+.4f})")
    return lines


def _export_lines(summary: dict) -> list[str]:
    """The model card's serving section: ranks, vLLM's --max-lora-rank, truncated modules."""
    rank, vllm = summary["rank"], summary["vllm_max_lora_rank"]
    lines = ["## Serving", "",
             f"- ranks {summary['min_rank']} to {rank}; top-level `r` = `lora_alpha` = {rank} (scale 1 everywhere)",
             f"- vLLM: `--enable-lora --max-lora-rank {vllm}`" if vllm else
             f"- vLLM cannot serve rank {rank} (its largest --max-lora-rank is 512): serve the merged "
             "checkpoint, or export again with `--max-rank 512`"]
    if summary["truncated"]:
        lines += ["", f"Modules above `--max-rank {summary['max_rank']}` were truncated by SVD to their best "
                  "rank-N approximation; kept energy is the share of the update's squared Frobenius norm "
                  "that the exported factors keep.", "",
                  "| module | rank | exported rank | kept energy |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {m['rank']} | {m['exported_rank']} | {m['kept_energy']:.4%} |"
                  for name, m in summary["truncated"].items()]
    return lines + [""]


def model_card(config: dict, base_ref: str, fmt: str, report, calibration: str | None) -> str:
    """A short README naming the base, the method, the recipe and the sara version."""
    import yaml

    method = config["method"]
    kind = "PEFT LoRA adapter" if fmt == "peft-lora" else "merged checkpoint"
    lines = [f"# {kind}: {method} on {base_ref}", "",
             f"Made with sara {__version__} from a {method} adapter (sara {config.get('sara_version', '?')}).",
             "It needs no sara code: load it with plain transformers"
             + (" and PEFT." if fmt == "peft-lora" else "."), "",
             f"- base model: {base_ref}",
             f"- base fingerprint: {config['base_model'].get('fingerprint', 'unknown')}",
             f"- method: {method}, targets: {len(config['ranks'])} modules",
             f"- rank per module: {min(config['ranks'].values())} to {max(config['ranks'].values())}", ""]
    if method == "mosara":
        lines += ["## Routing", "",
                  "Mo-SARA routes every token separately; this checkpoint uses each layer's mean gate "
                  f"over the calibration data ({calibration}), so it approximates the routed model.", ""]
    lines += ["## Verification", "", *_figures(report, fmt), ""]
    if fmt == "peft-lora":
        lines += ["Load it with `peft.PeftModel.from_pretrained(base, folder)`.", "", *_export_lines(report.export)]
    recipe = config.get("recipe")
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
