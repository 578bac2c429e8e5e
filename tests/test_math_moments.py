"""Eq. M1-M3', D7 against numerical quadrature (``scipy.integrate``, in
``mathref.py``), never against the module's own helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mathref import cov_quad, moments_quad

from udfc_ref.datamodel import activation_stats
from udfc_ref.moments import activation_covariance, activation_mean_var, covariance_pm1, hermite_coefficients

ACTS = ("relu", "relu6", "identity")
# (beta, gamma) marginals: active, half active, mostly off, near the relu6 ceiling, negative gamma
MARGINALS = [(0.0, 1.0), (1.3, 0.7), (-1.6, 0.9), (4.5, 1.8), (0.4, -1.2), (-0.3, 2.5)]


@pytest.mark.parametrize("act", ACTS)
def test_mean_and_variance_match_quadrature(act):
    """Eq. M1-M2 (and DFQ's E[ReLU(z)] = gamma phi(beta/gamma) + beta Phi(beta/gamma))."""
    b = np.array([m[0] for m in MARGINALS])
    g = np.array([m[1] for m in MARGINALS])
    mean, var = activation_mean_var(b, g, act)
    for i, (bi, gi) in enumerate(MARGINALS):
        qm, qv = moments_quad(bi, gi, act)
        assert abs(mean[i] - qm) <= 1e-10 * (1 + abs(qm)) and abs(var[i] - qv) <= 1e-10 * (1 + qv)


def _cov(rho, i, k, act, n_terms=None):
    (b1, g1), (b2, g2) = MARGINALS[i], MARGINALS[k]
    # the solver passes |gamma| and flips the sign of rho for each negative gamma (D5)
    s = math.copysign(1.0, g1) * math.copysign(1.0, g2)
    ca = hermite_coefficients(np.array([b1]), np.array([abs(g1)]), act)
    cb = hermite_coefficients(np.array([b2]), np.array([abs(g2)]), act)
    marg = (np.array([b1]), np.array([abs(g1)]), np.array([b2]), np.array([abs(g2)]), act)
    return activation_covariance(np.array([[s * rho]]), ca, cb, marginals=marg)[0, 0]


# |error| / sqrt(Var_i Var_k) allowed at each rho: exact at -1, 0, 1 (Eq. M3'); elsewhere
# the bound the derivation quotes for the truncated series with the modelled remainder
BOUND = {-1.0: 1e-9, -0.99: 2e-3, -0.7: 1e-6, 0.0: 1e-12, 0.5: 1e-9, 0.9: 2e-4, 0.99: 2e-3, 1.0: 1e-9}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rho", sorted(BOUND))
def test_covariance_matches_quadrature(act, rho):
    """Eq. M3 with the remainder of M3': the covariance of two activations of
    correlated Gaussians, equal and unequal marginals, both signs of gamma."""
    pairs = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 1)]
    for i, k in pairs:
        (b1, g1), (b2, g2) = MARGINALS[i], MARGINALS[k]
        ref = cov_quad(b1, g1, b2, g2, rho, act)
        scale = math.sqrt(moments_quad(b1, g1, act)[1] * moments_quad(b2, g2, act)[1])
        got = _cov(rho, i, k, act)
        assert abs(got - ref) <= BOUND[rho] * scale + 1e-12, (i, k, got, ref, (got - ref) / scale)


@pytest.mark.parametrize("act", ("relu", "relu6"))
def test_covariance_at_plus_minus_one_is_exact(act):
    """covariance_pm1: Cov(f(b1 + g1 u), f(b2 +- g2 u)) of ONE standard normal
    u in closed form (the rho = +-1 values the M3' remainder is built from)."""
    for (b1, g1) in MARGINALS:
        for (b2, g2) in MARGINALS:
            plus, minus = covariance_pm1(b1, g1, b2, g2, act)
            assert abs(plus - cov_quad(b1, abs(g1), b2, abs(g2), 1.0, act)) <= 1e-10
            assert abs(minus - cov_quad(b1, abs(g1), b2, abs(g2), -1.0, act)) <= 1e-10


def test_negated_filters_have_the_right_tail_sign():
    """relu(u) against relu(-u) (a filter and its negative, rho = -1): the
    covariance is -phi(0)^2 = -1/(2 pi) exactly; a remainder with the sign of
    rho^(n+1) (odd n + 1) would double the tail instead."""
    c = hermite_coefficients(np.zeros(1), np.ones(1), "relu")
    got = activation_covariance(np.array([[-1.0]]), c, c, marginals=(np.zeros(1), np.ones(1), np.zeros(1),
                                                                       np.ones(1), "relu"))[0, 0]
    assert abs(got + 1 / (2 * math.pi)) <= 1e-12


@pytest.mark.parametrize("act", ("relu", "relu6"))
@pytest.mark.parametrize("rho", (0.3, 0.6, 0.9, 0.99))
def test_lag_correlation_through_an_activation(act, rho):
    """Eq. D7: two pixels at lag 1 with standardised pre-activation
    correlation rho: the activation's lag-1 correlation (variance weighted
    over channels) is sum_i Cov(f(z_i(0)), f(z_i(1))) / sum_i Var f(z_i)."""
    b = np.array([m[0] for m in MARGINALS])
    g = np.abs(np.array([m[1] for m in MARGINALS]))
    cov = np.diag(g**2)
    num = sum(cov_quad(bi, gi, bi, gi, rho, act) for bi, gi in zip(b, g))
    den = sum(moments_quad(bi, gi, act)[1] for bi, gi in zip(b, g))
    st = activation_stats(b, cov, act, rho)
    # exact but for the series' remainder, modelled as rho^31 times its value at
    # rho = 1 (derivation D7: measured <= 1e-9 up to 0.6, 2.7e-5 at 0.9, 2e-4 at 0.99)
    assert abs(st.rho - num / den) <= {0.3: 1e-9, 0.6: 1e-9, 0.9: 5e-5, 0.99: 3e-4}[rho]
    # and the channel covariance of the same call is Eq. M3 (identity: unchanged)
    assert np.allclose(np.diag(st.cov), [moments_quad(bi, gi, act)[1] for bi, gi in zip(b, g)], atol=1e-10)


def test_activation_stats_edge_cases():
    """No spatial correlation in, none out; a value whose channels are all
    dead (variance 0) has no lag correlation either; small variances (sum
    below 1) are handled like any other; identity keeps everything."""
    b = np.array([0.3, -0.2])
    cov = np.array([[0.04, 0.01], [0.01, 0.09]])
    assert activation_stats(b, cov, "relu", None).rho is None
    assert activation_stats(b, np.zeros((2, 2)), "relu", 0.5).rho is None
    small = activation_stats(b, cov, "relu", 0.5)
    num = sum(cov_quad(bi, gi, bi, gi, 0.5, "relu") for bi, gi in zip(b, np.sqrt(np.diag(cov))))
    den = sum(moments_quad(bi, gi, "relu")[1] for bi, gi in zip(b, np.sqrt(np.diag(cov))))
    assert abs(small.rho - num / den) <= 1e-9
    ident = activation_stats(b, cov, "identity", 0.5)
    assert np.array_equal(ident.mean, b) and np.array_equal(ident.cov, cov) and ident.rho == 0.5


def test_dead_channels_and_defaults():
    """A dead channel (gamma = 0) is the constant f(beta): mean clip(beta),
    variance 0, no Hermite coefficients; ReLU is the default activation
    (clip to [0, inf)), and 30 Hermite terms the default."""
    from udfc_ref.moments import clipped_gaussian_moments

    for act, lo, hi in (("relu", 0, np.inf), ("relu6", 0, 6), ("identity", -np.inf, np.inf)):
        b = np.array([-0.5, 0.3, 7.0])
        m, v = activation_mean_var(b, np.zeros(3), act)
        assert np.array_equal(m, np.clip(b, lo, hi)) and np.array_equal(v, np.zeros(3))
        assert np.all(hermite_coefficients(b, np.zeros(3), act) == 0)
    b, g = np.array([0.4, -1.0]), np.array([1.3, 0.6])
    assert all(np.array_equal(x, y) for x, y in zip(activation_mean_var(b, g), activation_mean_var(b, g, "relu")))
    m2 = clipped_gaussian_moments(b, g)
    assert np.allclose(m2[0], [moments_quad(bi, gi, "relu")[0] for bi, gi in zip(b, g)], atol=1e-12)
    c = hermite_coefficients(b, g)
    assert c.shape == (30, 2) and np.array_equal(c, hermite_coefficients(b, g, "relu", 30))


@pytest.mark.parametrize("act", ("relu", "relu6"))
def test_near_duplicate_kept_channels(act):
    """Two kept channels whose filters differ by 1 % (rho ~ 0.9999) and
    their quantized copies: pair_stats' covariances among them (C~) and with
    the originals (X) match quadrature to the M3' bound -- without the
    modelled remainder they would miss by the series' tail."""
    from udfc_ref.datamodel import InputModel
    from udfc_ref.solve import pair_stats

    rng = np.random.default_rng(3)
    W = rng.standard_normal((3, 1, 4))
    W[1] = W[0] * 1.3 + 0.01 * rng.standard_normal((1, 4))
    gamma, beta = np.array([1.2, 0.8, 1.0]), np.array([0.3, -0.4, 0.1])
    im = InputModel(np.zeros(1), np.eye(1), 0.0, np.zeros((4, 2)))
    kept = np.array([0, 1])
    s = pair_stats(W, W[kept], im, gamma, beta, act, kept)
    G = W.reshape(3, -1) @ W.reshape(3, -1).T
    rho = G[0, 1] / np.sqrt(G[0, 0] * G[1, 1])
    assert rho > 0.999
    ref = cov_quad(beta[0], gamma[0], beta[1], gamma[1], rho, act)
    scale = np.sqrt(s.cov_q[0, 0] * s.cov_q[1, 1])
    assert abs(s.cov_q[0, 1] - ref) <= 2e-3 * scale and abs(s.cross[0, 1] - ref) <= 2e-3 * scale
    tail = abs(activation_covariance(np.array([[rho]]), hermite_coefficients(beta[:1], gamma[:1], act),
                                     hermite_coefficients(beta[1:2], gamma[1:2], act))[0, 0] - ref)
    assert tail > 4 * abs(s.cov_q[0, 1] - ref)  # the remainder matters here


@pytest.mark.parametrize("beta", [-6.0, -4.0])
def test_m1_m2_far_in_the_lower_tail_against_50_digit_quadrature(beta):
    """M1-M2 for a ReLU channel that is almost always off (beta / gamma = -6,
    -4): mean and second moment against 50-digit mpmath quadrature to 1e-9
    relative -- the clipped mass is Phi(-a) - Phi(-b), without the
    cancellation of Phi(b) - Phi(a) near 1 (derivation section 5)."""
    import mpmath

    from udfc_ref.moments import clipped_gaussian_moments

    mpmath.mp.dps = 50
    b = mpmath.mpf(beta)
    m1 = mpmath.quad(lambda u: (b + u) * mpmath.npdf(u), [-b, mpmath.inf])
    m2 = mpmath.quad(lambda u: (b + u) ** 2 * mpmath.npdf(u), [-b, mpmath.inf])
    mean, sq = clipped_gaussian_moments(np.array([beta]), np.array([1.0]), 0.0, np.inf)
    assert abs(mean[0] / float(m1) - 1) < 1e-9 and abs(sq[0] / float(m2) - 1) < 1e-9


@pytest.mark.parametrize("act,beta", [("relu", 0.0), ("relu6", 6.0), ("relu", -0.5), ("relu6", 2.0)])
def test_m3_a_constant_has_no_hermite_component(act, beta):
    """M3 with gamma = 0 (a dead BN channel): f(beta) is a constant, so
    c_n = E[f He_n] / sqrt(n!) = f(beta) E[He_n] / sqrt(n!) = 0 for every
    n >= 1, also with beta exactly on a kink of the activation (0 / 0 there)."""
    c = hermite_coefficients(np.array([beta, 1.0]), np.array([0.0, 0.0]), act)
    assert c.shape == (30, 2) and np.array_equal(c, np.zeros((30, 2)))
