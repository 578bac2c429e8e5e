"""The arithmetic floor of ``udfc compress``: the matrix products the
data-free statistics cannot do without, counted and timed as plain BLAS
(issue 14, "why the ratio to the I/O floor grows with the width").

For ``--prune-ratio 0.3 --weight-bits 6`` on a model the script runs
``compress`` once (its report gives every layer's channels before / after)
and counts the multiply-adds of the products of derivation D4 and U1-U4:

* data model, per conv/linear layer whose output statistics are read
  (``n`` outputs, ``C`` inputs, ``K`` taps): the channel half ``F C_in``
  (``n K C^2``), the spatial half and the patch moments (``2 n K^2 C`` when
  ``K > 1``) and the symmetric Gram ``(R F C_in) F^T`` (``n^2 K C / 2``);
* per pruned pair (``M`` kept): ``Sigma_x W~^T`` (``M K C^2 + M K^2 C``), the
  symmetric ``G~`` (``M^2 K C / 2``), ``G_x = W Sigma_x W~^T`` (``n M K C``),
  the Cholesky factor (``M^3 / 6``) and its solve for the ``n - M`` pruned
  channels (``M^2 (n - M)``); the rewrite of each consumer (``O R n M``).

The floor is that count divided by the rate of one float32 GEMM of the
size of the widest layer, measured here in process CPU seconds (robust to a
loaded machine), with the BLAS threads of ``--threads``.  Everything else
compress does -- the Mehler series, the BN/activation updates, quantization,
packing, the checks -- is on top of it and scales with ``N^2`` per layer like
the I/O floor.

Usage: python benchmarks/gemm_floor.py [--width 64] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def count(model, report) -> dict:
    """Multiply-adds of the products of D4 and U1-U4 for one compress run."""
    after = {r.layer: (r.channels_before, r.channels_after) for r in report.layers}
    pruned = {name: nm for name, nm in after.items() if nm[1] < nm[0]}
    shapes = {}
    for n in model.nodes:
        if n.op in ("conv2d", "linear"):
            w = model.tensors[n.params["weight"]]
            k = int(w[0, 0].size) if w.ndim == 4 else 1
            shapes[n.name] = (int(w.shape[0]), int(w.shape[1]), k, n)
    dm = pair = rewrite = 0.0
    last = model.nodes[-1].name
    for name, (n, c, k, node) in shapes.items():
        if name == last or node.op == "linear":  # the classifier: no output statistics read
            continue
        dm += n * k * c * c + (2 * n * k * k * c if k > 1 else 0) + n * n * k * c / 2
        if name in pruned:
            m = pruned[name][1]
            pair += m * k * c * c + m * k * k * c + m * m * k * c / 2 + n * m * k * c + m**3 / 6 + m * m * (n - m)
    for name, (n, c, k, node) in shapes.items():  # consumers of pruned channels: O R n M
        src = model.producer(node.inputs[0])
        while src is not None and src.op not in ("conv2d", "linear") and src.inputs:
            src = model.producer(src.inputs[0])
        if src is not None and src.name in pruned:
            nb, m = pruned[src.name]
            rewrite += n * k * nb * m
    return {"data model": dm, "pairs": pair, "rewrite": rewrite}


def gemm_rate(dtype="float32", size=2048, repeat=3) -> float:
    """Multiply-adds per CPU second of one (size x size) @ (size x size) product."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
    b = a.T.copy()
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return size**3 / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if "numpy" not in sys.modules:
        os.environ.update({v: str(a.threads) for v in _THREAD_VARS})
    sys.path[:0] = [ROOT, HERE]
    import udfc_ref
    from resnet50 import build

    model = build(width=a.width)
    t = time.process_time()
    _, rep = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6, method="udfc")
    cpu = time.process_time() - t
    macs = count(model, rep)
    rate = gemm_rate()
    total = sum(macs.values())
    res = {"width": a.width, "params": model.param_count(), "threads": a.threads, "macs": macs,
           "gemm_macs_per_cpu_s": rate, "gemm_floor_cpu_s": total / rate, "compress_cpu_s": cpu,
           "stages": rep.stage_seconds if hasattr(rep, "stage_seconds") else None}
    print(f"width {a.width}: {res['params']:,} parameters; products of D4/U1-U4: "
          + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in macs.items())
          + f" multiply-adds; float32 GEMM {rate / 1e9:.1f} G multiply-adds per CPU second "
          f"({a.threads} thread(s)) -> GEMM floor {total / rate:.2f} CPU s; compress (in process) {cpu:.2f} CPU s")
    if a.json:
        from udfc_ref.atomic import write_bytes_atomic

        write_bytes_atomic(a.json, json.dumps(res, indent=2).encode())
    return res


if __name__ == "__main__":
    main()
