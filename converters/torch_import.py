"""PyTorch -> udfc-ref: capture a module with ``torch.export`` and map its
ATen graph onto the udfc-ref IR.

Pipeline of :func:`to_udfc`:

1. the module runs once eagerly (eval mode) on a random batch of
   :data:`CHECK_BATCH`; its output picks the tensor the IR returns
   (:func:`pick_output`: a tensor; ``logits`` of a dict / model-output
   object; else the first tensor);
2. ``torch.export.export(strict=False)`` captures a wrapper returning that
   tensor for a batch of :data:`EXPORT_BATCH`: Python in the forward runs
   for real, so shape-dependent code (``int(x.shape[-1])``, channel-count
   checks, TF-style padding) is specialised away for the input shape.  The
   graph is the exporter's default ATen IR with no decomposition table
   applied, which keeps ``conv2d``, ``linear``, ``batch_norm``,
   ``layer_norm``, ``hardtanh``, ``gelu`` ... as single ops.  Only when an
   in-place op could be observed through an alias is the program
   functionalised first (``run_decompositions({})``);
3. the nodes the output depends on are visited in graph order and each is
   handed to its handler in ``torch_ops.HANDLERS`` (one per ATen op or op
   family); nodes that depend only on parameters, buffers and constants are
   evaluated (constant folding);
4. the NumPy forward of the result is compared with step 1's output.

Parameters and buffers keep their ``state_dict`` names; other constants get
names from the layer that uses them (``<layer>.<role>``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from udfc_ref.errors import ConversionError, UDFCError
from udfc_ref.graph import Model, Node

from .torch_common import CHECK_RTOL, param_dtype, parse_shape, relative_error, torch_module, unwrap

#: batch size of the captured program (the IR keeps the batch axis free)
EXPORT_BATCH = 2
#: batch size of the eager reference run and the post-conversion check; it
#: differs from EXPORT_BATCH so a reshape that mixes samples is caught
CHECK_BATCH = 3
#: attribute of the capture wrapper holding the user's module; stripped from
#: every ``state_dict`` name and module path
_WRAPPED = "m"


# --------------------------------------------------------------------------
# values of the walk
# --------------------------------------------------------------------------

@dataclass
class Value:
    """An activation of the IR graph: its IR value name and its full torch
    shape (batch axis first, batch = EXPORT_BATCH)."""

    name: str
    shape: tuple


@dataclass
class Const:
    """A tensor that does not depend on the input: a parameter, a buffer, a
    lifted constant or a folded result.  ``name`` is its ``state_dict`` name
    when it is a parameter / buffer used unchanged; ``transpose_of`` names
    the 2-D parameter this is the transpose of (``addmm`` / ``mm`` weights)."""

    tensor: object
    name: str | None = None
    transpose_of: str | None = None


@dataclass
class PendingPad:
    """A constant ``F.pad`` of H and W not yet emitted: a following conv or
    pooling layer takes it into its own padding; any other reader gets an IR
    ``pad`` node (made once)."""

    src: Value
    pads: list  # [top, bottom, left, right]
    value: float
    node: object
    shape: tuple
    emitted: Value | None = None


@dataclass
class Missing:
    """An output of a multi-output op that the IR does not provide (e.g. the
    indices of ``max_pool2d_with_indices``)."""

    what: str


class SourceTrace(Exception):
    """The model-source stack of the ATen node a conversion error is about;
    chained as the ``__cause__`` of that error so ``udfc --debug`` prints the
    user's own frames."""


@dataclass
class _State:
    tensors: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    used_names: set = field(default_factory=set)


# --------------------------------------------------------------------------
# output selection
# --------------------------------------------------------------------------

def pick_output(out):
    """The tensor a converted model returns, from what the module's forward
    returns: a tensor as it is; from a mapping (``dict``, a transformers
    ``ModelOutput``) or an object with a ``logits`` attribute, its
    ``logits``; otherwise the first tensor (in order) of a mapping, tuple or
    list, searched depth first.  Raises ConversionError when there is none."""
    torch = torch_module()
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if not isinstance(out, Mapping) and isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    items = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else []
    for v in items:
        if v is None:
            continue
        try:
            return pick_output(v)
        except ConversionError:
            continue
    raise ConversionError(f"the module returns {type(out).__name__}, which holds no tensor to convert")


def _head(module):
    """A wrapper module whose forward returns ``pick_output(module(x))``."""
    torch = torch_module()

    class _Head(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            setattr(self, _WRAPPED, inner)

        def forward(self, x):
            return pick_output(getattr(self, _WRAPPED)(x))

    return _Head(module)


def _strip(path: str) -> str:
    """A module path / state_dict key of the wrapper -> the user's."""
    if path == _WRAPPED:
        return ""
    return path[len(_WRAPPED) + 1:] if path.startswith(_WRAPPED + ".") else path


# --------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


@contextlib.contextmanager
def _quiet_logs():
    """Mute ``logging`` below ERROR and Python-level stderr while torch.export
    runs: a failed capture logs warnings and prints graph dumps, and the user
    gets it once, as a ConversionError (the exporter's own error is its cause)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(before)


def capture(module, shape, dtype):
    """``torch.export`` the output-picking wrapper of ``module`` for a batch
    of EXPORT_BATCH inputs of per-sample ``shape``; functionalised when an
    in-place op could be seen through an alias (:func:`needs_functional`)."""
    torch = torch_module()
    x = torch.randn((EXPORT_BATCH,) + tuple(shape), generator=torch.Generator().manual_seed(0), dtype=dtype)
    try:
        with torch.no_grad(), _quiet_logs():
            ep = torch.export.export(_head(module), (x,), strict=False)
    except UDFCError:
        raise
    except Exception as e:
        own = _own_frame_of(e)
        at = f" at {own[0]}:{own[1]} `{own[2]}`" if own else ""
        # chained (not suppressed): with --debug the traceback shows the frame of the model that failed
        raise ConversionError(f"torch.export cannot capture {type(module).__name__} for an input of shape "
                              f"(N, {', '.join(map(str, shape))}){at}: {type(e).__name__}: {_first_line(e)}") from e
    if needs_functional(ep):
        with warnings.catch_warnings(), _quiet_logs():
            warnings.simplefilter("ignore", FutureWarning)
            ep = ep.run_decompositions({})
    return ep


_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "flatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "expand", "expand_as", "slice", "select", "narrow", "detach", "alias", "as_strided", "view_as", "unflatten",
    "split", "chunk", "unbind", "diagonal", "movedim", "unfold",
})


def _base_name(target) -> str:
    s = getattr(target, "_schema", None)
    return s.name.split("::")[-1] if s is not None else getattr(target, "__name__", str(target))


def needs_functional(ep) -> bool:
    """True when an in-place ATen op (``add_``, ``relu_`` ...) of the captured
    graph could be observed through another reference: its mutated argument
    is a graph input, a view, has a view, or is read after the op.  The walk
    treats in-place ops as their functional forms, which is exact otherwise
    (later readers refer to the op's result)."""
    nodes = list(ep.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None or not schema.is_mutable or not n.args:
            continue
        if _base_name(n.target) in ("dropout_", "feature_dropout_", "alpha_dropout_") and not _arg(n, 2, "train"):
            continue  # eval-mode dropout: no mutation
        src = n.args[0]
        if not hasattr(src, "op") or src.op == "placeholder":
            return True
        if src.op == "call_function" and _base_name(src.target).rstrip("_") in _VIEW_OPS:
            return True
        for u in src.users:
            if u is n:
                continue
            if pos[u] > pos[n] or (u.op == "call_function" and _base_name(u.target).rstrip("_") in _VIEW_OPS):
                return True
    return False


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)\n(?P<code>[^\n]*)')


def _own_frame(stack_trace: str | None):
    """(file, line, code) of the innermost frame of ``stack_trace`` outside
    PyTorch and this converter: the model's own source line."""
    if not stack_trace:
        return None
    torch = torch_module()
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    frames = [m.groupdict() for m in _FRAME.finditer(stack_trace)]
    for f in reversed(frames):
        if not f["file"].startswith(skip):
            return f["file"], int(f["line"]), f["code"].strip()
    return None


def _own_frame_of(e: BaseException):
    """(file, line, code) of the innermost traceback frame of ``e`` outside
    PyTorch and this converter: the model line where the capture failed."""
    torch = torch_module()
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    for f in reversed(traceback.extract_tb(e.__traceback__)):
        if not f.filename.startswith(skip) and not f.filename.startswith("<"):
            return f.filename, f.lineno, (f.line or "").strip()
    return None


class Importer:
    """State of one ExportedProgram -> IR conversion.

    Handlers (``torch_ops.py``) use :meth:`tensor`, :meth:`unpad`,
    :meth:`param`, :meth:`node_name`, :meth:`emit`, :meth:`shape_of`,
    :meth:`module_path` and :meth:`error`."""

    def __init__(self, ep, input_shape, progress=None):
        self.torch = torch_module()
        self.ep = ep
        self.input_shape = tuple(input_shape)
        self.progress = progress
        self.state = _State()
        self.state.used_names.add("input")
        self.env: dict = {}
        #: dtype of tensors the converter derives (negated biases, spread scalars): the model input's
        self.np_dtype = np.float32

    # ------------------------------------------------------------ naming
    def module_path(self, node) -> tuple[str, str]:
        """(path, class name) of the innermost module ``node`` came from."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        path, cls = list(stack.values())[-1]
        cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        return _strip(str(path)), cls.rsplit(".", 1)[-1]

    def where(self, node) -> str:
        path, cls = self.module_path(node)
        s = f"module {path!r} ({cls})" if path else (f"the top-level forward ({cls})" if cls else "the forward")
        own = _own_frame(node.meta.get("stack_trace"))
        if own is not None:
            s += f", at {own[0]}:{own[1]} `{own[2]}`"
        return s

    def error(self, node, msg: str) -> ConversionError:
        """A ConversionError about ``node``: its ATen op, the module path and
        source line it came from; the full model stack is the cause."""
        e = ConversionError(f"{node.target} from {self.where(node)}: {msg}")
        st = node.meta.get("stack_trace")
        if st:
            e.__cause__ = SourceTrace("model source of the failing op (innermost last):\n" + st.rstrip())
        return e

    def node_name(self, node, base: str | None = None) -> str:
        """A unique IR node name: ``base`` (a parameter prefix), else the
        module path the op came from, else the ATen node's name."""
        if not base:
            base = self.module_path(node)[0] or node.name
        used = self.state.used_names
        name = base if base not in used else f"{base}.{node.name}"
        i = 1
        while name in used:
            name, i = f"{base}.{node.name}_{i}", i + 1
        used.add(name)
        return name

    # ------------------------------------------------------------ values
    def tensor(self, node, v, what="input") -> Value:
        """``v`` as an IR activation (emitting a pending pad); a constant or a
        missing output is an error about ``node``."""
        if isinstance(v, PendingPad):
            if v.emitted is None:
                if not any(v.pads):
                    v.emitted = v.src
                else:
                    v.emitted = self.emit(v.node, "pad", [v.src], {"padding": list(v.pads), "value": v.value},
                                          shape=v.shape)
            return v.emitted
        if isinstance(v, Value):
            return v
        if isinstance(v, Missing):
            raise self.error(node, f"its {what} is {v.what}, which the converter does not provide")
        if isinstance(v, Const):
            raise self.error(node, f"its {what} does not depend on the model input (a constant of shape "
                                   f"{tuple(v.tensor.shape)}); only computations on the input are converted")
        raise self.error(node, f"its {what} is {v!r}, expected a tensor")

    def unpad(self, node, v, value: float):
        """(source activation, [t, b, l, r]) of ``v``: a pending pad with
        ``value`` hands its padding to the caller."""
        if isinstance(v, PendingPad) and v.value == value:
            return v.src, list(v.pads)
        return self.tensor(node, v), [0, 0, 0, 0]

    def array(self, node, c: Const, role: str) -> np.ndarray:
        t = c.tensor.detach().cpu()
        if not t.is_floating_point():
            raise self.error(node, f"its {role} has dtype {t.dtype}; parameters must be floating point")
        if t.dtype in (self.torch.float16, self.torch.bfloat16):
            t = t.float()
        return np.array(t.numpy(), copy=True)

    def param(self, node, c: Const, prefix: str, role: str, array=None) -> str:
        """Register constant ``c`` as an IR tensor and return its name.

        ``array`` (optional) is the value to store when it differs from ``c``
        in layout only (a (1, C, 1, 1) scale stored as (C,)) or is derived
        from it (a negated bias).  The name is ``c``'s ``state_dict`` name when
        ``c`` is a parameter / buffer stored with its own values (reshaped at
        most), else ``<prefix>.<role>``, made unique."""
        tensors = self.state.tensors
        own = self.array(node, c, role)
        arr = own if array is None else np.asarray(array, dtype=self.np_dtype)
        if c.name is not None and arr.size == own.size and np.array_equal(arr.reshape(own.shape), own):
            have = tensors.get(c.name)
            if have is None:
                tensors[c.name] = arr
                return c.name
            if have.shape == arr.shape:
                return c.name
        base = f"{prefix}.{role}" if prefix else role
        name, i = base, 1
        while name in tensors:
            name, i = f"{base}_{i}", i + 1
        tensors[name] = arr
        return name

    def emit(self, node, op, inputs, attrs=None, params=None, name=None, shape=None) -> Value:
        """Append an IR node for ATen ``node``; returns its output value.
        ``name`` is a name :meth:`node_name` gave, else one is made."""
        nm = name if name is not None else self.node_name(node)
        self.state.nodes.append(Node(nm, op, [v.name for v in inputs], nm, dict(attrs or {}), dict(params or {})))
        return Value(nm, tuple(shape) if shape is not None else self.shape_of(node))

    def shape_of(self, node) -> tuple:
        """The full static shape of ``node``'s value (of its first output for
        multi-output ops)."""
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)) and val:
            val = val[0]
        if not hasattr(val, "shape"):
            raise self.error(node, "its value is not a single tensor")
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):
            raise self.error(node, f"its shape {tuple(val.shape)} is not static") from None

    # --------------------------------------------------------------- run
    def _inputs(self):
        """Seed ``env`` with the user input, parameters, buffers and constants."""
        torch = self.torch
        from torch.export.graph_signature import InputKind  # noqa: PLC0415

        ep = self.ep
        sd = ep.state_dict
        consts = getattr(ep, "constants", {}) or {}
        user = []
        by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        for spec in ep.graph_signature.input_specs:
            node = by_name.get(getattr(spec.arg, "name", None))
            if node is None:
                continue
            if spec.kind == InputKind.USER_INPUT:
                user.append(node)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                t = sd.get(spec.target) if spec.target in sd else consts.get(spec.target)
                if not isinstance(t, torch.Tensor):
                    raise ConversionError(f"input {spec.target!r} of the captured program is not a tensor")
                named = spec.kind != InputKind.CONSTANT_TENSOR
                self.env[node] = Const(t.detach(), _strip(spec.target) if named else None)
            else:
                raise ConversionError(f"the captured program takes a {spec.kind.name} input ({spec.target!r}); "
                                      "only tensors are supported")
        if len(user) != 1:
            raise ConversionError(f"the captured program has {len(user)} tensor inputs; the module must take one")
        self.env[user[0]] = Value("input", self.shape_of(user[0]))
        if str(getattr(user[0].meta.get("val"), "dtype", "")) == "torch.float64":
            self.np_dtype = np.float64

    def _needed(self, out_node):
        """The nodes ``out_node`` depends on (reverse reachability, linear)."""
        seen, stack = set(), [out_node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return seen

    def _output_node(self):
        from torch.export.graph_signature import OutputKind  # noqa: PLC0415

        sig = self.ep.graph_signature
        mutated = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
        if mutated:
            what = ", ".join(repr(s.target) for s in mutated[:4])
            raise ConversionError(f"the module changes its state in forward ({mutated[0].kind.name}: {what}); "
                                  "only eval-mode forwards that leave parameters and buffers alone are supported")
        user = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
        out = [n for n in self.ep.graph.nodes if n.op == "output"][0]
        flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        if len(user) != 1 or len(flat) != 1 or not hasattr(flat[0], "op"):
            raise ConversionError("the captured program does not return exactly one tensor")
        return flat[0]

    def run(self) -> Model:
        from udfc_ref.progress import Progress  # noqa: PLC0415

        from .torch_ops import HANDLERS, handler_key  # noqa: PLC0415

        self._inputs()
        out_node = self._output_node()
        needed = self._needed(out_node)
        work = [n for n in self.ep.graph.nodes if n in needed and n.op == "call_function"]
        # the caller's progress line (steps before the walk count as ``start``), or one of our own
        bar, start = (self.progress, self.progress.total) if isinstance(self.progress, Progress) else \
            (Progress(len(work), "import torch") if self.progress else None, 0)
        if bar is not None:
            bar.total = start + len(work) + (1 if start else 0)
        try:
            for i, node in enumerate(work):
                args = self.bind(node)
                if not _depends_on_input(args):
                    self.env[node] = self.fold(node)
                else:
                    key = handler_key(node.target)
                    h = HANDLERS.get(key)
                    if h is None:
                        raise self.error(node, "this op is not supported by the udfc-ref converter (supported ops: "
                                               "docs/converters.md)")
                    self.env[node] = h(self, node, args)
                if bar is not None:
                    bar.update(start + i + 1, node.name)
        finally:
            if bar is not None and not start:
                bar.close()
        result = self.env[out_node]
        if isinstance(result, Const):
            raise ConversionError("the module's output does not depend on its input; nothing to convert")
        out = self.tensor(out_node, result, "output")
        if out.name == "input":
            raise ConversionError("the module returns its input unchanged; nothing to convert")
        try:
            return Model(self.state.tensors, self.state.nodes, "input", self.input_shape, output_name=out.name)
        except UDFCError as e:
            raise ConversionError(f"the converted graph is invalid: {e}") from None

    # ---------------------------------------------------- args / folding
    def bind(self, node) -> dict:
        """The node's arguments by schema name (defaults filled in), with
        graph nodes replaced by their walk values."""
        conv = self._convert_arg
        schema = getattr(node.target, "_schema", None)
        if schema is None:  # operator.getitem and other Python callables
            return {f"arg{i}": conv(a) for i, a in enumerate(node.args)} | {k: conv(v) for k, v in node.kwargs.items()}
        out = {}
        for i, a in enumerate(schema.arguments):
            if i < len(node.args):
                out[a.name] = conv(node.args[i])
            elif a.name in node.kwargs:
                out[a.name] = conv(node.kwargs[a.name])
            elif a.has_default_value():
                out[a.name] = a.default_value
            elif a.kwarg_only:
                out[a.name] = None
        return out

    def _convert_arg(self, a):
        if hasattr(a, "op") and hasattr(a, "users"):  # an fx Node
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._convert_arg(x) for x in a)
        return a

    def fold(self, node):
        """Evaluate ``node`` on its constant arguments (constant folding)."""
        torch = self.torch

        def raw(a):
            if hasattr(a, "op") and hasattr(a, "users"):
                v = self.env[a]
                return _unconst(v)
            if isinstance(a, (list, tuple)):
                return type(a)(raw(x) for x in a)
            return a

        try:
            with torch.no_grad():
                r = node.target(*raw(tuple(node.args)), **{k: raw(v) for k, v in node.kwargs.items()})
        except Exception as e:
            raise self.error(node, f"evaluating it on constants failed: {type(e).__name__}: {_first_line(e)}") from None
        src = node.args[0] if node.args and hasattr(node.args[0], "op") else None
        t_of = None
        if src is not None and isinstance(self.env.get(src), Const) and self.env[src].name is not None \
                and _base_name(node.target) in ("t", "transpose", "permute", "numpy_T") \
                and isinstance(r, torch.Tensor) and r.dim() == 2:
            t_of = self.env[src].name
        return _const(r, t_of)


def _unconst(v):
    if isinstance(v, Const):
        return v.tensor
    if isinstance(v, (tuple, list)):
        return type(v)(_unconst(x) for x in v)
    return v


def _const(r, t_of=None):
    torch = torch_module()
    if isinstance(r, torch.Tensor):
        return Const(r, None, t_of)
    if isinstance(r, (tuple, list)):
        return type(r)(_const(x) for x in r)
    return r


def _depends_on_input(a) -> bool:
    if isinstance(a, (Value, PendingPad, Missing)):
        return True
    if isinstance(a, dict):
        return any(_depends_on_input(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return any(_depends_on_input(v) for v in a)
    return False


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------

def _reference(module, shape, dtype):
    """(input, picked output) of one eager run on a batch of CHECK_BATCH."""
    torch = torch_module()
    x = torch.randn((CHECK_BATCH,) + tuple(shape), generator=torch.Generator().manual_seed(1234), dtype=dtype)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as e:
        raise ConversionError(f"{type(module).__name__} does not run on an input of shape "
                              f"(N, {', '.join(map(str, shape))}): {type(e).__name__}: {_first_line(e)}") from e
    return x, pick_output(out)


def to_udfc(module, input_shape, check: bool = True, progress: bool = False) -> Model:
    """Convert an ``nn.Module`` to a :class:`udfc_ref.Model` via ``torch.export``.

    Parameters
    ----------
    module : torch.nn.Module
        The network, converted in eval mode (its mode is restored afterwards);
        DataParallel wrappers are unwrapped.  Its forward may return a
        tensor, a dict or a model-output object (see :func:`pick_output`).
    input_shape : tuple (C, H, W) or str "C,H,W"
        One input sample, without the batch axis; Python code in the forward
        that depends on it is specialised for it.
    check : bool
        Compare the NumPy forward with the module's forward on a random batch
        of CHECK_BATCH; raise ConversionError above CHECK_RTOL (relative to
        max |output|).
    progress : bool
        Show a progress line on stderr (capture, one step per ATen node,
        check) when the import takes over a second.

    Returns
    -------
    Model
        Tensor names are the module's ``state_dict`` keys (e.g.
        ``features.0.weight``); ``num_batches_tracked`` is not copied.

    Raises
    ------
    ConversionError
        When the module cannot be captured, or for an unsupported ATen op /
        argument: the message names the op, the module path and the source
        line it came from; the full model stack is the exception's cause.
    """
    torch = torch_module()
    module = unwrap(module)
    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(module).__name__}")
    shape = parse_shape(input_shape)
    dtype = param_dtype(module)
    was_training = module.training
    module.eval()
    from udfc_ref.progress import Progress  # noqa: PLC0415

    bar = Progress(2, "import torch") if progress else None  # 2 steps, then the nodes, then the check
    try:
        x, ref = _reference(module, shape, dtype)
        if bar is not None:
            bar.update(1, "capturing with torch.export")
        ep = capture(module, shape, dtype)
        model = Importer(ep, shape, progress=bar).run()  # steps 3 .. 2 + nodes
        if bar is not None:
            bar.update(bar.total - 1, "checking against the PyTorch forward")
        if check:
            got = model.forward(x.numpy())
            want = ref.detach().cpu().numpy()
            err = relative_error(got, want)
            if np.shape(got) != want.shape:
                raise ConversionError(f"conversion check failed: the converted model outputs {np.shape(got)}, torch "
                                      f"outputs {tuple(want.shape)}")
            if err > CHECK_RTOL:
                raise ConversionError(f"conversion check failed: NumPy and torch outputs differ by {err:.3g} relative "
                                      f"to max |output| (tolerance {CHECK_RTOL}); a layer was mis-mapped")
    finally:
        module.train(was_training)
        if bar is not None:
            bar.close()
    return model


def export(module, path, input_shape, check: bool = True, progress: bool = False) -> Model:
    """Convert ``module`` (see :func:`to_udfc`) and save it to ``path`` atomically."""
    from udfc_ref.atomic import check_output_path  # noqa: PLC0415
    from udfc_ref.io import save  # noqa: PLC0415

    check_output_path(path)
    model = to_udfc(module, input_shape, check=check, progress=progress)
    save(model, path)
    return model
