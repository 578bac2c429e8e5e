"""Compensation: the matrix T and intercept t that rebuild every channel of a
pair from the kept (possibly quantized) channels (derivation sections 6-7).

Reconstruction form (Eq. R1): the original activations ``a`` (N channels) are
estimated from the compressed kept activations ``a~_K`` as
``a_hat = T a~_K + t``, and the consumer absorbs it (Eq. R2):

    W'_new[:, k] = sum_i W'[:, i] T[i, k]        b'_new = b' + sum_i W'[:, i] t_i

UDFC coefficients (Eq. U1-U4), with C~ = Cov(a~_K), X = Cov(a, a~_K):

* quantized kept channel i (the paper's S'):
  s'_i = (X[i, i] + alpha2 Var a~_i) / ((1 + alpha2) Var a~_i)
* pruned channels P, all at once (the paper's S), one rank-aware solve:
  (C~ + alpha1 diag C~) S = X[P]^T
* intercept: t = E[a] - T E[a~_K]

Neuron Merging (Eq. N1-N2, merge scale kappa) and plain dropping fill the same T, t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .moments import activation_covariance, activation_mean_var, hermite_coefficients


@dataclass
class PairStats:
    """Second-order statistics of one pair under the data model.

    Shapes: N channels, M kept channels."""

    mean_a: np.ndarray  # (N,)  E[a_i]
    var_a: np.ndarray  # (N,)  Var a_i
    mean_q: np.ndarray  # (M,)  E[a~_k]
    cov_q: np.ndarray  # (M, M) Cov(a~_K)
    cross: np.ndarray  # (N, M) Cov(a_i, a~_k)
    kept: np.ndarray  # (M,) indices of the kept channels in 0..N-1


def _pow2(x: float) -> float:
    """The largest power of two <= ``x`` (1.0 for 0, Inf or NaN): dividing by it is exact."""
    return math.ldexp(1.0, math.frexp(x)[1] - 1) if 0 < x < math.inf else 1.0


def _safe_div(a, b):
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def pair_stats(W, Wq, im, gamma, beta, act, kept, extra_shift=None) -> PairStats:
    """Eq. D4-D5 + M1-M3: statistics of the original and compressed activations.

    Parameters
    ----------
    W : (N, C, K) original filters of the producer (all channels).
    Wq : (M, C, K) compressed filters of the kept channels, in the original
        input coordinates (quantization error embedded; equals W[kept] when
        not quantized).
    im : datamodel.InputModel of the producer's input.
    gamma, beta : (N,) BN affine parameters.
    act : "relu" | "relu6" | "identity".
    kept : (M,) kept channel indices.
    extra_shift : (M,) optional pre-BN mean shift added to the compressed
        channels (e.g. minus a bias correction); in the units of W x.
    """
    kept = np.asarray(kept)
    # every output below is invariant to one common scale of W, Wq and the shift (s, sq, shift scale
    # alike; rho, delta, scale are ratios): a power of two divides out exactly (bit-identical
    # results), so weights near the float limit cannot overflow the squares below
    c = _pow2(max(float(np.abs(W).max(initial=0.0)), float(np.abs(Wq).max(initial=0.0))))
    if c != 1.0:
        W, Wq = W / c, Wq / c
        extra_shift = None if extra_shift is None else extra_shift / c
    A = im.cov_times(W)  # (Sigma_x W^T) as (N, K, C), computed once
    Wq_t = Wq.transpose(0, 2, 1).reshape(Wq.shape[0], -1)
    G = np.einsum("nkc,nkc->n", A, W.transpose(0, 2, 1))
    s = np.sqrt(np.clip(G, 0, None))
    Gq = im.cov_times(Wq).reshape(Wq.shape[0], -1) @ Wq_t.T
    sq = np.sqrt(np.clip(np.diag(Gq), 0, None))
    Gx = A.reshape(A.shape[0], -1) @ Wq_t.T
    rho_q = _safe_div(Gq, np.outer(sq, sq))
    np.fill_diagonal(rho_q, 1.0)
    rho_x = _safe_div(Gx, np.outer(s, sq))
    sk = s[kept]
    shift = im.mean_dot(Wq - W[kept])
    if extra_shift is not None:
        shift = shift + extra_shift
    delta = _safe_div(shift, sk)  # Eq. D5: mean of u~_k
    scale = _safe_div(sq, sk)  # std of u~_k
    scale = np.where(sk > 0, scale, 1.0)
    g, b = np.abs(gamma), beta
    mean_a, var_a = activation_mean_var(b, g, act)
    bq = b[kept] + gamma[kept] * delta
    gq = g[kept] * scale
    mean_q, var_q = activation_mean_var(bq, gq, act)
    ca = hermite_coefficients(b, g, act)
    cq = hermite_coefficients(bq, gq, act)
    # sign of gamma flips the sign of u
    sgn = np.where(gamma < 0, -1.0, 1.0)
    rho_x = rho_x * sgn[:, None] * sgn[kept][None, :]
    rho_q = rho_q * sgn[kept][:, None] * sgn[kept][None, :]
    cov_q = activation_covariance(rho_q, cq, cq, var_q, var_q, same=True, marginals=(bq, gq, bq, gq, act))
    cross = activation_covariance(rho_x, ca, cq, marginals=(b, g, bq, gq, act))
    return PairStats(mean_a, var_a, mean_q, cov_q, cross, kept)


def chain_stats(values, kept) -> PairStats:
    """Statistics of a depthwise chain's output from the propagated data model
    (A4): the kept channels are taken as undamaged (their quantization is not
    modelled across the chain), so C~ = Cov(a_K), X = Cov(a, a_K)."""
    kept = np.asarray(kept)
    var = np.diag(values.cov).copy()
    return PairStats(values.mean.copy(), var, values.mean[kept].copy(), values.cov[np.ix_(kept, kept)].copy(),
                     values.cov[:, kept].copy(), kept)


def objective(st: PairStats, T: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Eq. E1: per-channel reconstruction error E[(a_i - T_i a~_K - t_i)^2], (N,)."""
    quad = ((T @ st.cov_q) * T).sum(axis=1)
    lin = (T * st.cross).sum(axis=1)
    bias = st.mean_a - T @ st.mean_q - t
    return np.maximum(st.var_a - 2 * lin + quad, 0.0) + bias**2


def drop(st: PairStats, n: int) -> tuple[np.ndarray, np.ndarray]:
    """method='none': kept channels pass through, pruned ones vanish."""
    T = np.zeros((n, st.kept.size))
    T[st.kept, np.arange(st.kept.size)] = 1.0
    return T, np.zeros(n)


def udfc(st: PairStats, n: int, alpha1: float = 0.01, alpha2: float = 0.008) -> tuple[np.ndarray, np.ndarray]:
    """Eq. U1-U4: the closed-form minimiser of
    l_re(T, t) = sum_i E[(a_i - T_i a~_K - t_i)^2]
                 + alpha1 sum_{j in P} sum_k Var(a~_k) T_jk^2
                 + alpha2 sum_{i in K} Var(a~_i) (T_ii - 1)^2
    with kept rows restricted to one coefficient (T_ik = 0 for k != i)."""
    kept = st.kept
    m = kept.size
    T = np.zeros((n, m))
    vq = np.diag(st.cov_q)
    xk = st.cross[kept, np.arange(m)]
    T[kept, np.arange(m)] = np.where(vq > 0, (xk + alpha2 * vq) / np.where(vq > 0, (1 + alpha2) * vq, 1.0), 1.0)
    pruned = np.setdiff1d(np.arange(n), kept)
    if pruned.size:
        A = st.cov_q + alpha1 * np.diag(vq)
        B = st.cross[pruned].T  # (M, P)
        S = _solve_psd(A, B)
        T[pruned] = S.T
    t = st.mean_a - T @ st.mean_q
    return T, t


def _solve_psd(A, B):
    """Solve A S = B for symmetric PSD A (Eq. U4): Cholesky when the factor's
    diagonal says A is well conditioned (ratio^2 < 1e10, a lower bound of
    cond(A)), else a rank-aware least squares (SVD, relative cut-off 1e-10)
    returning the minimum-norm solution."""
    scale = np.max(np.abs(np.diag(A))) if A.size else 0.0
    if scale <= 0:
        return np.zeros_like(B)
    p = _pow2(scale)
    A, B = A / p, B / p  # exact: S is unchanged, the factorisations see entries of order 1
    try:
        c = scipy.linalg.cho_factor(A, check_finite=False)
        d = np.abs(np.diag(c[0]))
        # cond(A) >= (max d / min d)^2 for the Cholesky factor's diagonal d
        if d.min() > 0 and (d.max() / d.min()) ** 2 < 1e10:
            S = scipy.linalg.cho_solve(c, B, check_finite=False)
            if np.all(np.isfinite(S)):
                return S
    except np.linalg.LinAlgError:
        pass
    return scipy.linalg.lstsq(A, B, cond=1e-10, check_finite=False)[0]


def neuron_merging(W, gamma, beta, mean, sigma, kept, lam: float = 0.85, threshold: float = 0.1):
    """Neuron Merging (Kim et al. 2020), BN-aware (Eq. N1-N2).

    For each pruned filter j and kept candidate c: cosine distance of the raw
    filters, scale s = ||W_j|| / ||W_c||, BN-aware merge scale
    kappa = s gamma_j sigma_c / (gamma_c sigma_j) (so that z_j = kappa z_c + const
    when W_j = s W_c), constant mismatch in units of z_c B = |b_c - b_j / kappa|
    with b = beta - gamma mu / sigma, min-max normalised over candidates; pick
    argmin lam*cos_dist + (1-lam)*B, skip when cosine similarity < threshold or
    kappa <= 0. Returns T (N, M), t = 0."""
    n = W.shape[0]
    kept = np.asarray(kept)
    m = kept.size
    T = np.zeros((n, m))
    T[kept, np.arange(m)] = 1.0
    pruned = np.setdiff1d(np.arange(n), kept)
    if pruned.size == 0:
        return T, np.zeros(n)
    f = W.reshape(n, -1)
    f = f / _pow2(float(np.abs(f).max(initial=0.0)))  # exact; cos and s are scale-free
    norms = np.linalg.norm(f, axis=1)
    unit = f / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit[pruned] @ unit[kept].T  # (P, M)
    s = norms[pruned][:, None] / np.where(norms[kept] > 0, norms[kept], 1.0)[None, :]
    kappa = s * (gamma[pruned][:, None] * sigma[kept][None, :]) / np.where(
        gamma[kept] != 0, gamma[kept], np.inf)[None, :] / sigma[pruned][:, None]
    bbar = beta - gamma * mean / sigma
    B = np.abs(bbar[kept][None, :] - _safe_div(bbar[pruned][:, None], kappa))
    lo, hi = B.min(1, keepdims=True), B.max(1, keepdims=True)
    Bn = np.where(hi > lo, (B - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    score = lam * (1 - cos) + (1 - lam) * Bn
    score = np.where(kappa > 0, score, np.inf)
    best = np.argmin(score, axis=1)
    ok = (cos[np.arange(pruned.size), best] >= threshold) & np.isfinite(score[np.arange(pruned.size), best])
    T[pruned[ok], best[ok]] = kappa[np.arange(pruned.size), best][ok]
    return T, np.zeros(n)
