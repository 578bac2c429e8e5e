"""Weights near the float limit (issue 9): compression never warns, never
raises anything but a NumericError naming the layer, and never writes a file
it cannot read back.

Reference for the exactness claims: scaling by a power of two is exact in
binary floating point, so the scale-free quantities of the compensation
(correlations, T) must come out bit-identical for W and 2^k W - also for k
where the unscaled products would overflow float64.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udfc_ref
from udfc_ref import NumericError
from udfc_ref.cli import main
from udfc_ref.datamodel import DataModel, bn_affine, dense_filters
from udfc_ref.solve import _solve_psd, neuron_merging, pair_stats

from helpers import mobilenet_block, resnet_block, vgg


def near_limit(value, dtype, layer="c1.weight", build=vgg):
    """``build()`` in ``dtype`` with ``layer``'s weights at +-value (their signs kept)."""
    m = build()
    for k in m.tensors:
        m.tensors[k] = m.tensors[k].astype(dtype)
    m.tensors[layer] = (np.sign(m.tensors[layer].astype(np.float64)) * value).astype(dtype)
    return m


ISSUE_CASES = [(3e38, "float32"), (-3e38, "float32"), (6e4, "float16"), (-6e4, "float16")]


@pytest.mark.parametrize("value,dtype", ISSUE_CASES)
@pytest.mark.parametrize("method", ["udfc", "nm"])
def test_issue_cases_are_one_numeric_error(tmp_path, capsys, value, dtype, method):
    """Used to be LinAlgError after 35 RuntimeWarning lines (udfc), or exit 0
    with a file `udfc info` rejected (nm)."""
    src = tmp_path / "m.safetensors"
    udfc_ref.save(near_limit(value, dtype), src)
    before = src.read_bytes()
    out = tmp_path / "o.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may escape
        code = main(["compress", str(src), str(out), "--prune-ratio", "0.5", "--weight-bits", "4",
                     "--method", method])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("udfc: error: layer 'c1': ") and err.count("\n") == 1, err
    assert f"overflow {dtype}" in err and "--skip c0" in err
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"] and src.read_bytes() == before


@pytest.mark.parametrize("value,dtype", ISSUE_CASES)
def test_issue_cases_without_compensation_write_a_readable_file(tmp_path, capsys, value, dtype):
    """--method none does not add to the consumer's weights: nothing
    overflows, and the file written is one `udfc info` reads."""
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    udfc_ref.save(near_limit(value, dtype), src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["compress", str(src), str(out), "--prune-ratio", "0.5", "--weight-bits", "4",
                     "--method", "none"]) == 0
        assert main(["info", str(out)]) == 0
    small = udfc_ref.load(out)
    assert all(np.all(np.isfinite(small.tensors[t])) for t in small.tensors)
    assert np.all(np.isfinite(small.quant["c1.weight"].scale)) and np.all(small.quant["c1.weight"].scale > 0)


def test_float64_overflow_inside_the_statistics_is_a_numeric_error(capfd):
    """Weights of 1e300 in float64: the data model's products overflow; the
    solve is never reached with NaN (LAPACK used to print DLASCL errors)."""
    m = near_limit(1e200, "float64", "expand.weight", build=mobilenet_block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NumericError, match="layer 'expand': its statistics .* overflow"):
            udfc_ref.compress(m, prune_ratio=0.5, weight_bits=4)
    captured = capfd.readouterr()
    assert "DLASCL" not in captured.out + captured.err


BUILDS = {"vgg": vgg, "resnet": resnet_block, "mobilenet": mobilenet_block}
LIMIT = {"float16": 65504.0, "float32": 3.4028234663852886e38, "float64": 1e300}


@given(st.sampled_from(sorted(BUILDS)), st.sampled_from(["float16", "float32", "float64"]),
       st.floats(-40, 0), st.integers(0, 9), st.booleans(), st.sampled_from(["udfc", "nm", "none"]),
       st.sampled_from([None, 2, 4, 8, 16]), st.booleans(), st.booleans())
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_any_magnitude_compresses_or_is_a_numeric_error(tmp_path_factory, build, dtype, log_frac, which, every,
                                                         method, bits, bias_correction, asymmetric):
    """Weights anywhere from 1e-40 x to 1 x the dtype's limit, in one layer
    or in all: compress either returns a model whose file reads back
    bit-identical, or raises one NumericError naming a layer or tensor; no
    warning, no other exception."""
    m = BUILDS[build]()
    weights = [n.params["weight"] for n in m.nodes if n.op in ("conv2d", "linear")]
    chosen = weights if every else [weights[which % len(weights)]]
    value = LIMIT[dtype] * 10.0 ** log_frac
    for k in m.tensors:
        m.tensors[k] = m.tensors[k].astype(dtype)
    for k in chosen:
        w = m.tensors[k].astype(np.float64)
        m.tensors[k] = (w / np.abs(w).max() * value).astype(dtype)
    if not all(np.all(np.isfinite(m.tensors[k])) for k in m.tensors):
        return  # the input itself overflowed: load refuses such a file (tested elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            small, _ = udfc_ref.compress(m, prune_ratio=0.5, weight_bits=bits, method=method,
                                         bias_correction=bias_correction, asymmetric=asymmetric)
        except NumericError as e:
            assert "\n" not in str(e) and ("layer '" in str(e) or "tensor '" in str(e)), str(e)
            return
        p = tmp_path_factory.mktemp("out") / "o.safetensors"
        udfc_ref.save(small, p)
        back = udfc_ref.load(p)
    for t in small.tensors:
        if t in back.tensors:
            assert back.tensors[t].tobytes() == small.tensors[t].tobytes(), t


# ------------------------------------------ exact scale invariance (powers of two)

def _pair_inputs(dtype=np.float64):
    m = vgg()
    for k in m.tensors:
        m.tensors[k] = m.tensors[k].astype(dtype)
    dm = DataModel(m, lazy=True)
    node, bn = m.node("c1"), m.node("b1")
    g, b, _, _ = bn_affine(m, bn)
    W = dense_filters(m, node)
    kept = np.array([0, 2, 3, 5, 7, 8, 11, 13])
    Wq = W[kept] + np.random.default_rng(0).normal(0, 1e-3, W[kept].shape)  # a "quantization error"
    return W, Wq, dm.input_model("c1"), g, b, kept


@pytest.mark.parametrize("k", [-1000, -300, -60, 60, 300, 1000])
def test_pair_stats_are_exactly_scale_free(k):
    """The old code squared W: at 2^300 (1e90) the Gram overflowed to Inf and
    at 2^1000 W itself is 1e301; the scaled statistics are bit-identical."""
    W, Wq, im, g, b, kept = _pair_inputs()
    ref = pair_stats(W, Wq, im, g, b, "relu", kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pair_stats(W * 2.0**k, Wq * 2.0**k, im, g, b, "relu", kept)
    for f in ("mean_a", "var_a", "mean_q", "cov_q", "cross"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f


@pytest.mark.parametrize("k", [-900, -200, 200, 900])
def test_solve_is_exactly_scale_free(k):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 20))
    A, B = X @ X.T, rng.standard_normal((6, 3))
    A_sing = A.copy()
    A_sing[:, 5] = A_sing[:, 4]
    A_sing[5, :] = A_sing[4, :]  # rank-deficient: the least-squares branch
    for a in (A, A_sing):
        ref = _solve_psd(a, B)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _solve_psd(a * 2.0**k, B * 2.0**k)
        assert np.array_equal(got, ref)


@pytest.mark.parametrize("k", [-1000, 1000])
def test_neuron_merging_is_exactly_scale_free(k):
    W, _, _, g, b, kept = _pair_inputs()
    mean, sigma = np.zeros_like(g), np.ones_like(g)
    T, t = neuron_merging(W, g, b, mean, sigma, kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T2, t2 = neuron_merging(W * 2.0**k, g, b, mean, sigma, kept)
    assert np.array_equal(T, T2) and np.array_equal(t, t2)
