"""4-bit and 8-bit bases through bitsandbytes: load, prepare for training, re-quantize a residual.

`model.load_in_4bit: true` loads the base as NF4 with double quantization and the compute dtype
of the run (bf16/fp16 when the train section asks for it, else float32), as QLoRA, axolotl and
LLaMA-Factory do; `model.load_in_8bit: true` loads it as LLM.int8(). The adapters stay fp32
beside it. Their initial factors come from the full-precision files (initialize.py), never from
the quantized weights. PiSSA and SORSA replace W by the residual W - B0 A0: here it is computed
in full precision from the files and only then quantized (QPiSSA), so the quantization error
falls on the small residual instead of on W.

bitsandbytes is optional (`pip install 'sara-cli[quantization]'`) and imported only here.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from sara_cli.errors import SaraError

if TYPE_CHECKING:
    from torch import nn

INSTALL = "pip install 'sara-cli[quantization]' (or pip install bitsandbytes)"


def mode(model_cfg) -> str | None:
    """'4bit', '8bit' or None for a recipe's model section."""
    if getattr(model_cfg, "load_in_4bit", False):
        return "4bit"
    if getattr(model_cfg, "load_in_8bit", False):
        return "8bit"
    return None


def check_available(model_cfg) -> None:
    """Raise a one-line SaraError when the recipe quantizes and bitsandbytes is missing."""
    chosen = mode(model_cfg)
    if chosen and importlib.util.find_spec("bitsandbytes") is None:
        raise SaraError(f"model.load_in_{chosen}: needs the bitsandbytes package, which is not "
                        f"installed; {INSTALL}")


def compute_dtype(train_cfg) -> str:
    """The 4-bit compute dtype from the train section: bfloat16, float16, else float32."""
    if train_cfg is not None and train_cfg.bf16:
        return "bfloat16"
    if train_cfg is not None and train_cfg.fp16:
        return "float16"
    return "float32"


def bnb_config(model_cfg, compute: str = "float32"):
    """transformers' BitsAndBytesConfig for the model section, or None when it does not quantize."""
    import torch
    from transformers import BitsAndBytesConfig

    chosen = mode(model_cfg)
    if chosen is None:
        return None
    check_available(model_cfg)
    if chosen == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def describe(model_cfg, compute: str = "float32") -> str:
    chosen = mode(model_cfg)
    if chosen == "4bit":
        return f"4-bit NF4, double quantization, compute {compute}"
    if chosen == "8bit":
        return "8-bit LLM.int8()"
    return model_cfg.dtype if model_cfg.dtype != "auto" else "as stored"


def avoid_cpu_packing_bug(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel (AVX512-BF16) by
    reshaping the block scales to (out, in / blocksize), which fails unless `in` is a multiple of
    the block size (64). Such layers (only tiny models have them) keep the plain CPU path."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and module.in_features % module.weight.blocksize:
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model) -> None:
    """What PEFT's `prepare_model_for_kbit_training` does, without PEFT: freeze the base and keep
    the normalisation weights in float32 (a bf16/fp16 norm over a 4-bit base loses the little
    precision the quantized layers leave). Gradient checkpointing is the Trainer's, non-reentrant,
    so the embeddings need no `requires_grad` hook."""
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                param.data = param.data.float()
    for param in model.parameters():
        param.requires_grad_(False)


def dequantize(layer: nn.Module):
    """The weight a quantized layer computes with, (out, in) float32."""
    import bitsandbytes as bnb
    import torch

    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    return weight.data.to(torch.float32) * weight.SCB.to(torch.float32)[:, None] / 127.0


def requantize(layer: nn.Module, W) -> None:
    """Replace a quantized layer's weight by W (out, in) quantized the same way (4-bit: same
    block size, statistics and storage; 8-bit: row-wise int8)."""
    import bitsandbytes as bnb
    import torch

    old = layer.weight
    if type(layer).__name__ == "Linear4bit":
        new = bnb.nn.Params4bit(W.to(old.quant_state.dtype).contiguous(), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer)
        layer.weight = new._quantize(old.device)
    else:
        layer.weight = bnb.nn.Int8Params(W.to(torch.float16).contiguous(), requires_grad=False,
                                         has_fp16_weights=False).to(old.device)


def relative_error(target, layer: nn.Module, norm: float) -> float:
    """||target - Q|| / norm, with Q the weight the quantized layer computes with."""
    import torch

    return float(torch.linalg.matrix_norm(target - dequantize(layer).to(target))) / (norm or 1.0)
