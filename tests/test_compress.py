"""End-to-end properties of ``udfc_ref.compress``."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import resnet_block, vgg

from udfc_ref import compress, load, save
from udfc_ref.datamodel import DataModel, dense_filters

X = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def set_bn(m, name, ch, **vals):
    for role, v in vals.items():
        m.tensors[f"{name}.{role}"][ch] = v


def test_exact_positive_multiple():
    """Channel 3 of c1 is 0.2 x channel 5 with BN giving z_3 = 0.7 z_5: pruning
    it and compensating is exact (alpha = 0), dropping it is not."""
    m = vgg(0, channels=(3, 8, 8, 8))
    t = m.tensors
    c, lam = 0.2, 0.7
    m.node("b1").attrs["eps"] = 0.0
    t["c1.weight"][3] = c * t["c1.weight"][5]
    set_bn(m, "b1", 3, running_var=c * c * t["b1.running_var"][5], running_mean=c * t["b1.running_mean"][5],
           weight=lam * t["b1.weight"][5], bias=lam * t["b1.bias"][5])
    y = m.forward(X)
    res = {}
    for method in ("none", "nm", "udfc"):
        small, rep = compress(m, prune_ratio=0.125, method=method, alpha1=0.0, alpha2=0.0, skip=["c0", "c2"])
        assert small.record["layers"]["c1"]["kept"] == [0, 1, 2, 4, 5, 6, 7]
        res[method] = rel(small.forward(X), y)
    assert res["udfc"] <= 1e-5 and res["nm"] <= 1e-5
    assert res["none"] > 1e-2
    # with the default regularisation the error stays of the order of alpha1
    small, _ = compress(m, prune_ratio=0.125, method="udfc", skip=["c0", "c2"])
    assert rel(small.forward(X), y) <= 0.05


def test_exact_nonnegative_combination():
    """Channel 0 of c1 is a non-negative combination of channels 2, 4, 6, all
    channels active (large beta), BN variances consistent with the data model:
    the udfc solve (alpha = 0) recovers the combination exactly."""
    m = vgg(1, channels=(3, 8, 8, 8))
    t = m.tensors
    for r in ("weight", "bias", "running_mean", "running_var"):
        t[f"b1.{r}"] = t[f"b1.{r}"].astype(np.float64)
    m.node("b1").attrs["eps"] = 0.0
    src = [2, 4, 6]
    coef = np.array([0.05, 0.08, 0.03])
    W = t["c1.weight"].astype(np.float64)
    W[0] = np.tensordot(coef, W[src], axes=1)
    t["c1.weight"] = W.astype(np.float32)
    W = t["c1.weight"].astype(np.float64)
    dm = DataModel(m)
    var = dm.inputs["c1"].gram_diag(dense_filters(m, m.node("c1")))
    sigma = np.sqrt(var)
    gamma = t["b1.weight"]
    t["b1.running_var"] = var
    t["b1.bias"] = 30.0 * np.abs(gamma)  # all channels active
    gamma[0] = 1.0
    lam = coef * sigma[src] * gamma[0] / (sigma[0] * gamma[src])
    mu = t["b1.running_mean"]
    mu[0] = np.dot(coef, mu[src])  # running mean consistent with W_0 = sum c_k W_k
    t["b1.bias"][0] = np.dot(lam, t["b1.bias"][src])
    y = m.forward(X)
    small, _ = compress(m, prune_ratio=0.125, method="udfc", alpha1=0.0, alpha2=0.0, skip=["c0", "c2"])
    assert small.record["layers"]["c1"]["kept"] == [1, 2, 3, 4, 5, 6, 7]
    assert rel(small.forward(X), y) <= 1e-5
    dropped, _ = compress(m, prune_ratio=0.125, method="none", skip=["c0", "c2"])
    assert rel(dropped.forward(X), y) > 1e-3


def test_dead_channel_is_pruned_first_and_folded_exactly():
    """A gamma = 0 channel outputs the constant relu(beta): it is pruned first
    and its constant goes into the consumer's bias.  Exact when the
    consumer has no zero padding (here: max pool, flatten, linear); a padded
    conv consumer would see the constant missing at its borders."""
    m = vgg(2, channels=(3, 8, 8, 8))
    set_bn(m, "b2", 6, weight=0.0, bias=0.8)  # channel 6 of c2 outputs relu(0.8) everywhere
    y = m.forward(X)
    for method, exact in (("udfc", True), ("none", False)):
        small, _ = compress(m, prune_ratio=0.1, method=method, skip=["c0", "c1"])
        assert small.record["layers"]["c2"]["kept"] == [0, 1, 2, 3, 4, 5, 7]
        assert (rel(small.forward(X), y) <= 1e-4) == exact


def test_zero_ratio_and_16_bits_leave_output_unchanged():
    m = vgg(3)
    y = m.forward(X)
    for method in ("none", "nm", "udfc"):
        same, _ = compress(m, prune_ratio=0.0, method=method)
        assert np.array_equal(same.forward(X), y)
        q16, _ = compress(m, prune_ratio=0.0, weight_bits=16, method=method)
        assert rel(q16.forward(X), y) <= 1e-3


@pytest.mark.parametrize("method", ["none", "nm", "udfc"])
@pytest.mark.parametrize("bits", [None, 4, 6])
def test_shapes_shrink_as_recorded_and_file_round_trips(tmp_path, method, bits):
    m = vgg(4, channels=(3, 10, 12, 16))
    small, rep = compress(m, prune_ratio=0.3, weight_bits=bits, method=method, bias_correction=bits is not None)
    rec = small.record["layers"]
    assert set(rec) == {"c0", "c1", "c2"}
    expect = {"c0": 7, "c1": 8, "c2": 11}  # N - round(0.3 N)
    for layer, n_keep in expect.items():
        assert len(rec[layer]["kept"]) == n_keep == rec[layer]["channels_after"]
        assert small.tensors[f"{layer}.weight"].shape[0] == n_keep
        for role in ("weight", "bias", "running_mean", "running_var"):
            assert small.tensors[f"b{layer[1]}.{role}"].shape == (n_keep,)
    assert small.tensors["c1.weight"].shape[1] == 7 and small.tensors["c2.weight"].shape[1] == 8
    assert small.tensors["fc.weight"].shape[1] == 11 * 16
    assert rep.params_after == small.param_count() < rep.params_before == m.param_count()
    assert rep.flops_after < rep.flops_before and rep.bytes_after < rep.bytes_before
    assert all(t.dtype == np.float32 for t in small.tensors.values())
    p = tmp_path / "small.safetensors"
    save(small, p)
    back = load(p)
    assert np.array_equal(back.forward(X), small.forward(X))  # dequantized weights bit-identical
    assert back.record == small.record
    for name, q in small.quant.items():
        assert q.bits == bits and np.array_equal(back.tensors[name], small.tensors[name])


def test_coupled_channels_are_left_unpruned_and_reported():
    m = resnet_block()
    y = m.forward(X)
    small, rep = compress(m, prune_ratio=0.5, weight_bits=8, method="udfc")
    assert set(small.record["layers"]) == {"b.conv1"}
    notes = {r.layer: r.note for r in rep.layers}
    assert "residual add" in notes["stem"] and "residual add" in notes["b.conv2"]
    assert small.tensors["stem.weight"].shape[0] == 8 and small.tensors["b.conv1.weight"].shape[0] == 4
    assert np.isfinite(small.forward(X)).all()
    same, _ = compress(m, prune_ratio=0.0, method="udfc")
    assert np.array_equal(same.forward(X), y)


def test_udfc_error_estimate_drops_below_drop_and_nm():
    """The report's data-model error: udfc is the minimiser, so it is never
    above dropping or merging on the same pair."""
    m = vgg(5, channels=(3, 12, 16, 16))
    errs = {}
    for method in ("none", "nm", "udfc"):
        _, rep = compress(m, prune_ratio=0.4, weight_bits=6, method=method, alpha1=0.0, alpha2=0.0)
        errs[method] = [r.error_after for r in rep.layers if r.pruned]
    for u, d, n in zip(errs["udfc"], errs["none"], errs["nm"]):
        assert u <= d + 1e-9 and u <= n + 1e-9


def test_depthwise_chain_is_pruned_together_and_exact_for_a_duplicate():
    from helpers import mobilenet_block

    m = mobilenet_block()
    t = m.tensors
    # channel 1 duplicates channel 5 through expand, BN1, depthwise and BN2
    for key in ("expand.weight", "dw.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"):
        t[key][1] = t[key][5]
    t["expand.weight"][[1, 5]] *= 1e-2  # lowest L1 norms: the pair is pruned first, lower index first
    t["bn1.running_var"][[1, 5]] *= 1e-4
    y = m.forward(X[:, :3])
    small, rep = compress(m, prune_ratio=0.125, method="udfc", alpha1=0.0, alpha2=0.0, skip=["project"])
    rec = small.record["layers"]["expand"]
    assert rec["kept"] == [0, 2, 3, 4, 5, 6, 7] and rec["depthwise"] == "dw"
    assert small.tensors["dw.weight"].shape == (7, 1, 3, 3) and small.node("dw").attrs["groups"] == 7
    assert small.tensors["bn2.running_var"].shape == (7,) and small.tensors["project.weight"].shape == (6, 7, 1, 1)
    assert rel(small.forward(X[:, :3]), y) <= 1e-5
    dropped, _ = compress(m, prune_ratio=0.125, method="none", skip=["project"])
    assert rel(dropped.forward(X[:, :3]), y) > 1e-3
    both, rep = compress(m, prune_ratio=0.5, weight_bits=6, method="udfc")
    assert set(both.record["layers"]) == {"expand", "project"}
    assert np.isfinite(both.forward(X[:, :3])).all()
    assert {r.layer: r.channels_after for r in rep.layers}["dw"] == 4


def test_linear_bn_linear_pair():
    from helpers import bn_params

    from udfc_ref import Model, Node

    rng = np.random.default_rng(3)
    t = {"fc1.weight": rng.standard_normal((16, 12)).astype(np.float32) / 4,
         "fc2.weight": rng.standard_normal((5, 16)).astype(np.float32) / 4,
         "fc2.bias": np.zeros(5, np.float32)}
    nodes = [Node("flat", "flatten", ["x"], "flat"),
             Node("fc1", "linear", ["flat"], "fc1", {}, {"weight": "fc1.weight"}),
             Node("bn", "batch_norm", ["fc1"], "bn", {"eps": 1e-5}, bn_params(rng, 16, "bn", t)),
             Node("act", "relu", ["bn"], "act"),
             Node("fc2", "linear", ["act"], "y", {}, {"weight": "fc2.weight", "bias": "fc2.bias"})]
    m = Model(t, nodes, "x", (3, 2, 2))
    x = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    y = m.forward(x)
    small, rep = compress(m, prune_ratio=0.25, weight_bits=8, method="udfc")
    assert small.tensors["fc1.weight"].shape == (12, 12) and small.tensors["fc2.weight"].shape == (5, 12)
    assert rel(small.forward(x), y) < 0.5
    assert rep.layers[0].error_after < rep.layers[0].error_before
