"""Channel groups: every set of channels that must be removed together
(derivation section 11, "Coupled channels").

A *channel group* is an equivalence class of channels under the ops that
carry a channel index from their input to their output unchanged:

* per-channel ops -- batch_norm, affine along the channel axis, the
  pointwise activations, identity, pad, max/avg/global pooling, reshapes
  between ``(C,)`` and ``(C, 1, 1)``, a permute that keeps the channel axis;
* a depthwise conv (channel ``i`` of its output reads channel ``i`` of its
  input only);
* ``add`` and an elementwise ``mul`` of two values with the same channels
  join the channels of all their inputs and of their output (a residual
  stream; a squeeze-excitation gate and its map);
* ``concat`` stacks whole groups: channel ``c`` of its output *is* channel
  ``c - offset`` of one input, so its layout is the list of its inputs'
  groups (an index map, not a union).

A conv2d / linear output opens a new group (its *producer*); a dense conv /
linear layer reading a value of a group is a *consumer* of the group (its
input columns are rebuilt, Eq. R2); a grouped (not depthwise) conv reading a
group constrains it to prune the same count in each of its ``groups``
(Eq. S2).  Anything else that reads a group's channels (softmax, layer norm,
a reshape or permute that moves the channel axis, a linear layer on the last
axis of a map, a depthwise conv with a channel multiplier ...) and the
network's input and output *block* the group: its channels stay.

The union-find over channel groups visits every node once and every edge
once (path halving, union by size): linear in the graph up to the inverse
Ackermann factor.  Torch-Pruning's dependency graph is the same closure
computed by triggering; here it is a union of index spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import Model, Node
from .ops import ACTIVATION_OPS

#: ops that carry each channel from their (first) input to their output
CHANNEL_OPS = ACTIVATION_OPS + ("batch_norm", "max_pool2d", "avg_pool2d", "global_avg_pool", "pad")


@dataclass
class Layout:
    """The channels of one value: ``segs`` the element ids of its channel
    groups in order (one for a plain value, several after a concat), ``flat``
    the weight columns per channel when the value is a flattened map (0 for
    a value whose channel axis is axis 1)."""

    segs: tuple
    flat: int = 0


@dataclass
class Group:
    """One channel group (see the module docstring).

    ``producers``: conv2d / linear layers whose output rows are the group's
    channels (residual stream: every conv feeding its adds, the
    downsample conv; SE: the excite layer); ``depthwise``: depthwise convs
    whose rows (and ``groups``) go with the channels; ``companions``:
    batch_norm / affine / reshape nodes whose per-channel parameters (or
    target shape) go with them; ``consumers``: ``(layer, value, positions)``
    for every dense conv / linear reading the channels, ``value`` the value
    whose statistics the layer reads (the flatten's input for a linear after
    a flatten), ``positions`` its weight columns per channel;
    ``constraint``: prune the same count in each of this many consecutive
    blocks; ``blocked``: why the channels cannot be removed ("" when they
    can)."""

    index: int
    size: int
    producers: list = field(default_factory=list)
    depthwise: list = field(default_factory=list)
    companions: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    values: list = field(default_factory=list)
    constraint: int = 1
    blocked: str = ""

    @property
    def name(self) -> str:
        """The first producer (topological order), or ``group<i>``."""
        return self.producers[0].name if self.producers else f"group{self.index}"

    @property
    def coupled(self) -> bool:
        """More than one layer writes these channels, or a concat / add stacks them."""
        return len(self.producers) > 1


class ChannelGroups:
    """The channel groups of a model: ``groups`` (list of :class:`Group`),
    ``layout[value]`` (tuple of group indices of the value's channels, in
    order) and ``flat[value]`` (columns per channel after a flatten, else
    0)."""

    def __init__(self, model: Model, groups, layout, flat):
        self.model = model
        self.groups: list[Group] = groups
        self.layout: dict[str, tuple] = layout
        self.flat: dict[str, int] = flat

    def group_of(self, value: str) -> Group | None:
        """The group of a value with one group (None for a concat of several)."""
        segs = self.layout.get(value, ())
        return self.groups[segs[0]] if len(segs) == 1 else None

    def kept_index(self, value: str, kept: dict) -> np.ndarray | None:
        """Indices of ``value``'s channels that remain when group ``g`` keeps
        ``kept[g]`` (sorted indices into the group); groups not in ``kept``
        keep everything.  None when nothing of the value is removed."""
        segs = self.layout.get(value, ())
        if not any(g in kept for g in segs):
            return None
        out, off = [], 0
        for g in segs:
            n = self.groups[g].size
            out.append(off + (np.asarray(kept[g]) if g in kept else np.arange(n)))
            off += n
        return np.concatenate(out).astype(np.int64)


class _UnionFind:
    """Disjoint sets of channel-group elements with their size, block-size
    constraint and blocking reason."""

    def __init__(self):
        self.parent: list[int] = []
        self.rank: list[int] = []
        self.size: list[int] = []
        self.constraint: list[int] = []
        self.blocked: list[str] = []

    def new(self, size: int, blocked: str = "", constraint: int = 1) -> int:
        self.parent.append(len(self.parent))
        self.rank.append(0)
        self.size.append(int(size))
        self.constraint.append(int(constraint))
        self.blocked.append(blocked)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]  # path halving
            i = p[i]
        return i

    def block(self, i: int, why: str) -> None:
        r = self.find(i)
        if not self.blocked[r]:
            self.blocked[r] = why

    def constrain(self, i: int, g: int) -> None:
        r = self.find(i)
        c = self.constraint[r]
        if g == 1 or c == g:
            return
        if c == 1 and self.size[r] % g == 0:
            self.constraint[r] = g
        else:
            self.block(r, f"read in {c} and in {g} channel groups (grouped convs that disagree)")

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.rank[ra] < self.rank[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.rank[ra] == self.rank[rb]:
            self.rank[ra] += 1
        why = self.blocked[ra] or self.blocked[rb]
        self.blocked[ra] = why
        c = self.constraint[rb]
        self.constrain(ra, c)
        return ra


class _Walk:
    """State of :func:`find_groups` while it visits the nodes."""

    def __init__(self, model: Model):
        self.m = model
        self.uf = _UnionFind()
        self.layout: dict[str, Layout] = {}
        self.roles: list[tuple] = []  # (kind, node, value, element ids, positions) resolved at the end

    def fresh(self, value: str, blocked: str = "", constraint: int = 1) -> Layout:
        e = self.uf.new(self.m.shapes[value][0] if self.m.shapes[value] else 1, blocked, constraint)
        lay = Layout((e,), 0 if len(self.m.shapes[value]) > 1 else 1)
        self.layout[value] = lay
        return lay

    def block(self, lay: Layout, why: str) -> None:
        for e in lay.segs:
            self.uf.block(e, why)

    def opaque(self, n: Node, why: str) -> None:
        """``n`` reads channels it does not carry: block its inputs; its output is a new blocked group."""
        for v in dict.fromkeys(n.inputs):
            self.block(self.layout[v], why)
        self.fresh(n.output, f"output of {n.op} {n.name!r} (its channels are not a producer's)")

    def same(self, n: Node, lay: Layout, flat=None) -> None:
        self.layout[n.output] = Layout(lay.segs, lay.flat if flat is None else flat)

    def role(self, kind: str, n: Node, value: str, lay: Layout, positions: int = 0) -> None:
        self.roles.append((kind, n, value, lay.segs, positions))


def _join(w: _Walk, n: Node) -> None:
    """add / mul of values with the same channels: one group per position."""
    lays = [w.layout[v] for v in n.inputs]
    c_out = w.m.shapes[n.output][0]
    full = [lay for lay, v in zip(lays, n.inputs) if w.m.shapes[v][0] == c_out]
    if n.op == "mul" and len(full) == 1 and c_out > 1:  # a (1, ...) factor broadcast over the channels
        w.same(n, full[0])
        return
    first = full[0]
    for lay in full[1:]:
        if [w.uf.size[w.uf.find(e)] for e in lay.segs] != [w.uf.size[w.uf.find(e)] for e in first.segs] \
                or lay.flat != first.flat:
            w.opaque(n, f"reaches the {n.op} {n.name!r} of values whose channel groups do not line up")
            return
    for lay in full[1:]:
        for a, b in zip(first.segs, lay.segs):
            w.uf.union(a, b)
    w.same(n, first)


def _conv(w: _Walk, n: Node) -> None:
    m = w.m
    v = n.inputs[0]
    lay = w.layout[v]
    wt = m.tensors[n.params["weight"]]
    cin, g = m.shapes[v][0], n.attrs["groups"]
    if lay.flat:
        w.opaque(n, f"reaches the conv {n.name!r} after a flatten")
        return
    if g == 1:
        w.role("consumer", n, v, lay, int(wt.shape[2] * wt.shape[3]))
        w.fresh(n.output)
        w.role("producer", n, n.output, w.layout[n.output])
    elif g == cin and wt.shape[:2] == (cin, 1):
        w.same(n, lay)  # depthwise: channel i -> i
        w.role("depthwise", n, n.output, lay)
    elif g == cin:
        w.opaque(n, f"reaches the depthwise conv {n.name!r} with a channel multiplier")
    else:
        if len(lay.segs) != 1:
            w.opaque(n, f"reaches the grouped conv {n.name!r} through a concat")
            return
        w.uf.constrain(lay.segs[0], g)
        w.role("consumer", n, v, lay, int(wt.shape[2] * wt.shape[3]))
        w.fresh(n.output, constraint=g)
        w.role("producer", n, n.output, w.layout[n.output])


def _linear(w: _Walk, n: Node) -> None:
    v = n.inputs[0]
    lay = w.layout[v]
    if len(w.m.shapes[v]) != 1:
        w.opaque(n, f"reaches the linear layer {n.name!r} on a non-channel axis")
        return
    src = v
    p = w.m.producer(v)
    if lay.flat > 1 and p is not None and p.op == "flatten":
        src = p.inputs[0]  # its statistics are the flatten input's (DataModel keeps them until here)
    w.role("consumer", n, src, lay, max(lay.flat, 1))
    w.fresh(n.output)
    w.role("producer", n, n.output, w.layout[n.output])


def _per_channel(w: _Walk, n: Node) -> None:
    lay = w.layout[n.inputs[0]]
    if lay.flat > 1:
        w.opaque(n, f"reaches {n.op} {n.name!r} after a flatten")
        return
    if n.op == "pad" and n.attrs["value"] != 0.0:
        w.opaque(n, f"reaches the pad {n.name!r} with a non-zero value")
        return
    w.same(n, lay)
    if n.op == "batch_norm":
        w.role("companion", n, n.output, lay)


def _affine(w: _Walk, n: Node) -> None:
    lay = w.layout[n.inputs[0]]
    if n.attrs["axis"] != 1 or lay.flat > 1:
        w.opaque(n, f"reaches the affine {n.name!r} along a non-channel axis")
        return
    w.same(n, lay)
    w.role("companion", n, n.output, lay)


def _reshape(w: _Walk, n: Node) -> None:
    m = w.m
    a, b = m.shapes[n.inputs[0]], m.shapes[n.output]
    lay = w.layout[n.inputs[0]]
    keeps = a[0] == b[0] and all(d == 1 for d in a[1:]) and all(d == 1 for d in b[1:]) and lay.flat <= 1
    if keeps:
        w.same(n, lay, flat=1 if len(b) == 1 else 0)
        if n.op == "reshape":
            w.role("companion", n, n.output, lay)
    elif n.op == "flatten" and len(a) == 3 and lay.flat == 0:
        w.same(n, lay, flat=a[1] * a[2])
    else:
        w.opaque(n, f"reaches the {n.op} {n.name!r}, which moves the channel axis")


def _permute(w: _Walk, n: Node) -> None:
    lay = w.layout[n.inputs[0]]
    if n.attrs["perm"][1] == 1 and lay.flat == 0 and w.m.shapes[n.output][1:] == w.m.shapes[n.inputs[0]][1:]:
        w.same(n, lay)
    else:
        w.opaque(n, f"reaches the permute {n.name!r}, which moves the channel axis")


def _concat(w: _Walk, n: Node) -> None:
    lays = [w.layout[v] for v in n.inputs]
    if len({lay.flat for lay in lays}) != 1 or lays[0].flat > 1:
        w.opaque(n, f"reaches the concat {n.name!r} of flattened values")
        return
    w.layout[n.output] = Layout(tuple(e for lay in lays for e in lay.segs), lays[0].flat)


#: op -> handler(walk, node): how the op maps the channel groups of its inputs to its output
RULES = {"conv2d": _conv, "linear": _linear, "add": _join, "mul": _join, "concat": _concat, "affine": _affine,
         "reshape": _reshape, "flatten": _reshape, "permute": _permute, "identity": _per_channel}
RULES.update({op: _per_channel for op in CHANNEL_OPS})


def find_groups(model: Model) -> ChannelGroups:
    """The channel groups of ``model`` (see the module docstring), in the
    order their first producer appears.  Groups without a BatchNorm on their
    channels (no statistics for a data-free estimate) or without a consumer
    layer are blocked too."""
    w = _Walk(model)
    w.fresh(model.input_name, "the network input")
    for n in model.nodes:
        rule = RULES.get(n.op)
        if rule is None:
            w.opaque(n, f"reaches {n.op} {n.name!r}, through which channels cannot be compensated")
        else:
            rule(w, n)
    w.block(w.layout[model.output_name], "its channels reach the graph output")
    uf = w.uf
    index: dict[int, int] = {}
    groups: list[Group] = []

    def group(e):
        r = uf.find(e)
        if r not in index:
            index[r] = len(groups)
            groups.append(Group(len(groups), uf.size[r], constraint=uf.constraint[r], blocked=uf.blocked[r]))
        return groups[index[r]]

    for kind, n, value, segs, positions in w.roles:
        for e in segs:
            g = group(e)
            if kind == "producer":
                g.producers.append(n)
            elif kind == "depthwise":
                g.depthwise.append(n)
            elif kind == "companion":
                g.companions.append(n)
            else:
                g.consumers.append((n, value, positions))
    layout = {}
    for v, lay in w.layout.items():
        layout[v] = tuple(group(e).index for e in lay.segs)
        for gi in dict.fromkeys(layout[v]):
            groups[gi].values.append(v)
    for g in groups:
        if g.blocked:
            continue
        if not any(c.op == "batch_norm" for c in g.companions):
            g.blocked = "no BatchNorm on its channels (no statistics for a data-free estimate)"
        elif not g.consumers:
            g.blocked = "no consumer layer"
        elif not g.producers:
            g.blocked = "no producer layer"
    return ChannelGroups(model, groups, layout, {v: lay.flat for v, lay in w.layout.items()})
