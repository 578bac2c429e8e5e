"""Audit of the squeeze-excitation approximations (derivation Eq. D11, SE1-SE3)
on the trained benchmark networks.

1. **Gate independence (Eq. D11).**  For every SE gate ``y = a * g`` of the
   model, the covariance of ``y`` over images and positions is predicted from
   the *measured* statistics of the map ``a`` and the gate ``g`` as if they
   were independent, ``E[y y^T] = E[a a^T] o E[g g^T]``, and as if the gate
   were a constant at its mean, ``E[y y^T] = E[a a^T] o (E g)(E g)^T``; the
   relative Frobenius error against the measured ``Cov(y)`` isolates that one
   assumption from the rest of the data model.
2. **End to end.**  Top-1 on the test split at the given prune ratio / bits:
   udfc with the SE gate modelled (Eq. SE1-SE3, the default), with the gate
   left out of the statistics (the rebuilding coefficients of the gated map
   taken from the ungated one, ``T_y = T_a``), with the gate frozen at its
   data-model mean, and with the SE producers left unpruned (``--skip``);
   ``none`` and ``nm`` for reference; and an *oracle*: udfc with the
   statistics of every depthwise-chain / SE pair measured on 500 test images
   instead of the data model (what a perfect data model would give with the
   same reconstruction form).
3. ``--alone``: the same, one pair at a time (every other layer skipped: not
   pruned, not quantized; float weights).

Usage::

    python benchmarks/se_audit.py                    # both SE models, 30 % + 6 bits
    python benchmarks/se_audit.py --ratio 0.5 --bits 6
    python benchmarks/se_audit.py --models mobilenetv3_mnist --alone 0.1
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import udfc_ref  # noqa: E402
from udfc_ref import datamodel  # noqa: E402
from udfc_ref.evaluate import load_npz, top1  # noqa: E402
from udfc_ref.pairs import find_pairs  # noqa: E402

MODELS = ("efficientnet_mnist", "mobilenetv3_mnist")


def gate_independence(model, x):
    """Per SE gate: (name, relative Frobenius error of Cov(y) predicted with
    an independent gate, with a constant gate)."""
    pairs, _ = find_pairs(model)
    vals = model.forward(x, return_values=True)
    out = []
    for p in pairs:
        if p.se is None:
            continue
        mul = p.se.mul
        a_name = p.se.value
        g_name = next(i for i in mul.inputs if i != a_name)
        a = vals[a_name].astype(np.float64)  # (N, C, H, W)
        g = vals[g_name].astype(np.float64).reshape(a.shape[0], a.shape[1])  # (N, C)
        y = vals[mul.output].astype(np.float64)
        n, c = a.shape[:2]
        A = a.transpose(0, 2, 3, 1).reshape(-1, c)
        Y = y.transpose(0, 2, 3, 1).reshape(-1, c)
        cov_y = np.cov(Y.T, bias=True)
        saa = A.T @ A / A.shape[0]
        sgg = g.T @ g / n
        mg = g.mean(0)
        mean_y_ind = A.mean(0) * mg
        ind = saa * sgg - np.outer(mean_y_ind, mean_y_ind)
        frozen = saa * np.outer(mg, mg) - np.outer(mean_y_ind, mean_y_ind)
        nrm = np.linalg.norm(cov_y)
        out.append((p.name, float(np.linalg.norm(ind - cov_y) / nrm), float(np.linalg.norm(frozen - cov_y) / nrm)))
    return out


def chain_correlation_error(model, x):
    """Per depthwise-chain / SE pair: relative Frobenius error of the data
    model's channel correlation of the value the consumers read, off-diagonal
    part, against the correlation measured on ``x``."""
    pairs, _ = find_pairs(model)
    vals = model.forward(x, return_values=True)
    dm = datamodel.DataModel(model)
    out = []
    for p in pairs:
        if p.dw is None and p.se is None:
            continue
        a = vals[p.value].astype(np.float64)
        a = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
        real = np.corrcoef(a.T)
        cov = dm.values[p.value].cov
        d = np.sqrt(np.diag(cov))
        model_corr = cov / np.outer(d, d)
        off = ~np.eye(real.shape[0], dtype=bool)
        out.append((p.name, float(np.linalg.norm((model_corr - real)[off]) / np.linalg.norm(real[off]))))
    return out


@contextmanager
def gate_variant(kind):
    """Patch the data model's rule for ``mul``: "ignore" -> unknown (T_y = T_a),
    "frozen" -> the gate's covariance set to 0 (a constant at its mean)."""
    orig = datamodel.DataModel._propagate_more

    def patched(self, n, ins):
        if n.op == "mul":
            if kind == "ignore":
                return None
            ins = [s if s is None or self.model.shapes[name][1:] != (1, 1) else
                   datamodel.ValueStats(s.mean, np.zeros_like(s.cov), s.rho) for s, name in zip(ins, n.inputs)]
        return orig(self, n, ins)

    datamodel.DataModel._propagate_more = patched
    try:
        yield
    finally:
        datamodel.DataModel._propagate_more = orig


@contextmanager
def oracle_statistics(model, x):
    """Patch ``sources.chain_stats`` (the data-free source calls it): the statistics of a chain / SE value
    measured on ``x`` (recognised by the data model's mean of that value)."""
    from udfc_ref import sources

    pairs, _ = find_pairs(model)
    vals = model.forward(x, return_values=True)
    dm = datamodel.DataModel(model)
    names = [v for p in pairs if p.dw is not None or p.se is not None
             for v in [p.value] + ([p.se.value] if p.se is not None else [])]
    measured = {}
    for v in names:
        a = vals[v].astype(np.float64)
        a = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])
        measured[v] = (dm.values[v].mean, datamodel.ValueStats(a.mean(0), np.cov(a.T, bias=True)))
    orig = sources.chain_stats

    def chain_stats(values, kept):
        for key, real in measured.values():
            if values is not None and values.mean.shape == key.shape and np.array_equal(values.mean, key):
                return orig(real, kept)
        return orig(values, kept)

    sources.chain_stats = chain_stats
    try:
        yield
    finally:
        sources.chain_stats = orig


def alone(model, x, y, ratio):
    """Top-1 when only one pair is pruned (float weights), per method and with oracle statistics."""
    pairs, _ = find_pairs(model)
    names = [p.name for p in pairs]
    rows = []
    for p in pairs:
        skip = [q for q in names if q != p.name]
        res = {}
        for method in ("none", "nm", "udfc"):
            res[method] = top1(udfc_ref.compress(model, prune_ratio=ratio, method=method, skip=skip)[0], x, y)
        if p.dw is not None or p.se is not None:
            with oracle_statistics(model, x[:500]):
                res["oracle"] = top1(udfc_ref.compress(model, prune_ratio=ratio, skip=skip)[0], x, y)
        rows.append((p.name, res))
    return rows


def end_to_end(model, x, y, ratio, bits):
    pairs, _ = find_pairs(model)
    se_pairs = [p.name for p in pairs if p.se is not None]
    res = {"original": top1(model, x, y)}
    for method in ("none", "nm", "udfc"):
        small, _ = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, method=method)
        res[method] = top1(small, x, y)
    for kind in ("ignore", "frozen"):
        with gate_variant(kind):
            small, _ = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, method="udfc")
        res[f"udfc, gate {'left out' if kind == 'ignore' else 'frozen at its mean'}"] = top1(small, x, y)
    with oracle_statistics(model, x[:500]):
        res["udfc, oracle chain statistics (500 test images)"] = top1(
            udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits)[0], x, y)
    small, _ = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, method="udfc", skip=se_pairs)
    res["udfc, SE producers unpruned"] = top1(small, x, y)
    res["MACs kept (default / SE unpruned)"] = (
        udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits)[0].flops() / model.flops(),
        small.flops() / model.flops())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--n", type=int, default=None, help="first N test images only")
    ap.add_argument("--alone", type=float, default=None, metavar="RATIO",
                    help="also the one-pair-at-a-time table at this prune ratio (float weights)")
    a = ap.parse_args(argv)
    for name in a.models.split(","):
        model = udfc_ref.load(os.path.join(a.model_dir, f"{name}.safetensors"))
        x, y = load_npz(os.path.join(a.model_dir, "mnist_test.npz"))
        if a.n:
            x, y = x[:a.n], y[:a.n]
        print(f"### {name}\n")
        print("| SE gate (producer) | Cov(y) error, independent gate | constant gate |")
        print("|---|---:|---:|")
        for layer, ind, frozen in gate_independence(model, x[:300]):
            print(f"| {layer} | {ind:.3f} | {frozen:.3f} |")
        print("\n| chain / SE pair | data-model channel correlation, relative error (off-diagonal) |")
        print("|---|---:|")
        for layer, err in chain_correlation_error(model, x[:300]):
            print(f"| {layer} | {err:.2f} |")
        print(f"\nTop-1 % at prune {a.ratio:g}, {a.bits}-bit ({len(y)} test images):\n")
        res = end_to_end(model, x, y, a.ratio, a.bits)
        macs = res.pop("MACs kept (default / SE unpruned)")
        print("| variant | top-1 % |")
        print("|---|---:|")
        for k, v in res.items():
            print(f"| {k} | {100 * v:.1f} |")
        print(f"\nMACs kept: {100 * macs[0]:.1f} % (default), {100 * macs[1]:.1f} % (SE producers unpruned)\n")
        if a.alone is not None:
            print(f"One pair at a time, prune {a.alone:g}, float weights, top-1 %:\n")
            print("| pair | none | nm | udfc | udfc, oracle statistics |")
            print("|---|---:|---:|---:|---:|")
            for layer, r in alone(model, x, y, a.alone):
                o = f"{100 * r['oracle']:.1f}" if "oracle" in r else "-"
                print(f"| {layer} | {100 * r['none']:.1f} | {100 * r['nm']:.1f} | {100 * r['udfc']:.1f} | {o} |")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
