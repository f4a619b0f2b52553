"""PiSSA (Meng et al., arXiv 2404.02948): LoRA initialised on the principal singular triplets.

    W = U diag(s) V^T,  top r:  A = diag(sqrt(s_r)) V_r^T  (r, in),  B = U_r diag(sqrt(s_r))  (out, r)
    W_res = W - B A (frozen, replaces the base weight);  y = x W_res^T + b + dropout(x) A^T B^T
    scale 1, so at init y equals the original output up to rounding.

The initial factors A0, B0 are kept as buffers: with them the adapter rebuilds W_res from the
original W, and merge/export can express the trained update against W: B A - B0 A0.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sara_cli.adapters.base import ADAPTER_DTYPE, AdapterLayer


class PissaLayer(AdapterLayer):
    prefix = "pissa_"
    reads_weight = True

    def __init__(self, base_layer: nn.Module, rank: int, dropout: float = 0.0,
                 initialize: bool = True, svd: str = "lowrank", source=None):
        super().__init__(base_layer, dropout)
        self.r = rank = min(rank, self.in_features, self.out_features)
        device = base_layer.weight.device
        A = torch.zeros(rank, self.in_features, dtype=ADAPTER_DTYPE, device=device)
        B = torch.zeros(self.out_features, rank, dtype=ADAPTER_DTYPE, device=device)
        if initialize:
            source = self.weight_source(source)
            top = source.principal(rank, svd)  # 'lowrank' (randomized, niter 4) or 'full'
            root = top.s.sqrt()
            A = (root[:, None] * top.Vh).to(device, ADAPTER_DTYPE)  # (r, in)
            B = (top.U * root[None, :]).to(device, ADAPTER_DTYPE)  # (out, r)
        self.pissa_A = nn.Parameter(A.clone())
        self.pissa_B = nn.Parameter(B.clone())
        self.register_buffer("pissa_A0", A.clone())
        self.register_buffer("pissa_B0", B.clone())
        if initialize:
            self._subtract_initial(source.weight())  # from the full-precision W

    @torch.no_grad()
    def _subtract_initial(self, W: torch.Tensor) -> None:
        B0, A0 = (t.to(W.device, torch.float64) for t in (self.pissa_B0, self.pissa_A0))
        self.set_residual(W, B0 @ A0)  # W_res = W - B0 A0

    def after_load(self, original_weight: torch.Tensor | None = None) -> None:
        self._subtract_initial(self.base_weight() if original_weight is None else original_weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.adapter_input(x), self.pissa_A), self.pissa_B)

    def delta_weight(self) -> torch.Tensor:
        return self.pissa_B @ self.pissa_A  # against W_res

    def rank(self) -> int:
        return self.r
