"""LoRA (Hu et al., arXiv 2106.09685).

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T
    A: (r, in), Kaiming uniform;  B: (out, r), zeros  -> the model is unchanged at init.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sara_cli.adapters.base import ADAPTER_DTYPE, AdapterLayer, kaiming_uniform


class LoraLayer(AdapterLayer):
    prefix = "lora_"

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 initialize: bool = True):
        super().__init__(base_layer, dropout)
        self.r = rank
        self.scaling = alpha / rank
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(kaiming_uniform((rank, self.in_features), device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=ADAPTER_DTYPE,
                                               device=device))  # (out, r)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.adapter_input(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def rank(self) -> int:
        return self.r
