"""The covariance channel selection (derivation Eq. S4) against the
written-out least-squares objective and an exact duplicate channel."""

from __future__ import annotations

import numpy as np

import udfc_ref
from udfc_ref.covselect import select_by_covariance

from helpers import vgg


def _residual(cov, w, kept):
    """sum_i w_i Var(a_i | a_K) by least squares (the objective of Eq. S4)."""
    kept = list(kept)
    ckk = cov[np.ix_(kept, kept)]
    cik = cov[:, kept]
    resid = np.diag(cov) - np.einsum("ik,ik->i", cik @ np.linalg.pinv(ckk), cik)
    return float(w @ np.clip(resid, 0, None))


def test_covariance_selection_is_the_greedy_minimiser():
    """Eq. S4: each greedy step takes the channel whose addition lowers
    sum_i w_i Var(a_i | a_K) most (checked against the least-squares
    objective of every candidate), and an exact linear dependency is found."""
    rng = np.random.default_rng(6)
    n = 7
    a = rng.standard_normal((n, n))
    cov = a @ a.T
    w = rng.uniform(0.5, 2, n)
    kept = select_by_covariance(cov, w, 3 / 7, np.ones(n))
    assert kept.size == 4
    # replay the greedy with the written-out objective
    chosen = []
    for _ in range(4):
        best = min((j for j in range(n) if j not in chosen), key=lambda j: _residual(cov, w, chosen + [j]))
        chosen.append(best)
    assert sorted(chosen) == list(kept)
    # channels 4..6 are combinations of 0..2: keeping 0..2 (or any 3 spanning) leaves no residual
    base = rng.standard_normal((3, 200))
    feats = np.vstack([base, rng.standard_normal((3, 3)) @ base])
    c2 = np.cov(feats)
    k2 = select_by_covariance(c2, np.ones(6), 0.5, np.ones(6))
    assert _residual(c2, np.ones(6), k2) < 1e-9 * np.trace(c2)


def test_covariance_selection_rules():
    """Dead channels go first, min_keep and ratio 0 as Eq. S1; exhausted
    residual variance fills by score."""
    cov = np.diag([1.0, 2.0, 0.0, 3.0])
    gamma = np.array([1.0, 1.0, 0.0, 1.0])
    assert list(select_by_covariance(cov, np.ones(4), 0.25, np.arange(4.0), gamma=gamma)) == [0, 1, 3]
    assert list(select_by_covariance(cov, np.ones(4), 0.0, np.arange(4.0))) == [0, 1, 2, 3]
    assert list(select_by_covariance(cov, np.ones(4), 0.9, np.arange(4.0), min_keep=2)) == [1, 3]
    rank1 = np.ones((3, 3))
    assert list(select_by_covariance(rank1, np.ones(3), 1 / 3, np.array([5.0, 1.0, 3.0]))) in ([0, 2], [0, 1],
                                                                                              [1, 2])
    k = select_by_covariance(rank1, np.ones(3), 1 / 3, np.array([5.0, 1.0, 3.0]))
    assert 1 not in k or 0 not in k  # the first greedy pick, then the best score


def test_cov_criterion_keeps_one_of_two_duplicate_channels_and_is_exact():
    """Data-free: a channel duplicating another (filter and BN) is pruned by
    Eq. S4 under the data model's covariance and rebuilt exactly."""
    model = vgg(seed=8)
    for t in ("c0.weight", "b0.weight", "b0.bias", "b0.running_mean", "b0.running_var"):
        v = model.tensors[t].copy()
        v[2] = v[6]
        model.tensors[t] = v
    skip = [n.name for n in model.nodes if n.op in ("conv2d", "linear") and n.name != "c0"]
    small, _ = udfc_ref.compress(model, prune_ratio=1 / 8, criterion="cov", alpha1=0.0, alpha2=0.0, skip=skip)
    kept = small.record["layers"]["c0"]["kept"]
    assert set(range(8)) - set(kept) in ({2}, {6})
    x = np.random.default_rng(1).standard_normal((6,) + model.input_shape).astype(np.float32)
    np.testing.assert_allclose(small.forward(x), model.forward(x), rtol=1e-4, atol=1e-4)
