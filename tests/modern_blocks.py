"""Small NumPy-built models with the modern blocks: MBConv with squeeze-
excitation (EfficientNet, MobileNetV3), a RegNet block with a grouped conv,
a channels-last ConvNeXt-style block (no framework needed)."""

from __future__ import annotations

import numpy as np

from udfc_ref import Model, Node


class Builder:
    """Appends nodes and random tensors; ``v`` is the current value."""

    def __init__(self, seed, shape):
        self.rng = np.random.default_rng(seed)
        self.t: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.shape = shape
        self.v = "x"

    def add(self, name, op, inputs=None, attrs=None, params=None):
        self.nodes.append(Node(name, op, inputs or [self.v], name, attrs or {}, params or {}))
        self.v = name
        return name

    def tensor(self, name, arr):
        self.t[name] = np.asarray(arr, dtype=np.float32)
        return name

    def conv(self, name, cin, cout, k=1, stride=1, groups=1, bias=False, inp=None, gain=2.0):
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(gain / (k * k * cin // groups))
        params = {"weight": self.tensor(f"{name}.weight", w)}
        if bias:
            params["bias"] = self.tensor(f"{name}.bias", self.rng.normal(0, 0.3, cout))
        attrs = {"padding": k // 2, "stride": stride, "groups": groups}
        return self.add(name, "conv2d", [inp or self.v], attrs, params)

    def linear(self, name, cin, cout, bias=True, inp=None):
        params = {"weight": self.tensor(f"{name}.weight", self.rng.standard_normal((cout, cin)) / np.sqrt(cin))}
        if bias:
            params["bias"] = self.tensor(f"{name}.bias", self.rng.normal(0, 0.3, cout))
        return self.add(name, "linear", [inp or self.v], {}, params)

    def bn(self, name, c):
        r = self.rng
        vals = {"weight": r.uniform(0.5, 1.5, c) * r.choice([1, 1, 1, -1], c), "bias": r.normal(0.0, 0.7, c),
                "running_mean": r.normal(0.0, 0.2, c), "running_var": r.uniform(0.5, 2.0, c)}
        params = {k: self.tensor(f"{name}.{k}", v) for k, v in vals.items()}
        return self.add(name, "batch_norm", None, {"eps": 1e-5}, params)

    def act(self, name, op):
        attrs = {"approximate": "tanh"} if op == "gelu_tanh" else {}
        return self.add(name, "gelu" if op == "gelu_tanh" else op, None, attrs)

    def se(self, name, c, squeeze, act="silu", gate="sigmoid", style="conv"):
        """x * gate(excite(act(squeeze(GAP(x))))): ``style`` "conv" (1x1 convs
        on (C,1,1), torch / Keras), "linear" (linear layers on (C,), reshape
        back), "keras_hard" (conv, then the gate as affine(+3) -> relu6 ->
        affine(/6), as Keras writes hard_sigmoid)."""
        x = self.v
        if style == "linear":
            self.add(f"{name}.gap", "global_avg_pool", [x], {"keepdims": False})
            self.linear(f"{name}.squeeze", c, squeeze)
            self.act(f"{name}.act", act)
            self.linear(f"{name}.excite", squeeze, c)
            self.act(f"{name}.gate", gate)
            self.add(f"{name}.reshape", "reshape", None, {"shape": [c, 1, 1]})
        else:
            self.add(f"{name}.gap", "global_avg_pool", [x], {"keepdims": True})
            self.conv(f"{name}.squeeze", c, squeeze, bias=True)
            self.act(f"{name}.act", act)
            self.conv(f"{name}.excite", squeeze, c, bias=True)
            if style == "keras_hard":
                self.add(f"{name}.plus3", "affine", None, {"axis": 1},
                         {"bias": self.tensor(f"{name}.plus3.b", np.full(c, 3.0))})
                self.act(f"{name}.relu6", "relu6")
                self.add(f"{name}.div6", "affine", None, {"axis": 1},
                         {"weight": self.tensor(f"{name}.div6.w", np.full(c, 1 / 6))})
            else:
                self.act(f"{name}.gate", gate)
        g = self.v
        return self.add(f"{name}.mul", "mul", [x, g])

    def model(self, output=None):
        return Model(self.t, self.nodes, "x", self.shape, output_name=output)


def mbconv_net(seed=0, cin=3, hidden=12, cout=6, hw=8, act="silu", gate="sigmoid", se_style="conv",
               squeeze=4, classes=5, expand=True, tf_pad=False) -> Model:
    """EfficientNet / MobileNetV3 MBConv: [expand 1x1 -> BN -> act] -> dw 3x3 -> BN -> act -> SE -> project 1x1
    -> BN -> GAP -> flatten -> linear.  ``tf_pad``: the dw conv has stride 2 and no padding of its own,
    after an explicit asymmetric zero pad (Keras ZeroPadding2D / TF "same")."""
    b = Builder(seed, (cin, hw, hw))
    c = cin
    if expand:
        b.conv("expand", cin, hidden)
        b.bn("bn1", hidden)
        b.act("act1", act)
        c = hidden
    if tf_pad:
        b.add("dw_pad", "pad", None, {"padding": [0, 1, 0, 1], "value": 0.0})
        b.conv("dw", c, c, k=3, groups=c, stride=2)
        b.nodes[-1].attrs["padding"] = 0
    else:
        b.conv("dw", c, c, k=3, groups=c)
    b.bn("bn2", c)
    b.act("act2", act)
    b.se("se", c, squeeze, act="relu" if gate == "hardsigmoid" else act, gate=gate, style=se_style)
    b.conv("project", c, cout, gain=1.0)
    b.bn("bn3", cout)
    b.add("gap", "global_avg_pool", None, {"keepdims": False})
    b.linear("fc", cout, classes)
    return b.model()


def regnet_net(seed=0, cin=3, width=8, group_width=4, hw=8, se=False, classes=5) -> Model:
    """RegNet X/Y block: stem 3x3 -> BN -> ReLU; conv a 1x1 -> BN -> ReLU -> conv b 3x3 grouped
    (groups = width / group_width) -> BN -> ReLU -> [SE] -> conv c 1x1 -> BN -> + stem -> ReLU -> GAP -> linear."""
    b = Builder(seed, (cin, hw, hw))
    b.conv("stem", cin, width, k=3)
    b.bn("stem_bn", width)
    stem = b.act("stem_relu", "relu")
    b.conv("a", width, width)
    b.bn("a_bn", width)
    b.act("a_relu", "relu")
    b.conv("b", width, width, k=3, groups=width // group_width)
    b.bn("b_bn", width)
    b.act("b_relu", "relu")
    if se:
        b.se("se", width, max(1, width // 4), act="relu", gate="sigmoid")
    b.conv("c", width, width, gain=1.0)
    b.bn("c_bn", width)
    b.add("add", "add", [b.v, stem])
    b.act("out_relu", "relu")
    b.add("gap", "global_avg_pool", None, {"keepdims": False})
    b.linear("fc", width, classes)
    return b.model()
