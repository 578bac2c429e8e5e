"""Accuracy against MACs and bytes: uniform prune ratios against budgets.

For every benchmark model at 6-bit weights (``method=udfc``):

* ``uniform``: ``prune_ratio`` r for r in ``--ratios``;
* ``budget_macs``: ``target_macs`` set to the MAC fraction the uniform
  ratio reached (equal MACs);
* ``budget_bytes``: ``target_bytes`` set to the byte fraction it reached;
* ``budget_macs_coupled``: as ``budget_macs`` with ``prune_coupled=True``;
* ``budget_bytes_auto``: as ``budget_bytes`` with ``weight_bits="auto"``
  from {8, 6, 4} (bits chosen per layer).

Each row: top-1 on the model's test split, MACs / parameters / bytes as
fractions of the original, compress seconds.  Rows are appended to
``<out>/budget_accuracy.json`` as they finish (a rerun computes only the
missing ones); ``--tables`` writes ``<out>/budget_accuracy.md`` and one plot
per model (``--img``, default ``docs/img/budget_<model>.png``: top-1 vs MACs
and vs bytes).

Usage::

    python benchmarks/budget_accuracy.py                   # all models
    python benchmarks/budget_accuracy.py --models vgg_mnist --ratios 0.3,0.5
    python benchmarks/budget_accuracy.py --tables          # tables + plots from the JSON
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

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
from train import models_in  # noqa: E402
VARIANTS = ("uniform", "budget_macs", "budget_bytes", "budget_macs_coupled", "budget_bytes_auto")
BITS = 6


def _fractions(rep) -> dict:
    return {"macs": rep.flops_after / rep.flops_before, "params": rep.params_after / rep.params_before,
            "bytes": rep.bytes_after / rep.bytes_before}


def run_model(name, model, x, y, ratios, done: dict, save_row, log=print) -> None:
    for r in ratios:
        key = (name, r, "uniform")
        if key not in done:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, rep = udfc_ref.compress(model, prune_ratio=r, weight_bits=BITS)
            row = {"model": name, "ratio": r, "variant": "uniform", "seconds": time.perf_counter() - t0,
                   **_fractions(rep), "top1": top1(small, x, y)}
            save_row(row)
        uni = done[key]
        for variant, kw in (("budget_macs", {"target_macs": uni["macs"]}),
                            ("budget_bytes", {"target_bytes": uni["bytes"]}),
                            ("budget_macs_coupled", {"target_macs": uni["macs"], "prune_coupled": True}),
                            ("budget_bytes_auto", {"target_bytes": uni["bytes"], "weight_bits": "auto",
                                                   "bit_choices": [8, 6, 4]})):
            if (name, r, variant) in done:
                continue
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, rep = udfc_ref.compress(model, **{"weight_bits": BITS, **kw})
            row = {"model": name, "ratio": r, "variant": variant, "seconds": time.perf_counter() - t0,
                   **_fractions(rep), "top1": top1(small, x, y),
                   "ratios": {k: v for k, v in small.record["budget"]["ratios"].items()}}
            if small.record["budget"]["bits"]:
                row["bits"] = dict(small.record["budget"]["bits"])
            save_row(row)
        log(f"  {name} r={r}: " + "  ".join(f"{v} {done[(name, r, v)]['top1']:.4f}" for v in VARIANTS), flush=True)


def _se(model, p1, p2) -> float:
    """Standard error of the difference of two top-1 values on the model's
    test split (1,000 MNIST / 360 digits images, binomial)."""
    n = 360 if model.endswith("digits") else 1000
    return math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)


def tables(rows) -> str:
    """The markdown table and the done-when summary."""
    by = {(r["model"], r["ratio"], r["variant"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = ["| model | ratio | MACs % | uniform | budget (MACs) | Δ | bytes % | budget (bytes) | Δ "
           "| budget + coupled (MACs) | Δ |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for m in models:
        ratios = sorted({r for (mm, r, _) in by if mm == m})
        wins = []
        for r in ratios:
            u = by.get((m, r, "uniform"))
            if u is None:
                continue
            cells = []
            for v in ("budget_macs", "budget_bytes", "budget_macs_coupled"):
                b = by.get((m, r, v))
                cells.append(("-", "-") if b is None else (f"{100 * b['top1']:.1f}",
                                                          f"{100 * (b['top1'] - u['top1']):+.1f}"))
            bm = by.get((m, r, "budget_macs"))
            if bm is not None:
                wins.append((u["macs"], bm["top1"] - u["top1"], _se(m, bm["top1"], u["top1"])))
            out.append(f"| {m} | {r:g} | {100 * u['macs']:.1f} | {100 * u['top1']:.1f} | {cells[0][0]} | "
                       f"{cells[0][1]} | {100 * u['bytes']:.1f} | {cells[1][0]} | {cells[1][1]} | {cells[2][0]} | "
                       f"{cells[2][1]} |")
        summary.append((m, wins))
    out.append("")
    out.append("| model | points | budget >= uniform at equal MACs | losses beyond 2 SE | mean Δ top-1 (points) | "
               "mean Δ at <= 50 % MACs |")
    out.append("|---|---:|---:|---:|---:|---:|")
    allw, all50, allbig = [], [], 0
    mean = lambda v: f"{100 * sum(v) / len(v):+.1f}" if v else "-"  # noqa: E731
    for m, wins in summary:
        d = [w for _, w, _ in wins]
        d50 = [w for f, w, _ in wins if f <= 0.5]
        big = sum(1 for _, w, se in wins if w < -2 * se)
        allw += d
        all50 += d50
        allbig += big
        out.append(f"| {m} | {len(d)} | {sum(1 for w in d if w >= 0)} / {len(d)} | {big} | {mean(d)} | {mean(d50)} |")
    out.append(f"| all | {len(allw)} | {sum(1 for w in allw if w >= 0)} / {len(allw)} | {allbig} | {mean(allw)} | "
               f"{mean(all50)} |")
    out.append("")
    out.append("| model | bytes % (uniform at 0.3 / 0.5) | budget, 6 bits | budget, bits from {8, 6, 4} | "
               "bits chosen (8 / 6 / 4 layers) |")
    out.append("|---|---:|---:|---:|---:|")
    for m in models:
        for r in (0.3, 0.5):
            b6, ba = by.get((m, r, "budget_bytes")), by.get((m, r, "budget_bytes_auto"))
            if b6 is None or ba is None:
                continue
            bits = list(ba.get("bits", {}).values())
            out.append(f"| {m} (r={r:g}) | {100 * by[(m, r, 'uniform')]['bytes']:.1f} | {100 * b6['top1']:.1f} | "
                       f"{100 * ba['top1']:.1f} | {bits.count(8)} / {bits.count(6)} / {bits.count(4)} |")
    return "\n".join(out) + "\n"


def plot(rows, model, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    style = {"uniform": ("k", "o", "uniform ratio"), "budget_macs": ("tab:blue", "s", "budget (target_macs)"),
             "budget_bytes": ("tab:green", "^", "budget (target_bytes)"),
             "budget_macs_coupled": ("tab:red", "D", "budget + prune_coupled (target_macs)")}
    for ax, axis in zip(axes, ("macs", "bytes")):
        for v, (c, mk, label) in style.items():
            rs = sorted((r for r in rows if r["model"] == model and r["variant"] == v), key=lambda r: r[axis])
            if v == "budget_macs_coupled" and axis == "bytes":
                continue
            if rs:
                ax.plot([100 * r[axis] for r in rs], [100 * r["top1"] for r in rs], color=c, marker=mk, label=label)
        ax.set_xlabel(f"{'MACs' if axis == 'macs' else 'weight bytes'} (% of the original)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: 6-bit weights, udfc — uniform ratios vs budgets")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated (default: every model in --model-dir)")
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--n", type=int, default=None, help="evaluate on the first N test samples (default all)")
    ap.add_argument("--tables", action="store_true", help="only the tables and plots from the JSON")
    a = ap.parse_args(argv)
    store = Rows(os.path.join(a.out, "budget_accuracy.json"), lambda r: (r["model"], r["ratio"], r["variant"]))
    rows = store.rows
    if not a.tables:
        ratios = [float(r) for r in a.ratios.split(",")]
        for name in models_in(a.model_dir, a.models):
            model = udfc_ref.load(os.path.join(a.model_dir, f"{name}.safetensors"))
            x, y = load_npz(os.path.join(a.model_dir, f"{'digits' if name.endswith('digits') else 'mnist'}_test.npz"))
            if a.n:
                x, y = x[:a.n], y[:a.n]
            print(f"{name}: {len(ratios)} ratios, {len(y)} test samples", flush=True)
            run_model(name, model, x, y, ratios, store, store.add)
    os.makedirs(a.out, exist_ok=True)
    md = tables(rows)
    write_bytes_atomic(os.path.join(a.out, "budget_accuracy.md"), md.encode())
    for m in dict.fromkeys(r["model"] for r in rows):
        plot(rows, m, os.path.join(a.img, f"budget_{m}.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
