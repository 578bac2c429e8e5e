"""How `udfc compress` scales with the width and the depth of a network
(issue "Fast and lean at any width").

Two families of plain CNNs with random weights and BN statistics (NumPy
only, the BN variances set from the conv output variances as in
``resnet50.py``):

* **width** -- ``conv3x3(3 -> C) - BN - ReLU - conv1x1(C -> C) - BN - ReLU -
  GAP - linear(C -> 10)`` on a 4 x 4 input, C = 64 ... 6,144 (the 1x1 layer
  is a C x C matrix, the MLP of a transformer / ConvNeXt block);
* **depth** -- ``conv3x3(3 -> 64)`` then ``L - 1`` blocks ``conv3x3(64 -> 64)
  - BN - ReLU`` on an 8 x 8 input, then GAP and a linear classifier,
  L = 10 ... 1,000.

Every point runs as whole processes in children: ``udfc compress IN OUT
--prune-ratio 0.3 --weight-bits 6`` and the I/O floor, the same command with
nothing to compress (load + save), each ``--repeat`` times, alternated; wall
and CPU seconds and the peak resident memory of the child are the operating
system's accounting (``os.wait4``).  The stage split (data model, solve,
rewrite, ...) comes from the compression report (``--report``).  Each curve
gets its exponent from a least-squares line in log-log over its upper half.

BLAS threads: ``--threads`` (default 1) is exported as OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS / MKL_NUM_THREADS to the children.

Usage::

    python benchmarks/scaling.py [--widths 64,128,...] [--depths 10,30,...] [--repeat 3]
                                 [--threads 1] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 6144)
DEPTHS = (10, 30, 100, 300, 1000)


def _bn(rng, t, nodes, name, inp, var):
    c = var.shape[0]
    from udfc_ref import Node

    t[f"{name}.weight"] = rng.uniform(0.2, 1.0, c).astype(np.float32)
    t[f"{name}.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
    t[f"{name}.running_mean"] = rng.normal(0.0, 0.1, c).astype(np.float32)
    t[f"{name}.running_var"] = (var * rng.lognormal(0.0, 0.3, c)).astype(np.float32)
    nodes.append(Node(name, "batch_norm", [inp], name, {"eps": 1e-5},
                      {r: f"{name}.{r}" for r in ("weight", "bias", "running_mean", "running_var")}))
    return name


def _conv(rng, t, nodes, name, inp, cin, cout, k):
    from udfc_ref import Node

    std = math.sqrt(2.0 / (cin * k * k))
    t[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(std))
    nodes.append(Node(name, "conv2d", [inp], name, {"stride": 1, "padding": k // 2}, {"weight": f"{name}.weight"}))
    return name


def _block(rng, t, nodes, i, inp, cin, cout, k):
    from udfc_ref import Node

    v = _conv(rng, t, nodes, f"conv{i}", inp, cin, cout, k)
    v = _bn(rng, t, nodes, f"bn{i}", v, np.full(cout, 2.0))
    nodes.append(Node(f"relu{i}", "relu", [v], f"relu{i}"))
    return f"relu{i}"


def _head(rng, t, nodes, inp, c, classes=10):
    from udfc_ref import Node

    nodes.append(Node("gap", "global_avg_pool", [inp], "gap"))
    nodes.append(Node("flatten", "flatten", ["gap"], "flatten"))
    t["fc.weight"] = (rng.standard_normal((classes, c), dtype=np.float32) / np.float32(math.sqrt(c)))
    t["fc.bias"] = np.zeros(classes, np.float32)
    nodes.append(Node("fc", "linear", ["flatten"], "logits", {}, {"weight": "fc.weight", "bias": "fc.bias"}))


def wide(c: int, seed: int = 0):
    """conv3x3(3 -> c) - BN - ReLU - conv1x1(c -> c) - BN - ReLU - GAP - linear(c -> 10), 4 x 4 input."""
    from udfc_ref import Model

    rng = np.random.default_rng(seed)
    t, nodes = {}, []
    v = _block(rng, t, nodes, 0, "x", 3, c, 3)
    v = _block(rng, t, nodes, 1, v, c, c, 1)
    _head(rng, t, nodes, v, c)
    return Model(t, nodes, "x", (3, 4, 4))


def deep(layers: int, c: int = 64, seed: int = 0):
    """conv3x3(3 -> c) then layers - 1 blocks conv3x3(c -> c) - BN - ReLU, 8 x 8 input, GAP, linear."""
    from udfc_ref import Model

    rng = np.random.default_rng(seed)
    t, nodes = {}, []
    v = _block(rng, t, nodes, 0, "x", 3, c, 3)
    for i in range(1, layers):
        v = _block(rng, t, nodes, i, v, c, c, 3)
    _head(rng, t, nodes, v, c)
    return Model(t, nodes, "x", (3, 8, 8))


def _reset_peak() -> None:
    """Reset this process's peak-RSS mark (Linux ``clear_refs`` 5).  A child's
    peak as ``wait4`` reports it starts from the parent's peak at the fork
    (the kernel keeps the pre-exec high-water mark), so the parent lowers
    its own first: the children's figures then read from this process's
    current size (NumPy loaded, no model held), not from the largest model
    it built before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_child(cmd, env) -> dict:
    """Run ``cmd``; wall and CPU seconds and peak RSS (MiB) of the child alone
    (from the parent's current size up, see :func:`_reset_peak`)."""
    _reset_peak()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_mib": ru.ru_maxrss / 1024}


def measure(model, tmp: str, repeat: int, env) -> dict:
    """Whole-process compress vs I/O floor on ``model``, ``repeat`` alternated pairs."""
    import udfc_ref

    src = os.path.join(tmp, "in.safetensors")
    udfc_ref.save(model, src)
    params, model_mib = model.param_count(), model.weight_bytes() / 2**20
    del model  # the children's peaks read from this process's size (run_child); a caller's reference stays
    udfc = [sys.executable, "-m", "udfc_ref.cli"]
    rep_path = os.path.join(tmp, "report.json")
    comp = udfc + ["compress", src, os.path.join(tmp, "out.safetensors"), "--prune-ratio", "0.3",
                   "--weight-bits", "6", "--report", rep_path]
    floor = udfc + ["compress", src, os.path.join(tmp, "floor.safetensors")]
    runs = {"compress": [], "floor": []}
    for _ in range(repeat):
        runs["compress"].append(run_child(comp, env))
        runs["floor"].append(run_child(floor, env))
    with open(rep_path) as f:
        stages = json.load(f).get("stage_seconds", {})
    out = {"params": params, "model_mib": model_mib, "stages": stages}
    for k, rs in runs.items():
        out[k] = {m: statistics.median(r[m] for r in rs) for m in ("wall", "cpu", "peak_mib")}
    out["ratio_wall"] = statistics.median(c["wall"] / f["wall"] for c, f in zip(runs["compress"], runs["floor"]))
    out["ratio_cpu"] = statistics.median(c["cpu"] / f["cpu"] for c, f in zip(runs["compress"], runs["floor"]))
    out["peak_over_model"] = out["compress"]["peak_mib"] / out["model_mib"]
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    return out


def exponent(xs, ys) -> float:
    """Slope of log y against log x over the upper half of the points (at least 2)."""
    k = max(2, (len(xs) + 1) // 2)
    lx, ly = np.log(np.asarray(xs[-k:], float)), np.log(np.asarray(ys[-k:], float))
    return float(np.polyfit(lx, ly, 1)[0]) if len(lx) >= 2 else float("nan")


def table(kind: str, rows: list) -> str:
    head = (f"| {kind} | params | model MiB | compress wall s | cpu s | floor wall s | cpu s | wall ratio | "
            "cpu ratio | peak MiB | peak / model | data model s | solve s | rewrite s |")
    lines = [head, "|" + "---:|" * 14]
    for r in rows:
        st = r["stages"]
        lines.append(f"| {r[kind]:,} | {r['params']:,} | {r['model_mib']:.1f} | {r['compress']['wall']:.2f} | "
                     f"{r['compress']['cpu']:.2f} | {r['floor']['wall']:.2f} | {r['floor']['cpu']:.2f} | "
                     f"{r['ratio_wall']:.2f} | "
                     f"{r['ratio_cpu']:.2f} | {r['compress']['peak_mib']:.0f} | {r['peak_over_model']:.2f} | "
                     f"{st.get('data model', 0):.2f} | {st.get('solve', 0):.2f} | {st.get('rewrite', 0):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--widths", type=ints, default=list(WIDTHS))
    ap.add_argument("--depths", type=ints, default=list(DEPTHS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--smoke", action="store_true", help="two tiny points per curve, one run each (for CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.widths, a.depths, a.repeat = [16, 32], [3, 6], 1
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = {"threads": a.threads, "repeat": a.repeat, "width": [], "depth": []}
    with tempfile.TemporaryDirectory(prefix="udfc-scaling-") as tmp:
        for kind, values, build in (("width", a.widths, wide), ("depth", a.depths, deep)):
            for v in values:
                r = measure(build(v), tmp, a.repeat, env)
                r[kind] = v
                res[kind].append(r)
                print(f"{kind} {v}: compress {r['compress']['wall']:.2f} s, floor {r['floor']['wall']:.2f} s, "
                      f"peak {r['compress']['peak_mib']:.0f} MiB", flush=True)
    for kind in ("width", "depth"):
        rows = res[kind]
        xs = [r[kind] for r in rows]
        fits = {"compress wall": [r["compress"]["wall"] for r in rows],
                "compress cpu": [r["compress"]["cpu"] for r in rows],
                "compress cpu - floor cpu": [max(r["compress"]["cpu"] - r["floor"]["cpu"], 1e-6) for r in rows],
                "floor wall": [r["floor"]["wall"] for r in rows],
                "peak MiB": [r["compress"]["peak_mib"] for r in rows],
                "params": [r["params"] for r in rows]}
        for stage in ("data model", "solve", "rewrite", "quantize"):
            fits[f"stage {stage}"] = [max(r["stages"].get(stage, 0.0), 1e-6) for r in rows]
        res[f"{kind}_exponents"] = {k: exponent(xs, v) for k, v in fits.items()}
        print()
        print(table(kind, rows))
        print(f"\nexponents vs {kind} (log-log slope, upper half): " +
              ", ".join(f"{k} {v:.2f}" for k, v in res[f"{kind}_exponents"].items()))
    if a.json:
        from udfc_ref.atomic import write_bytes_atomic

        write_bytes_atomic(a.json, json.dumps(res, indent=2).encode())
    return res


if __name__ == "__main__":
    main()
