"""``compress``: prune and quantize a model, compensating in closed form.

Pipeline (derivation section 9): discover pairs (``pairs.py``), build the
data model from weights and BN statistics (``datamodel.py``), choose the
kept channels of every pair (``select.py``), then walk the layers in
topological order; each layer's weights are final when it is reached (its
input columns were rewritten by the pair before it), so it is quantized
(``quantize.py``), its pair's T and t are solved (``solve.py``) and absorbed
by the consumers (``rewrite.py``).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import Counter

import numpy as np

from . import coupled as _coupled
from .budget import Unit, check_target
from .checks import check_layer, check_numbers
from .datamodel import DataModel, bn_affine, dense_filters
from .errors import NumericError, OptionError
from .graph import Model
from .io import release_pages
from .groups import find_groups
from .pairs import find_pairs
from .progress import Progress
from .quantize import VALID_BITS, quantize
from .report import LayerReport, Report
from .rewrite import absorb, keep_outputs, keep_rows, shift_output
from .solve import drop, neuron_merging, objective, udfc, udfc_full
from .calibrate import MODES as CALIBRATION_MODES
from .calibrate import CalibratedStats, check_calibration
from .covselect import select_by_covariance
from .sources import DataFreeStats, StatsRequest, stats_error

METHODS = ("none", "nm", "udfc")
CRITERIA = ("l1", "l2", "l1-bn", "l2-bn", "cov")


def _check_options(model, prune_ratio, weight_bits, method, criterion, alpha1, alpha2, skip, min_keep):
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not math.isfinite(prune_ratio) \
            or not 0.0 <= prune_ratio < 1.0:
        raise OptionError(f"prune ratio must be a number in [0, 1), got {prune_ratio!r}")
    if weight_bits is not None and weight_bits != "auto" and (isinstance(weight_bits, bool)
                                                             or weight_bits not in VALID_BITS):
        raise OptionError(f"weight bits must be one of 2..8 or 16, 'auto' (with a byte budget) or None for float "
                          f"weights, got {weight_bits!r}")
    if method not in METHODS:
        raise OptionError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if criterion not in CRITERIA:
        raise OptionError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    for name, a in (("alpha1", alpha1), ("alpha2", alpha2)):
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise OptionError(f"{name} must be a finite number >= 0, got {a!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise OptionError(f"min_keep must be an int >= 1, got {min_keep!r}")
    layers = {n.name for n in model.nodes if n.op in ("conv2d", "linear")}
    for s in skip:
        if s not in layers:
            known = ", ".join(sorted(layers)[:8])
            raise OptionError(f"--skip layer {s!r} is not a conv/linear layer of this model (layers: {known}"
                              + (" ..." if len(layers) > 8 else "") + ")")


def _checked_numerics(fn):
    """Run ``fn`` with NumPy's floating-point warnings off.  Weights near the
    float limit overflow on the way (a cast to float32, a square); instead of
    a warning per operation, every result is checked explicitly - finite pair
    statistics before each solve, :func:`check_layer` after each rewrite,
    :func:`check_numbers` on the whole output - and a non-finite one is a
    NumericError naming the layer."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


@_checked_numerics
def compress(model: Model, prune_ratio: float = 0.0, weight_bits: int | None = None, method: str = "udfc",
             criterion: str = "l1", per_tensor: bool = False, asymmetric: bool = False, alpha1: float = 0.01,
             alpha2: float = 0.008, bias_correction: bool = False, skip=(), mse_clip: bool = False,
             min_keep: int = 1, progress: bool = False, prune_coupled: bool = False, target_macs=None,
             target_params=None, target_bytes=None, bit_choices=None, calibration=None,
             calibration_mode: str = "sequential", exact: bool = False) -> tuple[Model, Report]:
    """Prune ``prune_ratio`` of the output channels of every compressible
    layer, quantize weights to ``weight_bits``, and compensate with ``method``.

    Parameters
    ----------
    model : the model (not modified).
    prune_ratio : fraction in [0, 1) of each pair producer's output channels
        removed (``round(ratio * N)``, at least ``min_keep`` kept).
    weight_bits : 2..8 or 16, or None for no quantization; ``"auto"`` (with
        ``target_bytes``): each layer's bits chosen from ``bit_choices``.
    method : ``"none"`` (drop / round), ``"nm"`` (Neuron Merging) or ``"udfc"``.
    criterion : ``"l1"``/``"l2"`` filter norm, ``"l1-bn"``/``"l2-bn"`` scaled by |gamma|/sigma;
        ``"cov"``: the channels the others are best rebuilt from (Eq. S4), with calibration images
        in the sequential mode those whose consumer input best gives the original consumer's output (Eq. S5).
    per_tensor, asymmetric, mse_clip : quantizer options (``quantize.py``).
    alpha1, alpha2 : UDFC regularisation weights (Eq. U0-U2).
    bias_correction : remove each quantized layer's expected output shift (Eq. B1).
    skip : names of conv/linear layers left untouched (not pruned, not quantized).
    progress : show a progress line on stderr when the work takes over a second.
    prune_coupled : also prune coupled channel groups -- residual streams,
        concat inputs, chains into grouped convs (derivation section 11); off
        keeps the paper's protocol (pairs only).
    target_macs, target_params, target_bytes : a budget, as a fraction in
        (0, 1) of the original's MACs / parameters / weight bytes (one at a
        time, exclusive with ``prune_ratio``): every unit's prune ratio (and,
        with ``weight_bits="auto"``, every layer's bits) is chosen to minimise
        the predicted error within it (section 12).
    bit_choices : bit widths for ``weight_bits="auto"`` (default 8, 6, 4).
    calibration : optional (N, C, H, W) float array of unlabeled images of the
        model's input shape (N >= 2; a memory map is read batch by batch).
        Given, the pair statistics are measured on these images instead of
        taken from the data model (derivation section 13, Eq. C1-C4), and the
        report shows, per pair, the data model's predicted error next to the
        measured one.  Default None: data-free.
    calibration_mode : ``"sequential"`` (default): the kept channels come from
        the network already compressed upstream, the target is the original's
        activations; every row of T is fitted on all kept channels (Eq. C6)
        and each consumer is refitted to the original's output of it (Eq. C7);
        ``"oracle"``: the same statistics with the data-free solver (U1-U4),
        the reference the data-free statistics are audited against;
        ``"independent"``: each pair on the original network's
        activations; ``"audit"``: compress data-free (the images change
        nothing in the model) and report the measured errors beside it.
    exact : build the data model's covariances in float64 with the Mehler series to 1e-10
        (the reference path) instead of float32 (faster, half the memory; within the
        tolerance stated in ``docs/derivation.md``, "Precision").

    Returns
    -------
    (compressed model, Report)
        ``model`` is never modified.  Tensors the compression leaves unchanged
        are shared with ``model`` (not copied), so write into neither in place.
        A quantized weight is held as its codes only (``model.quant[name]``):
        ``tensors[name]`` dequantizes it on every read and returns a read-only
        array (``tensors.spec(name)`` gives its shape and dtype for free).
    """
    skip = list(skip or ())
    _check_options(model, prune_ratio, weight_bits, method, criterion, alpha1, alpha2, skip, min_keep)
    if not isinstance(prune_coupled, bool):
        raise OptionError(f"prune_coupled must be True or False, got {prune_coupled!r}")
    target, fraction, bit_choices = check_target(prune_ratio, weight_bits, bit_choices,
                                                 {"macs": target_macs, "params": target_params,
                                                  "bytes": target_bytes})
    if calibration is not None:
        if calibration_mode not in CALIBRATION_MODES + ("audit",):
            raise OptionError(f"calibration_mode must be one of {', '.join(CALIBRATION_MODES + ('audit',))}, "
                              f"got {calibration_mode!r}")
        check_calibration(model, calibration)
    check_numbers(model)
    t0 = time.perf_counter()
    stages = {}

    seen = {"data model": 0.0, "calibration": 0.0}
    dm = source = audit = None

    def tick(name, t):
        """Charge the time since ``t`` to stage ``name``, less what the lazy
        data model and the calibration source spent inside it (charged to
        "data model" / "calibration")."""
        spent = 0.0
        measured = source if isinstance(source, CalibratedStats) else audit  # the images' work, in any mode
        for stage, obj in (("data model", dm), ("calibration", measured)):
            now = getattr(obj, "seconds", 0.0) if obj is not None else 0.0
            inside, seen[stage] = now - seen[stage], now
            if stage == "data model" or inside:
                stages[stage] = stages.get(stage, 0.0) + inside
            spent += inside
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t - spent
        return time.perf_counter()

    orig = model
    out = model.copy(share_tensors=True)  # every rewrite below replaces arrays, never writes into them
    pairs, unpruned = find_pairs(orig)
    pairs = [p for p in pairs if p.name not in skip]
    cg = find_groups(orig)  # channel groups (linear in the graph): what must be removed together
    groups = _coupled_groups(cg, pairs, skip, unpruned) if prune_coupled else []
    score = "l1" if criterion == "cov" else criterion  # Eq. S4 is applied to pairs in the walk below
    units = [Unit.of_pair(orig, p, cg, score, min_keep) for p in pairs] + \
        [Unit.of_group(orig, g, score, min_keep) for g in groups]
    ratio_of = {u.name: prune_ratio for u in units}
    bits_of = {}
    alloc = None
    if target is not None:
        from .budget import allocate

        alloc = allocate(orig, cg, units, target, fraction, weight_bits, bit_choices, skip, method=method,
                         alpha1=alpha1, alpha2=alpha2, bias_correction=bias_correction,
                         qkw=dict(symmetric=not asymmetric, per_channel=not per_tensor, mse_clip=mse_clip),
                         progress=progress, coupled_hint=not prune_coupled and any(
                             not g.blocked for g in cg.groups if g.producers))
        ratio_of, bits_of = alloc.ratios, alloc.bits
        stages["allocate"] = time.perf_counter() - t0
    if weight_bits == "auto" or target is not None:
        # a unit left at ratio 0 without quantization of its producer is not touched at all
        pairs = [p for p in pairs if ratio_of[p.name] > 0 or _bits(p.name, weight_bits, bits_of, skip) is not None]
    elif prune_ratio == 0 and weight_bits is None:
        pairs = []  # nothing to do: the model is returned unchanged
    for s in skip:
        unpruned[s] = "skipped by request"
    unit_of = {u.name: u for u in units}
    t = time.perf_counter()
    # ---- coupled groups: one kept set each (Eq. G1), rows removed everywhere up front
    group_kept = {}
    for g in groups:
        kept = unit_of[g.name].kept(ratio_of[g.name])
        if kept.size < g.size:
            group_kept[g.index] = kept
    pruned_groups = [g for g in groups if g.index in group_kept]
    vkept = _coupled.value_kept(cg, group_kept)
    group_reads = {c.name: v for g in pruned_groups for c, v, _ in g.consumers}
    group_err = {g.index: np.zeros(3) for g in pruned_groups}  # Eq. E2 sums: drop, after, energy
    t = tick("select", t)
    need_dm = pairs or pruned_groups or (weight_bits is not None and bias_correction)
    dm = None
    if need_dm:
        dm = DataModel(orig, lazy=True, dtype=np.float64 if exact else np.float32, skip_unread=True)
    t = tick("data model", t)
    # the statistics source (derivation section 13); with calibration images the data-free one is kept
    # beside it as the auditor's prediction (``audit``: the other view of the same pairs, for the report)
    plain = DataFreeStats(dm) if pairs else None  # the data model of the original, for Eq. S4
    if pairs:
        source = plain
        if calibration is not None and calibration_mode == "audit":  # solve data-free, measure what happens
            audit = CalibratedStats(orig, out, calibration, "sequential")
        elif calibration is not None:
            source, audit = CalibratedStats(orig, out, calibration, calibration_mode), source

    qkw = dict(symmetric=not asymmetric, per_channel=not per_tensor, mse_clip=mse_clip)
    pair_of = {p.producer.name: p for p in pairs}
    in_kept: dict[str, np.ndarray] = {}
    reports: list[LayerReport] = []
    record_layers = {}
    quantized = {}
    companion: dict[str, str] = {}  # layer -> note, for layers whose rows go with a pair's channels
    _coupled.trim_rows(out, cg, pruned_groups, vkept, in_kept, companion)
    finished: set[str] = set()  # such layers, quantized as soon as they are final (before their own visit)

    def finish(lnode):
        """Quantize (and bias-correct) a layer whose rows went with a pair's
        channels as soon as its weights are final, so that statistics read
        from the compressed model see it as it will be saved."""
        finished.add(lnode.name)
        lbits = _bits(lnode.name, weight_bits, bits_of, skip)
        if lbits is not None:
            cnode = out.node(lnode.name)
            eps = _quantize_layer(out, cnode, lbits, qkw, quantized)
            if bias_correction:
                _bias_correct(out, cnode, eps, dm, lnode, in_kept.get(lnode.name))
    layer_nodes = [n for n in orig.nodes if n.op in ("conv2d", "linear")]
    bar = Progress(len(layer_nodes), "compress") if progress else None
    given_back = 0  # layers [0, given_back) whose original weights are read no more
    # the selection above read every producer's filters: their pages go back now and are read again (from
    # the page cache) when the walk reaches them, so the input is resident a few layers at a time
    release_pages([orig.tensor_spec(k) for k in orig.tensors])  # arrays (a spec of codes is skipped)
    for step, onode in enumerate(layer_nodes):
        if bar is not None:
            bar.update(step, onode.name)
        given_back = _give_back(orig, layer_nodes, given_back, step, dm)
        node = out.node(onode.name)
        wkey = node.params["weight"]
        pair = pair_of.get(onode.name)
        n_out = orig.tensors[onode.params["weight"]].shape[0]
        bits = _bits(onode.name, weight_bits, bits_of, skip)
        if onode.name in group_reads:  # Eq. G2-G3: rebuild the pruned channels of the value it reads
            value = group_reads[onode.name]
            errs = _coupled.rebuild_value(out, orig, dm, onode, value, vkept[value], method, alpha1, alpha2)
            _add_group_errors(cg, value, group_kept, errs, group_err)
            in_kept[onode.name] = vkept[value]
            t = tick("rewrite", t)
        if pair is None:
            # not prunable: quantize only (+ bias correction)
            if onode.name in finished:  # a chain's / gate's layer, quantized with its pair: keep the record order
                if onode.name in quantized:
                    quantized[onode.name] = quantized.pop(onode.name)
            elif bits is not None:
                eps = _quantize_layer(out, node, bits, qkw, quantized, error=bias_correction)
                if bias_correction:
                    _bias_correct(out, node, eps, dm, onode, in_kept.get(onode.name))
                del eps
            if dm is not None:
                dm.release(onode.name)
            n_now = int(out.tensors.spec(wkey).shape[0])
            note = unpruned.get(onode.name, "") if n_now == n_out else companion.get(
                onode.name, "depthwise, pruned with its producer")
            reports.append(LayerReport(onode.name, onode.op, n_out, n_now, bits, n_now != n_out, note=note))
            t = tick("quantize", t)
            continue

        # ---- a pair: select, prune rows, quantize, solve, absorb
        if dm is not None:  # the data model's propagation up to this layer first: its temporaries are gone
            dm.advance_to(onode.name)  # before this layer's filters, codes and errors are allocated below
        gamma, beta, mu, sigma = bn_affine(orig, pair.bn)
        kept = unit_of[pair.name].kept(ratio_of[pair.name])
        weights = sum(_coupled.column_energy(orig, c.node, n_out) for c in pair.consumers)  # w_i of Eq. E2
        selection = None  # which of Eq. S4 / S5 chose the kept set (criterion "cov")
        if criterion == "cov" and pair.groups == 1 and kept.size < n_out:
            # as many channels: with the sequential mode's refit, those whose consumer input best gives
            # the original consumer's output (Eq. S5); else those the others are best rebuilt from (Eq. S4)
            by_output = source.select_by_output(pair, kept.size, gamma=gamma, scores=unit_of[pair.name].scores) \
                if isinstance(source, CalibratedStats) else None
            if by_output is not None:
                kept, selection = by_output, "output (Eq. S5)"
            else:
                cov = (source if calibration is not None and calibration_mode != "audit" else plain).selection_cov(pair)
                kept = select_by_covariance(cov, weights, n_keep=kept.size, gamma=gamma,
                                            scores=unit_of[pair.name].scores)
                selection = "covariance (Eq. S4)"
        t = tick("select", t)
        bn_node = out.node(pair.bn.name)
        keep_outputs(out, node, bn_node, kept)
        eps_w = None
        if bits is not None:
            eps_w = _quantize_layer(out, node, bits, qkw, quantized)
        t = tick("quantize", t)
        # (N, C, R) original filters, original coordinates; in their stored precision on the fast path
        # (exact values, half the memory of float64: pair_stats accumulates in float64 where it reads them)
        Wd = dense_filters(orig, onode, dtype=np.float64 if exact else None)
        ik = in_kept.get(onode.name)
        if pair.dw is not None:
            # depthwise chain: the depthwise channel and its BN go with the producer channel
            dw = out.node(pair.dw.name)
            if pair.bn2 is not None:
                keep_outputs(out, dw, out.node(pair.bn2.name), kept)
            else:
                keep_rows(out, dw, kept)
            dw.attrs["groups"] = int(kept.size)
            in_kept[dw.name] = kept
            finish(pair.dw)  # final now: quantized before the chain's statistics are read
        extra = None
        if eps_w is not None and bias_correction:
            extra = -_bias_correct(out, node, eps_w, dm, onode, ik)
        req = functools.partial(StatsRequest, pair, kept, Wd=Wd, Wq=_embedded_filters(Wd, kept, eps_w, ik, pair.groups),
                                gamma=gamma, beta=beta, extra=extra)
        eps_w = None  # embedded in Wq
        st_gap = None
        # sequential calibration: Eq. C6 (all rows from all kept channels) and the consumers' refit (Eq. C7)
        refit = method == "udfc" and isinstance(source, CalibratedStats) and source.refits
        refitted = []
        if pair.se is not None:
            # Eq. SE1-SE3: the gate's excite rows go with the channels; the squeeze reads the rebuilt
            # pre-gate channels through the GAP (asked for before the gated value, which depends on it)
            st_gap = source.stats(req(which="gap"))
            if audit is not None:
                audit.stats(req(which="gap"))
            _prune_se_gate(out, pair, kept, onode.name, companion)
            finish(pair.se.excite)
            if method == "udfc":
                Tg = _solved(udfc_full, onode, st_gap, n_out, alpha1) if refit else \
                    _solved(udfc, onode, st_gap, n_out, alpha1, alpha2)
                _absorb_squeeze(out, orig, pair, kept, *Tg, in_kept)
                finish(pair.se.squeeze)
        st = source.stats(req(which="value"))
        st_other = audit.stats(req(which="value")) if audit is not None else None
        # the filters and the request are read no more (Neuron Merging reads Wd): freed before the solve
        req = None
        if method != "nm":
            Wd = None
        if method == "udfc" and not all(np.all(np.isfinite(v)) for v in (st.mean_a, st.var_a, st.mean_q, st.cov_q,
                                                                        st.cross)):
            raise NumericError(f"layer {onode.name!r}: its statistics under the data model overflow (NaN/Inf): "
                               "the weights or BN statistics are too large for this compression")
        T0, t0_ = drop(st, n_out)
        if refit:  # Eq. C6: measured statistics, every row from all kept channels
            T, tt = _solved(udfc_full, onode, st, n_out, alpha1)
        elif method == "udfc":
            T, tt = _solved(udfc, onode, st, n_out, alpha1, alpha2)
        elif method == "nm":
            # on a depthwise chain, merging partners are chosen on the producer filters and BN
            T, tt = neuron_merging(Wd.astype(np.float64, copy=False), gamma, beta, mu, sigma, kept)
        else:
            T, tt = T0, t0_
        if pair.se is not None and method != "udfc":
            _absorb_squeeze(out, orig, pair, kept, T, tt, in_kept)  # nm / none: the same T for the squeeze
            finish(pair.se.squeeze)
        t = tick("solve", t)
        _resize_reshapes(out, pair.reshapes, kept.size)
        for c in pair.consumers:
            wc = orig.tensors[c.node.params["weight"]]
            cnode = out.node(c.node.name)
            b_now = out.param(cnode, "bias")
            delta = absorb(out, cnode, T, tt, wc.dtype, fast=not exact)
            if refit and _refit(out, source, pair.value, c.node, b_now, delta):
                refitted.append(c.node.name)
            check_layer(out, out.node(c.node.name), f"compensating the pruned channels of {onode.name!r}",
                        f"--skip {onode.name} or --method none avoids it")
            in_kept[c.node.name] = kept
        denom = float(weights @ (st.var_a + st.mean_a**2)) or 1.0
        err0 = float(weights @ objective(st, T0, t0_)) / denom
        err1 = float(weights @ objective(st, T, tt)) / denom
        record_layers[onode.name] = {"channels_before": int(n_out), "channels_after": int(kept.size),
                                     "kept": [int(i) for i in kept], "prune_ratio": ratio_of[pair.name]}
        if pair.dw is not None:
            record_layers[onode.name]["depthwise"] = pair.dw.name
        if pair.groups > 1:
            record_layers[onode.name]["groups"] = int(pair.groups)
        if selection is not None:
            record_layers[onode.name]["selection"] = selection
        if refitted:
            record_layers[onode.name]["refit"] = refitted
        if pair.se is not None:
            record_layers[onode.name]["se"] = {"squeeze": pair.se.squeeze.name, "excite": pair.se.excite.name}
        lrep = LayerReport(onode.name, onode.op, n_out, int(kept.size), bits, True, err0, err1,
                           ratio=ratio_of[pair.name])
        if st_other is not None:  # the auditor's view: the data model's prediction beside the measurement
            st_pred, st_real = (st, st_other) if calibration_mode == "audit" else (st_other, st)
            lrep.predicted_before, lrep.predicted_after = _e2(weights, st_pred, T0, t0_, T, tt)
            lrep.measured_before, lrep.measured_after = _e2(weights, st_real, T0, t0_, T, tt)
            lrep.stats_error = stats_error(st_pred, st_real)
        reports.append(lrep)
        dm.release(onode.name)
        source.release(onode.name)
        if audit is not None:
            audit.release(onode.name)
        # nothing of this pair is read again: its arrays do not wait for the next pair to be overwritten
        Wd = st = st_other = st_gap = T = tt = T0 = t0_ = None
        t = tick("rewrite", t)
    if bar is not None:
        bar.update(len(layer_nodes))
        bar.close()
    _group_records(pruned_groups, group_kept, group_err, ratio_of, reports, record_layers, unpruned, orig)
    for src in (source, audit):
        if src is not None:
            src.close()

    if prune_ratio > 0 and not any(r.channels_after < r.channels_before for r in reports):
        widths = [orig.shapes[p.producer.output][0] for p in pairs] + [g.size for g in groups]
        warnings.warn(_nothing_pruned(prune_ratio, widths, unpruned, len(layer_nodes), weight_bits),
                      stacklevel=3)  # the caller of compress (through _checked_numerics)
    out.record = {
        "method": method, "prune_ratio": prune_ratio, "weight_bits": weight_bits, "criterion": criterion,
        "per_tensor": per_tensor, "asymmetric": asymmetric, "mse_clip": mse_clip, "alpha1": alpha1,
        "alpha2": alpha2, "bias_correction": bias_correction, "skip": skip, "min_keep": min_keep,
        "layers": record_layers, "quantized": quantized,
        "unpruned": dict(unpruned), "prune_coupled": prune_coupled,
    }
    if calibration is not None:
        out.record["calibration"] = {"mode": calibration_mode, "images": int(calibration.shape[0])}
    if alloc is not None:
        out.record["budget"] = {"target": target, "fraction": fraction, "predicted": alloc.predicted,
                                "bit_choices": None if bit_choices is None else list(bit_choices),
                                "ratios": dict(alloc.ratios), "bits": dict(alloc.bits),
                                "uniform_ratio": alloc.anchor_ratio, "robust_gain": alloc.robust_gain}
    out.validate()
    try:
        check_numbers(out)  # never hand back (or let anyone write) a model holding NaN/Inf
    except NumericError as e:
        raise NumericError(f"the compressed model: {e}") from None
    t = tick("validate", t)
    rep = Report(method, {k: out.record[k] for k in ("prune_ratio", "weight_bits", "criterion", "per_tensor",
                                                   "asymmetric", "mse_clip", "alpha1", "alpha2",
                                                   "bias_correction", "skip", "prune_coupled")}, reports)
    if calibration is not None:
        rep.options["calibration"] = out.record["calibration"]
    rep.params_before, rep.params_after = orig.param_count(), out.param_count()
    rep.bytes_before, rep.bytes_after = orig.weight_bytes(), out.weight_bytes()
    rep.flops_before, rep.flops_after = orig.flops(), out.flops()
    if alloc is not None:
        got = {"macs": (rep.flops_after, rep.flops_before), "params": (rep.params_after, rep.params_before),
               "bytes": (rep.bytes_after, rep.bytes_before)}[target]
        achieved = got[0] / got[1]
        if achieved > fraction:  # the cost model is exact (an upper bound); this is a bug, never a user error
            raise RuntimeError(f"budget allocation: {target} reached {achieved:.6f} of the original, above the "
                               f"target {fraction:g} (predicted {alloc.predicted:.6f})")
        rep.budget = {"target": target, "fraction": fraction, "achieved": achieved, "predicted": alloc.predicted,
                      "uniform_ratio": alloc.anchor_ratio, "robust_gain": alloc.robust_gain}
        out.record["budget"]["achieved"] = achieved
    rep.seconds = time.perf_counter() - t0
    rep.stage_seconds = stages
    return out, rep


def _give_back(orig: Model, layer_nodes, done: int, step: int, dm) -> int:
    """Return the memory of the original weights of the layers before ``step``
    that the data model has propagated (nothing reads them again) when the
    input file is memory-mapped read-only (``io.release_pages``; a no-op
    otherwise).  Returns the new count of layers given back."""
    while done < step and (dm is None or dm.propagated(layer_nodes[done].name)):
        release_pages([orig.tensor_spec(t) for t in layer_nodes[done].params.values()])
        done += 1
    return done


def _nothing_pruned(prune_ratio, widths, unpruned, n_layers, weight_bits) -> str:
    """The text of the warning for a requested pruning that removed nothing
    (``widths``: output channels of each prunable layer)."""
    done = "only the weights were quantized" if weight_bits is not None else "the model is unchanged"
    if widths:
        return (f"prune ratio {prune_ratio:g} pruned no channel: round(ratio x channels) is 0 for every prunable "
                f"layer (the widest of the {len(widths)} has {max(widths)} channels); {done}")
    reasons = Counter(why for why in unpruned.values() if why)
    if not reasons:
        return f"prune ratio {prune_ratio:g} pruned no channel: the model has no conv/linear layer; {done}"
    why, k = reasons.most_common(1)[0]
    hint = "; prune_coupled=True (--prune-coupled) prunes coupled channels too" if "coupled" in why else ""
    return (f"prune ratio {prune_ratio:g} pruned no channel: none of the {n_layers} conv/linear layers can be pruned "
            f"without data ({k} of them: {why}); {done}{hint}")


def _prune_se_gate(model: Model, pair, kept, producer: str, companion: dict) -> None:
    """Eq. SE1: remove the pruned channels' rows (and bias) of the gate's
    excite layer and their entries of the per-channel affines on the gate."""
    se = pair.se
    keep_rows(model, model.node(se.excite.name), kept)
    companion[se.excite.name] = f"excite of the SE gate on {producer!r}, pruned with it"
    for a in se.affines:
        keep_rows(model, model.node(a.name), kept)
    _resize_reshapes(model, se.reshapes, kept.size)


def _resize_reshapes(model: Model, nodes, n_kept: int) -> None:
    """A reshape between (C,) and (C, 1, 1) of pruned channels: C becomes the kept count."""
    for r in nodes:
        node = model.node(r.name)
        node.attrs["shape"] = [int(n_kept)] + list(node.attrs["shape"][1:])


def _e2(weights, st, T0, t0, T, t) -> tuple[float, float]:
    """Eq. E2 of dropping (T0, t0) and of the method's (T, t) under ``st``."""
    denom = float(weights @ (st.var_a + st.mean_a**2)) or 1.0
    return float(weights @ objective(st, T0, t0)) / denom, float(weights @ objective(st, T, t)) / denom


def _embedded_filters(Wd, kept, eps_w, ik, groups) -> np.ndarray:
    """Eq. D4: the compressed kept filters in the original input coordinates,
    (M, C, R): ``W[kept]`` with the quantization error ``eps_w`` embedded at
    the kept input channels ``ik`` (all when None); a grouped producer's error
    laid out densely (Eq. D1).  Float64 whatever the dtype of ``Wd``."""
    Wq = Wd[kept].astype(np.float64, copy=False)  # a new float64 array: the error is added exactly below
    if eps_w is not None:
        E = eps_w.reshape(kept.size, -1, Wd.shape[2])
        if groups > 1:  # Eq. D1 layout: the group's input columns of the dense filters
            og, cg = Wd.shape[0] // groups, E.shape[1]
            cols = (kept // og)[:, None] * cg + np.arange(cg)[None, :]  # in the stored (kept-input) coordinates
            if ik is not None:  # inputs pruned upstream (a coupled group): back to the original coordinates
                cols = np.asarray(ik)[cols]
            Wq[np.arange(kept.size)[:, None], cols, :] += E
        elif ik is None:
            Wq += E
        else:
            Wq[:, ik, :] += E
    return Wq


def _absorb_squeeze(out: Model, orig: Model, pair, kept, Ta, ta, in_kept) -> None:
    """Eq. SE2: the SE gate's squeeze absorbs the rebuilding of its input."""
    sq = pair.se.squeeze
    absorb(out, out.node(sq.name), Ta, ta, orig.tensors[sq.params["weight"]].dtype)
    in_kept[sq.name] = kept


def _refit(out: Model, source: CalibratedStats, start: str, onode, b_now, delta) -> bool:
    """Eq. C7: replace a consumer's absorbed ``W' T`` and constant by the
    measured least squares of the original network's output of it on the
    compressed network's input of it.  ``b_now`` is the consumer's bias
    before the absorb (None: none), ``delta`` (O,) the constant the absorb
    added (into the bias or the following BN's mean, ``rewrite.shift_output``).
    False when the consumer is not refitted (``calibrate.refit_reads``)."""
    cnode = out.node(onode.name)
    key = cnode.params["weight"]
    w = out.tensors[key]
    fit = source.refit(start, onode, w.shape[2:] if onode.op == "conv2d" else None)
    if fit is None:
        return False
    Wn, b = fit
    out.tensors[key] = np.ascontiguousarray(Wn.reshape(w.shape), dtype=w.dtype)
    beta = delta + (0.0 if b_now is None else b_now.astype(np.float64))  # the output's constant now
    shift_output(out, cnode, b - beta, w.dtype)
    return True


def _quantize_layer(model: Model, node, bits, qkw, quantized, error: bool = True) -> np.ndarray | None:
    """Quantize the layer's (current) weight in place; return Q(W) - W in float64 (None unless ``error``).

    The model keeps the codes only (``Tensors.hold_codes``): the weight reads
    back dequantized, and no float copy of it stays beside the codes."""
    key = node.params["weight"]
    w = model.tensors[key]
    q = quantize(w, bits, **qkw)
    deq = q.dequantize()
    model.tensors[key] = deq
    model.quant[key] = q
    check_layer(model, node, f"{bits}-bit quantization", f"--skip {node.name} avoids it")
    model.tensors.hold_codes(key, q)
    quantized[node.name] = {"tensor": key, "bits": bits, "symmetric": q.symmetric, "per_channel": q.per_channel}
    return deq.astype(np.float64) - w.astype(np.float64) if error else None


def _bias_correct(model: Model, node, eps_w, dm: DataModel, onode, in_kept) -> np.ndarray:
    """Eq. B1 (DFQ bias correction): the quantized layer's output has the
    extra mean eps . E[x]; remove it.  Returns the removed shift (O,)."""
    im = dm.input_model(onode.name) if dm is not None else None
    if im is None:
        return np.zeros(eps_w.shape[0])
    m = im.mean_c if in_kept is None else im.mean_c[in_kept]
    if node.op == "conv2d" and node.attrs["groups"] != 1:
        g = node.attrs["groups"]
        o, cg = eps_w.shape[:2]
        grp = np.arange(o) // (o // g)
        mm = m.reshape(g, cg)[grp]  # (O, Cg)
        shift = np.einsum("ocr,oc->o", eps_w.reshape(o, cg, -1), mm)
    else:
        shift = np.einsum("ocr,c->o", eps_w.reshape(eps_w.shape[0], m.shape[0], -1), m)
    shift_output(model, node, -shift, model.tensors[node.params["weight"]].dtype)
    check_layer(model, node, "bias correction", "leave out --bias-correction")
    return shift


def _solved(solver, onode, *args):
    """``solver(*args)``; a solve that fails to converge is a NumericError naming the layer."""
    try:
        return solver(*args)
    except np.linalg.LinAlgError as e:
        raise NumericError(f"layer {onode.name!r}: the compensation solve failed ({e}); the layer's weights or "
                           "BN statistics are too extreme for this compression") from None


def _bits(layer: str, weight_bits, bits_of: dict, skip) -> int | None:
    """The bit width of ``layer``: None when skipped, the budget's choice
    for ``weight_bits="auto"``, else ``weight_bits``."""
    if layer in skip:
        return None
    return bits_of.get(layer) if weight_bits == "auto" else weight_bits


def _coupled_groups(cg, pairs, skip, unpruned: dict) -> list:
    """The channel groups ``prune_coupled`` adds to the pairs: not blocked,
    not a pair's, no producer or depthwise conv in ``skip``.  The reason a
    producer of a blocked group stays is the group's (``unpruned``)."""
    pair_groups = {cg.group_of(p.producer.output).index for p in pairs}
    out = []
    for g in cg.groups:
        if g.index in pair_groups or not g.producers:
            continue
        if g.blocked:
            for p in g.producers:
                if "coupled" in unpruned.get(p.name, ""):
                    unpruned[p.name] = f"its channel group is not prunable: {g.blocked}"
            continue
        if any(n.name in skip for n in g.producers + g.depthwise):
            continue
        out.append(g)
    return out


def _add_group_errors(cg, value, group_kept, errs, group_err) -> None:
    """Accumulate Eq. E2's sums (drop, after, energy; weighted by the column
    energy ``w``) of each pruned group over the channels of ``value`` it holds."""
    w, e0, e1, energy = errs
    off = 0
    for gi in cg.layout[value]:
        n = cg.groups[gi].size
        if gi in group_kept:
            sl = slice(off, off + n)
            group_err[gi] += [w[sl] @ e0[sl], w[sl] @ e1[sl], w[sl] @ energy[sl]]
        off += n


def _group_records(pruned_groups, group_kept, group_err, ratio_of, reports, record_layers, unpruned, orig) -> None:
    """Report and record of the pruned coupled groups: every producer and
    depthwise conv gets a record entry (kept channels, its group, the
    group's ratio); the first producer carries the group's Eq. E2 errors."""
    by_layer = {r.layer: r for r in reports}
    for g in pruned_groups:
        kept = group_kept[g.index]
        ratio = ratio_of[g.name]
        e0, e1, den = group_err[g.index]
        den = den or 1.0
        for n in g.producers + g.depthwise:
            unpruned.pop(n.name, None)
            entry = {"channels_before": int(g.size), "channels_after": int(kept.size),
                     "kept": [int(i) for i in kept], "group": g.name, "prune_ratio": ratio}
            if n.op == "conv2d" and 1 < n.attrs["groups"] < g.size:
                entry["groups"] = int(n.attrs["groups"])
            record_layers[n.name] = entry
            r = by_layer[n.name]
            r.ratio = ratio
            if n.name == g.name:
                r.error_before, r.error_after = float(e0 / den), float(e1 / den)
