"""Channel selection: which output channels of a producer are pruned (Eq. S1)."""

from __future__ import annotations

import numpy as np

from .errors import OptionError

DEAD_GAMMA = 1e-12
#: elements of the float64 block of rows :func:`channel_scores` works on
_SCORE_BLOCK = 1 << 18


def channel_scores(weight: np.ndarray, criterion: str = "l1", gamma=None, sigma=None) -> np.ndarray:
    """Eq. S1: ||W_i||_1 or ||W_i||_2 of each output filter, times |gamma_i| /
    sigma_i when BN scaling is asked for (``gamma`` and ``sigma`` given)."""
    if criterion not in ("l1", "l2"):
        raise OptionError(f"criterion must be 'l1' or 'l2', got {criterion!r}")
    w = np.asarray(weight).reshape(weight.shape[0], -1)
    s = np.empty(w.shape[0])
    rows = max(1, _SCORE_BLOCK // max(w.shape[1], 1))
    for r0 in range(0, w.shape[0], rows):  # float64 a block of rows at a time (the same sums, bounded memory)
        b = w[r0:r0 + rows].astype(np.float64)
        s[r0:r0 + rows] = np.abs(b).sum(1) if criterion == "l1" else np.sqrt((b * b).sum(1))
    if gamma is not None:
        s = s * np.abs(gamma) / sigma
    return s


def select_kept(scores: np.ndarray, ratio: float, gamma=None, min_keep: int = 1) -> np.ndarray:
    """Indices (sorted) of the channels kept.

    ``round(ratio * N)`` channels with the lowest score are pruned, at most
    ``N - min_keep``.  When ``ratio > 0``, dead channels (|gamma| <= 1e-12:
    constant output) are pruned first, even beyond the ratio -- their output
    is a constant that the compensation folds into the next layer's bias.  Ties are broken by
    index: the lower index is pruned first (deterministic)."""
    n = scores.shape[0]
    n_prune = int(np.floor(ratio * n + 0.5))
    dead = np.zeros(n, bool) if gamma is None else (np.abs(gamma) <= DEAD_GAMMA)
    if ratio > 0:
        n_prune = max(n_prune, int(dead.sum()))
    n_prune = min(n_prune, n - max(1, min_keep))
    if n_prune <= 0:
        return np.arange(n)
    key = np.where(dead, -np.inf, scores)
    order = np.lexsort((np.arange(n), key))
    return np.sort(order[n_prune:])


def select_kept_grouped(scores: np.ndarray, ratio: float, groups: int, gamma=None, min_keep: int = 1) -> np.ndarray:
    """Eq. S2: indices (sorted) kept of a grouped producer whose N outputs
    form ``groups`` consecutive groups of ``N / groups``: the same number
    ``round(ratio * N / groups)`` is pruned in every group (so the layer
    keeps its ``groups``), the lowest scores of each group first, dead
    channels first (counted in the same per-group number: the largest dead
    count of a group when that is more), at least ``max(1, ceil(min_keep /
    groups))`` kept per group.  Ties: the lower index first."""
    n = scores.shape[0]
    og = n // groups
    n_prune = int(np.floor(ratio * og + 0.5))
    dead = np.zeros(n, bool) if gamma is None else (np.abs(gamma) <= DEAD_GAMMA)
    if ratio > 0:
        n_prune = max(n_prune, int(dead.reshape(groups, og).sum(1).max()))
    n_prune = min(n_prune, og - max(1, -(-min_keep // groups)))
    if n_prune <= 0:
        return np.arange(n)
    key = np.where(dead, -np.inf, scores).reshape(groups, og)
    order = np.argsort(key, axis=1, kind="stable")  # stable: ties keep the lower index first
    kept = (order[:, n_prune:] + (np.arange(groups) * og)[:, None]).ravel()
    return np.sort(kept)


def prune_order(scores: np.ndarray, gamma=None, groups: int = 1) -> np.ndarray:
    """The order in which :func:`select_kept` (``groups`` = 1) or
    :func:`select_kept_grouped` prunes: dead channels first, then the lowest
    score, ties by the lower index.  For ``groups`` > 1 the order is within
    each block of ``N / groups`` channels, shape (groups, N / groups), as
    indices into the whole layer.  The kept set of any ratio is the channels
    *not* in the first ``n_prune`` of this order (of each block): kept sets
    are nested as the ratio grows."""
    n = scores.shape[0]
    dead = np.zeros(n, bool) if gamma is None else (np.abs(gamma) <= DEAD_GAMMA)
    key = np.where(dead, -np.inf, scores)
    if groups == 1:
        return np.lexsort((np.arange(n), key))
    og = n // groups
    return np.argsort(key.reshape(groups, og), axis=1, kind="stable") + (np.arange(groups) * og)[:, None]


def pair_scores(model, pair, criterion: str) -> tuple[np.ndarray, np.ndarray]:
    """Eq. S1 scores of a pair's producer and its BN's gamma (dead channels):
    ``(scores (N,), gamma (N,))``."""
    from .datamodel import bn_affine

    gamma, _, _, sigma = bn_affine(model, pair.bn)
    w = model.tensors[pair.producer.params["weight"]]
    crit = criterion.split("-")[0]
    return (channel_scores(w, crit, gamma, sigma) if criterion.endswith("-bn") else channel_scores(w, crit)), gamma


def group_scores(model, group, criterion: str) -> np.ndarray:
    """Eq. S3: the score of each channel of a coupled group -- the sum over
    its producers of the producer's Eq. S1 score divided by that producer's
    mean score, so every producer weighs the same whatever the scale of its
    filters (N,).  For ``-bn`` criteria a producer read by a lone BatchNorm
    is scaled by that BN's |gamma| / sigma."""
    from .datamodel import bn_affine

    crit = criterion.split("-")[0]
    total = np.zeros(group.size)
    for p in group.producers:
        w = model.tensors[p.params["weight"]]
        s = channel_scores(w, crit)
        cs = model.consumers(p.output)
        if criterion.endswith("-bn") and len(cs) == 1 and cs[0].op == "batch_norm":
            gamma, _, _, sigma = bn_affine(model, cs[0])
            s = s * np.abs(gamma) / sigma
        mean = float(s.mean())
        total += s / mean if mean > 0 else s
    return total
