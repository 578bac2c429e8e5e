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
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .atomic import check_input_file, open_input
from .errors import FormatError, UDFCError
from .evaluate import _member_header

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


def _npz_member(path: str, fh, zf: zipfile.ZipFile, key: str):
    """Member ``key`` of the open .npz ``zf``: checked like ``udfc eval``
    checks it (``evaluate._member_header``: compression method, header,
    dtype, size), then memory-mapped at its byte offset when it is stored
    uncompressed, else decompressed whole."""
    info = zf.getinfo(key + ".npy")
    shape, dtype = _member_header(zf, info, path, key)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        with zf.open(info) as m:
            return np.lib.format.read_array(m, allow_pickle=False), False
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise DataError(f"{path}: array {key!r}: bad zip local header (corrupt file)")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    # the local extra field may differ from the central directory's
    start = info.header_offset + 30 + name_len + extra_len
    fh.seek(start)
    # checked above (version 1.0 or 2.0); read again here only for the memory order
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    fortran = read(fh)[1]
    need = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    offset = start + info.file_size - need
    if need == 0:
        return np.zeros(shape, dtype), True
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                     order="F" if fortran else "C"), True


def read_npz(path: str, members: tuple, npy_hint: str, missing: str, read_hint: str) -> dict:
    """The arrays ``members`` of the ``.npz`` file ``path``, each checked by
    :func:`_npz_member` (regular file, header against bytes, plain numbers,
    never unpickled; memory-mapped when stored uncompressed).

    Returns ``{name: (array, mapped)}``.  Every failure is a DataError whose
    message ends in the caller's hint: ``npy_hint`` for a bare ``.npy``,
    ``missing`` + the members the file has, ``read_hint`` for an unreadable
    zip."""
    with open_input(path) as fh:  # a regular file: never block on a FIFO
        if fh.read(6) == b"\x93NUMPY":
            raise DataError(f"{path}: a .npy file (one array); {npy_hint}")
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                names = zf.namelist()
                if any(f"{m}.npy" not in names for m in members):
                    have = ", ".join(n[:-4] if n.endswith(".npy") else n for n in names[:8]) or "none"
                    raise DataError(f"{path}: {missing}{have}")
                return {m: _npz_member(path, fh, zf, m) for m in members}
        except DataError:
            raise
        except UDFCError as e:  # the member checks raise FormatError: a data error here
            raise DataError(str(e)) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise DataError(f"{path}: cannot read as .npz ({msg}); {read_hint}") from None


def _open_npz(path: str):
    arrays = read_npz(path, ("x", "y"),
                      "a test set is an .npz with arrays x and y (numpy.savez(path, x=x, y=y)) or a directory "
                      "with x.npy and y.npy", "needs arrays 'x' and 'y', has ",
                      "a test set is an .npz with arrays x, y or a directory with x.npy, y.npy")
    (x, mapped), (y, _) = arrays["x"], arrays["y"]
    return x, y, mapped


def _open_dir(path: str):
    out = []
    for name in ("x.npy", "y.npy"):
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise DataError(f"{path}: a data directory needs x.npy and y.npy; {name} is missing")
        check_input_file(p)  # a regular file: never block on a FIFO
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - NumPy's header parser raises ValueError, SyntaxError, ...
            raise DataError(f"{p}: cannot read as .npy ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
                from None
        if not isinstance(a, np.ndarray) or a.dtype.hasobject or a.dtype.names is not None:
            raise DataError(f"{p}: expected an array of plain numbers")
        out.append(a)
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
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory (the test set: an .npz with x, y or a directory "
                        "with x.npy, y.npy)")
    try:
        x, y, mapped = _open_dir(path) if os.path.isdir(path) else _open_npz(path)
    except DataError:
        raise
    except UDFCError as e:  # the checks shared with ``udfc eval`` raise FormatError: a data error here
        raise DataError(str(e)) from None
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
