"""Write the merge outputs that are not weights: a PEFT LoRA adapter and the model card."""

from __future__ import annotations

import json
from pathlib import Path

from sara_cli import __version__


def write_peft_lora(folder: Path, updates: dict, mapping: dict, base_ref: str, fan_in_fan_out: bool,
                    revision: str | None = None) -> None:
    """A standard PEFT LoRA adapter holding delta W = B A per module, scale 1.

    Each module keeps its own rank through `rank_pattern`, and `alpha_pattern` sets alpha = r so
    PEFT's scale alpha / r is 1 (the scale of LoRA itself is folded into B). The update is
    against the ORIGINAL base weights, so any LoRA server can apply it to the unmodified model.
    """
    import torch
    from safetensors.torch import save_file

    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, (B, A, scale) in updates.items():
        module = mapping[name]
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(torch.float32).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (B * scale).to(torch.float32).contiguous()
        rank_pattern[module] = int(A.shape[0])
        alpha_pattern[module] = int(A.shape[0])
    ranks = sorted(rank_pattern.values())
    default = ranks[len(ranks) // 2]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref, "revision": revision,
        "r": default, "lora_alpha": default, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({m.split(".")[-1] for m in rank_pattern}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _figures(report, fmt: str) -> list[str]:
    v = report.verification
    if fmt == "peft-lora":
        return ["- a PEFT export holds no merged weights to verify; load it with "
                "`peft.PeftModel.from_pretrained(base, folder)`"]
    if not v:
        return ["- not verified (`--no-verify`)"]
    lines = [f"- dtype: {v['dtype']}",
             f"- largest absolute logit difference: {v['max_abs_logit_diff']:.3g} over {v['tokens']} tokens",
             f"- greedy next-token agreement: {v['greedy_agreement']:.2%}"]
    if "calibration_loss_change" in v:
        lines.append(f"- calibration loss: routed {v['calibration_loss_routed']:.4f}, merged "
                     f"{v['calibration_loss_merged']:.4f} (change {v['calibration_loss_change']:+.4f})")
    return lines


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
    recipe = config.get("recipe")
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
