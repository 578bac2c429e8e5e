"""The spatial part of the data model (Eq. D2, D3, D6, D7, D8) against
simulated fields: stationary Gaussian fields with correlation
``rho^(|dy| + |dx|)`` from ``mathref.ar_fields`` (not the project's
``sample_patches``), explicit convolution / pooling loops, and lag-1
correlations with their Monte-Carlo standard errors.  Each step is checked
under its own premise, where it is exact (the derivation quotes what it costs
when the premise fails)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import bn_params
from mathref import ar_fields, conv, lag1_correlation, pool

from udfc_ref import Model, Node
from udfc_ref.datamodel import (DataModel, InputModel, dense_filters, lag_correlation, pool_lag_correlation,
                                spatial_positions)

RHO = 0.7  # on the D3 grid
N_FIELDS, SIDE = 3000, 20
Z = 5.0  # tolerance in standard errors


def chain(pool_kernel=2, pool_stride=2, dilation=2, stride=2, seed=0):
    """input (2, 20, 20) -> conv 3x3 (dilation, stride) -> BN -> ReLU -> avg pool
    -> conv 3x3 -> BN -> ReLU -> flatten -> linear; the first BN calibrated on
    simulated fields of correlation RHO (assumption A3: its running variance is
    the data's)."""
    rng = np.random.default_rng(seed)
    t = {"c0.weight": rng.standard_normal((6, 2, 3, 3)).astype(np.float32),
         "c1.weight": rng.standard_normal((4, 6, 3, 3)).astype(np.float32)}
    t["c0.weight"][:, :, 1, 1] += 1.5  # a positive centre: a spatially smooth output
    x = ar_fields(np.random.default_rng(seed + 100), 400, 2, SIDE, SIDE, RHO)
    y = conv(x, t["c0.weight"].astype(np.float64), (stride, stride), (dilation, dilation))
    bn0 = bn_params(rng, 6, "b0", t)
    # a large eps: the data's variance is running_var + eps
    t["b0.running_var"] = (y.var(axis=(0, 2, 3)) - 0.3).astype(np.float32)
    t["b0.running_mean"] = y.mean(axis=(0, 2, 3)).astype(np.float32)
    nodes = [Node("c0", "conv2d", ["x"], "c0", {"stride": stride, "dilation": dilation}, {"weight": "c0.weight"}),
             Node("b0", "batch_norm", ["c0"], "b0", {"eps": 0.3}, bn0),
             Node("a0", "relu", ["b0"], "a0"),
             Node("p0", "avg_pool2d", ["a0"], "p0", {"kernel": pool_kernel, "stride": pool_stride}),
             Node("c1", "conv2d", ["p0"], "c1", {}, {"weight": "c1.weight"}),
             Node("b1", "batch_norm", ["c1"], "b1", {"eps": 1e-5}, bn_params(rng, 4, "b1", t)),
             Node("a1", "relu", ["b1"], "a1"),
             Node("flat", "flatten", ["a1"], "flat")]
    ho = (SIDE - 2 * dilation - 1) // stride + 1
    hp = (ho - pool_kernel) // pool_stride + 1 - 2
    t["fc.weight"] = rng.standard_normal((3, 4 * hp * hp)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight"}))
    return Model(t, nodes, "x", (2, SIDE, SIDE))


@pytest.fixture
def sim():
    """The chain, its data model, and simulated conv outputs on RHO fields
    (function scope: each test builds its own data model, so that a mutation
    tool maps the data model's functions to the tests that check them)."""
    m = chain()
    dm = DataModel(m)
    x = ar_fields(np.random.default_rng(1), N_FIELDS, 2, SIDE, SIDE, RHO)
    y = conv(x, m.tensors["c0.weight"].astype(np.float64), (2, 2), (2, 2))
    return m, dm, y


def test_d3_recovers_the_input_correlation_and_d2_the_output_covariance(sim):
    """A3/D3: the input correlation is recovered from the BN variances of a
    dilated, strided conv; D2 (Manhattan distance between the dilated taps)
    then gives the conv's output covariance W Sigma_x W^T."""
    m, dm, y = sim
    assert dm.inputs["c0"].rho_s == pytest.approx(RHO, abs=1e-12)
    per_field = np.einsum("nihw,njhw->nij", y, y) / (y.shape[2] * y.shape[3])  # mean 0 is known
    emp, se = per_field.mean(0), per_field.std(0) / np.sqrt(per_field.shape[0])
    assert np.all(np.abs(dm.values["c0"].cov - emp) <= Z * se + 1e-9), (dm.values["c0"].cov - emp) / se


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_d2_patch_covariance_of_a_dilated_kernel(rho):
    """D2 without the D3 fit: for a given rho the Gram matrix of a dilated
    3x3 conv equals the simulated output covariance (Euclidean distances or
    undilated taps change it by many standard errors)."""
    m = chain()
    node = m.node("c0")
    im = InputModel(np.zeros(2), np.eye(2), rho, spatial_positions(node, m))
    f = dense_filters(m, node)
    x = ar_fields(np.random.default_rng(2), N_FIELDS, 2, SIDE, SIDE, rho)
    y = conv(x, m.tensors["c0.weight"].astype(np.float64), (2, 2), (2, 2))
    per_field = np.einsum("nihw,njhw->nij", y, y) / (y.shape[2] * y.shape[3])
    emp, se = per_field.mean(0), per_field.std(0) / np.sqrt(per_field.shape[0])
    assert np.all(np.abs(im.gram(f, f) - emp) <= Z * se), (im.gram(f, f) - emp) / se


def test_d6_conv_output_lag_correlation_with_stride_and_dilation(sim):
    """D6: an output lag of 1 is an input lag of ``stride`` (here 2) between
    dilated taps."""
    m, dm, y = sim
    r, se = lag1_correlation(y, mean=np.zeros(y.shape[1]))
    assert abs(dm.values["c0"].rho - r) <= Z * se, (dm.values["c0"].rho, r, se)
    assert dm.values["b0"].rho == dm.values["c0"].rho  # a BN keeps the correlation (A4)


def test_d7_activation_lag_correlation(sim):
    """D7 (Mehler): Gaussian fields with the BN output's marginals N(beta_i,
    gamma_i^2) and lag-1 correlation rho, through the ReLU."""
    m, dm, _ = sim
    rho = dm.values["b0"].rho
    g = m.tensors["b0.weight"].astype(np.float64)
    b = m.tensors["b0.bias"].astype(np.float64)
    u = ar_fields(np.random.default_rng(3), N_FIELDS, 6, 12, 12, rho)
    a = np.maximum(b[None, :, None, None] + g[None, :, None, None] * u, 0)
    r, se = lag1_correlation(a)
    assert abs(dm.values["a0"].rho - r) <= Z * se + 1e-4 / np.sqrt(N_FIELDS), (dm.values["a0"].rho, r, se)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (2, 1)])
def test_d8_average_pool_lag_correlation(k, s):
    """D8: a k x k average pool of stride s of a field with correlation
    rho^(|dy| + |dx|); for 2 x 2 stride 2 the closed form is rho (1 + rho) / 2."""
    m = chain(pool_kernel=k, pool_stride=s)
    dm = DataModel(m)
    rho = dm.values["a0"].rho
    x = ar_fields(np.random.default_rng(4), N_FIELDS, 1, 24, 24, rho)
    r, se = lag1_correlation(pool(x, k, s, "avg"), mean=np.zeros(1))
    got = dm.values["p0"].rho
    assert abs(got - r) <= Z * se, (got, r, se)
    # A4: the conv after the pool reads this propagated rho (not a new D3 fit on the BN after it)
    assert dm.inputs["c1"].rho_s == got
    if (k, s) == (2, 2):
        assert got == pytest.approx(rho * (1 + rho) / 2, abs=1e-12)


def test_d6_white_input_through_overlapping_kernels():
    """D6 at rho = 0: a white input still gives correlated outputs where the
    receptive fields overlap (3x3 kernel, stride 1: lag 1 shares 6 of 9 taps)."""
    m = chain(dilation=1, stride=1)
    node = m.node("c0")
    f = dense_filters(m, node)
    im = InputModel(np.zeros(2), np.eye(2), 0.0, spatial_positions(node, m))
    x = ar_fields(np.random.default_rng(5), N_FIELDS, 2, 12, 12, 0.0)
    r, se = lag1_correlation(conv(x, m.tensors["c0.weight"].astype(np.float64)), mean=np.zeros(6))
    got = lag_correlation(f, im, (1, 1))
    assert r > 20 * se and abs(got - r) <= Z * se, (got, r, se)
    # no filter energy: no correlation, no division by zero
    assert lag_correlation(np.zeros_like(f), im, (1, 1)) == 0.0


def test_rho_is_kept_at_most_0_99():
    """Every propagated rho stays in [0, 0.99] (the top of the D3 grid): a
    smoothing filter on a rho = 0.98 field would give more."""
    m = chain(dilation=1, stride=1)
    node = m.node("c0")
    f = np.ones((1, 2, 9))
    im = InputModel(np.zeros(2), np.eye(2), 0.98, spatial_positions(node, m))
    x = ar_fields(np.random.default_rng(6), 300, 2, 12, 12, 0.98)
    r, _ = lag1_correlation(conv(x, f.reshape(1, 2, 3, 3)), mean=np.zeros(1))
    assert r > 0.99 and lag_correlation(f, im, (1, 1)) == 0.99
    assert pool_lag_correlation(0.99, (3, 3), (1, 1)) <= 0.99
    # and at least 0: a checkerboard filter anti-correlates neighbouring outputs
    f = np.tile(np.array([1.0, -1.0] * 4 + [1.0]), (1, 2, 1))
    im = InputModel(np.zeros(2), np.eye(2), 0.5, spatial_positions(node, m))
    x = ar_fields(np.random.default_rng(7), 200, 2, 12, 12, 0.5)
    r, se = lag1_correlation(conv(x, f.reshape(1, 2, 3, 3)), mean=np.zeros(1))
    assert r < -5 * se and lag_correlation(f, im, (1, 1)) == 0.0


def _exact_bn_var(f, pos, rho):
    """diag(W Sigma_x W^T) for a white-channel input with correlation
    rho^(|dy| + |dx|), written out over pairs of taps."""
    d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)
    return np.einsum("ncp,ncq,pq->n", f, f, rho**d)  # 0^0 = 1: white input, R = I


@pytest.mark.parametrize("case", ["1x2 kernel", "small variances, a dead and a zero channel", "two live channels",
                                  "white input"])
def test_d3_edge_cases(case):
    """D3 recovers rho from exact BN variances for a 2-tap kernel, for
    variances far below 1 with a dead BN channel (running_var 0) and an
    all-zero filter among them, and with exactly two usable channels; with
    fewer than two usable channels, or one input position, it gives 0."""
    from udfc_ref.datamodel import fit_rho_s

    rng = np.random.default_rng(7)
    rho = 0.0 if case == "white input" else 0.45
    pos = np.stack(np.meshgrid(np.arange(3), np.arange(3) * 2, indexing="ij"), -1).reshape(-1, 2)
    f = rng.standard_normal((6, 2, 9)) + 1.0
    if case == "1x2 kernel":
        pos, f = pos[:2], f[:, :, :2]
    var = _exact_bn_var(f, pos, rho)
    if case.startswith("small"):
        f, var = f * 1e-3, var * 1e-6
        f[2] = 0.0
        var[4] = 0.0
    if case == "two live channels":
        var[2:] = 0.0
    assert fit_rho_s(f, np.eye(2), pos, var) == pytest.approx(rho, abs=1e-12)
    var[1:] = 0.0
    assert fit_rho_s(f, np.eye(2), pos, var) == 0.0
    assert fit_rho_s(f[:, :, :1], np.eye(2), pos[:1], _exact_bn_var(f[:, :, :1], pos[:1], rho)) == 0.0


def test_d6_is_scale_invariant():
    """D6 is a ratio: filters scaled by 1e-3 (output variance far below 1)
    give the same lag-1 correlation."""
    m = chain()
    node = m.node("c0")
    f = dense_filters(m, node)
    im = InputModel(np.zeros(2), np.eye(2), 0.6, spatial_positions(node, m))
    assert lag_correlation(1e-3 * f, im, (2, 2)) == pytest.approx(lag_correlation(f, im, (2, 2)), rel=1e-12)
    assert 0.1 < lag_correlation(f, im, (2, 2)) < 0.99


def test_lazy_data_model_equals_the_eager_one_and_holds_only_the_frontier():
    """Section 9: the lazy data model (statistics dropped once every reader
    was propagated, input models released by the caller) gives exactly the
    eager model's statistics -- also for a linear layer reading a flatten's
    input -- and holds only a few values at a time."""
    from helpers import vgg

    m = vgg(3, channels=(3, 6, 8, 8))
    eager = DataModel(m)
    lazy = DataModel(m, lazy=True)
    held = []
    for n in m.nodes:
        if n.op in ("conv2d", "linear"):
            a, b = eager.inputs[n.name], lazy.input_model(n.name)
            assert a.rho_s == b.rho_s and np.array_equal(a.mean_c, b.mean_c) and np.array_equal(a.cov_c, b.cov_c)
            lazy.release(n.name)
            assert n.name not in lazy.inputs
        st = lazy.value(n.output)
        ref = eager.values[n.output]
        assert (st is None) == (ref is None)
        if ref is not None:
            assert np.array_equal(st.mean, ref.mean) and np.array_equal(st.cov, ref.cov) and st.rho == ref.rho
        held.append(len(lazy.values))
    assert max(held) <= 4 < len(eager.values)


def test_a4_a_1x1_conv_reads_and_keeps_the_propagated_rho():
    """A 1x1 conv after a value whose rho is propagated (D8 through an
    average pool) reads that rho (no D3 fit on the BN after it, which would
    give 0 for one tap), and its output keeps it: Cov(y(p), y(p + e)) =
    W (rho C) W^T = rho W C W^T exactly (D6 for one tap, stride 1)."""
    m = chain()
    t = dict(m.tensors)
    rng = np.random.default_rng(11)
    t["c1.weight"] = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [Node(n.name, n.op, n.inputs, n.output, dict(n.attrs), dict(n.params)) for n in m.nodes]
    for n in nodes:
        if n.name == "c1":
            n.attrs = {}
        if n.name == "fc":
            t["fc.weight"] = rng.standard_normal((3, 4 * 16)).astype(np.float32)
    dm = DataModel(Model(t, nodes, "x", m.input_shape))
    rho = dm.values["p0"].rho
    assert 0.05 < rho < 0.99
    assert dm.inputs["c1"].rho_s == rho and dm.values["c1"].rho == pytest.approx(rho, abs=1e-12)


def test_d3_calibrates_on_running_var_plus_eps():
    """A3/D3: the data's variance is running_var + eps (PyTorch's eval-mode
    BN).  With eps comparable to the variances, the fit recovers rho only
    from running_var + eps; the exact variances are written out tap by tap."""
    rng = np.random.default_rng(8)
    t = {"c.weight": (rng.standard_normal((6, 2, 3, 3)) + 0.5).astype(np.float32)}
    f = t["c.weight"].astype(np.float64).reshape(6, 2, 9)
    pos = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1).reshape(-1, 2)
    var = _exact_bn_var(f, pos, RHO)
    eps = 0.9 * var.min()
    bn = bn_params(rng, 6, "b", t)
    t["b.running_var"] = (var - eps).astype(np.float32)
    m = Model(t, [Node("c", "conv2d", ["x"], "c", {}, {"weight": "c.weight"}),
                  Node("b", "batch_norm", ["c"], "b", {"eps": float(eps)}, bn)], "x", (2, 8, 8))
    assert DataModel(m).inputs["c"].rho_s == pytest.approx(RHO, abs=1e-12)
