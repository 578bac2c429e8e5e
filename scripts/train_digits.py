"""Train the small digits CNN bundled with udfc-ref (``udfc demo``).

Not part of the core package: needs scikit-learn and PyTorch.  Run from the
repository root::

    python scripts/train_digits.py

Data: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
1797 images, shipped inside scikit-learn, no download).  Pixels 0..16 are
scaled to [0, 1] (``x / 16``) then standardised with the fixed constants
``MEAN = 0.5, STD = 0.5`` (``(x - 0.5) / 0.5``, range [-1, 1]).  Split:
stratified 70/30 with ``train_test_split(..., random_state=0)``.

Model (VGG-style, 1x8x8 input)::

    conv3x3(1->16)-BN-ReLU, conv3x3(16->32)-BN-ReLU, maxpool2,
    conv3x3(32->32)-BN-ReLU, conv3x3(32->32)-BN-ReLU, maxpool2,
    flatten (32*2*2=128), linear(128->64), ReLU, linear(64->10)

Writes ``udfc_ref/data/digits_cnn.safetensors`` (udfc-ref file built by hand
from the state_dict, no converter) and ``udfc_ref/data/digits_test.npz``
(the held-out split, already normalised: ``x`` float32 (N, 1, 8, 8), ``y``
int64 (N,)).  Checks that the NumPy forward matches PyTorch.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import udfc_ref
from udfc_ref.atomic import write_bytes_atomic
from udfc_ref.graph import Model, Node

MEAN, STD = 0.5, 0.5
SEED = 0
DATA_DIR = Path(__file__).resolve().parent.parent / "udfc_ref" / "data"


def load_split():
    """Return (x_train, x_test, y_train, y_test); x float32 (N, 1, 8, 8) normalised, y int64."""
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - MEAN) / STD
    x = x[:, None, :, :].astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def shift_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of -1, 0 or +1 pixel in each direction (background = -1 after normalisation)."""
    n = x.shape[0]
    bg = (0.0 - MEAN) / STD
    padded = F.pad(x, (1, 1, 1, 1), value=bg)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # (n, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]][:, None]


def train(model, x_tr, y_tr, epochs=60, batch=64):
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            b = perm[i:i + batch]
            if len(b) < 2:
                continue
            loss = F.cross_entropy(model(shift_batch(xt[b], gen)), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


@torch.no_grad()
def torch_logits(model, x):
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def to_udfc(model: DigitsCNN) -> Model:
    """Build the udfc-ref Model by hand; tensor names are the state_dict keys."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    nodes: list[Node] = []
    cur = "input"

    def add(name, op, attrs=None, params=None):
        nonlocal cur
        nodes.append(Node(name=name, op=op, inputs=[cur], output=name, attrs=attrs or {}, params=params or {}))
        cur = name

    for i, m in enumerate(model.features):
        p = f"features.{i}"
        if isinstance(m, nn.Conv2d):
            add(p, "conv2d", {"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1},
                {"weight": f"{p}.weight"})
        elif isinstance(m, nn.BatchNorm2d):
            add(p, "batch_norm", {"eps": float(m.eps)},
                {r: f"{p}.{r}" for r in ("weight", "bias", "running_mean", "running_var")})
        elif isinstance(m, nn.ReLU):
            add(p, "relu")
        elif isinstance(m, nn.MaxPool2d):
            add(p, "max_pool2d", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0, 0, 0]})
        else:  # pragma: no cover
            raise TypeError(m)
    for i, m in enumerate(model.classifier):
        p = f"classifier.{i}"
        if isinstance(m, nn.Flatten):
            add(p, "flatten")
        elif isinstance(m, nn.Linear):
            add(p, "linear", {}, {"weight": f"{p}.weight", "bias": f"{p}.bias"})
        elif isinstance(m, nn.ReLU):
            add(p, "relu")
        else:  # pragma: no cover
            raise TypeError(m)
    return Model(sd, nodes, input_name="input", input_shape=(1, 8, 8), output_name=cur)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--out-dir", default=str(DATA_DIR))
    a = ap.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_split()
    model = DigitsCNN()
    train(model, x_tr, y_tr, epochs=a.epochs)

    acc_tr = float((torch_logits(model, x_tr).argmax(1) == y_tr).mean())
    t_te = torch_logits(model, x_te)
    acc_te = float((t_te.argmax(1) == y_te).mean())
    print(f"torch: train acc {acc_tr:.4f} ({len(y_tr)}), test acc {acc_te:.4f} ({len(y_te)})")

    um = to_udfc(model)
    u_te = um.forward(x_te)
    rel = float(np.abs(u_te - t_te).max() / np.abs(t_te).max())
    u_acc = float((u_te.argmax(1) == y_te).mean())
    print(f"numpy forward: max rel diff {rel:.2e}, test acc {u_acc:.4f}")
    assert rel <= 1e-4, rel
    assert u_acc == acc_te, (u_acc, acc_te)
    assert acc_te >= 0.97, acc_te

    out = Path(a.out_dir)
    mpath, dpath = out / "digits_cnn.safetensors", out / "digits_test.npz"
    udfc_ref.save(um, mpath)
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x_te.astype(np.float32), y=y_te.astype(np.int64))
    write_bytes_atomic(dpath, buf.getvalue())

    back = udfc_ref.load(mpath)
    b_acc = float((back.forward(x_te).argmax(1) == y_te).mean())
    assert b_acc == acc_te, (b_acc, acc_te)
    print(f"wrote {mpath} ({os.path.getsize(mpath)} bytes), {dpath} ({os.path.getsize(dpath)} bytes); "
          f"reloaded test acc {b_acc:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
