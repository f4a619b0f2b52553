"""The contract every adapter fills: wrap a base layer, add a trainable branch, merge and unmerge.

Convention: `nn.Linear`, y = x W^T + b with W of shape (out, in). GPT-2's `Conv1D` stores W^T
(in, out); `base_weight()` always returns the (out, in) view so adapter code has one convention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADAPTER_DTYPE = torch.float32  # adapter weights stay fp32 on any base, as PEFT does
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (weight stored as (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def kaiming_uniform(shape: tuple[int, ...], device, fan_in: int | None = None) -> torch.Tensor:
    """nn.Linear's default init (Kaiming uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    fan_in defaults to shape[1], the fan-in of a weight stored (out, in); pass it for a tensor
    stored another way (a transposed weight, a vector).
    """
    if fan_in is None:
        t = torch.empty(shape, dtype=ADAPTER_DTYPE, device=device)
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        return t
    bound = 1.0 / math.sqrt(fan_in)  # gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in)
    return torch.empty(shape, dtype=ADAPTER_DTYPE, device=device).uniform_(-bound, bound)


class AdapterLayer(nn.Module):
    """Base class: holds `base_layer` frozen and adds `branch(x)` to its output.

    Subclasses set `prefix` (every parameter and buffer name starts with it) and implement
    `branch` and, where the update is input-independent, `delta_weight`.
    """

    prefix = ""
    reads_weight = False  # True: init decomposes W, through a `source` (initialize.MatrixSource)

    def __init__(self, base_layer: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        W = base_layer.weight  # packed when quantized: nn.Linear's features give the shape
        self.out_features, self.in_features = ((W.shape[1], W.shape[0]) if self.fan_in_fan_out else
                                               (base_layer.out_features, base_layer.in_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # -- the (out, in) view of the base weight ------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as stored (so code that reads `.weight` keeps working)."""
        return self.base_layer.weight

    @property
    def quantized(self) -> bool:
        """True over a bitsandbytes 4-bit or 8-bit base layer."""
        return type(self.base_layer).__name__ in QUANTIZED_LAYERS

    def base_weight(self) -> torch.Tensor:
        """Base weight as (out, in), a view (no copy).

        Raises:
            ValueError: a quantized base holds no full-precision weight (read it from the files).
        """
        if self.quantized:
            raise ValueError("a 4-bit/8-bit base layer holds no full-precision weight; read W from "
                             "the checkpoint files (initialize.CheckpointWeights)")
        W = self.base_layer.weight
        return W.T if self.fan_in_fan_out else W

    @torch.no_grad()
    def set_base_weight(self, W_oi: torch.Tensor) -> None:
        """Overwrite the base weight with an (out, in) tensor, cast once to the base dtype."""
        target = self.base_layer.weight
        new = W_oi.T if self.fan_in_fan_out else W_oi
        target.copy_(new.to(dtype=target.dtype, device=target.device))

    @torch.no_grad()
    def set_residual(self, W: torch.Tensor, principal: torch.Tensor) -> None:
        """Replace the base weight by W - principal (PiSSA/SORSA), formed in float64.

        Over a quantized base the residual is quantized the way the layer was (QPiSSA), and
        `quantization_error` records the relative error of W itself quantized (as loaded) and
        of principal + quantized residual.
        """
        W64 = W.to(torch.float64)
        principal = principal.to(W64.device, torch.float64)
        if not self.quantized:
            self.set_base_weight(W64 - principal)
            return
        from sara_cli.model import quantize

        norm = float(torch.linalg.matrix_norm(W64))
        before = quantize.relative_error(W64, self.base_layer, norm)
        quantize.requantize(self.base_layer, W64 - principal)
        after = quantize.relative_error(W64 - principal, self.base_layer, norm)
        self.quantization_error = {"weight": before, "residual": after}

    # -- the contract ----------------------------------------------------------------------------

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's added output for input x (..., in) -> (..., out), in adapter dtype."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update the branch adds to W, (out, in), float32: y = x (W + delta)^T + b."""
        raise NotImplementedError(f"{type(self).__name__} has no input-independent delta_weight")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold delta_weight into the base weight (float32 sum, one cast)."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError("merging into a 4-bit/8-bit base would round the update away; merge "
                             "into the full-precision base with `sara merge`")
        delta = self.delta_weight()
        merged = self.base_weight().to(torch.float32) + delta.to(self.base_weight().device)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError("merging produced NaN or inf; the adapter weights are broken")
        self.set_base_weight(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract delta_weight again (exact in float32, to rounding in bf16/fp16)."""
        if not self.merged:
            return
        W = self.base_weight().to(torch.float32) - self.delta_weight().to(self.base_weight().device)
        self.set_base_weight(W)
        self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        return result + self.branch(x).to(result.dtype)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) in the adapter dtype (outside autocast, matmuls then run in fp32)."""
        return self.dropout(x).to(ADAPTER_DTYPE)

    # -- bookkeeping -----------------------------------------------------------------------------

    def rank(self) -> int:
        """The adapter's rank: r for LoRA/PiSSA/SORSA, k for SARA/Mo-SARA."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this adapter: its parameters and persistent buffers."""
        return {name: t for name, t in self.state_dict(keep_vars=False).items()
                if name.startswith(self.prefix)}

    def weight_source(self, source=None):
        """`source` (an initialize.MatrixSource over the checkpoint files), or one over this
        layer's own loaded weight."""
        if source is not None:
            return source
        from sara_cli.adapters.initialize import layer_source

        return layer_source(self)

    def restore_frozen(self, name: str, source, saved: set[str]) -> None:
        """Hook run after loading a state: rebuild frozen tensors the file left out.

        Args:
            name: the module, for error messages.
            source: an initialize.MatrixSource over W from the checkpoint files, or None.
            saved: the names of this layer's tensors the file held.
        """

    def after_load(self, original_weight: torch.Tensor | None = None) -> None:
        """Hook run after `adapter_state` was loaded onto a freshly wrapped base."""

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank()}"
