"""The discrete rules: channel selection (S1), rounding (Q1) and Neuron
Merging (N1-N2), each against its definition computed here, with the merge's
constant mismatch measured by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import vgg

from udfc_ref import compress
from udfc_ref.quantize import quantize
from udfc_ref.solve import neuron_merging

# ----------------------------------------------------------------- S1

# four filters of 2 x 3 x 3 = 18 weights whose L1 and L2 orders differ
FILTERS = np.zeros((4, 18))
FILTERS[0, :] = 0.1  # l1 1.8, l2 0.42
FILTERS[1, 0] = 1.0  # l1 1.0, l2 1.0
FILTERS[2, :4] = 0.35  # l1 1.4, l2 0.70
FILTERS[3, :9] = 0.25  # l1 2.25, l2 0.75
SIGMA = np.array([2.0, 0.5, 1.0, 3.0])
GAMMA = np.array([1.5, 3.0, 1.0, 0.7]) * SIGMA * np.array([1, -1, 1, 1])  # |gamma|/sigma = 1.5, 3, 1, 0.7


@pytest.mark.parametrize("criterion", ["l1", "l2", "l1-bn", "l2-bn"])
def test_s1_each_criterion_prunes_its_own_lowest_channel(criterion):
    """S1: ||W_i||_1 or ||W_i||_2, times |gamma_i| / sigma_i for the -bn
    criteria; the four criteria prune four different channels here."""
    m = vgg(0, channels=(2, 4, 4))
    m.tensors["c0.weight"] = FILTERS.reshape(4, 2, 3, 3).astype(np.float32)
    m.tensors["b0.weight"] = GAMMA.astype(np.float32)
    m.tensors["b0.running_var"] = (SIGMA**2 - 1e-5).astype(np.float32)
    norm = np.abs(FILTERS).sum(1) if criterion.startswith("l1") else np.sqrt((FILTERS**2).sum(1))
    if criterion.endswith("-bn"):
        norm = norm * np.abs(GAMMA) / SIGMA
    small, _ = compress(m, prune_ratio=0.25, criterion=criterion, skip=["c1"])
    pruned = set(range(4)) - set(small.record["layers"]["c0"]["kept"])
    assert pruned == {int(np.argmin(norm))}
    assert {"l1": 1, "l2": 0, "l1-bn": 2, "l2-bn": 3}[criterion] in pruned


# ----------------------------------------------------------------- Q1

@pytest.mark.parametrize("symmetric", [True, False])
def test_q1_rounds_half_to_even(symmetric):
    """Q1: codes are rint(x / s) + z with ties to even (scale exactly 1 here:
    max |x| = 7 on the 4-bit symmetric grid, range [0, 15] asymmetric)."""
    top = 7.0 if symmetric else 15.0
    w = np.array([[top, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]], np.float32)
    if symmetric:
        w = np.concatenate([w, -w])
    q = quantize(w, 4, symmetric=symmetric)
    assert np.all(q.scale == 1.0)
    expect = np.array([top, 0, 2, 2, 4, 4, 6, 6])
    if symmetric:
        expect = np.stack([expect, -expect])
    zp = 0 if q.zero_point is None else q.zero_point.astype(np.int64)[:, None]
    assert np.array_equal(q.codes.astype(np.int64) - zp, expect.reshape(q.codes.shape))


# ----------------------------------------------------------------- N1-N2

def _measured_mismatch(W, gamma, beta, mean, sigma, j, c, rng):
    """Simulate z = gamma (W x - mu) / sigma + beta for random inputs and return
    (S, the constant of z_j - S z_c in units of z_c), for W_j parallel to W_c."""
    x = rng.standard_normal((1000, W.shape[1]))
    z = gamma * (x @ W.T - mean) / sigma + beta
    S = np.std(z[:, j]) / np.std(z[:, c]) * np.sign(np.corrcoef(z[:, j], z[:, c])[0, 1])
    const = z[:, j] - S * z[:, c]
    assert np.ptp(const) <= 1e-9 * (1 + np.abs(const).max())  # z_j = S z_c + const exactly
    return S, abs(const.mean()) / S


def _bn(rng, n):
    return rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.5, 2, n)


def test_n2_merge_scale_and_constant_mismatch_by_simulation():
    """N2: for W_j = s W_c, z_j = S z_c + const with S = s gamma_j sigma_c /
    (gamma_c sigma_j); among equally similar candidates the partner is the one
    with the smallest |const| / S (the mismatch in units of z_c) -- here
    measured, and chosen differently than by the METHOD-NOTES expression."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(6)
    W = np.stack([base * 0.8, base * 1.7, base * 0.6, base * 1.2])  # channel 0 pruned; 1, 2, 3 all parallel
    gamma, beta, mean, sigma = _bn(rng, 4)
    beta[1:] = [2.0, -1.0, 0.3]
    kept = np.array([1, 2, 3])
    T, t = neuron_merging(W, gamma, beta, mean, sigma, kept)
    meas = [_measured_mismatch(W, gamma, beta, mean, sigma, 0, c, rng) for c in kept]
    best = int(np.argmin([b for _, b in meas]))
    assert np.flatnonzero(T[0]).tolist() == [best] and T[0, best] == pytest.approx(meas[best][0], rel=1e-9)
    assert np.all(t == 0) and np.array_equal(T[kept], np.eye(3))
    # the METHOD-NOTES expression |(g_c/s_c)(s (mu_j - s_j b_j / g_j) - mu_c) + b_c| / S ranks them otherwise
    s = np.linalg.norm(W[0]) / np.linalg.norm(W[kept], axis=1)
    S = s * gamma[0] * sigma[kept] / (gamma[kept] * sigma[0])
    notes = np.abs(gamma[kept] / sigma[kept] * (s * (mean[0] - sigma[0] * beta[0] / gamma[0]) - mean[kept])
                   + beta[kept]) / S
    assert int(np.argmin(notes)) != best


def _two_candidates(cos1, cos2, rng):
    """Pruned filter 0 and kept filters 1, 2 at the given cosine similarities."""
    e = np.linalg.qr(rng.standard_normal((8, 3)))[0].T
    return np.stack([e[0], cos1 * e[0] + np.sqrt(1 - cos1**2) * e[1], cos2 * e[0] + np.sqrt(1 - cos2**2) * e[2]])


@pytest.mark.parametrize("lam", [0.85, 0.3, 0.99])
def test_n1_partner_minimises_lambda_cosine_plus_normalised_mismatch(lam):
    """N1: score = lam (1 - cos) + (1 - lam) B_norm, B min-max normalised over
    the candidates; with two candidates B_norm is 0 for one and 1 for the
    other, so the choice flips at lam = 1 / (1 + (cos1 - cos2)) ..."""
    rng = np.random.default_rng(1)
    W = _two_candidates(0.95, 0.80, rng)
    gamma, beta, mean, sigma = np.ones(3), np.array([0.0, 3.0, 0.1]), np.zeros(3), np.ones(3)
    T, _ = neuron_merging(W, gamma, beta, mean, sigma, np.array([1, 2]), lam=lam)
    S = np.linalg.norm(W[0]) / np.linalg.norm(W[1:], axis=1)
    B = np.abs(beta[1:] - beta[0] / S)  # here b = beta (mu = 0, gamma = sigma = 1)
    score = lam * (1 - np.array([0.95, 0.80])) + (1 - lam) * (B - B.min()) / (B.max() - B.min())
    assert np.flatnonzero(T[0]).tolist() == [int(np.argmin(score))]
    assert {0.85: 1, 0.3: 1, 0.99: 0}[lam] == int(np.argmin(score))  # the three lam cover both choices


@pytest.mark.parametrize("cos,merged", [(0.09, False), (0.11, True), (-0.5, False)])
def test_n1_threshold_and_sign(cos, merged):
    """N1: no merge when the best cosine similarity is below t = 0.1, nor
    when S <= 0 (opposite BN signs)."""
    rng = np.random.default_rng(2)
    W = _two_candidates(cos, cos, rng)[:2]
    one = np.ones(2)
    T, _ = neuron_merging(W, one, np.zeros(2), np.zeros(2), one, np.array([1]))
    assert (T[0, 0] != 0) == merged
    T, _ = neuron_merging(W, np.array([1.0, -1.0]), np.zeros(2), np.zeros(2), one, np.array([1]))
    assert T[0, 0] == 0  # S < 0
