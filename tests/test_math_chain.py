"""Monte-Carlo checks of the propagated data model (A4), the bias correction
(B1), the quantization shift (D4-D5) and the reported error (E2) on a linear
chain where the data model is exact:

    x ~ N(0, I) -> fc1 -> BN1 -> fc2 -> BN2 -> ReLU -> fc3

The BNs are calibrated on the samples themselves (running mean / variance =
the sample moments, eps = 0: assumption A1 holds in sample), the input is
white (A4's network input) and every pre-activation is an exact Gaussian.
The forward pass is written out here with NumPy (not the project's
``forward``); tolerances are multiples of the Monte-Carlo standard error.
"""

from __future__ import annotations

import numpy as np
import pytest
from mathref import moments_quad

from udfc_ref import Model, Node, compress
from udfc_ref.datamodel import DataModel

C0, N1, N2, O = 3, 6, 8, 12
N_SAMPLES = 200_000
Z = 5.0


def _bn(h, t, name):
    return t[f"{name}.weight"] * (h - t[f"{name}.running_mean"]) / np.sqrt(t[f"{name}.running_var"]) + t[f"{name}.bias"]


def forward(t, x):
    """Every value of the chain, float64, written out from the tensors."""
    f = {k: v.astype(np.float64) for k, v in t.items()}
    v = {"h1": x @ f["fc1.weight"].T + f["fc1.bias"]}
    v["z1"] = _bn(v["h1"], f, "bn1")
    v["h2"] = v["z1"] @ f["fc2.weight"].T + f.get("fc2.bias", 0.0)
    v["z2"] = _bn(v["h2"], f, "bn2")
    v["a2"] = np.maximum(v["z2"], 0.0)
    v["y"] = v["a2"] @ f["fc3.weight"].T + f["fc3.bias"]
    return v


@pytest.fixture(scope="module")
def chain():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_SAMPLES, C0))
    # fc1: integer weights with max |w| = 3 per row, exact on the 3-bit symmetric grid (scale 1)
    w1 = rng.integers(-3, 4, (N1, C0)).astype(np.float64)
    w1[np.arange(N1), rng.integers(0, C0, N1)] = 3.0
    t = {"fc1.weight": w1, "fc1.bias": rng.normal(3.0, 1.0, N1),
         "bn1.weight": rng.uniform(0.5, 1.5, N1), "bn1.bias": rng.uniform(1.0, 3.0, N1),
         "fc2.weight": rng.standard_normal((N2, N1)) / np.sqrt(N1),
         "bn2.weight": rng.uniform(0.5, 1.5, N2) * rng.choice([1, 1, 1, -1], N2), "bn2.bias": rng.normal(0, 0.7, N2),
         "fc3.weight": rng.standard_normal((O, N2)), "fc3.bias": rng.standard_normal(O)}
    # calibrate each BN on the samples (A1 holds in sample), in float32 as stored
    h1 = x @ t["fc1.weight"].T + t["fc1.bias"]
    t["bn1.running_mean"], t["bn1.running_var"] = h1.mean(0), h1.var(0)
    h2 = _bn(h1, t, "bn1") @ t["fc2.weight"].T
    t["bn2.running_mean"], t["bn2.running_var"] = h2.mean(0), h2.var(0)
    t = {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}
    bn = {r: r for r in ("weight", "bias", "running_mean", "running_var")}
    nodes = [Node("flat", "flatten", ["x"], "flat"),
             Node("fc1", "linear", ["flat"], "h1", {}, {"weight": "fc1.weight", "bias": "fc1.bias"}),
             Node("bn1", "batch_norm", ["h1"], "z1", {"eps": 0.0}, {r: f"bn1.{r}" for r in bn}),
             Node("fc2", "linear", ["z1"], "h2", {}, {"weight": "fc2.weight"}),
             Node("bn2", "batch_norm", ["h2"], "z2", {"eps": 0.0}, {r: f"bn2.{r}" for r in bn}),
             Node("act", "relu", ["z2"], "a2"),
             Node("fc3", "linear", ["a2"], "y", {}, {"weight": "fc3.weight", "bias": "fc3.bias"})]
    m = Model(t, nodes, "x", (C0, 1, 1))
    return m, x, forward(m.tensors, x)


def _mean_se(v):
    return v.mean(0), v.std(0) / np.sqrt(v.shape[0])


def test_a4_bn_output_has_mean_beta_and_the_activation_moments_follow(chain):
    """A4: a BN output has mean beta (never the running mean) and the BN's
    variance; M1-M3 then give the ReLU's mean and covariance."""
    m, _, v = chain
    dm = DataModel(m)
    beta1 = m.tensors["bn1.bias"].astype(np.float64)
    assert np.allclose(dm.values["z1"].mean, v["z1"].mean(0), atol=1e-6)
    assert np.allclose(dm.values["z1"].mean, beta1, atol=1e-7)
    mean, se = _mean_se(v["a2"])
    assert np.all(np.abs(dm.values["a2"].mean - mean) <= Z * se), (dm.values["a2"].mean - mean) / se
    d = v["a2"] - v["a2"].mean(0)
    prod = np.einsum("ni,nj->nij", d[:50_000], d[:50_000])
    cov, cse = _mean_se(prod)
    assert np.all(np.abs(dm.values["a2"].cov - cov) <= Z * cse + 1e-3 * np.abs(cov)), (dm.values["a2"].cov - cov) / cse
    # the data model never reads running_mean
    m2 = m.copy()
    m2.tensors["bn1.running_mean"] = m2.tensors["bn1.running_mean"] + 5.0
    m2.tensors["bn2.running_mean"] = m2.tensors["bn2.running_mean"] - 5.0
    dm2 = DataModel(m2)
    for k in ("z1", "h2", "z2", "a2"):
        assert np.array_equal(dm.values[k].mean, dm2.values[k].mean)
        assert np.array_equal(dm.values[k].cov, dm2.values[k].cov)


def test_b1_bias_correction_keeps_the_quantized_layers_output_mean(chain):
    """B1: with eps = Q(W) - W, the quantized fc2's output mean moves by
    eps E[x]; the correction removes exactly that (here into BN2's running
    mean); without it the shift is many standard errors."""
    m, x, v = chain
    outs = {}
    for bc in (False, True):
        small, _ = compress(m, prune_ratio=0.0, weight_bits=3, method="none", bias_correction=bc, skip=["fc1", "fc3"])
        outs[bc] = forward(small.tensors, x)["z2"] - v["z2"]
    for bc, d in outs.items():
        mean, se = _mean_se(d)
        if bc:
            assert np.all(np.abs(mean) <= Z * se), mean / se
        else:
            assert np.abs(mean / se).max() > 20 * Z  # the test has power: the uncorrected shift is large


@pytest.mark.parametrize("bias_correction", [False, True])
def test_udfc_keeps_the_consumer_mean_under_quantization(chain, bias_correction):
    """D4-D5 (+ B1): the kept filters' quantization error is embedded in W~
    and its mean shift delta (less the bias correction) enters the intercept
    t (U3), so the consumer's output mean is the original one -- also with
    two channels pruned."""
    m, x, v = chain
    small, _ = compress(m, prune_ratio=0.25, weight_bits=3, method="udfc", bias_correction=bias_correction,
                        skip=["fc1", "fc3"])
    mean, se = _mean_se(forward(small.tensors, x)["y"] - v["y"])
    assert np.all(np.abs(mean) <= Z * se + 1e-3 * v["y"].std(0)), mean / se


def test_udfc_embeds_the_quantization_error_after_a_pruned_input(chain):
    """D4 when the producer's inputs were pruned by the pair before it: fc1
    (exact on the 3-bit grid, 6 -> 4 channels spanning its 3-dimensional
    input, so the rebuild with alpha1 = 0 is exact) is pruned first, then the
    quantized fc2 reads only fc1's kept columns; its quantization error is
    embedded at those columns, and the consumer's mean is kept."""
    m, x, v = chain
    small, _ = compress(m, prune_ratio=0.25, weight_bits=3, method="udfc", alpha1=0.0, alpha2=0.0, skip=["fc3"])
    assert len(small.record["layers"]["fc1"]["kept"]) == 4 and small.tensors["fc2.weight"].shape[1] == 4
    out = forward(small.tensors, x)
    assert np.allclose(out["z1"], v["z1"][:, small.record["layers"]["fc1"]["kept"]], atol=1e-4)
    mean, se = _mean_se(out["y"] - v["y"])
    assert np.all(np.abs(mean) <= Z * se + 1e-3 * v["y"].std(0)), mean / se


def test_e2_reported_error_is_the_weighted_monte_carlo_error(chain):
    """E2: err = sum_i w_i l_i / sum_i w_i E[a_i^2], w_i = ||W'_{:, i}||^2, with
    l_i = E[(a_i - T_i a~_K - t_i)^2] measured on samples; T and t are read
    back from the rewritten consumer (fc3 has more outputs than inputs)."""
    m, x, v = chain
    W3 = m.tensors["fc3.weight"].astype(np.float64)
    w = (W3**2).sum(0)
    for method in ("udfc", "nm", "none"):
        small, rep = compress(m, prune_ratio=0.25, weight_bits=4, method=method, skip=["fc1", "fc3"])
        lr = {r.layer: r for r in rep.layers}["fc2"]
        kept = np.array(small.record["layers"]["fc2"]["kept"])
        W3n = small.tensors["fc3.weight"].astype(np.float64)
        T = np.linalg.lstsq(W3, W3n, rcond=None)[0]  # (N2, M): W3 T = W3_new
        t = np.linalg.lstsq(W3, small.tensors["fc3.bias"].astype(np.float64) - m.tensors["fc3.bias"], rcond=None)[0]
        assert np.allclose(W3 @ T, W3n, atol=1e-4)
        aq = forward(small.tensors, x)["a2"]  # the compressed kept channels
        e = v["a2"] - aq @ T.T - t
        sig = (w * (v["a2"] ** 2)).sum(1)
        err_mc = (e**2 @ w).mean() / sig.mean()
        # delta-method standard error of the ratio of means
        r = ((e**2 @ w) - err_mc * sig) / sig.mean()
        se = r.std() / np.sqrt(len(r))
        assert abs(lr.error_after - err_mc) <= Z * se + 0.02 * err_mc, (method, lr.error_after, err_mc, se)
        assert set(np.flatnonzero(np.abs(T).sum(1) == 0)) <= set(range(N2)) - set(kept)


def test_e2_weights_are_the_consumers_column_energy():
    """E2 exactly (no Monte Carlo): dropping channels without compensation
    (method none, float weights) leaves l_j = E[a_j^2] for a pruned channel and
    0 for a kept one, so err = sum_{j in P} w_j E[a_j^2] / sum_i w_i E[a_i^2]
    with E[a^2] by quadrature and w_i the squared Frobenius norm of the
    consumer's 3x3 input slice i.  Exactly on the float64 path (``exact=True``);
    the default float32 path within its stated tolerance (derivation,
    "Precision": reported errors to 1e-5 absolute)."""
    from helpers import vgg

    m = vgg(0, channels=(3, 8, 8, 8))
    _, rep = compress(m, prune_ratio=0.25, method="none", skip=["c0", "c2"], exact=True)
    small, fast = compress(m, prune_ratio=0.25, method="none", skip=["c0", "c2"])
    kept = small.record["layers"]["c1"]["kept"]
    g = m.tensors["b1.weight"].astype(np.float64)
    b = m.tensors["b1.bias"].astype(np.float64)
    e2 = np.array([moments_quad(b[i], g[i], "relu")[1] + moments_quad(b[i], g[i], "relu")[0] ** 2 for i in range(8)])
    w = (m.tensors["c2.weight"].astype(np.float64) ** 2).sum(axis=(0, 2, 3))
    pruned = np.setdiff1d(np.arange(8), kept)
    expect = (w[pruned] * e2[pruned]).sum() / (w * e2).sum()
    lr = {r.layer: r for r in rep.layers}["c1"]
    assert lr.error_before == pytest.approx(expect, rel=1e-9)
    assert lr.error_after == pytest.approx(expect, rel=1e-9)
    lf = {r.layer: r for r in fast.layers}["c1"]
    assert lf.error_before == pytest.approx(expect, abs=1e-5) and lf.error_after == pytest.approx(expect, abs=1e-5)
