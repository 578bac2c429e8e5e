"""Independent references for the math tests (``test_math_*.py``).

Nothing here imports ``udfc_ref``: the data model's assumptions are simulated
with their own sampler (separable AR(1) Gaussian fields, explicit
convolution and pooling loops) and the closed forms are checked against
numerical quadrature (``scipy.integrate``).  Monte-Carlo helpers return a
standard error from independent replicates so that every tolerance follows
from the sample size.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate

_SQRT2PI = math.sqrt(2 * math.pi)


def pdf(u):
    return math.exp(-0.5 * u * u) / _SQRT2PI


def cdf(u):
    return 0.5 * math.erfc(-u / math.sqrt(2))

CLIP = {"relu": (0.0, math.inf), "relu6": (0.0, 6.0), "identity": (-math.inf, math.inf)}


# ----------------------------------------------------------------- sampling

def ar1_root(n: int, rho: float) -> np.ndarray:
    """Cholesky root of the (n, n) AR(1) correlation matrix rho^|i - j|."""
    i = np.arange(n)
    return np.linalg.cholesky(rho ** np.abs(i[:, None] - i[None, :]) + 1e-12 * np.eye(n))


def ar_fields(rng, n, c, h, w, rho, cov_c=None, mean=None) -> np.ndarray:
    """``n`` stationary Gaussian fields (n, c, h, w) with
    ``Cov(x[c, y, x], x[c', y', x']) = cov_c[c, c'] rho^(|y - y'| + |x - x'|)``
    (separable: an AR(1) process along each axis)."""
    z = rng.standard_normal((n, c, h, w))
    z = np.einsum("ij,ncjw->nciw", ar1_root(h, rho), z)
    z = np.einsum("ncij,wj->nciw", z, ar1_root(w, rho))
    if cov_c is not None:
        z = np.einsum("cd,ndhw->nchw", np.linalg.cholesky(cov_c), z)
    if mean is not None:
        z = z + np.asarray(mean)[None, :, None, None]
    return z


def conv(x, w, stride=(1, 1), dilation=(1, 1)) -> np.ndarray:
    """Valid cross-correlation (no padding) by an explicit loop over the
    kernel taps: x (n, C, H, W), w (O, C, kh, kw) -> (n, O, Ho, Wo)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo))
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, :, ky * dh: ky * dh + sh * (ho - 1) + 1: sh, kx * dw: kx * dw + sw * (wo - 1) + 1: sw]
            out += np.einsum("oc,nchw->nohw", w[:, :, ky, kx], patch)
    return out


def pool(x, k, s, op="avg") -> np.ndarray:
    """k x k pooling of stride s (no padding) by stacking the window taps."""
    n, c, h, w = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    taps = np.stack([x[:, :, i: i + s * (ho - 1) + 1: s, j: j + s * (wo - 1) + 1: s]
                     for i in range(k) for j in range(k)])
    return taps.max(0) if op == "max" else taps.mean(0)


def lag1_correlation(v, mean=None):
    """Lag-1 spatial correlation of fields v (n, C, H, W), variance weighted
    over channels and averaged over the vertical and horizontal lag:
    ``sum_c Cov(v_c(p), v_c(p + e)) / sum_c Var v_c``.

    Returns (estimate, standard error); the error is the delta-method
    standard error over the n independent fields."""
    v = np.asarray(v, dtype=np.float64)
    if mean is None:
        mean = v.mean(axis=(0, 2, 3))
    v = v - np.asarray(mean)[None, :, None, None]
    num = 0.5 * ((v[:, :, 1:] * v[:, :, :-1]).mean(axis=(2, 3)) + (v[:, :, :, 1:] * v[:, :, :, :-1]).mean(axis=(2, 3)))
    num, den = num.sum(1), (v * v).mean(axis=(2, 3)).sum(1)  # per field
    r = num.mean() / den.mean()
    resid = (num - r * den) / den.mean()
    return float(r), float(resid.std() / math.sqrt(len(num)))


# ----------------------------------------------------------------- quadrature

def clip(z, act):
    lo, hi = CLIP[act]
    return min(max(z, lo), hi)


def _kinks(beta, slope, act):
    """u where f(beta + slope * u) has a kink."""
    return [(t - beta) / slope for t in CLIP[act] if math.isfinite(t)] if slope != 0 else []


def _quad(fn, kinks):
    """int fn(u) phi(u) du over the real line, split at the kinks."""
    pts = sorted(k for k in kinks if -40 < k < 40)
    edges = [-math.inf] + pts + [math.inf]
    tot = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        tot += integrate.quad(lambda u: fn(u) * pdf(u), a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    return tot


def moments_quad(beta, gamma, act):
    """E f(z), Var f(z) for z ~ N(beta, gamma^2) by quadrature."""
    k = _kinks(beta, gamma, act)
    m = _quad(lambda u: clip(beta + gamma * u, act), k)
    m2 = _quad(lambda u: clip(beta + gamma * u, act) ** 2, k)
    return m, m2 - m * m


def clipped_mean(m, s, act):
    """E clip(N(m, s^2)) written out with math.erfc (for the inner
    integral of :func:`cov_quad`)."""
    lo, hi = CLIP[act]
    if s <= 0:
        return clip(m, act)
    a, b = (lo - m) / s, (hi - m) / s
    pa = cdf(a) if math.isfinite(a) else 0.0
    pb = cdf(b) if math.isfinite(b) else 1.0
    da = pdf(a) if math.isfinite(a) else 0.0
    db = pdf(b) if math.isfinite(b) else 0.0
    out = m * (pb - pa) + s * (da - db)
    if math.isfinite(lo):
        out += lo * pa
    if math.isfinite(hi):
        out += hi * (1 - pb)
    return out


def cov_quad(b1, g1, b2, g2, rho, act):
    """Cov(f(b1 + g1 u1), f(b2 + g2 u2)) for standard normal (u1, u2) with
    correlation rho, by a 1-D quadrature over u1 of ``f(z1) E[f(z2) | u1]``."""
    m1 = moments_quad(b1, g1, act)[0]
    m2 = moments_quad(b2, g2, act)[0]
    s = math.sqrt(max(0.0, 1 - rho * rho))
    kinks = _kinks(b1, g1, act)
    if s == 0:
        kinks += _kinks(b2, g2 * rho, act)
    e = _quad(lambda u: clip(b1 + g1 * u, act) * clipped_mean(b2 + g2 * rho * u, abs(g2) * s, act), kinks)
    return e - m1 * m2


def ridge_residual(u, z, cols, ridge):
    """Eq. S5's objective for the input columns ``cols``, written out: the
    mean squared residual of the ridge least squares of ``z`` (S, O) on
    ``u[:, cols]`` with an intercept, penalty ``ridge * Var(u_j)`` on column
    j's coefficient -- by ``np.linalg.lstsq`` on the rows augmented with
    ``sqrt(ridge * S * Var(u_j)) e_j`` (no closed form, no partitioned inverse)."""
    s = u.shape[0]
    uc = u[:, cols] - u[:, cols].mean(0)
    zc = z - z.mean(0)
    d = (uc ** 2).mean(0)
    au = np.r_[uc, np.diag(np.sqrt(ridge * s * d))]
    az = np.r_[zc, np.zeros((len(cols), z.shape[1]))]
    sol = np.linalg.lstsq(au, az, rcond=None)[0]
    return float(((az - au @ sol) ** 2).sum() / s)


def best_subset(u, z, n, n_keep, ridge, alive=None):
    """Eq. S5's exact minimiser replayed with :func:`ridge_residual`: every
    set of ``n_keep`` of the ``alive`` channels (default all ``n``) refitted
    from scratch; the first of the smallest residual in lexicographic order."""
    import itertools

    r = u.shape[1] // n
    alive = range(n) if alive is None else alive
    sets = list(itertools.combinations(sorted(alive), n_keep))
    res = [ridge_residual(u, z, [c for i in k for c in range(i * r, (i + 1) * r)], ridge) for k in sets]
    return list(sets[int(np.argmin(res))])


def backward_elimination(u, z, n, n_keep, ridge, alive=None):
    """Eq. S5's selection replayed with :func:`ridge_residual`: from the
    ``alive`` channels (default all ``n``; channel i owns the contiguous
    columns ``[i R, (i + 1) R)``), drop the channel whose removal leaves the
    smallest residual until ``n_keep`` remain (ties: the lower index)."""
    r = u.shape[1] // n
    kept = list(range(n)) if alive is None else list(alive)
    while len(kept) > n_keep:
        res = [ridge_residual(u, z, [c for i in kept if i != j for c in range(i * r, (i + 1) * r)], ridge)
               for j in kept]
        del kept[int(np.argmin(res))]
    return sorted(kept)
