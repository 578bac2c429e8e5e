"""A ResNet-50-shaped udfc-ref model (25.6 M parameters) with random weights
and realistic BN statistics, built with NumPy only (no torchvision).

Weights are He-initialised; each BN's running variance is the variance the
conv output would have on a unit-variance input (fan-in * weight variance),
times a log-normal factor per channel; running means are small, gamma in
[0.2, 1], beta ~ N(0, 0.1) -- the ranges seen in trained ImageNet ResNets.
"""

from __future__ import annotations

import numpy as np

from udfc_ref import Model, Node


def build(seed: int = 0, width: int = 64, layers=(3, 4, 6, 3), classes: int = 1000, hw: int = 224,
          dtype=np.float32) -> Model:
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    nodes: list[Node] = []

    def conv(name, inp, cin, cout, k, stride=1):
        std = np.sqrt(2.0 / (cin * k * k))
        t[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k)) * std).astype(dtype)
        nodes.append(Node(name, "conv2d", [inp], name, {"stride": stride, "padding": k // 2},
                          {"weight": f"{name}.weight"}))
        return name

    def bn(name, inp, c, fan_var=2.0):
        t[f"{name}.weight"] = rng.uniform(0.2, 1.0, c).astype(dtype)
        t[f"{name}.bias"] = rng.normal(0.0, 0.1, c).astype(dtype)
        t[f"{name}.running_mean"] = rng.normal(0.0, 0.1, c).astype(dtype)
        t[f"{name}.running_var"] = (fan_var * rng.lognormal(0.0, 0.3, c)).astype(dtype)
        nodes.append(Node(name, "batch_norm", [inp], name, {"eps": 1e-5},
                          {r: f"{name}.{r}" for r in ("weight", "bias", "running_mean", "running_var")}))
        return name

    def relu(name, inp):
        nodes.append(Node(name, "relu", [inp], name))
        return name

    v = relu("relu", bn("bn1", conv("conv1", "x", 3, width, 7, 2), width))
    nodes.append(Node("maxpool", "max_pool2d", [v], "maxpool", {"kernel": 3, "stride": 2, "padding": 1}))
    v, cin = "maxpool", width
    for li, n_blocks in enumerate(layers):
        planes = width * 2**li
        for b in range(n_blocks):
            p = f"layer{li + 1}.{b}"
            stride = 2 if (b == 0 and li > 0) else 1
            h = relu(f"{p}.relu1", bn(f"{p}.bn1", conv(f"{p}.conv1", v, cin, planes, 1), planes))
            h = relu(f"{p}.relu2", bn(f"{p}.bn2", conv(f"{p}.conv2", h, planes, planes, 3, stride), planes))
            h = bn(f"{p}.bn3", conv(f"{p}.conv3", h, planes, planes * 4, 1), planes * 4)
            sc = v
            if b == 0:
                sc = bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", v, cin, planes * 4, 1, stride), planes * 4)
            nodes.append(Node(f"{p}.add", "add", [h, sc], f"{p}.add"))
            v = relu(f"{p}.relu3", f"{p}.add")
            cin = planes * 4
    nodes.append(Node("avgpool", "global_avg_pool", [v], "avgpool"))
    nodes.append(Node("flatten", "flatten", ["avgpool"], "flatten"))
    t["fc.weight"] = (rng.standard_normal((classes, cin)) / np.sqrt(cin)).astype(dtype)
    t["fc.bias"] = np.zeros(classes, dtype)
    nodes.append(Node("fc", "linear", ["flatten"], "logits", {}, {"weight": "fc.weight", "bias": "fc.bias"}))
    return Model(t, nodes, "x", (3, hw, hw))


if __name__ == "__main__":
    import sys

    from udfc_ref import save

    m = build()
    print(f"{m.param_count():,} parameters, {m.weight_bytes():,} bytes")
    if len(sys.argv) > 1:
        save(m, sys.argv[1])
        print(f"wrote {sys.argv[1]}")
