"""Batched top-1 accuracy of a model on an ``.npz`` file (arrays ``x``, ``y``).

The ``.npz`` is read defensively: it must be a regular file and a zip archive
(not a bare ``.npy``), and the header of each member is checked before any
array is allocated - dtype, rank, and an element count (Python ints) that the
member's bytes can actually hold - so a corrupt or hostile header is a
FormatError, never a MemoryError or a pickle load.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from .atomic import open_input
from .errors import FormatError, UDFCError
from .progress import Progress

#: the most a DEFLATE stream can expand (1032:1, RFC 1951's 258-byte matches
#: coded in 2 bits); a member claiming more than this times its compressed
#: size is corrupt
MAX_DEFLATE_RATIO = 1032
_NPY_MAGIC = b"\x93NUMPY"


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, key: str):
    """(shape, dtype) of one ``.npy`` member, checked against the bytes the
    member holds; raises FormatError."""
    if info.compress_type == zipfile.ZIP_STORED:
        limit = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = info.compress_size * MAX_DEFLATE_RATIO
    else:
        raise FormatError(f"{path}: array {key!r} uses zip compression method {info.compress_type}; "
                          "write the file with numpy.savez or numpy.savez_compressed")
    if info.file_size > limit:
        raise FormatError(f"{path}: array {key!r} claims {info.file_size:,} bytes, more than its "
                          f"{info.compress_size:,} stored bytes can hold (corrupt file)")
    with zf.open(info) as m:
        try:
            version = np.lib.format.read_magic(m)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
            else:
                raise FormatError(f"{path}: array {key!r} is in .npy format version {version}, which udfc-ref "
                                  "does not read (1.0 or 2.0)")
        except UDFCError:
            raise
        except Exception as e:  # noqa: BLE001 - NumPy's header parser raises ValueError, SyntaxError, TokenError ...
            raise FormatError(f"{path}: array {key!r} has a corrupt .npy header ({type(e).__name__})") from None
        header_len = m.tell()
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise FormatError(f"{path}: array {key!r} has dtype {dtype}; expected plain numbers "
                          "(object arrays are never unpickled)")
    count = 1
    for d in shape:
        count *= d
    need = count * dtype.itemsize
    if header_len + need != info.file_size:
        raise FormatError(f"{path}: array {key!r} of shape {shape} {dtype} needs {need:,} bytes, the file "
                          f"holds {max(info.file_size - header_len, 0):,} (corrupt or truncated)")
    return shape, dtype


def _read_member(zf, info, path, key) -> np.ndarray:
    shape, dtype = _member_header(zf, info, path, key)
    try:
        with zf.open(info) as m:
            return np.lib.format.read_array(m, allow_pickle=False)
    except MemoryError:
        raise UDFCError(f"{path}: array {key!r} of shape {shape} {dtype} does not fit in memory") from None


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` (N, C, H, W) float and ``y`` (N,) int labels from an .npz file.

    Raises FormatError for anything else: a missing or non-regular file, a
    ``.npy`` instead of an ``.npz``, missing arrays, headers that disagree
    with the stored bytes, wrong dtypes or ranks, NaN/Inf in ``x``."""
    with open_input(path) as fh:
        path = os.fspath(path)
        if fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise FormatError(f"{path}: a .npy file (one array); udfc eval needs an .npz with arrays x and y "
                              "(numpy.savez(path, x=x, y=y))")
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                members = {}
                for key in ("x", "y"):
                    try:
                        members[key] = zf.getinfo(key + ".npy")
                    except KeyError:
                        have = ", ".join(n[:-4] if n.endswith(".npy") else n for n in zf.namelist()[:8])
                        raise FormatError(f"{path}: needs arrays 'x' and 'y', has {have or 'none'}") from None
                x = _read_member(zf, members["x"], path, "x")
                y = _read_member(zf, members["y"], path, "y")
        except UDFCError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise FormatError(f"{path}: cannot read as .npz ({msg})") from None
    if x.ndim != 4 or x.dtype.kind != "f":
        raise FormatError(f"{path}: 'x' must be a float (N, C, H, W) array, got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise FormatError(f"{path}: 'y' must be an int (N,) array matching x, got {y.dtype} {y.shape}")
    if not np.all(np.isfinite(x)):
        raise FormatError(f"{path}: 'x' holds NaN/Inf")
    return x, y


def check_labels(y: np.ndarray, n_classes: int, where: str = "labels") -> None:
    """Raise UDFCError unless every label lies in [0, n_classes): a label the
    model cannot output would silently count as wrong."""
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        bad = int(np.count_nonzero((y < 0) | (y >= n_classes)))
        raise UDFCError(f"{where}: {bad} of {y.size} labels lie outside the model's {n_classes} classes "
                        f"[0, {n_classes - 1}] (labels span [{lo}, {hi}])")


def top1(model, x, y, batch_size: int = 256, progress: bool = False) -> float:
    """Fraction of samples whose arg-max output equals the label.

    Parameters
    ----------
    model : Model with output (K,) logits (or any shape, flattened).
    x : (N, C, H, W) inputs.  y : (N,) int labels in [0, K).
    progress : draw a progress bar on a terminal when the work takes > 1 s.
    """
    if batch_size < 1:
        raise UDFCError(f"batch size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise UDFCError("no samples to evaluate")
    n_classes = int(np.prod(model.shapes[model.output_name]))
    check_labels(np.asarray(y), n_classes)
    correct = 0
    with Progress(n, "eval", enabled=None if progress else False) as bar:
        for i in range(0, n, batch_size):
            out = model.forward(x[i:i + batch_size])
            correct += int((out.reshape(out.shape[0], -1).argmax(1) == y[i:i + batch_size]).sum())
            bar.update(min(i + batch_size, n))
    return correct / n
