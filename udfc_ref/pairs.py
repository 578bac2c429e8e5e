"""Layer-pair discovery: producer -> BN -> activation -> consumer(s).

A *pair* is a conv2d/linear producer whose output channels can be pruned and
compensated in the layer(s) that read them (derivation section 1):

    producer (conv2d groups=1 | linear) -> batch_norm -> relu | relu6 | (none)
        -> [max_pool2d | avg_pool2d | global_avg_pool | identity]*
        -> [flatten] -> consumer(s): conv2d groups=1 | linear

A producer -> BN -> act -> depthwise conv -> BN -> act chain is one pair too
(the depthwise channel goes with its producer channel).  Channels that reach
a residual ``add``, a ``concat``, another grouped conv, or the graph output
are *coupled*: pruning them alone would produce a
wrong network, so such producers are left unpruned (their weights may still
be quantized) and :func:`find_pairs` says why in ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Model, Node

PASS_OPS = ("max_pool2d", "avg_pool2d", "global_avg_pool", "identity")


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
    depthwise conv ``dw`` -> ``bn2`` -> ``act2`` -> consumers; channel i of the
    producer, of both BNs and of the depthwise conv is removed together and
    the consumers rebuild the chain's output (MobileNetV2's expand -> dw ->
    project)."""

    producer: Node
    bn: Node
    act: str  # "relu" | "relu6" | "identity"
    consumers: list[Consumer] = field(default_factory=list)
    dw: Node | None = None
    bn2: Node | None = None
    act2: str | None = None
    value: str = ""  # the value whose channels the consumers read (after the last activation)

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
    ReLU/ReLU6; else None."""
    bn = _single_consumer(model, value)
    if bn is None or bn.op != "batch_norm":
        return None
    nxt = _single_consumer(model, bn.output)
    if nxt is not None and nxt.op in ("relu", "relu6"):
        return bn, nxt.op, nxt.output
    return bn, "identity", bn.output


def _depthwise(model: Model, c: Node, n: int) -> bool:
    return c.op == "conv2d" and c.attrs["groups"] == n and model.tensors[c.params["weight"]].shape[:2] == (n, 1)


def _pair_of(model: Model, p: Node) -> tuple[Pair | None, str]:
    if p.output == model.output_name:
        return None, "network output (the final classifier is never pruned)"
    if p.op == "conv2d" and p.attrs["groups"] != 1:
        return None, f"grouped conv (groups={p.attrs['groups']}): its channels are coupled to its input"
    first = _bn_act(model, p.output)
    if first is None:
        return None, "not followed by a single BatchNorm (no statistics for a data-free estimate)"
    bn, act, frontier = first
    n = model.shapes[p.output][0]
    dw = bn2 = act2 = None
    nxt = _single_consumer(model, frontier)
    if nxt is not None and nxt.op == "conv2d" and nxt.attrs["groups"] != 1:
        if not _depthwise(model, nxt, n):
            return None, f"feeds the grouped conv {nxt.name!r} (coupled channels, not a depthwise chain)"
        second = _bn_act(model, nxt.output)
        if second is None:
            return None, f"feeds the depthwise conv {nxt.name!r}, which is not followed by a single BatchNorm"
        dw = nxt
        bn2, act2, frontier = second
    consumers: list[Consumer] = []
    stack = [(frontier, False)]
    while stack:
        value, flattened = stack.pop()
        if value == model.output_name:
            return None, "its channels reach the graph output"
        for c in model.consumers(value):
            if c.op in PASS_OPS and not flattened:
                stack.append((c.output, False))
            elif c.op == "flatten" and not flattened:
                stack.append((c.output, True))
            elif c.op == "conv2d" and not flattened:
                if c.attrs["groups"] != 1:
                    return None, f"feeds the grouped/depthwise conv {c.name!r} (coupled channels)"
                w = model.tensors[c.params["weight"]]
                consumers.append(Consumer(c, int(w.shape[2] * w.shape[3])))
            elif c.op == "linear":
                c_in = model.shapes[value][0]
                n = model.shapes[frontier][0]
                consumers.append(Consumer(c, c_in // n))
            elif c.op == "add":
                return None, f"feeds the residual add {c.name!r} (coupled channels)"
            elif c.op == "concat":
                return None, f"feeds the concat {c.name!r} (coupled channels)"
            else:
                return None, f"reaches {c.op} {c.name!r}, through which channels cannot be compensated"
    if not consumers:
        return None, "no consumer layer"
    return Pair(p, bn, act, consumers, dw, bn2, act2, frontier), ""


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
