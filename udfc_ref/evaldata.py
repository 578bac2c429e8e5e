"""Evaluation data read in place: memory-mapped ``x`` / ``y`` arrays.

``udfc sweep`` evaluates every grid cell on a test set that may be larger
than one worker's memory, so the samples are never loaded whole.  Two
layouts are accepted:

* an ``.npz`` file with members ``x.npy`` and ``y.npy``.  A member written
  *uncompressed* (``np.savez``) is memory-mapped at its byte offset inside the
  zip file (the zip local header and the ``.npy`` header are parsed here;
  ``np.load`` cannot map a member of an ``.npz``).  A *compressed* member
  (``np.savez_compressed``) cannot be mapped: it is decompressed whole into
  memory once per process and cached;
* a directory holding ``x.npy`` and ``y.npy``, both memory-mapped.

``x`` is (N, C, H, W) float, ``y`` (N,) int.  The labels are always read
whole (8 bytes a sample).  Non-finite inputs are detected batch by batch as
the samples are read (:func:`read_batch`), not by a pass over the whole file.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import FormatError

#: files up to this size are hashed whole; larger ones are fingerprinted by samples
FULL_HASH_BYTES = 256 * 1024 * 1024
_SAMPLE_BYTES = 1024 * 1024
_N_SAMPLES = 64


class DataError(FormatError):
    """The evaluation data is unreadable or holds unusable values.  A data
    error is never a per-cell failure: it stops the whole sweep."""


@dataclass
class EvalData:
    """An opened test set.

    Attributes
    ----------
    path : str
        The ``.npz`` file or the directory.
    x : array-like, shape (N, C, H, W), float
        A ``np.memmap`` (or, for a compressed ``.npz`` member, an in-memory array).
    y : np.ndarray, shape (N,), int
    mapped : bool
        Whether ``x`` is memory-mapped.
    """

    path: str
    x: object
    y: np.ndarray
    mapped: bool

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * int(self.x.dtype.itemsize)


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, "x.npy"), os.path.join(path, "y.npy")]
    return [path]


def _npz_member(path: str, zf: zipfile.ZipFile, name: str):
    """Memory-map member ``name`` of the open zip ``zf`` (an .npz) when it is
    stored uncompressed; return None when it must be decompressed."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{path}: member {name!r}: bad zip local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len  # the local extra field may differ from the central one
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None  # another .npy version: let np.load read it
        except ValueError as e:
            raise DataError(f"{path}: member {name!r} is not a .npy array ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: member {name!r} holds Python objects; only numeric arrays are read")
    if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
        raise DataError(f"{path}: member {name!r} is truncated")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def _open_npz(path: str):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "x.npy" not in names or "y.npy" not in names:
                have = ", ".join(n[:-4] if n.endswith(".npy") else n for n in names) or "none"
                raise DataError(f"{path}: needs arrays 'x' and 'y', has {have}")
            x = _npz_member(path, zf, "x.npy")
            y = _npz_member(path, zf, "y.npy")
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: cannot read as .npz ({e}); a test set is an .npz with arrays x, y or a directory "
                        "with x.npy, y.npy") from None
    mapped = x is not None
    if x is None or y is None:
        try:
            with np.load(path, allow_pickle=False) as f:
                if x is None:
                    x = f["x"]
                if y is None:
                    y = f["y"]
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot read as .npz ({e})") from None
    return x, y, mapped


def _open_dir(path: str):
    out = []
    for name in ("x.npy", "y.npy"):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise DataError(f"{path}: a data directory needs x.npy and y.npy; {name} is missing")
        try:
            out.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: cannot read as .npy ({e})") from None
    return out[0], out[1], True


def open_data(path) -> EvalData:
    """Open and check a test set without reading its samples.

    Parameters
    ----------
    path : str
        An ``.npz`` file (members ``x``, ``y``) or a directory with ``x.npy``
        and ``y.npy``.

    Raises
    ------
    DataError
        Missing file or array, wrong rank / dtype, labels not matching ``x``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        x, y, mapped = _open_dir(path)
    elif os.path.isfile(path):
        x, y, mapped = _open_npz(path)
    else:
        raise DataError(f"{path}: no such file or directory (the test set: an .npz with x, y or a directory "
                        "with x.npy, y.npy)")
    if x.ndim != 4 or x.dtype.kind != "f":
        raise DataError(f"{path}: 'x' must be a float (N, C, H, W) array, got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise DataError(f"{path}: 'y' must be an int (N,) array matching x, got {y.dtype} {y.shape}")
    if y.shape[0] == 0:
        raise DataError(f"{path}: holds no samples")
    return EvalData(path, x, np.array(y), mapped)


_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def open_cached(path) -> EvalData:
    """:func:`open_data`, cached per process (2 entries) by path, size and
    modification time: a worker running many evaluation tasks parses the
    headers (or decompresses a compressed member) once."""
    path = os.fspath(path)
    try:
        stamp = tuple((os.path.getsize(f), os.stat(f).st_mtime_ns) for f in _files_of(path))
    except OSError:
        stamp = None
    key = (path, stamp)
    with _LOCK:
        if stamp is not None and key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    data = open_data(path)
    with _LOCK:
        _CACHE[key] = data
        while len(_CACHE) > 2:
            _CACHE.popitem(last=False)
    return data


def read_batch(data: EvalData, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start:stop`` as in-memory arrays; raise DataError naming the
    sample range when ``x`` holds NaN/Inf there."""
    x = np.ascontiguousarray(data.x[start:stop])
    if not np.all(np.isfinite(x)):
        bad = start + int(np.nonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))[0][0])
        raise DataError(f"{data.path}: 'x' holds NaN/Inf (sample {bad})")
    return x, data.y[start:stop]


def fingerprint(path) -> str:
    """A content hash of the test set, for the resume key of ``udfc sweep``.

    ``sha256:<hex>`` of the bytes when the file(s) total at most
    :data:`FULL_HASH_BYTES`; otherwise ``sampled-sha256:<hex>`` of the size
    plus 64 evenly spaced 1 MiB blocks (first and last included) of each
    file: reading a 30 GB test set whole just to name it would cost as much
    as evaluating a cell.  A change outside the sampled blocks that keeps the
    size is not seen; delete the result file (or use another) after editing
    a large test set in place."""
    files = _files_of(os.fspath(path))
    try:
        sizes = [os.path.getsize(f) for f in files]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    h = hashlib.sha256()
    full = sum(sizes) <= FULL_HASH_BYTES
    for f, size in zip(files, sizes):
        h.update(struct.pack("<Q", size))
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                for off in np.linspace(0, max(size - _SAMPLE_BYTES, 0), _N_SAMPLES).astype(np.int64):
                    fh.seek(int(off))
                    h.update(fh.read(_SAMPLE_BYTES))
    return ("sha256:" if full else "sampled-sha256:") + h.hexdigest()
