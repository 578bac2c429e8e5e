"""ATen op -> udfc-ref IR: one small handler per ATen op (or op family).

A handler is registered with ``@aten("conv2d.default", ...)`` (the op's name
and overload, as ``torch.ops.aten.<name>.<overload>``) and called as
``handler(importer, node, a)``: ``a`` maps the op's schema argument names to
their values, graph nodes replaced by the walk's values (``Value``: an IR
activation; ``Const``: a parameter / buffer / folded constant;
``PendingPad``: a pad not yet emitted).  It returns the node's value (a
tuple for multi-output ops).  Handlers never see nodes whose arguments are
all constants: the importer folds those (``Importer.fold``).

Both the exporter's default IR (``conv2d``, ``batch_norm``, ``linear`` ...)
and the forms ``run_decompositions({})`` produces
(``_native_batch_norm_legit_no_training``, ``view`` ...) are handled, as are
``convolution`` / ``addmm`` / ``mm`` from core-ATen decompositions.
"""

from __future__ import annotations

import operator

import numpy as np

from .torch_import import Const, Missing, PendingPad, Value

#: handler key ("conv2d.default", "getitem") -> handler(importer, node, a)
HANDLERS: dict = {}


def aten(*keys):
    """Register the decorated function as the handler of ATen ops ``keys``."""

    def deco(fn):
        for k in keys:
            if k in HANDLERS:
                raise ValueError(f"two handlers for {k}")
            HANDLERS[k] = fn
        return fn

    return deco


def handler_key(target) -> str:
    """``torch.ops.aten.conv2d.default`` -> ``"conv2d.default"``;
    ``operator.getitem`` -> ``"getitem"``; other namespaces keep theirs."""
    if target is operator.getitem:
        return "getitem"
    if getattr(target, "_schema", None) is not None:
        ns = getattr(target, "namespace", "aten")
        return target.__name__ if ns == "aten" else f"{ns}.{target.__name__}"
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', repr(target))}"


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _pair(cv, node, v, what):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [int(v[0]), int(v[0])]
    if len(v) != 2 or not all(isinstance(x, int) for x in v):
        raise cv.error(node, f"{what} {v!r} is not an int or a pair of ints")
    return [int(v[0]), int(v[1])]


def _const(cv, node, v, what):
    if not isinstance(v, Const):
        raise cv.error(node, f"its {what} depends on the model input; only constant {what}s are supported")
    return v


def _prefix(cv, node, c, role):
    """The layer path of a parameter named ``<path>.<role>``, else the module path."""
    if c is not None and c.name and c.name.endswith("." + role):
        return c.name[: -len(role) - 1]
    return cv.module_path(node)[0]


def _rank4(cv, node, x, what):
    if len(x.shape) != 4:
        raise cv.error(node, f"{what} needs an (N, C, H, W) input, got shape {x.shape}")


def _axis(cv, node, dim, rank):
    d = int(dim) + rank if int(dim) < 0 else int(dim)
    if not 0 < d < rank:
        raise cv.error(node, f"dim {dim} is {'the batch axis' if d == 0 else 'out of range'} of a {rank}-D tensor; "
                             "only per-sample axes are supported")
    return d


def _multi(cv, node, v, *missing):
    """``v`` plus Missing placeholders for the other outputs of a multi-output op."""
    return (v,) + tuple(Missing(m) for m in missing)


# --------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------

def _conv_padding(cv, node, padding, kernel, dilation):
    """Torch conv padding (ints or 'same' / 'valid') -> [top, bottom, left, right]."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]  # torch puts the odd row / column after
            return out
        raise cv.error(node, f"padding {padding!r} is not supported")
    p = _pair(cv, node, padding, "padding")
    return [p[0], p[0], p[1], p[1]]


@aten("conv2d.default", "conv2d.padding", "convolution.default", "_convolution.default")
def conv2d(cv, node, a):
    if a.get("transposed"):
        raise cv.error(node, "transposed convolution is not supported")
    w = _const(cv, node, a["weight"], "weight")
    if w.tensor.dim() != 4:
        raise cv.error(node, f"only 2-D convolutions are supported (weight of shape {tuple(w.tensor.shape)})")
    src, extra = cv.unpad(node, a["input"], 0.0)
    _rank4(cv, node, src, "conv2d")
    dilation = _pair(cv, node, a["dilation"], "dilation")
    pad = _conv_padding(cv, node, a["padding"], list(w.tensor.shape[2:]), dilation)
    prefix = _prefix(cv, node, w, "weight")
    name = cv.node_name(node, prefix)
    params = {"weight": cv.param(node, w, prefix, "weight")}
    if a.get("bias") is not None:
        params["bias"] = cv.param(node, _const(cv, node, a["bias"], "bias"), prefix, "bias")
    attrs = {"stride": _pair(cv, node, a["stride"], "stride"), "padding": [p + e for p, e in zip(pad, extra)],
             "dilation": dilation, "groups": int(a["groups"])}
    return cv.emit(node, "conv2d", [src], attrs, params, name=name)


_BN_TUPLE = ("the saved mean of batch norm", "the saved inverse std of batch norm")


@aten("batch_norm.default", "_native_batch_norm_legit_no_training.default", "native_batch_norm.default",
      "_native_batch_norm_legit.default")
def batch_norm(cv, node, a):
    mean, var = a.get("running_mean"), a.get("running_var")
    if mean is None or var is None:
        raise cv.error(node, "BatchNorm without running statistics (track_running_stats=False) normalises with "
                             "batch statistics and cannot be converted")
    if a.get("training", False):
        raise cv.error(node, "BatchNorm in training mode uses batch statistics; convert the module in eval mode")
    x = cv.tensor(node, a["input"])
    if len(x.shape) not in (2, 4):
        raise cv.error(node, f"batch norm on a {len(x.shape)}-D input is not supported (only (N, C) and (N, C, H, W))")
    mean = _const(cv, node, mean, "running mean")
    var = _const(cv, node, var, "running variance")
    prefix = _prefix(cv, node, mean, "running_mean")
    name = cv.node_name(node, prefix)
    c = mean.tensor.shape[0]
    torch = cv.torch
    params = {}
    for role, v, fill in (("weight", a.get("weight"), 1.0), ("bias", a.get("bias"), 0.0)):
        # affine=False: explicit gamma = 1 / beta = 0 tensors
        v = _const(cv, node, v, role) if v is not None else Const(torch.full((c,), fill, dtype=mean.tensor.dtype))
        params[role] = cv.param(node, v, prefix, role)
    params["running_mean"] = cv.param(node, mean, prefix, "running_mean")
    params["running_var"] = cv.param(node, var, prefix, "running_var")
    v = cv.emit(node, "batch_norm", [x], {"eps": float(a["eps"])}, params, name=name)
    return v if len(node.target._schema.returns) == 1 else _multi(cv, node, v, *_BN_TUPLE)


def _linear(cv, node, x, w, bias, w_array=None, b_array=None):
    """IR linear of activation ``x`` with constant weight ``w`` (O, F)."""
    shape = tuple((w.tensor if w_array is None else w_array).shape)
    if len(shape) != 2 or not x.shape or shape[1] != x.shape[-1]:
        raise cv.error(node, f"weight of shape {shape} does not act on the last axis of the input {x.shape}")
    prefix = _prefix(cv, node, w, "weight")
    name = cv.node_name(node, prefix)
    params = {"weight": cv.param(node, w, prefix, "weight", w_array)}
    if bias is not None:
        params["bias"] = cv.param(node, _const(cv, node, bias, "bias"), prefix, "bias", b_array)
    return cv.emit(node, "linear", [x], {}, params, name=name)


@aten("linear.default")
def linear(cv, node, a):
    w = _const(cv, node, a["weight"], "weight")
    return _linear(cv, node, cv.tensor(node, a["input"]), w, a.get("bias"))


def _right_weight(cv, node, m):
    """``x @ m`` with constant m (F, O) as a linear weight (O, F): the
    parameter itself when m is its transpose (``addmm(b, x, t(W))``)."""
    m = _const(cv, node, m, "right operand")
    if m.tensor.dim() != 2:
        raise cv.error(node, f"matrix product with a {m.tensor.dim()}-D constant is not supported")
    w = m.tensor.t()
    if m.transpose_of is not None:
        return Const(w, m.transpose_of)
    return Const(w)


@aten("addmm.default")
def addmm(cv, node, a):
    x = cv.tensor(node, a["mat1"])
    w = _right_weight(cv, node, a["mat2"])
    alpha, beta = float(a.get("alpha", 1)), float(a.get("beta", 1))
    bias = _const(cv, node, a["self"], "bias")
    b = bias.tensor.detach().reshape(-1)
    if b.numel() == 1:
        b = b.expand(w.tensor.shape[0])
    return _linear(cv, node, x, w, bias, None if alpha == 1 else w.tensor.detach().numpy() * alpha,
                   None if beta == 1 and tuple(b.shape) == tuple(bias.tensor.shape) else b.numpy() * beta)


@aten("mm.default", "matmul.default")
def mm(cv, node, a):
    x = cv.tensor(node, a["self"])
    return _linear(cv, node, x, _right_weight(cv, node, a.get("mat2", a.get("other"))), None)


@aten("layer_norm.default", "native_layer_norm.default")
def layer_norm(cv, node, a):
    x = cv.tensor(node, a["input"])
    ns = list(a["normalized_shape"])
    if len(ns) != 1 or ns[0] != x.shape[-1]:
        raise cv.error(node, f"layer norm over the trailing dims {ns} is not supported (only over the last axis)")
    w, b = a.get("weight"), a.get("bias")
    prefix = _prefix(cv, node, w if w is not None else b, "weight" if w is not None else "bias")
    name = cv.node_name(node, prefix)
    params = {}
    for role, v in (("weight", w), ("bias", b)):
        if v is not None:
            params[role] = cv.param(node, _const(cv, node, v, role), prefix, role)
    v = cv.emit(node, "layer_norm", [x], {"axis": len(x.shape) - 1, "eps": float(a["eps"])}, params, name=name)
    return v if len(node.target._schema.returns) == 1 else _multi(cv, node, v, "the mean of layer norm",
                                                                   "the inverse std of layer norm")


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------

def _pointwise(op):
    def handler(cv, node, a):
        return cv.emit(node, op, [cv.tensor(node, a["self"])])

    handler.__name__ = f"pointwise_{op}"
    return handler


for _op, _keys in {
    "relu": ("relu.default", "relu_.default"),
    "relu6": ("relu6.default", "relu6_.default"),
    "sigmoid": ("sigmoid.default", "sigmoid_.default"),
    "silu": ("silu.default", "silu_.default"),
    "hardsigmoid": ("hardsigmoid.default", "hardsigmoid_.default"),
    "hardswish": ("hardswish.default", "hardswish_.default"),
}.items():
    aten(*_keys)(_pointwise(_op))


def _clamp(cv, node, x, lo, hi):
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo == 0.0 and hi == 6.0:
        return cv.emit(node, "relu6", [cv.tensor(node, x)])
    if lo == 0.0 and (hi is None or hi == float("inf")):
        return cv.emit(node, "relu", [cv.tensor(node, x)])
    raise cv.error(node, f"clamping to [{lo}, {hi}] is not supported (only [0, 6] = ReLU6 and [0, inf) = ReLU)")


@aten("hardtanh.default", "hardtanh_.default")
def hardtanh(cv, node, a):
    return _clamp(cv, node, a["self"], a["min_val"], a["max_val"])


@aten("clamp.default", "clamp_.default", "clip.default", "clip_.default")
def clamp(cv, node, a):
    return _clamp(cv, node, a["self"], a.get("min"), a.get("max"))


@aten("clamp_min.default", "clamp_min_.default")
def clamp_min(cv, node, a):
    return _clamp(cv, node, a["self"], a["min"], None)


@aten("gelu.default", "gelu_.default")
def gelu(cv, node, a):
    return cv.emit(node, "gelu", [cv.tensor(node, a["self"])], {"approximate": a.get("approximate", "none")})


@aten("_softmax.default", "softmax.int", "_safe_softmax.default")
def softmax(cv, node, a):
    x = cv.tensor(node, a["self"])
    if a.get("half_to_float") or a.get("dtype") is not None:
        raise cv.error(node, "softmax with a dtype change is not supported")
    return cv.emit(node, "softmax", [x], {"axis": _axis(cv, node, a["dim"], len(x.shape))})


# --------------------------------------------------------------------------
# elementwise arithmetic
# --------------------------------------------------------------------------

def _along_axis(cv, node, x, c):
    """(axis, (S,) float64 vector) of a constant ``c`` (tensor or number)
    broadcast against activation ``x``: it may vary along one per-sample
    axis at most; a scalar is spread along axis 1."""
    torch = cv.torch
    t = c.tensor.detach() if isinstance(c, Const) else torch.tensor(float(c))
    rank = len(x.shape)
    if t.dim() > rank:
        raise cv.error(node, f"a constant of shape {tuple(t.shape)} does not broadcast to the input {x.shape}")
    shape = (1,) * (rank - t.dim()) + tuple(t.shape)
    varying = [d for d, s in enumerate(shape) if s != 1]
    if any(shape[d] != x.shape[d] for d in varying) or 0 in varying:
        raise cv.error(node, f"a constant of shape {tuple(t.shape)} does not broadcast per sample to the input "
                             f"{x.shape} (it would change the shape or vary along the batch axis)")
    if len(varying) > 1:
        raise cv.error(node, f"a constant of shape {tuple(t.shape)} varies along {len(varying)} axes; only "
                             "per-axis constants (scalars, per-channel vectors) are supported")
    arr = t.to(torch.float64).numpy().reshape(-1)
    if not varying:
        return 1, np.full(x.shape[1], float(arr[0]))
    return varying[0], arr


def _affine(cv, node, x, c, scale=None, shift=None, x_coef=1.0):
    """IR ``affine`` for an elementwise op of activation ``x`` and constant
    ``c`` (a tensor or a number): ``x * (scale * c)`` when ``scale`` is given,
    else ``x_coef * x + shift * c``."""
    x = cv.tensor(node, x)
    axis, vec = _along_axis(cv, node, x, c)  # float64; param() stores it in the model's dtype
    name = cv.node_name(node)
    src = c if isinstance(c, Const) else Const(cv.torch.tensor(float(c)))
    params = {}
    if scale is not None:
        params["weight"] = cv.param(node, src, name, "weight", scale * vec)
    else:
        if x_coef != 1.0:
            params["weight"] = cv.param(node, Const(cv.torch.tensor(x_coef)), name, "weight",
                                        np.full(vec.shape, x_coef))
        params["bias"] = cv.param(node, src, name, "bias", shift * vec)
    return cv.emit(node, "affine", [x], {"axis": axis}, params, name=name)


def _is_act(v):
    return isinstance(v, (Value, PendingPad, Missing))


def _two_acts(cv, node, x, y, what):
    if _is_act(x) and _is_act(y):
        raise cv.error(node, f"the {what} of two activations is not supported")


@aten("add.Tensor", "add_.Tensor", "add.Scalar", "add_.Scalar")
def add(cv, node, a):
    x, y, alpha = a["self"], a["other"], float(a.get("alpha", 1))
    if _is_act(x) and _is_act(y):
        x, y = cv.tensor(node, x), cv.tensor(node, y)
        if alpha != 1:
            raise cv.error(node, f"add with alpha={alpha} of two activations is not supported")
        if x.shape != y.shape:
            raise cv.error(node, f"broadcasting add of {x.shape} and {y.shape} is not supported (only equal shapes)")
        return cv.emit(node, "add", [x, y])
    if _is_act(x):  # x + alpha * c
        return _affine(cv, node, x, y, shift=alpha)
    return _affine(cv, node, y, x, shift=1.0, x_coef=alpha)  # c + alpha * x


@aten("sub.Tensor", "sub_.Tensor", "sub.Scalar", "sub_.Scalar")
def sub(cv, node, a):
    x, y, alpha = a["self"], a["other"], float(a.get("alpha", 1))
    _two_acts(cv, node, x, y, "difference")
    if _is_act(x):  # x - alpha * c
        return _affine(cv, node, x, y, shift=-alpha)
    return _affine(cv, node, y, x, shift=1.0, x_coef=-alpha)  # c - alpha * x


@aten("rsub.Scalar", "rsub.Tensor")
def rsub(cv, node, a):  # other - alpha * self
    x, y, alpha = a["self"], a["other"], float(a.get("alpha", 1))
    _two_acts(cv, node, x, y, "difference")
    if _is_act(x):
        return _affine(cv, node, x, y, shift=1.0, x_coef=-alpha)
    return _affine(cv, node, y, x, shift=-alpha)


@aten("mul.Tensor", "mul_.Tensor", "mul.Scalar", "mul_.Scalar")
def mul(cv, node, a):
    x, y = a["self"], a["other"]
    if _is_act(x) and _is_act(y):
        x, y = cv.tensor(node, x), cv.tensor(node, y)
        if len(x.shape) != len(y.shape) or x.shape[0] != y.shape[0]:
            raise cv.error(node, f"product of {x.shape} and {y.shape} is not supported (same rank and batch needed)")
        return cv.emit(node, "mul", [x, y])
    if not _is_act(x):
        x, y = y, x
    return _affine(cv, node, x, y, scale=1.0)


@aten("div.Tensor", "div_.Tensor", "div.Scalar", "div_.Scalar")
def div(cv, node, a):
    x, y = a["self"], a["other"]
    if _is_act(y):
        raise cv.error(node, "division by an activation is not supported")
    t = y.tensor.detach() if isinstance(y, Const) else cv.torch.tensor(float(y))
    return _affine(cv, node, x, Const(1.0 / t.to(cv.torch.float64)), scale=1.0)


@aten("neg.default", "neg_.default")
def neg(cv, node, a):
    return _affine(cv, node, a["self"], -1.0, scale=1.0)


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

def _reshape(cv, node, src):
    """Any view / reshape: from the shapes the exporter recorded.  A reshape
    that keeps the leading (batch) size and the per-sample element count is a
    per-sample C-order reshape (row-major order keeps each sample's block)."""
    x = cv.tensor(node, src)
    out = cv.shape_of(node)
    if not out or out[0] != x.shape[0] or int(np.prod(out[1:])) != int(np.prod(x.shape[1:])):
        raise cv.error(node, f"reshape of {x.shape} to {out} mixes the batch axis with the others")
    if out == x.shape:
        return x
    if len(x.shape) == 4 and len(out) == 2:
        return cv.emit(node, "flatten", [x])
    return cv.emit(node, "reshape", [x], {"shape": list(out[1:])})


@aten("view.default", "_unsafe_view.default", "reshape.default", "flatten.using_ints", "squeeze.default",
      "squeeze.dim", "squeeze.dims", "unsqueeze.default", "unflatten.int", "view_as.default", "reshape_as.default")
def view(cv, node, a):
    return _reshape(cv, node, a.get("self", a.get("input")))


def _permute(cv, node, src, perm):
    x = cv.tensor(node, src)
    rank = len(x.shape)
    perm = [int(p) + rank if int(p) < 0 else int(p) for p in perm]
    if sorted(perm) != list(range(rank)):
        raise cv.error(node, f"{perm} is not a permutation of the {rank} axes")
    if perm[0] != 0:
        raise cv.error(node, f"permutation {perm} moves the batch axis; only per-sample permutations are supported")
    if perm == list(range(rank)):
        return x
    return cv.emit(node, "permute", [x], {"perm": perm})


@aten("permute.default")
def permute(cv, node, a):
    return _permute(cv, node, a["self"], a["dims"])


@aten("transpose.int", "swapaxes.default", "t.default")
def transpose(cv, node, a):
    x = cv.tensor(node, a["self"])
    rank = len(x.shape)
    d0, d1 = (a.get("dim0", 0), a.get("dim1", 1)) if "dim0" in a else (a.get("axis0", 0), a.get("axis1", 1))
    perm = list(range(rank))
    d0, d1 = int(d0) % rank, int(d1) % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permute(cv, node, x, perm)


@aten("cat.default", "concat.default", "concatenate.default")
def cat(cv, node, a):
    xs = [cv.tensor(node, v, "input list") for v in a["tensors"]]
    if len(xs) == 1:
        return xs[0]
    dim = _axis(cv, node, a.get("dim", 0), len(xs[0].shape))
    if dim != 1 or len(xs[0].shape) not in (2, 4):
        raise cv.error(node, f"concatenation on dim {dim} of {len(xs[0].shape)}-D tensors is not supported (only "
                             "the channel / feature axis 1 of (N, C, H, W) or (N, F) tensors)")
    return cv.emit(node, "concat", xs, {"axis": 1})


@aten("expand.default", "expand_as.default")
def expand(cv, node, a):
    x = cv.tensor(node, a["self"])
    if cv.shape_of(node) != x.shape:
        raise cv.error(node, f"expanding {x.shape} to {cv.shape_of(node)} is not supported")
    return x


@aten("getitem")
def getitem(cv, node, a):
    seq, i = a["arg0"], a["arg1"]
    if not isinstance(seq, (tuple, list)):
        raise cv.error(node, f"indexing a {type(seq).__name__} is not supported")
    return seq[i]


def _same(cv, node, a):
    return cv.tensor(node, a["self"])


for _k in ("clone.default", "contiguous.default", "alias.default", "detach.default", "detach_.default",
           "lift_fresh_copy.default"):
    aten(_k)(_same)


@aten("_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "type_as.default")
def to(cv, node, a):
    x = cv.tensor(node, a["self"])
    src = node.args[0].meta.get("val")
    dst = node.meta.get("val")
    if getattr(src, "dtype", None) != getattr(dst, "dtype", None):
        raise cv.error(node, f"a dtype change ({getattr(src, 'dtype', '?')} -> {getattr(dst, 'dtype', '?')}) is "
                             "not supported")
    return x


@aten("dropout.default", "dropout_.default", "feature_dropout.default", "feature_dropout_.default",
      "alpha_dropout.default", "alpha_dropout_.default", "native_dropout.default")
def dropout(cv, node, a):
    if a.get("train"):
        raise cv.error(node, "dropout in training mode; convert the module in eval mode")
    x = cv.tensor(node, a.get("input", a.get("self")))
    return x if len(node.target._schema.returns) == 1 else _multi(cv, node, x, "the dropout mask")


# --------------------------------------------------------------------------
# padding and pooling
# --------------------------------------------------------------------------

@aten("pad.default", "constant_pad_nd.default")
def pad(cv, node, a):
    mode = a.get("mode", "constant")
    value = a.get("value")
    value = 0.0 if value is None else float(value)
    p = [int(v) for v in a["pad"]]
    src = a["self"]
    shape = cv.shape_of(node)
    if mode != "constant" or len(p) not in (2, 4, 6, 8) or any(v < 0 for v in p) or any(p[4:]) or len(shape) != 4:
        raise cv.error(node, f"only constant, non-negative padding of H and W of an (N, C, H, W) tensor is "
                             f"supported, got pad={p} mode={mode!r}")
    pads = [p[2], p[3], p[0], p[1]] if len(p) >= 4 else [0, 0, p[0], p[1]]
    if isinstance(src, PendingPad) and src.value == value:  # pad of a pad
        return PendingPad(src.src, [x + y for x, y in zip(src.pads, pads)], value, node, shape)
    return PendingPad(cv.tensor(node, src), pads, value, node, shape)


def _pool_common(cv, node, a, kernel, value, fold_ok=True):
    """(source, kernel, stride, [t, b, l, r]) of a pooling op, a pending pad
    of ``value`` folded in when the IR's pooling padding allows it."""
    k = _pair(cv, node, kernel, "kernel size")
    st = a.get("stride")
    stride = k if st is None or list(st) == [] else _pair(cv, node, st, "stride")
    p = _pair(cv, node, a.get("padding", 0), "padding")
    pad = [p[0], p[0], p[1], p[1]]
    src = a["self"]
    if fold_ok:
        inner, extra = cv.unpad(node, src, value)
        total = [x + y for x, y in zip(pad, extra)]
        if max(total[:2]) <= k[0] // 2 and max(total[2:]) <= k[1] // 2:
            return inner, k, stride, total
    x = cv.tensor(node, src)
    _rank4(cv, node, x, "pooling")
    return x, k, stride, pad


def _check_ceil(cv, node, a, x, k, stride, pad, out_shape):
    """ceil_mode=True is accepted where it does not change the output size."""
    if not a.get("ceil_mode"):
        return
    h, w = x.shape[2:]
    floor = ((h + pad[0] + pad[1] - k[0]) // stride[0] + 1, (w + pad[2] + pad[3] - k[1]) // stride[1] + 1)
    if tuple(out_shape[2:4]) != floor:
        raise cv.error(node, "ceil_mode=True changes the output size here, which is not supported")


@aten("max_pool2d.default", "max_pool2d_with_indices.default")
def max_pool2d(cv, node, a):
    if _pair(cv, node, a.get("dilation", 1), "dilation") != [1, 1]:
        raise cv.error(node, f"max pooling with dilation {a['dilation']} is not supported")
    x, k, stride, pad = _pool_common(cv, node, a, a["kernel_size"], float("-inf"))
    indices = len(node.target._schema.returns) > 1
    _check_ceil(cv, node, a, x, k, stride, pad, cv.shape_of(node))
    v = cv.emit(node, "max_pool2d", [x], {"kernel": k, "stride": stride, "padding": pad})
    return _multi(cv, node, v, "the indices of max pooling") if indices else v


@aten("avg_pool2d.default")
def avg_pool2d(cv, node, a):
    if a.get("divisor_override") is not None:
        raise cv.error(node, "average pooling with divisor_override is not supported")
    include = bool(a.get("count_include_pad", True))
    x, k, stride, pad = _pool_common(cv, node, a, a["kernel_size"], 0.0, fold_ok=include)
    _check_ceil(cv, node, a, x, k, stride, pad, cv.shape_of(node))
    return cv.emit(node, "avg_pool2d", [x], {"kernel": k, "stride": stride, "padding": pad,
                                               "count_include_pad": include})


@aten("adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default")
def adaptive_avg_pool2d(cv, node, a):
    x = cv.tensor(node, a["self"])
    _rank4(cv, node, x, "adaptive average pooling")
    out = list(a["output_size"])
    out = [x.shape[2 + i] if o is None else int(o) for i, o in enumerate(out)]
    if out == [1, 1]:
        return cv.emit(node, "global_avg_pool", [x], {"keepdims": True})
    if out == list(x.shape[2:]):
        return x
    if x.shape[2] % out[0] == 0 and x.shape[3] % out[1] == 0:
        k = [x.shape[2] // out[0], x.shape[3] // out[1]]
        return cv.emit(node, "avg_pool2d", [x], {"kernel": k, "stride": k, "padding": [0, 0, 0, 0],
                                                   "count_include_pad": True})
    raise cv.error(node, f"adaptive average pooling from {tuple(x.shape[2:])} to {tuple(out)} is not supported "
                         "(the output size must divide the input size)")


@aten("mean.dim")
def mean(cv, node, a):
    """Mean over H, W of (N, C, H, W): ``global_avg_pool``; over the trailing
    axes of any other value (``x.flatten(2).mean(-1)``): a reshape to
    (P, M, 1), ``global_avg_pool`` and a reshape to the result's shape."""
    x = cv.tensor(node, a["self"])
    dims = a.get("dim")
    rank = len(x.shape)
    dims = list(range(1, rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(int(d) + rank if int(d) < 0 else int(d) for d in dims)
    keep = bool(a.get("keepdim", False))
    if a.get("dtype") is not None or not dims or dims != list(range(dims[0], rank)) or dims[0] < 1:
        raise cv.error(node, f"mean over dims {dims} of a {rank}-D tensor is not supported (only over trailing "
                             "per-sample axes, e.g. the spatial dims (2, 3) of an (N, C, H, W) tensor)")
    if rank == 4 and dims == [2, 3]:
        return cv.emit(node, "global_avg_pool", [x], {"keepdims": keep})
    lead = int(np.prod(x.shape[1:dims[0]]))
    inner = int(np.prod(x.shape[dims[0]:]))
    base = cv.node_name(node)
    r = cv.emit(node, "reshape", [x], {"shape": [lead, inner, 1]}, name=cv.node_name(node, base + ".reshape"),
                shape=(x.shape[0], lead, inner, 1))
    y = cv.emit(node, "global_avg_pool", [r], {"keepdims": False}, name=base, shape=(x.shape[0], lead))
    out = cv.shape_of(node)
    if out == y.shape:
        return y
    return cv.emit(node, "reshape", [y], {"shape": list(out[1:])}, name=cv.node_name(node, base + ".view"))
