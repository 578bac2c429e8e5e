"""The udfc-ref model file: one self-describing safetensors file.

See ``docs/format.md``.  ``__metadata__`` holds ``format = "udfc-ref"``,
``format_version = "1"``, the graph as JSON, the input description and, for
compressed models, the compression record and the quantization table.
Quantized weights are stored as integer codes (``<name>``; bit-packed uint8
for fewer than 8 bits), ``<name>_scale`` and, asymmetric only,
``<name>_zero_point``.
"""

from __future__ import annotations

import json
import os
import struct
import warnings

import numpy as np

from .atomic import check_input_file, check_output_path, open_input, write_bytes_atomic
from .checks import check_numbers
from .errors import FormatError, GraphError, NumericError, UDFCError
from .graph import Model, Node
from .quantize import VALID_BITS, QuantizedTensor, pack_codes, qrange, unpack_codes
from .tensors import Tensors

FORMAT = "udfc-ref"
FORMAT_VERSION = "1"
#: the safetensors format's own cap on the JSON header (``MAX_HEADER_SIZE`` in
#: huggingface/safetensors, safetensors/src/tensor.rs): the safetensors
#: library refuses larger headers too
MAX_HEADER = 100_000_000
#: tensors one header may describe: far above any CNN (ResNet-152 has ~900),
#: low enough that a hostile header of millions of empty tensors is refused
#: while it is parsed (about 60 MB of Python objects at the limit) instead of
#: costing gigabytes
MAX_TENSORS = 100_000
#: nodes of the graph (each costs ~1 kB once parsed); validation is linear, a
#: 1,000,000-node graph validates in seconds
MAX_NODES = 1_000_000
#: dimensions of one tensor (NumPy 1.x's own limit is 32; CNN tensors have <= 4)
MAX_RANK = 32
#: the compression record is a few levels deep; deeper nesting would make
#: copy.deepcopy / json.dumps hit the recursion limit later
MAX_RECORD_DEPTH = 32
_FLOAT_DTYPES = ("float16", "float32", "float64")


_ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
              "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64", "float64": "F64"}


def _chunks(model: Model) -> list:
    """The safetensors file as a list of buffers: the 8-byte header length,
    the JSON header (space-padded to a multiple of 8), then each tensor's
    little-endian bytes, contiguous, in the order of the header's offsets.
    The tensors are not copied (memoryviews of the arrays)."""
    used = {t for n in model.nodes for t in n.params.values()}
    out: dict[str, np.ndarray] = {}
    qtable = {}

    def put(name, arr, owner):
        # one name, one array: "__metadata__" is the header's own key, and a parameter literally named
        # like another one's "_scale" would silently replace it
        if name == "__metadata__" or name in out:
            raise FormatError(f"tensor name {name!r} (of {owner!r}) " + (
                "is reserved by the safetensors format" if name == "__metadata__" else
                "is used twice (a parameter has the name of a quantized tensor's scale or zero point)"))
        out[name] = arr

    for t in sorted(used):
        q = model.quant.get(t)
        if q is None:
            put(t, np.ascontiguousarray(model.tensors[t]), t)
            continue
        packed = q.bits < 8
        put(t, pack_codes(q.codes, q.bits, q.symmetric) if packed else np.ascontiguousarray(q.codes), t)
        put(t + "_scale", np.ascontiguousarray(q.scale), t)
        if q.zero_point is not None:
            put(t + "_zero_point", np.ascontiguousarray(q.zero_point), t)
        qtable[t] = {
            "bits": q.bits,
            "symmetric": q.symmetric,
            "per_channel": q.per_channel,
            "shape": list(q.codes.shape),
            "dtype": q.dtype,
            "packed": packed,
            "code_dtype": str(q.codes.dtype),
        }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graph": json.dumps(model.graph_json()),
        "input": json.dumps({"name": model.input_name, "shape": list(model.input_shape)}),
        "output": model.output_name,
    }
    if qtable:
        meta["quantization"] = json.dumps(qtable)
    if model.record is not None:
        meta["compression"] = json.dumps(model.record)
    header: dict = {"__metadata__": meta}
    bufs, offset = [], 0
    for name in sorted(out):
        arr = out[name]
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _ST_DTYPES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        bufs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return [struct.pack("<Q", len(hb)), hb] + bufs


def to_bytes(model: Model) -> bytes:
    """Serialise ``model`` to the bytes of a safetensors file."""
    return b"".join(_chunks(model))


def save(model: Model, path, *, input_path=None) -> None:
    """Write ``model`` to ``path`` atomically (temp file + rename).

    ``input_path``, when given, is refused as the output (inputs are never
    overwritten)."""
    check_output_path(path, inputs=(input_path,))
    check_numbers(model)  # never write NaN/Inf: the file would not load back
    write_bytes_atomic(path, _chunks(model), verify=lambda tmp: _check_reads_back(model, tmp, path))


def _check_reads_back(model: Model, tmp: str, path) -> None:
    """The complete temp file passes every check of :func:`load` and holds
    exactly the model's tensors; else NumericError/FormatError and nothing is
    written.

    Done as :func:`load` does it (same header, metadata, codes and dtype
    checks, the graph validated against the stored shapes) but one tensor at
    a time from the memory-mapped file, each compared bit for bit with the
    model's and its pages dropped again: no second copy of the model is ever
    in memory."""
    shown = path if isinstance(path, str) else os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header, header_len, nodes, inp, qtable, record, output = _parse(tmp)
            entries = dict(_entries(tmp, header))
            end = max((v["data_offsets"][1] for v in entries.values()), default=0)
            mapped = _Mapped(tmp, header_len, end)
            used = {t for n in nodes for t in n.params.values()}
            tensors = Tensors()
            held = set(model.tensors.held_as_codes()) if isinstance(model.tensors, Tensors) else set()
            for t in sorted(used):
                names = [k for k in (t, t + "_scale", t + "_zero_point") if k in entries]
                if t not in entries:
                    continue  # Model() below names the missing tensor
                raw = {k: mapped.array(entries[k]) for k in names}
                if t in held and t in qtable:  # held as codes: the codes are compared, nothing is dequantized
                    q = model.tensors.codes(t)
                    back = _quantized(tmp, t, qtable[t], raw)
                    if not back.same_as(q):
                        raise NumericError(f"{shown}: tensor {t!r} does not read back bit-identical; nothing was "
                                           "written")
                    if not back.finite():  # what load's check of the values would refuse
                        raise NumericError(f"{shown}: tensor {t!r} holds NaN/Inf values; nothing was written")
                    tensors.hold_codes(t, q)  # stands for it in the graph check below
                    del raw, back
                else:
                    back, _ = _parameter(tmp, t, raw, qtable, nodes)
                    a = model.tensors.get(t)
                    if a is None or a.shape != back.shape or a.dtype != back.dtype or not _same_bits(a, back):
                        raise NumericError(f"{shown}: tensor {t!r} does not read back bit-identical; nothing was "
                                           "written")
                    tensors[t] = a
                    del raw, back, a
                for k in names:
                    mapped.drop(entries[k])
            Model(tensors, nodes, input_name=inp["name"], input_shape=inp["shape"], output_name=output,
                  record=record)
    except UDFCError as e:
        msg = str(e).replace(tmp, shown)
        if "nothing was written" in msg:
            raise type(e)(msg) from None
        raise type(e)(f"the model would not load back, nothing was written: {msg}") from None
    if used != {t for n in model.nodes for t in n.params.values()}:
        raise NumericError(f"{shown}: the stored graph does not use the model's tensors; nothing was written")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two arrays of one dtype and shape (no copies when contiguous)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)
#: every safetensors dtype -> its size in bytes
_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "F32": 4, "U32": 4,
                       "I32": 4, "F64": 8, "U64": 8, "I64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
#: NumPy cannot describe an array of more bytes (counting zero-length axes as 1)
_MAX_ARRAY_BYTES = 2**63 - 1


class _JSONLimit(Exception):
    """Raised inside json.loads by :func:`_strict_json` (never escapes io)."""


def _strict_json(text, max_objects: int):
    """``json.loads`` refusing an object with a repeated key (which value
    wins is undefined; the safetensors library refuses such headers) and
    stopping as soon as more than ``max_objects`` objects were parsed (the
    memory of the parse stays bounded).  Raises _JSONLimit with a reason."""
    count = 0

    def pairs(items):
        nonlocal count
        count += 1
        if count > max_objects:
            raise _JSONLimit(f"more than {max_objects:,} JSON objects")
        d = dict(items)
        if len(d) != len(items):
            seen = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))
            raise _JSONLimit(f"the key {dup!r} twice in one object")
        return d

    return json.loads(text, object_pairs_hook=pairs)


def _element_count(shape) -> tuple[int, int]:
    """(elements, elements ignoring zero-length axes), as Python ints (no overflow)."""
    n = nz = 1
    for d in shape:
        n *= d
        nz *= max(d, 1)
    return n, nz


def _read_header(path) -> tuple[dict, int]:
    """Parse and sanity-check the safetensors header ourselves, so a corrupt
    file fails with a message before any tensor is read: size limits, no
    repeated keys, string metadata, and for every tensor in-file offsets, a
    known dtype, a shape of at most MAX_RANK sizes whose byte size (computed
    with Python ints) matches the offsets."""
    try:
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes): truncated "
                                  "or not a safetensors file")
            if n > MAX_HEADER:
                raise FormatError(f"{path}: safetensors header of {n:,} bytes exceeds the format's limit of "
                                  f"{MAX_HEADER:,} bytes")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = _strict_json(raw.decode("utf-8"), MAX_TENSORS + 2)
    except _JSONLimit as e:
        reason = str(e)
        if reason.startswith("more than"):
            raise FormatError(f"{path}: the safetensors header describes more than {MAX_TENSORS:,} tensors "
                              "(corrupt or hostile file)") from None
        raise FormatError(f"{path}: the safetensors header has {reason} (ambiguous; the safetensors library "
                          "refuses such files too)") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError(f"{path}: the safetensors header is not valid JSON (garbage header)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None:
        if not isinstance(meta, dict):
            raise FormatError(f"{path}: '__metadata__' is not a JSON object")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise FormatError(f"{path}: metadata field {k!r} is not a string (safetensors metadata maps "
                                  "strings to strings)")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict):
            raise FormatError(f"{path}: header entry of tensor {k!r} is not a JSON object")
        off, shape, dt = v.get("data_offsets"), v.get("shape"), v.get("dtype")
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)):
            raise FormatError(f"{path}: tensor {k!r} has no valid data_offsets")
        if off[0] < 0 or off[1] < off[0] or off[1] > data_len:
            raise FormatError(f"{path}: tensor {k!r} lies beyond the end of the file (truncated?)")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{path}: tensor {k!r} has an invalid shape {str(shape)[:80]}")
        if len(shape) > MAX_RANK:
            raise FormatError(f"{path}: tensor {k!r} has {len(shape)} dimensions (at most {MAX_RANK})")
        if dt not in _SAFETENSORS_DTYPES:
            raise FormatError(f"{path}: tensor {k!r} has an unknown dtype {str(dt)[:20]!r}")
        count, nonzero = _element_count(shape)
        itemsize = _SAFETENSORS_DTYPES[dt]
        if nonzero * itemsize > _MAX_ARRAY_BYTES:
            raise FormatError(f"{path}: tensor {k!r} has shape {str(shape)[:80]}, larger than any array can be "
                              "(corrupt or hostile file)")
        if count * itemsize != off[1] - off[0]:
            raise FormatError(f"{path}: tensor {k!r} has {off[1] - off[0]} bytes, but shape {shape} of "
                              f"{dt} needs {count * itemsize}")
    return header, n


def _depth(obj) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        items = o.values() if isinstance(o, dict) else o if isinstance(o, list) else ()
        nested = [v for v in items if isinstance(v, (dict, list))]  # scalars end at depth d + 1
        if nested:
            stack.extend((v, d + 1) for v in nested)
        elif items:
            deepest = max(deepest, d + 1)
    return deepest


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


#: the fields of the compression record udfc-ref writes (docs/format.md) and
#: what each must be; other fields are kept as they are (provenance only)
_RECORD_FIELDS = {
    "method": ("a string", lambda v: isinstance(v, str)),
    "criterion": ("a string", lambda v: isinstance(v, str)),
    "prune_ratio": ("a number", _is_number),
    "alpha1": ("a number", _is_number),
    "alpha2": ("a number", _is_number),
    "weight_bits": ("an int, null or 'auto'", lambda v: v is None or v == "auto" or _is_int(v)),
    "prune_coupled": ("true or false", lambda v: isinstance(v, bool)),
    "budget": ("an object with target (a string), fraction, achieved and predicted (numbers)",
               lambda v: isinstance(v, dict) and isinstance(v.get("target"), str)
               and all(_is_number(v.get(k)) for k in ("fraction", "achieved", "predicted"))),
    "min_keep": ("an int", _is_int),
    "per_tensor": ("true or false", lambda v: isinstance(v, bool)),
    "asymmetric": ("true or false", lambda v: isinstance(v, bool)),
    "mse_clip": ("true or false", lambda v: isinstance(v, bool)),
    "bias_correction": ("true or false", lambda v: isinstance(v, bool)),
    "skip": ("a list of layer names", _str_list),
    "unpruned": ("an object mapping layer names to reasons",
                 lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
    "calibration": ("an object {'mode': str, 'images': int}",
                    lambda v: isinstance(v, dict) and isinstance(v.get("mode"), str) and _is_int(v.get("images"))),
}
#: per-layer entries of ``layers`` and ``quantized``
_RECORD_ENTRY_FIELDS = {
    "layers": {"channels_before": ("an int", _is_int), "channels_after": ("an int", _is_int),
               "kept": ("a list of ints", _int_list), "depthwise": ("a string", lambda v: isinstance(v, str)),
               "prune_ratio": ("a number", _is_number), "group": ("a string", lambda v: isinstance(v, str)),
               "groups": ("an int", _is_int), "refit": ("a list of layer names", _str_list),
               "selection": ("a string", lambda v: isinstance(v, str)),
               "se": ("an object {'squeeze': name, 'excite': name}",
                      lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("squeeze", "excite")))},
    "quantized": {"tensor": ("a string", lambda v: isinstance(v, str)), "bits": ("an int", _is_int),
                  "symmetric": ("true or false", lambda v: isinstance(v, bool)),
                  "per_channel": ("true or false", lambda v: isinstance(v, bool))},
}


def _check_record(record: dict, path) -> None:
    """Raise FormatError unless every field of the compression record that
    udfc-ref defines has its documented type (readers such as ``udfc info``
    rely on them); unknown fields are allowed."""
    where = f"{path}: metadata 'compression'"
    for key, (what, ok) in _RECORD_FIELDS.items():
        if key in record and not ok(record[key]):
            raise FormatError(f"{where}: {key!r} must be {what}, got {type(record[key]).__name__}")
    for key, fields in _RECORD_ENTRY_FIELDS.items():
        if key not in record:
            continue
        entries = record[key]
        if not isinstance(entries, dict):
            raise FormatError(f"{where}: {key!r} must be an object mapping layer names to objects, "
                              f"got {type(entries).__name__}")
        for layer, e in entries.items():
            if not isinstance(e, dict):
                raise FormatError(f"{where}: {key}[{layer!r}] must be an object, got {type(e).__name__}")
            for f, (what, ok) in fields.items():
                if f in e and not ok(e[f]):
                    raise FormatError(f"{where}: {key}[{layer!r}][{f!r}] must be {what}, "
                                      f"got {type(e[f]).__name__}")


def _json_field(meta, key, path, default=None, max_objects: int = MAX_TENSORS + 2):
    if key not in meta:
        if default is not None:
            return default
        raise FormatError(f"{path}: metadata field {key!r} is missing")
    try:
        return _strict_json(meta[key], max_objects)
    except _JSONLimit as e:
        raise FormatError(f"{path}: metadata field {key!r} has {e}") from None
    except (TypeError, ValueError, RecursionError):
        raise FormatError(f"{path}: metadata field {key!r} is not valid JSON") from None


_NP_DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
              "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


def _entries(path, header: dict) -> list:
    """The header's tensor entries sorted by offset, checked not to overlap
    and to have a dtype udfc-ref reads; returns [(name, entry)]."""
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    end = 0
    for k, v in entries:
        start, stop = v["data_offsets"]
        if start < end:
            raise FormatError(f"{path}: tensor {k!r} overlaps the tensor before it in the file")
        end = stop
        if v["dtype"] not in _NP_DTYPES:
            raise FormatError(f"{path}: tensor {k!r} has dtype {v['dtype']}, which udfc-ref does not read")
    return entries


class _Mapped:
    """The data section of a safetensors file, memory-mapped: the tensors are
    views of the file's pages, no copy in memory.  The map is private
    (copy-on-write, ``writable=True``: a write into a tensor copies that page
    for this process only) or read-only; the file is never written through
    it.  :meth:`drop` (read-only maps only) returns a range's pages to the page
    cache; they are read again if touched."""

    def __init__(self, path, header_len: int, end: int, writable: bool = False):
        import mmap

        self.base = 8 + header_len
        self.map = None
        self.writable = writable
        try:
            with open_input(path) as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.base + end:
                    raise FormatError(f"{path}: the file ended while reading tensor data (truncated?)")
                if size > 0:
                    self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
        except OSError as e:
            raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None

    def array(self, entry: dict) -> np.ndarray:
        start, stop = entry["data_offsets"]
        dt = np.dtype(_NP_DTYPES[entry["dtype"]])
        if stop == start:
            return np.zeros(entry["shape"], dtype=dt.newbyteorder("="))
        arr = np.frombuffer(self.map, dtype=dt, count=(stop - start) // dt.itemsize, offset=self.base + start)
        return arr.reshape(entry["shape"]).astype(dt.newbyteorder("="), copy=False)

    def drop(self, entry: dict) -> None:
        start, stop = entry["data_offsets"]
        self.drop_range(self.base + start, self.base + stop)

    def drop_range(self, start: int, stop: int) -> None:
        """Drop the pages lying wholly inside [start, stop) of the map (read-only maps only)."""
        import mmap

        if self.map is None or self.writable or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, stop // page * page
        if hi <= lo:
            return
        try:
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # pragma: no cover - advice only
            pass


def release_pages(arrays) -> None:
    """Give the memory pages of ``arrays`` back to the page cache when they
    are views of a file :func:`load` mapped read-only (``writable=False``):
    the process's resident memory shrinks, and a later read of the array
    reads the file again (same values).  A no-op for any other array."""
    import mmap

    for a in arrays:
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if not isinstance(base, mmap.mmap) or not a.size:
            continue
        m = _MAPS.get(id(base))
        if m is None or m.map is not base or m.writable:
            continue
        start = a.__array_interface__["data"][0] - _address(base)
        m.drop_range(start, start + a.nbytes)


def _address(mm) -> int:
    """Start address of an mmap object's memory."""
    return np.frombuffer(mm, dtype=np.uint8, count=1).__array_interface__["data"][0]


#: id(mmap) -> its _Mapped, for the read-only maps of loaded models (release_pages)
_MAPS: dict = {}


def _read_tensors(path, header: dict, header_len: int, wanted=None, writable: bool = True) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file whose header :func:`_read_header`
    checked (offsets, shapes and byte sizes agree), as views of the privately
    memory-mapped file (no copy of the weights in memory; writing into an
    array copies its page and never reaches the file).  Only the names in
    ``wanted`` (default: all) become arrays; every entry is still checked."""
    entries = _entries(path, header)
    end = entries[-1][1]["data_offsets"][1] if entries else 0
    mapped = _Mapped(path, header_len, end, writable=writable)
    if not writable and mapped.map is not None:
        import weakref

        key = id(mapped.map)
        _MAPS[key] = mapped
        weakref.finalize(mapped.map, _MAPS.pop, key, None)
    return {k: mapped.array(v) for k, v in entries if wanted is None or k in wanted}


def _quantized(path, t, q, raw) -> QuantizedTensor:
    """Rebuild one quantized tensor from its table entry and stored arrays,
    checking that table and codes agree (FormatError otherwise)."""
    if not isinstance(q, dict):
        raise FormatError(f"{path}: quantization entry of {t!r} is not a JSON object")
    try:
        bits, sym, pc, shape, dtype, packed = (q[k] for k in ("bits", "symmetric", "per_channel", "shape", "dtype",
                                                               "packed"))
    except KeyError as e:
        raise FormatError(f"{path}: quantization entry of {t!r} lacks {e.args[0]!r}") from None
    if type(bits) is not int or bits not in VALID_BITS:
        raise FormatError(f"{path}: quantization entry of {t!r} has bits={bits!r} (must be 2..8 or 16)")
    if dtype not in _FLOAT_DTYPES:
        raise FormatError(f"{path}: quantization entry of {t!r} has dtype={dtype!r} (must be one of "
                          f"{', '.join(_FLOAT_DTYPES)})")
    if not all(isinstance(b, bool) for b in (sym, pc, packed)):
        raise FormatError(f"{path}: quantization entry of {t!r}: symmetric, per_channel and packed must be booleans")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(type(d) is int and d >= 1 for d in shape)):
        raise FormatError(f"{path}: quantization entry of {t!r} has an invalid shape {shape!r}")
    shape = tuple(shape)
    if packed != (bits < 8):
        raise FormatError(f"{path}: quantization entry of {t!r}: packed={packed} but bits={bits} "
                          "(codes are bit-packed exactly when bits < 8)")
    if t not in raw or t + "_scale" not in raw:
        raise FormatError(f"{path}: quantized tensor {t!r} lacks its codes or {t + '_scale'!r}")
    codes = raw.pop(t)
    scale = raw.pop(t + "_scale")
    zp = raw.pop(t + "_zero_point", None)
    qmin, qmax = qrange(bits, sym)
    n = 1
    for d in shape:
        n *= d
    if packed:
        need = -(-n * bits // 8)
        if codes.dtype != np.uint8 or codes.ndim != 1 or codes.size != need:
            raise FormatError(f"{path}: quantized tensor {t!r}: {bits}-bit codes of shape {shape} must be packed into "
                              f"{need} uint8 bytes, the file holds {codes.dtype} {codes.shape}")
        codes = unpack_codes(codes, bits, sym, shape)
    elif tuple(codes.shape) != shape or codes.dtype.kind not in "iu":
        raise FormatError(f"{path}: quantized tensor {t!r}: codes of shape {codes.shape} {codes.dtype}, "
                          f"expected {shape} integers")
    if codes.size and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise FormatError(f"{path}: quantized tensor {t!r}: codes span [{int(codes.min())}, {int(codes.max())}], "
                          f"outside the {bits}-bit {'symmetric' if sym else 'asymmetric'} range [{qmin}, {qmax}]")
    nsc = shape[0] if pc else 1
    if scale.shape != (nsc,) or scale.dtype.kind != "f":
        raise FormatError(f"{path}: {t + '_scale'!r} must be a float array of shape ({nsc},), "
                          f"got {scale.dtype} {scale.shape}")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise FormatError(f"{path}: {t + '_scale'!r} must hold finite positive scales")
    if sym and zp is not None:
        raise FormatError(f"{path}: symmetric tensor {t!r} must not have {t + '_zero_point'!r}")
    if not sym:
        if zp is None:
            raise FormatError(f"{path}: asymmetric tensor {t!r} lacks {t + '_zero_point'!r}")
        if zp.shape != (nsc,) or zp.dtype.kind not in "iu":
            raise FormatError(f"{path}: {t + '_zero_point'!r} must be an integer array of shape ({nsc},), "
                              f"got {zp.dtype} {zp.shape}")
        if zp.size and (int(zp.min()) < qmin or int(zp.max()) > qmax):
            raise FormatError(f"{path}: {t + '_zero_point'!r} lies outside the code range [{qmin}, {qmax}]")
    return QuantizedTensor(codes, scale, zp, bits, sym, pc, dtype)


def _parse(path):
    """Header and metadata of a udfc-ref file, checked as :func:`load` checks
    them: ``(header, header_len, nodes, inp, qtable, record, output)``."""
    header, header_len = _read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: no udfc-ref metadata (is this a plain safetensors weights file? "
                          "import it with 'udfc import torch' first)")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                          f"(this udfc-ref reads version {FORMAT_VERSION})")
    graph = _json_field(meta, "graph", path, max_objects=3 * MAX_NODES + 1)  # a node holds <= 3 objects
    inp = _json_field(meta, "input", path)
    qtable = _json_field(meta, "quantization", path, default={})
    record = _json_field(meta, "compression", path, default={}) or None
    output = meta.get("output")
    if not isinstance(graph, list):
        raise FormatError(f"{path}: metadata 'graph' must be a JSON list of nodes")
    if len(graph) > MAX_NODES:
        raise FormatError(f"{path}: metadata 'graph' has {len(graph):,} nodes (at most {MAX_NODES:,})")
    if not (isinstance(inp, dict) and isinstance(inp.get("name"), str) and isinstance(inp.get("shape"), list)
            and len(inp["shape"]) == 3 and all(type(s) is int and s > 0 for s in inp["shape"])):
        raise FormatError(f"{path}: metadata 'input' must be {{\"name\": str, \"shape\": [C, H, W]}} with positive "
                          "int sizes")
    if not isinstance(qtable, dict):
        raise FormatError(f"{path}: metadata 'quantization' must be a JSON object")
    if record is not None and not isinstance(record, dict):
        raise FormatError(f"{path}: metadata 'compression' must be a JSON object")
    if record is not None and _depth(record) > MAX_RECORD_DEPTH:
        raise FormatError(f"{path}: metadata 'compression' is nested deeper than {MAX_RECORD_DEPTH} levels")
    if record is not None:
        _check_record(record, path)
    if output is not None and not isinstance(output, str):
        raise FormatError(f"{path}: metadata 'output' must be a value name")
    try:
        nodes = [Node.from_json(d, i) for i, d in enumerate(graph)]
    except GraphError as e:
        raise GraphError(f"{path}: {e}") from None
    return header, header_len, nodes, inp, qtable, record, output


def _parameter(path, t, raw, qtable, nodes):
    """Parameter ``t`` as :func:`load` returns it, from the stored arrays
    ``raw`` (its entries are consumed): ``(array, QuantizedTensor or None)``.
    A quantized tensor is rebuilt from its codes (a new array); a float one is
    the stored array itself (a view of the mapped file, copied only when not
    aligned)."""
    if t in qtable:
        qt = _quantized(path, t, qtable[t], raw)
        return qt.dequantize(), qt
    v = raw.pop(t)
    if v.dtype.name not in _FLOAT_DTYPES:
        role = next(f"node {n.name!r}, {r}" for n in nodes for r, x in n.params.items() if x == t)
        raise FormatError(f"{path}: tensor {t!r} ({role}) has dtype {v.dtype}; parameters must be "
                          "float16/32/64 (or listed in the quantization table)")
    return np.require(v, requirements=["C", "A"]), None


def load(path, *, writable: bool = True) -> Model:
    """Read a udfc-ref model file (never modifies it).

    The file is memory-mapped privately: float parameters are views of its
    pages (read from disk as they are touched; a write into one copies the
    page and never reaches the file), quantized ones are rebuilt from their
    codes.  ``writable=False`` maps it read-only instead: the float tensors
    cannot be written into, and :func:`release_pages` can give their memory
    back once they are read (``udfc compress`` does, layer by layer).  Every
    problem with the file raises a
    :class:`UDFCError` subclass (FormatError, GraphError, NumericError)
    naming the tensor or node; tensors the graph does not use are dropped
    with a ``UserWarning``."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise FormatError(f"{path!r} is not a file path") from None
    check_input_file(path)
    header, header_len, nodes, inp, qtable, record, output = _parse(path)
    used = {t for n in nodes for t in n.params.values()}
    aux = {t + s for t in qtable if t in used for s in ("_scale", "_zero_point")}
    raw = _read_tensors(path, header, header_len, wanted=used | aux, writable=writable)  # only used tensors
    tensors, quant = {}, {}
    for t in qtable:
        if t in used:  # the arrays of an unused one stay in ``raw`` and are reported as unused below
            tensors[t], quant[t] = _parameter(path, t, raw, qtable, nodes)
    extra = sorted(set(header) - used - aux - {"__metadata__"})
    for k in sorted(used & set(raw)):
        tensors[k], _ = _parameter(path, k, raw, {}, nodes)
    try:
        model = Model(tensors, nodes, input_name=inp["name"], input_shape=inp["shape"],
                      output_name=output, record=record, quant=quant)
        check_numbers(model)
    except UDFCError as e:
        raise type(e)(f"{path}: {e}") from None
    if extra:  # warned only for a file that loads: a failing file gets its one error, nothing else
        names = ", ".join(repr(k) if not k.isprintable() else k for k in extra[:5])
        warnings.warn(f"{path}: {len(extra)} tensor(s) not used by the graph are ignored: {names}"
                      + (" ..." if len(extra) > 5 else ""), UserWarning, stacklevel=2)
    return model
