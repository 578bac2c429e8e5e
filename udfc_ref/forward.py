"""NumPy forward pass of the graph ops (eval mode, NCHW).

Convolutions are an im2col (``sliding_window_view``) followed by a matmul (one
per sample for groups = 1, written straight into the NCHW output); grouped and
depthwise convolutions are one batched matmul over the groups, no Python loop
over channels.  Values are computed in the input's dtype
(float32 for models stored as float32).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    xp = _pad(x, padding, value=-np.inf)
    return _windows(xp, kernel, stride).max(axis=(-2, -1))


def avg_pool2d(x, kernel, stride, padding, count_include_pad=True):
    xp = _pad(x, padding)
    s = _windows(xp, kernel, stride).sum(axis=(-2, -1))
    if count_include_pad or not any(padding):
        return (s / (kernel[0] * kernel[1])).astype(x.dtype, copy=False)
    ones = _pad(np.ones((1, 1) + x.shape[2:], dtype=x.dtype), padding)
    cnt = _windows(ones, kernel, stride).sum(axis=(-2, -1))
    return (s / cnt).astype(x.dtype, copy=False)


def run_node(model, n, ins):
    a = n.attrs
    P = lambda role: model.param(n, role)  # noqa: E731
    x = ins[0]
    op = n.op
    if op == "conv2d":
        return conv2d(x, P("weight"), P("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])
    if op == "batch_norm":
        return batch_norm(x, P("weight"), P("bias"), P("running_mean"), P("running_var"), a["eps"])
    if op == "linear":
        return linear(x, P("weight"), P("bias"))
    if op == "relu":
        return np.maximum(x, 0)
    if op == "relu6":
        return np.clip(x, 0, 6)
    if op == "identity":
        return x
    if op == "add":
        y = ins[0]
        for other in ins[1:]:
            y = y + other
        return y
    if op == "concat":
        return np.concatenate(ins, axis=1)
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    if op == "max_pool2d":
        return max_pool2d(x, a["kernel"], a["stride"], a["padding"])
    if op == "avg_pool2d":
        return avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["count_include_pad"])
    if op == "global_avg_pool":
        return x.mean(axis=(2, 3), keepdims=a["keepdims"])
    raise GraphError(f"node {n.name!r}: unknown op {op!r}")


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
