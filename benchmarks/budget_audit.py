"""How well the budget's data-free predictor (derivation section 12, Eq.
B3-B7) ranks layers, against real activations.

For every unit of every benchmark model (a pair, and with ``--coupled`` the
coupled channel groups too) and each prune ratio of ``--ratios``, only that
unit is pruned (float weights, every other layer passed as ``skip``) and
the original and the compressed model run on the same test images:

* ``pred_layer``: the predicted relative error of the unit's readers'
  outputs, ``sum_c eps_c`` (Eq. B3: residual second moments through the
  reader's filters over the reader's output variance, from weights and BN
  statistics only);
* ``real_layer``: the same quantity measured -- ``sum_c ||Z'_c - Z_c||^2 /
  sum ||Z_c - mean Z_c||^2`` over the test images and positions, ``Z_c`` the
  reader's output in the original network, ``Z'_c`` in the compressed one;
* ``pred_cost``: what the allocation minimises for that unit, ``sum_c
  gain_c (-log(1 - eps_c))`` (Eq. B6-B7);
* ``real_nsr``: the relative error of the network output (logits),
  ``||y' - y||^2 / ||y - mean y||^2``; ``top1``: the compressed model's top-1.

Spearman rank correlations (scipy) per model and over all rows: predicted
vs measured per-layer error, and predicted cost vs the output error.

Usage::

    python benchmarks/budget_audit.py                       # all models, ratios 0.3,0.5,0.7,0.9, pairs only
    python benchmarks/budget_audit.py --coupled --models resnet_mnist
    python benchmarks/budget_audit.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import udfc_ref  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402
from udfc_ref.budget import Unit, predict_errors  # noqa: E402
from udfc_ref.compression import _coupled_groups  # noqa: E402
from udfc_ref.evaluate import load_npz  # noqa: E402
from udfc_ref.groups import find_groups  # noqa: E402
from udfc_ref.pairs import find_pairs  # noqa: E402

from train import MODELS  # noqa: E402  (the benchmark models, one list)


def _nsr(a, b) -> float:
    """||b - a||^2 / ||a - mean a||^2 over samples (and positions, channel axis 1)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    axes = (0,) + tuple(range(2, a.ndim))
    den = float(((a - a.mean(axis=axes, keepdims=True)) ** 2).sum())
    return float(((b - a) ** 2).sum()) / den if den > 0 else 0.0


def audit_model(name, model, x, y, ratios, coupled, log=print) -> list[dict]:
    cg = find_groups(model)
    pairs, unpruned = find_pairs(model)
    groups = _coupled_groups(cg, pairs, [], dict(unpruned)) if coupled else []
    units = [Unit.of_pair(model, p, cg, "l1", 1) for p in pairs] + [Unit.of_group(model, g, "l1", 1) for g in groups]
    pair_names = {p.name for p in pairs}
    cands = {}
    for u in units:
        rs = [0.0] + [r for r in ratios]
        cands[u.name] = (np.array(rs), np.array([u.kept(r).size for r in rs]))
    layer_pred, _ = predict_errors(model, cg, units, cands, "udfc", 0.01, 0.008, raw=True)
    cost_pred, _ = predict_errors(model, cg, units, cands, "udfc", 0.01, 0.008)
    base = model.forward(x, return_values=True)
    layers = [n.name for n in model.nodes if n.op in ("conv2d", "linear")]
    rows = []
    for u in units:
        g = cg.groups[u.group]
        own = {u.name} if u.name in pair_names else {n.name for n in g.producers + g.depthwise}
        readers = [c for c, _, _ in g.consumers]
        for i, r in enumerate(ratios):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, rep = udfc_ref.compress(model, prune_ratio=r, skip=[n for n in layers if n not in own],
                                               prune_coupled=u.name not in pair_names)
            vals = small.forward(x, return_values=True)
            real = 0.0
            for c in readers:  # a reader that also writes the group's channels keeps only the kept rows
                ref = base[c.output]
                if vals[c.output].shape[1] != ref.shape[1]:
                    ref = ref[:, small.record["layers"][c.name]["kept"]]
                real += _nsr(ref, vals[c.output])
            out = small.output_name
            row = {"model": name, "unit": u.name, "kind": "pair" if u.name in pair_names else "group",
                   "channels": f"{u.size}->{u.kept(r).size}", "ratio": r,
                   "pred_layer": float(layer_pred[u.name][i + 1]), "real_layer": real,
                   "pred_cost": float(cost_pred[u.name][i + 1]), "real_nsr": _nsr(base[out], vals[out]),
                   "top1": float((vals[out].argmax(1) == y).mean()), "macs": rep.flops_after / rep.flops_before}
            rows.append(row)
            log(f"  {name} {u.name} r={r}: layer {row['pred_layer']:.3f} / {row['real_layer']:.3f}  cost "
                f"{row['pred_cost']:.3f}  output nsr {row['real_nsr']:.3f}  top-1 {row['top1']:.3f}", flush=True)
    return rows


def ridge_check(name, model, alpha1=0.01, log=print) -> float:
    """Eq. B3's one approximation against the compensation's own solve: the
    prefix energies (Schur complement of the ridged covariance, the ridge's
    shrinkage of T left out) against U1-U3 solved per candidate
    (``budget._exact_residuals``), over every (unit, reader, candidate) of
    the model.  Returns the largest relative difference."""
    from udfc_ref import budget as B
    from udfc_ref.datamodel import DataModel, dense_filters

    cg = find_groups(model)
    pairs, unpruned = find_pairs(model)
    groups = _coupled_groups(cg, pairs, [], dict(unpruned))
    units = [Unit.of_pair(model, p, cg, "l1", 1) for p in pairs] + [Unit.of_group(model, g, "l1", 1) for g in groups]
    dm = DataModel(model)
    worst = 0.0
    for u in units:
        for c, v, _ in cg.groups[u.group].consumers:
            vs, im = dm.value(v), dm.inputs.get(c.name)
            if vs is None or im is None or (c.op == "conv2d" and c.attrs["groups"] > 1):
                continue
            k = B._reader_gram(dense_filters(model, c), im)
            ratios, counts = u.candidates()
            fast = B._residual_energies(cg, u, v, vs, (ratios, counts), "udfc", alpha1, 0.008, c, k)
            kept = [cg.kept_index(v, {u.group: u.kept(r)}) for r in ratios]
            kept = [np.arange(vs.mean.shape[0]) if q is None else q for q in kept]
            slow = np.array([float(np.sum(e * k[np.ix_(i, i)])) for i, e in
                             B._exact_residuals(vs, kept, vs.mean.shape[0], "udfc", alpha1, 0.008, 1)])
            den = float(np.sum(vs.cov * k))
            worst = max(worst, float(np.max(np.abs(fast - slow))) / den if den > 0 else 0.0)
    log(f"  {name}: largest |prefix - solved| energy over the reader's output variance: {worst:.2e}")
    return worst


def spearman(rows) -> dict:
    from scipy.stats import spearmanr

    def rho(a, b):
        return float(spearmanr([r[a] for r in rows], [r[b] for r in rows])[0]) if len(rows) > 2 else float("nan")

    for r in rows:
        r["top1_drop"] = -r["top1"]
    return {"layer": rho("pred_layer", "real_layer"), "cost_vs_output": rho("pred_cost", "real_nsr"),
            "layer_vs_output": rho("pred_layer", "real_nsr"), "cost_vs_top1": rho("pred_cost", "top1_drop"),
            "layer_vs_top1": rho("pred_layer", "top1_drop"), "n": len(rows)}


def markdown(rows) -> str:
    out = ["| model | rows | ρ(predicted, measured layer error) | ρ(output error): predicted cost / layer error "
           "| ρ(top-1 loss): predicted cost / layer error |", "|---|---:|---:|---:|---:|"]
    for name in list(dict.fromkeys(r["model"] for r in rows)) + ["all"]:
        rs = rows if name == "all" else [r for r in rows if r["model"] == name]
        s = spearman(rs)
        out.append(f"| {name} | {s['n']} | {s['layer']:.2f} | {s['cost_vs_output']:.2f} / {s['layer_vs_output']:.2f} "
                   f"| {s['cost_vs_top1']:.2f} / {s['layer_vs_top1']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None)
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--coupled", action="store_true", help="also the coupled channel groups (prune_coupled)")
    ap.add_argument("--n", type=int, default=300, help="test samples (default 300)")
    ap.add_argument("--smoke", action="store_true", help="one model, one ratio, 30 samples")
    ap.add_argument("--tables", action="store_true", help="only print the tables of <out>/budget_audit*.json")
    ap.add_argument("--ridge-check", action="store_true",
                    help="only compare Eq. B3's prefix energies with per-candidate U1-U3 solves (every unit, "
                         "coupled groups included)")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",")] if a.models else \
        [m for m in MODELS if os.path.exists(os.path.join(a.model_dir, f"{m}.safetensors"))]
    ratios = [float(r) for r in a.ratios.split(",")]
    if a.smoke:
        models, ratios, a.n = models[:1], ratios[:1], 30
    stem = "budget_audit" + ("_coupled" if a.coupled else "")
    if a.ridge_check:
        for name in models:
            ridge_check(name, udfc_ref.load(os.path.join(a.model_dir, f"{name}.safetensors")))
        return 0
    if a.tables:
        with open(os.path.join(a.out, stem + ".json")) as f:
            print(markdown(json.load(f)))
        return 0
    rows = []
    for name in models:
        model = udfc_ref.load(os.path.join(a.model_dir, f"{name}.safetensors"))
        x, y = load_npz(os.path.join(a.model_dir, f"{'digits' if name.endswith('digits') else 'mnist'}_test.npz"))
        print(f"{name}: {len(ratios)} ratios", flush=True)
        rows += audit_model(name, model, x[:a.n], y[:a.n], ratios, a.coupled)
    os.makedirs(a.out, exist_ok=True)
    md = markdown(rows)
    for r in rows:
        r.pop("top1_drop", None)
    write_bytes_atomic(os.path.join(a.out, stem + ".json"), (json.dumps(rows, indent=1) + "\n").encode())
    write_bytes_atomic(os.path.join(a.out, stem + ".md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
