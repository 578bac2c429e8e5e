"""Uniform weight quantization (``docs/derivation.md``, Eq. Q1-Q3).

Convention (written down because libraries disagree):

* ``x_hat = scale * (q - zero_point)`` and
  ``q = clip(rint(x / scale) + zero_point, qmin, qmax)``; ``rint`` rounds half
  to even.
* symmetric: narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
  ``zero_point = 0``, ``scale = clip_max|x| / (2^(b-1) - 1)``;
* asymmetric: unsigned range ``[0, 2^b - 1]``, the range ``[min(x, 0),
  max(x, 0)]`` is mapped onto it and ``zero_point`` is an integer in range, so
  0.0 is represented exactly in both schemes.
* per-channel means one scale per output channel (axis 0 of OIHW / (out, in));
  per-tensor one scale in all.
* an all-zero (or, asymmetric, constant-zero-range) channel gets scale 1 and
  codes 0: no division by zero.

The scale is rounded to the storage dtype (float32; upwards where float32 is
too coarse, i.e. subnormal) *before* the codes are computed, and :func:`dequantize` is the only place codes become floats, so the
tensor a reader reconstructs from the file is bit-identical to the one the
NumPy forward used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import OptionError

VALID_BITS = tuple(range(2, 9)) + (16,)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range (Eq. Q1)."""
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


@dataclass
class QuantizedTensor:
    """Integer codes plus the affine map back to floats.

    codes : int array, same shape as the weight; scale : float array of shape
    (O,) per-channel or (1,) per-tensor (broadcast along ``axis`` 0);
    zero_point : int array like scale, or None when symmetric.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    symmetric: bool
    per_channel: bool
    dtype: str = "float32"

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scale, self.zero_point, np.dtype(self.dtype))

    def finite(self) -> bool:
        """Whether every dequantized value is finite, decided from each
        channel's smallest and largest code (``x_hat`` is monotonic in ``q``
        within a channel): integer work on the codes, no float copy."""
        if self.codes.size == 0:
            return True
        flat = self.codes.reshape(self.codes.shape[0] if self.scale.size > 1 else 1, -1)
        ext = np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1)  # (O, 2) or (1, 2)
        with np.errstate(over="ignore", invalid="ignore"):  # the answer, not a warning
            return bool(np.all(np.isfinite(dequantize(ext, self.scale, self.zero_point, np.dtype(self.dtype)))))

    def same_as(self, other: "QuantizedTensor") -> bool:
        """Equal format, equal integer codes and zero points (by value: a
        file holds 2..7-bit asymmetric codes unsigned, ``quantize`` makes them
        int8) and bit-identical scales: the same dequantized tensor."""
        def same_values(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and bool(np.array_equal(a, b))

        sa, sb = np.ascontiguousarray(self.scale), np.ascontiguousarray(other.scale)
        return ((self.bits, self.symmetric, self.per_channel, np.dtype(self.dtype))
                == (other.bits, other.symmetric, other.per_channel, np.dtype(other.dtype))
                and sa.dtype == sb.dtype and sa.shape == sb.shape
                and bool(np.array_equal(sa.reshape(-1).view(np.uint8), sb.reshape(-1).view(np.uint8)))
                and same_values(self.codes, other.codes) and same_values(self.zero_point, other.zero_point))

    def storage_bytes(self) -> int:
        n = int(np.ceil(self.codes.size * self.bits / 8))
        n += self.scale.nbytes
        if self.zero_point is not None:
            n += int(np.ceil(self.zero_point.size * self.bits / 8))
        return n


def _bshape(ndim: int, per_channel: bool):
    return (-1,) + (1,) * (ndim - 1) if per_channel else (1,) * ndim


#: elements per block of the float64 temporaries of (de)quantization: rows of
#: the weight are processed a block at a time, so the peak memory is that of the
#: result, not of float64 copies of the whole tensor
_BLOCK = 1 << 18


def _row_blocks(shape):
    """Slices of axis 0 covering about ``_BLOCK`` elements each."""
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else 1
    step = max(1, _BLOCK // per_row)
    return [slice(r, min(r + step, shape[0])) for r in range(0, shape[0], step)] if shape else [slice(None)]


def dequantize(codes, scale, zero_point, dtype=np.float32) -> np.ndarray:
    """x_hat = scale * (q - zero_point) (Eq. Q1), evaluated in float64 and
    rounded once to ``dtype`` (block of rows by block of rows)."""
    shp = _bshape(codes.ndim, scale.size > 1)
    per_channel = scale.size > 1
    s64 = scale.astype(np.float64).reshape(shp)
    z64 = None if zero_point is None else zero_point.astype(np.float64).reshape(shp)
    out = np.empty(codes.shape, dtype=dtype)
    for rows in _row_blocks(codes.shape):
        q = codes[rows].astype(np.float64)
        if z64 is not None:
            q = q - (z64[rows] if per_channel else z64)
        out[rows] = q * (s64[rows] if per_channel else s64)
    return out


def _codes(x64, scale, zp, qmin, qmax, shp):
    q = np.rint(x64 / scale.reshape(shp))
    if zp is not None:
        q = q + zp.reshape(shp)
    return np.clip(q, qmin, qmax)


def _round_scale(scale64, dtype):
    """The scale in the storage dtype: rounded to nearest (so re-quantizing a
    symmetric result recomputes the same scale), but rounded *up* where the
    storage dtype is too coarse (subnormal: more than 2^-20 relative below the
    exact scale), so the range always fits the codes; 0 after underflow
    becomes 1."""
    r = scale64.astype(dtype)
    low = r.astype(np.float64) < scale64 * (1 - 2.0**-20)
    r = np.where(low, np.nextafter(r, np.array(np.inf, dtype=dtype)), r).astype(np.float64)
    return np.where(r > 0, r, 1.0)


def _scale_zp(lo, hi, bits, symmetric, dtype):
    """Scale (rounded to ``dtype``, see :func:`_round_scale`) and zero point for the clip range [lo, hi]."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        return _round_scale(np.where(amax > 0, amax / qmax, 1.0), dtype), None
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    rng = hi - lo
    scale = _round_scale(np.where(rng > 0, rng / (qmax - qmin), 1.0), dtype)
    zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return scale, zp


def quantize(w: np.ndarray, bits: int, symmetric: bool = True, per_channel: bool = True,
             mse_clip: bool = False, n_grid: int = 64) -> QuantizedTensor:
    """Uniform quantization of a weight tensor (Eq. Q1-Q2).

    Parameters
    ----------
    w : (O, ...) float array
    bits : one of 2..8 or 16
    symmetric : narrow signed range, zero point 0 (else unsigned + zero point)
    per_channel : one scale per output channel (axis 0) instead of one in all
    mse_clip : search the clip ratio r in (0, 1] of the range that minimises
        the squared quantization error ||w - Q_r(w)||^2 (Eq. Q3), per channel;
        ``n_grid`` candidate ratios, evaluated vectorised over channels.
    """
    if bits not in VALID_BITS:
        raise OptionError(f"weight bits must be one of 2..8 or 16, got {bits!r}")
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise OptionError(f"can only quantize float tensors, got {w.dtype}")
    dtype = w.dtype
    shp = _bshape(w.ndim, per_channel)
    wflat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    lo, hi = wflat.min(axis=1).astype(np.float64), wflat.max(axis=1).astype(np.float64)  # exact in float64
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = _scale_zp(lo, hi, bits, symmetric, dtype)
    if mse_clip:
        flat = wflat.astype(np.float64)
        best_err = np.full(flat.shape[0], np.inf)
        best_scale, best_zp = scale, zp
        for r in np.linspace(1.0, 1.0 / n_grid, n_grid):
            s, z = _scale_zp(lo * r, hi * r, bits, symmetric, dtype)
            zr = None if z is None else z[:, None]
            q = np.clip(np.rint(flat / s[:, None]) + (0 if zr is None else zr), qmin, qmax)
            err = (((q - (0 if zr is None else zr)) * s[:, None] - flat) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, s, best_scale)
            if z is not None:
                best_zp = np.where(better, z, best_zp)
        scale, zp = best_scale, best_zp
    cdtype = np.int8 if bits <= 8 else np.int16
    if not symmetric and bits == 8:
        cdtype = np.uint8
    if not symmetric and bits == 16:
        cdtype = np.uint16
    codes = np.empty(w.shape, dtype=cdtype)
    for rows in _row_blocks(w.shape):  # float64 temporaries of one block of rows at a time
        sc = scale[rows] if per_channel else scale
        z = None if zp is None else (zp[rows] if per_channel else zp)
        codes[rows] = _codes(w[rows].astype(np.float64), sc, z, qmin, qmax, shp)
    return QuantizedTensor(
        codes=codes,
        scale=scale.astype(dtype),
        zero_point=None if zp is None else zp.astype(cdtype),
        bits=int(bits),
        symmetric=bool(symmetric),
        per_channel=bool(per_channel),
        dtype=str(dtype),
    )


def fake_quantize(w, bits, **kw) -> np.ndarray:
    """Q(w): quantize then dequantize, in ``w``'s dtype."""
    return quantize(w, bits, **kw).dequantize()


# ----------------------------------------------------------------- packing

#: codes per chunk of the (un)packing loops: bounded temporaries for any tensor size
_PACK_CHUNK = 8 * 65536


def _layout(bits: int):
    """(codes per group, bytes per group, integer type holding a group): a
    group of codes fills whole bytes (8 / gcd(8, bits) codes)."""
    g = 8 // math.gcd(8, bits)
    nb = bits * g // 8
    return g, nb, (np.uint8 if nb == 1 else np.uint32 if nb <= 4 else np.uint64)


def pack_codes(codes: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Pack integer codes of width ``bits`` < 8 into a flat uint8 array,
    most significant bit first, after offsetting to unsigned (q - qmin).

    A group of codes that fills whole bytes (4 six-bit codes in 3 bytes) is
    one integer of their fields; its bytes are written out, in chunks of
    ``_PACK_CHUNK`` codes (temporaries of a few MB, whatever the tensor)."""
    qmin, _ = qrange(bits, symmetric)
    flat = np.asarray(codes).reshape(-1)
    n = flat.size
    out = np.empty(-(-n * bits // 8), dtype=np.uint8)
    g, nb, it = _layout(bits)
    step = _PACK_CHUNK - _PACK_CHUNK % g
    for s in range(0, n, step):
        u = (flat[s:s + step].view(np.uint8) - np.uint8(qmin % 256)).astype(it)  # q - qmin, exact in range
        groups = -(-u.size // g)
        if u.size != g * groups:
            u = np.concatenate([u, np.zeros(g * groups - u.size, dtype=it)])
        u = u.reshape(groups, g)
        v = u[:, 0] << it(bits * (g - 1)) if g > 1 else u[:, 0].copy()
        for j in range(1, g):
            v |= u[:, j] << it(bits * (g - 1 - j))
        b = np.empty((groups, nb), dtype=np.uint8)
        for k in range(nb):
            b[:, k] = v >> it(8 * (nb - 1 - k))  # the cast keeps the low byte
        o = s // g * nb
        out[o:o + b.size] = b.reshape(-1)[: out.size - o]
    return out


def unpack_codes(packed: np.ndarray, bits: int, symmetric: bool, shape) -> np.ndarray:
    """Inverse of :func:`pack_codes`; returns int8 codes of ``shape``
    (uint8 for asymmetric codes), chunk by chunk like the packer."""
    n = int(np.prod(shape))
    need = int(np.ceil(n * bits / 8))
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != need:
        raise ValueError(f"packed codes must be {need} uint8 bytes, got {packed.size} {packed.dtype}")
    qmin, _ = qrange(bits, symmetric)
    out = np.empty(n, dtype=np.int8 if symmetric else np.uint8)
    g, nb, it = _layout(bits)
    mask = it((1 << bits) - 1)
    step = _PACK_CHUNK - _PACK_CHUNK % g
    ov = out.view(np.uint8)
    for s in range(0, n, step):
        e = min(s + step, n)
        groups = -(-(e - s) // g)
        o = s // g * nb
        raw = packed[o:o + groups * nb]
        if raw.size != groups * nb:
            raw = np.concatenate([raw, np.zeros(groups * nb - raw.size, dtype=np.uint8)])
        raw = raw.reshape(groups, nb)
        v = raw[:, 0].astype(it) << it(8 * (nb - 1)) if nb > 1 else raw[:, 0].astype(it)
        for k in range(1, nb):
            v |= raw[:, k].astype(it) << it(8 * (nb - 1 - k))
        u = np.empty((groups, g), dtype=np.uint8)
        for j in range(g):
            u[:, j] = (v >> it(bits * (g - 1 - j))) & mask
        ov[s:e] = u.reshape(-1)[: e - s] + np.uint8(qmin % 256)  # + qmin, modulo 256 as the int8 view needs
    return out.reshape(shape)
