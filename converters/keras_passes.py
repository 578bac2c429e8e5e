"""Exact graph rewrites applied after the one-to-one Keras layer mapping.

The handlers of ``keras_layers.py`` map each Keras layer to IR nodes that
compute the same thing on their own (an explicit ``pad`` for
``ZeroPadding2D``, a ``permute`` for the channels-last order of ``Flatten``
...).  :func:`simplify` then rewrites the node list into the smaller graph
the compression code understands, each rewrite exact (the same arithmetic;
where rounding can differ, the bound is given):

* **pad folding** -- a zero ``pad`` whose every reader is a ``conv2d``, a
  ``count_include_pad`` average pooling, or a max pooling of a nonnegative
  value (after relu / relu6 / sigmoid / hardsigmoid / softmax, through
  pools, layout ops, adds and concats of such values) is added to the
  readers' own padding (pooling: up to half the window, so every window
  still holds a real cell and a zero never beats it);
* **layout** -- consecutive permutes compose, an identity permute vanishes,
  a permute that keeps the C-order of the elements becomes a reshape,
  reshapes merge, a reshape to the same shape vanishes,
  ``global_avg_pool -> reshape (C,)<->(C, 1, 1)`` becomes the pool's
  ``keepdims``, and ``permute -> flatten -> linear`` becomes ``flatten ->
  linear`` with the linear weight's columns permuted (Keras' (h, w, c)
  feature order of a Flatten after convolutions);
* **activations** -- ``affine(+3) -> relu6 -> affine(x 1/6)`` (Keras 3's
  MobileNetV3 ``hard_sigmoid``) becomes ``hardsigmoid`` (relu6(x + 3) / 6:
  the product with float32(1/6) and the division by 6 differ by at most one
  unit in the last place), ``mul(x, hardsigmoid(x))`` becomes ``hardswish``
  and ``mul(x, sigmoid(x))`` becomes ``silu`` (same products).

Every rewrite looks only at a node and its producer, so one walk in
topological order is linear in the size of the graph.
"""

from __future__ import annotations

import numpy as np

from .keras_layers import compose, layout_noop

#: producers whose output is >= 0
NONNEG_OPS = ("relu", "relu6", "sigmoid", "hardsigmoid", "softmax")
#: ops whose output is >= 0 when all inputs are
NONNEG_KEEP = ("max_pool2d", "avg_pool2d", "global_avg_pool", "flatten", "reshape", "permute", "add", "concat",
               "mul", "identity")


class _Graph:
    """Node list + producer / consumer indexes kept current by the rewrites."""

    def __init__(self, nodes, tensors, shapes, output, input_name):
        self.nodes, self.tensors, self.shapes = list(nodes), tensors, shapes
        self.output, self.input_name = output, input_name
        self.dead: set[int] = set()
        self.producer = {n.output: n for n in self.nodes}
        self.readers: dict[str, list] = {}
        for n in self.nodes:
            for i in dict.fromkeys(n.inputs):
                self.readers.setdefault(i, []).append(n)

    def alive(self):
        return (n for n in self.nodes if id(n) not in self.dead)

    def prod(self, value):
        p = self.producer.get(value)
        return None if p is None or id(p) in self.dead else p

    def only_reader(self, value):
        rs = self.readers.get(value, [])
        return rs[0] if len(rs) == 1 and value != self.output else None

    def rewire(self, node, old, new) -> None:
        """``node`` reads ``new`` where it read ``old``."""
        node.inputs = [new if i == old else i for i in node.inputs]
        rs = self.readers.get(old, [])
        if node in rs and old not in node.inputs:
            rs.remove(node)
        nr = self.readers.setdefault(new, [])
        if node not in nr:
            nr.append(node)

    def kill(self, node) -> None:
        """Remove ``node``, whose output nobody reads any more."""
        self.dead.add(id(node))
        for i in dict.fromkeys(node.inputs):
            rs = self.readers.get(i, [])
            if node in rs:
                rs.remove(node)

    def bypass(self, node) -> None:
        """Remove a one-input ``node``: its readers read its input instead."""
        src = node.inputs[0]
        for r in list(self.readers.get(node.output, [])):
            self.rewire(r, node.output, src)
        self.readers.pop(node.output, None)
        if self.output == node.output:
            self.output = src
        self.kill(node)

    def tensor_users(self):
        users: dict[str, int] = {}
        for n in self.alive():
            for t in n.params.values():
                users[t] = users.get(t, 0) + 1
        return users


# --------------------------------------------------------------------------
# pad folding
# --------------------------------------------------------------------------

def _nonneg(g: _Graph) -> dict:
    """value -> True when it is >= 0 by construction (one pass in order)."""
    out = {g.input_name: False}
    for n in g.alive():
        if n.op in NONNEG_OPS:
            out[n.output] = True
        elif n.op in NONNEG_KEEP:
            out[n.output] = all(out.get(i, False) for i in n.inputs)
        elif n.op == "pad":
            out[n.output] = out.get(n.inputs[0], False) and n.attrs["value"] >= 0
        else:
            out[n.output] = False
    return out


def _fold_pad_into(reader, pad, nonneg) -> list | None:
    """The reader's new padding with ``pad`` folded in, or None when it cannot absorb it."""
    p = [a + b for a, b in zip(reader.attrs["padding"], pad.attrs["padding"])]
    if reader.op == "conv2d":
        return p
    if reader.op not in ("avg_pool2d", "max_pool2d"):
        return None
    kh, kw = reader.attrs["kernel"]
    if max(p[:2]) > kh // 2 or max(p[2:]) > kw // 2:
        return None
    if reader.op == "avg_pool2d" and (reader.attrs["count_include_pad"] or not any(reader.attrs["padding"])):
        return p
    if reader.op == "max_pool2d" and nonneg.get(pad.inputs[0], False):
        return p
    return None


def fold_pads(g: _Graph) -> None:
    nonneg = _nonneg(g)
    for n in list(g.alive()):
        if n.op != "pad" or n.attrs["value"] != 0.0 or n.output == g.output:
            continue
        readers = g.readers.get(n.output, [])
        new = [_fold_pad_into(r, n, nonneg) for r in readers]
        if not readers or any(p is None for p in new) or any(r.inputs[0] != n.output for r in readers):
            continue
        for r, p in zip(readers, new):
            r.attrs["padding"] = p
            if r.op == "avg_pool2d":
                r.attrs["count_include_pad"] = True
        g.bypass(n)


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

def _flatten_into_linear(g: _Graph, f, users) -> None:
    """permute P -> flatten f -> linear(s): drop P, permute the linears' columns."""
    p = g.prod(f.inputs[0])
    if p is None or p.op != "permute" or g.only_reader(p.output) is not f:
        return
    readers = g.readers.get(f.output, [])
    if f.output == g.output or not readers or any(r.op != "linear" or users[r.params["weight"]] != 1
                                                  for r in readers):
        return
    src_shape = g.shapes[p.inputs[0]]
    # column j of the linear reads element j of P's output in C order, i.e. element idx[j] of P's input
    idx = np.arange(int(np.prod(src_shape))).reshape(src_shape).transpose([q - 1 for q in p.attrs["perm"][1:]]).ravel()
    for r in readers:
        w = g.tensors[r.params["weight"]]
        new = np.empty_like(w)
        new[:, idx] = w
        g.tensors[r.params["weight"]] = new
    g.rewire(f, p.output, p.inputs[0])
    g.kill(p)


def simplify_layout(g: _Graph) -> None:
    users = g.tensor_users()
    for n in list(g.alive()):
        if id(n) in g.dead:
            continue
        if n.op == "permute":
            p = g.prod(n.inputs[0])
            if p is not None and p.op == "permute" and g.only_reader(p.output) is n:
                n.attrs["perm"] = list(compose(p.attrs["perm"], n.attrs["perm"]))
                g.rewire(n, p.output, p.inputs[0])
                g.kill(p)
            perm = n.attrs["perm"]
            if perm == sorted(perm):
                g.bypass(n)
                continue
            if layout_noop(g.shapes[n.inputs[0]], perm):
                n.op, n.attrs = "reshape", {"shape": list(g.shapes[n.output])}
        if n.op in ("reshape", "flatten"):
            p = g.prod(n.inputs[0])
            if p is not None and p.op == "reshape" and g.only_reader(p.output) is n:
                g.rewire(n, p.output, p.inputs[0])
                g.kill(p)
            s_in, s_out = g.shapes[n.inputs[0]], g.shapes[n.output]
            if s_in == s_out:
                g.bypass(n)
                continue
            p = g.prod(n.inputs[0])
            if n.op == "reshape" and p is not None and p.op == "global_avg_pool" and g.only_reader(p.output) is n \
                    and s_out in ((s_in[0], 1, 1), (s_in[0],)) and s_in in ((s_out[0],), (s_out[0], 1, 1)):
                p.attrs["keepdims"] = len(s_out) == 3
                g.shapes[p.output] = s_out
                g.bypass(n)
                continue
        if n.op == "flatten":
            _flatten_into_linear(g, n, users)


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------

def _const_affine(g: _Graph, n, role, value) -> bool:
    """``n`` is an affine with only ``role``, every entry == float32(value)."""
    if n is None or n.op != "affine" or set(n.params) != {role}:
        return False
    return bool(np.all(g.tensors[n.params[role]] == np.float32(value)))


def fuse_activations(g: _Graph) -> None:
    for n in list(g.alive()):
        if id(n) in g.dead:
            continue
        if n.op == "relu6":
            a = g.prod(n.inputs[0])
            m = g.only_reader(n.output)
            if _const_affine(g, a, "bias", 3.0) and g.only_reader(a.output) is n and _const_affine(g, m, "weight",
                                                                                                      1.0 / 6.0):
                n.op, n.attrs = "hardsigmoid", {}
                g.rewire(n, a.output, a.inputs[0])
                g.kill(a)
                g.bypass(m)
        elif n.op == "mul":
            for gate_i in (1, 0):
                h = g.prod(n.inputs[gate_i])
                x = n.inputs[1 - gate_i]
                if h is not None and h.op in ("hardsigmoid", "sigmoid") and h.inputs[0] == x \
                        and g.only_reader(h.output) is n:
                    n.op, n.attrs = ("hardswish" if h.op == "hardsigmoid" else "silu"), {}
                    g.rewire(n, h.output, x)
                    n.inputs = [x]
                    g.kill(h)
                    break


def simplify(nodes, tensors, shapes, output, input_name):
    """Apply the rewrites; returns (nodes, tensors still used, output value name)."""
    g = _Graph(nodes, tensors, shapes, output, input_name)
    fold_pads(g)
    simplify_layout(g)
    fuse_activations(g)
    alive = list(g.alive())
    used = {t for n in alive for t in n.params.values()}
    return alive, {k: v for k, v in tensors.items() if k in used}, g.output
