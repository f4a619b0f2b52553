"""The rank rule and the fast spectrum against numpy float64 SVD."""

import numpy as np
import pytest
import torch

from sara_cli.model.spectrum import (rank_for_tau, singular_values, top_singular,
                               top_singular_lowrank)


def numpy_rank(W: np.ndarray, tau: float) -> int:
    """Independent reference: LAPACK SVD in float64, then the rule with the documented tolerance."""
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    cumulative = np.cumsum(s)
    total = s.sum()
    return int(np.argmax(cumulative >= tau * total - 1e-7 * total)) + 1


def with_spectrum(s, out_features, in_features, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((out_features, out_features)))
    V, _ = np.linalg.qr(rng.standard_normal((in_features, in_features)))
    S = np.zeros((out_features, in_features))
    S[np.arange(len(s)), np.arange(len(s))] = s
    return U @ S @ V.T


def test_rule_on_hand_derived_spectra():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # total 10, partial sums 4, 7, 9, 10
    assert rank_for_tau(s, 0.4) == 1
    assert rank_for_tau(s, 0.41) == 2
    assert rank_for_tau(s, 0.7) == 2
    assert rank_for_tau(s, 0.71) == 3
    assert rank_for_tau(s, 1.0) == 4
    assert rank_for_tau(s, 1e-9) == 1


def test_rule_uses_plain_values_not_squares():
    s = torch.tensor([3.0, 1.0, 1.0, 1.0])
    # plain partial sums 3, 4 of 6 = 0.5, 0.667 -> k = 2 at tau 0.6;
    # squares would give 9 / 12 = 0.75 and k = 1
    assert rank_for_tau(s, 0.6) == 2


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_tau_out_of_range(tau):
    with pytest.raises(ValueError):
        rank_for_tau(torch.ones(3), tau)


CASES = {
    "gaussian-wide": lambda: np.random.default_rng(1).standard_normal((24, 40)),
    "gaussian-tall": lambda: np.random.default_rng(2).standard_normal((50, 20)),
    "ill-conditioned": lambda: with_spectrum(np.logspace(0, -12, 16), 16, 30),
    "low-rank": lambda: with_spectrum([5.0, 3.0, 1.0], 20, 30),
    "repeated": lambda: with_spectrum([2.0] * 4 + [1.0] * 4, 12, 12),
    "scaled-up": lambda: 1e4 * np.random.default_rng(3).standard_normal((32, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tau", [1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_fast_spectrum_gives_numpy_k(case, tau):
    W = CASES[case]()
    s = singular_values(torch.tensor(W, dtype=torch.float32))
    W32 = torch.tensor(W, dtype=torch.float32).double().numpy()  # what the model actually holds
    assert rank_for_tau(s, tau) == numpy_rank(W32, tau)


def test_exact_ties_and_low_rank_tau_one():
    assert rank_for_tau(singular_values(torch.tensor(CASES["repeated"]())), 0.5) == 3
    # 4 x 2 + 4 x 1 = 12: half is 6 = 2 + 2 + 2 -> k = 3 exactly, by rounding on neither side
    assert rank_for_tau(singular_values(torch.tensor(CASES["low-rank"]())), 1.0) == 3


def test_nan_is_rejected():
    W = torch.ones(4, 4)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        singular_values(W)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_top_k_vectors(shape):
    W = np.random.default_rng(4).standard_normal(shape)
    k = 5
    top = top_singular(torch.tensor(W), k=k)
    U, s, Vh = np.linalg.svd(W)
    np.testing.assert_allclose(top.s.numpy(), s[:k], rtol=1e-10)
    np.testing.assert_allclose(top.U.T.numpy() @ top.U.numpy(), np.eye(k), atol=1e-10)
    np.testing.assert_allclose(top.Vh.numpy() @ top.Vh.T.numpy(), np.eye(k), atol=1e-10)
    reference = (U[:, :k] * s[:k]) @ Vh[:k]
    approx = (top.U.numpy() * top.s.numpy()) @ top.Vh.numpy()
    np.testing.assert_allclose(approx, reference, atol=1e-9)


def test_top_k_by_tau_uses_the_rule():
    W = torch.tensor(CASES["gaussian-wide"]())
    top = top_singular(W, tau=0.5)
    assert top.U.shape[1] == numpy_rank(W.numpy(), 0.5)


def test_lowrank_route_is_accurate_when_the_top_is_separated():
    W = with_spectrum(np.concatenate([[100.0, 80.0, 60.0, 40.0], np.linspace(5, 0.1, 36)]), 60, 50)
    top = top_singular_lowrank(torch.tensor(W), k=4)
    U, s, Vh = np.linalg.svd(W)
    np.testing.assert_allclose(top.s.numpy(), s[:4], rtol=1e-10)
    reference = (U[:, :4] * s[:4]) @ Vh[:4]
    approx = (top.U.numpy() * top.s.numpy()) @ top.Vh.numpy()
    # 4 power steps with a gap of 8x after the top 4: the subspace error is ~(5/40)^9
    assert np.linalg.norm(approx - reference) / np.linalg.norm(reference) < 1e-6


@pytest.mark.parametrize("size,rank", [(512, 16), (1024, 64)])
def test_tau_one_gives_numerical_rank_of_large_low_rank_matrices(size, rank):
    rng = np.random.default_rng(size)
    W = rng.standard_normal((size, rank)) @ rng.standard_normal((rank, size))
    s = singular_values(torch.tensor(W))
    assert rank_for_tau(s, 1.0) == numpy_rank(W, 1.0) == rank


def test_top_k_beyond_the_rank_still_rebuilds_the_top_part():
    rng = np.random.default_rng(5)
    for _ in range(20):
        W = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10))
        top = top_singular(torch.tensor(W), k=6)
        approx = (top.U.numpy() * top.s.numpy()) @ top.Vh.numpy()
        np.testing.assert_allclose(approx, W, atol=1e-8)
        np.testing.assert_allclose(top.U.T.numpy() @ top.U.numpy(), np.eye(6), atol=1e-8)
