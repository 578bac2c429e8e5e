"""The float32 fast path of ``compress`` against its float64 reference path
(``exact=True``) on every benchmark model (issue 14, derivation "Precision").

For each model and cell (prune ratio, weight bits; method udfc, bias
correction off) the model is compressed twice, the solver's ``T``, ``t`` of
every pair recorded (``audit.capture``), and reported:

* the largest relative difference over the pairs, ``||T_fast - T_exact||_F /
  ||T_exact||_F`` and the same for ``t``;
* the largest absolute difference of the reported errors (E2, before / after);
* top-1 of both compressed models on the model's full test split.

``--code DIR`` imports ``udfc_ref`` from another code tree (e.g. an export of
``main``): only its default path is run and its top-1 recorded, to compare a
branch's top-1 with it.  ``--resnet50`` adds the ResNet-50 layout of
``benchmarks/resnet50.py`` (random weights: coefficients only, no top-1).

Usage::

    python benchmarks/fastpath.py [--models vgg_mnist,...] [--cells 0.3:6,0.5:float]
                                  [--resnet50] [--code DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cells(s: str):
    out = []
    for c in s.split(","):
        r, b = c.split(":")
        out.append((float(r), None if b == "float" else int(b)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated (default: every benchmark model)")
    ap.add_argument("--cells", type=_cells, default=_cells("0.3:6,0.5:float"),
                    help="prune_ratio:bits pairs (bits 'float' for none), default 0.3:6,0.5:float")
    ap.add_argument("--resnet50", action="store_true", help="add the ResNet-50 layout (coefficients only)")
    ap.add_argument("--code", help="import udfc_ref from this code tree instead (its default path only)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    for p in (ROOT, HERE):
        if p not in sys.path:
            sys.path.insert(0, p)
    if a.code:
        sys.path.insert(0, os.path.abspath(a.code))
    import inspect

    import numpy as np

    import udfc_ref
    from accuracy import MODELS, data_of
    from udfc_ref.evaluate import load_npz, top1

    has_exact = "exact" in inspect.signature(udfc_ref.compress).parameters
    if has_exact:
        from audit import capture  # the solver's T, t per pair (this tree's compression module)
    print(f"udfc_ref from {os.path.dirname(os.path.dirname(udfc_ref.__file__))}"
          f"{'' if has_exact else ' (no exact path: default only)'}\n")
    models = a.models.split(",") if a.models else list(MODELS)
    if a.resnet50:
        models.append("resnet50_layout")
    if has_exact:
        print("| model | prune | bits | pairs | rel. dT | rel. dt | abs. d err before | abs. d err after | "
              "top-1 fast | top-1 exact | fast s | exact s |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| model | prune | bits | top-1 |\n|---|---:|---|---:|")
    rows = []
    md = os.path.join(HERE, "models")
    for name in models:
        if name == "resnet50_layout":
            from resnet50 import build

            m, x, y = build(), None, None
        else:
            m = udfc_ref.load(os.path.join(md, f"{name}.safetensors"))
            x, y = load_npz(os.path.join(md, f"{data_of(name)}_test.npz"))
        for r, b in a.cells:
            kw = dict(prune_ratio=r, weight_bits=b, method="udfc")
            row = {"model": name, "prune_ratio": r, "weight_bits": b}
            if not has_exact:
                small, _ = udfc_ref.compress(m, **kw)
                row["top1"] = None if x is None else top1(small, x, y)
                shown = "-" if x is None else f"{100 * row['top1']:.2f}"
                print(f"| {name} | {r} | {b or 'float'} | {shown} |", flush=True)
                rows.append(row)
                continue
            res = {}
            for path in ("fast", "exact"):
                t0 = time.perf_counter()
                with capture() as log:
                    small, rep = udfc_ref.compress(m, exact=path == "exact", **kw)
                res[path] = (small, rep, [e for e in log if "T" in e], time.perf_counter() - t0)
            (sf, rf, lf, tf), (se, re_, le, te) = res["fast"], res["exact"]
            assert len(lf) == len(le)
            dT = max((np.linalg.norm(f["T"] - e["T"]) / max(np.linalg.norm(e["T"]), 1e-300)
                      for f, e in zip(lf, le)), default=0.0)
            dt = max((np.linalg.norm(f["t"] - e["t"]) / max(np.linalg.norm(e["t"]), 1e-300)
                      for f, e in zip(lf, le)), default=0.0)
            errs = [(lf_, le_) for lf_, le_ in zip(rf.layers, re_.layers) if le_.error_before is not None]
            d_before = max((abs(p.error_before - q.error_before) for p, q in errs), default=0.0)
            d_after = max((abs(p.error_after - q.error_after) for p, q in errs), default=0.0)
            row.update(pairs=len(le), rel_dT=float(dT), rel_dt=float(dt), d_err_before=float(d_before),
                       d_err_after=float(d_after), fast_seconds=tf, exact_seconds=te,
                       top1_fast=None if x is None else top1(sf, x, y),
                       top1_exact=None if x is None else top1(se, x, y))
            t1 = "- | -" if x is None else f"{100 * row['top1_fast']:.2f} | {100 * row['top1_exact']:.2f}"
            print(f"| {name} | {r} | {b or 'float'} | {row['pairs']} | {dT:.1e} | {dt:.1e} | {d_before:.1e} | "
                  f"{d_after:.1e} | {t1} | {tf:.2f} | {te:.2f} |", flush=True)
            rows.append(row)
    if a.json:
        from udfc_ref.atomic import write_bytes_atomic

        write_bytes_atomic(a.json, json.dumps(rows, indent=1).encode())
    return rows


if __name__ == "__main__":
    main()
