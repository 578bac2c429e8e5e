"""udfc-ref -> PyTorch: a runnable module for any IR graph, and the files
made from it.

* :func:`to_module` builds an eval-mode ``torch.fx.GraphModule`` node by node
  (``torch.fx.Graph`` calls, no tracing) with one small builder per IR op
  (:data:`BUILDERS`);
* :func:`save_pt2` writes it as a ``torch.export`` program (``.pt2``) with a
  dynamic batch axis: ``torch.export.load(path).module()(x)`` runs it with
  PyTorch alone;
* :func:`save_torchscript` writes TorchScript (deprecated: PyTorch 2.13
  warns on every TorchScript call, so the CLI no longer writes ``.pt``).

Every file is loaded back from its bytes and compared with the NumPy
forward before it is written.  Tensor names that are not dotted ASCII
identifier paths are mapped to ``udfc_tensor_<i>`` (``converters/names.py``)
and the originals travel as data in the archive's ``udfc_names.json``.
"""

from __future__ import annotations

import io
import json
import operator
import warnings

import numpy as np

from udfc_ref.errors import ConversionError
from udfc_ref.graph import Model

from .torch_common import CHECK_RTOL, NAMES_FILE, relative_error, torch_module

#: IR op -> builder(b, node, ins) returning the fx node of the node's output
BUILDERS: dict = {}

_MODULE_ROLES = {
    "conv2d": ("weight", "bias"),
    "linear": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
}


def builds(*ops):
    """Register the decorated function as the PyTorch builder of IR ``ops``."""

    def deco(fn):
        for op in ops:
            BUILDERS[op] = fn
        return fn

    return deco


def load_model(path_or_model) -> Model:
    if isinstance(path_or_model, Model):
        return path_or_model
    from udfc_ref.io import load  # noqa: PLC0415

    return load(path_or_model)


def _reserved_names():
    """Attribute names a submodule or tensor must not take: those every
    ``nn.Module`` / ``fx.GraphModule`` already has (``forward``, ``training``,
    ``graph`` ...)."""
    torch = torch_module()
    return frozenset(dir(torch.nn.Module)) | frozenset(dir(torch.fx.GraphModule)) | {"x", "torch", "self"}


def module_names(model: Model) -> dict[str, str]:
    """``{original tensor name: name in the PyTorch module}`` for every tensor
    :func:`to_module` uses.  Names that are dotted ASCII identifiers / indices
    (``features.0.weight``) are kept; any other name from the file (quotes,
    newlines, unicode, ``__import__``, 10 kB names ...) is data, never code,
    and becomes ``udfc_tensor_<i>`` (see ``converters/names.py``)."""
    from .names import safe_paths  # noqa: PLC0415

    used = sorted({t for n in model.nodes for t in n.params.values()})
    return safe_paths(used, reserved=_reserved_names())


def _count_under(names) -> dict:
    """{path: number of names strictly under ``path.``} for every proper
    prefix path of ``names`` (linear in their total length)."""
    under: dict = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            p = ".".join(parts[:i])
            under[p] = under.get(p, 0) + 1
    return under


def _as_layer(n, params, under):
    """The submodule path for node ``n`` if its (safe) tensor names ``params``
    (role -> name) are ``<path>.<role>`` and nothing else lives under
    ``<path>.`` (``under``: :func:`_count_under` of all names); else None."""
    if n.op not in _MODULE_ROLES or not params:
        return None
    prefixes = set()
    for role, t in params.items():
        if not t.endswith("." + role):
            return None
        prefixes.add(t[: -len(role) - 1])
    if len(prefixes) != 1:
        return None
    p = prefixes.pop()
    if not p or any(c == "" for c in p.split(".")):
        return None
    return p if under.get(p, 0) == len(set(params.values())) else None


class _Builder:
    """State of one IR -> fx.GraphModule build."""

    def __init__(self, model: Model):
        torch = torch_module()
        self.torch, self.nn, self.F = torch, torch.nn, torch.nn.functional
        self.model = model
        self.names = module_names(model)  # original -> safe attribute path: file strings never become code
        self.original = {v: k for k, v in self.names.items()}
        self.under = _count_under(self.names.values())
        dts = {model.tensors[t].dtype for t in self.names}
        self.dtype = torch.float64 if dts == {np.dtype(np.float64)} else torch.float32
        self.root = torch.nn.Module()
        self.graph = torch.fx.Graph()
        self.registered: set[str] = set()

    def tens(self, safe):
        return self.torch.tensor(np.asarray(self.model.tensors[self.original[safe]]), dtype=self.dtype)

    def put(self, path, obj):
        nn = self.nn
        parts = path.split(".")
        m = self.root
        for p in parts[:-1]:
            child = m._modules.get(p)
            if child is None:
                if hasattr(m, p):
                    raise ConversionError(f"tensor names clash at {path!r}")
                child = nn.Module()
                m.add_module(p, child)
            m = child
        if parts[-1] in m._modules or parts[-1] in m._parameters or parts[-1] in m._buffers:
            raise ConversionError(f"tensor / layer name {path!r} clashes with another tensor name")
        try:
            if isinstance(obj, nn.Module):
                m.add_module(parts[-1], obj)
            elif isinstance(obj, nn.Parameter):
                m.register_parameter(parts[-1], obj)
            else:
                m.register_buffer(parts[-1], obj)
        except (KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"tensor name {path!r} cannot be a PyTorch state_dict key: {e}") from None

    def safe(self, n):
        """role -> safe tensor name of node ``n``."""
        return {role: self.names[t] for role, t in n.params.items()}

    def layer(self, n):
        """The submodule path node ``n`` becomes a real layer at, or None."""
        sp = self.safe(n)
        path = _as_layer(n, sp, self.under)
        if path is not None and any(t in self.registered for t in sp.values()):
            return None  # a tensor shared with an earlier node: use it functionally
        return path

    def install(self, path, module, n, roles):
        """Copy ``n``'s tensors for ``roles`` into ``module``, mount it at ``path``."""
        with self.torch.no_grad():
            for role in roles:
                if role in n.params:
                    getattr(module, role).copy_(self.tens(self.names[n.params[role]]))
        self.put(path, module)
        self.registered.update(self.names[t] for t in n.params.values())
        return path

    def getp(self, n, role, buffer=False):
        """fx node of ``n``'s tensor ``role`` (None when absent), registered
        once as a parameter (or buffer) at its safe path."""
        if role not in n.params:
            return None
        name = self.names[n.params[role]]
        if name not in self.registered:
            t = self.tens(name)
            self.put(name, t if buffer else self.nn.Parameter(t, requires_grad=False))
            self.registered.add(name)
        return self.graph.get_attr(name)

    def call(self, fn, *args, **kwargs):
        return self.graph.call_function(fn, args, kwargs)

    def build(self):
        model = self.model
        env = {model.input_name: self.graph.placeholder("x")}
        for n in model.nodes:
            b = BUILDERS.get(n.op)
            if b is None:
                raise ConversionError(f"node {n.name!r}: op {n.op!r} has no PyTorch mapping")
            env[n.output] = b(self, n, [env[i] for i in n.inputs])
        self.graph.output(env[model.output_name])
        gm = self.torch.fx.GraphModule(self.root, self.graph, class_name="UDFCModel")
        return gm.eval()


# --------------------------------------------------------------------------
# builders: one per IR op
# --------------------------------------------------------------------------

def _sym_pad(b, x, pad, value=0.0):
    """(input, (ph, pw)) for torch's symmetric padding; an asymmetric
    [t, b, l, r] becomes an explicit F.pad first."""
    if pad[0] == pad[1] and pad[2] == pad[3]:
        return x, (pad[0], pad[2])
    return b.call(b.F.pad, x, [pad[2], pad[3], pad[0], pad[1]], value=value), (0, 0)


@builds("conv2d")
def _conv2d(b, n, ins):
    a = n.attrs
    x, p2 = _sym_pad(b, ins[0], list(a["padding"]))
    path = b.layer(n)
    if path is not None:
        wt = b.model.tensors[n.params["weight"]]
        conv = b.nn.Conv2d(wt.shape[1] * a["groups"], wt.shape[0], tuple(wt.shape[2:]), tuple(a["stride"]), p2,
                           tuple(a["dilation"]), a["groups"], bias="bias" in n.params, dtype=b.dtype)
        return b.graph.call_module(b.install(path, conv, n, ("weight", "bias")), (x,))
    return b.call(b.F.conv2d, x, b.getp(n, "weight"), b.getp(n, "bias"), tuple(a["stride"]), p2,
                  tuple(a["dilation"]), a["groups"])


@builds("linear")
def _linear(b, n, ins):
    path = b.layer(n)
    if path is not None:
        wt = b.model.tensors[n.params["weight"]]
        lin = b.nn.Linear(wt.shape[1], wt.shape[0], bias="bias" in n.params, dtype=b.dtype)
        return b.graph.call_module(b.install(path, lin, n, ("weight", "bias")), (ins[0],))
    return b.call(b.F.linear, ins[0], b.getp(n, "weight"), b.getp(n, "bias"))


@builds("batch_norm")
def _batch_norm(b, n, ins):
    path = b.layer(n)
    roles = _MODULE_ROLES["batch_norm"]
    if path is not None:
        c = b.model.tensors[n.params["weight"]].shape[0]
        cls = b.nn.BatchNorm2d if len(b.model.shapes[n.inputs[0]]) == 3 else b.nn.BatchNorm1d
        bn = cls(c, eps=n.attrs["eps"], dtype=b.dtype)
        b.install(path, bn, n, roles)
        bn.eval()
        return b.graph.call_module(path, (ins[0],))
    p = {r: b.getp(n, r, buffer=r.startswith("running")) for r in roles}
    return b.call(b.F.batch_norm, ins[0], p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.0,
                  n.attrs["eps"])


def _along(b, n, role, axis):
    """``n``'s (S,) tensor ``role`` viewed to broadcast along ``axis`` of its input."""
    t = b.getp(n, role)
    if t is None:
        return None
    shape = [1] * (len(b.model.shapes[n.inputs[0]]) + 1)
    shape[axis] = -1
    return b.graph.call_method("reshape", (t, tuple(shape)))


@builds("affine")
def _affine(b, n, ins):
    y = ins[0]
    w, bias = _along(b, n, "weight", n.attrs["axis"]), _along(b, n, "bias", n.attrs["axis"])
    if w is not None:
        y = b.call(operator.mul, y, w)
    if bias is not None:
        y = b.call(operator.add, y, bias)
    return y


@builds("layer_norm")
def _layer_norm(b, n, ins):
    axis = n.attrs["axis"]
    rank = len(b.model.shapes[n.inputs[0]]) + 1
    size = b.model.shapes[n.inputs[0]][axis - 1]
    x = ins[0] if axis == rank - 1 else b.call(b.torch.movedim, ins[0], axis, -1)
    y = b.call(b.F.layer_norm, x, (size,), b.getp(n, "weight"), b.getp(n, "bias"), n.attrs["eps"])
    return y if axis == rank - 1 else b.call(b.torch.movedim, y, -1, axis)


def _unary(fn_name, **kwargs):
    def build(b, n, ins):
        return b.call(getattr(b.F, fn_name), ins[0], **kwargs)

    return build


for _op, _fn in {"relu": "relu", "relu6": "relu6", "silu": "silu", "hardsigmoid": "hardsigmoid",
                 "hardswish": "hardswish"}.items():
    builds(_op)(_unary(_fn))


@builds("sigmoid")
def _sigmoid(b, n, ins):
    return b.call(b.torch.sigmoid, ins[0])


@builds("gelu")
def _gelu(b, n, ins):
    return b.call(b.F.gelu, ins[0], approximate=n.attrs["approximate"])


@builds("softmax")
def _softmax(b, n, ins):
    return b.call(b.torch.softmax, ins[0], n.attrs["axis"])


@builds("identity")
def _identity(b, n, ins):
    return ins[0]


@builds("add")
def _add(b, n, ins):
    y = ins[0]
    for other in ins[1:]:
        y = b.call(operator.add, y, other)
    return y


@builds("mul")
def _mul(b, n, ins):
    return b.call(operator.mul, ins[0], ins[1])


@builds("concat")
def _concat(b, n, ins):
    return b.call(b.torch.cat, list(ins), 1)


@builds("flatten")
def _flatten(b, n, ins):
    return b.call(b.torch.flatten, ins[0], 1)


@builds("reshape")
def _reshape(b, n, ins):
    return b.graph.call_method("reshape", (ins[0], (-1,) + tuple(n.attrs["shape"])))


@builds("permute")
def _permute(b, n, ins):
    return b.graph.call_method("permute", (ins[0], tuple(n.attrs["perm"])))


@builds("pad")
def _pad(b, n, ins):
    t, bo, l, r = n.attrs["padding"]
    return b.call(b.F.pad, ins[0], [l, r, t, bo], value=n.attrs["value"])


@builds("max_pool2d", "avg_pool2d")
def _pool(b, n, ins):
    a = n.attrs
    pad = list(a["padding"])
    k, s = tuple(a["kernel"]), tuple(a["stride"])
    if n.op == "avg_pool2d" and not a["count_include_pad"] and not (pad[0] == pad[1] and pad[2] == pad[3]):
        raise ConversionError(f"node {n.name!r}: asymmetric padding with count_include_pad=False has no PyTorch "
                              "equivalent")
    x, p2 = _sym_pad(b, ins[0], pad, float("-inf") if n.op == "max_pool2d" else 0.0)
    if n.op == "max_pool2d":
        return b.call(b.F.max_pool2d, x, k, s, p2)
    return b.call(b.F.avg_pool2d, x, k, s, p2, False, a["count_include_pad"])


@builds("global_avg_pool")
def _global_avg_pool(b, n, ins):
    return b.call(b.torch.mean, ins[0], [2, 3], keepdim=bool(n.attrs["keepdims"]))


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------

def to_module(path_or_model):
    """Rebuild a runnable eval-mode PyTorch module from a udfc-ref file or Model.

    Parameters
    ----------
    path_or_model : path or Model
        Possibly compressed (re-shaped) and quantized: the weights are the
        dequantized floats of the file.

    Returns
    -------
    torch.fx.GraphModule
        Takes (N, C, H, W) for any N.  ``state_dict()`` keys are the file's
        tensor names, nested by their dots (``features.0.weight`` is the
        ``weight`` of submodule ``features.0``; a name that is not a dotted
        path of ASCII identifiers / indices is data, never code, and is
        mapped to ``udfc_tensor_<i>``, see :func:`module_names`), plus
        ``<bn>.num_batches_tracked`` buffers of BatchNorm layers rebuilt as
        ``nn.BatchNorm1d/2d``.  Conv, linear and BN nodes whose tensors are
        named ``<path>.<role>`` become real ``nn.Conv2d`` / ``nn.Linear`` /
        ``nn.BatchNorm`` modules; other tensors are registered as plain
        parameters / buffers used by functional ops.  Asymmetric padding is an
        ``F.pad`` before the conv / pool.
    """
    return _Builder(load_model(path_or_model)).build()


def _dtype(model: Model):
    torch = torch_module()
    used = [model.tensors[t] for n in model.nodes for t in n.params.values()]
    return torch.float64 if used and all(t.dtype == np.float64 for t in used) else torch.float32


def check_against(model: Model, module, what: str, batches=(2,)) -> None:
    """Raise ConversionError unless ``module`` (a torch callable) computes what
    the NumPy forward of ``model`` computes (relative CHECK_RTOL), for each
    batch size in ``batches``."""
    torch = torch_module()
    rng = np.random.default_rng(0)
    dt = _dtype(model)
    for nb in batches:
        x = rng.standard_normal((nb,) + tuple(model.input_shape)).astype(np.float32)
        try:
            with torch.no_grad():
                got = module(torch.from_numpy(x).to(dt)).detach().cpu().numpy()
        except Exception as e:
            raise ConversionError(f"the {what} module does not run on a batch of {nb} ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); nothing was "
                                  "written") from None
        err = relative_error(got, model.forward(x))
        if err > CHECK_RTOL:
            raise ConversionError(f"the {what} module differs from the udfc-ref model (relative error {err:.3g}, "
                                  f"tolerance {CHECK_RTOL}, batch {nb}); nothing was written")


def _renamed(model: Model) -> str:
    """JSON ``{name in the module: original name}`` of the renamed tensors (data)."""
    renamed = {safe: orig for orig, safe in module_names(model).items() if safe != orig}
    return json.dumps(renamed, ensure_ascii=True)


def pt2_bytes(model: Model, progress: bool = False) -> bytes:
    """The bytes of a ``.pt2`` archive (``torch.export.save``) of
    ``to_module(model)`` with a dynamic batch axis, checked after loading
    them back with ``torch.export.load`` at batch sizes 1, 2 and 3.
    ``progress``: a progress bar with a time estimate on stderr (a terminal,
    work over a second), one step per phase."""
    from udfc_ref.progress import Progress  # noqa: PLC0415

    torch = torch_module()
    with Progress(5, "export torch", enabled=None if progress else False) as bar:
        bar.update(0, "building the module")
        gm = to_module(model)
        x = torch.zeros((2,) + tuple(model.input_shape), dtype=_dtype(model))
        batch = torch.export.Dim("batch", min=1)
        try:
            bar.update(1, "torch.export")
            ep = torch.export.export(gm, (x,), dynamic_shapes=({0: batch},), strict=False)
            bar.update(2, "saving the program")
            buf = io.BytesIO()
            torch.export.save(ep, buf, extra_files={NAMES_FILE: _renamed(model)})
            data = buf.getvalue()
            bar.update(3, "loading it back")
            back = torch.export.load(io.BytesIO(data)).module()
        except Exception as e:
            raise ConversionError(f"cannot write the model as a torch.export program ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); nothing was "
                                  "written") from None
        bar.update(4, "checking it against the NumPy forward")
        check_against(model, back, "torch.export (.pt2)", batches=(1, 2, 3))
    return data


def save_pt2(src, out_path, progress: bool = False) -> None:
    """Write ``to_module(src)`` as a ``torch.export`` program to ``out_path``
    (``.pt2``) atomically.

    The file loads with ``torch.export.load(out_path).module()`` and PyTorch
    alone (no udfc-ref); the module takes (N, C, H, W) for any N >= 1.  The
    original tensor names of renamed tensors are the archive's extra file
    ``udfc_names.json`` (``torch.export.load(path, extra_files={"udfc_names.json": ""})``).
    """
    from udfc_ref.atomic import check_output_path, write_bytes_atomic  # noqa: PLC0415

    check_output_path(out_path, inputs=(src if not isinstance(src, Model) else None,))
    write_bytes_atomic(out_path, pt2_bytes(load_model(src), progress=progress))


def save_torchscript(src_path, out_path) -> None:
    """Write ``to_module(src_path)`` as TorchScript to ``out_path`` atomically.

    Deprecated: PyTorch 2.13 deprecates TorchScript (``torch.jit.script``,
    ``save`` and ``load`` all warn), so this emits a DeprecationWarning and
    the CLI writes ``.pt2`` (:func:`save_pt2`) instead.  The file loads with
    plain ``torch.jit.load`` (udfc-ref not needed)."""
    from udfc_ref.atomic import check_output_path, write_bytes_atomic  # noqa: PLC0415

    warnings.warn("save_torchscript is deprecated (PyTorch deprecates TorchScript); use save_pt2 and "
                  "torch.export.load", DeprecationWarning, stacklevel=2)
    torch = torch_module()
    check_output_path(out_path, inputs=(src_path if not isinstance(src_path, Model) else None,))
    model = load_model(src_path)
    gm = to_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scripting empty container modules warns harmlessly
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* in PyTorch 2.13
        try:
            sm = torch.jit.script(gm)
        except Exception:  # fall back to tracing (fixed input shape)
            x = torch.zeros((1,) + tuple(model.input_shape), dtype=_dtype(model))
            try:
                sm = torch.jit.trace(gm, x)
            except Exception as e:
                raise ConversionError(f"cannot convert the model to TorchScript: {type(e).__name__}: {e}") from None
        buf = io.BytesIO()
        torch.jit.save(sm, buf, _extra_files={NAMES_FILE: _renamed(model)})  # the original names, as data
        data = buf.getvalue()
        # never write a file we cannot read back: load the bytes and compare with the NumPy forward
        try:
            back = torch.jit.load(io.BytesIO(data))
        except Exception as e:
            raise ConversionError(f"the TorchScript module does not load back ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); nothing was written") from None
        check_against(model, back, "TorchScript")
    write_bytes_atomic(out_path, data)
