"""SORSA (Cao, arXiv 2409.00055): principal singular factors trained with an orthonormal regulariser.

    top r of W = U diag(s) V^T:  U_p = U_r (out, r),  s_p = s_r (r),  Vh_p = V_r^T (r, in)
    W_res = W - U_p diag(s_p) Vh_p (frozen);  y = x W_res^T + b + ((dropout(x) Vh_p^T) * s_p) U_p^T
    per layer:  R = ||U_p^T U_p - I||_F + ||Vh_p Vh_p^T - I||_F

The trainer applies the regulariser (train.SorsaCallback, docs/methods.md section 3.3) in one of two
ways. `reference`, as the SORSA code does: after gradient clipping and before the optimizer step,
add the gradient of (gamma / lr_peak) * L_reg, with L_reg the mean of the 2L norms over all L
layers, so it goes through AdamW (`add_orthonormal_gradient`). `decoupled`: after the optimizer
step, a plain step W_p <- W_p - gamma * grad R per layer (`orthonormal_step`). The gradient is
analytic: for M = U^T U - I, d||M||_F / dU = 2 U M / ||M||_F (and 2 M Vh / ||M||_F for Vh).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sara_cli.adapters.base import ADAPTER_DTYPE, AdapterLayer


class SorsaLayer(AdapterLayer):
    prefix = "sorsa_"
    reads_weight = True

    def __init__(self, base_layer: nn.Module, rank: int, dropout: float = 0.0,
                 initialize: bool = True, svd: str = "full", source=None):
        super().__init__(base_layer, dropout)
        self.r = rank = min(rank, self.in_features, self.out_features)
        device = base_layer.weight.device
        U = torch.zeros(self.out_features, rank, dtype=ADAPTER_DTYPE, device=device)
        S = torch.zeros(rank, dtype=ADAPTER_DTYPE, device=device)
        Vh = torch.zeros(rank, self.in_features, dtype=ADAPTER_DTYPE, device=device)
        if initialize:
            source = self.weight_source(source)
            top = source.principal(rank, svd)  # 'full' (exact, the reference's) or 'lowrank'
            U, S, Vh = (t.to(device, ADAPTER_DTYPE) for t in (top.U, top.s, top.Vh))
        self.sorsa_U = nn.Parameter(U.clone())  # (out, r)
        self.sorsa_S = nn.Parameter(S.clone())  # (r,)
        self.sorsa_Vh = nn.Parameter(Vh.clone())  # (r, in)
        self.register_buffer("sorsa_U0", U.clone())
        self.register_buffer("sorsa_S0", S.clone())
        self.register_buffer("sorsa_Vh0", Vh.clone())
        if initialize:
            self._subtract_initial(source.weight())  # from the full-precision W

    def _initial_product(self) -> torch.Tensor:
        return (self.sorsa_U0.double() * self.sorsa_S0.double()) @ self.sorsa_Vh0.double()

    @torch.no_grad()
    def _subtract_initial(self, W: torch.Tensor) -> None:
        self.set_residual(W, self._initial_product())  # W_res = W - U0 diag(S0) Vh0

    def after_load(self, original_weight: torch.Tensor | None = None) -> None:
        self._subtract_initial(self.base_weight() if original_weight is None else original_weight)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.adapter_input(x), self.sorsa_Vh)  # (..., r)
        return F.linear(z * self.sorsa_S, self.sorsa_U)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.sorsa_U * self.sorsa_S) @ self.sorsa_Vh

    @torch.no_grad()
    def orthonormal_gradients(self) -> list[tuple[nn.Parameter, torch.Tensor, float]]:
        """(parameter, gradient of its ||M||_F, ||M||_F) for U (out, r) and Vh (r, in).

        ||M||_F is not differentiable at M = 0; a factor with ||M||_F < 1e-12 gets a zero gradient
        (what autograd gives for torch.norm at 0, as in the SORSA code).
        """
        eye = torch.eye(self.r, dtype=self.sorsa_U.dtype, device=self.sorsa_U.device)
        result = []
        for param, left in ((self.sorsa_U, True), (self.sorsa_Vh, False)):
            M = param.T @ param - eye if left else param @ param.T - eye  # (r, r), symmetric
            norm = float(torch.linalg.matrix_norm(M))
            if norm < 1e-12:
                grad = torch.zeros_like(param)
            else:
                grad = 2.0 * (param @ M if left else M @ param) / norm
            result.append((param, grad, norm))
        return result

    @torch.no_grad()
    def orthonormal_step(self, gamma: float) -> None:
        """The decoupled rule: one plain gradient step of size gamma on this layer's R."""
        for param, grad, _ in self.orthonormal_gradients():
            param.sub_(gamma * grad)

    @torch.no_grad()
    def add_orthonormal_gradient(self, scale: float) -> float:
        """The reference rule: add scale * grad R to U.grad and Vh.grad. Returns R (the two norms)."""
        total = 0.0
        for param, grad, norm in self.orthonormal_gradients():
            if param.grad is None:
                param.grad = scale * grad
            else:
                param.grad.add_(grad.to(param.grad.dtype), alpha=scale)
            total += norm
        return total

    def rank(self) -> int:
        return self.r
