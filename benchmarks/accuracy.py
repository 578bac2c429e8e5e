"""Accuracy grid: top-1 of every benchmark model after ``udfc_ref.compress``.

A thin caller of ``udfc_ref.sweep`` (``docs/sweep.md``), one sweep per model;
its resumable per-model result files are kept in ``<out>/sweep/``, so an
interrupted run recomputes only the missing cells.  ``--workers`` /
``--scheduler`` run the cells on Dask (default: sequential).

Grid: prune ratio {0, 0.1, 0.3, 0.5, 0.7} x weight bits {float, 8, 6, 4} x
method {none, nm, udfc} x bias correction {off, on}. For each cell: top-1 on
the model's test split, parameters, weight bytes, MACs (``param_count``,
``weight_bytes``, ``flops`` of the compressed model), compress time and the
mean over pairs of the report's data-model error (Eq. E2).

Writes ``<out>/accuracy.csv`` and ``<out>/accuracy.json``; ``--tables``
renders the markdown tables (``<out>/accuracy_tables.md``), the goal check
and the plots (``--img``, accuracy vs MACs and vs bytes) from an existing
``accuracy.json`` without recomputing.

Usage::

    python benchmarks/accuracy.py                      # all models, full grid
    python benchmarks/accuracy.py --models vgg_mnist
    python benchmarks/accuracy.py --tables             # tables + plots only
    python benchmarks/accuracy.py --smoke --out /tmp/x # one model, 2 cells, 200 samples
    python benchmarks/accuracy.py --workers 2          # on a local Dask cluster of 2 processes
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from udfc_ref.atomic import write_bytes_atomic  # noqa: E402
from udfc_ref.sweep import dask_client, sweep  # noqa: E402

from train import MODELS  # noqa: E402  (the benchmark models, one list)
RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7)
BITS = (None, 8, 6, 4)
METHODS = ("none", "nm", "udfc")
BIAS_CORRECTION = (False, True)
FIELDS = ("model", "prune_ratio", "weight_bits", "method", "bias_correction", "top1", "top1_original", "params",
          "bytes", "macs", "compress_seconds", "mean_err_before", "mean_err_after", "n_test")

#: the key order of the rows in accuracy.json (as written before this script called sweep)
JSON_ORDER = ("model", "prune_ratio", "weight_bits", "method", "bias_correction", "top1_original", "n_test", "top1",
              "params", "bytes", "macs", "compress_seconds", "mean_err_before", "mean_err_after")


def data_of(model_name: str) -> str:
    return "digits" if model_name.endswith("digits") else "mnist"


def grid(smoke: bool) -> dict:
    """The grid as ``udfc_ref.sweep`` option lists."""
    if smoke:
        return dict(prune_ratios=[0.3], weight_bits=[6], methods=["udfc", "none"], bias_correction=[False])
    return dict(prune_ratios=list(RATIOS), weight_bits=list(BITS), methods=list(METHODS),
                bias_correction=list(BIAS_CORRECTION))


def run(models, model_dir, n, smoke, log=print, work_dir=None, workers=0, scheduler=None) -> list[dict]:
    """``udfc_ref.sweep`` per model; its resumable result files go to
    ``work_dir`` (``<name>.csv``), so an interrupted run continues where it
    stopped.  Returns the rows in this script's format (:data:`FIELDS`)."""
    rows = []
    for name in models:
        path = os.path.join(model_dir, f"{name}.safetensors")
        data = os.path.join(model_dir, f"{data_of(name)}_test.npz")
        kw = dict(max_samples=n, workers=workers, scheduler=scheduler, progress=True,
                  out=None if work_dir is None else os.path.join(work_dir, f"{name}.csv"))
        if work_dir is not None:
            os.makedirs(work_dir, exist_ok=True)
        # the original model: prune ratio 0, float weights (compress returns it unchanged); a cell of the full grid
        base_row = sweep(path, data, prune_ratios=0.0, weight_bits=None, methods="none", **kw)[0]
        cells = grid(smoke)
        log(f"{name}: original top-1 {base_row['top1']:.4f} on {base_row['n_test']} samples, "
            f"{math.prod(len(v) for v in cells.values())} cells", flush=True)
        t0 = time.perf_counter()
        srows = sweep(path, data, **cells, **kw)
        failed = [r for r in srows if r["error"]]
        if failed:
            raise SystemExit(f"{name}: {len(failed)} cells failed, first: {failed[0]['error']}"
                             + (f" (finished cells are kept in {kw['out']}; rerun to retry)" if kw["out"] else ""))
        log(f"{name}: {len(srows)} cells in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += [{k: name if k == "model" else base_row["top1"] if k == "top1_original" else r[k]
                  for k in JSON_ORDER} for r in srows]
    return rows


def write_rows(rows, out):
    os.makedirs(out, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("float" if (k == "weight_bits" and r[k] is None) else r[k]) for k in FIELDS})
    write_bytes_atomic(os.path.join(out, "accuracy.csv"), buf.getvalue().encode())
    write_bytes_atomic(os.path.join(out, "accuracy.json"), (json.dumps(rows, indent=1) + "\n").encode())


# ----------------------------------------------------------------- tables / plots

def _idx(rows):
    return {(r["model"], r["prune_ratio"], r["weight_bits"], r["method"], r["bias_correction"]): r for r in rows}


def tables(rows) -> str:
    """Markdown: one table per model, rows ratio x bits, columns method x bias correction."""
    ix = _idx(rows)
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == name]
        out.append(f"### {name}\n")
        out.append(f"Original top-1 {100 * mr[0]['top1_original']:.1f} % on {mr[0]['n_test']} test samples; "
                   f"top-1 in %, best of each row (per bias-correction setting) in bold; params / bytes / MACs of "
                   f"the udfc model.\n")
        out.append("| prune | bits | none | nm | udfc | none+bc | nm+bc | udfc+bc | params | bytes | MACs |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in RATIOS:
            for b in BITS:
                cells = []
                for bc in BIAS_CORRECTION:
                    vals = [ix.get((name, r, b, m, bc)) for m in METHODS]
                    if any(v is None for v in vals):
                        cells += ["-"] * 3
                        continue
                    best = max(v["top1"] for v in vals)
                    cells += [(f"**{100 * v['top1']:.1f}**" if v["top1"] == best else f"{100 * v['top1']:.1f}")
                              for v in vals]
                u = ix.get((name, r, b, "udfc", False))
                if u is None:
                    continue
                out.append(f"| {r:g} | {b or 'float'} | " + " | ".join(cells)
                           + f" | {u['params']:,} | {u['bytes']:,} | {u['macs']:,} |")
        out.append("")
    return "\n".join(out)


def goal_check(rows) -> tuple[list[dict], int]:
    """Cells where udfc does not strictly beat both nm and none (same bias
    correction), over every cell with prune ratio > 0 or 6 / 4 bits.
    Returns (failures, number of cells checked)."""
    ix = _idx(rows)
    fails, n = [], 0
    for (name, r, b, m, bc), u in ix.items():
        if m != "udfc" or not (r > 0 or b in (6, 4)):
            continue
        nm, no = ix.get((name, r, b, "nm", bc)), ix.get((name, r, b, "none", bc))
        if nm is None or no is None:
            continue
        n += 1
        if not (u["top1"] > nm["top1"] and u["top1"] > no["top1"]):
            fails.append({"model": name, "prune_ratio": r, "weight_bits": b, "bias_correction": bc,
                          "udfc": u["top1"], "nm": nm["top1"], "none": no["top1"]})
    return fails, n


def goal_markdown(rows) -> str:
    fails, n = goal_check(rows)
    lines = [f"udfc strictly beats both nm and none in {n - len(fails)} of {n} cells "
             f"(prune ratio > 0 or 6/4 bits, each bias-correction setting); the {len(fails)} others:\n"]
    if fails:
        lines.append("| model | prune | bits | bc | none | nm | udfc |")
        lines.append("|---|---:|---:|---|---:|---:|---:|")
        for f in sorted(fails, key=lambda f: (f["model"], f["prune_ratio"], str(f["weight_bits"]), f["bias_correction"])):
            lines.append(f"| {f['model']} | {f['prune_ratio']:g} | {f['weight_bits'] or 'float'} | "
                         f"{'on' if f['bias_correction'] else 'off'} | {100 * f['none']:.1f} | {100 * f['nm']:.1f} | "
                         f"{100 * f['udfc']:.1f} |")
    return "\n".join(lines) + "\n"


def plots(rows, img_dir) -> list[str]:
    """One PNG per model: top-1 vs MACs (left) and vs weight bytes (right),
    one line per method at float and at 6 bits (bias correction off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    ix = _idx(rows)
    paths = []
    colors = {"none": "tab:gray", "nm": "tab:blue", "udfc": "tab:red"}
    for name in dict.fromkeys(r["model"] for r in rows):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, xlabel in ((axes[0], "macs", "MACs per sample"), (axes[1], "bytes", "weight bytes")):
            for m in METHODS:
                for b, style in ((None, "-"), (6, "--")):
                    pts = [ix.get((name, r, b, m, False)) for r in RATIOS]
                    pts = [p for p in pts if p is not None]
                    if not pts:
                        continue
                    ax.plot([p[key] for p in pts], [100 * p["top1"] for p in pts], style, marker="o", ms=3,
                            color=colors[m], label=f"{m}, {'float' if b is None else f'{b}-bit'}")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel + " (log)")
            ax.set_ylabel("top-1 %")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{name}: top-1 vs compression (prune ratio 0 / 0.1 / 0.3 / 0.5 / 0.7)")
        fig.tight_layout()
        p = os.path.join(img_dir, f"accuracy_{name}.png")
        fig.savefig(p + ".tmp.png", dpi=90)
        os.replace(p + ".tmp.png", p)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma separated (default: all of {', '.join(MODELS)} present)")
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--n", type=int, default=None, help="evaluate on the first N test samples only")
    ap.add_argument("--smoke", action="store_true", help="one model, 2 cells, 200 samples")
    ap.add_argument("--tables", action="store_true", help="render tables/plots from <out>/accuracy.json only")
    ap.add_argument("--append", action="store_true", help="merge with rows of other models already in accuracy.json")
    ap.add_argument("--workers", type=int, default=None,
                    help="Dask: a local cluster of N worker processes (default and 0: sequential, no Dask)")
    ap.add_argument("--scheduler", default=None, help="Dask: the address of an existing cluster")
    a = ap.parse_args(argv)
    if a.tables:
        with open(os.path.join(a.out, "accuracy.json")) as f:
            rows = json.load(f)
        md = tables(rows) + "\n" + goal_markdown(rows)
        write_bytes_atomic(os.path.join(a.out, "accuracy_tables.md"), md.encode())
        for p in plots(rows, a.img):
            print("wrote", p)
        print(md)
        return 0
    if a.models:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
    else:
        models = [m for m in MODELS if os.path.exists(os.path.join(a.model_dir, f"{m}.safetensors"))]
    if a.smoke:
        models, a.n = models[:1], a.n or 200
    work_dir = os.path.join(a.out, "sweep")
    if a.workers or a.scheduler:
        with dask_client(a.scheduler, a.workers) as client:  # one cluster for every model's sweeps
            rows = run(models, a.model_dir, a.n, a.smoke, work_dir=work_dir, scheduler=client, workers=None)
    else:
        rows = run(models, a.model_dir, a.n, a.smoke, work_dir=work_dir)
    if a.append and os.path.exists(os.path.join(a.out, "accuracy.json")):
        with open(os.path.join(a.out, "accuracy.json")) as f:
            old = [r for r in json.load(f) if r["model"] not in models]
        rows = old + rows
    write_rows(rows, a.out)
    fails, n = goal_check(rows)
    print(f"wrote {os.path.join(a.out, 'accuracy.csv')}: {len(rows)} rows; udfc beats nm and none in "
          f"{n - len(fails)}/{n} checked cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
