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

from .atomic import check_output_path, write_bytes_atomic
from .checks import check_numbers
from .errors import FormatError, GraphError, UDFCError
from .graph import Model, Node
from .quantize import QuantizedTensor, dequantize, pack_codes, unpack_codes

FORMAT = "udfc-ref"
FORMAT_VERSION = "1"
MAX_HEADER = 100 * 1024 * 1024
_FLOAT_DTYPES = ("float16", "float32", "float64")


def to_bytes(model: Model) -> bytes:
    """Serialise ``model`` to the bytes of a safetensors file."""
    from safetensors.numpy import save

    used = {t for n in model.nodes for t in n.params.values()}
    out: dict[str, np.ndarray] = {}
    qtable = {}
    for t in sorted(used):
        q = model.quant.get(t)
        if q is None:
            out[t] = np.ascontiguousarray(model.tensors[t])
            continue
        packed = q.bits < 8
        out[t] = pack_codes(q.codes, q.bits, q.symmetric) if packed else np.ascontiguousarray(q.codes)
        out[t + "_scale"] = np.ascontiguousarray(q.scale)
        if q.zero_point is not None:
            out[t + "_zero_point"] = np.ascontiguousarray(q.zero_point)
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
    return save(out, metadata=meta)


def save(model: Model, path, *, input_path=None) -> None:
    """Write ``model`` to ``path`` atomically (temp file + rename).

    ``input_path``, when given, is refused as the output (inputs are never
    overwritten)."""
    check_output_path(path, inputs=(input_path,))
    write_bytes_atomic(path, to_bytes(model))


def _read_header(path) -> tuple[dict, int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes): truncated "
                                  "or not a safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: the safetensors header is not valid JSON (garbage header)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        off = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)):
            raise FormatError(f"{path}: tensor {k!r} has no valid data_offsets")
        if off[0] < 0 or off[1] < off[0] or off[1] > data_len:
            raise FormatError(f"{path}: tensor {k!r} lies beyond the end of the file (truncated?)")
    return header, n


def _json_field(meta, key, path, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise FormatError(f"{path}: metadata field {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (TypeError, json.JSONDecodeError):
        raise FormatError(f"{path}: metadata field {key!r} is not valid JSON") from None


def load(path) -> Model:
    """Read a udfc-ref model file (never modifies it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    header, _ = _read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: no udfc-ref metadata (is this a plain safetensors weights file? "
                          "import it with 'udfc import torch' first)")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                          f"(this udfc-ref reads version {FORMAT_VERSION})")
    graph = _json_field(meta, "graph", path)
    inp = _json_field(meta, "input", path)
    qtable = _json_field(meta, "quantization", path, default={})
    record = _json_field(meta, "compression", path, default={}) or None
    if not isinstance(graph, list):
        raise FormatError(f"{path}: metadata 'graph' must be a JSON list of nodes")
    if not (isinstance(inp, dict) and isinstance(inp.get("name"), str) and isinstance(inp.get("shape"), list)
            and len(inp["shape"]) == 3 and all(isinstance(s, int) and s > 0 for s in inp["shape"])):
        raise FormatError(f"{path}: metadata 'input' must be {{\"name\": str, \"shape\": [C, H, W]}}")
    if not isinstance(qtable, dict):
        raise FormatError(f"{path}: metadata 'quantization' must be a JSON object")
    nodes = [Node.from_json(d, i) for i, d in enumerate(graph)]

    try:
        from safetensors import safe_open

        raw = {}
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                raw[k] = f.get_tensor(k)
    except UDFCError:
        raise
    except Exception as e:  # safetensors raises its own types for corrupt files
        raise FormatError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None

    tensors, quant = {}, {}
    for t, q in qtable.items():
        try:
            bits, sym, pc, shape, dtype = q["bits"], q["symmetric"], q["per_channel"], tuple(q["shape"]), q["dtype"]
            packed = q["packed"]
        except (KeyError, TypeError):
            raise FormatError(f"{path}: quantization entry of {t!r} is incomplete") from None
        if t not in raw or t + "_scale" not in raw:
            raise FormatError(f"{path}: quantized tensor {t!r} lacks its codes or {t + '_scale'!r}")
        if dtype not in _FLOAT_DTYPES or bits not in tuple(range(2, 9)) + (16,):
            raise FormatError(f"{path}: quantization entry of {t!r} has bits={bits!r} dtype={dtype!r}")
        codes = raw.pop(t)
        try:
            if packed:
                codes = unpack_codes(codes, bits, sym, shape)
            elif tuple(codes.shape) != shape or codes.dtype.kind not in "iu":
                raise ValueError(f"codes of shape {codes.shape} {codes.dtype}, expected {shape} integers")
        except ValueError as e:
            raise FormatError(f"{path}: quantized tensor {t!r}: {e}") from None
        scale = raw.pop(t + "_scale")
        zp = raw.pop(t + "_zero_point", None)
        nsc = shape[0] if pc else 1
        if scale.shape != (nsc,) or scale.dtype.kind != "f" or (zp is not None and zp.shape != (nsc,)):
            raise FormatError(f"{path}: {t + '_scale'!r} / zero point of {t!r} must have shape ({nsc},)")
        if not sym and zp is None:
            raise FormatError(f"{path}: asymmetric tensor {t!r} lacks {t + '_zero_point'!r}")
        qt = QuantizedTensor(codes, scale, zp, int(bits), bool(sym), bool(pc), dtype)
        quant[t] = qt
        tensors[t] = dequantize(codes, scale, zp, np.dtype(dtype))
    for k, v in raw.items():
        if v.dtype.kind != "f":
            raise FormatError(f"{path}: tensor {k!r} has dtype {v.dtype}; parameters must be float16/32/64")
        tensors[k] = np.array(v)  # writable copy
    used = {t for n in nodes for t in n.params.values()}
    extra = sorted(set(tensors) - used)
    if extra:
        warnings.warn(f"{path}: {len(extra)} tensor(s) not used by the graph are ignored: {', '.join(extra[:5])}"
                      + (" ..." if len(extra) > 5 else ""), stacklevel=2)
        for k in extra:
            del tensors[k]
    try:
        model = Model(tensors, nodes, input_name=inp["name"], input_shape=inp["shape"],
                      output_name=meta.get("output"), record=record, quant=quant)
    except GraphError as e:
        raise GraphError(f"{path}: {e}") from None
    check_numbers(model)
    return model
