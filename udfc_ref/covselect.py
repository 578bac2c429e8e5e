"""Channel selection by reconstruction (derivation Eq. S4, S5): keep the
channels from which the pruned ones are best rebuilt (S4), or -- with
calibration images and the consumer's refit (Eq. C7) -- those whose consumer
input best gives the original consumer's output (S5,
:func:`select_by_output`).

The compensation rebuilds every pruned channel by least squares from the
kept ones (Eq. U2), so the error it leaves depends on *which* channels are
kept as much as on how they are combined.  The weight-norm criteria (Eq. S1)
do not look at that.  Criterion ``"cov"`` chooses the kept set ``K`` that
greedily minimises the consumer-weighted residual variance of Eq. E2,

    sum_i w_i Var(a_i | a_K),     w_i = ||W'_{:, i, :}||_F^2,

under the same statistics the solver reads (the data model's ``Cov(a)``, or
the measured one with calibration images): forward selection, one channel at
a time, the one whose addition lowers the objective most -- a weighted
pivoted Cholesky of ``Cov(a)``.  Each step is one rank-one update of the
residual covariance (Schur complement), ``O(N^2)``; ``O(N^2 M)`` in all.

S5 minimises the residual ``E(K)`` of the consumer's refit instead: over
every kept set when there are few (:data:`EXACT_SUBSETS`,
:data:`EXACT_WORK`: the 8- and 16-channel pairs), by backward elimination
with partitioned-inverse downdates otherwise.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.linalg import solve_triangular

from .select import DEAD_GAMMA


def select_by_covariance(cov: np.ndarray, weights: np.ndarray, ratio: float = 0.0, scores=None, gamma=None,
                         min_keep: int = 1, n_keep: int | None = None) -> np.ndarray:
    """Indices (sorted) of the channels kept, Eq. S4.

    Parameters
    ----------
    cov : (N, N) covariance of the pair's channels where the consumers read them.
    weights : (N,) consumer column energies ``w_i`` (Eq. E2).
    ratio, gamma, min_keep : as :func:`select.select_kept` -- the same number
        of channels is kept, dead channels (|gamma| <= 1e-12) are pruned first.
    scores : (N,) weight-norm scores (Eq. S1), used only to fill the kept set
        when the residual variance is exhausted (every remaining channel is a
        linear function of the kept ones) and to break ties (None: by index).
    n_keep : keep exactly this many (``ratio`` and ``min_keep`` are then
        ignored): the count the pair's unit chose (a budget's ratio).

    Greedy step: the residual covariance ``R`` (initially ``Cov(a)``) loses,
    when channel ``j`` joins ``K``, ``R_{:,j} R_{j,:} / R_jj``; the objective
    drops by ``sum_i w_i R_ij^2 / R_jj``, and the ``j`` with the largest drop
    is taken.
    """
    n = cov.shape[0]
    scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
    dead = np.zeros(n, bool) if gamma is None else (np.abs(gamma) <= DEAD_GAMMA)
    if n_keep is None:
        n_prune = int(np.floor(ratio * n + 0.5))
        if ratio > 0:
            n_prune = max(n_prune, int(dead.sum()))
        n_prune = min(n_prune, n - max(1, min_keep))
        n_keep = n - n_prune
    if n_keep >= n:
        return np.arange(n)
    R = np.array(cov, dtype=np.float64, copy=True)
    R = (R + R.T) / 2
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    scale = float(np.max(np.diag(R))) if n else 0.0
    tol = 1e-12 * scale if scale > 0 else 0.0
    chosen = np.zeros(n, bool)
    blocked = dead.copy()
    kept = []
    for _ in range(n_keep):
        d = np.diag(R)
        live = (d > tol) & ~chosen & ~blocked
        if not live.any():
            break
        gain = np.where(live, (w[:, None] * R * R).sum(0) / np.where(live, d, 1.0), -np.inf)
        j = int(np.argmax(gain))
        kept.append(j)
        chosen[j] = True
        R -= np.outer(R[:, j], R[j, :]) / d[j]
    if len(kept) < n_keep:  # the rest are (numerically) combinations of the kept ones: by score, dead last
        key = np.where(chosen, np.inf, np.where(dead, -np.inf, scores))
        order = np.lexsort((np.arange(n), -key))  # highest score first
        extra = [i for i in order if not chosen[i]][: n_keep - len(kept)]
        kept += list(extra)
    return np.sort(np.asarray(kept, dtype=np.int64))


#: Eq. S5 searches every kept set exactly (instead of eliminating backwards) when there are at most this many ...
EXACT_SUBSETS = 20_000
#: ... and the subsets' Cholesky factors together take at most this much work, sum over subsets of (k R)^3
#: (16 channels with a 3x3 kernel at 50 %: 12,870 subsets x 72^3 = 4.8e9, 1.7-2.5 s measured on one core)
EXACT_WORK = 5e9
#: entries of the (sets, |K| R, |K| R) stack the exact search factors at a time (32 MiB of float64)
EXACT_CHUNK = 4_000_000


def select_by_output(cov_u: np.ndarray, cov_uz: np.ndarray, n_channels: int, n_keep: int, ridge: float,
                     gamma=None, scores=None, exact: bool = True) -> np.ndarray:
    """Indices (sorted) of the channels kept, Eq. S5: the set whose consumer
    input best gives the original consumer's output, by the ridge least
    squares the consumer is then refitted with (Eq. C7).

    Parameters
    ----------
    cov_u : (D, D) ``Cov(u)`` of the consumer's input rows (im2col patches or
        flattened values); its columns are ``n_channels`` contiguous blocks of
        ``R = D / n_channels`` columns, one block per channel of the pair.
    cov_uz : (D, O) ``Cov(u, z)`` with the original consumer's output ``z``.
    n_keep : channels kept (the pair's own count).
    ridge : ``lambda`` of Eq. C7: ``A = Cov(u) + lambda diag Cov(u)``.
    gamma, scores : dead channels (|gamma| <= 1e-12) are pruned first; when
        fewer than ``n_keep`` channels are alive, the dead ones with the highest
        ``scores`` (Eq. S1) fill the set.
    exact : minimise ``E(K)`` over every kept set of the live channels when
        that is small (:func:`_exact_fits`: at most :data:`EXACT_SUBSETS` sets
        and :data:`EXACT_WORK`); otherwise, or with False, backward elimination.

    ``E(K) = tr Cov(z) - tr(C_K^T A_KK^-1 C_K)`` is the refit's residual.
    Exact search (:func:`_exact_subset`): ``E`` of every set from a batched
    Cholesky factor of ``A_KK``; the first minimiser in lexicographic order.
    Backward elimination: starting from all live channels, the block ``b``
    whose removal raises ``E(K)`` least is removed, until ``n_keep`` remain.
    With ``P = A_KK^-1`` and the
    current coefficients ``B = P C_K`` the rise is ``tr(B_b^T P_bb^-1 B_b)``
    for every candidate at once (one batched ``R x R`` solve), and removing
    ``b`` downdates ``P <- P_oo - P_ob P_bb^-1 P_bo``, ``B <- B_o - P_ob P_bb^-1 B_b``
    (the partitioned inverse): ``O(D^2 R)`` a step.  Columns with no variance
    (a kernel position that only ever reads padding) carry no information:
    they are given ``A_jj = 1`` and no correlation, so they never change E.
    Exactly collinear columns (a duplicated channel, with ``ridge = 0``) make
    ``A`` singular: :func:`_inv_pd` then adds the smallest jitter
    (``1e-12`` of the mean diagonal, raised 100-fold at a time) with which
    its Cholesky factor exists; a duplicate's rise is then ~0 and it goes
    first.  The exact search adds the same jitter to every set when one of
    them is singular.
    """
    n = int(n_channels)
    D = cov_u.shape[0]
    if D % n:
        raise ValueError(f"Eq. S5: {D} input columns are not {n} channel blocks")
    R = D // n
    scores = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
    dead = np.zeros(n, bool) if gamma is None else (np.abs(np.asarray(gamma)) <= DEAD_GAMMA)
    alive = np.flatnonzero(~dead)
    if alive.size <= n_keep:  # every live channel is kept; the best-scored dead ones fill the set
        fill = [i for i in np.lexsort((np.arange(n), -scores)) if dead[i]][: n_keep - alive.size]
        return np.sort(np.concatenate([alive, np.asarray(fill, dtype=np.int64)]).astype(np.int64))
    A, C = _regularised(cov_u, cov_uz, ridge)
    if exact and _exact_fits(alive.size, n_keep, R):
        return _exact_subset(A, C, alive, n_keep, R)
    cols = (alive[:, None] * R + np.arange(R)).ravel()
    P = _inv_pd(A[np.ix_(cols, cols)])
    B = P @ C[cols]
    K = list(alive)
    while len(K) > n_keep:
        k = len(K)
        idx = np.arange(k)
        Pbb = P.reshape(k, R, k, R)[idx, :, idx, :]  # (k, R, R): the diagonal blocks
        Bb = B.reshape(k, R, -1)
        S = np.linalg.solve(Pbb, Bb)  # P_bb^-1 B_b for every block
        rise = np.einsum("kro,kro->k", Bb, S)
        b = int(np.argmin(rise))
        other = np.delete(np.arange(k * R), np.arange(b * R, (b + 1) * R))
        Pob = P[other, b * R:(b + 1) * R]
        P = P[np.ix_(other, other)] - Pob @ np.linalg.solve(Pbb[b], Pob.T)
        P = (P + P.T) / 2
        B = B[other] - Pob @ S[b]
        del K[b]
    return np.sort(np.asarray(K, dtype=np.int64))


def _regularised(cov_u: np.ndarray, cov_uz: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. S5's ``A = Cov(u) + lambda diag Cov(u)`` and ``C = Cov(u, z)``,
    columns with no variance made inert (``A_jj = 1``, no correlation)."""
    D = cov_u.shape[0]
    A = np.array(cov_u, dtype=np.float64, copy=True)
    A = (A + A.T) / 2
    C = np.array(cov_uz, dtype=np.float64, copy=True)
    d = np.diag(A).copy()
    flat = d <= 1e-12 * max(float(d.max()), 0.0) if D else np.zeros(0, bool)
    A[flat, :] = 0.0
    A[:, flat] = 0.0
    C[flat] = 0.0
    A[np.diag_indices(D)] = np.where(flat, 1.0, d * (1.0 + ridge))
    return A, C


def _exact_fits(n_alive: int, n_keep: int, R: int) -> bool:
    """True when every kept set of ``n_keep`` of ``n_alive`` channels is
    affordable: at most :data:`EXACT_SUBSETS` sets and :data:`EXACT_WORK`."""
    sets = math.comb(n_alive, n_keep)
    return sets <= EXACT_SUBSETS and sets * float(n_keep * R) ** 3 <= EXACT_WORK


def _exact_subset(A: np.ndarray, C: np.ndarray, alive: np.ndarray, n_keep: int, R: int,
                  chunk: int | None = None) -> np.ndarray:
    """The kept set of ``n_keep`` channels of ``alive`` with the smallest
    ``E(K)`` (the largest ``tr(C_K^T A_KK^-1 C_K) = ||L_K^-1 C_K||_F^2``, ``L_K``
    the Cholesky factor of ``A_KK``), every set in lexicographic order, the
    first of equal ones; ``chunk`` sets are factored at a time (default: as
    many as :data:`EXACT_CHUNK` matrix entries hold, so memory stays bounded)."""
    sets = np.array(list(itertools.combinations(alive.tolist(), n_keep)), dtype=np.int64).reshape(-1, n_keep)
    chunk = chunk or max(1, EXACT_CHUNK // (n_keep * R) ** 2)
    scale = float(np.mean(np.diag(A))) or 1.0
    delta = 0.0
    while True:
        try:
            explained = np.concatenate([_explained(A, C, sets[s:s + chunk], R, delta)
                                        for s in range(0, len(sets), chunk)])
            break
        except np.linalg.LinAlgError:  # a singular A_KK (collinear columns, ridge 0): jitter as _inv_pd
            delta = 1e-12 * scale if delta == 0.0 else delta * 100
            if delta > scale:
                raise
    return np.sort(sets[int(np.argmax(explained))])


def _explained(A: np.ndarray, C: np.ndarray, sets: np.ndarray, R: int, delta: float) -> np.ndarray:
    """``tr(C_K^T (A_KK + delta I)^-1 C_K)`` for every row ``K`` of ``sets`` (one batched Cholesky)."""
    cols = (sets[:, :, None] * R + np.arange(R)).reshape(len(sets), -1)
    Akk = A[cols[:, :, None], cols[:, None, :]]
    if delta:
        Akk = Akk + delta * np.eye(cols.shape[1])
    L = np.linalg.cholesky(Akk)
    Y = np.linalg.solve(L, C[cols])
    return np.einsum("kdo,kdo->k", Y, Y)


def _inv_pd(A: np.ndarray) -> np.ndarray:
    """``A^-1`` of a symmetric positive semi-definite ``A`` by its Cholesky
    factor; when ``A`` is singular, of ``A + delta I`` with the smallest
    ``delta`` in ``1e-12, 1e-10, ...`` (times the mean diagonal) that factors."""
    n = A.shape[0]
    scale = float(np.mean(np.diag(A))) if n else 1.0
    scale = scale if scale > 0 else 1.0
    delta = 0.0
    while True:
        try:
            L = np.linalg.cholesky(A + delta * np.eye(n) if delta else A)
            break
        except np.linalg.LinAlgError:
            delta = 1e-12 * scale if delta == 0.0 else delta * 100
            if delta > scale:
                raise
    Li = solve_triangular(L, np.eye(n), lower=True)
    return Li.T @ Li
