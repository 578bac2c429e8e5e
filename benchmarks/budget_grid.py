"""How Eq. B8's constants were chosen: the spread ``s`` and the margin
``tau`` of the robust allocation (derivation section 12) on a grid, scored
on top-1 at equal MACs against the uniform ratio, with a leave-one-model-out
check.

For every benchmark model at 6-bit weights and each uniform ratio r of
``--ratios``: the uniform model (``prune_ratio=r``), then for every ``s`` of
``--spreads`` the budget ``target_macs`` = the uniform model's MAC fraction
with ``budget.PREDICTOR_SPREAD = s`` and ``budget.MIN_GAIN = 0`` (the
greedy's choice whenever its robust gain is positive), recording top-1, the
robust gain and the anchor's predicted loss.  A margin ``tau`` then keeps
the uniform model wherever ``gain <= tau * anchor_loss`` -- what
``MIN_GAIN = tau`` does -- so every (s, tau) is scored without another run.

A rule is ranked by (fewest losses to uniform beyond two standard errors of
the difference, most points at least as accurate, largest mean gain at
<= 50 % MACs).  Leave-one-model-out: the best rule on 7 models, scored on
the 8th.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/budget_grid.py            # ~10 min on 2 shared cores
    python benchmarks/budget_grid.py --tables                          # only the tables from the JSON
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import udfc_ref  # noqa: E402
from udfc_ref import budget  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402
from udfc_ref.evaluate import load_npz, top1  # noqa: E402

from rows import Rows  # noqa: E402
from train import models_in  # noqa: E402

TAUS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
BITS = 6


def run(models, ratios, spreads, model_dir, done, save_row):
    seen = []
    real = budget.allocate

    def spy(*a, **k):  # the allocation's anchor loss and robust gain (not in the file record)
        alloc = real(*a, **k)
        seen.append(alloc)
        return alloc

    budget.allocate = spy
    keep = budget.PREDICTOR_SPREAD, budget.MIN_GAIN
    try:
        for name in models:
            model = udfc_ref.load(os.path.join(model_dir, f"{name}.safetensors"))
            x, y = load_npz(os.path.join(model_dir, f"{'digits' if name.endswith('digits') else 'mnist'}_test.npz"))
            for r in ratios:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    key = (name, r, "uniform")
                    if key not in done:
                        small, rep = udfc_ref.compress(model, prune_ratio=r, weight_bits=BITS)
                        save_row({"model": name, "ratio": r, "spread": "uniform", "n": len(y),
                                  "macs": rep.flops_after / rep.flops_before, "top1": top1(small, x, y)})
                    uni = done[key]
                    for s in spreads:
                        if (name, r, s) in done:
                            continue
                        budget.PREDICTOR_SPREAD, budget.MIN_GAIN = s, 0.0
                        small, rep = udfc_ref.compress(model, target_macs=uni["macs"], weight_bits=BITS)
                        a = seen[-1]
                        save_row({"model": name, "ratio": r, "spread": s, "n": len(y),
                                  "macs": rep.flops_after / rep.flops_before, "top1": top1(small, x, y),
                                  "robust_gain": a.robust_gain, "anchor_loss": a.anchor_loss,
                                  "ratios": dict(a.ratios)})
                print(f"  {name} r={r}: uniform {uni['top1']:.3f}  " + "  ".join(
                    f"s={s:g} {done[(name, r, s)]['top1']:.3f}" for s in spreads), flush=True)
    finally:
        budget.allocate = real
        budget.PREDICTOR_SPREAD, budget.MIN_GAIN = keep


def score(done, models, ratios, s, tau):
    """[(model, ratio, delta top-1, uniform MAC fraction, standard error of delta)] of rule (s, tau)."""
    out = []
    for m in models:
        for r in ratios:
            u, b = done[(m, r, "uniform")], done[(m, r, s)]
            t = b["top1"] if b["robust_gain"] > tau * b["anchor_loss"] else u["top1"]
            se = math.sqrt((t * (1 - t) + u["top1"] * (1 - u["top1"])) / u["n"])
            out.append((m, r, t - u["top1"], u["macs"], se))
    return out


def summary(res):
    d = [x[2] for x in res]
    d50 = [x[2] for x in res if x[3] <= 0.5]
    big = sum(1 for x in res if x[2] < -2 * x[4])
    return big, sum(1 for v in d if v >= 0), len(d), sum(d) / len(d), (sum(d50) / len(d50) if d50 else 0.0)


def rank(res):
    big, ok, _, _, m50 = summary(res)
    return (-big, ok, m50)


def tables(rows) -> str:
    done = {(r["model"], r["ratio"], r["spread"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows})
    spreads = sorted({r["spread"] for r in rows if r["spread"] != "uniform"})
    full = [s for s in spreads if all((m, r, s) in done for m in models for r in ratios)]
    out = ["| s | τ | ≥ uniform | losses > 2 SE | mean Δ (points) | mean Δ at ≤ 50 % MACs |",
           "|---:|---:|---:|---:|---:|---:|"]
    for s in full:
        for tau in TAUS:
            big, ok, n, mean, m50 = summary(score(done, models, ratios, s, tau))
            out.append(f"| {s:g} | {tau:g} | {ok} / {n} | {big} | {100 * mean:+.2f} | {100 * m50:+.2f} |")
    if len(models) < 2:
        return "\n".join(out) + "\n"
    out += ["", "| held-out model | rule chosen on the other models (s, τ) | held-out Δ per ratio (points) |",
            "|---|---|---|"]
    held = []
    for m in models:
        rest = [x for x in models if x != m]
        best = max(((s, t) for s in full for t in TAUS), key=lambda p: rank(score(done, rest, ratios, *p)))
        res = score(done, [m], ratios, *best)
        held += res
        out.append(f"| {m} | ({best[0]:g}, {best[1]:g}) | {' / '.join(f'{100 * x[2]:+.1f}' for x in res)} |")
    big, ok, n, mean, m50 = summary(held)
    out.append(f"| all (held out) | | {ok} / {n} ≥ uniform, {big} losses > 2 SE, mean {100 * mean:+.2f}, "
               f"at ≤ 50 % MACs {100 * m50:+.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated (default: every model in --model-dir)")
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--spreads", default="1,1.25,1.5,1.75,2")
    ap.add_argument("--tables", action="store_true", help="only the tables from the JSON")
    a = ap.parse_args(argv)
    store = Rows(os.path.join(a.out, "budget_grid.json"), lambda r: (r["model"], r["ratio"], r["spread"]))
    if not a.tables:
        run(models_in(a.model_dir, a.models), [float(r) for r in a.ratios.split(",")],
            [float(s) for s in a.spreads.split(",")], a.model_dir, store, store.add)
    os.makedirs(a.out, exist_ok=True)
    md = tables(store.rows)
    write_bytes_atomic(os.path.join(a.out, "budget_grid.md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
