"""The graph ops: one small specification per op.

Every op of the intermediate representation is registered here with
:func:`register`: how many inputs it takes, its parameter roles, how its
attributes are normalised to the canonical form (``docs/format.md``), and its
shape rule.  :meth:`udfc_ref.graph.Model.validate` only dispatches through
this table, and ``forward.py`` holds one NumPy kernel per op in the same
way, so a new op is one entry in each, never a new branch in a long function.

Shapes exclude the batch axis: a value is ``(C, H, W)`` (NCHW activations),
``(F,)`` (features) or any other per-sample shape that ``reshape`` /
``permute`` produce.  Attributes that name an axis (``axis``, ``perm``,
``start_dim``) count the batch axis as 0, as PyTorch does, so the channel
axis of an NCHW value is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import GraphError

#: largest attribute integer (kernel, stride, padding, dilation, groups) and
#: largest number of elements of one value (batch excluded) a model may have;
#: beyond these a file is corrupt or hostile, not a CNN this tool can run.
MAX_ATTR_INT = 1 << 20
MAX_VALUE_ELEMENTS = 1 << 28
#: largest rank of a value (batch excluded)
MAX_RANK = 6


@dataclass(frozen=True)
class OpSpec:
    """What the graph knows of one op.

    ``n_inputs`` k > 0: exactly k inputs; k < 0: at least -k.
    ``pointwise``: elementwise on one input, output shape = input shape.
    ``normalise(node)`` rewrites ``node.attrs`` in place to the canonical form;
    ``infer(model, node, shapes)`` returns the output shape."""

    name: str
    n_inputs: int
    params: tuple
    optional: tuple
    normalise: Callable
    infer: Callable
    pointwise: bool = False


OPS: dict[str, OpSpec] = {}

#: pointwise activations (no parameters, shape kept); the data model knows
#: their moments (``moments.py``)
ACTIVATION_OPS = ("relu", "relu6", "identity", "sigmoid", "silu", "hardsigmoid", "hardswish", "gelu")


def _no_attrs(node) -> None:
    return None


def register(name, *, n_inputs=1, params=(), optional=(), attrs=None, pointwise=False):
    """Decorator: register ``infer(model, node, shapes)`` as op ``name``."""

    def deco(infer):
        OPS[name] = OpSpec(name, n_inputs, tuple(params), tuple(optional), attrs or _no_attrs, infer, pointwise)
        return infer

    return deco


# --------------------------------------------------------------------------
# attribute helpers
# --------------------------------------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return bool(np.isfinite(float(v)))
    except (OverflowError, TypeError, ValueError):
        return False


def _err(node, msg) -> GraphError:
    return GraphError(f"node {node.name!r}: {msg}")


def bool_attr(node, key: str, default: bool) -> bool:
    v = node.attrs.get(key, default)
    if not isinstance(v, (bool, np.bool_)):
        raise _err(node, f"attribute {key!r} must be true or false, got {v!r}")
    return bool(v)


def _check_attr_ints(node, key: str, values) -> None:
    if any(abs(int(x)) > MAX_ATTR_INT for x in values):
        raise _err(node, f"attribute {key!r} = {list(values)!r} is implausibly large (limit {MAX_ATTR_INT})")


def int_pair(node, key: str, default) -> list[int]:
    v = node.attrs.get(key, default)
    if is_int(v):
        v = [int(v), int(v)]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(is_int(x) for x in v):
        raise _err(node, f"attribute {key!r} must be an int or a pair of ints, got {v!r}")
    _check_attr_ints(node, key, v)
    return [int(x) for x in v]


def padding4(node, default=0) -> list[int]:
    v = node.attrs.get("padding", default)
    if is_int(v):
        v = [int(v)] * 4
    if isinstance(v, (list, tuple)) and len(v) == 2:
        v = [v[0], v[0], v[1], v[1]]
    if not isinstance(v, (list, tuple)) or len(v) != 4 or not all(is_int(x) for x in v):
        raise _err(node, f"padding must be an int, [ph, pw] or [top, bottom, left, right], got {v!r}")
    if any(int(x) < 0 for x in v):
        raise _err(node, f"padding must be non-negative, got {v!r}")
    _check_attr_ints(node, "padding", v)
    return [int(x) for x in v]


def eps_attr(node, default: float) -> None:
    eps = node.attrs.get("eps", default)
    if not is_finite_number(eps) or eps < 0:
        raise _err(node, f"eps must be a finite number >= 0, got {eps!r}")
    node.attrs["eps"] = float(eps)


def axis_attr(node, key: str = "axis", default: int = 1) -> None:
    """An axis index (batch = 0); negative values count from the end and are
    resolved against the input's rank in the shape rule."""
    v = node.attrs.get(key, default)
    if not is_int(v) or abs(int(v)) > MAX_RANK + 1:
        raise _err(node, f"attribute {key!r} must be an axis index, got {v!r}")
    node.attrs[key] = int(v)


def resolve_axis(node, axis: int, rank: int) -> int:
    """Axis index of a tensor with ``rank`` per-sample dims (batch = 0) ->
    1..rank; 0 (the batch axis) and out-of-range axes are errors."""
    a = axis + rank + 1 if axis < 0 else axis
    if not 1 <= a <= rank:
        raise _err(node, f"axis {axis} is not a non-batch axis of a {rank}-D value (+ batch)")
    return a


def prod(shape) -> int:
    """Exact product of a shape (Python ints: no overflow)."""
    p = 1
    for x in shape:
        p *= int(x)
    return p


def conv_out_hw(h: int, w: int, kernel, stride, padding, dilation=(1, 1)) -> tuple[int, int]:
    kh, kw = kernel
    eh = dilation[0] * (kh - 1) + 1
    ew = dilation[1] * (kw - 1) + 1
    ho = (h + padding[0] + padding[1] - eh) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - ew) // stride[1] + 1
    return ho, wo


def _need(node, s, rank: int, what="a (C, H, W) input"):
    if len(s) != rank:
        raise _err(node, f"{node.op} needs {what}, got shape {s}")


def _check_work(node, s, im2col: int) -> None:
    """Refuse windowed ops whose padded input or im2col matrix (per sample)
    would exceed MAX_VALUE_ELEMENTS: corrupt attributes must fail here, not as
    a MemoryError in the forward pass."""
    p = node.attrs["padding"]
    padded = s[0] * (s[1] + p[0] + p[1]) * (s[2] + p[2] + p[3])
    if max(padded, im2col) > MAX_VALUE_ELEMENTS:
        raise _err(node, f"padding {p} / kernel on input {s} needs more than {MAX_VALUE_ELEMENTS} elements per "
                         "sample (corrupt attributes?)")


def _param_vector(model, node, role, size, what):
    """A per-axis parameter: shape (size,)."""
    t = model.param(node, role)
    if t is not None and t.shape != (size,):
        raise _err(node, f"{role} {node.params[role]!r} has shape {t.shape}, but {what} has {size} entries")


# --------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------

def _conv_attrs(node) -> None:
    a = node.attrs
    a["stride"] = int_pair(node, "stride", 1)
    a["dilation"] = int_pair(node, "dilation", 1)
    a["padding"] = padding4(node)
    g = a.get("groups", 1)
    if not is_int(g) or g < 1 or g > MAX_ATTR_INT:
        raise _err(node, f"groups must be a positive int, got {g!r}")
    a["groups"] = int(g)
    if min(a["stride"]) < 1 or min(a["dilation"]) < 1:
        raise _err(node, "stride and dilation must be >= 1")


@register("conv2d", params=("weight",), optional=("bias",), attrs=_conv_attrs)
def _conv2d(model, n, shapes):
    s = shapes[0]
    _need(n, s, 3)
    a = n.attrs
    w = model.tensors[n.params["weight"]]
    if w.ndim != 4:
        raise _err(n, f"weight {n.params['weight']!r} must be 4-D OIHW, got {w.shape}")
    g = a["groups"]
    o, ig, kh, kw = w.shape
    if ig * g != s[0]:
        raise _err(n, f"weight {n.params['weight']!r} expects {ig}x{g}={ig * g} input channels (in/groups x groups) "
                      f"but its input {n.inputs[0]!r} has {s[0]}")
    if o % g:
        raise _err(n, f"{o} output channels do not divide into {g} groups")
    _param_vector(model, n, "bias", o, "the layer's output")
    ho, wo = conv_out_hw(s[1], s[2], (kh, kw), a["stride"], a["padding"], a["dilation"])
    if ho < 1 or wo < 1:
        raise _err(n, f"output would be empty ({ho}x{wo}) for input {s}")
    _check_work(n, s, ho * wo * s[0] * kh * kw)
    return (o, ho, wo)


@register("linear", params=("weight",), optional=("bias",))
def _linear(model, n, shapes):
    """y = x W^T + b on the last axis: (..., F) -> (..., O); a (C, H, W) value
    reaches a linear layer through ``flatten`` (or, channels-last, ``permute``)."""
    s = shapes[0]
    w = model.tensors[n.params["weight"]]
    if w.ndim != 2 or not s or w.shape[1] != s[-1]:
        raise _err(n, f"weight {n.params['weight']!r} of shape {w.shape} does not take the last axis of the input "
                      f"{n.inputs[0]!r} of shape {s} (add a flatten, or a permute for a channels-last linear)")
    _param_vector(model, n, "bias", w.shape[0], "the layer's output")
    return tuple(s[:-1]) + (w.shape[0],)


@register("batch_norm", params=("weight", "bias", "running_mean", "running_var"),
          attrs=lambda node: eps_attr(node, 1e-5))
def _batch_norm(model, n, shapes):
    s = shapes[0]
    if len(s) not in (1, 3):
        raise _err(n, f"batch_norm needs a (C,) or (C, H, W) input, got {s}")
    for role in OPS["batch_norm"].params:
        t = model.tensors[n.params[role]]
        if t.shape != (s[0],):
            raise _err(n, f"BN {role} {n.params[role]!r} has shape {t.shape}, but the input {n.inputs[0]!r} has "
                          f"{s[0]} channels")
    return s


def _axis_attrs(node) -> None:
    axis_attr(node, "axis", 1)


@register("affine", optional=("weight", "bias"), attrs=_axis_attrs)
def _affine(model, n, shapes):
    """y = x * weight + bias along one axis (Keras Rescaling / Normalization,
    layer scales, constant per-channel products and sums)."""
    s = shapes[0]
    if not n.params:
        raise _err(n, "affine needs a 'weight' or a 'bias' parameter")
    ax = resolve_axis(n, n.attrs["axis"], len(s))
    n.attrs["axis"] = ax
    for role in ("weight", "bias"):
        _param_vector(model, n, role, s[ax - 1], f"axis {ax} of the input {n.inputs[0]!r}")
    return s


def _ln_attrs(node) -> None:
    axis_attr(node, "axis", 1)
    eps_attr(node, 1e-5)


@register("layer_norm", optional=("weight", "bias"), attrs=_ln_attrs)
def _layer_norm(model, n, shapes):
    """(x - mean) / sqrt(var + eps) * weight + bias over one axis (biased variance)."""
    s = shapes[0]
    ax = resolve_axis(n, n.attrs["axis"], len(s))
    n.attrs["axis"] = ax
    for role in ("weight", "bias"):
        _param_vector(model, n, role, s[ax - 1], f"axis {ax} of the input {n.inputs[0]!r}")
    return s


# --------------------------------------------------------------------------
# pointwise activations
# --------------------------------------------------------------------------

def _same(model, n, shapes):
    return shapes[0]


for _name in ("relu", "relu6", "identity", "sigmoid", "silu", "hardsigmoid", "hardswish"):
    register(_name, pointwise=True)(_same)


def _gelu_attrs(node) -> None:
    v = node.attrs.get("approximate", "none")
    if v not in ("none", "tanh"):
        raise _err(node, f"gelu approximate must be 'none' (erf) or 'tanh', got {v!r}")
    node.attrs["approximate"] = v


register("gelu", pointwise=True, attrs=_gelu_attrs)(_same)


@register("softmax", attrs=_axis_attrs)
def _softmax(model, n, shapes):
    s = shapes[0]
    n.attrs["axis"] = resolve_axis(n, n.attrs["axis"], len(s))
    return s


# --------------------------------------------------------------------------
# multi-input
# --------------------------------------------------------------------------

@register("add", n_inputs=-2)
def _add(model, n, shapes):
    s = shapes[0]
    for other, name in zip(shapes[1:], n.inputs[1:]):
        if other != s:
            raise _err(n, f"add of {n.inputs[0]!r} {s} and {name!r} {other} (shapes differ)")
    return s


@register("mul", n_inputs=2)
def _mul(model, n, shapes):
    """Elementwise product with broadcasting between per-sample shapes of the
    same rank (a gate (C, 1, 1) times a map (C, H, W)); the output has the
    shape of the larger input."""
    a, b = shapes
    if len(a) != len(b):
        raise _err(n, f"mul of {n.inputs[0]!r} {a} and {n.inputs[1]!r} {b}: ranks differ")
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise _err(n, f"mul of {n.inputs[0]!r} {a} and {n.inputs[1]!r} {b}: shapes do not broadcast")
        out.append(max(x, y))
    out = tuple(out)
    if out not in (tuple(a), tuple(b)):
        raise _err(n, f"mul of {a} and {b} must give the shape of one of its inputs, got {out}")
    return out


def _concat_attrs(node) -> None:
    axis = node.attrs.get("axis", 1)
    if not is_int(axis) or axis != 1:
        raise _err(node, f"concat is supported on the channel axis (1) only, got {axis!r}")
    node.attrs["axis"] = 1


@register("concat", n_inputs=-2, attrs=_concat_attrs)
def _concat(model, n, shapes):
    s = shapes[0]
    for other, name in zip(shapes[1:], n.inputs[1:]):
        if len(other) != len(s) or other[1:] != s[1:]:
            raise _err(n, f"concat of {n.inputs[0]!r} {s} and {name!r} {other} (only the channel axis may differ)")
    return (sum(x[0] for x in shapes),) + tuple(s[1:])


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

def _flatten_attrs(node) -> None:
    sd = node.attrs.get("start_dim", 1)
    if not is_int(sd) or sd != 1:
        raise _err(node, f"flatten supports start_dim=1 only, got {sd!r}")
    node.attrs["start_dim"] = 1


@register("flatten", attrs=_flatten_attrs)
def _flatten(model, n, shapes):
    """(C, H, W) -> (C*H*W,), C-order (channel slowest)."""
    return (prod(shapes[0]),)


def _reshape_attrs(node) -> None:
    v = node.attrs.get("shape")
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_RANK or not all(is_int(x) for x in v) \
            or any(x < -1 or x == 0 for x in v) or sum(x == -1 for x in v) > 1:
        raise _err(node, f"reshape needs 'shape': 1 to {MAX_RANK} positive ints per sample (batch excluded), at "
                         f"most one -1, got {v!r}")
    _check_attr_ints(node, "shape", v)
    node.attrs["shape"] = [int(x) for x in v]


@register("reshape", attrs=_reshape_attrs)
def _reshape(model, n, shapes):
    """C-order reshape of each sample (``torch.reshape`` of a contiguous
    tensor with the batch axis kept); the canonical ``shape`` has no -1."""
    s = shapes[0]
    want = list(n.attrs["shape"])
    total = prod(s)
    if -1 in want:
        rest = prod(x for x in want if x != -1)
        if total % rest:
            raise _err(n, f"cannot reshape {s} to {want}")
        want[want.index(-1)] = total // rest
    if prod(want) != total:
        raise _err(n, f"cannot reshape {s} ({total} elements) to {want}")
    n.attrs["shape"] = want
    return tuple(want)


def _perm_attrs(node) -> None:
    v = node.attrs.get("perm")
    if not isinstance(v, (list, tuple)) or not 2 <= len(v) <= MAX_RANK + 1 or not all(is_int(x) for x in v) \
            or sorted(v) != list(range(len(v))) or v[0] != 0:
        raise _err(node, f"permute needs 'perm': a permutation of 0..rank that keeps the batch axis first, got {v!r}")
    node.attrs["perm"] = [int(x) for x in v]


@register("permute", attrs=_perm_attrs)
def _permute(model, n, shapes):
    s = shapes[0]
    perm = n.attrs["perm"]
    if len(perm) != len(s) + 1:
        raise _err(n, f"perm {perm} does not match the {len(s)}-D input {n.inputs[0]!r} (+ batch)")
    return tuple(s[p - 1] for p in perm[1:])


def _pad_attrs(node) -> None:
    node.attrs["padding"] = padding4(node)
    v = node.attrs.get("value", 0.0)
    if not is_finite_number(v):
        raise _err(node, f"pad value must be a finite number, got {v!r}")
    node.attrs["value"] = float(v)


@register("pad", attrs=_pad_attrs)
def _pad(model, n, shapes):
    """Constant padding of H and W: [top, bottom, left, right]."""
    s = shapes[0]
    _need(n, s, 3)
    p = n.attrs["padding"]
    _check_work(n, s, 0)
    return (s[0], s[1] + p[0] + p[1], s[2] + p[2] + p[3])


# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------

def _pool_attrs(node) -> None:
    a = node.attrs
    if "kernel" not in a:
        raise _err(node, f"{node.op} needs a 'kernel' attribute")
    a["kernel"] = int_pair(node, "kernel", None)
    a["stride"] = int_pair(node, "stride", a["kernel"])
    a["padding"] = padding4(node)
    if min(a["kernel"]) < 1 or min(a["stride"]) < 1:
        raise _err(node, "kernel and stride must be >= 1")
    if node.op == "avg_pool2d":
        a["count_include_pad"] = bool_attr(node, "count_include_pad", True)


def _pool(model, n, shapes):
    s = shapes[0]
    _need(n, s, 3)
    a = n.attrs
    p = a["padding"]
    kh, kw = a["kernel"]
    if max(p[0], p[1]) > kh // 2 or max(p[2], p[3]) > kw // 2:
        raise _err(n, f"pooling padding {p} exceeds half the kernel {a['kernel']}")
    ho, wo = conv_out_hw(s[1], s[2], a["kernel"], a["stride"], p)
    if ho < 1 or wo < 1:
        raise _err(n, f"output would be empty for input {s}")
    _check_work(n, s, 0)
    return (s[0], ho, wo)


register("max_pool2d", attrs=_pool_attrs)(_pool)
register("avg_pool2d", attrs=_pool_attrs)(_pool)


@register("global_avg_pool", attrs=lambda node: node.attrs.__setitem__("keepdims",
                                                                        bool_attr(node, "keepdims", True)))
def _global_avg_pool(model, n, shapes):
    """Mean over H and W: (C, H, W) -> (C, 1, 1) (keepdims) or (C,)."""
    s = shapes[0]
    _need(n, s, 3)
    return (s[0], 1, 1) if n.attrs["keepdims"] else (s[0],)

