"""Uniform quantization (Eq. Q1-Q3): properties that must hold for any tensor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from udfc_ref.errors import OptionError
from udfc_ref.quantize import VALID_BITS, dequantize, pack_codes, qrange, quantize, unpack_codes

floats = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)
weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
                 elements=floats)
bits_st = st.sampled_from(VALID_BITS)


@settings(max_examples=150, deadline=None)
@given(w=weights, bits=bits_st, symmetric=st.booleans(), per_channel=st.booleans())
# a float32-subnormal scale: rounded to nearest it would clip the range
@example(w=np.full((1, 1, 1, 1), 1.1754944e-38, np.float32), bits=16, symmetric=False, per_channel=False)
@example(w=np.full((1, 1, 1, 1), 1.1754944e-38, np.float32), bits=16, symmetric=True, per_channel=True)
def test_error_bound_zero_and_idempotence(w, bits, symmetric, per_channel):
    q = quantize(w, bits, symmetric=symmetric, per_channel=per_channel)
    d = q.dequantize()
    assert d.dtype == w.dtype and d.shape == w.shape
    qmin, qmax = qrange(bits, symmetric)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax
    # |w - Q(w)| <= scale / 2 (+ float32 rounding) everywhere: no clipping without mse_clip
    scale = q.scale.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else float(q.scale[0])
    err = np.abs(w.astype(np.float64) - d.astype(np.float64))
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(w))
    # zero is exactly representable
    w0 = w.copy()
    w0.reshape(-1)[::3] = 0.0
    d0 = quantize(w0, bits, symmetric=symmetric, per_channel=per_channel).dequantize()
    assert np.all(d0.reshape(-1)[::3] == 0.0)
    # idempotent on its own grid: re-encoding Q(w) with the same scale / zero point gives the same codes
    zp = 0.0 if q.zero_point is None else q.zero_point.astype(np.float64).reshape(np.shape(scale) if per_channel else ())
    codes2 = np.clip(np.rint(d.astype(np.float64) / scale) + zp, qmin, qmax)
    assert np.array_equal(codes2, q.codes.astype(np.float64))
    assert np.array_equal(dequantize(codes2.astype(q.codes.dtype), q.scale, q.zero_point, w.dtype), d)
    if symmetric:  # symmetric is idempotent even with the range recomputed
        assert np.array_equal(quantize(d, bits, symmetric=True, per_channel=per_channel).dequantize(), d)


@settings(max_examples=80, deadline=None)
@given(w=weights, bits=st.integers(2, 7), symmetric=st.booleans())
def test_packing_round_trip(w, bits, symmetric):
    q = quantize(w, bits, symmetric=symmetric)
    packed = pack_codes(q.codes, bits, symmetric)
    assert packed.dtype == np.uint8 and packed.size == -(-q.codes.size * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits, symmetric, q.codes.shape).astype(np.int64),
                          q.codes.astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(w=weights, bits=st.integers(2, 6), symmetric=st.booleans())
def test_mse_clip_never_worse(w, bits, symmetric):
    e_plain = ((quantize(w, bits, symmetric=symmetric).dequantize() - w).astype(np.float64) ** 2).sum()
    e_clip = ((quantize(w, bits, symmetric=symmetric, mse_clip=True).dequantize() - w).astype(np.float64) ** 2).sum()
    assert e_clip <= e_plain * (1 + 1e-6) + 1e-12


def test_mse_clip_helps_with_an_outlier():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2048)).astype(np.float32)
    w[:, 0] = 8.0
    e_plain = ((quantize(w, 4).dequantize() - w) ** 2).sum()
    e_clip = ((quantize(w, 4, mse_clip=True).dequantize() - w) ** 2).sum()
    assert e_clip < 0.8 * e_plain


def test_all_zero_channel_and_bad_bits():
    w = np.zeros((2, 3), np.float32)
    w[1] = [1, -2, 3]
    q = quantize(w, 4)
    assert np.all(np.isfinite(q.scale)) and np.all(q.dequantize()[0] == 0)
    for b in (1, 9, 17, 0):
        with pytest.raises(OptionError):
            quantize(w, b)
