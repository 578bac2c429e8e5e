"""Small NumPy-built models for the core tests (no framework needed)."""

from __future__ import annotations

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
