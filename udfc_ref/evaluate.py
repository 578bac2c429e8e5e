"""Batched top-1 accuracy of a model on an ``.npz`` file (arrays ``x``, ``y``)."""

from __future__ import annotations

import os

import numpy as np

from .errors import FormatError, UDFCError
from .progress import Progress


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` (N, C, H, W) float and ``y`` (N,) int labels from an .npz file."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise FormatError(f"{path}: needs arrays 'x' and 'y', has {', '.join(f.files) or 'none'}")
            x, y = f["x"], f["y"]
    except UDFCError:
        raise
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read as .npz ({e})") from None
    if x.ndim != 4 or x.dtype.kind != "f":
        raise FormatError(f"{path}: 'x' must be a float (N, C, H, W) array, got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise FormatError(f"{path}: 'y' must be an int (N,) array matching x, got {y.dtype} {y.shape}")
    if not np.all(np.isfinite(x)):
        raise FormatError(f"{path}: 'x' holds NaN/Inf")
    return x, y


def top1(model, x, y, batch_size: int = 256, progress: bool = False) -> float:
    """Fraction of samples whose arg-max output equals the label."""
    if batch_size < 1:
        raise UDFCError(f"batch size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise UDFCError("no samples to evaluate")
    correct = 0
    bar = Progress(n, "eval") if progress else None
    for i in range(0, n, batch_size):
        out = model.forward(x[i:i + batch_size])
        correct += int((out.reshape(out.shape[0], -1).argmax(1) == y[i:i + batch_size]).sum())
        if bar is not None:
            bar.update(min(i + batch_size, n))
    if bar is not None:
        bar.close()
    return correct / n
