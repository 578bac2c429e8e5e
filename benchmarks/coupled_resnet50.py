"""prune_coupled on the ResNet-50 layout (benchmarks/resnet50.py): MACs and
parameters kept at a prune ratio with and without the coupled groups, and
the compressed file loaded back in PyTorch (.pt2) and Keras (.keras) against
the NumPy forward of the compressed model.

Usage::

    python benchmarks/coupled_resnet50.py --out benchmarks/results/coupled_resnet50.json
    python benchmarks/coupled_resnet50.py --hw 64 --no-export      # quicker, MACs only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import resnet50  # noqa: E402

from udfc_ref import compress  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hw", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--ratio", type=float, default=0.3, help="prune ratio (default 0.3)")
    ap.add_argument("--bits", type=int, default=None, help="weight bits (default float)")
    ap.add_argument("--no-export", action="store_true", help="skip the .pt2 / .keras load-back")
    ap.add_argument("--target-macs", type=float, default=None,
                    help="also compress to this MAC budget with prune_coupled (the allocation's time and reach)")
    ap.add_argument("--out", help="write the numbers as JSON")
    a = ap.parse_args(argv)
    m = resnet50.build(hw=a.hw)
    res = {"hw": a.hw, "ratio": a.ratio, "bits": a.bits, "params": m.param_count(), "macs": m.flops()}
    for coupled in (False, True):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small, rep = compress(m, prune_ratio=a.ratio, weight_bits=a.bits, prune_coupled=coupled)
        key = "coupled" if coupled else "pairs"
        res[key] = {"macs_kept": rep.flops_after / rep.flops_before,
                    "params_kept": rep.params_after / rep.params_before,
                    "bytes_kept": rep.bytes_after / rep.bytes_before,
                    "convs_pruned": sum(1 for r in rep.layers if r.channels_after < r.channels_before),
                    "convs": len(rep.layers), "seconds": time.perf_counter() - t0}
        print(key, json.dumps(res[key]), flush=True)
    if a.target_macs is not None:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bsmall, rep = compress(m, target_macs=a.target_macs, weight_bits=a.bits, prune_coupled=True)
        res["budget"] = {"target_macs": a.target_macs, **{k: v for k, v in rep.budget.items() if k != "target"},
                         "params_kept": rep.params_after / rep.params_before,
                         "seconds": time.perf_counter() - t0, "allocate_seconds": rep.stage_seconds["allocate"],
                         "ratios": bsmall.record["budget"]["ratios"]}
        print("budget", {k: v for k, v in res["budget"].items() if k != "ratios"}, flush=True)
    if not a.no_export:
        import torch

        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        from converters.keras import save_keras
        from converters.torch import save_pt2

        x = np.random.default_rng(0).standard_normal((2, 3, a.hw, a.hw)).astype(np.float32)
        y = small.forward(x)
        scale = float(np.abs(y).max())
        with tempfile.TemporaryDirectory() as d:
            save_pt2(small, os.path.join(d, "s.pt2"))
            with torch.no_grad():
                yt = torch.export.load(os.path.join(d, "s.pt2")).module()(torch.from_numpy(x)).numpy()
            res["pt2_max_rel_diff"] = float(np.abs(yt - y).max()) / scale
            save_keras(small, os.path.join(d, "s.keras"))
            km = keras.saving.load_model(os.path.join(d, "s.keras"))
            yk = np.asarray(km.predict(x.transpose(0, 2, 3, 1), verbose=0))
            res["keras_max_rel_diff"] = float(np.abs(yk - y).max()) / scale
            res["keras_params_match"] = int(km.count_params()) == small.param_count()
        print("export", res["pt2_max_rel_diff"], res["keras_max_rel_diff"], res["keras_params_match"], flush=True)
    if a.out:
        write_bytes_atomic(a.out, (json.dumps(res, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
