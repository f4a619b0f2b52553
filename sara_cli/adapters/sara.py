"""SARA (Gu et al., arXiv 2408.03290): a truncated singular-value branch whose rank comes from W.

    k = k(W, tau) = min{k : sum_{i<=k} s_i >= tau * sum_i s_i}
    y = x W^T + b + ((dropout(x) Vh^T) * lam) U^T
    U: (out, k), lam: (k,), Vh = V^T: (k, in), all trainable; W untouched, no scaling factor.

The paper calls the branch "randomly initialized" without saying which factor is zero. Default:
U and Vh Kaiming uniform, lam zeros, so the model is exactly unchanged at step 0. The paper's
ablations are options: `use_lambda=False` (no lam: branch U Vh), `init_lambda="ones"`, and
`zero_init="up"` (U = 0, the paper's "V = 0" in its x W convention). `init_lambda="random"` is the
literal reading of "a randomly initialized truncated singular value matrix": lam ~ U(-1/sqrt(k),
1/sqrt(k)), Kaiming uniform with fan-in k, as nn.Linear(k, 1) draws its weight row.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sara_cli.adapters.base import ADAPTER_DTYPE, AdapterLayer, kaiming_uniform
from sara_cli.model.spectrum import rank_for_tau


class SaraLayer(AdapterLayer):
    prefix = "sara_"
    reads_weight = True

    def __init__(self, base_layer: nn.Module, tau: float | None = None, rank: int | None = None,
                 dropout: float = 0.0, use_lambda: bool = True, init_lambda: str = "zeros",
                 zero_init: str = "none", initialize: bool = True, source=None):
        super().__init__(base_layer, dropout)
        if init_lambda not in ("zeros", "ones", "random") or zero_init not in ("none", "up"):
            raise ValueError(f"init_lambda must be zeros|ones|random and zero_init none|up, got "
                             f"{init_lambda!r}, {zero_init!r}")
        if use_lambda and zero_init == "up" and init_lambda == "zeros":
            raise ValueError("zero_init='up' with init_lambda='zeros' can never train: U = 0 and "
                             "lambda = 0 make every gradient zero")
        if rank is None:
            rank = rank_for_tau(self.weight_source(source).values(), tau)
        self.k = rank
        device = base_layer.weight.device
        U = kaiming_uniform((self.out_features, rank), device)
        if zero_init == "up":
            U.zero_()
        self.sara_U = nn.Parameter(U)  # (out, k)
        self.sara_Vh = nn.Parameter(kaiming_uniform((rank, self.in_features), device))  # (k, in)
        self.use_lambda = use_lambda
        if use_lambda:
            if init_lambda == "random":
                lam = kaiming_uniform((rank,), device, fan_in=rank)
            else:
                lam = torch.full((rank,), 0.0 if init_lambda == "zeros" else 1.0, dtype=ADAPTER_DTYPE,
                                 device=device)
            self.sara_lambda = nn.Parameter(lam)  # (k,)

    def _scaled_U(self) -> torch.Tensor:
        return self.sara_U * self.sara_lambda if self.use_lambda else self.sara_U  # (out, k)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.adapter_input(x), self.sara_Vh)  # (..., k)
        if self.use_lambda:
            z = z * self.sara_lambda
        return F.linear(z, self.sara_U)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return self._scaled_U() @ self.sara_Vh  # (out, in), rank <= k

    def rank(self) -> int:
        return self.k
