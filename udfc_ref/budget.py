"""Compress to a budget: per-unit prune ratios and per-layer bits that
minimise the predicted error subject to a MAC / parameter / byte budget
(derivation section 12, Eq. B2-B8).

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
4. finds the uniform ratio that meets the budget (the anchor) and prices
   every unit's deviation from it robustly: a predicted increase of its
   error ``s`` times, a predicted decrease ``1 / s`` times (Eq. B8);
5. greedily takes the move (one unit to a higher ratio, one layer to fewer
   bits) with the least robust loss per unit of cost saved until the
   budget is met, then gives back moves the budget no longer needs (Eq. B6),
   and keeps the choice only if its robust gain over the anchor exceeds
   ``MIN_GAIN`` of the anchor's predicted loss -- else the uniform ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import OptionError
from .ops import ACTIVATION_OPS
from .select import group_scores, pair_scores, select_kept, select_kept_grouped

TARGETS = ("macs", "params", "bytes")
#: the prune ratios every unit may take (plus the one that leaves ``min_keep`` channels)
RATIO_GRID = tuple(round(0.05 * i, 2) for i in range(20))
#: bit widths of ``weight_bits="auto"`` when none are given
DEFAULT_BIT_CHOICES = (8, 6, 4)
#: Eq. B8's factor ``s``: how far (multiplicatively) a unit's predicted loss may be off
PREDICTOR_SPREAD = 1.75
#: Eq. B8's margin ``tau``: leave the uniform anchor only for a robust predicted gain above this fraction of its loss
MIN_GAIN = 0.05


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
    predicted error of each unit's choice (Eq. B3) and layer's bits (Eq. B4);
    ``anchor_ratio`` the uniform ratio meeting the budget (Eq. B8),
    ``anchor_loss`` its predicted loss ``sum_u J_u``, ``robust_gain`` the
    choice's ``-J*`` (0 when the anchor itself was kept)."""

    target: str
    fraction: float
    predicted: float
    ratios: dict = field(default_factory=dict)
    bits: dict = field(default_factory=dict)
    unit_error: dict = field(default_factory=dict)
    bits_error: dict = field(default_factory=dict)
    anchor_ratio: float = 0.0
    anchor_loss: float = 0.0
    robust_gain: float = 0.0


# ----------------------------------------------------------------- cost model (Eq. B5)

@dataclass
class _NodeCost:
    """The MACs / parameters / bytes of one node as a function of the kept
    channel counts of the groups it reads (``ins``) and writes (``outs``);
    ``cin0`` / ``cout0`` are the counts when it reads / writes no channel
    group (a linear layer on the last axis of a map)."""

    kind: str  # "dense" | "depthwise" | "grouped" | "channel" | "fixed"
    ins: tuple = ()
    outs: tuple = ()
    cin0: int = 0
    cout0: int = 0
    k: int = 1  # weight columns per input channel (kernel positions / positions after a flatten)
    hw: int = 1  # output positions (MACs = weight size x hw)
    groups: int = 1
    weight: bool = False  # owns its weight tensor
    bias: bool = False  # owns a bias (or may get one: Eq. R2 / B1 shift into a layer with no bias and no BN)
    itemsize: int = 4  # of the weight (and its scales)
    bias_item: int = 4
    chan_items: tuple = ()  # itemsizes of the per-channel tensors of a BN / affine
    params: int = 0  # "fixed": parameters and bytes of tensors not tied to any channel group
    nbytes: int = 0
    layer: str = ""  # conv/linear: the layer name (its bits)


class CostModel:
    """Eq. B5: exact MACs, parameters and weight bytes of the compressed model
    for any kept count per channel group and bit width per layer, without
    building it (what ``Model.flops`` / ``param_count`` / ``weight_bytes``
    of the result return, except that a bias tensor Eq. R2 / B1 *might* add
    to a layer with no bias and no BatchNorm after it is always counted: the
    count is exact or an upper bound).

    A conv's weight is ``out x in / groups x kh x kw`` and its MACs that
    times the output positions: bilinear in the kept counts of the group(s)
    it reads and the group it writes."""

    def __init__(self, model, cg, units, weight_bits, skip, method="udfc", bias_correction=False,
                 symmetric=True, per_channel=True):
        self.cg = cg
        self.full = np.array([g.size for g in cg.groups], dtype=np.int64)
        self.symmetric, self.per_channel = symmetric, per_channel
        reads = {c.name for u in units for c, _, _ in cg.groups[u.group].consumers}
        seen: set[str] = set()
        self.nodes: list[_NodeCost] = []
        for n in model.nodes:
            own = {r: t for r, t in n.params.items() if t not in seen}
            seen.update(n.params.values())
            outs = cg.layout.get(n.output, ())
            if n.op in ("conv2d", "linear"):
                self.nodes.append(self._layer(model, n, own, reads, weight_bits, skip, method, bias_correction))
            elif n.op == "batch_norm" or (n.op == "affine" and n.attrs["axis"] == 1):
                self.nodes.append(_NodeCost("channel", (), outs, chan_items=tuple(
                    model.tensors[t].dtype.itemsize for t in own.values())))
            elif own:
                self.nodes.append(_NodeCost("fixed", params=int(sum(model.tensors[t].size for t in own.values())),
                                            nbytes=int(sum(model.tensors[t].nbytes for t in own.values()))))
        self.deps: dict[int, list[int]] = {}  # group index -> nodes whose cost depends on its kept count
        for i, nc in enumerate(self.nodes):
            for g in dict.fromkeys(nc.ins + nc.outs):
                self.deps.setdefault(g, []).append(i)
        self.layer_node = {nc.layer: i for i, nc in enumerate(self.nodes) if nc.layer}

    def _layer(self, model, n, own, reads, weight_bits, skip, method, bias_correction) -> _NodeCost:
        cg = self.cg
        w = model.tensors[n.params["weight"]]
        b = n.params.get("bias")
        cs = model.consumers(n.output)
        lone_bn = len(cs) == 1 and cs[0].op == "batch_norm" and n.output != model.output_name
        quantized = n.name not in skip and weight_bits is not None
        gains = b is None and not lone_bn and ((n.name in reads and method == "udfc") or (bias_correction and quantized))
        ins, outs = cg.layout.get(n.inputs[0], ()), cg.layout.get(n.output, ())
        nc = _NodeCost("dense", ins, outs, layer=n.name, weight="weight" in own, bias=("bias" in own) or gains,
                       itemsize=w.dtype.itemsize,
                       bias_item=model.tensors[b].dtype.itemsize if b is not None else w.dtype.itemsize)
        shp = model.shapes[n.inputs[0]]
        if n.op == "conv2d":
            g = n.attrs["groups"]
            _, ho, wo = model.shapes[n.output]
            nc.k, nc.hw, nc.groups = int(w.shape[2] * w.shape[3]), int(ho * wo), int(g)
            if g > 1:
                nc.kind = "depthwise" if ins == outs and g == shp[0] else "grouped"
                if nc.kind == "grouped" and (g == shp[0] or len(ins) != 1):  # channel multiplier, or blocked
                    nc.kind, nc.ins, nc.outs, nc.cin0, nc.cout0 = "dense", (), (), int(w.shape[1]), int(w.shape[0])
        elif len(shp) != 1:  # a linear layer on the last axis of a map: tied to no channel group
            nc.ins, nc.outs, nc.cin0, nc.cout0 = (), (), int(w.shape[1]), int(w.shape[0])
            nc.hw = int(np.prod(shp[:-1], dtype=np.int64))
        else:
            nc.k = int(w.shape[1] // max(self.size(ins), 1))
        return nc

    def size(self, segs, k=None) -> int:
        return int(sum((self.full if k is None else k)[g] for g in segs))

    def counts(self, nc: _NodeCost, k):
        """(kept input channels, kept output channels) of a node for kept counts ``k`` per group."""
        cin = self.size(nc.ins, k) if nc.ins else nc.cin0
        cout = self.size(nc.outs, k) if nc.outs else nc.cout0
        return cin, cout

    def node_cost(self, nc: _NodeCost, cin, cout, bits):
        """(MACs, params, bytes) of one node; ``cin``, ``cout`` kept channel
        counts (scalars or integer arrays), ``bits`` None for float weights."""
        if nc.kind == "fixed":
            return 0, nc.params, nc.nbytes
        if nc.kind == "channel":
            return 0, len(nc.chan_items) * cout, sum(nc.chan_items) * cout
        if nc.kind == "depthwise":
            w = cout * nc.k
        elif nc.kind == "grouped":
            w = cout * (cin // nc.groups) * nc.k
        else:
            w = cout * cin * nc.k
        macs = w * nc.hw
        params = (w if nc.weight else 0) + (cout if nc.bias else 0)
        if not nc.weight:
            wb = 0
        elif bits is None:
            wb = w * nc.itemsize
        else:
            ns = cout if self.per_channel else 1
            wb = -(-w * bits // 8) + ns * nc.itemsize + (0 if self.symmetric else -(-ns * bits // 8))
        return macs, params, wb + (cout * nc.bias_item if nc.bias else 0)

    def total(self, k, bits: dict) -> np.ndarray:
        """(MACs, params, bytes) for kept counts ``k`` (per group) and ``bits`` (layer -> bits or None)."""
        tot = np.zeros(3, dtype=np.int64)
        for nc in self.nodes:
            cin, cout = self.counts(nc, k)
            tot += np.array(self.node_cost(nc, cin, cout, bits.get(nc.layer)), dtype=np.int64)
        return tot


# ----------------------------------------------------------------- predicted errors (Eq. B3, B4, B7)

def _prefix_energies(cov, order, fixed, counts, alpha1, kmat):
    """Eq. B3's residual energies by one Cholesky factorisation.

    ``order``: the unit's channels of the value, most important first (every
    kept set is a prefix), ``fixed``: the value's channels of other groups
    (always kept), ``kmat`` the reader's (N, N) Gram ``K``.  With ``A = C +
    alpha1 diag(C)`` permuted to ``p = [fixed, order]`` and ``L`` its
    Cholesky factor, the residual covariance of the channels after the first
    ``m``, regressed on the first ``m``, is the Schur complement
    ``L[m:, m:] L[m:, m:]^T`` less the ridge ``alpha1 diag(C)`` on its
    diagonal (the fit's own ridge shrinkage left out).  As ``L`` is lower
    triangular, column ``j >= m`` of ``L`` is zero above row ``m``, so
    ``tr(K_PP L[m:, m:] L[m:, m:]^T) = sum_{j >= m} L[:, j]^T K_p L[:, j]``: every
    prefix's energy ``tr(K_PP E_P)`` is a suffix sum of ``diag(L^T K_p L)``
    (one O(N^3) product for all candidates).  Returns the energies per kept
    count of ``counts``, or None when the factorisation fails."""
    p = np.concatenate([fixed, order]).astype(np.int64)
    d = np.diag(cov)[p]
    a = cov[np.ix_(p, p)] + alpha1 * np.diag(d)
    a[np.diag_indices_from(a)] += 1e-12 * max(float(np.max(d, initial=0.0)), 1e-300)
    try:
        low = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return None
    kp = kmat[np.ix_(p, p)]
    col = np.einsum("ij,ij->j", low, kp @ low)  # L[:, j]^T K_p L[:, j]
    col -= alpha1 * d * np.diag(kp)
    suffix = np.concatenate([np.cumsum(col[::-1])[::-1], [0.0]])
    return np.array([suffix[fixed.size + int(k)] for k in counts])


def _exact_residuals(vs, kept_sets, n, method, alpha1, alpha2, blocks):
    """Eq. E1 per channel with the compensation's own U1-U3 (block diagonal
    for a grouped reader, Eq. G4) on the value's statistics, one solve per
    candidate kept set."""
    from .coupled import block_udfc
    from .solve import chain_stats, drop, udfc

    out = []
    for kept in kept_sets:
        st = chain_stats(vs, kept)
        if method != "udfc":
            T, t = drop(st, n)
        elif blocks > 1:
            T, t = block_udfc(st, n, blocks, alpha1, alpha2)
        else:
            T, t = udfc(st, n, alpha1, alpha2)
        pruned = np.setdiff1d(np.arange(n), kept)
        tp, mp = T[pruned], st.cross[pruned]
        cov = vs.cov[np.ix_(pruned, pruned)] - tp @ mp.T - mp @ tp.T + tp @ st.cov_q @ tp.T
        bias = st.mean_a[pruned] - tp @ st.mean_q - t[pruned]
        out.append((pruned, cov + np.outer(bias, bias)))
    return out


def _order(unit: Unit) -> np.ndarray:
    """The unit's channels most important first: the reverse of the pruning
    order of ``select`` (per block for ``blocks`` > 1: shape (blocks, N/blocks))."""
    from .select import prune_order

    return prune_order(unit.scores, unit.gamma, unit.blocks)[..., ::-1]


def _residual_energies(cg, u: Unit, v, vs, cand, method, alpha1, alpha2, consumer, kmat) -> np.ndarray:
    """Per candidate of unit ``u``, ``tr(K_PP E[e_P e_P^T])``: the energy the
    reader (Gram ``kmat``) sees of the residual ``e = v - T v_K - t`` of the
    pruned channels ``P`` of value ``v`` when ``u`` keeps that candidate and
    every other channel of ``v`` stays (Eq. B3)."""
    ratios, counts = cand
    segs = cg.layout[v]
    offs = np.cumsum([0] + [cg.groups[g].size for g in segs])[:-1]
    mine = [int(o) for g, o in zip(segs, offs) if g == u.group]
    size = vs.mean.shape[0]
    order = _order(u)
    grouped = consumer.op == "conv2d" and consumer.attrs["groups"] > 1
    if method != "udfc":  # dropped: the pruned channels' second moment
        m2 = kmat * (vs.cov + np.outer(vs.mean, vs.mean))
        out = []
        for k in counts:
            tail = order[:, k // u.blocks:].ravel() if u.blocks > 1 else order[k:]
            idx = np.concatenate([o + tail for o in mine])
            out.append(float(m2[np.ix_(idx, idx)].sum()))
        return np.array(out)
    if len(mine) == 1 and u.blocks == 1:
        o = mine[0]
        fixed = np.setdiff1d(np.arange(size), o + np.arange(u.size))
        res = _prefix_energies(vs.cov, o + order, fixed, counts, alpha1, kmat)
        if res is not None:
            return res
    elif len(mine) == 1 and grouped and consumer.attrs["groups"] == u.blocks:
        o, og = mine[0], u.size // u.blocks  # a block-diagonal rebuild: one prefix per block
        total = np.zeros(len(counts))
        for b in range(u.blocks):
            rows = o + b * og + np.arange(og)
            r = _prefix_energies(vs.cov[np.ix_(rows, rows)], order[b] - b * og, np.array([], np.int64),
                                 np.asarray(counts) // u.blocks, alpha1, kmat[np.ix_(rows, rows)])
            if r is None:
                total = None
                break
            total += r
        if total is not None:
            return total
    kept_sets = [cg.kept_index(v, {u.group: u.kept(r)}) for r in ratios]
    kept_sets = [np.arange(size) if k is None else k for k in kept_sets]
    return np.array([float(np.sum(e * kmat[np.ix_(i, i)])) for i, e in _exact_residuals(
        vs, kept_sets, size, method, alpha1, alpha2, consumer.attrs["groups"] if grouped else 1)])


def _reader_gram(f, im) -> np.ndarray:
    """``K = sum_o W'_o R_s W'_o^T`` (N, N), ``W'_o`` the (N, R) filter of
    output ``o`` of the reading layer (``f`` its dense filters (O, N, R)):
    an input error with channel covariance ``E`` and the spatial correlation
    ``R_s`` of A2 gives the layer's output the energy ``sum(E * K)`` --
    and the signal ``sum(C * K)`` (its output variance, ``C`` the input
    value's channel covariance)."""
    a = np.einsum("onr,rs->ons", f, im.r_s(), optimize=True)
    return np.einsum("ons,oms->nm", a, f, optimize=True)


#: Gauss-Hermite nodes / weights (probabilists', normalised) for E[f'(z)^2] of Eq. B7
_GH_U, _GH_W = np.polynomial.hermite_e.hermegauss(64)
_GH_W = _GH_W / _GH_W.sum()


def _activation_gain(model, node, src, dst) -> float:
    """Eq. B7: the factor by which an activation multiplies the relative error
    (error variance over signal variance) of its input: ``sum_i
    E[f'(z_i)^2] Var z_i / sum_i Var f(z_i)`` (a small error passes through
    the derivative), ``E[f'^2]`` by 64-point Gauss-Hermite quadrature of a
    central difference of the op's own forward kernel."""
    from .forward import run_node

    if src is None or dst is None:
        return 1.0
    sd = np.sqrt(np.clip(np.diag(src.cov), 0, None))
    z = src.mean[:, None] + sd[:, None] * _GH_U[None, :]
    h = 1e-4 * (1.0 + np.abs(z))
    fp = (run_node(model, node, [z + h]) - run_node(model, node, [z - h])) / (2 * h)
    num = float(((fp**2) @ _GH_W) @ sd**2)
    den = float(np.trace(dst.cov))
    return num / den if den > 0 and num > 0 else 1.0


def predict_errors(model, cg, units, cands, method, alpha1, alpha2, bit_layers=(), bit_choices=(), qkw=None,
                   bias_correction=False, progress=False, gain=True, raw=False):
    """Eq. B3, B4, B7 from one pass of the (lazy) data model.

    ``cands[u]`` is ``(ratios, kept counts)`` of unit ``u``'s candidates
    (:meth:`Unit.candidates`).  Returns ``(unit_err, bit_err)``:
    ``unit_err[u]`` the predicted error of unit ``u`` at each candidate --
    the sum over the layers reading its channels of the relative error of
    each reader's output (Eq. B3) times that output's gain to the network
    output (Eq. B7, when ``gain``); ``bit_err[layer]`` (len(bit_choices),) the
    relative error of the layer's output caused by rounding its weights
    (Eq. B4), times the same gain.  With ``raw``: the relative errors
    themselves, summed over the readers (no Eq. B6 transform, no gain)."""
    from .datamodel import DataModel, dense_filters
    from .progress import Progress

    reads: dict[str, list] = {}
    for u in units:
        for c, v, _ in cg.groups[u.group].consumers:
            reads.setdefault(c.name, []).append((u, v))
    per_reader = {u.name: [] for u in units}  # (reader output value, relative errors per candidate)
    raw_bits = {}
    bit_layers = set(bit_layers)
    trace: dict[str, float] = {}  # total variance of each value (Eq. B7's branch shares)
    act_gain: dict[str, float] = {}
    dm = DataModel(model, lazy=True)
    bar = Progress(len(model.nodes), "predict") if progress else None
    for step, n in enumerate(model.nodes):
        if bar is not None and n.op in ("conv2d", "linear"):
            bar.update(step, n.name)
        src = dm.value(n.inputs[0]) if n.inputs else None
        held = [(u, v, dm.value(v)) for u, v in reads.get(n.name, ())]
        dm.advance_to(n.name)
        dst = dm.values.get(n.output)
        if dst is not None:
            trace[n.output] = float(np.trace(dst.cov))
        if n.op in ACTIVATION_GAIN_OPS:
            act_gain[n.name] = _activation_gain(model, n, src, dst)
        im = dm.inputs.get(n.name)
        if held and im is not None:
            k = _reader_gram(dense_filters(model, n), im)
            for u, v, vs in held:
                var_z = float(np.sum(vs.cov * k)) if vs is not None else 0.0
                if var_z <= 0:
                    continue
                res = _residual_energies(cg, u, v, vs, cands[u.name], method, alpha1, alpha2, n, k)
                per_reader[u.name].append((n.output, res / var_z))
        if n.name in bit_layers and im is not None:
            raw_bits[n.name] = (n.output, _bits_errors(model, n, im, bit_choices, qkw, bias_correction))
        dm.release(n.name)
    if bar is not None:
        bar.update(len(model.nodes))
        bar.close()
    g = output_gains(model, trace, act_gain) if gain and not raw else {}
    lost = (lambda e: e) if raw else _lost
    unit_err = {u.name: np.zeros(len(cands[u.name][0])) for u in units}
    for name, parts in per_reader.items():
        for value, e in parts:
            unit_err[name] += lost(e) * g.get(value, 1.0)
    bit_err = {name: lost(e) * g.get(value, 1.0) for name, (value, e) in raw_bits.items()}
    return unit_err, bit_err


def _lost(eps: np.ndarray) -> np.ndarray:
    """Eq. B6's additive cost of a relative error ``eps``: ``-log(1 - eps)``.
    A layer whose output keeps the fraction ``1 - eps`` of its signal
    energy, errors compounding multiplicatively through the layers that
    follow, leaves ``prod (1 - eps_l)`` at the output: maximising it is
    minimising ``sum -log(1 - eps_l)`` (``~ eps`` for small errors, unbounded
    as a layer loses all its signal)."""
    return -np.log1p(-np.clip(eps, 0.0, 1.0 - 1e-9))


ACTIVATION_GAIN_OPS = tuple(op for op in ACTIVATION_OPS if op != "identity")
ADD_SHARE_OPS = ("concat", "add")


def output_gains(model, trace: dict, act_gain: dict) -> dict:
    """Eq. B7: ``gain[v]``, the relative error of the network output per unit
    of relative error of value ``v`` (error shaped like the signal), by one
    backward pass: 1 at the output; linear maps, BatchNorm, pooling and
    layout ops keep it; an activation multiplies it by its
    :func:`_activation_gain`; an ``add`` / ``concat`` passes to each input its
    share of the total variance; a value read by several nodes sums what
    each reading passes back."""
    gain = {model.output_name: 1.0}
    for n in reversed(model.nodes):
        go = gain.get(n.output, 0.0)
        if go == 0.0:
            continue
        if n.op in ADD_SHARE_OPS:
            tr = [trace.get(i, 0.0) for i in n.inputs]
            tot = sum(tr)
            for i, t in zip(n.inputs, tr):
                gain[i] = gain.get(i, 0.0) + go * (t / tot if tot > 0 else 1.0 / len(n.inputs))
            continue
        f = act_gain.get(n.name, 1.0)
        for i in dict.fromkeys(n.inputs):
            gain[i] = gain.get(i, 0.0) + go * f
    return gain


def _bits_errors(model, node, im, bit_choices, qkw, bias_correction) -> np.ndarray:
    """Eq. B4: ``E||(Q_b(W) - W) x||^2 / Var(W x)`` for each ``b`` of
    ``bit_choices``, ``x`` the data model's input patch (A2; the error's
    mean part ``(eps . E x)^2`` is left out with bias correction, which
    removes it).  Zero when the input statistics are unknown."""
    from .datamodel import dense_filters, depthwise_filters
    from .quantize import quantize

    w0 = model.tensors[node.params["weight"]]
    dwf = depthwise_filters(model, node)

    def energy(f):
        if dwf is not None:  # f (N, K): channel i sees input channel i only
            e = np.diag(im.cov_c) * np.einsum("nk,kl,nl->n", f, im.r_s(), f)
            return e, im.mean_c * f.sum(1)
        return im.gram_diag(f), im.mean_dot(f)

    e0, _ = energy(dwf if dwf is not None else dense_filters(model, node))
    den = float(e0.sum())
    out = np.zeros(len(bit_choices))
    if den <= 0:
        return out
    for i, b in enumerate(bit_choices):
        eps = quantize(w0, b, **qkw).dequantize().astype(np.float64) - w0.astype(np.float64)
        fe = eps.reshape(eps.shape[0], -1) if dwf is not None else dense_filters(
            _Swapped(model, node.params["weight"], eps), node)
        e, m = energy(fe)
        out[i] = float(e.sum() + (0.0 if bias_correction else (m**2).sum())) / den
    return out


# ----------------------------------------------------------------- allocation (Eq. B6)

def _unreachable(kind, fraction, floor, weight_bits, bit_choices, n_units, prune_coupled_hint) -> OptionError:
    what = "every prunable unit at its min_keep floor" if n_units else "nothing prunable"
    if weight_bits == "auto":
        what += f" and every layer at {min(bit_choices)} bits"
    hint = " (--prune-coupled / prune_coupled=True adds the coupled channel groups)" if prune_coupled_hint else ""
    return OptionError(f"target_{kind}={fraction:g} is unreachable: with {what} the model keeps {floor:.4f} of its "
                       f"{kind} ({n_units} prunable unit(s)){hint}")


def allocate(model, cg, units, kind, fraction, weight_bits, bit_choices, skip, method="udfc", alpha1=0.01,
             alpha2=0.008, bias_correction=False, qkw=None, progress=False, coupled_hint=False,
             spread=None, min_gain=None) -> Allocation:
    """Eq. B6: the prune ratio of every unit (and with ``weight_bits="auto"``
    the bits of every layer) minimising the predicted error (Eq. B3-B4)
    subject to ``kind`` (macs / params / bytes) <= ``fraction`` x the
    original's -- in the robust form of Eq. B8: relative to the uniform
    choice that meets the budget, each unit's and layer's predicted change
    weighed as if its prediction were off by the factor ``spread`` against
    the move (``spread=1``: the plain Eq. B6 loss).  Raises OptionError,
    before any data-model work, when even the smallest choice misses the
    budget."""
    qkw = dict(qkw or {})
    spread = PREDICTOR_SPREAD if spread is None else spread
    min_gain = MIN_GAIN if min_gain is None else min_gain
    cm = CostModel(model, cg, units, weight_bits, skip, method, bias_correction, qkw.get("symmetric", True),
                   qkw.get("per_channel", True))
    col = TARGETS.index(kind)
    orig = (model.flops(), model.param_count(), model.weight_bytes())[col]
    budget = fraction * orig
    layers = [n.name for n in model.nodes if n.op in ("conv2d", "linear") and n.name not in skip]
    auto = weight_bits == "auto"
    choices = list(bit_choices) if auto else [weight_bits]
    cands = {u.name: u.candidates() for u in units}
    k = cm.full.copy()
    kmin = cm.full.copy()
    for u in units:
        kmin[u.group] = cands[u.name][1][-1]
    bits = {name: choices[0] for name in layers} if weight_bits is not None else {}
    floor = cm.total(kmin, {name: choices[-1] for name in layers} if weight_bits is not None else {})[col]
    if floor > budget:
        raise _unreachable(kind, fraction, floor / orig, weight_bits, choices, len(units), coupled_hint)
    anchor_ratio, anchor_bits = uniform_anchor(cm, units, col, budget, layers, choices if weight_bits is not None
                                               else [None])
    anchor = {}
    for u in units:
        cands[u.name], anchor[u.name] = _with_candidate(u, cands[u.name], anchor_ratio)
    unit_err, bit_err = predict_errors(model, cg, units, cands, method, alpha1, alpha2,
                                       layers if auto and len(choices) > 1 else (), choices, qkw, bias_correction,
                                       progress)
    bit_err = bit_err if auto else {}
    bit_anchor = {name: choices.index(anchor_bits) for name in bit_err}
    robust_unit = {name: robust_loss(e, anchor[name], spread) for name, e in unit_err.items()}
    robust_bits = {name: robust_loss(e, bit_anchor[name], spread) for name, e in bit_err.items()}
    state = _Greedy(cm, units, cands, robust_unit, robust_bits, choices, col, k, dict(bits))
    state.run(budget)
    loss = sum(robust_unit[u.name][state.idx[u.name]] for u in units) + \
        sum(robust_bits[name][choices.index(state.bits[name])] for name in robust_bits)
    anchor_loss = float(sum(unit_err[u.name][anchor[u.name]] for u in units) +
                        sum(bit_err[name][bit_anchor[name]] for name in bit_err))
    if not -loss > min_gain * anchor_loss:  # the robust gain is too small to leave the uniform anchor (loss 0)
        k = cm.full.copy()
        for u in units:
            k[u.group] = cands[u.name][1][anchor[u.name]]
        state = _Greedy(cm, units, cands, robust_unit, robust_bits, choices, col, k,
                        {name: anchor_bits for name in bits}, idx=anchor)
        loss = 0.0
    alloc = Allocation(kind, fraction, state.cost() / orig, anchor_ratio=anchor_ratio, robust_gain=float(-loss),
                       anchor_loss=anchor_loss)
    for u in units:
        c = state.idx[u.name]
        alloc.ratios[u.name] = float(cands[u.name][0][c])
        alloc.unit_error[u.name] = float(unit_err[u.name][c])
    if auto:
        alloc.bits = dict(state.bits)
        alloc.bits_error = {name: float(bit_err[name][choices.index(b)]) if name in bit_err else 0.0
                            for name, b in state.bits.items()}
    return alloc


def uniform_anchor(cm: CostModel, units, col, budget, layers, choices) -> tuple[float, object]:
    """Eq. B8's anchor: the smallest prune ratio that, given to every unit
    (Eq. S1 / S2 kept counts) with every layer at the largest of ``choices``
    that allows it, keeps the cost (column ``col`` of Eq. B5) within
    ``budget`` -- what ``prune_ratio`` would have to be to meet the budget.
    Bisection on the ratio (the kept counts, hence the cost, do not increase
    with it).  Returns ``(ratio, bits)``; the caller has checked that the
    floor (every unit at ``min_keep``, the fewest bits) is within budget."""
    def cost(r, b):
        k = cm.full.copy()
        for u in units:
            k[u.group] = u.kept(r).size
        return cm.total(k, {name: b for name in layers} if b is not None else {})[col]

    top = 1.0 - 1e-9  # every unit at its min_keep floor
    for b in choices:
        if cost(top, b) <= budget:
            break
    if cost(0.0, b) <= budget:
        return 0.0, b
    lo, hi = 0.0, top
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(mid, b) <= budget else (mid, hi)
    return hi, b


def _with_candidate(u: Unit, cand, ratio) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """``cand`` = (ratios, kept counts) with the choice ``u.kept(ratio)``
    added (unless its kept count is there already) and its index."""
    ratios, counts = cand
    kk = int(u.kept(ratio).size)
    hit = np.flatnonzero(counts == kk)
    if hit.size:
        return cand, int(hit[0])
    at = int(np.searchsorted(-counts, -kk))  # counts decrease strictly
    return (np.insert(ratios, at, ratio), np.insert(counts, at, kk)), at


def robust_loss(err: np.ndarray, anchor: int, spread: float) -> np.ndarray:
    """Eq. B8: a unit's (or layer's) loss relative to its anchor choice, the
    predicted change ``d = err - err[anchor]`` taken ``spread`` times where
    it grows (the choice prunes more than the anchor: its error may be
    under-predicted by that factor) and ``1 / spread`` of it where it
    shrinks (the gain may be over-predicted by that factor)."""
    d = np.asarray(err, dtype=np.float64) - float(err[anchor])
    return np.where(d > 0, spread * d, d / spread)


class _Greedy:
    """State of the greedy allocation: each unit's candidate index, each
    layer's bits, the current cost per node (only the budget's column)."""

    def __init__(self, cm: CostModel, units, cands, unit_err, bit_err, choices, col, k, bits, idx=None):
        self.cm, self.units, self.cands = cm, units, cands
        self.unit_err, self.bit_err, self.choices, self.col = unit_err, bit_err, choices, col
        self.k, self.bits = k, bits
        self.idx = dict(idx) if idx is not None else {u.name: 0 for u in units}
        self.node_cost = np.array([self._cost(i) for i in range(len(cm.nodes))], dtype=np.float64)
        self.unit_of = {u.name: u for u in units}
        self.keys = [("u", u.name) for u in units] + [("b", layer) for layer in bit_err]
        self.order = {key: i for i, key in enumerate(self.keys)}
        self.node_keys: dict[int, list] = {}  # node index -> keys whose moves change its cost
        for u in units:
            for i in cm.deps.get(u.group, []):
                self.node_keys.setdefault(i, []).append(("u", u.name))
        for layer in bit_err:
            self.node_keys.setdefault(cm.layer_node[layer], []).append(("b", layer))
        self.cache = {True: {}, False: {}}

    def _cost(self, i, k=None, bits=None):
        nc = self.cm.nodes[i]
        cin, cout = self.cm.counts(nc, self.k if k is None else k)
        b = self.bits.get(nc.layer) if bits is None else bits
        return self.cm.node_cost(nc, cin, cout, b)[self.col]

    def cost(self) -> float:
        return float(self.node_cost.sum())

    def _unit_delta(self, u, c):
        """(cost change, dependent nodes, their new costs) of moving unit ``u`` to candidate ``c``."""
        k = self.k.copy()
        k[u.group] = self.cands[u.name][1][c]
        nodes = self.cm.deps.get(u.group, [])
        new = np.array([self._cost(i, k) for i in nodes], dtype=np.float64)
        return float(new.sum() - self.node_cost[nodes].sum()), nodes, new

    def _bits_delta(self, layer, j):
        i = self.cm.layer_node[layer]
        new = self._cost(i, bits=self.choices[j])
        return float(new - self.node_cost[i]), i, new

    def _key_moves(self, key, forward: bool) -> list:
        """Every single move of one unit (``key`` = ("u", name)) or one
        layer's bits (("b", layer)) ahead of (``forward``) or behind the
        current choice: (error change, cost change, tie key, move)."""
        out = []
        if key[0] == "u":
            u = self.unit_of[key[1]]
            cur = self.idx[u.name]
            for c in (range(cur + 1, len(self.cands[u.name][0])) if forward else range(cur)):
                dcost, nodes, new = self._unit_delta(u, c)
                derr = float(self.unit_err[u.name][c] - self.unit_err[u.name][cur])
                out.append((derr, dcost, (0, self.order[key], c), ("unit", u, c, nodes, new)))
            return out
        layer = key[1]
        errs = self.bit_err[layer]
        cur = self.choices.index(self.bits[layer])
        for j in (range(cur + 1, len(self.choices)) if forward else range(cur)):
            dcost, i, new = self._bits_delta(layer, j)
            out.append((float(errs[j] - errs[cur]), dcost, (1, self.order[key], j), ("bits", layer, j, i, new)))
        return out

    def _moves(self, forward: bool):
        """Every single move, from the cache: a key's moves are recomputed
        only after a move changed the cost of a node they touch (Eq. B5's
        costs are local), so a step costs what the moved unit touches, not a
        pass over every unit."""
        cache = self.cache[forward]
        for key in self.keys:
            if key not in cache:
                cache[key] = self._key_moves(key, forward)
            yield from cache[key]

    def _apply(self, mv):
        if mv[0] == "unit":
            _, u, c, nodes, new = mv
            self.idx[u.name] = c
            self.k[u.group] = self.cands[u.name][1][c]
            self.node_cost[nodes] = new
            stale = {("u", u.name)} | {key for i in nodes for key in self.node_keys.get(i, ())}
        else:
            _, layer, j, i, new = mv
            self.bits[layer] = self.choices[j]
            self.node_cost[i] = new
            stale = {("b", layer)} | set(self.node_keys.get(i, ()))
        for cache in self.cache.values():
            for key in stale:
                cache.pop(key, None)

    def run(self, budget: float) -> None:
        # 1. greedy: the move with the least predicted error per unit of cost saved, until within budget
        while self.cost() > budget:
            best = None
            for derr, dcost, tie, mv in self._moves(True):
                if dcost >= 0:
                    continue
                key = (derr / -dcost, tie)
                if best is None or key < best[0]:
                    best = (key, mv)
            if best is None:  # cannot happen after the floor check; guard against a loop
                raise OptionError("the budget cannot be met")
            self._apply(best[1])
        # 2. give back: the step back that lowers the predicted error most while staying within budget
        while True:
            best = None
            now = self.cost()
            for derr, dcost, tie, mv in self._moves(False):
                if derr >= 0 or now + dcost > budget:
                    continue
                key = (derr, tie)
                if best is None or key < best[0]:
                    best = (key, mv)
            if best is None:
                return
            self._apply(best[1])


class _Swapped:
    """``model`` seen with one tensor replaced (for ``dense_filters`` of a
    weight error), without copying or modifying the model."""

    def __init__(self, model, key, arr):
        self._model = model
        self.tensors = {key: arr}

    def __getattr__(self, name):
        return getattr(self._model, name)
