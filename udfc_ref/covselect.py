"""Channel selection by reconstruction (derivation Eq. S4): keep the channels
from which the pruned ones are best rebuilt.

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
"""

from __future__ import annotations

import numpy as np

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
