"""Mo-SARA (Gu et al., arXiv 2408.03290): a mixture of singular-value sets over frozen top-k vectors.

With U_k (out, k) and V_k (in, k) the top-k singular vectors of W (frozen), k = k(W, tau):

    z    = dropout(x) V_k                    # (..., k)
    g    = softmax((z W_g1) W_g2, dim=-1)    # (..., m) token-level soft routing
    lbar = g Lam                             # (..., k)
    y    = x W^T + b + ((z * lbar) U_k^T) * v

Trainable: Lam (m, k), v (out, zeros), W_g1 (k, 1), W_g2 (1, m). This equals the paper's
sum_i g_i (x U_k Lam_i V_k v) (its x W convention) without a loop over experts: the cost is one
pair of rank-k products whatever m is. `v_position="before"` puts v (in) in front:
y = x W^T + b + (((dropout(x) * v) V_k) * lbar) U_k^T, with the router still reading z.

Lam starts at ones plus uniform noise in [-0.1, 0.1) so the experts differ and the router has a
gradient; v = 0 keeps the model unchanged at init. W_g1 and W_g2 start as nn.Linear(k, 1) and
nn.Linear(1, m) weights would (Kaiming uniform with fan-ins k and 1; no biases).

U_k and V_k are frozen and follow from W, so a compact adapter file (`storage: compact`) leaves
them out and they are rebuilt on load (`frozen.py`: canonical signs, the probe and the checks).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from sara_cli.adapters import frozen
from sara_cli.adapters.base import ADAPTER_DTYPE, AdapterLayer, kaiming_uniform


class MoSaraLayer(AdapterLayer):
    prefix = "mosara_"
    reads_weight = True

    def __init__(self, base_layer: nn.Module, tau: float | None = None, rank: int | None = None,
                 num_experts: int = 5, dropout: float = 0.0, v_position: str = "after",
                 initialize: bool = True, source=None):
        super().__init__(base_layer, dropout)
        if v_position not in ("after", "before"):
            raise ValueError(f"v_position must be after or before, got {v_position!r}")
        device = base_layer.weight.device
        # rebuildable: a compact file may leave U_k, V_k out (False after loading them from a file
        # that holds them, or when the spectrum makes the vectors ill-defined: frozen.stable)
        self.rebuildable = initialize
        if initialize:
            source = self.weight_source(source)
            top = source.top(k=rank, tau=tau if rank is None else None)
            factors = frozen.canonical(top.U, top.Vh)
            self.rebuildable = frozen.stable(top.spectrum, factors)
            U, Vh = (t.to(device, ADAPTER_DTYPE) for t in factors)
            fingerprint = frozen.fingerprint(source.weight())
        else:
            U = torch.zeros(self.out_features, rank, dtype=ADAPTER_DTYPE, device=device)
            Vh = torch.zeros(rank, self.in_features, dtype=ADAPTER_DTYPE, device=device)
            fingerprint = torch.zeros(frozen.PROBE_SIZE, frozen.PROBE_SIZE, dtype=torch.float64)
        self.k = k = U.shape[1]
        self.num_experts = m = num_experts
        self.v_position = v_position
        self.register_buffer("mosara_U", U.contiguous())  # (out, k), frozen
        self.register_buffer("mosara_Vh", Vh.contiguous())  # (k, in), frozen: V_k^T
        # What a compact file keeps of them: W's fingerprint (P, P) and U_k, V_k's probe (k, P) each
        probe_U, probe_Vh = frozen.probe(U, Vh)
        self.register_buffer("mosara_fingerprint", fingerprint.to(device))
        self.register_buffer("mosara_probe_U", probe_U.to(device))
        self.register_buffer("mosara_probe_Vh", probe_Vh.to(device))
        noise = torch.rand(m, k, dtype=ADAPTER_DTYPE, device=device) * 0.2 - 0.1
        self.mosara_lambda = nn.Parameter(1.0 + noise)  # (m, k)
        v_size = self.out_features if v_position == "after" else self.in_features
        self.mosara_v = nn.Parameter(torch.zeros(v_size, dtype=ADAPTER_DTYPE, device=device))
        # The paper's two one-dimensional linear layers, nn.Linear(k, 1) and nn.Linear(1, m), stored
        # as their transposes: each keeps its layer's fan-in (k, then 1), so bounds 1/sqrt(k) and 1.
        self.mosara_router_in = nn.Parameter(kaiming_uniform((k, 1), device, fan_in=k))  # W_g1 (k, 1)
        self.mosara_router_out = nn.Parameter(kaiming_uniform((1, m), device, fan_in=1))  # W_g2 (1, m)
        self.record_gates = False
        self.recorded_gates: list[torch.Tensor] = []
        self._inference: tuple | None = None  # (key, W_g1 W_g2) for the inference path, see below

    def gates(self, z: torch.Tensor) -> torch.Tensor:
        """Routing weights g (..., m) for projected input z (..., k); rows sum to 1."""
        logits = (z @ self.mosara_router_in) @ self.mosara_router_out  # (..., 1) -> (..., m)
        return torch.softmax(logits, dim=-1)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.adapter_input(x)  # (..., in)
        z = F.linear(h, self.mosara_Vh)  # (..., k)
        g = self.gates(z)  # (..., m)
        if self.record_gates:
            self.recorded_gates.append(g.detach().to(torch.float32).cpu())
        lbar = g @ self.mosara_lambda  # (..., k)
        if self.v_position == "after":
            return F.linear(z * lbar, self.mosara_U) * self.mosara_v  # (..., out)
        zv = F.linear(h * self.mosara_v, self.mosara_Vh)  # (..., k)
        return F.linear(zv * lbar, self.mosara_U)

    # -- inference without autograd: the same function in fewer operations ------------------------

    fast_inference = True  # class-wide switch: bench/routed_inference.py times both paths

    def _router(self) -> torch.Tensor:
        """W_g1 W_g2 (k, m), multiplied out once and rebuilt when either factor changes.

        A change is seen through the tensors' version counters (every in-place write, an
        optimizer step or a load, bumps them) and identities (a tensor replaced outright).
        """
        router_in, router_out = self._parameters["mosara_router_in"], self._parameters["mosara_router_out"]
        key = (router_in, router_in._version, router_out, router_out._version)
        cached = self._inference
        if cached is None or any(a is not b if isinstance(a, torch.Tensor) else a != b
                                 for a, b in zip(cached[0], key)):
            self._inference = cached = (key, (router_in @ router_out).detach())
        return cached[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Inference (eval mode, no autograd, no gate recording, v after) takes a shorter path to
        the same function: no dropout or gate bookkeeping, and the router's two one-dimensional
        layers as one (k, m) product of the z the branch computes. Everything else: the contract's."""
        if (args or kwargs or not self.fast_inference or self.training or torch.is_grad_enabled()
                or self.record_gates or self.merged or self.v_position != "after"):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)  # (..., out)
        z = F.linear(x.to(ADAPTER_DTYPE), self._buffers["mosara_Vh"])  # (..., k)
        lbar = torch.softmax(z @ self._router(), dim=-1) @ self._parameters["mosara_lambda"]  # (..., k)
        branch = F.linear(z * lbar, self._buffers["mosara_U"]) * self._parameters["mosara_v"]  # (..., out)
        return result + branch.to(result.dtype)

    def static_delta_weight(self, mean_gate: torch.Tensor) -> torch.Tensor:
        """delta W for fixed gates gbar (m,): diag(v) U_k diag(gbar Lam) V_k^T, (out, in) float32.

        Exact for the routed layer only when every token's gate equals gbar.
        """
        lbar = mean_gate.to(self.mosara_lambda) @ self.mosara_lambda  # (k,)
        core = (self.mosara_U * lbar) @ self.mosara_Vh  # (out, in)
        if self.v_position == "after":
            return self.mosara_v[:, None] * core
        return core * self.mosara_v[None, :]

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(
            "Mo-SARA routes every token separately, so no single weight matrix reproduces it; "
            "use static_delta_weight(mean_gate)")

    def merge(self) -> None:
        self.delta_weight()

    def rank(self) -> int:
        return self.k

    def restore_frozen(self, name: str, source, saved: set[str]) -> None:
        if "mosara_U" in saved:
            self.rebuildable = False  # a full file, or a module the compact file kept
        elif not self.base_layer.weight.is_meta:  # on meta, rank 0's tensors arrive later
            self.rebuild(name, self.weight_source(source))

    @torch.no_grad()
    def rebuild(self, name: str, source) -> None:
        """Rebuild U_k, V_k from W (a compact file left them out) and check them against the
        loaded fingerprint and probe.

        Raises:
            SaraError: W or the rebuilt vectors differ from those the adapter was trained with.
        """
        U, Vh = frozen.rebuild(name, source, self.k, self.mosara_fingerprint, self.mosara_probe_U,
                               self.mosara_probe_Vh)
        self.mosara_U.copy_(U.to(self.mosara_U.device, ADAPTER_DTYPE))
        self.mosara_Vh.copy_(Vh.to(self.mosara_Vh.device, ADAPTER_DTYPE))
        self.rebuildable = True
