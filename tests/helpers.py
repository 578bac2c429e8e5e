"""Small NumPy-built models for the core tests (no framework needed)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from udfc_ref import Model, Node


def bn_params(rng, c, name, tensors):
    vals = {
        "weight": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0.0, 0.5, c),
        "running_mean": rng.normal(0.0, 0.2, c),
        "running_var": rng.uniform(0.5, 2.0, c),
    }
    for r, v in vals.items():
        tensors[f"{name}.{r}"] = v.astype(np.float32)
    return {r: f"{name}.{r}" for r in vals}


def vgg(seed=0, channels=(3, 8, 16, 16), hw=8, act="relu", classes=5) -> Model:
    """conv-BN-act blocks, a max pool, flatten, linear: every block is a pair."""
    rng = np.random.default_rng(seed)
    tensors, nodes = {}, []
    v = "x"
    for i in range(len(channels) - 1):
        cin, cout = channels[i], channels[i + 1]
        tensors[f"c{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        nodes.append(Node(f"c{i}", "conv2d", [v], f"c{i}", {"padding": 1}, {"weight": f"c{i}.weight"}))
        nodes.append(Node(f"b{i}", "batch_norm", [f"c{i}"], f"b{i}", {"eps": 1e-5}, bn_params(rng, cout, f"b{i}", tensors)))
        nodes.append(Node(f"a{i}", act, [f"b{i}"], f"a{i}"))
        v = f"a{i}"
    nodes.append(Node("pool", "max_pool2d", [v], "pool", {"kernel": 2}))
    nodes.append(Node("flat", "flatten", ["pool"], "flat"))
    feat = channels[-1] * (hw // 2) ** 2
    tensors["fc.weight"] = (rng.standard_normal((classes, feat)) / np.sqrt(feat)).astype(np.float32)
    tensors["fc.bias"] = np.zeros(classes, np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight", "bias": "fc.bias"}))
    return Model(tensors, nodes, "x", (channels[0], hw, hw))


def resnet_block(seed=0, c=8, hw=8) -> Model:
    """stem conv-BN-ReLU, a basic residual block (conv-BN-ReLU-conv-BN + identity,
    ReLU), global pool, linear: only the block's inner conv is a free pair."""
    rng = np.random.default_rng(seed)
    t, nodes = {}, []

    def conv(name, inp, cin, cout):
        t[f"{name}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        nodes.append(Node(name, "conv2d", [inp], name, {"padding": 1}, {"weight": f"{name}.weight"}))

    def bn(name, inp, ch):
        nodes.append(Node(name, "batch_norm", [inp], name, {"eps": 1e-5}, bn_params(rng, ch, name, t)))

    conv("stem", "x", 3, c)
    bn("stem_bn", "stem", c)
    nodes.append(Node("stem_relu", "relu", ["stem_bn"], "stem_relu"))
    conv("b.conv1", "stem_relu", c, c)
    bn("b.bn1", "b.conv1", c)
    nodes.append(Node("b.relu1", "relu", ["b.bn1"], "b.relu1"))
    conv("b.conv2", "b.relu1", c, c)
    bn("b.bn2", "b.conv2", c)
    nodes.append(Node("b.add", "add", ["b.bn2", "stem_relu"], "b.add"))
    nodes.append(Node("b.relu2", "relu", ["b.add"], "b.relu2"))
    nodes.append(Node("gap", "global_avg_pool", ["b.relu2"], "gap", {"keepdims": False}))
    t["fc.weight"] = (rng.standard_normal((4, c)) / np.sqrt(c)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["gap"], "y", {}, {"weight": "fc.weight"}))
    return Model(t, nodes, "x", (3, hw, hw))


def mobilenet_block(seed=0, cin=3, hidden=8, cout=6, hw=8) -> Model:
    """stem 1x1 conv-BN-ReLU6 (expand) -> depthwise 3x3 -> BN -> ReLU6 -> 1x1
    project -> BN -> global pool -> linear: the expand/depthwise chain is one
    pair, the project conv is a pair with identity activation."""
    rng = np.random.default_rng(seed)
    t, nodes = {}, []
    t["expand.weight"] = (rng.standard_normal((hidden, cin, 1, 1)) * np.sqrt(2 / cin)).astype(np.float32)
    nodes.append(Node("expand", "conv2d", ["x"], "expand", {}, {"weight": "expand.weight"}))
    nodes.append(Node("bn1", "batch_norm", ["expand"], "bn1", {"eps": 1e-5}, bn_params(rng, hidden, "bn1", t)))
    nodes.append(Node("act1", "relu6", ["bn1"], "act1"))
    t["dw.weight"] = (rng.standard_normal((hidden, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32)
    nodes.append(Node("dw", "conv2d", ["act1"], "dw", {"padding": 1, "groups": hidden}, {"weight": "dw.weight"}))
    nodes.append(Node("bn2", "batch_norm", ["dw"], "bn2", {"eps": 1e-5}, bn_params(rng, hidden, "bn2", t)))
    nodes.append(Node("act2", "relu6", ["bn2"], "act2"))
    t["project.weight"] = (rng.standard_normal((cout, hidden, 1, 1)) * np.sqrt(1 / hidden)).astype(np.float32)
    nodes.append(Node("project", "conv2d", ["act2"], "project", {}, {"weight": "project.weight"}))
    nodes.append(Node("bn3", "batch_norm", ["project"], "bn3", {"eps": 1e-5}, bn_params(rng, cout, "bn3", t)))
    nodes.append(Node("gap", "global_avg_pool", ["bn3"], "gap"))
    nodes.append(Node("flat", "flatten", ["gap"], "flat"))
    t["fc.weight"] = (rng.standard_normal((4, cout)) / np.sqrt(cout)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight"}))
    return Model(t, nodes, "x", (cin, hw, hw))


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the benchmarks are scripts, not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
