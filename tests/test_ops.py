"""Every graph op's NumPy kernel against PyTorch's (relative error <= 1e-5).

One small graph per op: the op applied to the graph input (or to a conv
output where the op needs more than one input), run by ``Model.forward`` and
by the PyTorch function that defines it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from udfc_ref import GraphError, Model, Node

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL = 1e-5


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_matches_torch(model: Model, torch_fn, x=None, seed=0):
    """Run ``model`` and ``torch_fn`` on the same random float32 batch."""
    if x is None:
        x = (np.random.default_rng(seed).standard_normal((3,) + model.input_shape) * 3).astype(np.float32)
    got = model.forward(x)
    with torch.no_grad():
        ref = torch_fn(torch.from_numpy(x)).numpy()
    err = rel_err(got, ref)
    assert err <= RTOL, f"relative error {err:.3g} (shapes {got.shape} vs {ref.shape})"
    return got


def one(op, attrs=None, params=None, tensors=None, shape=(4, 5, 6)):
    return Model(tensors or {}, [Node("n", op, ["x"], "y", attrs or {}, params or {})], "x", shape)


@pytest.mark.parametrize("op,fn", [
    ("sigmoid", torch.sigmoid),
    ("silu", F.silu),
    ("hardsigmoid", F.hardsigmoid),
    ("hardswish", F.hardswish),
    ("relu", F.relu),
    ("relu6", F.relu6),
])
def test_pointwise(op, fn):
    m = one(op)
    assert m.shapes["y"] == (4, 5, 6)
    assert_matches_torch(m, fn)


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_gelu(approx):
    assert_matches_torch(one("gelu", {"approximate": approx}), lambda x: F.gelu(x, approximate=approx))
    with pytest.raises(GraphError, match="approximate"):
        one("gelu", {"approximate": "sigmoid"})


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax(axis):
    m = one("softmax", {"axis": axis})
    out = assert_matches_torch(m, lambda x: F.softmax(x, dim=axis))
    np.testing.assert_allclose(out.sum(axis=axis), 1.0, rtol=1e-6)
    with pytest.raises(GraphError, match="axis"):
        one("softmax", {"axis": 0})


def test_softmax_on_features_large_logits():
    m = Model({}, [Node("f", "flatten", ["x"], "f"), Node("s", "softmax", ["f"], "y", {"axis": 1})], "x", (3, 2, 2))
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 2)).astype(np.float32) * 200  # exp would overflow
    assert_matches_torch(m, lambda t: F.softmax(t.flatten(1), dim=1), x=x)


def test_mul_gate_broadcast_both_orders():
    rng = np.random.default_rng(2)
    t = {"w": (rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)}
    for order in (["g", "x"], ["x", "g"]):
        nodes = [Node("gap", "global_avg_pool", ["x"], "gap", {"keepdims": True}),
                 Node("c", "conv2d", ["gap"], "c", {}, {"weight": "w"}),
                 Node("s", "sigmoid", ["c"], "g"),
                 Node("m", "mul", order, "y")]
        m = Model(t, nodes, "x", (4, 5, 6))
        assert m.shapes["y"] == (4, 5, 6)
        wt = torch.from_numpy(t["w"])
        assert_matches_torch(m, lambda x: x * torch.sigmoid(F.conv2d(x.mean((2, 3), keepdim=True), wt)))
    with pytest.raises(GraphError, match="broadcast"):
        Model(t, [Node("p", "max_pool2d", ["x"], "p", {"kernel": 2}), Node("m", "mul", ["x", "p"], "y")],
              "x", (4, 6, 6))


def test_affine_per_channel_and_other_axis():
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    m = one("affine", {}, {"weight": "a.w", "bias": "a.b"}, {"a.w": w, "a.b": b})
    assert_matches_torch(m, lambda x: x * torch.from_numpy(w)[:, None, None] + torch.from_numpy(b)[:, None, None])
    w6 = rng.standard_normal(6).astype(np.float32)
    m = one("affine", {"axis": -1}, {"weight": "a.w"}, {"a.w": w6})
    assert m.nodes[0].attrs["axis"] == 3
    assert_matches_torch(m, lambda x: x * torch.from_numpy(w6))
    with pytest.raises(GraphError, match="shape"):
        one("affine", {}, {"weight": "a.w"}, {"a.w": w6})
    with pytest.raises(GraphError, match="'weight' or a 'bias'"):
        one("affine")


@pytest.mark.parametrize("axis", [1, 3])
def test_layer_norm(axis):
    rng = np.random.default_rng(4)
    c = (4, 5, 6)[axis - 1]
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    m = one("layer_norm", {"axis": axis, "eps": 1e-6}, {"weight": "l.w", "bias": "l.b"}, {"l.w": w, "l.b": b})
    perm = [0, 2, 3, 1] if axis == 1 else [0, 1, 2, 3]
    inv = [0, 3, 1, 2] if axis == 1 else [0, 1, 2, 3]
    x = (np.random.default_rng(5).standard_normal((3, 4, 5, 6)) * 4 + 7).astype(np.float32)  # offset: cancellation
    assert_matches_torch(m, lambda t: F.layer_norm(t.permute(perm), (c,), torch.from_numpy(w), torch.from_numpy(b),
                                                   1e-6).permute(inv), x=x)


def test_convnext_channels_last_block():
    """permute -> layer_norm(last) -> linear on the last axis -> gelu -> linear
    -> layer scale -> permute back, as in ConvNeXt."""
    rng = np.random.default_rng(6)
    c, h = 4, 8
    t = {"ln.w": rng.standard_normal(c).astype(np.float32), "ln.b": rng.standard_normal(c).astype(np.float32),
         "p1.w": rng.standard_normal((h, c)).astype(np.float32), "p1.b": rng.standard_normal(h).astype(np.float32),
         "p2.w": rng.standard_normal((c, h)).astype(np.float32), "g": rng.standard_normal(c).astype(np.float32)}
    nodes = [Node("perm", "permute", ["x"], "p", {"perm": [0, 2, 3, 1]}),
             Node("ln", "layer_norm", ["p"], "ln", {"axis": -1, "eps": 1e-6}, {"weight": "ln.w", "bias": "ln.b"}),
             Node("p1", "linear", ["ln"], "p1", {}, {"weight": "p1.w", "bias": "p1.b"}),
             Node("act", "gelu", ["p1"], "act"),
             Node("p2", "linear", ["act"], "p2", {}, {"weight": "p2.w"}),
             Node("ls", "affine", ["p2"], "ls", {"axis": -1}, {"weight": "g"}),
             Node("back", "permute", ["ls"], "back", {"perm": [0, 3, 1, 2]}),
             Node("res", "add", ["x", "back"], "y")]
    m = Model(t, nodes, "x", (c, 5, 6))
    assert m.shapes["p1"] == (5, 6, h) and m.shapes["y"] == (c, 5, 6)
    assert m.flops() == (h * c + c * h) * 5 * 6
    T = {k: torch.from_numpy(v) for k, v in t.items()}

    def ref(x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), T["ln.w"], T["ln.b"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, T["p1.w"], T["p1.b"])), T["p2.w"]) * T["g"]
        return x + y.permute(0, 3, 1, 2)

    assert_matches_torch(m, ref)


def test_reshape_and_pad():
    m = Model({}, [Node("g", "global_avg_pool", ["x"], "g", {"keepdims": False}),
                   Node("r", "reshape", ["g"], "r", {"shape": [-1, 1, 1]}),
                   Node("m", "mul", ["x", "r"], "m"),
                   Node("p", "pad", ["m"], "y", {"padding": [1, 0, 2, 3], "value": 0.5})], "x", (4, 5, 6))
    assert m.nodes[1].attrs["shape"] == [4, 1, 1] and m.shapes["y"] == (4, 6, 11)
    assert_matches_torch(m, lambda x: F.pad(x * x.mean((2, 3)).reshape(-1, 4, 1, 1), (2, 3, 1, 0), value=0.5))
    with pytest.raises(GraphError, match="reshape"):
        Model({}, [Node("r", "reshape", ["x"], "y", {"shape": [7, -1]})], "x", (4, 5, 6))
    with pytest.raises(GraphError, match="perm"):
        Model({}, [Node("r", "permute", ["x"], "y", {"perm": [1, 0, 2, 3]})], "x", (4, 5, 6))


@settings(max_examples=60, deadline=None)
@given(kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       pad=st.tuples(*[st.integers(0, 2)] * 4), h=st.integers(4, 9), w=st.integers(4, 9), seed=st.integers(0, 99))
def test_max_pool2d_against_loops(kh, kw, sh, sw, pad, h, w, seed):
    """max_pool2d against a plain loop over the output positions of the -inf-padded input
    (the kernel takes the running maximum of strided shifts, not a window reduction)."""
    from udfc_ref.forward import max_pool2d

    assume(h + pad[0] + pad[1] >= kh and w + pad[2] + pad[3] >= kw)
    x = np.random.default_rng(seed).normal(size=(2, 3, h, w)).astype(np.float32)
    x[0, 1, 0, 0] = np.nan  # NaN propagates, as in a reduction
    xp = np.full((2, 3, h + pad[0] + pad[1], w + pad[2] + pad[3]), -np.inf, np.float32)
    xp[:, :, pad[0]: pad[0] + h, pad[2]: pad[2] + w] = x
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    want = np.empty((2, 3, ho, wo), np.float32)
    for i in range(ho):
        for j in range(wo):
            win = xp[:, :, i * sh: i * sh + kh, j * sw: j * sw + kw].reshape(2, 3, -1)
            want[:, :, i, j] = np.where(np.isnan(win).any(-1), np.nan, np.max(np.where(np.isnan(win), -np.inf, win), -1))
    got = max_pool2d(x, (kh, kw), (sh, sw), pad)
    assert got.dtype == x.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
