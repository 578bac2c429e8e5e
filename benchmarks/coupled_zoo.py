"""``prune_coupled`` and budgets on the six keras.applications of
``tests/test_zoo_keras.py`` (``weights=None``, BN statistics randomised as
there): MACs / parameters reached, layers pruned, and the compressed model
written as ``.keras``, loaded with ``keras.saving.load_model`` and compared
with the NumPy forward of the compressed model (batch of 2).

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/coupled_zoo.py --out benchmarks/results/coupled_zoo.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import udfc_ref  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402

SETTINGS = {"prune_ratio=0.3": dict(prune_ratio=0.3), "target_macs=0.5": dict(target_macs=0.5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON")
    a = ap.parse_args(argv)
    import keras
    from test_zoo_keras import ZOO, build, nchw, rel

    from converters import keras as ck

    rows = []
    for name in ZOO:
        km, x = build(name)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.keras")
            km.save(path)
            m = ck.read(path)
            for label, kw in SETTINGS.items():
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small, rep = udfc_ref.compress(m, weight_bits=6, prune_coupled=True, **kw)
                secs = time.perf_counter() - t0
                y = small.forward(nchw(x))
                out = os.path.join(d, "s.keras")
                ck.save_keras(small, out)
                yk = keras.ops.convert_to_numpy(keras.saving.load_model(out)(x, training=False))
                row = {"model": name, "setting": label, "macs": rep.flops_after / rep.flops_before,
                       "params": rep.params_after / rep.params_before,
                       "pruned": sum(r.channels_after < r.channels_before for r in rep.layers),
                       "layers": len(rep.layers), "keras_rel_diff": rel(yk, y), "finite": bool(np.isfinite(y).all()),
                       "seconds": secs}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        write_bytes_atomic(a.out, (json.dumps(rows, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
