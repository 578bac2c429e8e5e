"""Statistics sources: where ``compress`` obtains the statistics of each pair
(derivation section 13).

The walk of ``compression.compress`` needs, for every pair, the
:class:`~udfc_ref.solve.PairStats` the solver reads (``E a``, ``Var a``,
``E a~_K``, ``Cov(a~_K)``, ``Cov(a, a~_K)``).  It asks one object, the
*statistics source*, through :meth:`stats` with a :class:`StatsRequest`;
everything else of the walk (selection, quantization, the solve, the
rewrite, the report) is shared by every source:

* :class:`DataFreeStats` -- the data model of the original network
  (Eq. D4-D5 for a producer -> BN -> activation pair, ``chain_stats`` for a
  depthwise chain or an SE gate);
* ``calibrate.CalibratedStats`` -- moments measured on calibration images
  (Eq. C1-C3).

A source may read the compressed model being built; the walk guarantees that
every layer an answer depends on is final when the request is made (section 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pairs import PASS_OPS, Pair
from .solve import PairStats, chain_stats, pair_stats

#: what a request asks for: the channels the consumers read, or the input of an SE gate's squeeze
WHICH = ("value", "gap")


@dataclass
class StatsRequest:
    """One pair's statistics request.

    Attributes
    ----------
    pair : the pair (``pairs.Pair``).
    kept : (M,) kept channel indices.
    which : ``"value"`` -- the channels the consumers read (after the
        activation, the depthwise chain or the SE gate); ``"gap"`` -- the
        pair's ungated channels as the SE gate's squeeze reads them (Eq. SE2).
    Wd : (N, C, R) original producer filters, dense layout (Eq. D1).
    Wq : (M, C, R) compressed kept filters in the original input coordinates
        (quantization error embedded at the kept input channels).
    gamma, beta : (N,) the BN's affine parameters.
    extra : (M,) pre-BN mean shift of the compressed channels (minus the bias
        correction, in the units of ``W x``) or None.
    """

    pair: Pair
    kept: np.ndarray
    which: str
    Wd: np.ndarray
    Wq: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    extra: np.ndarray | None = None


def read_value(model, pair: Pair, which: str = "value") -> str:
    """The value whose channel statistics a pair's readers see (Eq. C3).

    ``"gap"``: the SE gate's global average (what the squeeze reads);
    ``"value"``: ``pair.value`` followed through single pools / identities
    (``pairs.PASS_OPS``), stopping before a flatten, reshape or pad (which
    keep the channel statistics or add borders), or where the value is read
    by more than one node."""
    if which == "gap":
        return pair.se.gap.output
    v = pair.value
    while v != model.output_name:
        cs = model.consumers(v)
        if len(cs) != 1 or cs[0].op not in PASS_OPS:
            break
        v = cs[0].output
    return v


class DataFreeStats:
    """The statistics of today's data-free method: each pair on the original
    network's data model (``datamodel.DataModel``), its own compressed
    filters in the original input coordinates (Eq. D4-D5); a depthwise chain
    or an SE-gated value from the propagated statistics with the kept channels
    taken as undamaged (``solve.chain_stats``)."""

    name = "data-free"

    def __init__(self, dm):
        self.dm = dm
        self._gap: dict[str, PairStats] = {}
        self._early: dict[str, object] = {}

    def selection_cov(self, pair: Pair) -> np.ndarray:
        """``Cov(a)`` of the pair's channels under the data model (Eq. S4)."""
        if pair.se is not None:  # read before the lazy data model drops it behind the gate
            self._early[pair.name] = self.dm.value(pair.se.value)
        return np.asarray(self.dm.value(pair.value).cov, dtype=np.float64)  # float32 on the fast path

    def stats(self, req: StatsRequest) -> PairStats:
        p = req.pair
        if req.which == "gap":
            vs = self._early.pop(p.name) if p.name in self._early else self.dm.value(p.se.value)
            st = chain_stats(vs, req.kept)
            self._gap[p.name] = st
            return st
        if p.dw is None and p.se is None:
            return pair_stats(req.Wd, req.Wq, self.dm.input_model(p.producer.name), req.gamma, req.beta, p.act,
                              req.kept, extra_shift=req.extra)
        vs = self.dm.value(p.value)
        return chain_stats(vs, req.kept) if vs is not None else self._gap.pop(p.name)

    def release(self, layer: str) -> None:
        self._gap.pop(layer, None)
        self._early.pop(layer, None)

    def close(self) -> None:
        self._gap.clear()


def stats_error(pred: PairStats, real: PairStats) -> dict:
    """How far predicted statistics are from measured ones (the auditor's
    summary, Eq. C5): relative norms ``|pred - real| / |real|`` of
    ``E a`` (``mean``), ``Var a`` (``var``), ``Cov(a~_K)`` (``cov_q``) and
    ``Cov(a, a~_K)`` (``cross``), Frobenius for the matrices."""
    def rel(p, r):
        d = float(np.linalg.norm(r))
        return float(np.linalg.norm(p - r) / d) if d > 0 else float(np.linalg.norm(p))

    return {"mean": rel(pred.mean_a, real.mean_a), "var": rel(pred.var_a, real.var_a),
            "cov_q": rel(pred.cov_q, real.cov_q), "cross": rel(pred.cross, real.cross)}
