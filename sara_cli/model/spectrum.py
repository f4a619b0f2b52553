"""Singular values, the SARA rank rule, and top-k singular vectors.

The naive route, ``torch.linalg.svdvals``, runs a full SVD of every (out, in) matrix. We only
need the singular values (analyze, SARA) or the top-k vectors (PiSSA, SORSA, Mo-SARA), so we
take the eigen-decomposition of the Gram matrix of the smaller side instead:

    n = min(out, in),  G = W W^T (out <= in) or W^T W (otherwise),  G: (n, n)
    eig(G) = s^2  ->  s = sqrt(max(eig, 0)), sorted descending

in float64. That is one n^3 symmetric eigensolve instead of an SVD, about ten times faster on
a GPU. Squaring doubles the condition number, so singular values below ~1e-8 * s_max come back
as noise of that size; the rank rule below is written so that noise cannot move k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative tolerance of the rank rule. Two spectra of the same matrix computed by different
# routes (Gram eigenvalues here, LAPACK SVD in the tests) agree to ~1e-10 in their partial
# sums; an exact tie such as 4 equal singular values at tau 0.5 would otherwise fall on either
# side of the threshold by rounding alone.
RANK_RTOL = 1e-7


def check_tau(tau: float) -> None:
    """Raise ValueError unless 0 < tau <= 1."""
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau}")


def rank_for_tau(s: torch.Tensor, tau: float) -> int:
    """The SARA rank rule: the smallest k with sum_{i<=k} s_i >= tau * sum_i s_i.

    Args:
        s: singular values, (n,), sorted descending, non-negative.
        tau: share of the total, in (0, 1].

    Returns:
        k with 1 <= k <= n. Partial sums within RANK_RTOL of the threshold count as reaching
        it, so exact ties resolve to the smaller k and numerically-zero tails are never needed
        (tau = 1 gives the numerical rank).
    """
    check_tau(tau)
    s = s.detach().to(torch.float64).cpu()
    total = float(s.sum())
    if total <= 0.0:
        return 1
    cumulative = torch.cumsum(s, dim=0)
    threshold = tau * total - RANK_RTOL * total
    k = int(torch.searchsorted(cumulative, torch.tensor([threshold], dtype=torch.float64))[0]) + 1
    return max(1, min(k, s.numel()))


def ranks_for_taus(s: torch.Tensor, taus: list[float]) -> list[int]:
    """`rank_for_tau` for several tau values over one spectrum."""
    return [rank_for_tau(s, tau) for tau in taus]


def _gram(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the smaller side in float64, and whether it is the left (W W^T) one."""
    W64 = W.to(torch.float64)
    out_features, in_features = W64.shape
    if out_features <= in_features:
        return W64 @ W64.T, True  # (out, out)
    return W64.T @ W64, False  # (in, in)


def _check_finite(W: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _drop_noise(s: torch.Tensor, n: int) -> torch.Tensor:
    """Zero the values below the Gram route's noise floor.

    A backward-stable eigensolver returns the eigenvalues of G = W W^T with errors up to
    ~n eps ||G||, i.e. singular values of W down to ~sqrt(n eps) s_max are noise. Left in, a
    few hundred such values add up and move k at tau = 1 on exactly low-rank matrices.
    """
    floor = float(s[0]) * 4.0 * (n * torch.finfo(torch.float64).eps) ** 0.5 if s.numel() else 0.0
    return torch.where(s > floor, s, torch.zeros_like(s))


def singular_values(W: torch.Tensor, name: str = "matrix") -> torch.Tensor:
    """All min(out, in) singular values of W, descending, float64, on W's device.

    Args:
        W: (out, in) weight, any float dtype, any device.
        name: used in the error message.

    Raises:
        ValueError: W holds NaN or inf.
    """
    W = W.detach()
    _check_finite(W, name)
    G, _ = _gram(W)
    eig = torch.linalg.eigvalsh(G)  # ascending
    return _drop_noise(eig.clamp_min(0.0).sqrt().flip(0), G.shape[0])


@dataclass
class TopK:
    """Top-k part of an SVD, W ~= U diag(s) Vh.

    Shapes: U (out, k), s (k,), Vh (k, in); float64 on W's device. `spectrum` holds all
    min(out, in) singular values (descending), so callers can pick k from it.
    """

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    spectrum: torch.Tensor


def top_singular(W: torch.Tensor, k: int | None = None, tau: float | None = None,
                 name: str = "matrix") -> TopK:
    """Top singular triplets of W from one Gram eigen-decomposition.

    Exactly one of k and tau is given; with tau, k is `rank_for_tau(spectrum, tau)`. Only one
    decomposition is made either way.

    The eigenvectors of the smaller side are exact to float64 rounding; the other side is
    W^T u_i / s_i (or W v_i / s_i), which is accurate while s_i is well above the noise
    floor ~1e-8 s_max. Directions of a numerically-zero s_i are completed to an orthonormal
    set, so U and Vh always have orthonormal columns/rows.
    """
    if (k is None) == (tau is None):
        raise ValueError("give exactly one of k and tau")
    W = W.detach()
    _check_finite(W, name)
    W64 = W.to(torch.float64)
    G, left = _gram(W64)
    eig, vecs = torch.linalg.eigh(G)  # ascending
    spectrum = _drop_noise(eig.clamp_min(0.0).sqrt().flip(0), G.shape[0])
    vecs = vecs.flip(1)
    if k is None:
        k = rank_for_tau(spectrum, tau)
    k = max(1, min(k, spectrum.numel()))
    s = spectrum[:k]
    small = vecs[:, :k]  # (n, k) singular vectors of the smaller side
    other = (W64.T @ small if left else W64 @ small)  # (other_dim, k)
    floor = spectrum[0] * 1e-10 if spectrum[0] > 0 else torch.tensor(1.0, dtype=torch.float64)
    safe = s.clamp_min(float(floor))
    other = other / safe
    if bool((s <= floor).any()):
        # Null directions: re-orthonormalise so the factors stay a valid frame.
        # Keep each column's sign (QR may flip it), so U diag(s) Vh still rebuilds W's top part.
        other, R = torch.linalg.qr(other)
        other = other * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0,
                                                              torch.ones_like(torch.diagonal(R)))
    if left:
        return TopK(U=small, s=s, Vh=other.T.contiguous(), spectrum=spectrum)
    return TopK(U=other, s=s, Vh=small.T.contiguous(), spectrum=spectrum)


def top_singular_lowrank(W: torch.Tensor, k: int, niter: int = 4, oversample: int = 8,
                         seed: int = 0) -> TopK:
    """Top-k triplets by randomized subspace iteration (`torch.svd_lowrank`), for k << min(out, in).

    Runs in float32 (float64 on the CPU) with a fixed seed so PiSSA/SORSA init is reproducible.
    `spectrum` holds only the k values found.
    """
    W = W.detach()
    _check_finite(W, "matrix")
    dtype = torch.float32 if W.is_cuda else torch.float64
    A = W.to(dtype)
    q = min(k + oversample, min(A.shape))
    devices = [A.device] if A.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, s, V = torch.svd_lowrank(A, q=q, niter=niter)
    U, s, Vh = U[:, :k], s[:k], V[:, :k].T
    return TopK(U=U.to(torch.float64), s=s.to(torch.float64), Vh=Vh.to(torch.float64).contiguous(),
                spectrum=s.to(torch.float64))
