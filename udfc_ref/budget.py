"""Compress to a budget: per-unit prune ratios and per-layer bits that
minimise the predicted error subject to a MAC / parameter / byte budget
(derivation section 12, Eq. B2-B6).

A *unit* is a set of channels removed together: a pair (section 1) or a
coupled channel group (section 11).  The allocation

1. lists candidate kept counts per unit (ratios 0, 0.05, ..., 0.95 and the
   ``min_keep`` floor; kept sets are nested, ``select.prune_order``);
2. predicts the error of each candidate from the data model alone: for
   every value the unit's consumers read, the Eq. E2 error of rebuilding the
   pruned channels from the kept ones, at every kept count from *one*
   Cholesky factorisation of that value's covariance in pruning order
   (Eq. B3); per quantized layer the relative output error of its rounded
   weights at each candidate bit width (Eq. B4);
3. counts MACs, parameters and bytes of any choice exactly
   (:class:`CostModel`, Eq. B5: the layer's cost is bilinear in the kept
   counts of the groups it reads and writes);
4. greedily takes the move (one unit to a higher ratio, one layer to fewer
   bits) with the least predicted error per unit of cost saved until the
   budget is met, then gives back moves the budget no longer needs (Eq. B6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import OptionError
from .select import group_scores, pair_scores, select_kept, select_kept_grouped

TARGETS = ("macs", "params", "bytes")
#: the prune ratios every unit may take (plus the one that leaves ``min_keep`` channels)
RATIO_GRID = tuple(round(0.05 * i, 2) for i in range(20))
#: bit widths of ``weight_bits="auto"`` when none are given
DEFAULT_BIT_CHOICES = (8, 6, 4)


@dataclass
class Unit:
    """Channels removed together: a pair's or a coupled group's.

    ``group`` is its index in ``groups.ChannelGroups``; ``blocks`` > 1
    prunes the same count in each of ``blocks`` consecutive blocks
    (Eq. S2); ``gamma`` (pairs) marks dead channels, pruned first."""

    name: str
    group: int
    size: int
    scores: np.ndarray
    gamma: np.ndarray | None = None
    blocks: int = 1
    min_keep: int = 1

    @classmethod
    def of_pair(cls, model, pair, cg, criterion: str, min_keep: int) -> "Unit":
        scores, gamma = pair_scores(model, pair, criterion)
        return cls(pair.name, cg.group_of(pair.producer.output).index, scores.shape[0], scores, gamma, pair.groups,
                   min_keep)

    @classmethod
    def of_group(cls, model, group, criterion: str, min_keep: int) -> "Unit":
        return cls(group.name, group.index, group.size, group_scores(model, group, criterion), None,
                   group.constraint, min_keep)

    def kept(self, ratio: float) -> np.ndarray:
        """Sorted kept indices at ``ratio`` (Eq. S1 / S2)."""
        if self.blocks > 1:
            return select_kept_grouped(self.scores, ratio, self.blocks, gamma=self.gamma, min_keep=self.min_keep)
        return select_kept(self.scores, ratio, gamma=self.gamma, min_keep=self.min_keep)

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ratios, kept counts)`` of the candidate choices, kept count
        strictly decreasing from ``size`` (ratio 0): the ratios of
        :data:`RATIO_GRID`, then the ratio that leaves the ``min_keep`` floor."""
        og = self.size // self.blocks
        floor = max(1, -(-self.min_keep // self.blocks)) if self.blocks > 1 else max(1, self.min_keep)
        last = (og - min(floor, og)) / og
        ratios, counts = [], []
        for r in RATIO_GRID + (last,):
            k = int(self.kept(r).size)
            if not counts or k < counts[-1]:
                ratios.append(float(r))
                counts.append(k)
        return np.array(ratios), np.array(counts)


def check_target(prune_ratio, weight_bits, bit_choices, targets: dict):
    """Validate the budget options of ``compress``: at most one target, a
    fraction in (0, 1), exclusive with ``prune_ratio`` > 0;
    ``weight_bits="auto"`` needs ``target_bytes``; ``bit_choices`` needs
    ``weight_bits="auto"``.  Returns ``(kind, fraction, bit_choices)`` with
    ``kind`` None when no target is set."""
    from .quantize import VALID_BITS

    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) > 1:
        raise OptionError(f"give one budget at a time, got {', '.join('target_' + k for k in given)}")
    kind, frac = next(iter(given.items())) if given else (None, None)
    if kind is not None:
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac) \
                or not 0.0 < frac < 1.0:
            raise OptionError(f"target_{kind} must be a fraction of the original in (0, 1), got {frac!r}")
        if prune_ratio:
            raise OptionError(f"target_{kind} and prune_ratio are exclusive: the budget chooses each layer's "
                              f"ratio (got prune_ratio={prune_ratio!r})")
    if weight_bits == "auto":
        if kind != "bytes":
            raise OptionError("weight_bits='auto' needs target_bytes: bit widths change the bytes, not the MACs or "
                              "parameters" + (f" (got target_{kind})" if kind else ""))
        choices = DEFAULT_BIT_CHOICES if bit_choices is None else bit_choices
        if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
            raise OptionError(f"bit_choices must be a list of bit widths, got {choices!r}")
        choices = list(choices)
        if not choices or any(isinstance(b, bool) or b not in VALID_BITS for b in choices) \
                or len(set(choices)) != len(choices):
            raise OptionError(f"bit_choices must be distinct bit widths of 2..8 or 16, got {bit_choices!r}")
        return kind, float(frac), tuple(sorted(choices, reverse=True))
    if bit_choices is not None:
        raise OptionError(f"bit_choices needs weight_bits='auto' (got weight_bits={weight_bits!r})")
    return kind, (None if frac is None else float(frac)), None


@dataclass
class Allocation:
    """What :func:`allocate` chose: ``ratios[unit]``, ``bits[layer]``
    (``weight_bits="auto"`` only), the predicted cost fraction and the
    predicted error of each unit's choice (Eq. B3) and layer's bits (Eq. B4)."""

    target: str
    fraction: float
    predicted: float
    ratios: dict = field(default_factory=dict)
    bits: dict = field(default_factory=dict)
    unit_error: dict = field(default_factory=dict)
    bits_error: dict = field(default_factory=dict)
