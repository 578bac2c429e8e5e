"""Helpers shared by the PyTorch converter modules (``torch_import``,
``torch_ops``, ``torch_export``, ``torch_weights``).

PyTorch is imported lazily (:func:`torch_module`): every module of the
converter imports without it, and a missing PyTorch is one
:class:`~udfc_ref.errors.ConversionError` naming the extra to install.
"""

from __future__ import annotations

import numpy as np

from udfc_ref.errors import ConversionError

#: relative tolerance of the checks run after every conversion, in both
#: directions (max |diff| / max |reference output|)
CHECK_RTOL = 1e-3
#: extra file of an exported ``.pt2`` (or TorchScript) archive holding, as JSON,
#: ``{name in the module: original tensor name}`` for names that were not safe
#: attribute paths (see ``converters/names.py``); data, never code
NAMES_FILE = "udfc_names.json"


def torch_module():
    """``import torch`` or a ConversionError saying how to install it."""
    try:
        import torch  # noqa: PLC0415
        import torch.export  # noqa: F401, PLC0415
        import torch.fx  # noqa: F401, PLC0415
    except ImportError:
        raise ConversionError("PyTorch is not installed; install it with: pip install 'udfc-ref[torch]'") from None
    return torch


def parse_shape(input_shape) -> tuple[int, int, int]:
    """``"3,32,32"`` / ``"3x32x32"`` / ``(3, 32, 32)`` -> (C, H, W)."""
    try:
        if isinstance(input_shape, str):
            input_shape = [int(s) for s in input_shape.replace("x", ",").split(",") if s.strip()]
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ConversionError(f"input shape must be C,H,W (e.g. 3,224,224), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConversionError(f"input shape must be three positive sizes C,H,W (no batch axis), got {input_shape!r}")
    return shape


def unwrap(module):
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` wrappers."""
    torch = torch_module()
    while isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def param_dtype(module):
    """The floating dtype of the module's first floating parameter (float32 if none)."""
    torch = torch_module()
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref| (inf when the shapes differ or a value is not finite)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = max(float(np.abs(ref).max()), 1e-12) if ref.size else 1.0
    err = float(np.abs(got - ref).max()) / scale if ref.size else 0.0
    return err if np.isfinite(err) else float("inf")
