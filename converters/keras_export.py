"""udfc-ref graph -> Keras functional model: one small exporter per IR op.

:data:`EXPORTERS` maps an IR op to ``exporter(ctx, node, xs) -> keras tensor``
registered with :func:`ir_op`; ``xs`` are the Keras tensors of the node's
inputs.  The layout rule is the reader's (``keras_layers.py``): an IR value
of rank 3, (C, H, W), is the Keras value (H, W, C); every other rank is the
same in both.  Weights are set once the model is built.

Every layer gets a Keras-safe name (``keras_names.py``); :class:`Context`
records, per Keras layer standing for an IR node, the node's name, its output
value's name and its tensors' names, which ``converters.keras.save_keras``
writes into the archive so that reading the file back restores them.
"""

from __future__ import annotations

import numpy as np

from udfc_ref.errors import ConversionError

from .keras_layers import FROM_IR, TO_IR, compose, keras_axis, keras_shape, layout_noop, plan_layout, same_padding
from .keras_names import KerasNames

EXPORTERS: dict = {}

#: format tag of the name map written into a .keras archive
NAMES_FORMAT = "udfc-ref keras names"


def ir_op(*ops):
    """Decorator: register ``exporter(ctx, node, xs)`` for IR ``ops``."""

    def deco(f):
        for o in ops:
            EXPORTERS[o] = f
        return f

    return deco


class Context:
    """State of one export: the Keras module, the model, the names handed out,
    the Keras tensor of every IR value, and the weights to set."""

    def __init__(self, keras, model):
        self.keras, self.L, self.model = keras, keras.layers, model
        self.names = KerasNames()
        self.kt: dict = {}
        self.pending: list = []
        self.record: dict = {}

    def name(self, node, suffix=None) -> str:
        """The Keras name of the layer standing for ``node`` (recorded in the
        name map), or with ``suffix`` of an auxiliary layer around it."""
        if suffix is not None:
            return self.names(f"{node.name}_{suffix}")
        k = self.names(node.name)
        self.record[k] = {"node": node.name, "output": node.output, "tensors": dict(node.params)}
        return k

    def shape(self, value) -> tuple:
        return self.model.shapes[value]

    def param(self, node, role):
        return self.model.param(node, role)

    def call(self, layer, x, weights=None):
        y = layer(x)
        if weights is not None:
            self.pending.append((layer, weights))
        return y

    def layout(self, node, x, ir_in_shape, steps, last_is_main=True):
        """Apply Keras ``steps`` (permute / reshape of the Keras value whose
        shape is ``keras_shape(ir_in_shape)``), simplified by ``plan_layout``."""
        ops = plan_layout(keras_shape(ir_in_shape), steps)
        for i, (kind, arg) in enumerate(ops):
            main = last_is_main and i == len(ops) - 1
            name = self.name(node) if main else self.name(node, kind)
            layer = self.L.Permute(tuple(arg[1:]), name=name) if kind == "permute" else self.L.Reshape(arg, name=name)
            x = layer(x)
        return x

    def to_plain(self, node, x, ir_shape_):
        """(H, W, C) Keras value -> its IR (C, H, W) order as a plain Keras value."""
        return self.layout(node, x, ir_shape_, [("permute", TO_IR)], last_is_main=False)

    def from_plain(self, node, x, plain_shape):
        """A plain Keras value in IR (C, H, W) order -> the Keras (H, W, C) value."""
        ops = plan_layout(plain_shape, [("permute", FROM_IR)])
        for kind, arg in ops:
            name = self.name(node, f"{kind}_out")
            x = (self.L.Permute(tuple(arg[1:]), name=name) if kind == "permute" else self.L.Reshape(arg, name=name))(x)
        return x


def _err(node, msg) -> ConversionError:
    return ConversionError(f"node {node.name!r} ({node.op}): {msg}")


# --------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------

@ir_op("conv2d")
def _conv2d(ctx, n, xs):
    L, a, x = ctx.L, n.attrs, xs[0]
    wt, b = ctx.param(n, "weight"), ctx.param(n, "bias")
    c_in, h, w = ctx.shape(n.inputs[0])
    o, ig, kh, kw = wt.shape
    g = a["groups"]
    pad = list(a["padding"])
    same = [*same_padding(h, kh, a["stride"][0], a["dilation"][0]), *same_padding(w, kw, a["stride"][1],
                                                                                  a["dilation"][1])]
    if any(pad) and pad == same:
        mode = "same"
    else:
        mode = "valid"
        if any(pad):
            x = L.ZeroPadding2D(((pad[0], pad[1]), (pad[2], pad[3])), name=ctx.name(n, "pad"))(x)
    common = dict(strides=tuple(a["stride"]), padding=mode, dilation_rate=tuple(a["dilation"]), use_bias=b is not None)
    if g > 1 and ig == 1 and g == c_in and o % g == 0 and a["stride"][0] == a["stride"][1] \
            and (a["dilation"] == [1, 1] or a["stride"] == [1, 1]):
        mult = o // g
        layer = L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, name=ctx.name(n), **common)
        kern = wt.reshape(g, mult, kh, kw).transpose(2, 3, 0, 1)
    else:
        layer = L.Conv2D(o, (kh, kw), groups=g, name=ctx.name(n), **common)
        kern = wt.transpose(2, 3, 1, 0)
    return ctx.call(layer, x, [kern] + ([b] if b is not None else []))


@ir_op("batch_norm")
def _batch_norm(ctx, n, xs):
    layer = ctx.L.BatchNormalization(axis=-1, epsilon=n.attrs["eps"], name=ctx.name(n))
    return ctx.call(layer, xs[0], [ctx.param(n, r) for r in ("weight", "bias", "running_mean", "running_var")])


@ir_op("linear")
def _linear(ctx, n, xs):
    """Dense on the last axis; on a (C, H, W) value (last IR axis W) through
    a permute to the IR order and back."""
    wt, b = ctx.param(n, "weight"), ctx.param(n, "bias")
    s = ctx.shape(n.inputs[0])
    x = xs[0]
    if len(s) == 3:
        x = ctx.to_plain(n, x, s)
    y = ctx.call(ctx.L.Dense(wt.shape[0], use_bias=b is not None, name=ctx.name(n)), x,
                 [wt.T] + ([b] if b is not None else []))
    if len(s) == 3:
        y = ctx.from_plain(n, y, ctx.shape(n.output))
    return y


def _broadcast(ctx, n, vec, axis, rank):
    """An (S,) vector along IR ``axis`` -> a float32 array broadcasting against the Keras value."""
    k = keras_axis(axis, rank)
    return np.asarray(vec, dtype=np.float32).reshape((-1,) + (1,) * (rank - k))


@ir_op("affine")
def _affine(ctx, n, xs):
    """x * weight + bias -> Rescaling with array scale / offset (broadcast shapes)."""
    rank = len(ctx.shape(n.inputs[0]))
    w, b = ctx.param(n, "weight"), ctx.param(n, "bias")
    scale = 1.0 if w is None else _broadcast(ctx, n, w, n.attrs["axis"], rank)
    offset = 0.0 if b is None else _broadcast(ctx, n, b, n.attrs["axis"], rank)
    return ctx.L.Rescaling(scale=scale, offset=offset, name=ctx.name(n))(xs[0])


@ir_op("layer_norm")
def _layer_norm(ctx, n, xs):
    w, b = ctx.param(n, "weight"), ctx.param(n, "bias")
    rank = len(ctx.shape(n.inputs[0]))
    layer = ctx.L.LayerNormalization(axis=keras_axis(n.attrs["axis"], rank), epsilon=n.attrs["eps"],
                                     center=b is not None, scale=w is not None, name=ctx.name(n))
    return ctx.call(layer, xs[0], [v for v in (w, b) if v is not None])


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------

#: IR op -> Keras activation name
KERAS_ACTIVATION = {"sigmoid": "sigmoid", "silu": "silu", "hardsigmoid": "hard_sigmoid", "hardswish": "hard_silu"}


@ir_op("relu", "relu6")
def _relu(ctx, n, xs):
    return ctx.L.ReLU(max_value=6.0 if n.op == "relu6" else None, name=ctx.name(n))(xs[0])


@ir_op("identity")
def _identity(ctx, n, xs):
    return xs[0]


@ir_op(*KERAS_ACTIVATION)
def _activation(ctx, n, xs):
    return ctx.L.Activation(KERAS_ACTIVATION[n.op], name=ctx.name(n))(xs[0])


@ir_op("gelu")
def _gelu(ctx, n, xs):
    """erf form: Activation('gelu'); tanh form: keras.ops.gelu(approximate=True)
    (a functional operation; Keras names it ``gelu``, ``gelu_1`` ...)."""
    if n.attrs["approximate"] == "none":
        return ctx.L.Activation("gelu", name=ctx.name(n))(xs[0])
    y = ctx.keras.ops.gelu(xs[0], approximate=True)
    op = getattr(getattr(y, "_keras_history", None), "operation", None)
    if op is not None:
        ctx.names.used.add(op.name)
        ctx.record[op.name] = {"node": n.name, "output": n.output, "tensors": {}}
    return y


@ir_op("softmax")
def _softmax(ctx, n, xs):
    rank = len(ctx.shape(n.inputs[0]))
    return ctx.L.Softmax(axis=keras_axis(n.attrs["axis"], rank), name=ctx.name(n))(xs[0])


# --------------------------------------------------------------------------
# merges, layout, pooling
# --------------------------------------------------------------------------

@ir_op("add")
def _add(ctx, n, xs):
    return ctx.L.Add(name=ctx.name(n))(list(xs))


@ir_op("mul")
def _mul(ctx, n, xs):
    return ctx.L.Multiply(name=ctx.name(n))(list(xs))


@ir_op("concat")
def _concat(ctx, n, xs):
    rank = len(ctx.shape(n.inputs[0]))
    return ctx.L.Concatenate(axis=keras_axis(n.attrs["axis"], rank), name=ctx.name(n))(list(xs))


@ir_op("flatten")
def _flatten(ctx, n, xs):
    """The IR flattens (C, H, W) in (c, h, w) order: Permute((3, 1, 2)) first."""
    s = ctx.shape(n.inputs[0])
    x = xs[0]
    if len(s) == 1:
        return x
    if len(s) == 3 and not layout_noop(keras_shape(s), TO_IR):
        x = ctx.L.Permute((3, 1, 2), name=ctx.name(n, "chw"))(x)
    return ctx.L.Flatten(name=ctx.name(n))(x)


@ir_op("reshape")
def _reshape(ctx, n, xs):
    s, t = ctx.shape(n.inputs[0]), tuple(n.attrs["shape"])
    steps = ([("permute", TO_IR)] if len(s) == 3 else []) + [("reshape", t)] \
        + ([("permute", FROM_IR)] if len(t) == 3 else [])
    return _layout_or_identity(ctx, n, xs[0], s, steps)


@ir_op("permute")
def _permute(ctx, n, xs):
    s = ctx.shape(n.inputs[0])
    r = len(s) + 1
    to_ir = TO_IR if len(s) == 3 else tuple(range(r))
    from_ir = FROM_IR if len(s) == 3 else tuple(range(r))
    # Keras out = Keras in .transpose(to_ir) .transpose(perm) .transpose(from_ir)
    return _layout_or_identity(ctx, n, xs[0], s, [("permute", compose(to_ir, n.attrs["perm"], from_ir))])


def _layout_or_identity(ctx, n, x, s, steps):
    if not plan_layout(keras_shape(s), steps):
        return x
    return ctx.layout(n, x, s, steps)


@ir_op("pad")
def _pad(ctx, n, xs):
    if n.attrs["value"] != 0.0:
        raise _err(n, f"constant padding with value {n.attrs['value']} has no Keras layer (ZeroPadding2D pads zeros)")
    p = n.attrs["padding"]
    return ctx.L.ZeroPadding2D(((p[0], p[1]), (p[2], p[3])), name=ctx.name(n))(xs[0])


def _nonnegative(model, value) -> bool:
    """True when ``value`` is >= 0 by construction (relu / relu6 ..., through max pools)."""
    p = model.producer(value)
    while p is not None and p.op == "max_pool2d":
        p = model.producer(p.inputs[0])
    return p is not None and p.op in ("relu", "relu6", "sigmoid", "hardsigmoid", "softmax")


@ir_op("max_pool2d", "avg_pool2d")
def _pool(ctx, n, xs):
    L, a, x = ctx.L, n.attrs, xs[0]
    s_in = ctx.shape(n.inputs[0])
    k, s, p = a["kernel"], a["stride"], a["padding"]
    same = [*same_padding(s_in[1], k[0], s[0]), *same_padding(s_in[2], k[1], s[1])]
    P = L.MaxPooling2D if n.op == "max_pool2d" else L.AveragePooling2D
    if not any(p):
        mode = "valid"
    elif list(p) == same and (n.op == "max_pool2d" or not a["count_include_pad"]):
        mode = "same"
    elif (n.op == "avg_pool2d" and a["count_include_pad"]) or (n.op == "max_pool2d"
                                                               and _nonnegative(ctx.model, n.inputs[0])):
        # zeros count in the average; zeros never win the max of a nonnegative map
        x = L.ZeroPadding2D(((p[0], p[1]), (p[2], p[3])), name=ctx.name(n, "pad"))(x)
        mode = "valid"
    else:
        raise _err(n, f"padding {p} (count_include_pad={a.get('count_include_pad')}) has no exact Keras equivalent")
    return P(tuple(k), tuple(s), padding=mode, name=ctx.name(n))(x)


@ir_op("global_avg_pool")
def _global_avg_pool(ctx, n, xs):
    return ctx.L.GlobalAveragePooling2D(keepdims=n.attrs["keepdims"], name=ctx.name(n))(xs[0])


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------

def build(model, keras, bar=None):
    """(keras.Model, name map) computing what ``model.forward`` computes.

    The name map is ``{"format", "version", "input", "layers": {keras name:
    {"node", "output", "tensors": {role: tensor name}}}}``.  ``bar``: a
    ``udfc_ref.progress.Progress`` advanced once per node."""
    ctx = Context(keras, model)
    c, h, w = model.input_shape
    in_name = ctx.names(model.input_name)
    inp = keras.Input((h, w, c), name=in_name)
    ctx.kt[model.input_name] = inp
    for i, n in enumerate(model.nodes):
        if bar is not None:
            bar.update(i, n.name)
        f = EXPORTERS.get(n.op)
        if f is None:
            raise _err(n, "has no Keras equivalent in this exporter")
        try:
            ctx.kt[n.output] = f(ctx, n, [ctx.kt[i] for i in n.inputs])
        except ConversionError:
            raise
        except (ValueError, TypeError) as e:  # Keras refuses an argument combination
            raise _err(n, f"Keras refuses the layer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
    out = ctx.kt[model.output_name]
    if out is inp:
        raise ConversionError("the model computes nothing (its output is its input)")
    km = keras.Model(inp, out, name=ctx.names("udfc_model"))
    for layer, ws in ctx.pending:
        want = [tuple(v.shape) for v in layer.weights]
        ws = [np.asarray(v, dtype=np.float32) for v in ws]
        if [v.shape for v in ws] != want:
            raise ConversionError(f"layer {layer.name!r}: weight shapes {[v.shape for v in ws]} do not match "
                                  f"Keras' {want}")
        layer.set_weights(ws)
    names = {"format": NAMES_FORMAT, "version": 1, "input": {"keras": in_name, "name": model.input_name},
             "layers": ctx.record}
    return km, names
