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

from .datamodel import gram_sym
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


def _absmax(a: np.ndarray) -> float:
    """max |a| without an |a| temporary (0 for an empty array)."""
    return max(float(a.max(initial=0.0)), -float(a.min(initial=0.0)))


def _blocks(n: int, size: int = 256) -> list:
    """Slices covering range(n) in blocks of ``size`` rows (bounded temporaries)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


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
    # results), so weights near the float limit cannot overflow the squares below; ordinary weights
    # are left as they are (the same bits, no scaled copies)
    c = _pow2(max(_absmax(W), _absmax(Wq)))
    c = c if not 2.0**-100 <= c <= 2.0**100 else 1.0
    A = im.cached(W)  # (Sigma_x W^T) as (N, K, C), as the data model computed it for this layer
    if A is not None and c != 1.0:
        A = A / c  # exact (a power of two), unless it overflowed unscaled
        A = A if np.all(np.isfinite(A)) else None
    if c != 1.0:
        W, Wq = W / c, Wq / c
        extra_shift = None if extra_shift is None else extra_shift / c
    if A is None:
        A = im.cov_times(W)
    n, m = W.shape[0], Wq.shape[0]
    dt = A.dtype  # the data model's precision (float32 fast path, float64 exact reference)
    Wq_t = np.ascontiguousarray(Wq.transpose(0, 2, 1), dtype=dt).reshape(m, -1)
    G = np.einsum("nkc,nck->n", A, W, dtype=np.float64)  # diag(W Sigma_x W^T), float64 (W may be float32)
    s = np.sqrt(np.clip(G, 0, None))
    Gq = gram_sym(im.cov_times_kc(Wq_t.reshape(m, Wq.shape[2], Wq.shape[1])).reshape(m, -1), Wq_t)  # G~, symmetric
    sq = np.sqrt(np.clip(np.diag(Gq).astype(np.float64), 0, None))
    rho_x = A.reshape(n, -1) @ Wq_t.T  # G_x = W Sigma_x W~^T, normalised in place below
    # sign of gamma flips the sign of u: rho = sgn_i sgn_k G_ik / (s_i s_k), 0 where s_i s_k = 0
    sgn = np.where(gamma < 0, -1.0, 1.0)
    inv_s = np.where(s > 0, sgn / np.where(s > 0, s, 1.0), 0.0)
    inv_sq = np.where(sq > 0, sgn[kept] / np.where(sq > 0, sq, 1.0), 0.0)
    rho_x *= inv_s.astype(dt)[:, None]
    rho_x *= inv_sq.astype(dt)[None, :]
    rho_q = Gq
    rho_q *= inv_sq.astype(dt)[:, None]
    rho_q *= inv_sq.astype(dt)[None, :]
    np.fill_diagonal(rho_q, 1.0)
    sk = s[kept]
    shift = np.concatenate([im.mean_dot(Wq[r] - W[kept[r]]) for r in _blocks(m)])  # E[x] . (W~_k - W_k)
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
    cov_q = activation_covariance(rho_q, cq, cq, var_q, var_q, same=True,
                                  marginals=(bq, gq, bq, gq, act)).astype(np.float64, copy=False)
    cross = activation_covariance(rho_x, ca, cq, marginals=(b, g, bq, gq, act)).astype(np.float64, copy=False)
    return PairStats(mean_a, var_a, mean_q, cov_q, cross, kept)


def chain_stats(values, kept) -> PairStats:
    """Statistics of a depthwise chain's output from the propagated data model
    (A4): the kept channels are taken as undamaged (their quantization is not
    modelled across the chain), so C~ = Cov(a_K), X = Cov(a, a_K)."""
    kept = np.asarray(kept)
    cov = values.cov  # float32 on the fast path: the solve (U1-U4) runs in float64 on both paths
    var = np.diag(cov).astype(np.float64)
    return PairStats(values.mean.copy(), var, values.mean[kept].copy(), cov[np.ix_(kept, kept)].astype(np.float64),
                     cov[:, kept].astype(np.float64), kept)


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


def udfc_full(st: PairStats, n: int, alpha1: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Eq. C6 (sequential calibration): every row of T -- kept channels too --
    the ridge least squares on all kept channels,
    (C~ + alpha1 diag C~) T^T = X^T,  t = E[a] - T E[a~_K].
    With measured statistics a kept channel a_i is not its own compressed
    copy a~_i (upstream pairs and quantization changed it), so (U1)'s
    one-coefficient rows leave error that the other kept channels explain."""
    vq = np.diag(st.cov_q)
    T = _solve_psd(st.cov_q + alpha1 * np.diag(vq), st.cross.T).T
    return T, st.mean_a - T @ st.mean_q


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
