"""Layer-pair discovery: producer -> BN -> activation -> consumer(s).

A *pair* is a conv2d/linear producer whose output channels can be pruned and
compensated in the layer(s) that read them (derivation section 1):

    producer (conv2d | linear) -> batch_norm -> [activation] -> [SE gate]
        -> [max_pool2d | avg_pool2d | global_avg_pool | identity | pad 0 | reshape (C,)<->(C,1,1)]*
        -> [flatten] -> consumer(s): conv2d groups=1 | linear

``activation`` is any op of ``ops.ACTIVATION_OPS``.  A grouped (not
depthwise) producer prunes the same number of channels in every group.
A producer -> BN -> act -> [pad 0] -> depthwise conv -> BN -> act chain is one
pair too (the depthwise channel goes with its producer channel).  A squeeze-excitation
gate ``x * gate(GAP(x))`` after the activation goes with the channels too:
the gate's squeeze input columns are rebuilt, its excite output rows removed
(derivation section 1, Eq. SE1-SE3).  Channels that reach
a residual ``add``, a ``concat``, another grouped conv, or the graph output
are *coupled*: pruning them alone would produce a
wrong network, so such producers are left unpruned (their weights may still
be quantized) and :func:`find_pairs` says why in ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activation_moments import activation_key
from .graph import Model, Node
from .ops import ACTIVATION_OPS

PASS_OPS = ("max_pool2d", "avg_pool2d", "global_avg_pool", "identity")


@dataclass
class SEGate:
    """A squeeze-excitation gate on the pair's channels:
    ``value -> mul(value, gate)`` with ``gate = GAP(value) -> [reshape] ->
    squeeze -> [pointwise]* -> excite -> [pointwise | affine]* -> mul``.

    ``squeeze`` (1x1 conv or linear) reads the pair's channels through the
    GAP: its input columns are a consumer of the rebuilt channels (Eq. SE2).
    ``excite`` (1x1 conv or linear) writes one gate per channel: its output
    rows (and bias) of the pruned channels are removed, and so are the
    entries of the per-channel ``affines`` between it and the ``mul``."""

    gap: Node
    squeeze: Node
    excite: Node
    mul: Node
    affines: list = field(default_factory=list)
    value: str = ""  # the gated map (the activation output the GAP and the mul read)
    reshapes: list = field(default_factory=list)  # reshapes of the channels (their target shape changes)


@dataclass
class Consumer:
    """A layer reading the pair's channels.

    ``positions`` is the number of weight columns per channel: kh*kw for a
    conv, H*W for a linear layer after flatten of a (C, H, W) value, 1 after
    a global pool."""

    node: Node
    positions: int


@dataclass
class Pair:
    """A producer whose output channels can be pruned.

    With ``dw`` set, the pair is a *depthwise chain*: producer -> bn -> act ->
    depthwise conv ``dw`` -> [``bn2`` -> ``act2``] -> consumers (``bn2`` None:
    a separable conv's depthwise -> pointwise); channel i of the
    producer, of both BNs and of the depthwise conv is removed together and
    the consumers rebuild the chain's output (MobileNetV2's expand -> dw ->
    project)."""

    producer: Node
    bn: Node
    act: str  # an activation key of moments.py: "relu", "relu6", "identity", "silu", ...
    consumers: list[Consumer] = field(default_factory=list)
    dw: Node | None = None
    bn2: Node | None = None
    act2: str | None = None
    value: str = ""  # the value whose channels the consumers read (after the last activation / SE gate)
    groups: int = 1  # a grouped producer prunes the same count in each of its groups
    se: SEGate | None = None
    reshapes: list = field(default_factory=list)  # reshapes of the channels on the way to the consumers

    @property
    def name(self) -> str:
        return self.producer.name


def _single_consumer(model: Model, value: str) -> Node | None:
    cs = model.consumers(value)
    if len(cs) != 1 or value == model.output_name:
        return None
    return cs[0]


def _bn_act(model: Model, value: str):
    """(bn, act, frontier) when ``value`` feeds a single BN, optionally one
    pointwise activation of ``ACTIVATION_OPS``; else None."""
    bn = _single_consumer(model, value)
    if bn is None or bn.op != "batch_norm":
        return None
    nxt = _single_consumer(model, bn.output)
    if nxt is not None and nxt.op in ACTIVATION_OPS:
        return bn, activation_key(nxt), nxt.output
    return bn, "identity", bn.output


def _depthwise(model: Model, c: Node, n: int) -> bool:
    return c.op == "conv2d" and c.attrs["groups"] == n and model.tensors[c.params["weight"]].shape[:2] == (n, 1)


def _keeps_channels(model: Model, node: Node) -> bool:
    """A reshape / flatten between (C,) and (C, 1, 1) (any order)."""
    a, b = model.shapes[node.inputs[0]], model.shapes[node.output]
    return a[0] == b[0] and all(d == 1 for d in a[1:]) and all(d == 1 for d in b[1:])


def _one_by_one(model: Model, node: Node) -> bool:
    """A dense 1x1 conv or a linear layer (a squeeze / excite layer)."""
    if node.op == "linear":
        return len(model.shapes[node.inputs[0]]) == 1
    return (node.op == "conv2d" and node.attrs["groups"] == 1
            and model.tensors[node.params["weight"]].shape[2:] == (1, 1) and not any(node.attrs["padding"]))


def _se_gate(model: Model, value: str) -> SEGate | None:
    """The squeeze-excitation gate on ``value``, if ``value`` is read exactly
    by a global average pool and a ``mul`` whose other input is
    ``gate(GAP(value))`` through single-consumer values (see :class:`SEGate`)."""
    cs = model.consumers(value)
    if len(cs) != 2 or value == model.output_name:
        return None
    gap = next((c for c in cs if c.op == "global_avg_pool"), None)
    mul = next((c for c in cs if c.op == "mul"), None)
    c = model.shapes[value][0]
    if gap is None or mul is None or model.shapes[mul.output] != model.shapes[value] or len(model.shapes[value]) != 3:
        return None

    reshapes = []

    def walk(v, allowed):
        """Follow single consumers through ``allowed(node)``; return the first other node."""
        while True:
            nxt = _single_consumer(model, v)
            if nxt is None or not allowed(nxt):
                return nxt
            v = nxt.output

    def channel_reshape(n):
        if n.op in ("reshape", "flatten") and _keeps_channels(model, n) and model.shapes[n.output][0] == c:
            if n.op == "reshape":
                reshapes.append(n)
            return True
        return False

    squeeze = walk(gap.output, channel_reshape)
    if squeeze is None or not _one_by_one(model, squeeze) or model.shapes[squeeze.inputs[0]][0] != c:
        return None
    excite = walk(squeeze.output, lambda n: n.op in ACTIVATION_OPS or n.op in ("affine", "batch_norm")
                  or (n.op in ("reshape", "flatten") and _keeps_channels(model, n)))
    if excite is None or not _one_by_one(model, excite) or model.shapes[excite.output][0] != c:
        return None
    affines = []
    v = excite.output
    while True:
        nxt = model.consumers(v)
        if v == model.output_name or len(nxt) != 1:
            return None
        nxt = nxt[0]
        if nxt is mul:
            break
        if nxt.op == "affine" and nxt.attrs["axis"] == 1:
            affines.append(nxt)
        elif not (nxt.op in ACTIVATION_OPS or channel_reshape(nxt)):
            return None
        v = nxt.output
    if sorted([v, value]) != sorted(mul.inputs) or model.shapes[v][0] != c:
        return None
    return SEGate(gap, squeeze, excite, mul, affines, value, reshapes)


def _pair_of(model: Model, p: Node) -> tuple[Pair | None, str]:
    if p.output == model.output_name:
        return None, "network output (the final classifier is never pruned)"
    groups = p.attrs["groups"] if p.op == "conv2d" else 1
    if groups != 1 and model.tensors[p.params["weight"]].shape[0] // groups < 2:
        return None, (f"depthwise conv (groups={groups}, one output channel per group): its channels are coupled "
                      "to its input")
    first = _bn_act(model, p.output)
    if first is None:
        return None, "not followed by a single BatchNorm (no statistics for a data-free estimate)"
    bn, act, frontier = first
    n = model.shapes[p.output][0]
    dw = bn2 = act2 = None
    nxt = _single_consumer(model, frontier)
    while nxt is not None and nxt.op == "pad" and nxt.attrs["value"] == 0.0:  # TF-style padding before a dw conv
        nxt = _single_consumer(model, nxt.output)
    if nxt is not None and nxt.op == "conv2d" and nxt.attrs["groups"] != 1:
        if not _depthwise(model, nxt, n):
            return None, f"feeds the grouped conv {nxt.name!r} (coupled channels, not a depthwise chain)"
        second = _bn_act(model, nxt.output)
        dw = nxt
        # without a BN after it (Xception's separable conv: depthwise -> pointwise) the chain ends at the
        # depthwise output, a linear map of the activations: its statistics are the propagated ones (A4)
        bn2, act2, frontier = second if second is not None else (None, None, nxt.output)
    se = _se_gate(model, frontier)
    if se is not None:
        frontier = se.mul.output
    consumers: list[Consumer] = []
    reshapes = []
    nch = model.shapes[frontier][0]
    stack = [(frontier, False)]
    while stack:
        value, flattened = stack.pop()
        if value == model.output_name:
            return None, "its channels reach the graph output"
        for c in model.consumers(value):
            if c.op in PASS_OPS and not flattened:
                stack.append((c.output, False))
            elif c.op == "pad" and not flattened and c.attrs["value"] == 0.0:
                stack.append((c.output, False))
            elif c.op in ("reshape", "flatten") and _keeps_channels(model, c) and model.shapes[value][0] == nch:
                stack.append((c.output, len(model.shapes[c.output]) == 1))
                if c.op == "reshape":
                    reshapes.append(c)
            elif c.op == "flatten" and not flattened:
                stack.append((c.output, True))
            elif c.op == "conv2d" and not flattened:
                if c.attrs["groups"] != 1:
                    return None, f"feeds the grouped/depthwise conv {c.name!r} (coupled channels)"
                w = model.tensors[c.params["weight"]]
                consumers.append(Consumer(c, int(w.shape[2] * w.shape[3])))
            elif c.op == "linear":
                if len(model.shapes[value]) != 1:
                    return None, f"reaches the linear layer {c.name!r} on a non-channel axis"
                consumers.append(Consumer(c, model.shapes[value][0] // nch))
            elif c.op == "add":
                return None, f"feeds the residual add {c.name!r} (coupled channels)"
            elif c.op == "mul":
                return None, f"feeds the product {c.name!r}, which is not a squeeze-excitation gate of its channels"
            elif c.op == "concat":
                return None, f"feeds the concat {c.name!r} (coupled channels)"
            else:
                return None, f"reaches {c.op} {c.name!r}, through which channels cannot be compensated"
    if not consumers:
        return None, "no consumer layer"
    return Pair(p, bn, act, consumers, dw, bn2, act2, frontier, groups, se, reshapes), ""


def find_pairs(model: Model) -> tuple[list[Pair], dict[str, str]]:
    """All compressible pairs, in topological order, and ``{producer: reason}``
    for every conv/linear layer whose output channels are left unpruned."""
    pairs, skipped = [], {}
    for n in model.nodes:
        if n.op not in ("conv2d", "linear"):
            continue
        pair, why = _pair_of(model, n)
        if pair is None:
            skipped[n.name] = why
        else:
            pairs.append(pair)
    return pairs, skipped
