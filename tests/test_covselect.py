"""The covariance channel selection (derivation Eq. S4) against the
written-out least-squares objective and an exact duplicate channel."""

from __future__ import annotations

import numpy as np

import udfc_ref
from udfc_ref.covselect import select_by_covariance, select_by_output

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


def _s5_problem(seed, n=6, r=4, o=5, s=400):
    """Rows u (S, n*r) of n channel blocks, channels 3 and 4 near-copies of 0
    and 1, and a consumer output z that reads all of them."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((s, n * r)) @ np.diag(rng.uniform(0.5, 2, n * r))
    u[:, 3 * r:4 * r] = u[:, 0:r] + 0.1 * rng.standard_normal((s, r))
    u[:, 4 * r:5 * r] = u[:, r:2 * r] + 0.3 * rng.standard_normal((s, r))
    z = u @ rng.standard_normal((n * r, o)) + 0.5 * rng.standard_normal((s, o)) + 3.0
    return u, z


def _moments(u, z):
    uc, zc = u - u.mean(0), z - z.mean(0)
    return uc.T @ uc / len(u), uc.T @ zc / len(u)


def test_output_selection_is_the_backward_elimination_of_the_ridge_least_squares():
    """Eq. S5's elimination (``exact=False``, and what runs when the exact
    search is too large) against its written-out objective (tests/mathref.py:
    np.linalg.lstsq on ridge-augmented rows, each candidate refitted from
    scratch): the same channels are kept at every count, for ridges of 0,
    1e-3 and 0.3 (a large ridge changes the choice); the two channels dropped
    at 4 of 6 are one of each near-copy pair."""
    from mathref import backward_elimination

    u, z = _s5_problem(3)
    cuu, cuz = _moments(u, z)
    for ridge in (0.0, 1e-3):
        for n_keep in (5, 4, 3, 1):
            got = select_by_output(cuu, cuz, 6, n_keep, ridge, exact=False)
            assert list(got) == backward_elimination(u, z, 6, n_keep, ridge), (ridge, n_keep)
    kept = set(select_by_output(cuu, cuz, 6, 4, 1e-3, exact=False))  # one of each near-copy pair goes
    assert {2, 5} <= kept and len(kept & {0, 3}) == 1 and len(kept & {1, 4}) == 1
    # many steps on correlated channels: every downdate of P and B is used by a later step
    rng = np.random.default_rng(8)
    n, r = 12, 3
    mix = rng.standard_normal((n * r, n * r)) * (rng.random((n * r, n * r)) < 0.3)
    u = rng.standard_normal((300, n * r)) @ (np.eye(n * r) + mix)
    z = u @ rng.standard_normal((n * r, 4)) * rng.uniform(0, 2, 4) + rng.standard_normal((300, 4))
    cuu, cuz = _moments(u, z)
    chosen = {}
    for ridge in (0.0, 0.3):
        for n_keep in (9, 5, 2):
            got = list(select_by_output(cuu, cuz, n, n_keep, ridge, exact=False))
            assert got == backward_elimination(u, z, n, n_keep, ridge), (ridge, n_keep)
            chosen[ridge, n_keep] = got
    assert any(chosen[0.0, k] != chosen[0.3, k] for k in (9, 5, 2))


def test_output_selection_ignores_padding_columns_and_prunes_dead_channels_first():
    """A column with no variance (a kernel position that only reads padding)
    neither breaks the solve nor changes the choice -- also when it belongs
    to a channel that goes; a dead channel (|gamma| <= 1e-12, the bound
    included) is pruned before any live one, and fills the set by its S1
    score (by index without scores) only when too few channels are alive.
    Both searches: the elimination against tests/mathref.py's replay of it,
    the exact one against its brute force."""
    from mathref import backward_elimination, best_subset

    from udfc_ref.select import DEAD_GAMMA

    u, z = _s5_problem(4)
    first_out = (set(range(6)) - set(backward_elimination(u, z, 6, 5, 1e-3))).pop()
    for exact, ref in ((False, backward_elimination), (True, best_subset)):
        for ch in (2, first_out):  # a padding column in a kept channel, and in the first channel to go
            up = u.copy()
            up[:, ch * 4 + 1] = 0.0
            cuu, cuz = _moments(up, z)
            got = select_by_output(cuu, cuz, 6, 3, 1e-3, exact=exact)
            assert list(got) == ref(up, z, 6, 3, 1e-3), (exact, ch)
        cuu, cuz = _moments(u, z)
        gamma = np.ones(6)
        gamma[2], gamma[5] = 0.0, DEAD_GAMMA
        got = select_by_output(cuu, cuz, 6, 3, 1e-3, gamma=gamma, exact=exact)
        assert list(got) == ref(u, z, 6, 3, 1e-3, alive=[0, 1, 3, 4]), exact
        scores = np.array([1.0, 1, 1, 1, 1, 2])  # the dead channel 5 scores above the dead channel 2
        gamma[[0, 1, 3]] = 0.0
        assert list(select_by_output(cuu, cuz, 6, 2, 1e-3, gamma=gamma, scores=scores, exact=exact)) == [4, 5]
        assert list(select_by_output(cuu, cuz, 6, 2, 1e-3, gamma=gamma, exact=exact)) == [0, 4]  # by index


def test_output_selection_rejects_columns_that_are_not_channel_blocks():
    import pytest

    cuu, cuz = _moments(*_s5_problem(5))
    with pytest.raises(ValueError, match="not 5 channel blocks"):
        select_by_output(cuu, cuz, 5, 2, 1e-3)


def test_output_selection_drops_an_exact_duplicate_first_without_ridge():
    """Exactly collinear blocks (channel 4 a copy of channel 1) and ridge 0:
    Cov(u) is singular, the selection still runs and the first channel it
    drops is one of the two copies (the other carries all they share); the
    exact search (singular A_KK for every set holding both) keeps one too."""
    u, z = _s5_problem(6)
    u[:, 16:20] = u[:, 4:8]
    cuu, cuz = _moments(u, z)
    assert np.linalg.matrix_rank(cuu) < cuu.shape[0]
    for exact in (False, True):
        kept = set(select_by_output(cuu, cuz, 6, 5, 0.0, exact=exact))
        assert len(kept) == 5 and len(kept & {1, 4}) == 1, exact


def test_output_selection_is_the_exact_minimiser_when_small():
    """Eq. S5 searched exactly: the kept set equals the brute force of
    tests/mathref.py (every set refitted by np.linalg.lstsq on ridge-augmented
    rows) at every count and ridge, on problems where the elimination misses
    it in some cases (so the test tells the two apart); at the limits
    (``EXACT_SUBSETS``, ``EXACT_WORK``) it falls back to the elimination."""
    from mathref import backward_elimination, best_subset

    import udfc_ref.covselect as cs

    differs = 0
    for seed in (3, 8):
        if seed == 3:
            u, z = _s5_problem(3)
            n = 6
        else:
            rng = np.random.default_rng(seed)
            n, r = 9, 2
            mix = rng.standard_normal((n * r, n * r)) * (rng.random((n * r, n * r)) < 0.3)
            u = rng.standard_normal((300, n * r)) @ (np.eye(n * r) + mix)
            z = u @ rng.standard_normal((n * r, 4)) * rng.uniform(0, 2, 4) + rng.standard_normal((300, 4))
        cuu, cuz = _moments(u, z)
        for ridge in (0.0, 1e-3, 0.3):
            for n_keep in range(1, n):
                got = list(select_by_output(cuu, cuz, n, n_keep, ridge))
                assert got == best_subset(u, z, n, n_keep, ridge), (seed, ridge, n_keep)
                differs += got != backward_elimination(u, z, n, n_keep, ridge)
    assert differs >= 2
    A, C = cs._regularised(cuu, cuz, 1e-3)  # the seed-8 problem, factored 5 sets at a time
    assert list(cs._exact_subset(A, C, np.arange(9), 4, 2, chunk=5)) == best_subset(u, z, 9, 4, 1e-3)
    u, z = _s5_problem(3)
    cuu, cuz = _moments(u, z)
    greedy = list(select_by_output(cuu, cuz, 6, 1, 0.0, exact=False))
    assert list(select_by_output(cuu, cuz, 6, 1, 0.0)) != greedy  # this case tells them apart
    saved = cs.EXACT_SUBSETS, cs.EXACT_WORK, cs.EXACT_CHUNK
    try:
        cs.EXACT_CHUNK = 16  # fewer entries than one 8 x 8 set: the sets are factored one at a time
        assert list(select_by_output(cuu, cuz, 6, 2, 1e-3)) == best_subset(u, z, 6, 2, 1e-3)
        cs.EXACT_CHUNK = saved[2]
        cs.EXACT_SUBSETS = 5  # C(6, 1) = 6 sets: over the limit
        assert list(select_by_output(cuu, cuz, 6, 1, 0.0)) == greedy
        cs.EXACT_SUBSETS = 6
        assert list(select_by_output(cuu, cuz, 6, 1, 0.0)) != greedy
        cs.EXACT_WORK = 6 * 4 ** 3 - 1  # 6 sets of one 4-column block
        assert list(select_by_output(cuu, cuz, 6, 1, 0.0)) == greedy
        cs.EXACT_WORK = 6 * 4 ** 3
        assert list(select_by_output(cuu, cuz, 6, 1, 0.0)) != greedy
    finally:
        cs.EXACT_SUBSETS, cs.EXACT_WORK, cs.EXACT_CHUNK = saved
