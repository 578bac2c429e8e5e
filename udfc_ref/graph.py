"""The intermediate representation: named tensors plus an ordered node list.

A :class:`Model` is a dict of named parameter tensors (the names a framework
gave them, e.g. ``features.0.weight``) and a list of :class:`Node`.  Each node
has an ``op``, the names of the values it reads, the name of the value it
writes, its attributes, and ``params`` mapping a role (``weight``, ``bias``,
``running_mean`` ...) to a tensor name.  Values are NCHW activations; shapes
below never include the batch axis.

Ops and their attributes (see ``docs/format.md``):

=================  =========================================================
op                 attributes / params
=================  =========================================================
conv2d             stride [sh, sw], padding [top, bottom, left, right],
                   dilation [dh, dw], groups; params weight (O, I/g, kh, kw),
                   optional bias (O,)
batch_norm         eps; params weight (gamma), bias (beta), running_mean,
                   running_var, all (C,)
linear             params weight (O, I), optional bias (O,)
relu, relu6,       none
identity
add                two or more inputs of one shape
concat             two or more inputs, joined on the channel axis
flatten            (C, H, W) -> (C*H*W,), C-order (channel slowest)
max_pool2d         kernel [kh, kw], stride [sh, sw], padding [t, b, l, r]
avg_pool2d         as max_pool2d, plus count_include_pad (bool)
global_avg_pool    keepdims (bool): (C, H, W) -> (C, 1, 1) or (C,)
=================  =========================================================
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GraphError

OPS = {
    "conv2d": {"params": ("weight",), "optional": ("bias",), "n_inputs": 1},
    "batch_norm": {"params": ("weight", "bias", "running_mean", "running_var"), "optional": (), "n_inputs": 1},
    "linear": {"params": ("weight",), "optional": ("bias",), "n_inputs": 1},
    "relu": {"params": (), "optional": (), "n_inputs": 1},
    "relu6": {"params": (), "optional": (), "n_inputs": 1},
    "identity": {"params": (), "optional": (), "n_inputs": 1},
    "add": {"params": (), "optional": (), "n_inputs": -2},
    "concat": {"params": (), "optional": (), "n_inputs": -2},
    "flatten": {"params": (), "optional": (), "n_inputs": 1},
    "max_pool2d": {"params": (), "optional": (), "n_inputs": 1},
    "avg_pool2d": {"params": (), "optional": (), "n_inputs": 1},
    "global_avg_pool": {"params": (), "optional": (), "n_inputs": 1},
}



def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_))


@dataclass
class Node:
    """One operation of the graph."""

    name: str
    op: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "output": self.output,
            "attrs": _copy.deepcopy(self.attrs),
            "params": dict(self.params),
        }

    @classmethod
    def from_json(cls, d: Any, index: int) -> "Node":
        if not isinstance(d, dict):
            raise GraphError(f"graph node #{index} is not a JSON object")
        try:
            name = d["name"]
            op = d["op"]
            inputs = d["inputs"]
            output = d["output"]
        except KeyError as e:
            raise GraphError(f"graph node #{index} lacks the field {e.args[0]!r}") from None
        attrs = d.get("attrs", {})
        params = d.get("params", {})
        if not isinstance(name, str) or not isinstance(op, str) or not isinstance(output, str):
            raise GraphError(f"graph node #{index}: name, op and output must be strings")
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise GraphError(f"node {name!r}: inputs must be a list of value names")
        if not isinstance(attrs, dict):
            raise GraphError(f"node {name!r}: attrs must be an object")
        for k, v in attrs.items():
            if not (_is_scalar(v) or (isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v))):
                raise GraphError(f"node {name!r}: attribute {k!r} must be a number, string, bool or a flat list of "
                                 f"them, got {type(v).__name__}")
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            raise GraphError(f"node {name!r}: params must map roles to tensor names")
        return cls(name=name, op=op, inputs=list(inputs), output=output, attrs=dict(attrs), params=dict(params))


# --------------------------------------------------------------------------
# attribute normalisation
# --------------------------------------------------------------------------

#: largest attribute integer (kernel, stride, padding, dilation, groups) and
#: largest number of elements of one value (batch excluded) a model may have;
#: beyond these a file is corrupt or hostile, not a CNN this tool can run.
MAX_ATTR_INT = 1 << 20
MAX_VALUE_ELEMENTS = 1 << 28


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return bool(np.isfinite(float(v)))
    except (OverflowError, TypeError, ValueError):
        return False


def _bool_attr(node: Node, key: str, default: bool) -> bool:
    v = node.attrs.get(key, default)
    if not isinstance(v, (bool, np.bool_)):
        raise GraphError(f"node {node.name!r}: attribute {key!r} must be true or false, got {v!r}")
    return bool(v)


def _check_attr_ints(node: Node, key: str, values) -> None:
    if any(abs(int(x)) > MAX_ATTR_INT for x in values):
        raise GraphError(f"node {node.name!r}: attribute {key!r} = {list(values)!r} is implausibly large "
                         f"(limit {MAX_ATTR_INT})")


def _int_pair(node: Node, key: str, default) -> list[int]:
    v = node.attrs.get(key, default)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = [int(v), int(v)]
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)
    ):
        raise GraphError(f"node {node.name!r}: attribute {key!r} must be an int or a pair of ints, got {v!r}")
    _check_attr_ints(node, key, v)
    return [int(x) for x in v]


def _padding4(node: Node, default=0) -> list[int]:
    v = node.attrs.get("padding", default)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = [int(v)] * 4
    if isinstance(v, (list, tuple)) and len(v) == 2:
        v = [v[0], v[0], v[1], v[1]]
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 4
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)
    ):
        raise GraphError(
            f"node {node.name!r}: padding must be an int, [ph, pw] or [top, bottom, left, right], got {v!r}"
        )
    if any(int(x) < 0 for x in v):
        raise GraphError(f"node {node.name!r}: padding must be non-negative, got {v!r}")
    _check_attr_ints(node, "padding", v)
    return [int(x) for x in v]


def normalise_attrs(node: Node) -> None:
    """Rewrite ``node.attrs`` into the canonical explicit form (in place)."""
    a = node.attrs
    if node.op == "conv2d":
        a["stride"] = _int_pair(node, "stride", 1)
        a["dilation"] = _int_pair(node, "dilation", 1)
        a["padding"] = _padding4(node)
        g = a.get("groups", 1)
        if not _is_int(g) or g < 1 or g > MAX_ATTR_INT:
            raise GraphError(f"node {node.name!r}: groups must be a positive int, got {g!r}")
        a["groups"] = int(g)
        if min(a["stride"]) < 1 or min(a["dilation"]) < 1:
            raise GraphError(f"node {node.name!r}: stride and dilation must be >= 1")
    elif node.op == "batch_norm":
        eps = a.get("eps", 1e-5)
        if not _is_finite_number(eps) or eps < 0:
            raise GraphError(f"node {node.name!r}: eps must be a finite number >= 0, got {eps!r}")
        a["eps"] = float(eps)
    elif node.op in ("max_pool2d", "avg_pool2d"):
        a["kernel"] = _int_pair(node, "kernel", None) if "kernel" in a else None
        if a["kernel"] is None:
            raise GraphError(f"node {node.name!r}: {node.op} needs a 'kernel' attribute")
        a["stride"] = _int_pair(node, "stride", a["kernel"])
        a["padding"] = _padding4(node)
        if min(a["kernel"]) < 1 or min(a["stride"]) < 1:
            raise GraphError(f"node {node.name!r}: kernel and stride must be >= 1")
        if node.op == "avg_pool2d":
            a["count_include_pad"] = _bool_attr(node, "count_include_pad", True)
    elif node.op == "global_avg_pool":
        a["keepdims"] = _bool_attr(node, "keepdims", True)
    elif node.op == "concat":
        axis = a.get("axis", 1)
        if not _is_int(axis) or axis != 1:
            raise GraphError(f"node {node.name!r}: concat is supported on the channel axis (1) only, got {axis!r}")
        a["axis"] = 1
    elif node.op == "flatten":
        sd = a.get("start_dim", 1)
        if not _is_int(sd) or sd != 1:
            raise GraphError(f"node {node.name!r}: flatten supports start_dim=1 only, got {sd!r}")
        a["start_dim"] = 1


def _prod(shape) -> int:
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


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------

class Model:
    """A CNN as named tensors plus an ordered, validated node list.

    Parameters
    ----------
    tensors : dict[str, np.ndarray]
        Parameter tensors by name (float arrays; conv weights OIHW, linear
        weights (out, in)).
    nodes : list[Node]
        The operations; reordered topologically on validation.
    input_name : str
        Name of the graph input value.
    input_shape : tuple[int, int, int]
        (C, H, W) of one input sample.
    output_name : str, optional
        The value returned by :meth:`forward`; defaults to the last node's output.
    record : dict, optional
        Compression record (see ``docs/format.md``), ``None`` when uncompressed.
    quant : dict, optional
        Tensor name -> :class:`udfc_ref.quantize.QuantizedTensor` for weights
        stored as integer codes.
    """

    def __init__(self, tensors, nodes, input_name="input", input_shape=(3, 32, 32), output_name=None,
                 record=None, quant=None, validate=True):
        self.tensors: dict[str, np.ndarray] = dict(tensors)
        self.nodes: list[Node] = list(nodes)
        self.input_name = input_name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_name = output_name if output_name is not None else (self.nodes[-1].output if self.nodes else input_name)
        self.record = record
        self.quant = dict(quant or {})
        self.shapes: dict[str, tuple[int, ...]] = {}
        if validate:
            self.validate()

    # ---------------------------------------------------------------- access
    def _indexes(self):
        """name -> node, value -> producer, value -> consumers; built once per
        node list (O(nodes + edges)) and rebuilt when the list is replaced or
        changes length.  Code that rewires ``inputs`` of existing nodes calls
        :meth:`validate` (which rebuilds them)."""
        key = (id(self.nodes), len(self.nodes))
        if getattr(self, "_index_key", None) != key:
            by_name, producer, consumers = {}, {}, {}
            for n in self.nodes:
                by_name.setdefault(n.name, n)
                producer.setdefault(n.output, n)
                for i in dict.fromkeys(n.inputs):
                    consumers.setdefault(i, []).append(n)
            self._index = (by_name, producer, consumers)
            self._index_key = key
        return self._index

    def node(self, name: str) -> Node:
        n = self._indexes()[0].get(name)
        if n is None:
            raise GraphError(f"no node named {name!r}")
        return n

    def param(self, node: Node, role: str) -> np.ndarray | None:
        t = node.params.get(role)
        return None if t is None else self.tensors[t]

    def producer(self, value: str) -> Node | None:
        return self._indexes()[1].get(value)

    def consumers(self, value: str) -> list[Node]:
        """Nodes reading ``value``, in graph order (each node once)."""
        return list(self._indexes()[2].get(value, ()))

    def copy(self, share_tensors: bool = False) -> "Model":
        """A copy with its own nodes and records; the tensors are copied too
        unless ``share_tensors`` (then the arrays are the same objects, for a
        caller that only ever *replaces* tensors, never writes into them)."""
        m = Model.__new__(Model)
        m.tensors = dict(self.tensors) if share_tensors else {k: np.array(v, copy=True) for k, v in self.tensors.items()}
        m.nodes = [Node.from_json(n.to_json(), i) for i, n in enumerate(self.nodes)]
        m.input_name = self.input_name
        m.input_shape = self.input_shape
        m.output_name = self.output_name
        m.record = _copy.deepcopy(self.record)
        m.quant = _copy.deepcopy(self.quant)
        m.shapes = dict(self.shapes)
        return m

    def graph_json(self) -> list[dict]:
        return [n.to_json() for n in self.nodes]

    # -------------------------------------------------------------- counting
    def param_count(self) -> int:
        used = {t for n in self.nodes for t in n.params.values()}
        return int(sum(self.tensors[t].size for t in used))

    def weight_bytes(self) -> int:
        """Bytes of the parameters as stored: integer codes at their bit width
        (plus scales / zero points) for quantized tensors, the dtype otherwise."""
        used = {t for n in self.nodes for t in n.params.values()}
        total = 0
        for t in used:
            q = self.quant.get(t)
            if q is None:
                total += self.tensors[t].nbytes
            else:
                total += q.storage_bytes()
        return int(total)

    def flops(self) -> int:
        """Multiply-accumulates of one forward pass, for one sample (conv and
        linear layers only)."""
        total = 0
        for n in self.nodes:
            if n.op == "conv2d":
                w = self.tensors[n.params["weight"]]
                _, ho, wo = self.shapes[n.output]
                total += int(w.size) * ho * wo
            elif n.op == "linear":
                total += int(self.tensors[n.params["weight"]].size)
        return total

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the graph and infer every value's shape; raise GraphError."""
        if not isinstance(self.input_name, str) or not self.input_name:
            raise GraphError("the graph input must have a name")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise GraphError(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if _prod(self.input_shape) > MAX_VALUE_ELEMENTS:
            raise GraphError(f"input_shape {self.input_shape} exceeds {MAX_VALUE_ELEMENTS} elements per sample")
        names, outputs = set(), {self.input_name: "<graph input>"}
        for n in self.nodes:
            if n.op not in OPS:
                raise GraphError(f"node {n.name!r}: unknown op {n.op!r} (known: {', '.join(sorted(OPS))})")
            if n.name in names:
                raise GraphError(f"duplicate node name {n.name!r}")
            names.add(n.name)
            if n.output in outputs:
                raise GraphError(f"node {n.name!r}: output value {n.output!r} is already written by {outputs[n.output]!r}")
            outputs[n.output] = n.name
        for n in self.nodes:
            for i in n.inputs:
                if i not in outputs:
                    raise GraphError(f"node {n.name!r}: input {i!r} is not produced by any node (dangling input)")
        self.nodes = self._toposort()
        if self.output_name not in outputs:
            raise GraphError(f"graph output {self.output_name!r} is not produced by any node")
        self.shapes = {self.input_name: self.input_shape}
        for n in self.nodes:
            spec = OPS[n.op]
            k = spec["n_inputs"]
            if (k > 0 and len(n.inputs) != k) or (k < 0 and len(n.inputs) < -k):
                want = f"exactly {k}" if k > 0 else f"at least {-k}"
                raise GraphError(f"node {n.name!r}: {n.op} takes {want} input(s), got {len(n.inputs)}")
            for role in spec["params"]:
                if role not in n.params:
                    raise GraphError(f"node {n.name!r}: {n.op} needs the parameter {role!r}")
            for role, t in n.params.items():
                if role not in spec["params"] and role not in spec["optional"]:
                    raise GraphError(f"node {n.name!r}: {n.op} has no parameter role {role!r}")
                if t not in self.tensors:
                    raise GraphError(f"node {n.name!r}: parameter {role!r} names the tensor {t!r}, which is missing")
                arr = self.tensors[t]
                if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                    raise GraphError(f"tensor {t!r} (node {n.name!r}, {role}) must be a float array, got "
                                     f"{getattr(arr, 'dtype', type(arr))}")
                if arr.size == 0:
                    raise GraphError(f"tensor {t!r} (node {n.name!r}, {role}) is empty (shape {arr.shape})")
            normalise_attrs(n)
            shape = self._infer(n, [self.shapes[i] for i in n.inputs])
            if _prod(shape) > MAX_VALUE_ELEMENTS:
                raise GraphError(f"node {n.name!r}: output {n.output!r} of shape {shape} exceeds "
                                 f"{MAX_VALUE_ELEMENTS} elements per sample")
            self.shapes[n.output] = shape

    def _toposort(self) -> list[Node]:
        """Kahn's algorithm, O(nodes + edges): a node is placed as soon as its
        inputs are; among ready nodes the one listed first goes first, so an
        already sorted list is kept as it is."""
        import heapq

        producer = {n.output: i for i, n in enumerate(self.nodes)}
        waiting = [0] * len(self.nodes)
        readers: dict[int, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in set(n.inputs):
                if v != self.input_name:
                    waiting[i] += 1
                    readers.setdefault(producer[v], []).append(i)
        ready = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(self.nodes[i])
            for j in readers.get(i, ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(self.nodes):
            rest = [n for i, n in enumerate(self.nodes) if waiting[i] > 0]
            raise GraphError("the graph has a cycle through node(s) " + ", ".join(repr(n.name) for n in rest[:5]))
        return order

    def _check_work(self, n: Node, s, im2col: int) -> None:
        """Refuse windowed ops whose padded input or im2col matrix (per
        sample) would exceed MAX_VALUE_ELEMENTS: corrupt attributes must fail
        here, not as a MemoryError in the forward pass."""
        p = n.attrs["padding"]
        padded = s[0] * (s[1] + p[0] + p[1]) * (s[2] + p[2] + p[3])
        if max(padded, im2col) > MAX_VALUE_ELEMENTS:
            raise GraphError(f"node {n.name!r}: padding {p} / kernel on input {s} needs more than "
                             f"{MAX_VALUE_ELEMENTS} elements per sample (corrupt attributes?)")

    def _infer(self, n: Node, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        s = shapes[0]
        a = n.attrs

        def need4(what="a (C, H, W) input"):
            if len(s) != 3:
                raise GraphError(f"node {n.name!r}: {n.op} needs {what}, got shape {s}")

        if n.op == "conv2d":
            need4()
            w = self.tensors[n.params["weight"]]
            if w.ndim != 4:
                raise GraphError(f"node {n.name!r}: weight {n.params['weight']!r} must be 4-D OIHW, got {w.shape}")
            g = a["groups"]
            o, ig, kh, kw = w.shape
            if ig * g != s[0]:
                raise GraphError(f"node {n.name!r}: weight {n.params['weight']!r} expects {ig}x{g}={ig * g} input "
                                 f"channels (in/groups x groups) but its input {n.inputs[0]!r} has {s[0]}")
            if o % g:
                raise GraphError(f"node {n.name!r}: {o} output channels do not divide into {g} groups")
            b = self.param(n, "bias")
            if b is not None and b.shape != (o,):
                raise GraphError(f"node {n.name!r}: bias {n.params['bias']!r} has shape {b.shape}, expected ({o},)")
            ho, wo = conv_out_hw(s[1], s[2], (kh, kw), a["stride"], a["padding"], a["dilation"])
            if ho < 1 or wo < 1:
                raise GraphError(f"node {n.name!r}: output would be empty ({ho}x{wo}) for input {s}")
            self._check_work(n, s, ho * wo * s[0] * kh * kw)
            return (o, ho, wo)
        if n.op == "batch_norm":
            if len(s) not in (1, 3):
                raise GraphError(f"node {n.name!r}: batch_norm needs a (C,) or (C, H, W) input, got {s}")
            for role in OPS["batch_norm"]["params"]:
                t = self.tensors[n.params[role]]
                if t.shape != (s[0],):
                    raise GraphError(f"node {n.name!r}: BN {role} {n.params[role]!r} has shape {t.shape}, but the "
                                     f"input {n.inputs[0]!r} has {s[0]} channels")
            return s
        if n.op == "linear":
            if len(s) != 1:
                raise GraphError(f"node {n.name!r}: linear needs a flat (features,) input, got {s}; add a flatten")
            w = self.tensors[n.params["weight"]]
            if w.ndim != 2 or w.shape[1] != s[0]:
                raise GraphError(f"node {n.name!r}: weight {n.params['weight']!r} of shape {w.shape} does not take "
                                 f"{s[0]} input features")
            b = self.param(n, "bias")
            if b is not None and b.shape != (w.shape[0],):
                raise GraphError(f"node {n.name!r}: bias {n.params['bias']!r} has shape {b.shape}, expected ({w.shape[0]},)")
            return (w.shape[0],)
        if n.op in ("relu", "relu6", "identity"):
            return s
        if n.op == "add":
            for other, name in zip(shapes[1:], n.inputs[1:]):
                if other != s:
                    raise GraphError(f"node {n.name!r}: add of {n.inputs[0]!r} {s} and {name!r} {other} (shapes differ)")
            return s
        if n.op == "concat":
            for other, name in zip(shapes[1:], n.inputs[1:]):
                if len(other) != len(s) or other[1:] != s[1:]:
                    raise GraphError(f"node {n.name!r}: concat of {n.inputs[0]!r} {s} and {name!r} {other} "
                                     "(only the channel axis may differ)")
            return (sum(x[0] for x in shapes),) + tuple(s[1:])
        if n.op == "flatten":
            return (_prod(s),)
        if n.op in ("max_pool2d", "avg_pool2d"):
            need4()
            p = a["padding"]
            kh, kw = a["kernel"]
            if max(p[0], p[1]) > kh // 2 or max(p[2], p[3]) > kw // 2:
                raise GraphError(f"node {n.name!r}: pooling padding {p} exceeds half the kernel {a['kernel']}")
            ho, wo = conv_out_hw(s[1], s[2], a["kernel"], a["stride"], p)
            if ho < 1 or wo < 1:
                raise GraphError(f"node {n.name!r}: output would be empty for input {s}")
            self._check_work(n, s, 0)
            return (s[0], ho, wo)
        if n.op == "global_avg_pool":
            need4()
            return (s[0], 1, 1) if a["keepdims"] else (s[0],)
        raise GraphError(f"node {n.name!r}: unknown op {n.op!r}")  # pragma: no cover

    # --------------------------------------------------------------- forward
    def forward(self, x: np.ndarray, return_values: bool = False):
        """Run the graph on a batch ``x`` of shape (N, C, H, W).

        Returns the output array, or with ``return_values`` the dict of every
        value (used by compression statistics and tests)."""
        from .forward import run

        return run(self, x, return_values=return_values)

    __call__ = forward
