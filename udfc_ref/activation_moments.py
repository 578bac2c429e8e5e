"""Moments and Hermite coefficients of the pointwise activations beyond the
clip family (derivation section 5, Eq. M4-M8).

For ``z = beta + gamma u``, ``u ~ N(0, 1)`` (assumption A1) and an activation
``f``, the data model needs ``E f(z)``, ``Var f(z)`` (Eq. M1-M2) and the
Hermite coefficients ``c_n = E[f(z) He_n(u)] / sqrt(n!)`` of Mehler's series
(Eq. M3).  ``moments.py`` computes them in closed form for ReLU / ReLU6 /
identity (``clip``); this module adds, vectorised over channels:

* hardsigmoid ``relu6(z + 3) / 6`` and hardswish ``z * hardsigmoid(z)`` --
  piecewise polynomials, **closed form** by truncated-Gaussian moments and
  integration by parts (Stein's lemma), Eq. M4-M5 (:func:`piecewise_moments`);
* GELU, erf form ``z Phi(z)`` -- **closed form**: Gaussian integrals of
  ``Phi`` and ``phi`` and Owen's T function for ``E[Phi(z)^2]``, Eq. M6
  (:func:`gelu_erf_moments`);
* sigmoid, SiLU ``z sigmoid(z)`` and GELU tanh form -- no closed form:
  the polynomial asymptotes beyond ``|z| > L`` in closed form (Eq. M4-M5) and
  the core ``|z| <= L`` by Gauss-Legendre quadrature in ``u`` with
  ``N_QUAD`` nodes, Eq. M7-M8 (:func:`smooth_moments`).

Every function returns ``(mean, var, coef)``: ``mean``, ``var`` of shape
``beta.shape`` and ``coef`` of shape ``(n_terms,) + beta.shape``.  A channel
with ``gamma == 0`` is the constant ``f(beta)`` (variance and coefficients 0).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, expit, ndtr, owens_t

#: activation keys of this module (``moments.ACTIVATIONS`` holds the clip family)
EXTRA_ACTIVATIONS = ("hardsigmoid", "hardswish", "gelu", "gelu_tanh", "sigmoid", "silu")
#: Gauss-Legendre nodes of the core integral of the smooth activations (Eq. M7)
N_QUAD = 200
#: the core integral covers |u| <= U_MAX (the Gaussian's mass beyond is < 1e-32)
U_MAX = 12.0
#: beyond |t| > T_ZERO the standard normal pdf (times any polynomial used here) is 0 in float64 terms
T_ZERO = 40.0
_SQ2PI = math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation_key(node) -> str:
    """The moments key of an activation node: its op, or ``gelu_tanh`` for
    ``gelu`` with ``approximate='tanh'``."""
    if node.op == "gelu" and node.attrs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    return node.op


def evaluate(act: str, z: np.ndarray) -> np.ndarray:
    """f(z) of an activation key, float64 (the same formulas as ``forward.py``)."""
    z = np.asarray(z, dtype=np.float64)
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "relu6":
        return np.clip(z, 0.0, 6.0)
    if act == "identity":
        return z
    if act == "hardsigmoid":
        return np.clip(z + 3.0, 0.0, 6.0) / 6.0
    if act == "hardswish":
        return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0
    if act == "sigmoid":
        return expit(z)
    if act == "silu":
        return z * expit(z)
    if act == "gelu":
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    if act == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))
    raise KeyError(act)


# --------------------------------------------------------------------------
# normalised Hermite functions
# --------------------------------------------------------------------------

def _hermite_phi(t: np.ndarray, n_max: int) -> np.ndarray:
    """He_k(t) phi(t) / sqrt(k!) for k = 0..n_max, shape (n_max + 1,) + t.shape;
    0 where |t| > T_ZERO or t is infinite.  The normalised recursion
    h_{k+1} = (t h_k - sqrt(k) h_{k-1}) / sqrt(k + 1) never overflows."""
    t = np.asarray(t, dtype=np.float64)
    live = np.isfinite(t) & (np.abs(t) <= T_ZERO)
    tt = np.where(live, t, 0.0)
    out = np.empty((n_max + 1,) + t.shape)
    out[0] = np.where(live, np.exp(-0.5 * tt * tt) / _SQ2PI, 0.0)
    if n_max >= 1:
        out[1] = tt * out[0]
    for k in range(1, n_max):
        out[k + 1] = (tt * out[k] - math.sqrt(k) * out[k - 1]) / math.sqrt(k + 1)
    return out


def _hermite(u: np.ndarray, n_max: int) -> np.ndarray:
    """He_k(u) / sqrt(k!) for k = 0..n_max (finite u)."""
    out = np.empty((n_max + 1,) + u.shape)
    out[0] = 1.0
    if n_max >= 1:
        out[1] = u
    for k in range(1, n_max):
        out[k + 1] = (u * out[k] - math.sqrt(k) * out[k - 1]) / math.sqrt(k + 1)
    return out


def _split(beta, gamma):
    beta = np.asarray(beta, dtype=np.float64)
    gamma = np.abs(np.asarray(gamma, dtype=np.float64))
    beta, gamma = np.broadcast_arrays(beta, gamma)
    live = gamma > 0
    return beta, gamma, live, np.where(live, gamma, 1.0)


def _finish(act, beta, live, mean_c, sq_c, coef, centre):
    """Moments of f - centre -> (mean, var, coef) of f; constant channels fixed."""
    mean = centre + mean_c
    var = np.maximum(sq_c - mean_c * mean_c, 0.0)
    const = evaluate(act, beta)
    return np.where(live, mean, const), np.where(live, var, 0.0), np.where(live, coef, 0.0)


# --------------------------------------------------------------------------
# piecewise polynomials (Eq. M4-M5)
# --------------------------------------------------------------------------

#: f = sum over pieces of p(z) 1{a <= z < b}; p as ascending coefficients in z
PIECES = {
    "hardsigmoid": ((-np.inf, -3.0, ()), (-3.0, 3.0, (0.5, 1.0 / 6.0)), (3.0, np.inf, (1.0,))),
    "hardswish": ((-np.inf, -3.0, ()), (-3.0, 3.0, (0.0, 0.5, 1.0 / 6.0)), (3.0, np.inf, (0.0, 1.0))),
}


def _poly_in_u(p, beta, gamma, centre):
    """Coefficients (ascending in u) of q(u) = p(beta + gamma u) - centre,
    shape (deg + 1,) + beta.shape."""
    deg = max(len(p) - 1, 0)
    q = np.zeros((deg + 1,) + beta.shape)
    for k, pk in enumerate(p):
        for j in range(k + 1):
            q[j] = q[j] + pk * math.comb(k, j) * beta ** (k - j) * gamma**j
    q[0] = q[0] - centre
    return q


def _finite(t):
    """t where |t| <= T_ZERO (finite), else 0: the pdf factor it meets is 0 there."""
    return np.where(np.isfinite(t) & (np.abs(t) <= T_ZERO), t, 0.0)


def _truncated_moments(ta, tb, k_max):
    """M_k = int_ta^tb u^k phi(u) du for k = 0..k_max (Eq. M4):
    M_0 = Phi(tb) - Phi(ta), M_1 = phi(ta) - phi(tb),
    M_k = (k - 1) M_{k-2} + ta^(k-1) phi(ta) - tb^(k-1) phi(tb)."""
    pa, pb = _hermite_phi(ta, 0)[0], _hermite_phi(tb, 0)[0]
    fa, fb = _finite(ta), _finite(tb)
    m = np.empty((k_max + 1,) + np.shape(ta))
    # Phi(tb) - Phi(ta) = Phi(-ta) - Phi(-tb): take the form without cancellation (an upper tail,
    # ta > 0, as 1 - 0.99999... would keep only ~7 digits of Phi(-6) ~ 1e-9)
    up = np.asarray(ta) > 0
    m[0] = np.where(up, ndtr(-np.asarray(ta)) - ndtr(-np.asarray(tb)), ndtr(tb) - ndtr(ta))
    if k_max >= 1:
        m[1] = pa - pb
    for k in range(2, k_max + 1):
        m[k] = (k - 1) * m[k - 2] + fa ** (k - 1) * pa - fb ** (k - 1) * pb
    return m


def _polyval(q, t):
    """q(t) for ascending coefficients q (deg + 1, C), evaluated at 0 where
    |t| > T_ZERO (the pdf factor it multiplies vanishes there)."""
    tt = _finite(t)
    out = np.zeros(np.shape(t))
    for c in q[::-1]:
        out = out * tt + c
    return out


def _poly_derivative(q):
    if q.shape[0] <= 1:
        return np.zeros((1,) + q.shape[1:])
    return q[1:] * np.arange(1, q.shape[0]).reshape((-1,) + (1,) * (q.ndim - 1))


def _piecewise_sums(beta, g, pieces, n_terms, centre):
    """Raw sums for ``q = f - centre`` of a piecewise polynomial f:
    (E q, E q^2, E[q He_n]/sqrt(n!) for n = 1..n_terms); see :func:`piecewise_moments`."""
    mean_c = np.zeros(beta.shape)
    sq_c = np.zeros(beta.shape)
    coef = np.zeros((n_terms,) + beta.shape)
    norms = np.sqrt(np.array([math.factorial(n) for n in range(n_terms + 1)], dtype=np.float64))
    for a, b, p in pieces:
        ta = (a - beta) / g
        tb = (b - beta) / g
        q = _poly_in_u(p, beta, g, centre)
        deg = q.shape[0] - 1
        q2 = np.zeros((2 * deg + 1,) + beta.shape)
        for i in range(deg + 1):
            q2[i:i + deg + 1] += q[i] * q
        M = _truncated_moments(ta, tb, 2 * deg)
        mean_c += (q * M[: deg + 1]).sum(0)
        sq_c += (q2 * M).sum(0)
        # Hermite: boundary terms of the derivatives q^(j), j = 0..deg
        ha = _hermite_phi(ta, n_terms)  # He_k phi / sqrt(k!)
        hb = _hermite_phi(tb, n_terms)
        d = q
        for j in range(deg + 1):
            qa, qb = _polyval(d, ta), _polyval(d, tb)
            # n = j + 1 .. n_terms: He_{n-1-j} phi / sqrt(n!) = h_{n-1-j} sqrt((n-1-j)!/n!)
            n = np.arange(j + 1, n_terms + 1)
            scale = (norms[n - 1 - j] / norms[n]).reshape((-1,) + (1,) * beta.ndim)
            coef[j:] += scale * (qa * ha[n - 1 - j] - qb * hb[n - 1 - j])
            # n = j + 1 <= deg: the remaining integral of q^(n) (degree deg - n)
            d = _poly_derivative(d)
            if j + 1 <= deg and j + 1 <= n_terms:
                coef[j] += (d * M[: d.shape[0]]).sum(0) / norms[j + 1]
    return mean_c, sq_c, coef


def piecewise_moments(beta, gamma, act, n_terms):
    """Eq. M4-M5: moments of a piecewise-polynomial f of z = beta + gamma u.

    For a piece ``p(z) 1{a <= z < b}`` let ``q(u) = p(beta + gamma u) - f(beta)``
    (centred, so that a small variance is not a difference of large numbers),
    ``t_a = (a - beta)/gamma``, ``t_b = (b - beta)/gamma``.  Then
    ``E[q 1] = sum_j q_j M_j`` and ``E[q^2 1] = sum_j (q*q)_j M_j`` with the
    truncated moments ``M_j`` (:func:`_truncated_moments`), and by parts
    (``He_n phi = -(He_{n-1} phi)'``)::

        int_ta^tb q He_n phi du = sum_{j=0}^{min(n, deg+1)-1} [q^(j) He_{n-1-j} phi]_tb^ta
                                  + (n <= deg) * sum_i (q^(n))_i M_i

    exact (no series, no quadrature).  Returns (mean, var, coef)."""
    beta, gamma, live, g = _split(beta, gamma)
    centre = evaluate(act, beta)
    mean_c, sq_c, coef = _piecewise_sums(beta, g, PIECES[act], n_terms, centre)
    return _finish(act, beta, live, mean_c, sq_c, coef, centre)


# --------------------------------------------------------------------------
# GELU, erf form (Eq. M6)
# --------------------------------------------------------------------------

def gelu_erf_moments(beta, gamma, n_terms):
    """Eq. M6: f(z) = z Phi(z), closed form.  With s = sqrt(1 + gamma^2),
    r = sqrt(1 + 2 gamma^2), h = beta / s, kappa = gamma / s:

    * ``E f = beta Phi(h) + gamma^2 phi(h) / s``;
    * ``E f^2 = beta^2 A + 2 beta gamma B + gamma^2 D`` with
      ``A = E Phi(z)^2 = Phi(h) - 2 T(h, 1/r)`` (Owen's T),
      ``B = E[u Phi(z)^2] = 2 gamma phi(h) Phi(h/r) / s``,
      ``D = E[u^2 Phi(z)^2] = A + 2 gamma^2 (E phi(z)^2 - E[z Phi(z) phi(z)])``,
      ``E phi(z)^2 = exp(-beta^2/r^2) / (2 pi r)``,
      ``E[z Phi phi] = phi(h)/s (beta/s^2 Phi(h/r) + gamma^2/(s r) phi(h/r))``;
    * ``c_1 = gamma (Phi(h) + h phi(h) / s^2)`` and, for n >= 2 (Stein:
      ``E[f He_n] = gamma^n E f^(n)``, ``f^(n) = phi^(n-2) - phi^(n)``,
      ``E phi^(k)(z) = s^(-1-k) phi^(k)(h)``),
      ``c_n = (-kappa)^n phi(h) (s He_{n-2}(h) - He_n(h)/s) / sqrt(n!)``.

    The variance is ``E f^2 - (E f)^2``, or ``sum_{n<=30} c_n^2`` where
    ``kappa < 0.3`` (the series then converges to float64 precision,
    ``0.3^60 ~ 1e-31``, and avoids the cancellation of the difference)."""
    beta, gamma, live, g = _split(beta, gamma)
    s = np.sqrt(1.0 + g * g)
    r = np.sqrt(1.0 + 2.0 * g * g)
    h = beta / s
    kappa = g / s
    ph = np.exp(-0.5 * h * h) / _SQ2PI
    Ph = ndtr(h)
    mean = beta * Ph + g * g * ph / s
    A = Ph - 2.0 * owens_t(h, 1.0 / r)
    hr = h / r
    B = 2.0 * g * ph * ndtr(hr) / s
    e_phi2 = np.exp(-beta * beta / (r * r)) / (2.0 * math.pi * r)
    e_zpp = ph / s * (beta / (s * s) * ndtr(hr) + g * g / (s * r) * np.exp(-0.5 * hr * hr) / _SQ2PI)
    D = A + 2.0 * g * g * (e_phi2 - e_zpp)
    sq = beta * beta * A + 2.0 * beta * g * B + g * g * D
    n_all = max(n_terms, 30)  # the variance series needs 30 terms whatever the caller asks for
    hn = _hermite(_finite(h), n_all)  # He_k(h)/sqrt(k!); phi(h) = 0 where |h| > T_ZERO
    coef = np.empty((n_all,) + beta.shape)
    coef[0] = g * (Ph + h * ph / (s * s))
    for n in range(2, n_all + 1):
        # He_{n-2}/sqrt(n!) = h_{n-2} / sqrt(n (n-1))
        coef[n - 1] = (-kappa) ** n * ph * (s * hn[n - 2] / math.sqrt(n * (n - 1)) - hn[n] / s)
    var = np.where(kappa < 0.3, (coef**2).sum(0), np.maximum(sq - mean * mean, 0.0))
    coef = coef[:n_terms]
    const = evaluate("gelu", beta)
    return np.where(live, mean, const), np.where(live, var, 0.0), np.where(live, coef, 0.0)


# --------------------------------------------------------------------------
# sigmoid, SiLU, GELU tanh (Eq. M7-M8)
# --------------------------------------------------------------------------

#: smooth activation -> (L, polynomial for z < -L, polynomial for z > L):
#: |f - asymptote| < 2e-16 beyond |z| = L
SMOOTH = {
    "sigmoid": (37.0, (), (1.0,)),
    "silu": (42.0, (), (0.0, 1.0)),
    "gelu_tanh": (10.0, (), (0.0, 1.0)),
}


_GL = {}


def smooth_moments(beta, gamma, act, n_terms, n_quad=N_QUAD):
    """Eq. M7-M8: sigmoid, SiLU, GELU-tanh (no closed form).

    ``f`` equals a polynomial asymptote ``p_-`` for ``z < -L`` and ``p_+`` for
    ``z > L`` to within 2e-16 (table ``SMOOTH``); those tails are integrated in
    closed form (Eq. M4-M5 with ``centre = f(beta)``).  The core
    ``-L <= z <= L``, i.e. ``u`` in ``[(-L - beta)/gamma, (L - beta)/gamma]``
    intersected with ``[-U_MAX, U_MAX]``, is integrated by Gauss-Legendre
    with ``n_quad`` nodes placed per channel::

        int q(u) g(u) phi(u) du ~= sum_i w_i q(u_i) g(u_i) phi(u_i)

    for ``g`` = 1, ``q`` and ``He_n / sqrt(n!)``, ``q = f(beta + gamma u) - f(beta)``.
    ``f`` is analytic with poles at distance ``>= pi/gamma`` from the real
    ``u`` axis, the interval half-length is at most ``min(U_MAX, L/gamma)``,
    so the error falls like ``rho^(-2 n_quad)``, ``rho >= 1 + pi/L``, for every
    gamma; the measured error is in ``docs/derivation.md`` (Eq. M8)."""
    beta, gamma, live, g = _split(beta, gamma)
    L, left, right = SMOOTH[act]
    centre = evaluate(act, beta)
    flat_b, flat_g, flat_c = beta.ravel(), g.ravel(), centre.ravel()
    # tails in closed form: pieces (-inf, -L) and (L, inf)
    mean_c, sq_c, coef = _piecewise_sums(flat_b, flat_g, ((-np.inf, -L, left), (L, np.inf, right)), n_terms, flat_c)
    # core by Gauss-Legendre
    if n_quad not in _GL:
        _GL[n_quad] = np.polynomial.legendre.leggauss(n_quad)
    x, w = _GL[n_quad]
    ua = np.maximum((-L - flat_b) / flat_g, -U_MAX)
    ub = np.minimum((L - flat_b) / flat_g, U_MAX)
    half = np.maximum(ub - ua, 0.0) / 2
    mid = (ua + ub) / 2
    u = mid[:, None] + half[:, None] * x[None, :]  # (C, Q)
    wq = half[:, None] * w[None, :] * np.exp(-0.5 * u * u) / _SQ2PI
    q = evaluate(act, flat_b[:, None] + flat_g[:, None] * u) - flat_c[:, None]
    mean_c += (wq * q).sum(1)
    sq_c += (wq * q * q).sum(1)
    wqq = wq * q
    h_prev, h = np.ones_like(u), u.copy()  # He_k(u)/sqrt(k!), k = 0, 1: two (C, Q) arrays at a time
    for n in range(1, n_terms + 1):
        coef[n - 1] += (h * wqq).sum(1)
        h_prev, h = h, (u * h - math.sqrt(n) * h_prev) / math.sqrt(n + 1)
    shape = beta.shape
    return _finish(act, beta, live, mean_c.reshape(shape), sq_c.reshape(shape),
                   coef.reshape((n_terms,) + shape), centre)


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------

def extra_moments(beta, gamma, act, n_terms):
    """(mean, var, coef (n_terms, ...)) of ``f(beta + gamma u)`` for an
    activation key of ``EXTRA_ACTIVATIONS``."""
    if act in PIECES:
        return piecewise_moments(beta, gamma, act, n_terms)
    if act == "gelu":
        return gelu_erf_moments(beta, gamma, n_terms)
    if act in SMOOTH:
        return smooth_moments(beta, gamma, act, n_terms)
    raise KeyError(f"no moments for activation {act!r}")
