"""Speed and memory of udfc-ref on the ResNet-50 layout and its wider variants
(issues "Evidence" and "Fast and lean at any width").

Measures, each over ``--repeat`` runs (median, min and max reported):

(a)+(b) whole processes, alternated pair by pair (so both see the same
    machine load): ``udfc compress IN OUT --prune-ratio 0.3 --weight-bits 6``
    against the I/O floor, the same command with nothing to compress (load +
    save + start-up); wall and CPU seconds and the peak resident memory of
    each child (the operating system's accounting, ``os.wait4``);
(c) the stage split of compress (data model, select, quantize, solve,
    rewrite, validate), from the compression report;
(d) NumPy forward vs PyTorch CPU forward of the same model (batch 8, alternated run by run,
    3x224x224), at the same thread count, when PyTorch is installed.

``--threads`` sets the BLAS threads of NumPy (OPENBLAS_NUM_THREADS and
friends, for this process and the children) and PyTorch's intra-op threads.
``--width`` 64 is ResNet-50 (25.6 M parameters); 128 doubles every channel
count (98 M); 256 quadruples it (383 M).

Usage: python benchmarks/speed.py [--width 64] [--repeat 5] [--threads 1] [--json out.json]
                                  [--no-forward | --forward-only] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64, help="channels of the stem (64: ResNet-50)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--no-forward", action="store_true", help="skip (d)")
    ap.add_argument("--forward-only", action="store_true", help="only (d)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (for CI)")
    return ap.parse_args(argv)


def timed(fn, repeat):
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts), "runs": ts}, out


def forward(model, res, a, batch, hw):
    """(d): NumPy forward against PyTorch's CPU forward of the same model, the
    same input and thread count, alternated run by run (N T N T ...); the
    ratio is the median of the per-pair ratios, in wall and in process CPU
    seconds."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, hw, hw)).astype(np.float32)
    try:
        import torch

        from converters.torch import to_module
    except ImportError:
        res["numpy_forward"], _ = timed(lambda: model.forward(x), a.repeat)
        print(f"(d) NumPy forward (batch {batch}): median {res['numpy_forward']['median']:.3f} s; "
              "PyTorch not installed: comparison skipped")
        return
    torch.set_num_threads(a.threads)
    mod = to_module(model)
    xt = torch.from_numpy(x)
    y_np = model.forward(x)  # warm-up of both
    with torch.no_grad():
        y_t = mod(xt).numpy()
    runs = {"numpy": [], "torch": []}
    for _ in range(a.repeat):
        for k, fn in (("numpy", lambda: model.forward(x)), ("torch", lambda: mod(xt))):
            w, c = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn()
            runs[k].append((time.perf_counter() - w, time.process_time() - c))
    for k in runs:
        ws = [r[0] for r in runs[k]]
        res[f"{k}_forward"] = {"min": min(ws), "median": statistics.median(ws), "max": max(ws), "runs": runs[k]}
    pairs = list(zip(runs["numpy"], runs["torch"]))
    res["ratio_numpy_over_torch"] = statistics.median(n[0] / t[0] for n, t in pairs)
    res["ratio_numpy_over_torch_cpu"] = statistics.median(n[1] / t[1] for n, t in pairs)
    diff = float(np.abs(y_t - y_np).max() / np.abs(y_np).max())
    print(f"(d) forward, batch {batch}, {a.threads} thread(s), {a.repeat} alternated pairs: NumPy median "
          f"{res['numpy_forward']['median']:.3f} s, PyTorch {res['torch_forward']['median']:.3f} s; "
          f"NumPy/PyTorch wall {res['ratio_numpy_over_torch']:.2f}x, cpu {res['ratio_numpy_over_torch_cpu']:.2f}x "
          f"(target <= 1.5x); max rel diff {diff:.1e}")


def main(argv=None):
    a = parse(argv if argv is not None else sys.argv[1:])
    want = str(a.threads)
    if any(os.environ.get(v) != want for v in _THREAD_VARS) and "numpy" not in sys.modules:
        os.environ.update({v: want for v in _THREAD_VARS})  # before NumPy loads its BLAS
    import numpy as np

    import udfc_ref
    from resnet50 import build
    from scaling import measure

    if a.smoke:
        make = lambda: build(width=8, layers=(1, 1, 1, 1), classes=10, hw=32)  # noqa: E731
        a.repeat, batch, hw = 1, 2, 32
    else:
        make = lambda: build(width=a.width)  # noqa: E731
        batch, hw = 8, 224
    model = make()
    res = {"width": a.width, "params": model.param_count(), "float32_bytes": model.weight_bytes(),
           "repeat": a.repeat, "threads": a.threads}
    print(f"model: {res['params']:,} parameters, {res['float32_bytes'] / 2**20:.1f} MiB float32; "
          f"{a.threads} BLAS thread(s)")
    if not a.forward_only:
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update({v: want for v in _THREAD_VARS})
        del model  # the children's peaks read from this process's size (scaling.run_child): hold no model
        with tempfile.TemporaryDirectory(prefix="udfc-speed-") as tmp:
            r = measure(make(), tmp, a.repeat, env)
        model = make()
        res.update(r)
        c, f = r["compress"], r["floor"]
        for label, x in (("(a) I/O floor, whole process:  ", f), ("(b) compress, whole process:   ", c)):
            print(f"{label} wall {x['wall']:.2f} s  cpu {x['cpu']:.2f} s  peak {x['peak_mib']:.0f} MiB")
        print(f"    compress / floor (pairs):   wall {r['ratio_wall']:.2f}x  cpu {r['ratio_cpu']:.2f}x (target <= 3x); "
              f"peak / float32 model {r['peak_over_model']:.2f}x (target <= 2x)")
        total = sum(r["stages"].values()) or 1.0
        print("(c) stages of compress: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f} %)"
                                                      for k, v in r["stages"].items()))
    if not a.no_forward:
        forward(model, res, a, batch, hw)
    if a.json:
        from udfc_ref.atomic import write_bytes_atomic

        write_bytes_atomic(a.json, json.dumps(res, indent=2).encode())
    return res


if __name__ == "__main__":
    main()
