"""Data-free statistics against the data-driven oracle (issue 12).

For every benchmark model, prune ratio and bit width, top-1 on the test split
of:

* ``original``;
* data-free variants of ``udfc_ref.compress`` (``--variants``); at 50 % + 6 bits
  (``AUDIT``) run with ``calibration_mode="audit"``: the
  compression is data-free (the images do not change the model), and the
  report gives, per pair, the data model's predicted error (Eq. E2) next to
  the error measured on the first ``N_AUDIT`` (500) images in the compressed
  network actually built;
* the oracle: ``calibration=x`` with ``calibration_mode="independent"`` and
  ``"oracle"`` (the statistics the solver reads measured on the images,
  same kept channels, quantizer, solver and alphas as data-free ``l1``), and
  the sequential oracle with the covariance selection (Eq. S4);
* the calibrated product: ``calibration_mode="sequential"`` (Eq. C6-C7:
  all rows of T by least squares, each consumer refitted), ``l1`` and ``cov``.

Calibration images: the first ``--n-calib`` (2,000) images of the training
split of ``benchmarks/train.py`` (``load_data``: the same 80/20 stratified
split, seed 0, as the test sets, so they are disjoint from them; the digits
training split has 1,437 images, all are used).

Writes ``<out>/oracle.json`` (one row per model, setting and variant, with
the per-layer errors; resumable: rows already there are not recomputed) and
``<out>/oracle.md`` (the tables of ``docs/results.md``).

Usage::

    python benchmarks/oracle.py                         # all models, 30/50/70 %, 6-bit and float
    python benchmarks/oracle.py --models vgg_mnist --ratios 0.5 --bits 6
    python benchmarks/oracle.py --tables                # tables from oracle.json only
    python benchmarks/oracle.py --smoke --out /tmp/x    # one model, one cell, 300 images
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
from udfc_ref.evaluate import load_npz, top1  # noqa: E402

from rows import Rows  # noqa: E402
from train import MODELS  # noqa: E402  (the benchmark models, one list)
#: variant name -> compress options; "before" is the method before issue 12 (l1 selection, Eq. D4-D5)
VARIANTS = {
    "before": dict(criterion="l1"),
    "cov": dict(criterion="cov"),
    "oracle-ind": dict(criterion="l1", calibration_mode="independent"),
    "oracle-seq": dict(criterion="l1", calibration_mode="oracle"),
    "oracle-seq+cov": dict(criterion="cov", calibration_mode="oracle"),
    "calib-seq": dict(criterion="l1", calibration_mode="sequential"),
    "calib-seq+cov": dict(criterion="cov", calibration_mode="sequential"),
}
DEFAULT_VARIANTS = ("before", "cov", "oracle-ind", "oracle-seq", "oracle-seq+cov", "calib-seq", "calib-seq+cov")


def measured(variant: str) -> bool:
    """True for the variants that read the calibration images' statistics."""
    return variant.startswith(("oracle", "calib"))


def data_of(name: str) -> str:
    return "digits" if name.endswith("digits") else "mnist"


def calibration_images(name: str, n: int) -> np.ndarray:
    """The first ``n`` training images of the model's data set (benchmarks/train.py split)."""
    sys.path.insert(0, HERE)
    from train import load_data

    return load_data(data_of(name))[0][:n]


#: the settings whose data-free runs also measure every pair on the images (calibration_mode="audit")
AUDIT = ((0.5, 6),)
#: calibration images the audit of a data-free run measures on (the first ones of the calibration set)
N_AUDIT = 500


def run_cell(model, x, y, xc, ratio, bits, variant) -> dict:
    kw = dict(VARIANTS[variant])
    if "calibration_mode" not in kw and (ratio, bits) in AUDIT:
        kw["calibration_mode"] = "audit"
        kw["calibration"] = xc[:N_AUDIT]
    elif "calibration_mode" in kw:
        kw["calibration"] = xc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, rep = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, **kw)
    acc = top1(small, x, y)
    layers = [{"layer": r.layer, "channels": f"{r.channels_before}->{r.channels_after}",
               "measured_before": r.measured_before, "measured_after": r.measured_after,
               "predicted_before": r.predicted_before, "predicted_after": r.predicted_after,
               "stats_error": r.stats_error} for r in rep.layers if r.error_after is not None]
    calib_s = rep.stage_seconds.get("calibration", 0.0)
    return {"top1": acc, "seconds": rep.seconds, "calibration_seconds": calib_s, "layers": layers,
            "macs": small.flops(), "bytes": small.weight_bytes()}


def key(r) -> tuple:
    return r["model"], r["prune_ratio"], r["weight_bits"], r["variant"]


def run(models, ratios, bits, variants, n_calib, out, n_test=None, log=print) -> list[dict]:
    store = Rows(os.path.join(out, "oracle.json"), key)
    for name in models:
        model = udfc_ref.load(os.path.join(HERE, "models", f"{name}.safetensors"))
        x, y = load_npz(os.path.join(HERE, "models", f"{data_of(name)}_test.npz"))
        if n_test:
            x, y = x[:n_test], y[:n_test]
        xc = calibration_images(name, n_calib)
        if (name, 0.0, None, "original") not in store:
            store.add({"model": name, "prune_ratio": 0.0, "weight_bits": None, "variant": "original",
                         "top1": top1(model, x, y), "n_test": int(len(y)), "n_calib": int(len(xc))})
        for r in ratios:
            for b in bits:
                for v in variants:
                    if (name, r, b, v) in store:
                        continue
                    t0 = time.perf_counter()
                    res = run_cell(model, x, y, xc, r, b, v)
                    store.add({"model": name, "prune_ratio": r, "weight_bits": b, "variant": v, **res,
                               "n_test": int(len(y)), "n_calib": int(len(xc))})
                    log(f"{name} {r:g} {b or 'float'} {v}: {100 * res['top1']:.1f} ({time.perf_counter() - t0:.1f} s)",
                        flush=True)
    return store.rows


def _get(ix, name, r, b, v):
    row = ix.get((name, r, b, v))
    return None if row is None else 100 * row["top1"]


def tables(rows, variants=None) -> str:
    ix = {key(r): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = variants or [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    settings = sorted({(r["prune_ratio"], r["weight_bits"] or 0) for r in rows if r["variant"] != "original"})
    out = []
    # 1. the done-when check at 50 % + 6 bits
    out.append("#### 50 % pruning + 6-bit: the issue's targets\n")
    out.append("Half the gap between `before` and the sequential oracle (`oracle-seq`, the issue's "
               "definition: same kept channels, quantizer, solver, alphas) is the data-free target; the "
               "calibrated sequential mode (`calib-seq`, `calib-seq+cov`) should be within 1.5 points of "
               "the original.\n")
    out.append("| model | original | before | target (half gap) | best data-free | | oracle-seq | "
               "oracle-seq+cov | calib-seq | orig - calib-seq | calib-seq+cov | orig - calib-seq+cov |")
    out.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in models:
        o = _get(ix, name, 0.0, None, "original")
        b = _get(ix, name, 0.5, 6, "before")
        s = _get(ix, name, 0.5, 6, "oracle-seq")
        sc = _get(ix, name, 0.5, 6, "oracle-seq+cov")
        k = _get(ix, name, 0.5, 6, "calib-seq")
        kc = _get(ix, name, 0.5, 6, "calib-seq+cov")
        if None in (o, b, s):
            continue
        target = (b + s) / 2
        free = {v: _get(ix, name, 0.5, 6, v) for v in variants if not measured(v) and v != "before"}
        free = {v: a for v, a in free.items() if a is not None}
        best = max(free, key=free.get) if free else None
        ok = best is not None and free[best] >= target
        best_txt = "-" if best is None else f"{free[best]:.1f} ({best})"
        def cell(v):
            return "-" if v is None else f"{v:.1f}"

        out.append(f"| {name} | {o:.1f} | {b:.1f} | {target:.1f} | {best_txt} | "
                   f"{'reached' if ok else 'not reached'} | {s:.1f} | {cell(sc)} | {cell(k)} | "
                   f"{cell(None if k is None else o - k)} | {cell(kc)} | {cell(None if kc is None else o - kc)} |")
    out.append("")
    # 2. per model: top-1 of every variant
    for name in models:
        o = _get(ix, name, 0.0, None, "original")
        out.append(f"#### {name} (original {o:.1f} %)\n")
        out.append("| prune | bits | " + " | ".join(variants) + " |")
        out.append("|---:|---:|" + "---:|" * len(variants))
        for r, b in settings:
            bb = b or None
            vals = [_get(ix, name, r, bb, v) for v in variants]
            if all(v is None for v in vals):
                continue
            free = [v for v, name_v in zip(vals, variants) if v is not None and not measured(name_v)]
            best = max(free) if free else None
            cells = []
            for v, name_v in zip(vals, variants):
                if v is None:
                    cells.append("-")
                elif v == best and not measured(name_v):
                    cells.append(f"**{v:.1f}**")
                else:
                    cells.append(f"{v:.1f}")
            out.append(f"| {r:g} | {b or 'float'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def layer_tables(rows, ratio=0.5, bits=6, variants=("before", "cov", "oracle-ind", "oracle-seq")) -> str:
    """Per pair: the data model's predicted error (Eq. E2) of the T, t used and
    the error measured on the calibration images, for each variant."""
    ix = {key(r): r for r in rows}
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        vs = [v for v in variants if (name, ratio, bits, v) in ix]
        if not vs:
            continue
        out.append(f"**{name}**, prune {ratio:g}, {bits or 'float'}{'-bit' if bits else ''}: "
                   "E2 after compensation, predicted (data model) / measured (images)\n")
        out.append("| pair | " + " | ".join(vs) + " |")
        out.append("|---|" + "---:|" * len(vs))
        layers = ix[(name, ratio, bits, vs[0])]["layers"]
        for i, lay in enumerate(layers):
            cells = []
            for v in vs:
                ls = ix[(name, ratio, bits, v)]["layers"]
                if i >= len(ls):
                    cells.append("-")
                    continue
                p, m = ls[i]["predicted_after"], ls[i]["measured_after"]
                cells.append(f"{p:.3f} / {m:.3f}")
            out.append(f"| {lay['layer']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--bits", default="6,float")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--n-calib", type=int, default=2000, help="calibration images (default 2000)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tables", action="store_true", help="render oracle.md from oracle.json only")
    ap.add_argument("--smoke", action="store_true", help="one model, 50 %% + 6 bits, 300 calibration images")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    ratios = [float(r) for r in a.ratios.split(",")]
    bits = [None if b == "float" else int(b) for b in a.bits.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    n_test = None
    if a.smoke:
        models, ratios, bits, a.n_calib, n_test = models[:1], [0.5], [6], 300, 200
        variants = ["before", "oracle-seq"]
    if not a.tables:
        run(models, ratios, bits, variants, a.n_calib, a.out, n_test)
    with open(os.path.join(a.out, "oracle.json")) as f:
        rows = json.load(f)
    md = tables(rows) + "\n" + layer_tables(rows)
    write_bytes_atomic(os.path.join(a.out, "oracle.md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
