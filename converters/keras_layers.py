"""Keras layers -> udfc-ref graph nodes: one small handler per Keras class.

:data:`HANDLERS` maps a Keras class name (``"Conv2D"``; ``"ops.Add"`` for a
``keras.ops`` operation of a functional model such as ``x + 3.0``) to a
function ``handler(b, lay, ins) -> Val`` registered with
:func:`keras_layer`.  A handler emits IR nodes through the :class:`Builder`
and returns the value that stands for the layer's output.  Every mapping is
exact (the same arithmetic, up to float rounding); rewrites that make the
graph smaller (padding folded into convolutions, layout no-ops removed,
``relu6(x + 3) / 6`` recognised as ``hardsigmoid``) run afterwards, in
``keras_passes.py``.

Layout (Keras is channels-last, the IR channels-first): a Keras value of
per-sample rank 3, (H, W, C), is the IR value (C, H, W); a Keras value of
any other rank has the same shape and element order in the IR.  Keras axis
``a`` of a rank-3 value is IR axis ``FROM_IR[a]``; IR axis ``i`` is Keras
axis ``TO_IR[i]``.
"""

from __future__ import annotations

import numpy as np

from udfc_ref.errors import ConversionError, GraphError
from udfc_ref.graph import Node
from udfc_ref.ops import OPS, prod

from .keras_file import constant

#: (H, W, C) -> (C, H, W): IR axis i is Keras axis TO_IR[i] (batch = 0)
TO_IR = (0, 3, 1, 2)
#: (C, H, W) -> (H, W, C): Keras axis i is IR axis FROM_IR[i]
FROM_IR = (0, 2, 3, 1)

HANDLERS: dict = {}


def keras_layer(*classes):
    """Decorator: register ``handler(b, lay, ins) -> Val`` for Keras ``classes``."""

    def deco(f):
        for c in classes:
            HANDLERS[c] = f
        return f

    return deco


# --------------------------------------------------------------------------
# layout arithmetic
# --------------------------------------------------------------------------

def keras_shape(ir_shape) -> tuple:
    """Per-sample Keras shape of an IR value."""
    s = tuple(ir_shape)
    return (s[1], s[2], s[0]) if len(s) == 3 else s


def ir_shape(keras_shape_) -> tuple:
    s = tuple(keras_shape_)
    return (s[2], s[0], s[1]) if len(s) == 3 else s


def ir_axis(axis: int, rank: int) -> int:
    """Keras axis (batch = 0, negatives from the end) of a value with per-sample
    ``rank`` -> IR axis; raises ValueError for the batch axis or out of range."""
    a = axis + rank + 1 if axis < 0 else axis
    if not 1 <= a <= rank:
        raise ValueError(f"axis {axis} is not a non-batch axis of a rank-{rank} value")
    return FROM_IR[a] if rank == 3 else a


def keras_axis(axis: int, rank: int) -> int:
    """IR axis -> Keras axis (inverse of :func:`ir_axis`)."""
    return TO_IR[axis] if rank == 3 else axis


def compose(*perms) -> tuple:
    """``x.transpose(p1).transpose(p2)...`` == ``x.transpose(compose(p1, p2, ...))``."""
    out = tuple(range(len(perms[0])))
    for p in perms:
        out = tuple(out[j] for j in p)
    return out


def layout_noop(shape, perm) -> bool:
    """True when transposing a per-sample ``shape`` by ``perm`` (batch = 0)
    keeps the C-order of the elements (the axes longer than 1 keep their
    relative order): the permute is then a reshape."""
    big = [p for p in perm[1:] if shape[p - 1] > 1]
    return big == sorted(big)


def plan_layout(shape, steps) -> list:
    """Simplify a chain of ``("permute", perm)`` / ``("reshape", shape)`` steps
    applied to a value of per-sample ``shape``: a permute that keeps the
    C-order of the elements becomes a reshape, consecutive reshapes merge, a
    reshape to the shape it receives vanishes.  Returns the steps to emit."""
    ops = []
    for kind, arg in steps:
        arg = tuple(arg)
        if kind == "permute" and not layout_noop(shape, arg):
            ops.append(("permute", arg, shape))
            shape = tuple(shape[p - 1] for p in arg[1:])
            continue
        if kind == "permute":
            arg = tuple(shape[p - 1] for p in arg[1:])
        start = shape
        if ops and ops[-1][0] == "reshape":
            start = ops.pop()[2]
        ops.append(("reshape", arg, start))
        shape = arg
    return [(k, a) for k, a, s in ops if not (k == "reshape" and a == s)]


# --------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------

class Val:
    """A Keras tensor in IR terms: the IR value name and its IR shape."""

    def __init__(self, name: str, shape):
        self.name, self.shape = name, tuple(shape)

    @property
    def rank(self) -> int:
        return len(self.shape)


class _ShapeView:
    """What ``OPS[op].infer`` needs of a model: ``tensors`` and ``param``."""

    def __init__(self, tensors):
        self.tensors = tensors

    def param(self, node, role):
        t = node.params.get(role)
        return None if t is None else self.tensors[t]


class Builder:
    """Collects nodes and tensors; shapes are inferred node by node with the
    IR's own rules (``udfc_ref.ops``), so a handler sees its inputs' shapes."""

    def __init__(self, where: str, keras_major=3):
        self.where = where
        self.keras_major = keras_major
        self.tensors: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple] = {}
        self.node_names: set[str] = set()
        self.tensor_names: set[str] = set()
        #: every Keras layer name and the input name: a node not named after
        #: its own layer never takes one of them
        self.reserved: set[str] = set()
        self.store: dict = {}
        self.vals: dict[str, Val] = {}
        self._view = _ShapeView(self.tensors)
        self.layer = None  # the Keras layer being converted (for messages)

    def err(self, lay, msg) -> ConversionError:
        return ConversionError(f"{self.where}: layer {lay.name!r} ({lay.cls}): {msg}")

    def fresh(self, base: str, taken: set, reserved=frozenset(), own=None) -> str:
        """``base``, or ``base_1``, ``base_2`` ... if ``taken`` has it or ``reserved``
        has it (``own``, the name of the layer being converted, is allowed)."""
        n, i = base, 1
        while n in taken or (n in reserved and n != own):
            n, i = f"{base}_{i}", i + 1
        taken.add(n)
        return n

    def tensor(self, name: str, array) -> str:
        name = self.fresh(name, self.tensor_names)
        self.tensors[name] = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        return name

    def add(self, name, op, inputs, attrs=None, params=None) -> Val:
        """Emit one node (output value = node name) and infer its shape."""
        own = self.layer.name if self.layer is not None else None
        name = self.fresh(name, self.node_names, self.reserved, own)
        n = Node(name=name, op=op, inputs=[v.name for v in inputs], output=name, attrs=dict(attrs or {}),
                 params=dict(params or {}))
        spec = OPS[op]
        try:
            spec.normalise(n)
            shape = tuple(int(d) for d in spec.infer(self._view, n, [v.shape for v in inputs]))
        except GraphError as e:
            lay = self.layer
            raise ConversionError(f"{self.where}: layer {lay.name!r} ({lay.cls}): {e}") from None
        self.nodes.append(n)
        self.shapes[name] = shape
        return Val(name, shape)

    def weights(self, lay, store, roles, aliases=None):
        """The stored arrays of ``lay`` for ``roles``: by weight name when the
        file names them (``aliases`` maps a stored name to a role), else in
        the layer's variable order."""
        arrs = store.get(lay.name, [])
        if len(arrs) != len(roles):
            raise self.err(lay, f"expected {len(roles)} weight(s) {list(roles)}, the file has {len(arrs)}")
        if all(n is not None for n, _ in arrs):
            by = {}
            for n, a in arrs:
                key = n.split("/")[-1].split(":")[0]
                by[(aliases or {}).get(key, key)] = a
            if set(by) == set(roles):
                return [by[r] for r in roles]
        return [a for _, a in arrs]

    # ------------------------------------------------------------ helpers
    def layout(self, lay, v: Val, steps) -> Val:
        """Apply ``steps`` (``("permute", perm)`` / ``("reshape", shape)``) to
        ``v`` as planned by :func:`plan_layout`; the last node emitted is
        named after the layer."""
        ops = plan_layout(v.shape, steps)
        for i, (kind, arg) in enumerate(ops):
            name = lay.name if i == len(ops) - 1 else f"{lay.name}.{kind}"
            attrs = {"perm": list(arg)} if kind == "permute" else {"shape": list(arg)}
            v = self.add(name, kind, [v], attrs)
        return v

    def activation(self, lay, act, v: Val, name=None) -> Val:
        """A Keras activation (name string or serialised function) applied to ``v``."""
        if isinstance(act, dict):
            c = act.get("config")
            act = c if isinstance(c, str) else (c or {}).get("name", act.get("registered_name"))
        if act in (None, "linear"):
            return v
        if act == "hard_sigmoid" and self.keras_major is not None and self.keras_major < 3:
            raise self.err(lay, "activation 'hard_sigmoid' of a Keras 2 file (clip(0.2 x + 0.5, 0, 1)) differs from "
                                "Keras 3's relu6(x + 3) / 6 and is not supported")
        op = ACTIVATIONS.get(act) if isinstance(act, str) else None
        if op is None:
            raise self.err(lay, f"activation {act!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))}, "
                                "linear)")
        name = name or f"{lay.name}.{act}"
        if op == "softmax":
            return self.add(name, "softmax", [v], {"axis": ir_axis(-1, v.rank)})
        return self.add(name, op, [v], ACTIVATION_ATTRS.get(act))

    def check_image(self, lay, v: Val) -> None:
        if v.rank != 3:
            raise self.err(lay, f"needs an (H, W, C) input, got Keras shape {keras_shape(v.shape)}")

    def keras_axis_to_ir(self, lay, axis, v: Val, what="axis") -> int:
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise self.err(lay, f"{what} {list(axis)} has several axes; one axis is supported")
            axis = axis[0]
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise self.err(lay, f"{what} {axis!r} is not an int")
        try:
            return ir_axis(axis, v.rank)
        except ValueError as e:
            raise self.err(lay, f"{what}: {e}") from None

    def vector(self, lay, a, v: Val, axis: int, what: str) -> np.ndarray:
        """A constant that broadcasts against the Keras shape of ``v`` and
        varies at most along IR ``axis`` -> its (S,) vector along that axis."""
        ks = keras_shape(v.shape)
        a = np.asarray(a, dtype=np.float64)
        try:
            full = np.broadcast_to(a, ks) if a.ndim <= len(ks) else None
        except ValueError:
            full = None
        if full is None:
            raise self.err(lay, f"{what} of shape {a.shape} does not broadcast to the input shape {ks}")
        ir = full.transpose([p - 1 for p in TO_IR[1:]]) if len(ks) == 3 else full
        idx = [0] * ir.ndim
        idx[axis - 1] = slice(None)
        vec = ir[tuple(idx)]
        shape = [1] * ir.ndim
        shape[axis - 1] = -1
        if not np.array_equal(np.broadcast_to(vec.reshape(shape), ir.shape), ir):
            raise self.err(lay, f"{what} of shape {a.shape} varies along more than one axis; only a scalar or a "
                                "per-axis vector is supported")
        return vec

    def const_axis(self, a, v: Val) -> int:
        """The IR axis along which a broadcast constant varies (channel axis for scalars)."""
        ks = keras_shape(v.shape)
        a = np.asarray(a)
        if a.ndim == 0 or a.size == 1:
            return 1
        pad = (1,) * (len(ks) - a.ndim) + a.shape
        varying = [i + 1 for i, s in enumerate(pad) if s > 1]
        k = varying[0] if varying else len(ks)
        return ir_axis(k, len(ks))

    def affine(self, lay, v: Val, scale=None, offset=None, name=None) -> Val:
        """``v * scale + offset`` with Keras-broadcast constants (None = absent)."""
        axis = 1
        for c in (scale, offset):
            if c is not None and np.asarray(c).size > 1:
                axis = self.const_axis(c, v)
        params = {}
        base = name or lay.name
        if scale is not None:
            params["weight"] = self.tensor(f"{base}.weight", self.vector(lay, scale, v, axis, "scale"))
        if offset is not None:
            params["bias"] = self.tensor(f"{base}.bias", self.vector(lay, offset, v, axis, "offset"))
        if not params:
            return v
        return self.add(base, "affine", [v], {"axis": axis}, params)


def same_padding(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """Keras/TensorFlow 'same' padding along one axis: (before, after)."""
    total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def _pair(b, lay, key, default):
    v = lay.cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return [int(v[0]), int(v[1])]
    raise b.err(lay, f"{key} {v!r} is not an int or a pair of ints")


def _spatial_padding(b, lay, v: Val, kernel, stride, dilation=(1, 1)):
    mode = lay.cfg.get("padding", "valid")
    if mode == "valid":
        return [0, 0, 0, 0]
    if mode == "same":
        return [*same_padding(v.shape[1], kernel[0], stride[0], dilation[0]),
                *same_padding(v.shape[2], kernel[1], stride[1], dilation[1])]
    raise b.err(lay, f"padding {mode!r} is not supported (valid or same)")


#: Keras activation name -> IR op
ACTIVATIONS = {
    "relu": "relu", "relu6": "relu6", "sigmoid": "sigmoid", "silu": "silu", "swish": "silu",
    "hard_sigmoid": "hardsigmoid", "hard_silu": "hardswish", "hard_swish": "hardswish", "gelu": "gelu",
    "softmax": "softmax",
}
#: attributes of an activation's IR node (Keras' ``gelu`` activation is the erf form)
ACTIVATION_ATTRS = {"gelu": {"approximate": "none"}}

#: layers that are the identity at inference
PASS_THROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                "GaussianNoise", "AlphaDropout", "ActivityRegularization", "Identity")


# --------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------

def _conv_node(b, lay, v, name, w, bias, stride, pad, dilation, groups) -> Val:
    params = {"weight": b.tensor(f"{name}.weight", w)}
    if bias is not None:
        params["bias"] = b.tensor(f"{name}.bias", bias)
    return b.add(name, "conv2d", [v], {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups},
                 params)


def _depthwise_weight(b, lay, kern, c, mult, what="depthwise kernel"):
    """(kh, kw, C, m) -> (C*m, 1, kh, kw); Keras output channel c*m + j keeps its index."""
    if kern.ndim != 4 or kern.shape[2] != c or kern.shape[3] != mult:
        raise b.err(lay, f"{what} {kern.shape} does not match {c} channels x multiplier {mult}")
    return kern.transpose(2, 3, 0, 1).reshape(c * mult, 1, kern.shape[0], kern.shape[1])


@keras_layer("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
def _conv(b, lay, ins):
    """Conv2D -> conv2d; DepthwiseConv2D -> conv2d (groups = C);
    SeparableConv2D -> depthwise conv2d ``<layer>_depthwise`` + 1x1 conv2d."""
    v, cfg = ins[0], lay.cfg
    b.check_image(lay, v)
    k = _pair(b, lay, "kernel_size", None)
    s = _pair(b, lay, "strides", 1)
    d = _pair(b, lay, "dilation_rate", 1)
    pad = _spatial_padding(b, lay, v, k, s, d)
    use_bias = cfg.get("use_bias", True)
    c = v.shape[0]
    if lay.cls == "Conv2D":
        kern, *rest = b.weights(lay, b.store, ["kernel"] + (["bias"] if use_bias else []))
        groups = int(cfg.get("groups", 1) or 1)
        if kern.ndim != 4 or kern.shape[2] * groups != c:
            raise b.err(lay, f"kernel {kern.shape} does not match {c} input channels in {groups} group(s)")
        out = _conv_node(b, lay, v, lay.name, kern.transpose(3, 2, 0, 1), rest[0] if rest else None, s, pad, d, groups)
    elif lay.cls == "DepthwiseConv2D":
        mult = int(cfg.get("depth_multiplier", 1))
        kern, *rest = b.weights(lay, b.store, ["kernel"] + (["bias"] if use_bias else []),
                                {"depthwise_kernel": "kernel"})
        out = _conv_node(b, lay, v, lay.name, _depthwise_weight(b, lay, kern, c, mult), rest[0] if rest else None,
                         s, pad, d, c)
    else:
        mult = int(cfg.get("depth_multiplier", 1))
        dk, pk, *rest = b.weights(lay, b.store, ["depthwise_kernel", "pointwise_kernel"]
                                  + (["bias"] if use_bias else []))
        if pk.ndim != 4 or pk.shape[:3] != (1, 1, c * mult):
            raise b.err(lay, f"pointwise kernel {pk.shape} does not take {c * mult} channels")
        dw = _conv_node(b, lay, v, f"{lay.name}_depthwise", _depthwise_weight(b, lay, dk, c, mult), None, s, pad, d, c)
        out = _conv_node(b, lay, dw, lay.name, pk.transpose(3, 2, 0, 1), rest[0] if rest else None, [1, 1],
                         [0, 0, 0, 0], [1, 1], 1)
    return b.activation(lay, cfg.get("activation", "linear"), out)


@keras_layer("Dense")
def _dense(b, lay, ins):
    """Dense -> linear on the last axis; on an (H, W, C) value (the last Keras
    axis is the channel axis) -> an exactly equivalent 1x1 conv2d."""
    v, cfg = ins[0], lay.cfg
    use_bias = cfg.get("use_bias", True)
    kern, *rest = b.weights(lay, b.store, ["kernel"] + (["bias"] if use_bias else []))
    f = keras_shape(v.shape)[-1]
    if kern.ndim != 2 or kern.shape[0] != f:
        raise b.err(lay, f"kernel {kern.shape} does not take {f} input features")
    bias = rest[0] if rest else None
    if v.rank == 3:
        out = _conv_node(b, lay, v, lay.name, kern.T[:, :, None, None], bias, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    else:
        params = {"weight": b.tensor(f"{lay.name}.weight", kern.T)}
        if bias is not None:
            params["bias"] = b.tensor(f"{lay.name}.bias", bias)
        out = b.add(lay.name, "linear", [v], {}, params)
    return b.activation(lay, cfg.get("activation", "linear"), out)


@keras_layer("BatchNormalization")
def _batch_norm(b, lay, ins):
    v, cfg = ins[0], lay.cfg
    if b.keras_axis_to_ir(lay, cfg.get("axis", -1), v) != 1 or v.rank not in (1, 3):
        raise b.err(lay, f"axis {cfg.get('axis')!r} is not the channel axis of an (H, W, C) or (F,) input")
    center, scale = cfg.get("center", True), cfg.get("scale", True)
    roles = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
    arrs = dict(zip(roles, b.weights(lay, b.store, roles)))
    c = v.shape[0]
    vals = {
        "weight": arrs.get("gamma", np.ones(c)),
        "bias": arrs.get("beta", np.zeros(c)),
        "running_mean": arrs["moving_mean"],
        "running_var": arrs["moving_variance"],
    }
    params = {role: b.tensor(f"{lay.name}.{role}", a) for role, a in vals.items()}
    return b.add(lay.name, "batch_norm", [v], {"eps": float(cfg.get("epsilon", 1e-3))}, params)


@keras_layer("LayerNormalization")
def _layer_norm(b, lay, ins):
    v, cfg = ins[0], lay.cfg
    if cfg.get("rms_scaling"):
        raise b.err(lay, "rms_scaling=True is not supported")
    axis = b.keras_axis_to_ir(lay, cfg.get("axis", -1), v)
    center, scale = cfg.get("center", True), cfg.get("scale", True)
    roles = (["gamma"] if scale else []) + (["beta"] if center else [])
    arrs = dict(zip(roles, b.weights(lay, b.store, roles)))
    params = {}
    if scale:
        params["weight"] = b.tensor(f"{lay.name}.weight", arrs["gamma"])
    if center:
        params["bias"] = b.tensor(f"{lay.name}.bias", arrs["beta"])
    return b.add(lay.name, "layer_norm", [v], {"axis": axis, "eps": float(cfg.get("epsilon", 1e-3))}, params)


@keras_layer("Rescaling")
def _rescaling(b, lay, ins):
    """y = x * scale + offset (scalars or arrays broadcast against (H, W, C)) -> affine."""
    scale = constant(lay.cfg.get("scale", 1.0), f"{b.where}: layer {lay.name!r}: scale")
    offset = constant(lay.cfg.get("offset", 0.0), f"{b.where}: layer {lay.name!r}: offset")
    return b.affine(lay, ins[0], None if np.all(scale == 1.0) and scale.ndim == 0 else scale,
                    None if np.all(offset == 0.0) and offset.ndim == 0 else offset)


#: Keras' ``backend.epsilon()`` default, the floor of Normalization's standard deviation
KERAS_EPSILON = 1e-7


@keras_layer("Normalization")
def _normalization(b, lay, ins):
    """y = (x - mean) / max(sqrt(variance), 1e-7), Keras' own epsilon rule
    (``invert=True``: y = mean + x * max(sqrt(variance), 1e-7)) -> affine."""
    v, cfg = ins[0], lay.cfg
    axis = cfg.get("axis", -1)
    axes = [] if axis is None else ([axis] if isinstance(axis, int) else list(axis))
    if len(axes) > 1:
        raise b.err(lay, f"axis {axes} keeps several axes; one axis (or none) is supported")
    if cfg.get("mean") is not None:
        mean = constant(cfg["mean"], f"{b.where}: layer {lay.name!r}: mean")
        var = constant(cfg.get("variance"), f"{b.where}: layer {lay.name!r}: variance")
    else:
        n = len(b.store.get(lay.name, []))
        mean, var, *_ = b.weights(lay, b.store, ["mean", "variance", "count"][:max(n, 2)])
        mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    if axes and mean.ndim == 1:  # the kept axis, broadcast from the right as Keras does
        k = axes[0] + v.rank + 1 if axes[0] < 0 else axes[0]
        shape = [1] * v.rank
        shape[k - 1] = -1
        mean, var = mean.reshape(shape), var.reshape(shape)
    if np.any(var < 0):
        raise b.err(lay, "variance has negative entries")
    sd = np.maximum(np.sqrt(var), KERAS_EPSILON)
    if cfg.get("invert", False):
        return b.affine(lay, v, sd, mean)
    return b.affine(lay, v, 1.0 / sd, -mean / sd)


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------

@keras_layer("Activation")
def _activation(b, lay, ins):
    return b.activation(lay, lay.cfg.get("activation"), ins[0], name=lay.name)


@keras_layer("ReLU")
def _relu(b, lay, ins):
    cfg = lay.cfg
    mx = cfg.get("max_value")
    if (cfg.get("negative_slope") or 0.0) != 0.0 or (cfg.get("threshold") or 0.0) != 0.0:
        raise b.err(lay, "negative_slope / threshold other than 0 are not supported")
    if mx is None:
        return b.add(lay.name, "relu", ins)
    if float(mx) == 6.0:
        return b.add(lay.name, "relu6", ins)
    raise b.err(lay, f"max_value {mx!r} is not supported (None or 6)")


@keras_layer("Softmax")
def _softmax(b, lay, ins):
    return b.add(lay.name, "softmax", ins, {"axis": b.keras_axis_to_ir(lay, lay.cfg.get("axis", -1), ins[0])})


@keras_layer(*PASS_THROUGH)
def _identity(b, lay, ins):
    return ins[0]


# --------------------------------------------------------------------------
# pooling, padding, layout
# --------------------------------------------------------------------------

@keras_layer("MaxPooling2D", "AveragePooling2D")
def _pool(b, lay, ins):
    v = ins[0]
    b.check_image(lay, v)
    k = _pair(b, lay, "pool_size", 2)
    s = _pair(b, lay, "strides", k)
    pad = _spatial_padding(b, lay, v, k, s)
    if lay.cls == "MaxPooling2D":
        return b.add(lay.name, "max_pool2d", [v], {"kernel": k, "stride": s, "padding": pad})
    # Keras/TensorFlow 'same' averages only the real cells
    return b.add(lay.name, "avg_pool2d", [v], {"kernel": k, "stride": s, "padding": pad, "count_include_pad": False})


@keras_layer("GlobalAveragePooling2D")
def _gap(b, lay, ins):
    b.check_image(lay, ins[0])
    return b.add(lay.name, "global_avg_pool", ins, {"keepdims": bool(lay.cfg.get("keepdims", False))})


@keras_layer("GlobalMaxPooling2D")
def _gmp(b, lay, ins):
    """max over H, W -> max_pool2d with the whole map as its window (+ reshape to (C,))."""
    v = ins[0]
    b.check_image(lay, v)
    c, h, w = v.shape
    keep = bool(lay.cfg.get("keepdims", False))
    name = lay.name if keep else f"{lay.name}.pool"
    out = b.add(name, "max_pool2d", [v], {"kernel": [h, w], "stride": [h, w], "padding": [0, 0, 0, 0]})
    return out if keep else b.add(lay.name, "reshape", [out], {"shape": [c]})


@keras_layer("ZeroPadding2D")
def _zero_padding(b, lay, ins):
    v = ins[0]
    b.check_image(lay, v)
    p = lay.cfg.get("padding", 1)
    if isinstance(p, int):
        p = [p, p, p, p]
    elif isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p):
        p = [p[0], p[0], p[1], p[1]]
    elif isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in p):
        p = [p[0][0], p[0][1], p[1][0], p[1][1]]
    else:
        raise b.err(lay, f"padding {p!r} is not understood")
    return b.add(lay.name, "pad", [v], {"padding": [int(x) for x in p], "value": 0.0})


@keras_layer("Flatten")
def _flatten(b, lay, ins):
    """Keras flattens (H, W, C) in (h, w, c) order: permute to (H, W, C) (unless
    that keeps the element order), then flatten."""
    v = ins[0]
    if v.rank == 1:
        return v
    if v.rank == 3 and not layout_noop(v.shape, FROM_IR):
        v = b.add(f"{lay.name}.permute", "permute", [v], {"perm": list(FROM_IR)})
    return b.add(lay.name, "flatten", [v])


@keras_layer("Reshape")
def _reshape(b, lay, ins):
    """A C-order reshape of the Keras value: to Keras order, reshape, back to IR order."""
    v = ins[0]
    target = lay.cfg.get("target_shape")
    if not isinstance(target, (list, tuple)) or not all(isinstance(x, int) for x in target):
        raise b.err(lay, f"target_shape {target!r} is not a list of ints")
    target = list(target)
    total = prod(v.shape)
    if target.count(-1) == 1:
        rest = prod(x for x in target if x != -1)
        if rest <= 0 or total % rest:
            raise b.err(lay, f"cannot reshape {keras_shape(v.shape)} to {tuple(target)}")
        target[target.index(-1)] = total // rest
    if prod(target) != total or min(target) < 1:
        raise b.err(lay, f"cannot reshape {keras_shape(v.shape)} to {tuple(target)}")
    steps = []
    if v.rank == 3:
        steps.append(("permute", FROM_IR))
    steps.append(("reshape", tuple(target)))
    if len(target) == 3:
        steps.append(("permute", TO_IR))
    return b.layout(lay, v, steps)


@keras_layer("Permute")
def _permute(b, lay, ins):
    v = ins[0]
    dims = lay.cfg.get("dims")
    if not isinstance(dims, (list, tuple)) or sorted(dims) != list(range(1, v.rank + 1)):
        raise b.err(lay, f"dims {dims!r} is not a permutation of 1..{v.rank}")
    k = (0,) + tuple(int(x) for x in dims)
    to_ir_in = TO_IR if v.rank == 3 else tuple(range(v.rank + 1))
    to_ir_out = TO_IR if v.rank == 3 else tuple(range(v.rank + 1))
    # IR output = Keras input .transpose(k).transpose(to_ir_out); IR input = Keras input .transpose(to_ir_in)
    inv = [to_ir_in.index(i) for i in range(v.rank + 1)]
    perm = compose(inv, k, to_ir_out)
    return b.layout(lay, v, [("permute", perm)])


# --------------------------------------------------------------------------
# merges and keras.ops arithmetic
# --------------------------------------------------------------------------

def _tensors(b, lay, ins, n_min=2):
    if len(ins) < n_min:
        raise b.err(lay, f"needs at least {n_min} inputs")
    return ins


@keras_layer("Add")
def _add(b, lay, ins):
    return b.add(lay.name, "add", _tensors(b, lay, ins))


@keras_layer("Multiply")
def _multiply(b, lay, ins):
    """Elementwise product (broadcast gates (1, 1, C) x (H, W, C)); more than
    two inputs become a chain of ``mul`` nodes."""
    ins = _tensors(b, lay, ins)
    v = ins[0]
    for i, x in enumerate(ins[1:], 1):
        v = b.add(lay.name if i == len(ins) - 1 else f"{lay.name}.{i}", "mul", [v, x])
    return v


@keras_layer("Concatenate")
def _concatenate(b, lay, ins):
    ins = _tensors(b, lay, ins)
    if b.keras_axis_to_ir(lay, lay.cfg.get("axis", -1), ins[0]) != 1:
        raise b.err(lay, f"axis {lay.cfg.get('axis')} is not the channel axis")
    return b.add(lay.name, "concat", ins, {"axis": 1})


def _op_operands(b, lay):
    """(tensor Vals, constants) of a ``keras.ops`` call, in argument order."""
    ts = [b.vals[v] for k, v in lay.args if k == "t"]
    cs = [(i, v) for i, (k, v) in enumerate(lay.args) if k == "c"]
    return ts, cs


@keras_layer("ops.Add", "ops.Subtract", "ops.Multiply", "ops.Divide", "ops.TrueDivide")
def _ops_arith(b, lay, ins):
    """``x + c``, ``x - c``, ``c - x``, ``x * c``, ``x / c`` (constant c: scalar
    or broadcast array) -> affine; ``x + y`` -> add, ``x * y`` -> mul."""
    ts, cs = _op_operands(b, lay)
    op = lay.cls[4:]
    if len(ts) == 2 and not cs:
        if op == "Add":
            return b.add(lay.name, "add", ts)
        if op == "Multiply":
            return b.add(lay.name, "mul", ts)
        raise b.err(lay, f"{op} of two tensors is not supported")
    if len(ts) != 1 or len(cs) != 1 or len(lay.args) != 2:
        raise b.err(lay, "needs one tensor and one constant, or two tensors")
    v, (pos, c) = ts[0], cs[0]
    if op == "Add":
        return b.affine(lay, v, None, c)
    if op == "Subtract":
        return b.affine(lay, v, None, -c) if pos == 1 else b.affine(lay, v, -np.ones_like(c), c)
    if op == "Multiply":
        return b.affine(lay, v, c, None)
    if pos != 1 or np.any(c == 0):
        raise b.err(lay, "only division of a tensor by a nonzero constant is supported")
    return b.affine(lay, v, 1.0 / c, None)


@keras_layer("ops.Relu", "ops.Relu6", "ops.Sigmoid", "ops.Silu", "ops.HardSigmoid", "ops.HardSilu", "ops.Gelu",
             "ops.Softmax")
def _ops_activation(b, lay, ins):
    op = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Silu": "silu", "HardSigmoid": "hardsigmoid",
          "HardSilu": "hardswish", "Gelu": "gelu", "Softmax": "softmax"}[lay.cls[4:]]
    v = ins[0]
    if op == "gelu":
        return b.add(lay.name, "gelu", [v], {"approximate": "tanh" if lay.cfg.get("approximate", True) else "none"})
    if op == "softmax":
        return b.add(lay.name, "softmax", [v], {"axis": b.keras_axis_to_ir(lay, lay.cfg.get("axis", -1), v)})
    return b.add(lay.name, op, [v])
