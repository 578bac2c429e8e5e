"""Forward parity: the NumPy forward of a converted model equals the PyTorch
eval forward (max |diff| <= 1e-4 * max |output|), for the three CNN families
with random weights and non-trivial BatchNorm statistics, and for conv
corner cases (groups, dilation, strides, 'same' padding, asymmetric padding).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import udfc_ref  # noqa: E402
from converters import torch as ct  # noqa: E402
from udfc_ref import Model, Node  # noqa: E402

import families  # noqa: E402

RTOL = 1e-4


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_family_parity(family, tmp_path):
    net = families.build(family, seed=3)
    path = tmp_path / f"{family}.safetensors"
    ct.export(net, path, families.INPUT_SHAPE)
    model = udfc_ref.load(path)
    x = families.example_input(seed=5)
    with torch.no_grad():
        ref = net(x).numpy()
    got = model.forward(x.numpy())
    assert ref.shape == (families.BATCH, 10)
    assert rel_err(got, ref) <= RTOL
    # the BN statistics really are non-trivial (the test would not catch a skipped BN otherwise)
    bn = [n for n in model.nodes if n.op == "batch_norm"]
    assert bn and all(np.abs(model.tensors[n.params["running_mean"]]).max() > 0.05 for n in bn)
    # every parameter of the module is in the file, under its state_dict name
    keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(model.tensors) == keys


def test_family_structure():
    """The families contain the structures the issue names."""
    r = ct.to_udfc(families.build("resnet"), families.INPUT_SHAPE)
    ops = [n.op for n in r.nodes]
    assert ops.count("add") == 8
    assert any(n.name.endswith("downsample.0") and n.attrs["stride"] == [2, 2] for n in r.nodes)
    assert any(n.name.endswith("conv3") for n in r.nodes)  # bottleneck
    m = ct.to_udfc(families.build("mobilenet_v2"), families.INPUT_SHAPE)
    dw = [n for n in m.nodes if n.op == "conv2d" and n.attrs["groups"] > 1]
    assert dw and all(m.tensors[n.params["weight"]].shape[1] == 1 for n in dw)
    assert [n.op for n in m.nodes].count("relu6") >= 10 and "add" in [n.op for n in m.nodes]
    assert m.nodes[-3].op == "global_avg_pool"
    v = ct.to_udfc(families.build("vgg_bn"), families.INPUT_SHAPE)
    assert [n.op for n in v.nodes].count("max_pool2d") == 4 and "flatten" in [n.op for n in v.nodes]


class GroupedDilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=True)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
        self.c4 = nn.Conv2d(12, 12, 4, padding="same", dilation=3, groups=4)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = self.c4(self.c3(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_grouped_dilated_parity():
    net = families.randomize(GroupedDilated(), seed=1)
    model = ct.to_udfc(net, (3, 20, 18))
    c3 = model.node("c3")
    assert c3.attrs["groups"] == 2 and c3.attrs["dilation"] == [1, 2] and c3.attrs["stride"] == [2, 1]
    c4 = model.node("c4")
    assert c4.attrs["padding"] == [4, 5, 4, 5]  # 'same' with an even kernel: torch pads the extra row after
    x = torch.randn(2, 3, 20, 18, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).numpy()
    assert rel_err(model.forward(x.numpy()), ref) <= RTOL


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), stride=st.integers(1, 3), dil=st.integers(1, 2), pad=st.integers(0, 2),
       groups=st.sampled_from([1, 2, 4]), bias=st.booleans(), seed=st.integers(0, 1000))
def test_conv_parity_property(k, stride, dil, pad, groups, bias, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(4, 8, k, stride, pad, dil, groups, bias), nn.BatchNorm2d(8), nn.ReLU6())
    families.randomize(net, seed)
    model = ct.to_udfc(net, (4, 11, 9))
    x = torch.randn(2, 4, 11, 9, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = net(x).numpy()
    assert rel_err(model.forward(x.numpy()), ref) <= RTOL
    back = ct.to_module(model)
    with torch.no_grad():
        assert rel_err(back(x).numpy(), ref) <= RTOL


def _asym_model():
    rng = np.random.default_rng(0)
    t = {
        "conv.weight": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(6).astype(np.float32),
        "dw.weight": rng.standard_normal((6, 1, 3, 2)).astype(np.float32),
        "fc.weight": rng.standard_normal((4, 6 * 3 * 4)).astype(np.float32),
    }
    nodes = [
        Node("conv", "conv2d", ["x"], "c", {"padding": [0, 1, 2, 0], "stride": 1}, {"weight": "conv.weight",
                                                                                    "bias": "conv.bias"}),
        Node("pool", "max_pool2d", ["c"], "p", {"kernel": 2, "stride": 2, "padding": [1, 0, 0, 1]}),
        Node("dw", "conv2d", ["p"], "d", {"padding": [1, 0, 0, 1], "groups": 6}, {"weight": "dw.weight"}),
        Node("ap", "avg_pool2d", ["d"], "a", {"kernel": 2, "stride": 1, "padding": [0, 1, 1, 0]}),
        Node("flat", "flatten", ["a"], "f"),
        Node("fc", "linear", ["f"], "y", {}, {"weight": "fc.weight"}),
    ]
    return Model(t, nodes, "x", (3, 9, 7))


def test_asymmetric_padding_to_module(tmp_path):
    model = _asym_model()
    assert model.shapes["y"] == (4,)
    path = tmp_path / "asym.safetensors"
    udfc_ref.save(model, path)
    back = ct.to_module(path)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 7)).astype(np.float32)
    with torch.no_grad():
        got = back(torch.from_numpy(x)).numpy()
    assert rel_err(got, model.forward(x)) <= RTOL
    # and the round trip back to the IR keeps the asymmetric padding exactly
    again = ct.to_udfc(back, (3, 9, 7))
    assert again.node("conv").attrs["padding"] == [0, 1, 2, 0]  # F.pad folded back into the conv
    assert rel_err(again.forward(x), model.forward(x)) <= RTOL


def _every_op_model():
    """A hand-written IR graph using every op of udfc_ref.ops.OPS (layer
    norm over the channel axis of an NCHW value, softmax over a middle axis,
    asymmetric pads and pools, channels-last linear)."""
    rng = np.random.default_rng(4)

    def t(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"c1.weight": t(8, 3, 3, 3), "c1.bias": t(8), "bn.weight": t(8) + 1, "bn.bias": t(8),
               "bn.running_mean": t(8), "bn.running_var": np.abs(t(8)) + 0.5, "aff.weight": t(8) + 1,
               "aff.bias": t(8), "ln.weight": t(8) + 1, "ln.bias": t(8), "fc1.weight": t(12, 16), "fc1.bias": t(12),
               "bn1d.weight": t(12) + 1, "bn1d.bias": t(12), "bn1d.running_mean": t(12),
               "bn1d.running_var": np.abs(t(12)) + 0.5, "head.weight": t(5, 12), "head.bias": t(5)}
    bn = {r: f"bn.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
    bn1d = {r: f"bn1d.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
    N = Node
    nodes = [
        N("c1", "conv2d", ["x"], "c1", {"padding": [1, 1, 1, 1]}, {"weight": "c1.weight", "bias": "c1.bias"}),
        N("bn", "batch_norm", ["c1"], "bn", {}, bn),
        N("r6", "relu6", ["bn"], "r6"),
        N("aff", "affine", ["r6"], "aff", {"axis": 1}, {"weight": "aff.weight", "bias": "aff.bias"}),
        N("ln", "layer_norm", ["aff"], "ln", {"axis": 1, "eps": 1e-3}, {"weight": "ln.weight", "bias": "ln.bias"}),
        N("silu", "silu", ["ln"], "silu"),
        N("hsw", "hardswish", ["ln"], "hsw"),
        N("sum", "add", ["silu", "hsw"], "sum"),
        N("gap", "global_avg_pool", ["sum"], "gap", {"keepdims": True}),
        N("sig", "sigmoid", ["gap"], "sig"),
        N("gate", "mul", ["sum", "sig"], "gate"),
        N("hsig", "hardsigmoid", ["gate"], "hsig"),
        N("cat", "concat", ["gate", "hsig"], "cat", {"axis": 1}),
        N("pad", "pad", ["cat"], "pad", {"padding": [1, 0, 0, 1], "value": 0.5}),
        N("mp", "max_pool2d", ["pad"], "mp", {"kernel": 2, "stride": 2, "padding": [0, 1, 1, 0]}),
        N("ap", "avg_pool2d", ["mp"], "ap", {"kernel": 3, "stride": 1, "padding": 1, "count_include_pad": False}),
        N("nhwc", "permute", ["ap"], "nhwc", {"perm": [0, 2, 3, 1]}),
        N("fc1", "linear", ["nhwc"], "fc1", {}, {"weight": "fc1.weight", "bias": "fc1.bias"}),
        N("gelu", "gelu", ["fc1"], "gelu", {"approximate": "tanh"}),
        N("nchw", "permute", ["gelu"], "nchw", {"perm": [0, 3, 1, 2]}),
        N("rs", "reshape", ["nchw"], "rs", {"shape": [12, 25]}),
        N("sm", "softmax", ["rs"], "sm", {"axis": 2}),
        N("back", "reshape", ["sm"], "back", {"shape": [12, 5, 5]}),
        N("relu", "relu", ["back"], "relu"),
        N("id", "identity", ["relu"], "id"),
        N("flat", "flatten", ["id"], "flat"),
        N("gelu2", "gelu", ["flat"], "gelu2"),
        N("r3", "reshape", ["gelu2"], "r3", {"shape": [12, 5, 5]}),
        N("gap2", "global_avg_pool", ["r3"], "gap2", {"keepdims": False}),
        N("bn1d", "batch_norm", ["gap2"], "bn1d", {}, bn1d),
        N("head", "linear", ["bn1d"], "head", {}, {"weight": "head.weight", "bias": "head.bias"}),
        N("prob", "softmax", ["head"], "prob", {"axis": 1}),
    ]
    return Model(tensors, nodes, "x", (3, 8, 8))


def test_to_module_and_pt2_cover_every_ir_op(tmp_path):
    from udfc_ref.ops import OPS

    model = _every_op_model()
    assert {n.op for n in model.nodes} == set(OPS)  # a new IR op needs a builder and a place here
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    ref = model.forward(x)
    with torch.no_grad():
        assert rel_err(ct.to_module(model)(torch.from_numpy(x)).numpy(), ref) <= RTOL
    pt2 = tmp_path / "every.pt2"
    ct.save_pt2(model, pt2)
    with torch.no_grad():
        assert rel_err(torch.export.load(str(pt2)).module()(torch.from_numpy(x)).numpy(), ref) <= RTOL
