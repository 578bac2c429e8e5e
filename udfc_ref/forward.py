"""NumPy forward pass of the graph ops (eval mode, NCHW).

Convolutions are an im2col (``sliding_window_view``) followed by a matmul (one
per sample for groups = 1, written straight into the NCHW output); grouped and
depthwise convolutions are one batched matmul over the groups, no Python loop
over channels.  Values are computed in the input's dtype
(float32 for models stored as float32).
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf, expit

from .errors import GraphError, UDFCError


def _pad(x: np.ndarray, padding, value=0.0) -> np.ndarray:
    t, b, l, r = padding
    if t == b == l == r == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), mode="constant", constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation=(1, 1)) -> np.ndarray:
    """(N, C, H, W) -> (N, C, Ho, Wo, kh, kw) view of the sliding windows."""
    kh, kw = kernel
    dh, dw = dilation
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    v = sliding_window_view(x, (eh, ew), axis=(2, 3))
    return v[:, :, :: stride[0], :: stride[1], ::dh, ::dw]


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """2-D cross-correlation as in ``torch.nn.functional.conv2d``.

    x (N, C, H, W); weight (O, C/groups, kh, kw); padding [top, bottom, left, right].
    """
    n, c = x.shape[:2]
    o, cg, kh, kw = weight.shape
    xp = _pad(x, padding)
    if kh == kw == 1 and tuple(stride) == (1, 1) and groups == 1:
        ho, wo = xp.shape[2:]
        y = np.matmul(weight.reshape(o, c), xp.reshape(n, c, ho * wo)).reshape(n, o, ho, wo)
    elif groups == 1:
        # one (O, K) @ (K, Ho*Wo) matmul per sample writes NCHW directly (no output transpose)
        win = _windows(xp, (kh, kw), stride, dilation)  # N, C, Ho, Wo, kh, kw
        ho, wo = win.shape[2:4]
        wmat = weight.reshape(o, c * kh * kw)
        y = np.empty((n, o, ho, wo), dtype=np.result_type(x.dtype, weight.dtype))
        for i in range(n):
            cols = win[i].transpose(0, 3, 4, 1, 2).reshape(c * kh * kw, ho * wo)
            np.matmul(wmat, cols, out=y[i].reshape(o, ho * wo))
    else:
        win = _windows(xp, (kh, kw), stride, dilation)  # N, C, Ho, Wo, kh, kw
        ho, wo = win.shape[2:4]
        g = groups
        og = o // g
        # cols: (G, N*Ho*Wo, Cg*kh*kw)
        cols = win.reshape(n, g, cg, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6).reshape(g, n * ho * wo, cg * kh * kw)
        wmat = weight.reshape(g, og, cg * kh * kw).transpose(0, 2, 1)  # G, K, Og
        y = np.matmul(cols, wmat)  # G, P, Og
        y = y.reshape(g, n, ho, wo, og).transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo)
    if bias is not None:
        y = y + bias.reshape(1, o, 1, 1).astype(y.dtype, copy=False)
    return np.ascontiguousarray(y)


def batch_norm(x, gamma, beta, mean, var, eps):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel (axis 1)."""
    scale = (gamma / np.sqrt(var + eps)).astype(x.dtype)
    shift = (beta - mean * gamma / np.sqrt(var + eps)).astype(x.dtype)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = x * scale.reshape(shape)
    y += shift.reshape(shape)
    return y


def linear(x, weight, bias=None):
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def max_pool2d(x, kernel, stride, padding):
    """Max over each window, as the running ``np.maximum`` of the ``kh * kw``
    strided shifts of the padded input (the same values as reducing the window
    view, without NumPy's slow reduction over two strided axes: 0.19 s of a
    1.2 s ResNet-50 forward was its one 3x3/2 pool)."""
    xp = _pad(x, padding, value=-np.inf)
    kh, kw = kernel
    sh, sw = stride
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            s = xp[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            out = s.copy() if out is None else np.maximum(out, s, out=out)
    return out


def avg_pool2d(x, kernel, stride, padding, count_include_pad=True):
    xp = _pad(x, padding)
    s = _windows(xp, kernel, stride).sum(axis=(-2, -1))
    if count_include_pad or not any(padding):
        return (s / (kernel[0] * kernel[1])).astype(x.dtype, copy=False)
    ones = _pad(np.ones((1, 1) + x.shape[2:], dtype=x.dtype), padding)
    cnt = _windows(ones, kernel, stride).sum(axis=(-2, -1))
    return (s / cnt).astype(x.dtype, copy=False)


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def layer_norm(x, axis, eps, weight=None, bias=None):
    """(x - mean) / sqrt(var + eps) over ``axis`` (biased variance), then
    ``* weight + bias`` broadcast along that axis."""
    xf = x.astype(np.float64) if x.dtype != np.float64 else x
    mu = xf.mean(axis=axis, keepdims=True)
    d = xf - mu
    var = (d * d).mean(axis=axis, keepdims=True)
    y = d / np.sqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype, copy=False)


def affine(x, axis, weight=None, bias=None):
    """x * weight + bias, both (S,) along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    y = x
    if weight is not None:
        y = y * weight.reshape(shape).astype(x.dtype, copy=False)
    if bias is not None:
        y = y + bias.reshape(shape).astype(x.dtype, copy=False)
    return y


_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return (0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))).astype(x.dtype, copy=False)
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(x.dtype, copy=False)


def _hardsigmoid(x):
    return (np.clip(x + 3.0, 0.0, 6.0) / 6.0).astype(x.dtype, copy=False)


#: op -> kernel(model, node, inputs): one NumPy kernel per op of ``ops.OPS``
KERNELS = {
    "conv2d": lambda m, n, ins: conv2d(ins[0], m.param(n, "weight"), m.param(n, "bias"), n.attrs["stride"],
                                       n.attrs["padding"], n.attrs["dilation"], n.attrs["groups"]),
    "batch_norm": lambda m, n, ins: batch_norm(ins[0], m.param(n, "weight"), m.param(n, "bias"),
                                               m.param(n, "running_mean"), m.param(n, "running_var"), n.attrs["eps"]),
    "linear": lambda m, n, ins: linear(ins[0], m.param(n, "weight"), m.param(n, "bias")),
    "affine": lambda m, n, ins: affine(ins[0], n.attrs["axis"], m.param(n, "weight"), m.param(n, "bias")),
    "layer_norm": lambda m, n, ins: layer_norm(ins[0], n.attrs["axis"], n.attrs["eps"], m.param(n, "weight"),
                                               m.param(n, "bias")),
    "relu": lambda m, n, ins: np.maximum(ins[0], 0),
    "relu6": lambda m, n, ins: np.clip(ins[0], 0, 6),
    "identity": lambda m, n, ins: ins[0],
    "sigmoid": lambda m, n, ins: expit(ins[0]),
    "silu": lambda m, n, ins: ins[0] * expit(ins[0]),
    "hardsigmoid": lambda m, n, ins: _hardsigmoid(ins[0]),
    "hardswish": lambda m, n, ins: ins[0] * _hardsigmoid(ins[0]),
    "gelu": lambda m, n, ins: gelu(ins[0], n.attrs["approximate"]),
    "softmax": lambda m, n, ins: _softmax(ins[0], n.attrs["axis"]),
    "add": lambda m, n, ins: functools.reduce(np.add, ins),
    "mul": lambda m, n, ins: ins[0] * ins[1],
    "concat": lambda m, n, ins: np.concatenate(ins, axis=1),
    "flatten": lambda m, n, ins: ins[0].reshape(ins[0].shape[0], -1),
    "reshape": lambda m, n, ins: ins[0].reshape((ins[0].shape[0],) + tuple(n.attrs["shape"])),
    "permute": lambda m, n, ins: np.ascontiguousarray(ins[0].transpose(n.attrs["perm"])),
    "pad": lambda m, n, ins: _pad(ins[0], n.attrs["padding"], n.attrs["value"]),
    "max_pool2d": lambda m, n, ins: max_pool2d(ins[0], n.attrs["kernel"], n.attrs["stride"], n.attrs["padding"]),
    "avg_pool2d": lambda m, n, ins: avg_pool2d(ins[0], n.attrs["kernel"], n.attrs["stride"], n.attrs["padding"],
                                               n.attrs["count_include_pad"]),
    "global_avg_pool": lambda m, n, ins: ins[0].mean(axis=(2, 3), keepdims=n.attrs["keepdims"]),
}


def run_node(model, n, ins):
    k = KERNELS.get(n.op)
    if k is None:
        raise GraphError(f"node {n.name!r}: unknown op {n.op!r}")
    return k(model, n, ins)


def run(model, x, return_values=False):
    """Evaluate ``model`` on ``x`` (N, C, H, W); see :meth:`Model.forward`."""
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise UDFCError(f"input {model.input_name!r} must have shape (N, {', '.join(map(str, model.input_shape))}), "
                        f"got {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    values = {model.input_name: x}
    last_use = {}
    for i, n in enumerate(model.nodes):
        for v in n.inputs:
            last_use[v] = i
    for i, n in enumerate(model.nodes):
        values[n.output] = run_node(model, n, [values[v] for v in n.inputs])
        if not return_values:
            for v in n.inputs:
                if last_use.get(v) == i and v != model.output_name:
                    values.pop(v, None)
    return values if return_values else values[model.output_name]
