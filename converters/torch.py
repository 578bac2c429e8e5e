"""PyTorch <-> udfc-ref converter.

* :func:`to_udfc` / :func:`export` -- trace an ``nn.Module`` with ``torch.fx``
  and map it onto the udfc-ref IR; tensor names are the ``state_dict`` keys.
  The result is checked by running the NumPy forward against the torch forward.
* :func:`export_state_dict` -- a plain state_dict file (safetensors, .pt, .pth)
  plus the module definition.
* :func:`to_module` -- rebuild a runnable eval-mode ``torch.fx.GraphModule``
  from a (possibly compressed) udfc-ref file or :class:`udfc_ref.Model`.
* :func:`save_torchscript` -- the same, saved as TorchScript.
* :func:`load_module_spec` -- ``"package.module:attr"`` / ``"file.py:attr"``.

PyTorch is imported lazily inside the functions: ``import converters.torch``
works without it.  (This module is named ``torch`` inside the ``converters``
package; ``import torch`` below is an absolute import and finds PyTorch.)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import operator
import os
import sys
import warnings

import numpy as np

from udfc_ref.errors import ConversionError, FormatError, UDFCError
from udfc_ref.graph import Model, Node

#: relative tolerance of the post-conversion check (max abs diff / max |output|)
CHECK_RTOL = 1e-3
#: extra file of an exported TorchScript / torch.export archive holding, as JSON,
#: ``{name in the module: original tensor name}`` for names that were not safe
#: attribute paths (see ``converters/names.py``)
NAMES_FILE = "udfc_names.json"


def _torch():
    try:
        import torch  # noqa: PLC0415  (absolute import: PyTorch, not this module)
        import torch.fx  # noqa: F401, PLC0415
    except ImportError:
        raise ConversionError("PyTorch is not installed; install it with: pip install 'udfc-ref[torch]'") from None
    return torch


# ==========================================================================
# torch -> udfc-ref
# ==========================================================================

def _pair(v, what, where):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [int(v[0]), int(v[0])]
    if len(v) != 2:
        raise ConversionError(f"{where}: {what} {v!r} is not an int or a pair")
    return [int(v[0]), int(v[1])]


def _conv_padding(padding, kernel, dilation, stride, where):
    """Torch conv padding (int, pair, 'same', 'valid') -> [top, bottom, left, right]."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return out
        raise ConversionError(f"{where}: padding {padding!r} is not supported")
    p = _pair(padding, "padding", where)
    return [p[0], p[0], p[1], p[1]]


class _Converter:
    """State of one torch.fx -> IR conversion."""

    def __init__(self, module, input_shape):
        torch = _torch()
        self.torch = torch
        self.F = torch.nn.functional
        self.root = module
        self.input_shape = tuple(int(s) for s in input_shape)
        self.tensors: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.value: dict[str, str] = {}  # fx node name -> IR value name (or alias)
        self.meta: set[str] = set()  # fx nodes holding sizes (x.size(0), x.shape)
        self.pads: dict[str, tuple] = {}  # F.pad nodes: name -> (source fx node, [t, b, l, r], value)
        self.used_names: set[str] = set()
        self.modules = dict(module.named_modules())

    # ------------------------------------------------------------ helpers
    def where(self, n):
        t = n.target
        if n.op == "call_module":
            return f"fx node {n.name!r} (module {t!r}: {type(self.modules[t]).__name__})"
        if n.op == "call_function":
            tn = getattr(t, "__module__", "") + "." + getattr(t, "__name__", repr(t))
            return f"fx node {n.name!r} (function {tn.lstrip('.')})"
        return f"fx node {n.name!r} ({n.op} {t!r})"

    def shape(self, n):
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise ConversionError(f"{self.where(n)}: its value is not a single tensor")
        return tuple(tm.shape)

    def tensor_in(self, n, arg):
        fx = self.torch.fx
        if not isinstance(arg, fx.Node):
            raise ConversionError(f"{self.where(n)}: argument {arg!r} is a constant, expected a tensor from the graph")
        if arg.name in self.pads:
            raise ConversionError(f"{self.where(n)}: its input {arg.name!r} is an F.pad; explicit padding is only "
                                  "supported directly before a Conv2d or a pooling layer")
        if arg.name in self.meta or arg.name not in self.value:
            raise ConversionError(f"{self.where(n)}: argument {arg.name!r} is not a tensor value the converter knows")
        return self.value[arg.name]

    def node_name(self, n):
        name = n.target if n.op == "call_module" else n.name
        if name in self.used_names:
            name = n.name
        base, i = name, 1
        while name in self.used_names:
            name, i = f"{base}_{i}", i + 1
        self.used_names.add(name)
        return name

    def unpad(self, n, src, value=0.0):
        """(source, [t, b, l, r]) of an input that may be an explicit F.pad with ``value``."""
        fx = self.torch.fx
        if isinstance(src, fx.Node) and src.name in self.pads:
            inner, pad, v = self.pads[src.name]
            if v != value:
                raise ConversionError(f"{self.where(n)}: its input is F.pad with value {v}, expected {value}")
            return inner, pad
        return src, [0, 0, 0, 0]

    def emit(self, n, op, inputs, attrs=None, params=None):
        name = self.node_name(n)
        self.nodes.append(Node(name, op, list(inputs), n.name, dict(attrs or {}), dict(params or {})))
        self.value[n.name] = n.name

    def alias(self, n, src):
        self.value[n.name] = self.tensor_in(n, src)

    def param(self, prefix, role, t):
        name = f"{prefix}.{role}" if prefix else role
        arr = t.detach().cpu().numpy()
        if arr.dtype.kind != "f":
            raise ConversionError(f"tensor {name!r} has dtype {arr.dtype}; parameters must be floating point")
        self.tensors[name] = np.array(arr, dtype=np.float32 if arr.dtype == np.float16 else arr.dtype, copy=True)
        return name

    # --------------------------------------------------------------- run
    def convert(self):
        torch = self.torch
        from torch.fx.passes.shape_prop import ShapeProp  # noqa: PLC0415

        try:
            gm = torch.fx.symbolic_trace(self.root)
        except Exception as e:  # fx raises many types (TraceError, TypeError ...)
            raise ConversionError(f"torch.fx cannot trace {type(self.root).__name__}: {type(e).__name__}: {e} "
                                  "(data-dependent control flow is not supported)") from None
        x = torch.randn((2,) + self.input_shape, generator=torch.Generator().manual_seed(0),
                        dtype=_param_dtype(self.root))
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(x)
        except Exception as e:
            raise ConversionError(f"{type(self.root).__name__} does not run on an input of shape "
                                  f"(N, {', '.join(map(str, self.input_shape))}): {type(e).__name__}: {e}") from None
        self.modules = dict(gm.named_modules())
        out = None
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if self.value:
                    raise ConversionError(f"{self.where(n)}: the module takes more than one input")
                self.value[n.name] = "input"
            elif n.op == "output":
                a = n.args[0]
                if not isinstance(a, torch.fx.Node):
                    raise ConversionError(f"{self.where(n)}: the module must return one tensor, got {type(a).__name__}")
                out = self.tensor_in(n, a)
            elif n.op == "call_module":
                self.call_module(n)
            elif n.op in ("call_function", "call_method"):
                self.call_function(n)
            else:
                raise ConversionError(f"{self.where(n)}: {n.op} nodes are not supported (parameters must be used "
                                      "through nn.Conv2d / nn.Linear / nn.BatchNorm modules)")
        if out == "input":
            raise ConversionError("the module returns its input unchanged; nothing to convert")
        # an output that is only an alias of an inner value: give it an identity node
        try:
            model = Model(self.tensors, self.nodes, "input", self.input_shape, output_name=out)
        except UDFCError as e:
            raise ConversionError(f"the converted graph is invalid: {e}") from None
        return model, gm

    # ------------------------------------------------------------ modules
    def call_module(self, n):
        nn = self.torch.nn
        m = self.modules[n.target]
        prefix = n.target
        w = self.where(n)
        if len(n.args) != 1 or n.kwargs:
            raise ConversionError(f"{w}: called with {len(n.args)} positional / {len(n.kwargs)} keyword arguments, "
                                  "expected one tensor")
        src = n.args[0]
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise ConversionError(f"{w}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
            k = list(m.kernel_size)
            pad = _conv_padding(m.padding, k, list(m.dilation), list(m.stride), w)
            src, extra = self.unpad(n, src)
            pad = [p + e for p, e in zip(pad, extra)]
            params = {"weight": self.param(prefix, "weight", m.weight)}
            if m.bias is not None:
                params["bias"] = self.param(prefix, "bias", m.bias)
            self.emit(n, "conv2d", [self.tensor_in(n, src)],
                      {"stride": list(m.stride), "padding": pad, "dilation": list(m.dilation), "groups": m.groups},
                      params)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            self.batch_norm(n, m, prefix, src, w)
        elif isinstance(m, nn.Linear):
            if len(self.shape(src)) != 2:
                raise ConversionError(f"{w}: nn.Linear on a {len(self.shape(src))}-D input is not supported "
                                      "(flatten first)")
            params = {"weight": self.param(prefix, "weight", m.weight)}
            if m.bias is not None:
                params["bias"] = self.param(prefix, "bias", m.bias)
            self.emit(n, "linear", [self.tensor_in(n, src)], {}, params)
        elif isinstance(m, nn.ReLU):
            self.emit(n, "relu", [self.tensor_in(n, src)])
        elif isinstance(m, nn.Hardtanh):  # includes nn.ReLU6
            if float(m.min_val) != 0.0 or float(m.max_val) != 6.0:
                raise ConversionError(f"{w}: Hardtanh({m.min_val}, {m.max_val}) is not supported (only ReLU6 = "
                                      "Hardtanh(0, 6))")
            self.emit(n, "relu6", [self.tensor_in(n, src)])
        elif isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            self.alias(n, src)
        elif isinstance(m, nn.Flatten):
            self.flatten(n, src, m.start_dim, m.end_dim)
        elif isinstance(m, nn.MaxPool2d):
            self.max_pool(n, src, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        elif isinstance(m, nn.AvgPool2d):
            self.avg_pool(n, src, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                          m.divisor_override)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.adaptive_avg_pool(n, src, m.output_size)
        else:
            raise ConversionError(f"{w}: layer type {type(m).__name__} is not supported by the udfc-ref converter "
                                  "(supported: Conv2d, BatchNorm1d/2d, Linear, ReLU, ReLU6, MaxPool2d, AvgPool2d, "
                                  "AdaptiveAvgPool2d, Flatten, Identity, Dropout)")

    def batch_norm(self, n, m, prefix, src, w):
        if not m.track_running_stats or m.running_mean is None:
            raise ConversionError(f"{w}: BatchNorm without running statistics (track_running_stats=False) "
                                  "normalises with batch statistics and cannot be converted")
        c = m.num_features
        torch = self.torch
        params = {}
        if m.affine:
            params["weight"] = self.param(prefix, "weight", m.weight)
            params["bias"] = self.param(prefix, "bias", m.bias)
        else:  # affine=False: explicit gamma=1, beta=0
            params["weight"] = self.param(prefix, "weight", torch.ones(c, dtype=m.running_mean.dtype))
            params["bias"] = self.param(prefix, "bias", torch.zeros(c, dtype=m.running_mean.dtype))
        params["running_mean"] = self.param(prefix, "running_mean", m.running_mean)
        params["running_var"] = self.param(prefix, "running_var", m.running_var)
        s = self.shape(src)
        if len(s) not in (2, 4):
            raise ConversionError(f"{w}: batch norm on a {len(s)}-D input is not supported")
        self.emit(n, "batch_norm", [self.tensor_in(n, src)], {"eps": float(m.eps)}, params)

    def flatten(self, n, src, start, end=-1):
        s = self.shape(src)
        if start < 0:
            start += len(s)
        if end < 0:
            end += len(s)
        if start != 1 or end != len(s) - 1:
            raise ConversionError(f"{self.where(n)}: flatten(start_dim={start}, end_dim={end}) is not supported "
                                  "(only flattening everything but the batch axis)")
        if len(s) == 2:
            self.alias(n, src)
        else:
            self.emit(n, "flatten", [self.tensor_in(n, src)])

    def max_pool(self, n, src, k, stride, padding, dilation, ceil_mode, return_indices):
        w = self.where(n)
        if ceil_mode:
            raise ConversionError(f"{w}: max pooling with ceil_mode=True is not supported")
        if return_indices:
            raise ConversionError(f"{w}: max pooling with return_indices=True is not supported")
        if _pair(dilation, "dilation", w) != [1, 1]:
            raise ConversionError(f"{w}: max pooling with dilation {dilation!r} is not supported")
        k = _pair(k, "kernel", w)
        stride = k if stride is None or stride == [] or stride == () else _pair(stride, "stride", w)
        p = _pair(padding, "padding", w)
        src, extra = self.unpad(n, src, float("-inf"))
        pad = [a + b for a, b in zip([p[0], p[0], p[1], p[1]], extra)]
        self.emit(n, "max_pool2d", [self.tensor_in(n, src)], {"kernel": k, "stride": stride, "padding": pad})

    def avg_pool(self, n, src, k, stride, padding, ceil_mode, count_include_pad, divisor_override):
        w = self.where(n)
        if ceil_mode:
            raise ConversionError(f"{w}: average pooling with ceil_mode=True is not supported")
        if divisor_override is not None:
            raise ConversionError(f"{w}: average pooling with divisor_override is not supported")
        k = _pair(k, "kernel", w)
        stride = k if stride is None or stride == [] or stride == () else _pair(stride, "stride", w)
        p = _pair(padding, "padding", w)
        src, extra = self.unpad(n, src)
        if any(extra) and not count_include_pad:
            raise ConversionError(f"{w}: F.pad before average pooling with count_include_pad=False is not supported")
        pad = [a + b for a, b in zip([p[0], p[0], p[1], p[1]], extra)]
        self.emit(n, "avg_pool2d", [self.tensor_in(n, src)],
                  {"kernel": k, "stride": stride, "padding": pad, "count_include_pad": bool(count_include_pad)})

    def adaptive_avg_pool(self, n, src, out):
        s = self.shape(src)
        w = self.where(n)
        if len(s) != 4:
            raise ConversionError(f"{w}: adaptive average pooling needs an (N, C, H, W) input, got {s}")
        out = list(out) if isinstance(out, (list, tuple)) else [out, out]
        out = [s[2 + i] if o is None else int(o) for i, o in enumerate(out)]
        if out == [1, 1]:
            self.emit(n, "global_avg_pool", [self.tensor_in(n, src)], {"keepdims": True})
        elif out == list(s[2:]):
            self.alias(n, src)
        elif s[2] % out[0] == 0 and s[3] % out[1] == 0:
            k = [s[2] // out[0], s[3] // out[1]]
            self.emit(n, "avg_pool2d", [self.tensor_in(n, src)],
                      {"kernel": k, "stride": k, "padding": [0, 0, 0, 0], "count_include_pad": True})
        else:
            raise ConversionError(f"{w}: adaptive average pooling from {tuple(s[2:])} to {tuple(out)} is not "
                                  "supported (the output size must divide the input size)")

    # ---------------------------------------------------------- functions
    def call_function(self, n):
        torch, F = self.torch, self.F
        t = n.target
        a, kw = list(n.args), dict(n.kwargs)
        w = self.where(n)
        method = n.op == "call_method"

        def is_(*fns, names=()):
            return (not method and t in fns) or (method and t in names)

        def arg(i, name, default=None):
            if len(a) > i:
                return a[i]
            return kw.get(name, default)

        if is_(names=("size", "dim")) or (is_(getattr) and len(a) == 2 and a[1] == "shape") or (
                is_(operator.getitem) and isinstance(a[0], torch.fx.Node) and a[0].name in self.meta):
            # x.size(0), x.shape[0], x.shape: only used as view/reshape arguments
            self.meta.add(n.name)
            return
        if is_(F.relu, torch.relu, torch.relu_, names=("relu", "relu_")):
            if arg(1, "inplace", False) not in (True, False):
                raise ConversionError(f"{w}: unexpected arguments")
            self.emit(n, "relu", [self.tensor_in(n, a[0])])
        elif is_(F.relu6):
            self.emit(n, "relu6", [self.tensor_in(n, a[0])])
        elif is_(F.hardtanh, F.hardtanh_, names=("clamp", "clip", "clamp_", "clip_")) or is_(torch.clamp, torch.clip):
            lo = arg(1, "min_val" if not method and t in (F.hardtanh, F.hardtanh_) else "min", -1.0)
            hi = arg(2, "max_val" if not method and t in (F.hardtanh, F.hardtanh_) else "max", 1.0)
            if lo != 0 or hi != 6:
                raise ConversionError(f"{w}: clamp/hardtanh to [{lo}, {hi}] is not supported (only [0, 6] = ReLU6)")
            self.emit(n, "relu6", [self.tensor_in(n, a[0])])
        elif is_(operator.add, operator.iadd, torch.add, names=("add", "add_")):
            alpha = kw.get("alpha", 1)
            if alpha != 1 or len(a) != 2:
                raise ConversionError(f"{w}: only the plain sum of two tensors is supported")
            if not all(isinstance(v, torch.fx.Node) for v in a):
                raise ConversionError(f"{w}: adding a constant is not supported (only tensor + tensor)")
            if self.shape(a[0]) != self.shape(a[1]):
                raise ConversionError(f"{w}: broadcasting add of {self.shape(a[0])} and {self.shape(a[1])} "
                                      "is not supported")
            self.emit(n, "add", [self.tensor_in(n, a[0]), self.tensor_in(n, a[1])])
        elif is_(torch.cat, torch.concat):
            xs = arg(0, "tensors")
            dim = arg(1, "dim", 0)
            if not isinstance(xs, (list, tuple)) or len(xs) < 1:
                raise ConversionError(f"{w}: torch.cat needs a list of tensors")
            nd = len(self.shape(xs[0]))
            if dim < 0:
                dim += nd
            if dim != 1 or nd not in (2, 4):
                raise ConversionError(f"{w}: torch.cat on dim {dim} of {nd}-D tensors is not supported "
                                      "(only the channel / feature axis 1 of NCHW or (N, F) tensors)")
            if len(xs) == 1:
                self.alias(n, xs[0])
            else:
                self.emit(n, "concat", [self.tensor_in(n, v) for v in xs], {"axis": 1})
        elif is_(torch.flatten, names=("flatten",)):
            self.flatten(n, a[0], arg(1, "start_dim", 0), arg(2, "end_dim", -1))
        elif is_(names=("view", "reshape")) or is_(torch.reshape):
            self.reshape(n, w)
        elif is_(F.adaptive_avg_pool2d):
            self.adaptive_avg_pool(n, a[0], arg(1, "output_size"))
        elif is_(F.max_pool2d):
            self.max_pool(n, a[0], arg(1, "kernel_size"), arg(2, "stride"), arg(3, "padding", 0),
                          arg(4, "dilation", 1), arg(5, "ceil_mode", False), arg(6, "return_indices", False))
        elif is_(F.avg_pool2d):
            self.avg_pool(n, a[0], arg(1, "kernel_size"), arg(2, "stride"), arg(3, "padding", 0),
                          arg(4, "ceil_mode", False), arg(5, "count_include_pad", True),
                          arg(6, "divisor_override"))
        elif is_(torch.mean, names=("mean",)):
            dims = arg(1, "dim")
            keep = bool(arg(2, "keepdim", False))
            s = self.shape(a[0])
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            dims = sorted(d + len(s) if d < 0 else d for d in dims)
            if len(s) != 4 or dims != [2, 3]:
                raise ConversionError(f"{w}: mean over dims {dims} is not supported (only the spatial dims (2, 3) "
                                      "of an NCHW tensor: global average pooling)")
            self.emit(n, "global_avg_pool", [self.tensor_in(n, a[0])], {"keepdims": keep})
        elif is_(F.dropout, F.dropout2d, torch.dropout):
            if arg(2, "training", True) if t is not torch.dropout else arg(2, "train", True):
                raise ConversionError(f"{w}: dropout in training mode; put the module in eval mode")
            self.alias(n, a[0])
        elif is_(F.pad):
            pad = arg(1, "pad")
            mode = arg(2, "mode", "constant")
            value = arg(3, "value", None)
            value = 0.0 if value is None else float(value)
            s = self.shape(a[0])
            if (mode != "constant" or len(s) != 4 or not isinstance(pad, (list, tuple)) or len(pad) != 4
                    or any(not isinstance(v, int) or v < 0 for v in pad)):
                raise ConversionError(f"{w}: only constant, non-negative F.pad of H and W of an NCHW tensor is "
                                      f"supported, got pad={pad!r} mode={mode!r}")
            self.tensor_in(n, a[0])
            self.pads[n.name] = (a[0], [pad[2], pad[3], pad[0], pad[1]], value)
        elif is_(names=("contiguous", "clone", "detach")):
            self.alias(n, a[0])
        else:
            kind = f"method .{t}()" if method else "function"
            raise ConversionError(f"{w}: {kind} is not supported by the udfc-ref converter")

    def reshape(self, n, w):
        torch = self.torch
        a = list(n.args)
        src = a[0]
        shape = a[1:] if len(a) > 2 or not isinstance(a[1] if len(a) > 1 else None, (list, tuple)) else list(a[1])
        if "shape" in n.kwargs:
            shape = list(n.kwargs["shape"])
        s_in, s_out = self.shape(src), self.shape(n)
        first_ok = len(shape) == 2 and (isinstance(shape[0], torch.fx.Node) or shape[0] in (-1, s_in[0]))
        if not (first_ok and s_out == (s_in[0], int(np.prod(s_in[1:]))) and len(s_in) >= 2):
            raise ConversionError(f"{w}: reshape of {s_in} to {s_out} is not supported (only x.view(x.size(0), -1) "
                                  "style flattening)")
        if len(s_in) == 2:
            self.alias(n, src)
        elif len(s_in) == 4:
            self.emit(n, "flatten", [self.tensor_in(n, src)])
        else:
            raise ConversionError(f"{w}: flattening a {len(s_in)}-D tensor is not supported")


def _unwrap(module):
    torch = _torch()
    while isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def _param_dtype(module):
    """The floating dtype of the module's first parameter (float32 if none)."""
    torch = _torch()
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_forward(model, module, input_shape):
    """Raise ConversionError if the NumPy forward of ``model`` differs from the torch forward."""
    torch = _torch()
    x = torch.randn((2,) + tuple(input_shape), generator=torch.Generator().manual_seed(1234),
                    dtype=_param_dtype(module))
    with torch.no_grad():
        ref = module(x)
    ref = ref.detach().cpu().numpy().astype(np.float64)
    got = np.asarray(model.forward(x.numpy()), dtype=np.float64)
    if got.shape != ref.shape:
        raise ConversionError(f"conversion check failed: the converted model outputs {got.shape}, torch outputs "
                              f"{ref.shape}")
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(got - ref).max()) / scale
    if not np.isfinite(err) or err > CHECK_RTOL:
        raise ConversionError(f"conversion check failed: NumPy and torch outputs differ by {err:.3g} relative to "
                              f"max |output| (tolerance {CHECK_RTOL}); a layer was mis-mapped")


def _parse_shape(input_shape):
    try:
        if isinstance(input_shape, str):
            input_shape = [int(s) for s in input_shape.replace("x", ",").split(",") if s.strip()]
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConversionError(f"input shape must be C,H,W (e.g. 3,224,224), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConversionError(f"input shape must be three positive sizes C,H,W (no batch axis), got {input_shape!r}")
    return shape


def to_udfc(module, input_shape, check: bool = True) -> Model:
    """Convert an ``nn.Module`` to a :class:`udfc_ref.Model`.

    Parameters
    ----------
    module : torch.nn.Module
        The network; traced with ``torch.fx`` in eval mode (its mode is
        restored afterwards).  DataParallel wrappers are unwrapped.
    input_shape : tuple (C, H, W) or str "C,H,W"
        One input sample, without the batch axis.
    check : bool
        Run the NumPy forward against the torch forward on a random batch of
        2 and raise ConversionError above 1e-3 relative difference.

    Returns
    -------
    Model
        Tensor names are the module's ``state_dict`` keys (e.g.
        ``features.0.weight``); ``num_batches_tracked`` is not copied.

    Raises
    ------
    ConversionError
        For an untraceable module or any unsupported layer / function /
        argument, naming the fx node and its module path or target.
    """
    torch = _torch()
    module = _unwrap(module)
    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(module).__name__}")
    shape = _parse_shape(input_shape)
    was_training = module.training
    module.eval()
    try:
        model, gm = _Converter(module, shape).convert()
        if check:
            _check_forward(model, module, shape)
    finally:
        module.train(was_training)
    return model


def export(module, path, input_shape, check: bool = True) -> Model:
    """Convert ``module`` (see :func:`to_udfc`) and save it to ``path`` atomically."""
    from udfc_ref.atomic import check_output_path  # noqa: PLC0415
    from udfc_ref.io import save  # noqa: PLC0415

    check_output_path(path)
    model = to_udfc(module, input_shape, check=check)
    save(model, path)
    return model


# ---------------------------------------------------------------- weights

def _instantiate(module):
    torch = _torch()
    if isinstance(module, torch.nn.Module):
        return module
    if callable(module):
        try:
            m = module()
        except Exception as e:
            raise ConversionError(f"calling {getattr(module, '__name__', module)!r}() to build the module failed: "
                                  f"{type(e).__name__}: {e}") from None
        if not isinstance(m, torch.nn.Module):
            raise ConversionError(f"{getattr(module, '__name__', module)!r}() returned {type(m).__name__}, "
                                  "not a torch.nn.Module")
        return m
    raise ConversionError(f"expected a torch.nn.Module, a class or a zero-argument factory, got {type(module).__name__}")


def read_state_dict(weights_path) -> dict:
    """Read a plain PyTorch state_dict from .safetensors, or .pt/.pth/.bin
    (``torch.load(weights_only=True)``; a checkpoint dict holding
    ``state_dict`` or ``model`` is unpacked).  A common ``module.`` prefix
    (DataParallel) is stripped."""
    torch = _torch()
    weights_path = os.fspath(weights_path)
    if not os.path.isfile(weights_path):
        raise FormatError(f"{weights_path}: no such file")
    if weights_path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file  # noqa: PLC0415

            sd = load_file(weights_path)
        except Exception as e:
            raise FormatError(f"{weights_path}: cannot read safetensors weights ({type(e).__name__}: {e})") from None
    else:
        try:
            sd = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FormatError(f"{weights_path}: cannot read PyTorch weights with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise FormatError(f"{weights_path}: not a state_dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(module, weights_path):
    """Load a state_dict file into ``module`` strictly; ConversionError names
    missing / unexpected keys and shape mismatches."""
    module = _unwrap(module)
    sd = read_state_dict(weights_path)
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise ConversionError(f"{weights_path} does not match {type(module).__name__}: " + "; ".join(parts))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConversionError(f"{weights_path}: tensor shapes differ from {type(module).__name__}: "
                              + ", ".join(bad[:6]))
    module.load_state_dict(sd, strict=False)
    return module


def export_state_dict(weights_path, module, path, input_shape, check: bool = True) -> Model:
    """Export a model given only its weights and its definition.

    Parameters
    ----------
    weights_path : path
        A plain state_dict: ``.safetensors``, or ``.pt`` / ``.pth`` read with
        ``torch.load(weights_only=True)``.
    module : nn.Module, class or zero-argument factory
        The architecture.
    path : path
        Output udfc-ref file (never the weights file).
    input_shape : (C, H, W) or "C,H,W"
    """
    from udfc_ref.atomic import check_output_path  # noqa: PLC0415

    check_output_path(path, inputs=(weights_path,))
    m = load_weights(_instantiate(module), weights_path)
    return export(m, path, input_shape, check=check)


def load_module_spec(spec: str, weights=None):
    """Build a module from ``"package.module:attr"`` or ``"path/file.py:attr"``.

    ``attr`` (dotted attributes allowed) is a Module instance, or a class /
    factory called with no arguments.  With ``weights``, the state_dict file
    is loaded as in :func:`export_state_dict`."""
    _torch()
    if not isinstance(spec, str) or ":" not in spec:
        raise ConversionError(f"module spec must be 'package.module:attr' or 'path/to/file.py:attr', got {spec!r}")
    mod_part, attr = spec.rsplit(":", 1)
    if not mod_part or not attr:
        raise ConversionError(f"module spec {spec!r}: both the module and the attribute are needed")
    try:
        if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
            if not os.path.isfile(mod_part):
                raise ConversionError(f"module spec {spec!r}: no such file {mod_part!r}")
            name = "_udfc_spec_" + os.path.splitext(os.path.basename(mod_part))[0]
            s = importlib.util.spec_from_file_location(name, mod_part)
            pymod = importlib.util.module_from_spec(s)
            sys.modules[name] = pymod
            s.loader.exec_module(pymod)
        else:
            pymod = importlib.import_module(mod_part)
    except UDFCError:
        raise
    except Exception as e:
        raise ConversionError(f"module spec {spec!r}: importing {mod_part!r} failed: {type(e).__name__}: {e}") from None
    obj = pymod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConversionError(f"module spec {spec!r}: {mod_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    m = _instantiate(obj)
    if weights is not None:
        load_weights(m, weights)
    return m.eval()


# ==========================================================================
# udfc-ref -> torch
# ==========================================================================

_MODULE_ROLES = {
    "conv2d": ("weight", "bias"),
    "linear": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
}


def _load_model(path_or_model) -> Model:
    if isinstance(path_or_model, Model):
        return path_or_model
    from udfc_ref.io import load  # noqa: PLC0415

    return load(path_or_model)


def _as_layer(n, params, all_names):
    """The submodule path for node ``n`` if its (safe) tensor names ``params``
    (role -> name) are ``<path>.<role>`` and nothing else lives under
    ``<path>.``; else None."""
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
    own = set(params.values())
    if any(x.startswith(p + ".") and x not in own for x in all_names):
        return None
    return p


def _reserved_names():
    """Attribute names a submodule or tensor must not take: those every
    ``nn.Module`` / ``fx.GraphModule`` already has (``forward``, ``training``,
    ``graph`` ...)."""
    torch = _torch()
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
        ``state_dict()`` keys are the file's tensor names, nested by
        their dots (``features.0.weight`` is the ``weight`` of submodule
        ``features.0``; a name that is not a dotted path of ASCII
        identifiers / indices is data, never code, and is mapped to
        ``udfc_tensor_<i>``, see :func:`module_names`), plus ``<bn>.num_batches_tracked`` buffers of
        BatchNorm layers rebuilt as ``nn.BatchNorm1d/2d``.  Conv, linear and
        BN nodes whose tensors are named ``<path>.<role>`` become real
        ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm`` modules; other
        tensors are registered as plain parameters / buffers used by the
        functional ops.  Asymmetric padding is an ``F.pad`` before the conv.
    """
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    model = _load_model(path_or_model)
    names = module_names(model)  # original -> safe attribute path: file strings never become code
    original = {v: k for k, v in names.items()}
    used = sorted(names.values())
    dts = {model.tensors[t].dtype for t in names}
    dtype = torch.float64 if dts == {np.dtype(np.float64)} else torch.float32

    def tens(name):
        return torch.tensor(np.asarray(model.tensors[original[name]]), dtype=dtype)

    root = nn.Module()

    def put(path, obj):
        parts = path.split(".")
        m = root
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

    graph = torch.fx.Graph()
    env = {model.input_name: graph.placeholder("x")}
    registered = set()

    def install(path, module, node, roles):
        """Copy ``node``'s tensors for ``roles`` into ``module`` and mount it at
        ``path`` (its tensors then count as registered)."""
        with torch.no_grad():
            for role in roles:
                if role in node.params:
                    getattr(module, role).copy_(tens(names[node.params[role]]))
        put(path, module)
        registered.update(names[t] for t in node.params.values())

    def getp(name, buffer=False):
        if name not in registered:
            t = tens(name)
            put(name, t if buffer else nn.Parameter(t, requires_grad=False))
            registered.add(name)
        return graph.get_attr(name)

    for n in model.nodes:
        ins = [env[i] for i in n.inputs]
        x = ins[0]
        a = n.attrs
        sp = {role: names[t] for role, t in n.params.items()}  # role -> safe tensor name
        layer = _as_layer(n, sp, used)
        if layer is not None and any(t in registered for t in sp.values()):
            layer = None  # a tensor shared with an earlier node: use it functionally
        if n.op == "conv2d":
            pad = list(a["padding"])
            sym = pad[0] == pad[1] and pad[2] == pad[3]
            if not sym:
                x = graph.call_function(F.pad, (x, [pad[2], pad[3], pad[0], pad[1]]))
            p2 = [pad[0], pad[2]] if sym else [0, 0]
            if layer is not None:
                wt = model.tensors[n.params["weight"]]
                conv = nn.Conv2d(wt.shape[1] * a["groups"], wt.shape[0], tuple(wt.shape[2:]), tuple(a["stride"]),
                                 tuple(p2), tuple(a["dilation"]), a["groups"], bias="bias" in n.params, dtype=dtype)
                install(layer, conv, n, ("weight", "bias"))
                y = graph.call_module(layer, (x,))
            else:
                b = getp(sp["bias"]) if "bias" in n.params else None
                y = graph.call_function(F.conv2d, (x, getp(sp["weight"]), b, tuple(a["stride"]), tuple(p2),
                                                   tuple(a["dilation"]), a["groups"]))
        elif n.op == "linear":
            if layer is not None:
                wt = model.tensors[n.params["weight"]]
                lin = nn.Linear(wt.shape[1], wt.shape[0], bias="bias" in n.params, dtype=dtype)
                install(layer, lin, n, ("weight", "bias"))
                y = graph.call_module(layer, (x,))
            else:
                b = getp(sp["bias"]) if "bias" in n.params else None
                y = graph.call_function(F.linear, (x, getp(sp["weight"]), b))
        elif n.op == "batch_norm":
            c = model.tensors[n.params["weight"]].shape[0]
            if layer is not None:
                cls = nn.BatchNorm2d if len(model.shapes[n.inputs[0]]) == 3 else nn.BatchNorm1d
                bn = cls(c, eps=a["eps"], dtype=dtype)
                install(layer, bn, n, _MODULE_ROLES["batch_norm"])
                bn.eval()
                y = graph.call_module(layer, (x,))
            else:
                p = {r: getp(sp[r], buffer=r.startswith("running")) for r in _MODULE_ROLES["batch_norm"]}
                y = graph.call_function(F.batch_norm, (x, p["running_mean"], p["running_var"], p["weight"],
                                                       p["bias"], False, 0.0, a["eps"]))
        elif n.op == "relu":
            y = graph.call_function(F.relu, (x,))
        elif n.op == "relu6":
            y = graph.call_function(F.relu6, (x,))
        elif n.op == "identity":
            y = x
        elif n.op == "add":
            y = ins[0]
            for other in ins[1:]:
                y = graph.call_function(operator.add, (y, other))
        elif n.op == "concat":
            y = graph.call_function(torch.cat, (list(ins), 1))
        elif n.op == "flatten":
            y = graph.call_function(torch.flatten, (x, 1))
        elif n.op in ("max_pool2d", "avg_pool2d"):
            pad = list(a["padding"])
            k, s = tuple(a["kernel"]), tuple(a["stride"])
            if pad[0] == pad[1] and pad[2] == pad[3]:
                p2 = (pad[0], pad[2])
            else:
                if n.op == "avg_pool2d" and not a["count_include_pad"]:
                    raise ConversionError(f"node {n.name!r}: asymmetric padding with count_include_pad=False "
                                          "has no PyTorch equivalent")
                x = graph.call_function(F.pad, (x, [pad[2], pad[3], pad[0], pad[1]]),
                                        {"value": float("-inf") if n.op == "max_pool2d" else 0.0})
                p2 = (0, 0)
            if n.op == "max_pool2d":
                y = graph.call_function(F.max_pool2d, (x, k, s, p2))
            else:
                y = graph.call_function(F.avg_pool2d, (x, k, s, p2, False, a["count_include_pad"]))
        elif n.op == "global_avg_pool":
            y = graph.call_function(torch.mean, (x, [2, 3]), {"keepdim": bool(a["keepdims"])})
        else:
            raise ConversionError(f"node {n.name!r}: op {n.op!r} has no PyTorch mapping")
        env[n.output] = y
    graph.output(env[model.output_name])
    gm = torch.fx.GraphModule(root, graph, class_name="UDFCModel")
    return gm.eval()


def save_torchscript(src_path, out_path) -> None:
    """Write ``to_module(src_path)`` as TorchScript to ``out_path`` atomically.

    The file loads with plain ``torch.jit.load`` (udfc-ref not needed)."""
    import io as _io  # noqa: PLC0415

    from udfc_ref.atomic import check_output_path, write_bytes_atomic  # noqa: PLC0415

    torch = _torch()
    check_output_path(out_path, inputs=(src_path if not isinstance(src_path, Model) else None,))
    model = _load_model(src_path)
    gm = to_module(model)
    try:
        with warnings.catch_warnings():  # scripting empty container modules warns harmlessly
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks TorchScript deprecated
            sm = torch.jit.script(gm)
    except Exception:  # fall back to tracing (fixed input shape)
        x = torch.zeros((1,) + tuple(model.input_shape), dtype=next(iter(gm.parameters())).dtype)
        try:
            sm = torch.jit.trace(gm, x)
        except Exception as e:
            raise ConversionError(f"cannot convert the model to TorchScript: {type(e).__name__}: {e}") from None
    renamed = {safe: orig for orig, safe in module_names(model).items() if safe != orig}
    extra = {NAMES_FILE: json.dumps(renamed, ensure_ascii=True)}  # the original names, as data
    buf = _io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(sm, buf, _extra_files=extra)
        data = buf.getvalue()
        # never write a file we cannot read back: load the bytes and compare with the NumPy forward
        try:
            back = torch.jit.load(_io.BytesIO(data))
        except Exception as e:
            raise ConversionError(f"the TorchScript module does not load back ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); nothing was written") from None
    _check_against(model, back, "TorchScript")
    write_bytes_atomic(out_path, data)


def _check_against(model: Model, module, what: str) -> None:
    """Raise ConversionError unless ``module`` (a torch callable) computes what
    the NumPy forward of ``model`` computes (relative CHECK_RTOL)."""
    torch = _torch()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2,) + tuple(model.input_shape)).astype(np.float32)
    dt = torch.float64 if all(model.tensors[t].dtype == np.float64 for n in model.nodes
                              for t in n.params.values()) else torch.float32
    with torch.no_grad():
        got = module(torch.from_numpy(x).to(dt)).detach().cpu().numpy().astype(np.float64)
    ref = np.asarray(model.forward(x), dtype=np.float64)
    scale = max(float(np.abs(ref).max()), 1e-12) if ref.size else 1.0
    err = float(np.abs(got - ref).max()) / scale if got.shape == ref.shape else np.inf
    if not np.isfinite(err) or err > CHECK_RTOL:
        raise ConversionError(f"the {what} module differs from the udfc-ref model (relative error {err:.3g}, "
                              f"tolerance {CHECK_RTOL}); nothing was written")
