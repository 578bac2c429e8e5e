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

#: the Mehler remainder is modelled where |rho|^(n+1) can exceed this (Eq. M3')
TAIL_TOL = 1e-10


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


def _terms_needed(rho, n_max, same, tol=1e-10):
    """How many Hermite terms matter: |rho|^n below ``tol`` past that (the
    diagonal of a same-channel matrix, rho = 1, is set exactly anyway)."""
    a = np.abs(rho)
    if same and a.shape[0] == a.shape[1] and a.shape[0] > 1:
        a = a.copy()
        np.fill_diagonal(a, 0.0)
    rmax = float(a.max()) if a.size else 0.0
    if rmax >= 1.0 - 1e-12:
        return n_max
    if rmax <= 0.0:
        return 1
    return int(min(n_max, max(1, np.ceil(np.log(tol) / np.log(rmax)))))


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
    The series stops after the term where ``max |rho|^n`` falls below 1e-10
    (at most ``N_HERMITE`` terms).
    ``marginals = (beta_a, gamma_a, beta_b, gamma_b, act)`` (the BN marginals of
    the two sets) adds the remainder of the series as
    ``|rho|^(n+1) R_+-``, with ``R_+ = Cov_{rho=1} - sum_n c_n c_n`` and
    ``R_- = Cov_{rho=-1} - sum_n (-1)^n c_n c_n`` its exact values at rho = +-1
    (:func:`covariance_pm1`; Eq. M3'): exact at rho in {-1, 0, 1} for any two
    marginals.  It is evaluated only for the pairs with ``|rho|^(n+1) >
    TAIL_TOL``.  ``same=True`` (the two sets are the same channels) puts the
    exact variance ``var_a`` on the diagonal.
    """
    rho = np.clip(np.asarray(rho, dtype=np.float64), -1.0, 1.0)
    n_terms = _terms_needed(rho, coef_a.shape[0], same)
    # Horner: sum_n rho^n A_n = rho (A_1 + rho (A_2 + ... rho (A_n + rho * tail)))
    out = np.zeros_like(rho)
    if marginals is not None:
        a = np.abs(rho)
        if same and a.shape[0] == a.shape[1]:
            a = a.copy()
            np.fill_diagonal(a, 0.0)
        i, k = np.nonzero(a ** (n_terms + 1) > TAIL_TOL)
        beta_a, gamma_a, beta_b, gamma_b, act = marginals
        pm = covariance_pm1(np.asarray(beta_a)[i], np.asarray(gamma_a)[i], np.asarray(beta_b)[k],
                            np.asarray(gamma_b)[k], act) if i.size else None
        if pm is not None:
            prod = coef_a[:n_terms, i] * coef_b[:n_terms, k]
            sign = np.where(np.arange(1, n_terms + 1) % 2 == 1, -1.0, 1.0)[:, None]
            r_plus = pm[0] - prod.sum(0)
            r_minus = pm[1] - (sign * prod).sum(0)
            out[i, k] = np.where(rho[i, k] >= 0, r_plus, (-1.0) ** (n_terms + 1) * r_minus)
    for n in range(n_terms - 1, -1, -1):
        out *= rho
        out += coef_a[n][:, None] * coef_b[n][None, :]
    out *= rho
    if same and var_a is not None:
        np.fill_diagonal(out, var_a)
    return out
