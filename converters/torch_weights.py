"""Getting a PyTorch module and its weights: ``pkg.mod:attr`` specs and
plain state_dict files (``.safetensors``, ``.pt`` / ``.pth``)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

from udfc_ref.errors import ConversionError, FormatError, UDFCError

from .torch_common import torch_module, unwrap


def instantiate(module):
    """``module`` itself if it is an ``nn.Module``, else ``module()`` (a class
    or a zero-argument factory)."""
    torch = torch_module()
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
    raise ConversionError("expected a torch.nn.Module, a class or a zero-argument factory, got "
                          f"{type(module).__name__}")


def read_state_dict(weights_path) -> dict:
    """Read a plain PyTorch state_dict from .safetensors, or .pt/.pth/.bin
    (``torch.load(weights_only=True)``; a checkpoint dict holding
    ``state_dict`` or ``model`` is unpacked).  A common ``module.`` prefix
    (DataParallel) is stripped."""
    torch = torch_module()
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
    module = unwrap(module)
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
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
           if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConversionError(f"{weights_path}: tensor shapes differ from {type(module).__name__}: "
                              + ", ".join(bad[:6]))
    module.load_state_dict(sd, strict=False)
    return module


@contextlib.contextmanager
def _cwd_on_path():
    """The current directory first on ``sys.path`` for one import, as
    ``python -m`` has it (the installed ``udfc`` script does not)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def load_module_spec(spec: str, weights=None):
    """Build a module from ``"package.module:attr"`` or ``"path/file.py:attr"``.

    ``package.module`` is imported the way ``python -m`` finds it: the
    current directory comes first on ``sys.path`` for that import.  ``attr``
    (dotted attributes allowed) is a Module instance, or a class / factory
    called with no arguments.  With ``weights``, the state_dict file is
    loaded strictly (:func:`load_weights`).  Returns the module in eval mode.
    """
    torch_module()
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
            with _cwd_on_path():
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
    m = instantiate(obj)
    if weights is not None:
        load_weights(m, weights)
    return m.eval()


def export_state_dict(weights_path, module, path, input_shape, check: bool = True):
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

    Returns
    -------
    udfc_ref.Model
    """
    from udfc_ref.atomic import check_output_path  # noqa: PLC0415

    from .torch_import import export  # noqa: PLC0415

    check_output_path(path, inputs=(weights_path,))
    m = load_weights(instantiate(module), weights_path)
    return export(m, path, input_shape, check=check)
