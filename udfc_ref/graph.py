"""The intermediate representation: named tensors plus an ordered node list.

A :class:`Model` is a dict of named parameter tensors (the names a framework
gave them, e.g. ``features.0.weight``) and a list of :class:`Node`.  Each node
has an ``op``, the names of the values it reads, the name of the value it
writes, its attributes, and ``params`` mapping a role (``weight``, ``bias``,
``running_mean`` ...) to a tensor name.  Values are NCHW activations; shapes
below never include the batch axis.

The ops, their attributes and shape rules live in ``ops.py`` (one entry per
op, see ``docs/format.md``).
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GraphError
from .ops import MAX_VALUE_ELEMENTS, OPS, conv_out_hw, prod as _prod  # noqa: F401  (re-exported)
from .tensors import Tensors, TensorSpec


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
# the model
# --------------------------------------------------------------------------

class _SpecView:
    """What ``OPS[op].infer`` reads of a model (``tensors[name]`` and
    ``param``), giving shapes and dtypes: a weight held as codes is not
    dequantized to be measured."""

    def __init__(self, model):
        self.tensors = _SpecMap(model)

    def param(self, node, role):
        t = node.params.get(role)
        return None if t is None else self.tensors[t]


class _SpecMap:
    def __init__(self, model):
        self._model = model

    def __getitem__(self, t):
        return self._model.tensor_spec(t)


class Model:
    """A CNN as named tensors plus an ordered, validated node list.

    Parameters
    ----------
    tensors : dict[str, np.ndarray]
        Parameter tensors by name (float arrays; conv weights OIHW, linear
        weights (out, in)); held as a :class:`udfc_ref.tensors.Tensors`
        mapping, in which a quantized weight may be held as its codes only
        (``compress`` does: read, it is dequantized; ``tensors.spec(name)``
        gives its shape and dtype without that).
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
        self.tensors: Tensors = Tensors(tensors)
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

    def tensor_spec(self, t: str):
        """Shape and dtype of tensor ``t`` without dequantizing: the array
        itself, or a :class:`~udfc_ref.tensors.TensorSpec` for one held as codes."""
        tensors = self.tensors
        return tensors.spec(t) if isinstance(tensors, Tensors) else tensors[t]

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
        # shared: the quantization table's entries too (replaced, never written into, like the arrays)
        m.quant = dict(self.quant) if share_tensors else _copy.deepcopy(self.quant)
        m.tensors = Tensors(self.tensors).copy(m.quant)
        if not share_tensors:
            held = set(m.tensors.held_as_codes())
            for k in m.tensors:
                if k not in held:
                    m.tensors[k] = np.array(m.tensors[k], copy=True)
        m.nodes = [Node.from_json(n.to_json(), i) for i, n in enumerate(self.nodes)]
        m.input_name = self.input_name
        m.input_shape = self.input_shape
        m.output_name = self.output_name
        m.record = _copy.deepcopy(self.record)
        m.shapes = dict(self.shapes)
        return m

    def graph_json(self) -> list[dict]:
        return [n.to_json() for n in self.nodes]

    # -------------------------------------------------------------- counting
    def param_count(self) -> int:
        used = {t for n in self.nodes for t in n.params.values()}
        return int(sum(self.tensor_spec(t).size for t in used))

    def weight_bytes(self) -> int:
        """Bytes of the parameters as stored: integer codes at their bit width
        (plus scales / zero points) for quantized tensors, the dtype otherwise."""
        used = {t for n in self.nodes for t in n.params.values()}
        total = 0
        for t in used:
            q = self.quant.get(t)
            if q is None:
                total += self.tensor_spec(t).nbytes
            else:
                total += q.storage_bytes()
        return int(total)

    def flops(self) -> int:
        """Multiply-accumulates of one forward pass, for one sample (conv and
        linear layers only)."""
        total = 0
        for n in self.nodes:
            if n.op == "conv2d":
                w = self.tensor_spec(n.params["weight"])
                _, ho, wo = self.shapes[n.output]
                total += int(w.size) * ho * wo
            elif n.op == "linear":  # once per position of a (..., F) input
                total += int(self.tensor_spec(n.params["weight"]).size) * _prod(self.shapes[n.inputs[0]][:-1])
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
            k = spec.n_inputs
            if (k > 0 and len(n.inputs) != k) or (k < 0 and len(n.inputs) < -k):
                want = f"exactly {k}" if k > 0 else f"at least {-k}"
                raise GraphError(f"node {n.name!r}: {n.op} takes {want} input(s), got {len(n.inputs)}")
            for role in spec.params:
                if role not in n.params:
                    raise GraphError(f"node {n.name!r}: {n.op} needs the parameter {role!r}")
            for role, t in n.params.items():
                if role not in spec.params and role not in spec.optional:
                    raise GraphError(f"node {n.name!r}: {n.op} has no parameter role {role!r}")
                if t not in self.tensors:
                    raise GraphError(f"node {n.name!r}: parameter {role!r} names the tensor {t!r}, which is missing")
                arr = self.tensor_spec(t)
                if not isinstance(arr, (np.ndarray, TensorSpec)) or arr.dtype.kind != "f":
                    raise GraphError(f"tensor {t!r} (node {n.name!r}, {role}) must be a float array, got "
                                     f"{getattr(arr, 'dtype', type(arr))}")
                if arr.size == 0:
                    raise GraphError(f"tensor {t!r} (node {n.name!r}, {role}) is empty (shape {arr.shape})")
            spec.normalise(n)
            shape = tuple(int(d) for d in spec.infer(_SpecView(self), n, [self.shapes[i] for i in n.inputs]))
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

    # --------------------------------------------------------------- forward
    def forward(self, x: np.ndarray, return_values: bool = False):
        """Run the graph on a batch ``x`` of shape (N, C, H, W).

        Returns the output array, or with ``return_values`` the dict of every
        value (used by compression statistics and tests)."""
        from .forward import run

        return run(self, x, return_values=return_values)

    __call__ = forward
