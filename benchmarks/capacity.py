"""What the 50 %-pruned architecture itself reaches (issue 12, criterion 2).

``compress(prune_ratio=0.5, ...)`` keeps half the output channels of every
pair, so its result has a fixed, smaller architecture.  This script asks how
accurate *that architecture* can be on the benchmark data at all, by means
that udfc does not use (labels, gradient training), so that the calibrated
product's gap to the original can be split into "the architecture" and "the
method":

* ``full``      -- the original architecture trained from scratch with
  ``benchmarks/train.py``'s recipe (same data, epochs, augmentation), seeds
  ``--seeds``: the seed-to-seed spread of the original's accuracy;
* ``half``      -- the 50 %-pruned architecture (every pair's producer at half
  its channels, everything else as the original; its parameter shapes are
  checked equal to those of the ``compress`` result) trained the same way;
* ``finetune``  -- the calibrated product (``calibration=`` the first 2,000
  training images, ``criterion="cov"``, 50 % + 6-bit) loaded into that
  architecture and fine-tuned with labels on the whole training split
  (cross-entropy, Adam, ``FINETUNE_EPOCHS`` epochs, learning rates
  ``FINETUNE_LRS``, BN statistics recomputed at the end; float weights).

Every number is top-1 on the test split of ``benchmarks/train.py`` (digits:
360 images, MNIST: 1,000).  Prints one line per run and, with ``--json``,
writes the rows.

Usage::

    python benchmarks/capacity.py                            # both models, 5 seeds: about 12 min, one thread
    python benchmarks/capacity.py --models vgg_digits --seeds 0,1
    python benchmarks/capacity.py --smoke                    # vgg_digits, 1 epoch on 200 images
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import udfc_ref  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402

import oracle  # noqa: E402
import train  # noqa: E402

MODELS = ("vgg_digits", "mobilenetv3_mnist")
RATIO, BITS, N_CALIB = 0.5, 6, 2000
FINETUNE_EPOCHS = 20
FINETUNE_LRS = (3e-5, 1e-4)
#: train.py's registry of the original architectures (``_registered`` replaces ``train._nets`` for a while)
NETS = train._nets


def half_architecture(name: str):
    """The torch module of ``name`` with every pair's producer at half its
    output channels (what ``compress(prune_ratio=0.5)`` leaves), untrained;
    its initial weights depend only on torch's random state on entry (the
    original built here to reach train.py's classes draws from a fork)."""
    import torch
    from torch import nn

    if name not in MODELS:
        raise ValueError(f"no half-width architecture for {name!r}; known: {', '.join(MODELS)}")
    with torch.random.fork_rng():
        full = NETS()[name][0]()
    if name == "vgg_digits":
        return type(full)((8, 8, "M", 16, 16, "M"), 8)
    if name == "mobilenetv3_mnist":
        MBConv, Net = type(full.blocks[0]), type(full)
        R, H, G = nn.ReLU, nn.Hardswish, nn.Hardsigmoid
        # stem 16 -> 8 (so block 0, which has no expand, works on 8), block 0's project 16 -> 8,
        # every expand at half its width, head 144 -> 72; the residual streams (24, 40) are not pairs
        blocks = [MBConv(8, 8, 3, 2, 8, 8, R, R, G),
                  MBConv(8, 24, 3, 1, 36, 0, R, R, G),
                  MBConv(24, 24, 3, 1, 44, 0, R, R, G),
                  MBConv(24, 40, 5, 2, 48, 24, H, R, G),
                  MBConv(40, 40, 5, 1, 60, 32, H, R, G)]
        return Net(8, blocks, 72, H, nn.Sequential(nn.Linear(72, 128), nn.Hardswish(), nn.Dropout(0.2),
                                                   nn.Linear(128, 10)))


def load_weights(module, tensors) -> None:
    """Load ``tensors`` (name -> array) into ``module``: every parameter and
    buffer must be there with the same shape (BN counters excepted)."""
    import torch

    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = sorted(k for k in own if k not in tensors or tuple(np.shape(tensors[k])) != tuple(own[k].shape))
    if bad:
        raise ValueError(f"the compressed model does not fit the half-width architecture at {bad[:5]}")
    module.load_state_dict({k: torch.from_numpy(np.array(tensors[k], np.float32)) for k in own}, strict=False)


def compressed(name: str):
    """The calibrated product at 50 % + 6-bit (``criterion="cov"``) and the
    image count it was calibrated on."""
    model = udfc_ref.load(os.path.join(HERE, "models", f"{name}.safetensors"))
    xc = oracle.calibration_images(name, N_CALIB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = udfc_ref.compress(model, prune_ratio=RATIO, weight_bits=BITS, criterion="cov", calibration=xc)
    return small, len(xc)


@contextlib.contextmanager
def _registered(build, lr):
    """``train.train_torch`` builds its module from ``train._nets()``; register ``build`` there as ``"x"``."""
    saved = train._nets
    train._nets = lambda: {"x": (build, None, lr)}
    try:
        yield "x"
    finally:
        train._nets = saved


def run(name: str, seeds, epochs: int | None = None, n_limit: int | None = None, log=print) -> list[dict]:
    data = train.load_data(oracle.data_of(name), n_limit=n_limit)
    epochs = epochs or train.EPOCHS[name]
    lr = NETS()[name][2]
    small, n_calib = compressed(name)
    tensors = {k: small.tensors[k] for k in small.tensors}
    rows = []

    def record(kind, seed, acc, seconds, **extra):
        rows.append({"model": name, "kind": kind, "seed": seed, "top1": acc, "seconds": round(seconds, 1), **extra})
        log(f"{name:18s} {kind:9s} seed {seed}  top-1 {100 * acc:5.1f}  "
            + " ".join(f"{k} {v}" for k, v in extra.items()) + f"  ({seconds:.0f} s)")

    ref = half_architecture(name)
    load_weights(ref, tensors)  # the architecture is the compressed one (raises otherwise)
    record("product", None, train._accuracy_torch(ref, data[2], data[3]), 0.0, n_calib=n_calib)
    for kind, build in (("full", NETS()[name][0]), ("half", lambda: half_architecture(name))):
        for seed in seeds:
            with _registered(build, lr) as key:
                t0 = time.perf_counter()
                _, info = train.train_torch(key, data, epochs, seed=seed, log=lambda *a: None)
            record(kind, seed, info["test_top1_torch"], time.perf_counter() - t0, params=info["params"])
    for ft_lr in FINETUNE_LRS:
        module = half_architecture(name)
        load_weights(module, tensors)
        with _registered(lambda m=module: m, ft_lr) as key:
            t0 = time.perf_counter()
            _, info = train.train_torch(key, data, min(epochs, FINETUNE_EPOCHS), seed=seeds[0], log=lambda *a: None)
        record("finetune", seeds[0], info["test_top1_torch"], time.perf_counter() - t0, lr=ft_lr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="training seeds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="vgg_digits, 1 epoch on 200 images, one seed")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    names = ["vgg_digits"] if a.smoke else [m for m in a.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; known: {', '.join(MODELS)}")
    try:
        seeds = [int(s) for s in a.seeds.split(",")][: 1 if a.smoke else None]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    rows = []
    for name in names:
        rows += run(name, seeds, epochs=1 if a.smoke else None, n_limit=200 if a.smoke else None)
    if a.json:
        write_bytes_atomic(a.json, json.dumps(rows, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
