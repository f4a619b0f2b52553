"""Mo-SARA's frozen factors U_k, V_k: one sign convention, and what a compact file keeps of them.

A singular vector is defined only up to sign, and the router reads z = x V_k, so a flipped
vector changes the model. `canonical` fixes the signs: each right singular vector v_i (a row of
Vh) is turned so that its projection on a fixed random direction r is positive, and u_i turns
with it (U diag(s) Vh is unchanged). Training and rebuilding both go through it, so the factors
do not depend on the sign pattern an eigensolver returns.

A compact adapter file stores, per module, instead of U_k (out, k) and V_k^T (k, in):
    fingerprint  R_out^T W R_in              (P, P) float64   which W the factors came from
    probe        U_k^T R_out, V_k^T R_in     (k, P) each      the factors themselves, in P numbers each
with R_out (out, P), R_in (in, P) fixed standard normal matrices (seeded, P = PROBE_SIZE). On load
U_k, V_k are decomposed again from the base's W (through the spectrum cache) and checked
against both; a mismatch is an error naming the module, never a silently different model.

Rebuilt vectors agree with the trained ones only where they are well defined: a near-tie
between two of s_1 .. s_{k+1} lets the eigensolver return any rotation of the tied pair, and a
projection v_i . r near zero leaves the sign to rounding. `stable` finds both at init; such a
module keeps its factors in the compact file.
"""

from __future__ import annotations

import torch

from sara_cli.errors import SaraError

PROBE_SIZE = 4  # P: random directions per side
PROBE_SEED = 2408_03290  # the paper's arXiv id; any fixed seed would do
# (s_i^2 - s_{i+1}^2) / s_1^2 below this: the pair's vectors are ill-defined. The Gram eigensolve
# moves a vector by about n eps / gap (gap relative to s_1^2): at 1e-6 and n = 11008, ~2e-6.
GAP_RTOL = 1e-6
# |v_i . r| below this (r ~ N(0, I), so v_i . r ~ N(0, 1)): the sign is left to rounding.
SIGN_ATOL = 1e-5
# Rebuilt against stored probe entries (each ~ N(0, 1)): float32 rounding moves them ~1e-6, a
# flipped or rotated vector by O(1).
PROBE_ATOL = 1e-4
FINGERPRINT_RTOL = 1e-6  # the same W: agreement to float32 rounding (merge reads the file as float32)


def directions(size: int, which: int) -> torch.Tensor:
    """R (size, PROBE_SIZE) float64, standard normal, fixed by (size, which); CPU."""
    generator = torch.Generator().manual_seed(PROBE_SEED + 7919 * which + size)
    return torch.randn(size, PROBE_SIZE, generator=generator, dtype=torch.float64)


def _sign_reference(in_features: int) -> torch.Tensor:
    return directions(in_features, 2)[:, 0]  # (in,)


def canonical(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, k), Vh (k, in) with each pair (u_i, v_i) turned so that v_i . r > 0 (float64)."""
    U, Vh = U.to(torch.float64), Vh.to(torch.float64)
    projection = Vh @ _sign_reference(Vh.shape[1]).to(Vh.device)  # (k,)
    signs = torch.where(projection < 0, -1.0, 1.0).to(torch.float64)
    return U * signs, Vh * signs[:, None]


def stable(spectrum: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """True when U_k, V_k are well enough defined to be rebuilt from W (see module docstring).

    Args:
        spectrum: all singular values, descending.
        factors: the canonical (U (out, k), Vh (k, in)).
    """
    U, Vh = factors
    k = Vh.shape[0]
    s = spectrum.detach().to("cpu", torch.float64)[: k + 1]
    if float(s[0]) <= 0.0:
        return False
    squares = s * s
    if k > 1 or s.numel() > k:
        gaps = squares[:-1] - squares[1:]  # (k,) or (k - 1,) where k = n
        if float(gaps.min()) < GAP_RTOL * float(squares[0]):
            return False
    projection = Vh.to(torch.float64) @ _sign_reference(Vh.shape[1]).to(Vh.device)
    return bool(projection.abs().min() >= SIGN_ATOL)


def probe(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U^T R_out (k, P), Vh R_in (k, P)), computed in float64, stored as float32 (CPU)."""
    U64, Vh64 = U.detach().to("cpu", torch.float64), Vh.detach().to("cpu", torch.float64)
    return ((U64.T @ directions(U64.shape[0], 0)).to(torch.float32),
            (Vh64 @ directions(Vh64.shape[1], 1)).to(torch.float32))


def fingerprint(W: torch.Tensor) -> torch.Tensor:
    """R_out^T W R_in (P, P) float64 on the CPU, for W (out, in)."""
    W64 = W.detach().to(torch.float64)
    R_out, R_in = directions(W64.shape[0], 0).to(W64.device), directions(W64.shape[1], 1).to(W64.device)
    return (R_out.T @ W64 @ R_in).cpu()


def rebuild(name: str, source, k: int, recorded_fingerprint: torch.Tensor, probe_U: torch.Tensor,
            probe_Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U_k (out, k), V_k^T (k, in), float64, decomposed again from `source`'s W and checked.

    Args:
        name: the module, for error messages.
        source: an initialize.MatrixSource over the base's W.
        recorded_fingerprint, probe_U, probe_Vh: as stored in the compact file.

    Raises:
        SaraError: W is not the one the adapter was trained on, or the rebuilt vectors do not
            match the probe (another decomposition, a damaged file).
    """
    fix = ("load it on the base it was trained on, or train with adapter.storage: full, which "
           "stores the vectors")
    now = fingerprint(source.weight())
    recorded = recorded_fingerprint.detach().to("cpu", torch.float64)
    scale = float(recorded.abs().max()) or 1.0
    if now.shape != recorded.shape or not bool(((now - recorded).abs() <= FINGERPRINT_RTOL * scale).all()):
        raise SaraError(f"{name}: the base weight is not the one this compact Mo-SARA adapter was "
                        f"trained on (its fingerprint differs), so U_k and V_k cannot be rebuilt; {fix}")
    top = source.top(k=k)
    U, Vh = canonical(top.U, top.Vh)
    got_U, got_Vh = probe(U.to(torch.float32), Vh.to(torch.float32))
    worst = max(float((got_U - probe_U.cpu()).abs().max()), float((got_Vh - probe_Vh.cpu()).abs().max()))
    if not worst <= PROBE_ATOL:  # also catches NaN
        raise SaraError(f"{name}: the singular vectors rebuilt from the base do not match this compact "
                        f"Mo-SARA adapter's probe (off by {worst:.2g}: another decomposition or a damaged "
                        f"file); {fix}")
    return U, Vh
