"""Moments of an activation of a Gaussian pre-activation (derivation Eq. M1-M3).

Data model (assumption A1 of ``docs/derivation.md``): the BN output of channel
i, ``z_i = gamma_i * u_i + beta_i``, has a standard normal ``u_i``; so
``z_i ~ N(beta_i, gamma_i^2)``.  For an activation ``f`` (ReLU, ReLU6,
identity) we need E[f(z_i)], Var f(z_i) and, for a pair of channels whose
``u`` have correlation ``rho``, Cov(f(z_i), f(z_k)).

The covariance uses Mehler's expansion in Hermite polynomials (Eq. M3)::

    Cov(f(z_i), g(z_k)) = sum_{n>=1} rho^n c_n(f_i) c_n(g_k),
    c_n(f_i) = E[f(beta_i + gamma_i u) He_n(u)] / sqrt(n!)

exact for jointly Gaussian ``u``; the coefficients are closed forms (Stein's
lemma, see :func:`hermite_coefficients`), vectorised over channels.  The series
is truncated (at most ``N_HERMITE`` terms); the variances on the diagonal of a
channel set with itself are set exactly, and for the piecewise-linear
activations the remainder ``sum_{m>n} rho^m c_m(f_i) c_m(g_k)`` is replaced by
``|rho|^(n+1)`` times its exact value at ``rho = +1`` (``rho = -1`` for
negative rho), computed in closed form by :func:`covariance_pm1` (Eq. M3').
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from .activation_moments import EXTRA_ACTIVATIONS, extra_moments

N_HERMITE = 30

#: activation name -> (lo, hi) clip range; identity is (-inf, inf)
ACTIVATIONS = {"relu": (0.0, np.inf), "relu6": (0.0, 6.0), "identity": (-np.inf, np.inf)}

#: piecewise-linear activations as ramps, f(z) = const + sum_j s_j relu(z - a_j),
#: pairs (s_j, a_j) (Eq. M3'); identity is linear (its Mehler series ends at n = 1)
RAMPS = {"relu": ((1.0, 0.0),), "relu6": ((1.0, 0.0), (-1.0, 6.0)), "identity": ()}

#: entries of the M3' remainder evaluated per chunk (bounded temporaries)
_PM_CHUNK = 65536


def _phi(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def clipped_gaussian_moments(mean, std, lo=0.0, hi=np.inf):
    """E[f(z)] and E[f(z)^2] for z ~ N(mean, std^2), f = clip(., lo, hi) (Eq. M1-M2).

    Closed form with the normal pdf/cdf; ``std == 0`` gives the moments of
    the constant ``clip(mean)``.  Arrays broadcast; float64 out.
    """
    m = np.asarray(mean, dtype=np.float64)
    s = np.abs(np.asarray(std, dtype=np.float64))
    m, s = np.broadcast_arrays(m, s)
    safe = np.where(s > 0, s, 1.0)
    a = (lo - m) / safe
    b = (hi - m) / safe
    Pa, Pb = ndtr(a), ndtr(b)
    pa = np.where(np.isfinite(a), _phi(np.where(np.isfinite(a), a, 0.0)), 0.0)
    pb = np.where(np.isfinite(b), _phi(np.where(np.isfinite(b), b, 0.0)), 0.0)
    # E[z 1{lo<z<hi}], E[z^2 1{lo<z<hi}] for z = m + s u
    mass = np.where(a > 0, ndtr(-a) - ndtr(-b), Pb - Pa)  # upper tail without 1 - Phi cancellation
    e1 = m * mass + s * (pa - pb)
    aa = np.where(np.isfinite(a), a, 0.0)
    bb = np.where(np.isfinite(b), b, 0.0)
    e2 = (m * m + s * s) * mass + 2 * m * s * (pa - pb) + s * s * (aa * pa - bb * pb)
    lo_c = 0.0 if not np.isfinite(lo) else lo
    hi_c = 0.0 if not np.isfinite(hi) else hi
    mean_f = e1 + lo_c * Pa + hi_c * (1 - Pb)
    sq_f = e2 + lo_c**2 * Pa + hi_c**2 * (1 - Pb)
    const = np.clip(m, lo, hi)
    mean_f = np.where(s > 0, mean_f, const)
    sq_f = np.where(s > 0, sq_f, const * const)
    return mean_f, sq_f


def activation_mean_var(beta, gamma, act="relu"):
    """E[f(z)], Var[f(z)] for z ~ N(beta, gamma^2) (Eq. M1-M2; Eq. M4-M8 for
    the activations of ``activation_moments.EXTRA_ACTIVATIONS``)."""
    if act in EXTRA_ACTIVATIONS:
        return extra_moments(beta, gamma, act, 1)[:2]
    lo, hi = ACTIVATIONS[act]
    m, sq = clipped_gaussian_moments(beta, gamma, lo, hi)
    return m, np.maximum(sq - m * m, 0.0)


def _he_phi(t, n_max):
    """He_k(t) phi(t) for k = 0..n_max, shape (n_max + 1, C); 0 at t = +-inf."""
    fin = np.isfinite(t)
    tt = np.where(fin, t, 0.0)
    he = np.empty((n_max + 1,) + t.shape)
    he[0] = 1.0
    if n_max >= 1:
        he[1] = tt
    for k in range(1, n_max):
        he[k + 1] = tt * he[k] - k * he[k - 1]
    return np.where(fin, he * _phi(tt), 0.0)


def hermite_coefficients(beta, gamma, act="relu", n_terms=N_HERMITE):
    """c_n(f_i), n = 1..n_terms, shape (n_terms, C) (Eq. M3).

    Exact, by Stein's lemma: for f = clip(beta + gamma u, lo, hi) with
    t_lo = (lo - beta)/gamma, t_hi = (hi - beta)/gamma,
    E[f He_1] = gamma (Phi(t_hi) - Phi(t_lo)) and, for n >= 2,
    E[f He_n] = gamma (He_{n-2}(t_lo) phi(t_lo) - He_{n-2}(t_hi) phi(t_hi));
    c_n = E[f He_n] / sqrt(n!).  The activations of
    ``activation_moments.EXTRA_ACTIVATIONS`` by Eq. M4-M8."""
    if act in EXTRA_ACTIVATIONS:
        return extra_moments(beta, gamma, act, n_terms)[2]
    lo, hi = ACTIVATIONS[act]
    beta = np.asarray(beta, dtype=np.float64)
    gamma = np.abs(np.asarray(gamma, dtype=np.float64))
    live = gamma > 0
    g = np.where(live, gamma, 1.0)
    t_lo = (lo - beta) / g
    t_hi = (hi - beta) / g
    out = np.empty((n_terms,) + beta.shape)
    out[0] = gamma * (ndtr(t_hi) - ndtr(t_lo))
    if n_terms > 1:
        d = _he_phi(t_lo, n_terms - 2) - _he_phi(t_hi, n_terms - 2)
        out[1:] = gamma * d
    norms = np.exp([0.5 * math.lgamma(n + 1) for n in range(1, n_terms + 1)])
    out = out / norms.reshape((-1,) + (1,) * beta.ndim)
    return np.where(live, out, 0.0)


#: an entry's Mehler series stops after the first ``n`` with ``|rho|^(n+1) <= MEHLER_TOL``
#: (the remainder is then below ``MEHLER_TOL * sqrt(Var_i Var_k)``, Eq. M3')
MEHLER_TOL = 1e-10
#: the same for float32 covariances: float32's resolution, 2^-23 (Eq. M3', derivation "Precision")
MEHLER_TOL32 = 2.0**-23
#: elements of the (rows, B) block the Horner loop works on (cache sized)
MEHLER_BLOCK = 16384
#: cost of one gathered term relative to one term of the blocked Horner loop
_GATHER_COST = 6.0


def _thresholds(n_max: int, tol: float) -> np.ndarray:
    """thr[n] = tol^(1/(n+1)), n = 0..n_max: an entry needs at most n terms
    when |rho| <= thr[n]."""
    return tol ** (1.0 / (np.arange(n_max + 1) + 1.0))


def _common_depth(a: np.ndarray, thr: np.ndarray) -> int:
    """The number of terms the blocked Horner loop sums for every entry: the
    one minimising (terms for all) + (extra terms for the gathered rest), the
    distribution of |rho| estimated from an evenly strided sample."""
    n_max = thr.size - 1
    flat = a.reshape(-1)
    step = max(1, flat.size // 8192)
    sample = np.sort(flat[::step])
    # fraction of entries needing more than n terms, n = 0..n_max
    above = 1.0 - np.searchsorted(sample, thr, side="right") / max(sample.size, 1)
    cost = np.arange(n_max + 1) + _GATHER_COST * above * (n_max - np.arange(n_max + 1))
    return int(max(1, np.argmin(cost[1:]) + 1))


def mehler_sum(rho: np.ndarray, coef_a: np.ndarray, coef_b: np.ndarray, same: bool = False,
               tol: float = MEHLER_TOL) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``S_ik = sum_{n=1}^{n_ik} rho_ik^n c_n(i) c_n(k)`` (Eq. M3) for ``rho``
    clipped to [-1, 1], each entry cut after its own ``n_ik`` = the first n
    with ``|rho_ik|^(n+1) <= tol`` (at most ``coef.shape[0]`` terms).  By
    Cauchy-Schwarz the omitted remainder is
    ``|sum_{m>n} rho^m c_m(i) c_m(k)| <= |rho|^(n+1) sqrt(Var_i Var_k)``, so every
    entry is within ``tol sqrt(Var_i Var_k)`` of the full series.

    All entries go through a cache-blocked Horner loop of a common depth
    (chosen from a sample of ``|rho|``); the entries that need more terms are
    found block by block and completed from a gathered list.  Temporaries are
    of block size: the only full-size array is the result.  With ``same`` the
    diagonal is excluded from the term counts (its caller sets it exactly).
    Returns ``(S, (i, k))``, the indices of the entries whose series is not
    done after ``n_max`` terms (``|rho|^(n_max+1) > tol``)."""
    n_max = coef_a.shape[0]
    nr, nc = rho.shape
    thr = _thresholds(n_max, tol)
    flat = rho.reshape(-1)
    sample = np.abs(flat[:: max(1, flat.size // 8192)]) if flat.size else flat
    n1 = _common_depth(sample, thr) if flat.size else 1
    diag = same and nr == nc and nr > 1
    out = np.empty_like(rho)
    rows = max(1, MEHLER_BLOCK // max(nc, 1))
    tmp = np.empty((min(rows, nr), nc), dtype=rho.dtype)
    rbuf = np.empty_like(tmp)
    far_i, far_k = [], []
    for r0 in range(0, nr, rows):
        r1 = min(r0 + rows, nr)
        rb, ob, tb = rbuf[: r1 - r0], out[r0:r1], tmp[: r1 - r0]
        np.clip(rho[r0:r1], -1.0, 1.0, out=rb)
        np.multiply(coef_a[n1 - 1, r0:r1, None], coef_b[n1 - 1, None, :], out=ob)
        for n in range(n1 - 2, -1, -1):
            ob *= rb
            np.multiply(coef_a[n, r0:r1, None], coef_b[n, None, :], out=tb)
            ob += tb
        ob *= rb
        np.abs(rb, out=tb)  # the entries needing more than n1 terms (or the M3' tail)
        if diag:
            d = np.arange(r0, r1)
            tb[d - r0, d] = 0.0
        i, k = np.nonzero(tb > thr[n1])
        if i.size:
            far_i.append(i + r0)
            far_k.append(k)
    if not far_i:
        return out, (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp))
    i, k = np.concatenate(far_i), np.concatenate(far_k)
    r = np.clip(rho[i, k], -1.0, 1.0)
    ar = np.abs(r)
    if n1 < n_max:
        deepest = int(np.searchsorted(thr, float(ar.max()), side="left"))  # first n with thr[n] >= max |r|
        deepest = min(max(deepest, n1 + 1), n_max)
        p = r ** n1
        acc = np.zeros_like(r)
        for n in range(n1 + 1, deepest + 1):
            p *= r
            acc += p * coef_a[n - 1, i] * coef_b[n - 1, k]
        out[i, k] += acc
    tail = ar > thr[n_max]
    return out, (i[tail], k[tail])


def covariance_pm1(beta_a, gamma_a, beta_b, gamma_b, act):
    """Exact Cov(f(beta_i + |gamma_i| u), f(beta_k +- |gamma_k| u)) for ONE
    standard normal ``u``: the Mehler sums (Eq. M3) at rho = +1 and rho = -1,
    elementwise over broadcast arrays (Eq. M3').

    With ``f = const + sum_j s_j relu(z - a_j)`` (``RAMPS``) every term is a
    covariance of two ramps of ``u``, ``relu(u - t_i)`` and ``relu(+-u - t_k)``,
    ``t = (a - beta)/|gamma|``, a truncated-Gaussian integral of a quadratic:

    * ``E[relu(u - t_i) relu(u - t_k)] = (1 + t_i t_k) Q(T) - min(t_i, t_k) phi(T)``,
      ``T = max(t_i, t_k)``, ``Q = 1 - Phi``;
    * ``E[relu(u - t_i) relu(-u - t_k)] = int_L^U (u - L)(U - u) phi(u) du``,
      ``L = t_i``, ``U = -t_k`` (0 when ``L >= U``);
    * ``E[relu(u - t)] = phi(t) - t Q(t)``.

    Returns (cov_plus, cov_minus), or None when ``act`` is not piecewise linear.
    """
    if act not in RAMPS:
        return None
    ba, bb = np.asarray(beta_a, dtype=np.float64), np.asarray(beta_b, dtype=np.float64)
    ga, gb = np.abs(np.asarray(gamma_a, dtype=np.float64)), np.abs(np.asarray(gamma_b, dtype=np.float64))
    if act == "identity":
        g = ga * gb
        return g, -g
    sa, sb = np.where(ga > 0, ga, 1.0), np.where(gb > 0, gb, 1.0)
    plus, minus = 0.0, 0.0
    for s_j, a_j in RAMPS[act]:
        ti = (a_j - ba) / sa
        mi = _phi(ti) - ti * ndtr(-ti)
        for s_l, a_l in RAMPS[act]:
            tk = (a_l - bb) / sb
            mk = _phi(tk) - tk * ndtr(-tk)
            hi_t, lo_t = np.maximum(ti, tk), np.minimum(ti, tk)
            e_plus = (1 + ti * tk) * ndtr(-hi_t) - lo_t * _phi(hi_t)
            lo, up = ti, -tk
            i0 = np.where(lo > 0, ndtr(-lo) - ndtr(-up), ndtr(up) - ndtr(lo))
            i1 = _phi(lo) - _phi(up)
            i2 = i0 + lo * _phi(lo) - up * _phi(up)
            e_minus = np.where(lo < up, -(i2 - (lo + up) * i1 + lo * up * i0), 0.0)
            w = s_j * s_l
            plus = plus + w * (e_plus - mi * mk)
            minus = minus + w * (e_minus - mi * mk)
    g = ga * gb
    return g * plus, g * minus


def activation_covariance(rho, coef_a, coef_b, var_a=None, var_b=None, same=False, marginals=None):
    """Cov(f(z_i), g(z_k)) = sum_n rho_ik^n c_n(f_i) c_n(g_k) (Eq. M3).

    rho : (A, B) correlation of the standardised pre-activations;
    coef_a (n, A), coef_b (n, B) from :func:`hermite_coefficients`.
    Each entry's series stops after the first term ``n`` with
    ``|rho|^(n+1) <= tol`` (at most ``N_HERMITE`` terms; :func:`mehler_sum`),
    ``tol = MEHLER_TOL`` (1e-10) for float64 ``rho``, ``MEHLER_TOL32`` (float32
    resolution) for float32 ``rho``: the omitted part of an entry is below
    ``tol sqrt(Var_i Var_k)``.  The result has ``rho``'s float dtype.
    ``marginals = (beta_a, gamma_a, beta_b, gamma_b, act)`` (the BN marginals of
    the two sets) adds, for the entries still above ``tol`` after ``N_HERMITE``
    terms, the remainder of the series as
    ``|rho|^(n+1) R_+-``, with ``R_+ = Cov_{rho=1} - sum_n c_n c_n`` and
    ``R_- = Cov_{rho=-1} - sum_n (-1)^n c_n c_n`` its exact values at rho = +-1
    (:func:`covariance_pm1`, float64; Eq. M3'): exact at rho in {-1, 0, 1} for
    any two marginals.  ``same=True`` (the two sets are the same channels) puts
    the exact variance ``var_a`` on the diagonal.
    """
    rho = np.asarray(rho)
    dt = rho.dtype if rho.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    rho = rho.astype(dt, copy=False)  # clipped to [-1, 1] inside mehler_sum, block by block
    n_terms = coef_a.shape[0]
    out, (i, k) = mehler_sum(rho, coef_a.astype(dt), coef_b.astype(dt), same,
                             MEHLER_TOL if dt == np.float64 else MEHLER_TOL32)
    if marginals is not None and i.size:
        beta_a, gamma_a, beta_b, gamma_b, act = marginals
        pm = covariance_pm1(np.asarray(beta_a)[i], np.asarray(gamma_a)[i], np.asarray(beta_b)[k],
                            np.asarray(gamma_b)[k], act)
        if pm is not None:
            sign = np.where(np.arange(1, n_terms + 1) % 2 == 1, -1.0, 1.0)
            ca, cb = np.asarray(coef_a, dtype=np.float64), np.asarray(coef_b, dtype=np.float64)
            s_plus, s_minus = np.empty(i.size), np.empty(i.size)
            for r in range(0, i.size, _PM_CHUNK):  # (n_terms, chunk) temporaries
                prod = ca[:, i[r:r + _PM_CHUNK]] * cb[:, k[r:r + _PM_CHUNK]]
                s_plus[r:r + _PM_CHUNK] = prod.sum(0)
                s_minus[r:r + _PM_CHUNK] = sign @ prod
            rr = np.clip(rho[i, k].astype(np.float64), -1.0, 1.0)
            rem = np.where(rr >= 0, pm[0] - s_plus, pm[1] - s_minus)  # R_+ or R_-
            out[i, k] += (np.abs(rr) ** (n_terms + 1) * rem).astype(dt)
    if same and var_a is not None:
        np.fill_diagonal(out, var_a)
    return out
