"""Moments and Hermite coefficients of every pointwise activation (derivation
Eq. M1-M8) against independent references: scipy.integrate.quad of the
defining integrals, the PyTorch definitions of the activations, and
Monte-Carlo samples of jointly Gaussian pre-activations (Mehler, Eq. M3)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.polynomial.hermite_e import hermeval
from scipy import integrate

from udfc_ref.activation_moments import EXTRA_ACTIVATIONS, N_QUAD, smooth_moments
from udfc_ref.moments import (ACTIVATIONS, N_HERMITE, activation_covariance, activation_mean_var,
                              clipped_gaussian_moments, hermite_coefficients)

torch = pytest.importorskip("torch")
F = torch.nn.functional

ALL = tuple(ACTIVATIONS) + EXTRA_ACTIVATIONS

#: the activations as PyTorch defines them (float64): the reference for f itself
TORCH = {
    "relu": F.relu, "relu6": F.relu6, "identity": lambda z: z, "sigmoid": torch.sigmoid, "silu": F.silu,
    "hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish, "gelu": lambda z: F.gelu(z, approximate="none"),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}
#: points where f or a derivative is not smooth, or where it bends
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0), "hardswish": (-3.0, 3.0)}
N_CHECK = (1, 2, 3, 4, 5, 8, 13, 21, 30)


def f_torch(act, z):
    return TORCH[act](torch.as_tensor(np.asarray(z, dtype=np.float64))).numpy()


def quad_reference(act, beta, gamma):
    """E f, Var f and c_n (n in N_CHECK) by adaptive quadrature over u in [-13, 13],
    split at the kinks of f and around the bend of the smooth ones."""
    pts = [(k - beta) / gamma for k in KINKS.get(act, (-1.0, 0.0, 1.0))]
    pts = sorted(p for p in pts if -13 < p < 13)

    def f(u):
        return float(f_torch(act, beta + gamma * u))

    def e(g):
        with warnings.catch_warnings():  # quad's "roundoff" notice where the integral is ~0
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            return integrate.quad(lambda u: g(u) * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi), -13, 13,
                                  points=pts or None, limit=500, epsabs=1e-15, epsrel=1e-12)[0]

    m = e(f)
    var = e(lambda u: (f(u) - m) ** 2)
    coef = {}
    for n in N_CHECK:
        c = np.zeros(n + 1)
        c[n] = 1.0
        coef[n] = e(lambda u: f(u) * hermeval(u, c)) / math.sqrt(math.factorial(n))
    return m, var, coef


@settings(max_examples=25, deadline=None)
@given(act=st.sampled_from(ALL), beta=st.floats(-6, 6), gamma=st.floats(0.02, 12))
@example(act="hardsigmoid", beta=-6.0, gamma=0.5)  # a far upper tail: M_0 = Phi(-6) without cancellation (Eq. M4)
def test_moments_and_hermite_match_quadrature(act, beta, gamma):
    m, v = activation_mean_var(np.array([beta]), np.array([gamma]), act)
    c = hermite_coefficients(np.array([beta]), np.array([gamma]), act)[:, 0]
    rm, rv, rc = quad_reference(act, beta, gamma)
    scale = math.sqrt(rv) + 1e-6 * (1 + abs(rm))  # floor: 1e-14 absolute
    assert abs(m[0] - rm) <= 1e-8 * scale, (m[0], rm)
    assert abs(v[0] - rv) <= 1e-8 * scale**2, (v[0], rv)
    for n in N_CHECK:
        assert abs(c[n - 1] - rc[n]) <= 1e-8 * scale, (n, c[n - 1], rc[n])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(act_a=st.sampled_from(ALL), act_b=st.sampled_from(ALL), rho=st.floats(-0.95, 0.95),
       ba=st.floats(-3, 3), bb=st.floats(-3, 3), ga=st.floats(0.2, 5), gb=st.floats(0.2, 5))
def test_mehler_covariance_matches_monte_carlo(act_a, act_b, rho, ba, bb, ga, gb):
    """Cov(f(z_a), g(z_b)) of Eq. M3 (with the new coefficients) against 400,000
    jointly Gaussian samples; means and variances too."""
    rng = np.random.default_rng(0)
    n = 400_000
    u = rng.standard_normal(n)
    w = rho * u + math.sqrt(1 - rho * rho) * rng.standard_normal(n)
    fa = f_torch(act_a, ba + ga * u)
    fb = f_torch(act_b, bb + gb * w)
    ma, va = activation_mean_var(np.array([ba]), np.array([ga]), act_a)
    mb, vb = activation_mean_var(np.array([bb]), np.array([gb]), act_b)
    ca = hermite_coefficients(np.array([ba]), np.array([ga]), act_a)
    cb = hermite_coefficients(np.array([bb]), np.array([gb]), act_b)
    cov = activation_covariance(np.array([[rho]]), ca, cb, va, vb)[0, 0]
    for got, samples in ((ma[0], fa), (mb[0], fb)):
        assert abs(got - samples.mean()) <= 5 * samples.std() / math.sqrt(n) + 1e-12
    for got, samples in ((va[0], fa), (vb[0], fb)):
        d = (samples - samples.mean()) ** 2
        assert abs(got - d.mean()) <= 5 * d.std() / math.sqrt(n) + 1e-12
    prod = (fa - fa.mean()) * (fb - fb.mean())
    assert abs(cov - prod.mean()) <= 5 * prod.std() / math.sqrt(n) + 1e-12, (cov, prod.mean())


@pytest.mark.parametrize("act", EXTRA_ACTIVATIONS)
def test_vectorised_constant_and_extreme_channels(act):
    """One call on many channels equals the calls channel by channel; gamma = 0
    is the constant f(beta); far-out and tiny/huge gamma stay finite and sane."""
    beta = np.array([-300.0, -7.0, -1.0, 0.0, 0.5, 2.0, 9.0, 300.0, 1.0, -2.0, 0.3])
    gamma = np.array([1.0, 2.0, 0.7, 1e-9, 3.0, 0.0, 40.0, 5.0, 1e4, 1e-300, -1.5])
    m, v = activation_mean_var(beta, gamma, act)
    c = hermite_coefficients(beta, gamma, act)
    assert m.shape == v.shape == beta.shape and c.shape == (N_HERMITE,) + beta.shape
    assert np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(np.isfinite(c)) and np.all(v >= 0)
    for i in range(beta.size):
        mi, vi = activation_mean_var(beta[i:i + 1], gamma[i:i + 1], act)
        ci = hermite_coefficients(beta[i:i + 1], gamma[i:i + 1], act)
        np.testing.assert_allclose([mi[0], vi[0]], [m[i], v[i]], rtol=1e-12, atol=0)
        np.testing.assert_allclose(ci[:, 0], c[:, i], rtol=1e-12, atol=1e-300)
    const = f_torch(act, beta[5])
    assert m[5] == pytest.approx(float(const), rel=1e-12, abs=1e-300) and v[5] == 0 and not c[:, 5].any()
    # |gamma| is what counts: the sign of gamma only flips u
    mm, vv = activation_mean_var(beta, np.abs(gamma), act)
    np.testing.assert_array_equal(mm, m)
    # tiny gamma: first-order expansion f(beta) + gamma f'(beta) u
    assert m[3] == pytest.approx(float(f_torch(act, 0.0)), abs=1e-8)
    assert v[3] <= 1e-16
    # Bessel: sum_n c_n^2 <= Var f, and the truncated tail is small where the series converges fast
    tail = v - (c**2).sum(0)
    assert np.all(tail >= -1e-9 * (v + 1e-300))


def test_hardsigmoid_is_a_scaled_relu6_of_a_shifted_input():
    """hardsigmoid(z) = relu6(z + 3) / 6: the piecewise engine (Eq. M4-M5) against
    the clip closed form (Eq. M1-M3) on the shifted Gaussian."""
    rng = np.random.default_rng(3)
    beta, gamma = rng.normal(0, 4, 200), rng.uniform(0.01, 9, 200)
    m, v = activation_mean_var(beta, gamma, "hardsigmoid")
    m6, sq6 = clipped_gaussian_moments(beta + 3, gamma, 0.0, 6.0)
    np.testing.assert_allclose(m, m6 / 6, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(v, np.maximum(sq6 - m6**2, 0) / 36, rtol=1e-7, atol=1e-13)
    c = hermite_coefficients(beta, gamma, "hardsigmoid")
    c6 = hermite_coefficients(beta + 3, gamma, "relu6")
    np.testing.assert_allclose(c, c6 / 6, rtol=1e-9, atol=1e-14)


def test_quadrature_converges_and_plain_gauss_hermite_does_not():
    """Eq. M8: the Gauss-Legendre core with N_QUAD nodes agrees with 2 x N_QUAD
    nodes to 1e-10 of the standard deviation over a grid of beta, gamma; plain
    Gauss-Hermite in u with 100 nodes (what a first reading would use) is far
    off for a sharp SiLU (large gamma)."""
    beta, gamma = np.meshgrid(np.linspace(-8, 8, 17), np.geomspace(0.01, 100, 13))
    beta, gamma = beta.ravel(), gamma.ravel()
    for act in ("sigmoid", "silu", "gelu_tanh"):
        m1, v1, c1 = smooth_moments(beta, gamma, act, N_HERMITE)
        m2, v2, c2 = smooth_moments(beta, gamma, act, N_HERMITE, n_quad=2 * N_QUAD)
        sd = np.sqrt(v2)
        # 1e-15: the float64 rounding of f itself (e.g. 1 + tanh(x) near x = -18)
        assert np.all(np.abs(m1 - m2) <= 1e-10 * sd + 1e-15)
        assert np.all(np.abs(v1 - v2) <= 1e-10 * sd**2 + 1e-15 * sd)
        assert np.all(np.abs(c1 - c2) <= 1e-10 * sd + 1e-15)
    x, w = np.polynomial.hermite_e.hermegauss(100)
    w = w / w.sum()
    b, g = 0.3, 20.0
    f = f_torch("silu", b + g * x)
    mean_gh = float(w @ f)
    m, v, _ = smooth_moments(np.array([b]), np.array([g]), "silu", 1)
    assert abs(mean_gh - m[0]) > 1e-4 * math.sqrt(v[0])
