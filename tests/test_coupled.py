"""Pruning coupled channel groups (``prune_coupled=True``, derivation section 11).

Exact cases like the pair tests of ``test_compress.py``: a channel of a
residual stream / of a concat input that is a positive multiple of another
channel of the same value is rebuilt exactly (alpha = 0), dropping it is not.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import bn_params, resnet_block

from udfc_ref import Model, Node, compress, load, save

X = np.random.default_rng(11).standard_normal((16, 3, 8, 8)).astype(np.float32)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_multiple(m, conv, bn, j, k, c, lam):
    """Make channel ``j`` of ``bn(conv(.))`` exactly ``lam`` x channel ``k``
    (filter ``c`` x, BN statistics consistent, eps 0)."""
    t = m.tensors
    m.node(bn).attrs["eps"] = 0.0
    t[f"{conv}.weight"][j] = c * t[f"{conv}.weight"][k]
    t[f"{bn}.running_var"][j] = c * c * t[f"{bn}.running_var"][k]
    t[f"{bn}.running_mean"][j] = c * t[f"{bn}.running_mean"][k]
    t[f"{bn}.weight"][j] = lam * t[f"{bn}.weight"][k]
    t[f"{bn}.bias"][j] = lam * t[f"{bn}.bias"][k]


def test_residual_stream_positive_multiple_is_rebuilt_exactly():
    """Channel 3 of the residual stream is 0.7 x channel 5 in both branches
    (stem and b.conv2): the stream, its ReLU and its global pool keep the
    ratio, so both readers (b.conv1, fc) rebuild it exactly from channel 5."""
    m = resnet_block(0)
    make_multiple(m, "stem", "stem_bn", 3, 5, 0.2, 0.7)
    make_multiple(m, "b.conv2", "b.bn2", 3, 5, 0.3, 0.7)
    y = m.forward(X)
    with pytest.warns(UserWarning, match="pruned no channel.*--prune-coupled"):
        off, _ = compress(m, prune_ratio=0.125, alpha1=0.0, alpha2=0.0, skip=["b.conv1"])
    assert off.tensors["stem.weight"].shape[0] == 8  # the paper's protocol: coupled channels stay
    res = {}
    for method in ("none", "udfc"):
        small, rep = compress(m, prune_ratio=0.125, method=method, alpha1=0.0, alpha2=0.0, skip=["b.conv1"],
                              prune_coupled=True)
        rec = small.record["layers"]
        assert rec["stem"]["kept"] == rec["b.conv2"]["kept"] == [0, 1, 2, 4, 5, 6, 7]
        assert rec["b.conv2"]["group"] == "stem" and small.record["prune_coupled"] is True
        for key in ("stem.weight", "b.conv2.weight", "stem_bn.running_var", "b.bn2.weight"):
            assert small.tensors[key].shape[0] == 7
        assert small.tensors["b.conv1.weight"].shape[1] == 7 and small.tensors["fc.weight"].shape == (4, 7)
        res[method] = rel(small.forward(X), y)
        lead = {r.layer: r for r in rep.layers}["stem"]
        assert lead.ratio == 0.125 and lead.error_after is not None
    assert res["udfc"] <= 1e-5
    assert res["none"] > 1e-2


def dense_net(seed=0, c0=6, growth=4, hw=8) -> Model:
    """DenseNet-like: stem conv-BN-ReLU (x0), a residual conv-BN added to x0
    (r), a dense layer conv-BN-ReLU on r (h1), concat [r, h1] read by a 1x1
    conv-BN-ReLU (the transition), a second concat [r, h1, transition output]
    read by the global pool and the classifier."""
    rng = np.random.default_rng(seed)
    t, nodes = {}, []

    def cbr(name, inp, cin, cout, k=3, relu=True):
        t[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (k * k * cin))).astype(np.float32)
        nodes.append(Node(name, "conv2d", [inp], name, {"padding": k // 2}, {"weight": f"{name}.weight"}))
        nodes.append(Node(f"{name}_bn", "batch_norm", [name], f"{name}_bn", {"eps": 1e-5},
                          bn_params(rng, cout, f"{name}_bn", t)))
        if not relu:
            return f"{name}_bn"
        nodes.append(Node(f"{name}_relu", "relu", [f"{name}_bn"], f"{name}_relu"))
        return f"{name}_relu"

    x0 = cbr("stem", "x", 3, c0)
    b = cbr("res", x0, c0, c0, relu=False)
    nodes.append(Node("add", "add", [b, x0], "add"))
    h1 = cbr("dense1", "add", c0, growth)
    nodes.append(Node("cat1", "concat", ["add", h1], "cat1", {"axis": 1}))
    tr = cbr("trans", "cat1", c0 + growth, growth, k=1)
    nodes.append(Node("cat2", "concat", ["add", h1, tr], "cat2", {"axis": 1}))
    nodes.append(Node("gap", "global_avg_pool", ["cat2"], "gap"))
    nodes.append(Node("flat", "flatten", ["gap"], "flat"))
    n = c0 + 2 * growth
    t["fc.weight"] = (rng.standard_normal((5, n)) / np.sqrt(n)).astype(np.float32)
    t["fc.bias"] = np.zeros(5, np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight", "bias": "fc.bias"}))
    return Model(t, nodes, "x", (3, hw, hw))


def test_concat_input_positive_multiple_is_rebuilt_exactly():
    """Channel 2 of the dense layer's output is 0.6 x its channel 0: it is
    pruned from both concats, and the transition conv and the classifier
    (which read it at different offsets) rebuild it exactly."""
    m = dense_net(1)
    make_multiple(m, "dense1", "dense1_bn", 2, 0, 0.2, 0.6)
    y = m.forward(X)
    skip = ["stem", "res", "trans"]
    res = {}
    for method in ("none", "udfc"):
        small, _ = compress(m, prune_ratio=0.25, method=method, alpha1=0.0, alpha2=0.0, skip=skip,
                            prune_coupled=True)
        assert small.record["layers"]["dense1"]["kept"] == [0, 1, 3]
        assert small.tensors["trans.weight"].shape[1] == 6 + 3 and small.tensors["fc.weight"].shape[1] == 6 + 3 + 4
        res[method] = rel(small.forward(X), y)
    assert res["udfc"] <= 1e-5
    assert res["none"] > 1e-2


def test_groups_of_a_dense_net():
    """The residual stream (stem, res) is one group read at three places,
    each concat input its own group; the groups the default leaves alone
    are pruned with prune_coupled, and the output is finite and close."""
    m = dense_net(2)
    small, rep = compress(m, prune_ratio=0.5, prune_coupled=True)
    rec = small.record["layers"]
    assert rec["res"]["group"] == "stem" and rec["stem"]["kept"] == rec["res"]["kept"]
    assert {k: v["channels_after"] for k, v in rec.items()} == {"stem": 3, "res": 3, "dense1": 2, "trans": 2}
    assert small.tensors["fc.weight"].shape == (5, 3 + 2 + 2)
    assert rep.flops_after < 0.45 * rep.flops_before
    with pytest.warns(UserWarning, match="coupled"):
        base, _ = compress(m, prune_ratio=0.5)
    assert "stem" not in base.record["layers"]


@pytest.mark.parametrize("bits", [None, 6])
def test_dense_net_loads_back_in_torch_and_keras(tmp_path, bits):
    """A residual + concat net pruned with prune_coupled (and quantized):
    the .safetensors, the torch.export program and the .keras file all match
    the NumPy forward of the compressed model."""
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    from converters.keras import save_keras
    from converters.torch import save_pt2

    m = dense_net(3)
    small, _ = compress(m, prune_ratio=0.3, weight_bits=bits, prune_coupled=True)
    assert small.tensors["stem.weight"].shape[0] < 6 and small.tensors["dense1.weight"].shape[0] < 4
    y = small.forward(X)
    save(small, tmp_path / "s.safetensors")
    assert np.array_equal(load(tmp_path / "s.safetensors").forward(X), y)
    save_pt2(small, tmp_path / "s.pt2")
    prog = torch.export.load(str(tmp_path / "s.pt2")).module()
    with torch.no_grad():
        yt = prog(torch.from_numpy(X)).numpy()
    assert rel(yt, y) <= 1e-4
    save_keras(small, tmp_path / "s.keras")
    km = keras.saving.load_model(tmp_path / "s.keras")
    yk = np.asarray(km.predict(X.transpose(0, 2, 3, 1), verbose=0))
    assert rel(yk, y) <= 1e-4
    assert km.count_params() == small.param_count()


def test_cli_prune_coupled(tmp_path, capsys):
    from udfc_ref.cli import main

    src = tmp_path / "d.safetensors"
    save(dense_net(4), src)
    out = tmp_path / "o.safetensors"
    assert main(["compress", str(src), str(out), "--prune-ratio", "0.5", "--prune-coupled"]) == 0
    assert "channel group" in capsys.readouterr().out
    back = load(out)
    assert back.record["prune_coupled"] is True and back.record["layers"]["res"]["group"] == "stem"
    assert back.flops() < 0.45 * load(src).flops()


def grouped_net(seed=0, c=8, groups=2, hw=8) -> Model:
    """conv-BN-ReLU (p) read by a grouped 3x3 conv (2 groups) -BN-ReLU, global
    pool, classifier: p's channels must lose the same count in each half."""
    rng = np.random.default_rng(seed)
    t, nodes = {}, []
    t["p.weight"] = (rng.standard_normal((c, 3, 3, 3)) * np.sqrt(2 / 27)).astype(np.float32)
    nodes.append(Node("p", "conv2d", ["x"], "p", {"padding": 1}, {"weight": "p.weight"}))
    nodes.append(Node("p_bn", "batch_norm", ["p"], "p_bn", {"eps": 1e-5}, bn_params(rng, c, "p_bn", t)))
    nodes.append(Node("p_relu", "relu", ["p_bn"], "p_relu"))
    cg = c // groups
    t["g.weight"] = (rng.standard_normal((c, cg, 3, 3)) * np.sqrt(2 / (9 * cg))).astype(np.float32)
    nodes.append(Node("g", "conv2d", ["p_relu"], "g", {"padding": 1, "groups": groups}, {"weight": "g.weight"}))
    nodes.append(Node("g_bn", "batch_norm", ["g"], "g_bn", {"eps": 1e-5}, bn_params(rng, c, "g_bn", t)))
    nodes.append(Node("g_relu", "relu", ["g_bn"], "g_relu"))
    nodes.append(Node("gap", "global_avg_pool", ["g_relu"], "gap"))
    nodes.append(Node("flat", "flatten", ["gap"], "flat"))
    t["fc.weight"] = (rng.standard_normal((5, c)) / np.sqrt(c)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight"}))
    return Model(t, nodes, "x", (3, hw, hw))


def test_grouped_consumer_rebuilds_within_each_group_exactly():
    """Eq. G4: channel 3 is 0.6 x channel 1 (group 0) and channel 6 is 0.5 x
    channel 4 (group 1): one channel goes from each half, each is rebuilt from
    its own half (block-diagonal T), exactly; the grouped conv keeps 2 groups."""
    m = grouped_net(1)
    make_multiple(m, "p", "p_bn", 3, 1, 0.1, 0.6)
    make_multiple(m, "p", "p_bn", 6, 4, 0.1, 0.5)
    y = m.forward(X)
    res = {}
    for method in ("none", "udfc"):
        small, _ = compress(m, prune_ratio=0.25, method=method, alpha1=0.0, alpha2=0.0, skip=["g"],
                            prune_coupled=True)
        assert small.record["layers"]["p"]["kept"] == [0, 1, 2, 4, 5, 7]
        assert small.record["layers"]["p"]["group"] == "p"  # a coupled group (not a pair: g is grouped)
        assert small.tensors["g.weight"].shape == (8, 3, 3, 3) and small.node("g").attrs["groups"] == 2
        res[method] = rel(small.forward(X), y)
    assert res["udfc"] <= 1e-5
    assert res["none"] > 1e-2


def test_embedded_error_of_a_grouped_producer_with_pruned_inputs_written_out():
    """Eq. D4 for a grouped producer whose inputs a coupled group pruned:
    each kept output's quantization error lands at the original index of the
    kept input of its own group.  Written out by hand: 4 outputs, 4 inputs,
    2 groups (inputs {0,1} and {2,3}); inputs 0 and 2 kept, outputs 1 and 2 kept."""
    from udfc_ref.compression import _embedded_filters

    rng = np.random.default_rng(0)
    Wd = rng.standard_normal((4, 4, 9))  # the dense (O, C, R) layout of the original grouped filters
    eps = rng.standard_normal((2, 1, 9))  # stored layout (kept outputs, inputs per group, R)
    got = _embedded_filters(Wd, np.array([1, 2]), eps, np.array([0, 2]), groups=2)
    want = Wd[[1, 2]].copy()
    want[0, 0] += eps[0, 0]  # output 1 is in group 0, whose kept input is channel 0
    want[1, 2] += eps[1, 0]  # output 2 is in group 1, whose kept input is channel 2
    assert np.array_equal(got, want)
    # without pruned inputs: the group's own columns
    eps2 = rng.standard_normal((2, 2, 9))
    got = _embedded_filters(Wd, np.array([1, 2]), eps2, None, groups=2)
    want = Wd[[1, 2]].copy()
    want[0, 0:2] += eps2[0]
    want[1, 2:4] += eps2[1]
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bits", [None, 6])
def test_prune_coupled_on_a_regnet_block(bits):
    """A RegNet block (its grouped conv reads a coupled group): prune_coupled
    prunes the same count in every group of the grouped conv's input, and
    the compressed model runs; udfc rebuilds better than dropping."""
    from modern_blocks import regnet_net

    m = regnet_net()
    x = np.random.default_rng(1).standard_normal((16,) + m.input_shape).astype(np.float32)
    y0 = m.forward(x)
    errs = {}
    for method in ("udfc", "none"):
        small, _ = compress(m, prune_ratio=0.3, weight_bits=bits, prune_coupled=True, method=method)
        assert small.flops() < compress(m, prune_ratio=0.3, weight_bits=bits)[0].flops()
        b = small.node("b")
        cin = small.tensors[b.params["weight"]].shape[1] * b.attrs["groups"]
        assert cin == small.tensors[small.node("a").params["weight"]].shape[0]
        errs[method] = rel(small.forward(x), y0)
    assert np.isfinite(errs["udfc"]) and errs["udfc"] < errs["none"], errs
