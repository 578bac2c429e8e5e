"""A4 wiring: how ``DataModel`` carries statistics through every op, each
value checked against the rule of derivation A4 written out here from the
upstream value (sums, block diagonals, the BN marginals, D8'), and the D2/D3
layout of grouped convs, non-square kernels and a linear layer after a
flatten against covariances computed tap by tap."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import bn_params

from udfc_ref import Model, Node
from udfc_ref.datamodel import DataModel, InputModel, dense_filters, spatial_positions
from udfc_ref.quantize import fake_quantize, quantize


def _conv(t, rng, name, inp, cin, cout, k=3, **attrs):
    t[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    params = {"weight": f"{name}.weight"}
    if attrs.pop("bias", False):
        t[f"{name}.bias"] = rng.normal(0, 1, cout).astype(np.float32)
        params["bias"] = f"{name}.bias"
    return Node(name, "conv2d", [inp], name, {"padding": k // 2, **attrs}, params)


def every_op_model(seed=0):
    rng = np.random.default_rng(seed)
    t = {}

    def bn(name, inp, c):
        return Node(name, "batch_norm", [inp], name, {"eps": 1e-5}, bn_params(rng, c, name, t))

    nodes = [
        Node("p_in", "avg_pool2d", ["x"], "p_in", {"kernel": 2}),  # right after the input: rho unknown
        _conv(t, rng, "c0", "p_in", 3, 4, bias=True),  # no BN after it: no D3 calibration
        Node("r0", "relu", ["c0"], "r0"),
        _conv(t, rng, "c1", "r0", 4, 6), bn("b1", "c1", 6), Node("r1", "relu", ["b1"], "r1"),
        Node("id", "identity", ["r1"], "id"),
        Node("mp", "max_pool2d", ["id"], "mp", {"kernel": 2}),
        _conv(t, rng, "ca", "mp", 6, 5), bn("ba", "ca", 5),
        _conv(t, rng, "cb", "mp", 6, 5), bn("bb", "cb", 5),
        Node("add", "add", ["ba", "bb"], "add"),
        Node("r2", "relu", ["add"], "r2"),
        Node("cat", "concat", ["r2", "mp"], "cat"),
        Node("gap", "global_avg_pool", ["cat"], "gap", {"keepdims": True}),
        Node("flat", "flatten", ["gap"], "flat"),
        bn("b3", "flat", 11),
        Node("r3", "relu", ["b3"], "r3"),
    ]
    t["fc.weight"] = rng.standard_normal((4, 11)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["r3"], "y", {}, {"weight": "fc.weight"}))
    return Model(t, nodes, "x", (3, 16, 16))


def test_a4_every_op_follows_its_rule():
    m = every_op_model()
    dm = DataModel(m)
    v, t = dm.values, m.tensors
    same = lambda a, b: np.array_equal(a.mean, b.mean) and np.array_equal(a.cov, b.cov)  # noqa: E731
    # a pool right after the (white, rho unknown) input keeps everything, rho stays unknown
    assert same(v["p_in"], v["x"]) and v["p_in"].rho is None and np.array_equal(v["x"].cov, np.eye(3))
    # conv with a bias on a white input, no BN after it: rho_s = 0 (nothing to calibrate on),
    # mean = bias, covariance = W W^T over all taps
    assert dm.inputs["c0"].rho_s == 0.0
    w0 = t["c0.weight"].astype(np.float64).reshape(4, -1)
    assert np.allclose(v["c0"].mean, t["c0.bias"], atol=1e-7) and np.allclose(v["c0"].cov, w0 @ w0.T, atol=1e-12)
    # a BN output: mean beta, variance gamma^2, the input's correlation (A1, A4)
    g1 = t["b1.weight"].astype(np.float64)
    c = v["c1"].cov
    corr = c / np.sqrt(np.outer(np.diag(c), np.diag(c)))
    assert np.allclose(v["b1"].mean, t["b1.bias"]) and np.allclose(v["b1"].cov, corr * np.outer(g1, g1), atol=1e-12)
    assert v["b1"].rho == v["c1"].rho
    # identity keeps everything; a max pool keeps mean and covariance and maps rho -> rho^s (D8')
    assert same(v["id"], v["r1"]) and v["id"].rho == v["r1"].rho
    assert same(v["mp"], v["id"]) and v["mp"].rho == pytest.approx(v["id"].rho ** 2, abs=1e-15)
    # add: independent branches, sums; rho weighted by the branches' total variance
    ra, rb = v["ba"], v["bb"]
    assert np.allclose(v["add"].mean, ra.mean + rb.mean) and np.allclose(v["add"].cov, ra.cov + rb.cov)
    wa, wb = np.trace(ra.cov), np.trace(rb.cov)
    assert v["add"].rho == pytest.approx((wa * ra.rho + wb * rb.rho) / (wa + wb), abs=1e-15)
    # concat: stacked means, block-diagonal covariance
    r2, mp = v["r2"], v["mp"]
    assert np.allclose(v["cat"].mean, np.concatenate([r2.mean, mp.mean]))
    blk = np.zeros((11, 11))
    blk[:5, :5], blk[5:, 5:] = r2.cov, mp.cov
    assert np.allclose(v["cat"].cov, blk)
    assert v["cat"].rho == pytest.approx((np.trace(r2.cov) * r2.rho + np.trace(mp.cov) * mp.rho)
                                         / (np.trace(r2.cov) + np.trace(mp.cov)), abs=1e-15)
    # global pool: same channel statistics, no spatial correlation; a flatten of the (C, 1, 1)
    # map it gives is a relabelling: everything kept (derivation, the reshape/flatten rule)
    assert same(v["gap"], v["cat"]) and v["gap"].rho is None
    assert same(v["flat"], v["gap"]) and v["flat"].rho is None
    # a BN on that value: mean beta, the input's correlation scaled by gamma (A1, A4), rho still unknown
    g3 = t["b3.weight"].astype(np.float64)
    c = v["flat"].cov
    corr = c / np.sqrt(np.outer(np.diag(c), np.diag(c)))
    assert np.allclose(v["b3"].mean, t["b3.bias"]) and np.allclose(v["b3"].cov, corr * np.outer(g3, g3), atol=1e-12)
    assert v["b3"].rho is None
    assert dm.inputs["fc"].pos.shape == (1, 2) and np.array_equal(dm.inputs["fc"].mean_c, v["r3"].mean)


def _exact_cov(f1, f2, pos, rho):
    """F1 Sigma_x F2^T for a white-channel field of correlation
    rho^(|dy| + |dx|), tap by tap."""
    d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)
    return np.einsum("ncp,mcq,pq->nm", f1, f2, rho**d)


def test_d2_d3_for_a_linear_layer_after_a_flatten():
    """A linear layer reading a flattened 3 x 5 map: its inputs are the map's
    H*W positions (row-major) per channel; D3 recovers the input's rho from
    the BN variances, and D2 gives its output covariance."""
    rng = np.random.default_rng(1)
    rho = 0.55
    t = {"fc1.weight": rng.standard_normal((6, 2 * 15)).astype(np.float32) + 0.5}
    pos = np.stack(np.meshgrid(np.arange(3), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
    f = t["fc1.weight"].astype(np.float64).reshape(6, 2, 15)
    bn = bn_params(rng, 6, "b", t)
    t["b.running_var"] = np.diag(_exact_cov(f, f, pos, rho)).astype(np.float64)
    nodes = [Node("flat", "flatten", ["x"], "flat"),
             Node("fc1", "linear", ["flat"], "h", {}, {"weight": "fc1.weight"}),
             Node("b", "batch_norm", ["h"], "z", {"eps": 0.0}, bn), Node("r", "relu", ["z"], "a")]
    t["fc2.weight"] = rng.standard_normal((3, 6)).astype(np.float32)
    nodes.append(Node("fc2", "linear", ["a"], "y", {}, {"weight": "fc2.weight"}))
    m = Model(t, nodes, "x", (2, 3, 5))
    dm = DataModel(m)
    assert np.array_equal(dm.inputs["fc1"].pos, pos)
    assert dm.inputs["fc1"].rho_s == pytest.approx(rho, abs=1e-12)
    assert np.allclose(dm.values["h"].cov, _exact_cov(f, f, pos, rho), rtol=1e-10)


def test_a4_linear_layer_reading_the_network_input():
    """A4: a linear layer reading the network input itself (no producer, no
    flatten) acts on the last axis of the (C, H, W) map: its statistics are
    unknown (None, derivation section 4), and a conv after it takes a white
    input (mean 0, covariance I)."""
    rng = np.random.default_rng(7)
    t = {"fc.weight": rng.standard_normal((4, 3)).astype(np.float32)}  # last axis 3 = channels 3
    nodes = [Node("fc", "linear", ["x"], "h", {}, {"weight": "fc.weight"}),
             _conv(t, rng, "c", "h", 3, 3)]
    dm = DataModel(Model(t, nodes, "x", (3, 6, 3)))
    assert dm.values["h"] is None
    w = dense_filters(Model(t, nodes, "x", (3, 6, 3)), nodes[1])
    im = dm.inputs["c"]
    assert np.array_equal(im.mean_c, np.zeros(3)) and np.array_equal(im.cov_c, np.eye(3))
    assert np.allclose(dm.values["c"].cov, np.einsum("ncp,mcp->nm", w, w), rtol=1e-12)


def test_a1_dead_bn_channel_is_a_constant_through_the_activation():
    """A1 with gamma_i = 0: the BN output is the constant beta_i, so after
    the ReLU channel i has mean relu(beta_i), variance 0 and no covariance
    with the others (no 0/0 in the correlations), and the live channels keep
    their quadrature moments."""
    from mathref import moments_quad

    rng = np.random.default_rng(8)
    t = {}
    bn = bn_params(rng, 4, "b", t)
    t["b.weight"][1] = 0.0
    t["b.bias"][1] = 0.4
    nodes = [_conv(t, rng, "c", "x", 2, 4), Node("b", "batch_norm", ["c"], "z", {"eps": 1e-5}, bn),
             Node("r", "relu", ["z"], "a"), _conv(t, rng, "c2", "a", 4, 3)]
    dm = DataModel(Model(t, nodes, "x", (2, 8, 8)))
    a = dm.values["a"]
    assert np.all(np.isfinite(a.cov)) and np.all(np.isfinite(dm.values["c2"].cov))
    assert a.mean[1] == pytest.approx(0.4, abs=1e-7)
    assert np.all(a.cov[1] == 0) and np.all(a.cov[:, 1] == 0)
    for i in (0, 2, 3):
        m, v = moments_quad(float(t["b.bias"][i]), float(t["b.weight"][i]), "relu")
        assert a.mean[i] == pytest.approx(m, rel=1e-9) and a.cov[i, i] == pytest.approx(v, rel=1e-9)


def test_a4_linear_after_a_flatten_reads_the_maps_statistics():
    """A4/D1: a linear layer after a flatten of a (C, H, W) map that is not
    the network input reads the map's statistics: its output mean is
    sum_c sum_p W[o, c HW + p] E a_c, written out from the upstream value."""
    rng = np.random.default_rng(9)
    t = {}
    nodes = [_conv(t, rng, "c", "x", 2, 3), Node("b", "batch_norm", ["c"], "z", {"eps": 1e-5}, bn_params(rng, 3, "b", t)),
             Node("r", "relu", ["z"], "a"), Node("flat", "flatten", ["a"], "f")]
    t["fc.weight"] = rng.standard_normal((5, 3 * 16)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["f"], "y", {}, {"weight": "fc.weight"}))
    dm = DataModel(Model(t, nodes, "x", (2, 4, 4)))
    ref = t["fc.weight"].astype(np.float64).reshape(5, 3, 16).sum(2) @ dm.values["a"].mean
    assert np.abs(ref).max() > 0.1 and np.allclose(dm.values["y"].mean, ref, rtol=1e-10)


@pytest.mark.parametrize("kernel,dilation", [((2, 3), (1, 2)), ((3, 1), (2, 1)), ((1, 2), (1, 1))])
def test_d2_non_square_kernels_and_unequal_dilation(kernel, dilation):
    """D1/D2: the taps of a kh x kw kernel with dilation (dh, dw) are at
    (i dh, j dw), row-major, matching the weight layout."""
    rng = np.random.default_rng(2)
    t = {"c.weight": rng.standard_normal((4, 2) + kernel).astype(np.float32)}
    m = Model(t, [Node("c", "conv2d", ["x"], "y", {"dilation": list(dilation)}, {"weight": "c.weight"})], "x",
              (2, 9, 9))
    node = m.node("c")
    pos = spatial_positions(node, m)
    ref = np.array([(i * dilation[0], j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1])])
    assert np.array_equal(pos, ref)
    f = dense_filters(m, node)
    im = InputModel(np.zeros(2), np.eye(2), 0.6, pos)
    assert np.allclose(im.gram(f, f), _exact_cov(f, f, ref, 0.6), rtol=1e-12)


@pytest.mark.parametrize("groups", [2, 6])
def test_d1_grouped_conv_is_expanded_block_diagonally(groups):
    """D1: output o of a conv with g groups reads input channels
    (o // (O/g)) * Cg ... + Cg - 1; every other input channel has zero weight."""
    rng = np.random.default_rng(3)
    c_in, c_out = 6, 6
    cg = c_in // groups
    w = rng.standard_normal((c_out, cg, 3, 3)).astype(np.float32)
    m = Model({"c.weight": w}, [Node("c", "conv2d", ["x"], "y", {"groups": groups}, {"weight": "c.weight"})], "x",
              (c_in, 8, 8))
    dense = dense_filters(m, m.node("c"))
    ref = np.zeros((c_out, c_in, 9))
    for o in range(c_out):
        g = o // (c_out // groups)
        ref[o, g * cg:(g + 1) * cg] = w[o].reshape(cg, 9)
    assert np.array_equal(dense, ref)


def test_fake_quantize_passes_its_options():
    w = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)
    for kw in ({"symmetric": False}, {"per_channel": False}, {"mse_clip": True}):
        assert np.array_equal(fake_quantize(w, 3, **kw), quantize(w, 3, **kw).dequantize())


def test_d9_d10_affine_pad_reshape_permute_follow_their_rules():
    """D9: a per-channel affine y_c = w_c x_c + b_c has mean w E x + b and
    covariance C o w w^T, rho kept; D10: a zero pad keeps everything; a
    reshape / permute that keeps the channel axis keeps mean and covariance
    (rho only when H, W are unchanged); one that changes the channel count or
    moves the channel axis gives unknown statistics (None), also when the
    size of axis 1 happens to stay the same.  Written out from the upstream
    value."""
    rng = np.random.default_rng(11)
    t = {"af.weight": rng.uniform(-2, 2, 4).astype(np.float32), "af.bias": rng.normal(0, 1, 4).astype(np.float32),
         "al.weight": rng.uniform(0.5, 2, 6).astype(np.float32)}
    nodes = [_conv(t, rng, "c", "x", 3, 4), Node("b", "batch_norm", ["c"], "b", {"eps": 1e-5}, bn_params(rng, 4, "b", t)),
             Node("af", "affine", ["b"], "af", {"axis": 1}, {"weight": "af.weight", "bias": "af.bias"}),
             Node("al", "affine", ["b"], "al", {"axis": 3}, {"weight": "al.weight"}),  # last axis: not per channel
             Node("pd", "pad", ["af"], "pd", {"padding": [1, 0, 0, 0]}),  # (4, 3, 6) -> (4, 4, 6)
             Node("rs", "reshape", ["af"], "rs", {"shape": [4, 18]}),  # channels kept (C = 4, H = 3)
             Node("rs12", "reshape", ["af"], "rs12", {"shape": [12, 6]}),  # channels changed
             Node("pw", "permute", ["pd"], "pw", {"perm": [0, 1, 3, 2]}),  # (4, 6, 4): channel axis kept
             Node("ph", "permute", ["pd"], "ph", {"perm": [0, 2, 1, 3]}),  # (4, 4, 6): H moved onto axis 1
             Node("sq", "permute", ["pd"], "sq", {"perm": [0, 1, 2, 3]})]
    dm = DataModel(Model(t, nodes, "x", (3, 3, 6), output_name="pd"))
    v = dm.values
    w, bias = t["af.weight"].astype(np.float64), t["af.bias"].astype(np.float64)
    src = v["b"]
    assert src.rho is not None and src.rho > 0
    assert np.allclose(v["af"].mean, w * src.mean + bias, rtol=1e-12, atol=1e-12)
    assert np.allclose(v["af"].cov, src.cov * np.outer(w, w), rtol=1e-12, atol=1e-12) and v["af"].rho == src.rho
    assert v["al"] is None
    a = v["af"]
    assert np.array_equal(v["pd"].mean, a.mean) and np.array_equal(v["pd"].cov, a.cov) and v["pd"].rho == a.rho
    for name in ("rs", "pw"):
        assert np.array_equal(v[name].mean, a.mean) and np.array_equal(v[name].cov, a.cov) and v[name].rho is None
    assert np.array_equal(v["sq"].cov, a.cov) and v["sq"].rho == a.rho
    assert v["rs12"] is None and v["ph"] is None


def test_a4_a_bn_and_an_activation_reading_unknown_statistics():
    """A4 after a value of unknown statistics (a permute across the channel
    axis): a BN's output is mean beta, covariance diag(gamma^2) (the input
    treated as white), rho unknown; an activation on it gives unknown
    statistics; a linear layer on the last axis of a 2-D (C, L) value (a
    reshape of a map, C = L) is not a channel statistic either."""
    rng = np.random.default_rng(12)
    t = {}
    nodes = [_conv(t, rng, "c", "x", 3, 4), Node("ph", "permute", ["c"], "ph", {"perm": [0, 2, 1, 3]}),  # (4,4,5)
             Node("b", "batch_norm", ["ph"], "b", {"eps": 1e-5}, bn_params(rng, 4, "b", t)),
             Node("r", "relu", ["ph"], "r"), Node("rb", "relu", ["b"], "rb"),
             Node("p", "avg_pool2d", ["c"], "p", {"kernel": 2}), Node("rs", "reshape", ["p"], "rs", {"shape": [4, 4]}),
             Node("gp", "global_avg_pool", ["ph"], "gp"),
             Node("col", "avg_pool2d", ["c"], "col", {"kernel": [1, 5]}),  # (4, 4, 1)
             Node("fcol", "flatten", ["col"], "fcol")]  # (16,): not a channel vector
    t["l.weight"] = rng.standard_normal((3, 4)).astype(np.float32)
    nodes.append(Node("l", "linear", ["rs"], "l", {}, {"weight": "l.weight"}))  # (4, 4) -> (4, 3)
    dm = DataModel(Model(t, nodes, "x", (3, 4, 5), output_name="l"))
    v = dm.values
    assert v["ph"] is None and v["r"] is None
    g = t["b.weight"].astype(np.float64)
    assert np.allclose(v["b"].mean, t["b.bias"], rtol=0, atol=0) and v["b"].rho is None
    assert np.allclose(v["b"].cov, np.diag(g * g), rtol=1e-12, atol=0)
    assert v["rb"] is not None and np.all(np.isfinite(v["rb"].mean))
    assert v["rs"] is not None and v["rs"].mean.shape == (4,) and v["l"] is None
    assert v["gp"] is None and v["col"] is not None and v["fcol"] is None


def test_a4_add_concat_rho_is_the_variance_weighted_mean_or_unknown():
    """A4: the rho of an add / concat is sum_b rho_b tr(C_b) / sum_b tr(C_b)
    (also when the total variance is below 1); unknown when one branch's rho
    is unknown (the network input) or the branches carry no variance (dead
    BN channels, gamma = 0)."""
    rng = np.random.default_rng(13)
    t = {}
    nodes = [_conv(t, rng, "c", "x", 2, 3), Node("b", "batch_norm", ["c"], "b", {"eps": 1e-5}, bn_params(rng, 3, "b", t)),
             _conv(t, rng, "d", "x", 2, 3), Node("e", "batch_norm", ["d"], "e", {"eps": 1e-5}, bn_params(rng, 3, "e", t)),
             Node("z", "batch_norm", ["d"], "z", {"eps": 1e-5}, bn_params(rng, 3, "z", t)),
             Node("add", "add", ["b", "e"], "add"), Node("cat", "concat", ["x", "b"], "cat"),
             Node("dead", "concat", ["z", "z"], "dead")]
    t["b.weight"] = np.full(3, 0.2, np.float32)
    t["e.weight"] = np.full(3, 0.3, np.float32)
    t["z.weight"] = np.zeros(3, np.float32)
    v = DataModel(Model(t, nodes, "x", (2, 6, 6), output_name="add")).values
    b, e = v["b"], v["e"]
    wb, we = np.trace(b.cov), np.trace(e.cov)
    assert wb + we < 1 and b.rho > 0 and e.rho > 0 and b.rho != e.rho
    assert v["add"].rho == pytest.approx((wb * b.rho + we * e.rho) / (wb + we), rel=1e-12)
    assert v["x"].rho is None and v["cat"].rho is None and v["cat"].mean.shape == (5,)
    assert np.trace(v["z"].cov) == 0 and v["dead"].rho is None


def test_a4_linear_after_a_softmax_reads_a_white_input():
    """A4: a linear layer reading a value of unknown statistics (a softmax of
    a flattened (C, 1, 1) map) takes the white input (mean 0, covariance I),
    not the statistics of the value before the softmax."""
    rng = np.random.default_rng(14)
    t = {"fc.weight": rng.standard_normal((2, 3)).astype(np.float32)}
    nodes = [_conv(t, rng, "c", "x", 2, 3, bias=True), Node("gap", "global_avg_pool", ["c"], "gap"),
             Node("flat", "flatten", ["gap"], "flat"), Node("sm", "softmax", ["flat"], "sm", {"axis": 1}),
             Node("fc", "linear", ["sm"], "y", {}, {"weight": "fc.weight"})]
    dm = DataModel(Model(t, nodes, "x", (2, 5, 5)))
    assert dm.values["flat"] is not None and np.abs(dm.values["flat"].mean).max() > 0.1 and dm.values["sm"] is None
    assert np.array_equal(dm.inputs["fc"].mean_c, np.zeros(3)) and np.array_equal(dm.inputs["fc"].cov_c, np.eye(3))


def test_d1_a_depthwise_conv_with_a_channel_multiplier_is_a_grouped_conv():
    """D1: a conv with groups = C_in and 2 C_in outputs (channel multiplier 2)
    is not a depthwise conv of C_in filters: output o reads input channel
    o // 2, so on the white input its covariance is F F^T with F the dense
    filters written out by hand (no BN after it: rho = 0)."""
    rng = np.random.default_rng(15)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    m = Model({"c.weight": w}, [Node("c", "conv2d", ["x"], "y", {"groups": 2, "padding": 1}, {"weight": "c.weight"})],
              "x", (2, 6, 6))
    f = np.zeros((4, 2 * 9))
    for o in range(4):
        f[o, (o // 2) * 9:(o // 2 + 1) * 9] = w[o, 0].reshape(-1)
    assert np.allclose(DataModel(m).values["y"].cov, f @ f.T, rtol=1e-12, atol=1e-12)
