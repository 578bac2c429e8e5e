"""Compression on graphs with the modern ops: squeeze-excitation gates
(EfficientNet, MobileNetV3), grouped producers (RegNet), every pointwise
activation, the layout ops, and the warning when nothing can be pruned."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import bn_params
from modern_blocks import Builder, mbconv_net, regnet_net

from udfc_ref import Model, Node, compress, load, save
from udfc_ref.datamodel import DataModel
from udfc_ref.pairs import find_pairs

X = np.random.default_rng(7).standard_normal((64, 3, 8, 8)).astype(np.float32)


def rel(a, b):
    """Relative RMS difference of two outputs."""
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


def duplicate(m, src, dst, keys, lam=1.0, scale_keys=()):
    """Make channel ``dst`` a copy of ``src`` in every tensor of ``keys`` (rows),
    times ``lam`` in ``scale_keys``."""
    for k in keys:
        m.tensors[k][dst] = m.tensors[k][src] * (lam if k in scale_keys else 1.0)


BLOCK_KEYS = ("expand.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "dw.weight",
              "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var")


@pytest.mark.parametrize("act,gate,style,lam", [
    ("silu", "sigmoid", "conv", 1.0),            # EfficientNet
    ("hardswish", "hardsigmoid", "keras_hard", 1.0),  # MobileNetV3 as Keras writes the gate
    ("relu", "hardsigmoid", "linear", 0.5),      # MobileNetV3 ReLU block, SE on linear layers; positive multiple
    ("gelu", "sigmoid", "conv", 1.0),
])
def test_se_channel_that_duplicates_a_kept_one_is_rebuilt_exactly(act, gate, style, lam):
    """Channel 1 of the expand/depthwise chain is ``lam`` x channel 5 after the
    activation (``lam`` != 1 only through the positively homogeneous ReLU) and
    has the same gate (same excite row): pruning it with udfc (alpha = 0) gives
    the original network up to float rounding -- through the gate (T_y) and
    through the squeeze (T_a) -- while dropping it does not."""
    m = mbconv_net(1, act=act, gate=gate, se_style=style)
    t = m.tensors
    duplicate(m, 5, 1, BLOCK_KEYS + ("se.excite.weight",) + (("se.excite.bias",) if "se.excite.bias" in t else ()),
              lam, ("bn2.weight", "bn2.bias"))
    t["expand.weight"][[1, 5]] *= 1e-2  # the two lowest L1 norms: the lower index (1) is pruned
    t["bn1.running_var"][[1, 5]] *= 1e-4
    y = m.forward(X)
    small, rep = compress(m, prune_ratio=0.08, method="udfc", alpha1=0.0, alpha2=0.0, skip=["project"])
    rec = small.record["layers"]["expand"]
    assert rec["kept"] == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] and rec["se"]["excite"] == "se.excite"
    assert small.tensors["se.excite.weight"].shape[0] == 11 and small.tensors["se.squeeze.weight"].shape[1] == 11
    assert rel(small.forward(X), y) <= 1e-5
    dropped, _ = compress(m, prune_ratio=0.08, method="none", skip=["project"])
    assert rel(dropped.forward(X), y) > 1e-3


@pytest.mark.parametrize("kind", ["efficientnet", "mobilenetv3", "mobilenetv3_keras", "keras_tf_pad"])
def test_se_pruning_is_valid_and_closer_than_baselines(kind, tmp_path):
    """Random MBConv nets with SE at 30 % pruning + 6 bits: the compressed network
    is valid (shapes, file round trip), every SE part shrinks with its channels,
    and the udfc output is closer to the original than none and nm."""
    kw = {"efficientnet": {}, "mobilenetv3": {"act": "hardswish", "gate": "hardsigmoid", "se_style": "linear"},
          "mobilenetv3_keras": {"act": "hardswish", "gate": "hardsigmoid", "se_style": "keras_hard"},
          "keras_tf_pad": {"tf_pad": True}}[kind]
    m = mbconv_net(2, hidden=16, **kw)
    y = m.forward(X)
    err = {}
    for method in ("none", "nm", "udfc"):
        small, rep = compress(m, prune_ratio=0.3, weight_bits=6, method=method)
        n = len(small.record["layers"]["expand"]["kept"])
        assert n == 11
        assert small.tensors["dw.weight"].shape == (n, 1, 3, 3) and small.node("dw").attrs["groups"] == n
        assert small.record["layers"]["expand"]["depthwise"] == "dw"
        assert small.tensors["se.squeeze.weight"].shape[1] == n and small.tensors["se.excite.weight"].shape[0] == n
        assert small.tensors["se.excite.bias"].shape == (n,)
        if kind == "mobilenetv3_keras":  # the per-channel affines of the gate shrink too
            for a in ("se.plus3", "se.div6"):
                assert all(small.tensors[k].shape == (n,) for k in small.node(a).params.values())
        if kind == "mobilenetv3":
            assert small.node("se.reshape").attrs["shape"] == [n, 1, 1]
        notes = {r.layer: r.note for r in rep.layers}
        assert "excite of the SE gate" in notes["se.excite"]
        p = tmp_path / f"{method}.safetensors"
        save(small, p)
        assert np.array_equal(load(p).forward(X), small.forward(X))
        err[method] = rel(small.forward(X), y)
    assert err["udfc"] < err["none"] and err["udfc"] < err["nm"], err
    assert err["udfc"] < 0.7 * err["none"], err


def test_grouped_producer_prunes_the_same_count_per_group_and_is_exact_for_duplicates():
    """RegNet block: the grouped 3x3 conv b (2 groups of 4) is the prunable
    producer; one channel is removed in each group and the layer keeps its 2
    groups.  Channel 1 is 0.01 x channel 2 and channel 6 is 0.01 x channel 5
    (same group, matching BN: equal BN outputs), so udfc (alpha = 0) rebuilds
    both exactly; dropping them does not."""
    m = regnet_net(3, width=8, group_width=4)
    t = m.tensors
    m.node("b_bn").attrs["eps"] = 0.0
    for dst, src in ((1, 2), (6, 5)):
        t["b.weight"][dst] = 0.01 * t["b.weight"][src]
        t["b_bn.running_var"][dst] = 1e-4 * t["b_bn.running_var"][src]
        t["b_bn.running_mean"][dst] = 0.01 * t["b_bn.running_mean"][src]
        for r in ("weight", "bias"):
            t[f"b_bn.{r}"][dst] = t[f"b_bn.{r}"][src]
    pairs, skipped = find_pairs(m)
    assert [(p.name, p.groups) for p in pairs] == [("b", 2)]
    assert "grouped conv 'b'" in skipped["a"] and "residual add" in skipped["c"]
    y = m.forward(X)
    small, rep = compress(m, prune_ratio=0.25, method="udfc", alpha1=0.0, alpha2=0.0)
    rec = small.record["layers"]["b"]
    assert rec["kept"] == [0, 2, 3, 4, 5, 7] and rec["groups"] == 2
    assert small.tensors["b.weight"].shape == (6, 4, 3, 3) and small.node("b").attrs["groups"] == 2
    assert small.tensors["c.weight"].shape == (8, 6, 1, 1)
    assert rel(small.forward(X), y) <= 1e-5
    dropped, _ = compress(m, prune_ratio=0.25, method="none")
    assert rel(dropped.forward(X), y) > 1e-3


@pytest.mark.parametrize("se", [False, True])
def test_regnet_x_and_y_prune_channels(se):
    """RegNet X and Y (grouped conv + SE) blocks at 30 % + 6 bits: the grouped
    conv is pruned (per group), quantization everywhere, udfc closer than none."""
    m = regnet_net(4, width=16, group_width=4, se=se)
    y = m.forward(X)
    err = {}
    for method in ("none", "udfc"):
        small, rep = compress(m, prune_ratio=0.3, weight_bits=6, method=method)
        assert small.record["layers"]["b"]["channels_after"] == 12  # round(0.3 * 4) = 1 per group, 4 groups
        assert set(small.record["quantized"]) == {n.name for n in m.nodes if n.op in ("conv2d", "linear")}
        err[method] = rel(small.forward(X), y)
    assert err["udfc"] < err["none"], err


def vgg_no_bn(seed=0):
    b = Builder(seed, (3, 8, 8))
    b.conv("c0", 3, 8, k=3, bias=True)
    b.act("a0", "relu")
    b.conv("c1", 8, 8, k=3, bias=True)
    b.act("a1", "relu")
    b.add("flat", "flatten")
    b.linear("fc", 8 * 64, 5)
    return b.model()


def test_warning_when_a_requested_pruning_prunes_nothing():
    m = vgg_no_bn()
    with pytest.warns(UserWarning) as rec:
        small, _ = compress(m, prune_ratio=0.3)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert msg.startswith("prune ratio 0.3 pruned no channel") and "BatchNorm" in msg and "unchanged" in msg
    assert np.array_equal(small.forward(X), m.forward(X))
    with pytest.warns(UserWarning, match="only the weights were quantized"):
        compress(m, prune_ratio=0.5, weight_bits=6)
    # a ratio too small for every layer
    with pytest.warns(UserWarning, match=r"round\(ratio x channels\) is 0 .* 12 channels"):
        compress(mbconv_net(0), prune_ratio=0.01)
    # no warning when something is pruned, or when no pruning was asked for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress(m, prune_ratio=0.0, weight_bits=6)
        compress(mbconv_net(0), prune_ratio=0.3)


def all_ops_net(seed=5):
    """Every op of the IR in one graph: pad, affine (Keras Rescaling), conv/BN
    with each activation, SE, reshape, a ConvNeXt-style channels-last block
    (permute, layer_norm, linear on the last axis, gelu, layer scale), concat,
    add, pools, softmax head."""
    b = Builder(seed, (3, 8, 8))
    b.add("rescale", "affine", ["x"], {"axis": 1}, {"weight": b.tensor("rescale.w", [0.5, 1.0, 2.0]),
                                                    "bias": b.tensor("rescale.b", [0.1, 0.0, -0.1])})
    b.add("pad", "pad", None, {"padding": [1, 1, 1, 1], "value": 0.0})
    b.conv("stem", 3, 8, k=3)
    b.bn("stem_bn", 8)
    b.act("stem_act", "hardswish")
    b.add("crop", "max_pool2d", None, {"kernel": 3, "stride": 1})  # 10x10 -> 8x8
    branches = []
    for i, act in enumerate(("relu", "relu6", "sigmoid", "silu", "hardsigmoid", "gelu", "gelu_tanh", "identity")):
        b.conv(f"br{i}", 8, 4, k=3, inp="crop")
        b.bn(f"br{i}_bn", 4)
        b.act(f"br{i}_act", act)
        branches.append(b.v)
    b.add("cat", "concat", branches, {"axis": 1})
    b.conv("mix", 32, 16)
    b.bn("mix_bn", 16)
    b.act("mix_act", "silu")
    b.se("se", 16, 4)
    b.conv("mix2", 16, 16)
    b.bn("mix2_bn", 16)
    # ConvNeXt-style block: dw 3x3 -> permute to channels-last -> layer norm -> linear -> gelu -> linear
    # -> layer scale -> permute back -> + input
    res = b.v
    b.conv("cx.dw", 16, 16, k=3, groups=16, bias=True)
    b.add("cx.perm", "permute", None, {"perm": [0, 2, 3, 1]})
    b.add("cx.ln", "layer_norm", None, {"axis": -1, "eps": 1e-6},
          {"weight": b.tensor("cx.ln.w", np.ones(16)), "bias": b.tensor("cx.ln.b", np.zeros(16))})
    b.linear("cx.pw1", 16, 32)
    b.act("cx.gelu", "gelu")
    b.linear("cx.pw2", 32, 16)
    b.add("cx.scale", "affine", None, {"axis": -1}, {"weight": b.tensor("cx.scale.w", np.full(16, 0.5))})
    b.add("cx.back", "permute", None, {"perm": [0, 3, 1, 2]})
    b.add("cx.add", "add", [res, b.v])
    b.conv("head", 16, 24)
    b.bn("head_bn", 24)
    b.act("head_act", "relu")
    b.add("pool", "avg_pool2d", None, {"kernel": 2})
    b.add("gap", "global_avg_pool", None, {"keepdims": True})
    b.add("flat", "reshape", None, {"shape": [24]})
    b.linear("fc1", 24, 16, bias=False)
    b.add("fc1_bn", "batch_norm", None, {"eps": 1e-5}, bn_params(b.rng, 16, "fc1_bn", b.t))
    b.act("fc1_act", "silu")
    b.linear("fc", 16, 5)
    b.add("prob", "softmax", None, {"axis": 1})
    return b.model()


@pytest.mark.parametrize("method", ["none", "nm", "udfc"])
def test_compress_runs_on_a_graph_with_every_op(method, tmp_path):
    m = all_ops_net()
    dm = DataModel(m)
    assert dm.values["cx.perm"] is None and dm.values["cx.ln"] is None and dm.values["prob"] is None
    assert dm.values["se.mul"] is not None and dm.values["flat"] is not None
    y = m.forward(X)
    small, rep = compress(m, prune_ratio=0.3, weight_bits=6, method=method, bias_correction=True)
    pruned = set(small.record["layers"])
    notes = {r.layer: r.note for r in rep.layers}
    assert {f"br{i}" for i in range(8)}.isdisjoint(pruned)  # they reach the concat
    assert {"stem", "mix", "head", "fc1"} <= pruned
    assert "depthwise" in notes["mix2"] and "residual add" in notes["mix2"] or "cx.dw" in notes["mix2"]
    assert small.record["layers"]["mix"]["se"] == {"squeeze": "se.squeeze", "excite": "se.excite"}
    assert "not followed by a single BatchNorm" in notes["cx.pw1"] and "concat" in notes["br3"]
    assert set(small.record["quantized"]) == {n.name for n in m.nodes if n.op in ("conv2d", "linear")}
    out = small.forward(X)
    assert out.shape == y.shape and np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
    save(small, tmp_path / "s.safetensors")
    assert np.array_equal(load(tmp_path / "s.safetensors").forward(X), out)


def test_data_model_through_new_ops_matches_monte_carlo():
    """A4 through affine (exact), the new activations (M4-M8), reshape (exact)
    and the gate product of independent factors (Eq. D11, exact when
    independent): white input, BN statistics made consistent (A1 exact), then
    400,000 forward samples."""
    rng = np.random.default_rng(11)
    t = {}
    wm = np.zeros((3, 4, 1, 1))
    wm[:, :2, 0, 0] = rng.standard_normal((3, 2))
    wg = np.zeros((3, 4, 1, 1))
    wg[:, 2:, 0, 0] = rng.standard_normal((3, 2))
    t["m.weight"], t["g.weight"] = wm.astype(np.float32), wg.astype(np.float32)
    nodes = [Node("m", "conv2d", ["x"], "m", {}, {"weight": "m.weight"}),
             Node("g", "conv2d", ["x"], "g", {}, {"weight": "g.weight"})]
    for name, w in (("mbn", wm), ("gbn", wg)):
        p = bn_params(rng, 3, name, t)
        t[f"{name}.running_mean"][:] = 0.0
        t[f"{name}.running_var"][:] = (w.reshape(3, -1) ** 2).sum(1)  # the true variance of W x for white x
        nodes.append(Node(name, "batch_norm", [name[0]], name, {"eps": 0.0}, p))
    t["aff.w"] = np.array([1.5, -0.5, 2.0], np.float32)
    t["aff.b"] = np.array([0.3, 0.0, -1.0], np.float32)
    nodes += [Node("mact", "silu", ["mbn"], "mact"), Node("gact", "hardsigmoid", ["gbn"], "gact"),
              Node("aff", "affine", ["mact"], "aff", {"axis": 1}, {"weight": "aff.w", "bias": "aff.b"}),
              Node("mul", "mul", ["aff", "gact"], "mul"), Node("r", "reshape", ["mul"], "r", {"shape": [3]}),
              Node("gelu", "gelu", ["r"], "y", {"approximate": "tanh"})]
    model = Model(t, nodes, "x", (4, 1, 1))
    dm = DataModel(model)
    x = rng.standard_normal((400_000, 4, 1, 1)).astype(np.float64)
    vals = model.forward(x, return_values=True)
    for v in ("mact", "gact", "aff", "mul", "r"):
        s = vals[v].reshape(x.shape[0], 3)
        st = dm.values[v]
        se = s.std(0) / np.sqrt(x.shape[0])
        assert np.all(np.abs(st.mean - s.mean(0)) <= 5 * se + 1e-9), v
        c = np.cov(s.T)
        sd = np.sqrt(np.outer(np.diag(c), np.diag(c)))
        assert np.all(np.abs(st.cov - c) <= 0.02 * sd + 1e-9), (v, st.cov, c)


def test_select_kept_grouped_prunes_equally_in_every_group():
    from udfc_ref.select import select_kept_grouped

    scores = np.array([5.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0, 0.5, 4.0, 4.0, 4.0, 4.0])
    kept = select_kept_grouped(scores, 0.25, 3)  # 3 groups of 4: one pruned in each, lowest score first
    np.testing.assert_array_equal(kept, [0, 2, 3, 4, 5, 6, 9, 10, 11])  # ties: the lower index (8) goes
    gamma = np.ones(12)
    gamma[[4, 5]] = 0.0  # two dead channels in group 1: two pruned in every group
    kept = select_kept_grouped(scores, 0.25, 3, gamma=gamma)
    np.testing.assert_array_equal(kept, [0, 2, 6, 7, 10, 11])
    assert select_kept_grouped(scores, 0.9, 3, min_keep=6).size == 6  # at least ceil(6/3) per group
    np.testing.assert_array_equal(select_kept_grouped(scores, 0.0, 3, gamma=gamma), np.arange(12))


def test_separable_conv_chain_without_bn_after_the_depthwise():
    """Xception's separable conv: conv -> BN -> ReLU -> depthwise (no BN) -> pointwise.
    The depthwise channel goes with its producer channel; a duplicate channel
    is rebuilt exactly (alpha = 0), dropping it is not."""
    b = Builder(6, (3, 8, 8))
    b.conv("c0", 3, 8, k=3)
    b.bn("bn0", 8)
    b.act("a0", "relu")
    b.conv("sep.dw", 8, 8, k=3, groups=8)
    b.conv("sep.pw", 8, 6)
    b.bn("bn1", 6)
    b.act("a1", "relu")
    b.add("gap", "global_avg_pool", None, {"keepdims": False})
    b.linear("fc", 6, 5)
    m = b.model()
    t = m.tensors
    for k in ("c0.weight", "bn0.weight", "bn0.bias", "bn0.running_mean", "bn0.running_var", "sep.dw.weight"):
        t[k][2] = t[k][6]
    t["c0.weight"][[2, 6]] *= 1e-2
    t["bn0.running_var"][[2, 6]] *= 1e-4
    pairs, _ = find_pairs(m)
    assert [(p.name, p.dw.name if p.dw else None, p.bn2) for p in pairs] == [("c0", "sep.dw", None),
                                                                              ("sep.pw", None, None)]
    y = m.forward(X)
    small, _ = compress(m, prune_ratio=0.125, method="udfc", alpha1=0.0, alpha2=0.0, skip=["sep.pw"])
    assert small.record["layers"]["c0"]["kept"] == [0, 1, 3, 4, 5, 6, 7]
    assert small.tensors["sep.dw.weight"].shape == (7, 1, 3, 3) and small.tensors["sep.pw.weight"].shape == (6, 7, 1, 1)
    assert rel(small.forward(X), y) <= 1e-5
    dropped, _ = compress(m, prune_ratio=0.125, method="none", skip=["sep.pw"])
    assert rel(dropped.forward(X), y) > 1e-3


def test_depthwise_statistics_equal_the_dense_layout(monkeypatch):
    """The data model's shortcut for depthwise convs (G = C o (W R_s W^T), one-channel
    filters for D3 / D6) gives the statistics of the dense zero-padded layout (D1)."""
    from udfc_ref import datamodel

    for m in (mbconv_net(3, hidden=16), mbconv_net(4, tf_pad=True, act="hardswish", gate="hardsigmoid")):
        fast = DataModel(m)
        monkeypatch.setattr(datamodel, "depthwise_filters", lambda model, node: None)
        dense = DataModel(m)
        monkeypatch.undo()
        for k, v in dense.values.items():
            w = fast.values[k]
            assert (v is None) == (w is None), k
            if v is not None:
                np.testing.assert_allclose(w.mean, v.mean, rtol=1e-12, atol=1e-12 * np.abs(v.mean).max())
                np.testing.assert_allclose(w.cov, v.cov, rtol=1e-12, atol=1e-12 * np.abs(v.cov).max())
                assert (v.rho is None and w.rho is None) or abs(v.rho - w.rho) <= 1e-12, k
