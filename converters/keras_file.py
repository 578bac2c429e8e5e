"""Keras model files and live models -> (layer list, weights), without Keras.

A ``.keras`` archive (zip: ``config.json`` + ``model.weights.h5``, plus the
optional name map ``udfc_names.json`` that :mod:`converters.keras_export`
writes) and a legacy ``.h5`` file (``model_config`` attribute +
``model_weights`` group) are read with ``zipfile``, ``json`` and ``h5py``
only; a live ``keras.Model`` through its config and variables.

Everything read here is data: layer names, class names and config values
are only ever compared with and looked up in tables, never executed.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile

import numpy as np

from udfc_ref.errors import ConversionError, FormatError

#: name of the archive member holding the original udfc-ref names (JSON)
NAMES_FILE = "udfc_names.json"


class Layer:
    """One Keras layer or functional operation as found in the config.

    Attributes
    ----------
    name : str
        The Keras layer (or operation) name.
    cls : str
        Class name; operations of ``keras.ops`` (``x + 3.0`` in a functional
        model) are ``"ops.<Class>"``, e.g. ``"ops.Add"``.
    cfg : dict
        The layer config.
    args : list
        The call's positional arguments flattened in order: ``("t", layer
        name)`` for a tensor, ``("c", value)`` for a constant (a number or an
        ndarray).
    """

    def __init__(self, name, cls, cfg, args):
        self.name, self.cls, self.cfg, self.args = name, cls, cfg, args

    @property
    def inbound(self) -> list[str]:
        """Names of the layers whose outputs this layer reads, in order."""
        return [v for k, v in self.args if k == "t"]


def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def constant(v, where):
    """A config value that is a number, a nested list of numbers or a
    serialised ndarray/tensor -> float64 ndarray (or raise)."""
    if isinstance(v, dict) and v.get("class_name") in ("__numpy__", "__tensor__"):
        v = v.get("config", {}).get("value")
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {v!r:.80} is not a number or an array of numbers") from None
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
        raise ConversionError(f"{where}: constant {v!r:.80} is not a finite number or array")
    return a


def _args(obj, out, where):
    """Flatten a Keras 3 call argument structure into ``out`` (see ``Layer.args``)."""
    if isinstance(obj, dict):
        cn = obj.get("class_name")
        if cn == "__keras_tensor__":
            hist = obj.get("config", {}).get("keras_history")
            if not isinstance(hist, list) or len(hist) != 3 or not isinstance(hist[0], str):
                raise ConversionError(f"{where}: malformed keras_history {hist!r:.80}")
            if hist[1] != 0 or hist[2] != 0:
                raise ConversionError(f"{where}: reads output {hist[2]} of call {hist[1]} of layer {hist[0]!r}; "
                                      "shared layers and layers with several outputs are not supported")
            out.append(("t", hist[0]))
        elif cn in ("__numpy__", "__tensor__"):
            out.append(("c", constant(obj, where)))
        else:
            raise ConversionError(f"{where}: call argument of type {cn!r} is not supported")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _args(v, out, where)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append(("c", constant(obj, where)))
    elif obj is not None:
        raise ConversionError(f"{where}: call argument {obj!r:.80} is not supported")


def _history_names(obj, out):
    """Layer names of every ``__keras_tensor__`` in ``obj`` (Keras 3 nodes), in order."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            out.append(obj["config"]["keras_history"][0])
            return
        for v in obj.values():
            _history_names(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _history_names(v, out)


def _calls(layer_json, where) -> list[list]:
    """Per call of the layer, its flattened arguments (Keras 2 and 3 forms)."""
    calls = []
    for node in layer_json.get("inbound_nodes", []) or []:
        args: list = []
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            _args(node.get("args", []), args, where)
        elif isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
            for t in node:
                if isinstance(t, list) and t and isinstance(t[0], str):
                    if len(t) > 2 and (t[1] != 0 or t[2] != 0):
                        raise ConversionError(f"{where}: reads output {t[2]} of call {t[1]} of layer {t[0]!r}; "
                                              "shared layers are not supported")
                    args.append(("t", t[0]))
        calls.append(args)
    return calls


def _shape_hwc(shape, where) -> tuple[int, int, int]:
    if not isinstance(shape, (list, tuple)) or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        raise ConversionError(f"{where}: input shape {shape!r} is not (batch, H, W, C) with known sizes; only "
                              "image models with one fixed-size NHWC input are supported")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _io_names(spec, where):
    """``output_layers`` / ``input_layers`` of a functional config -> layer names."""
    if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        spec = [spec]
    try:
        return [s[0] for s in spec]
    except (TypeError, IndexError, KeyError):
        raise ConversionError(f"{where}: cannot read the model's input/output layers {spec!r:.120}") from None


def class_key(layer_json) -> str:
    """``Conv2D`` for a layer, ``ops.Add`` for a ``keras.ops`` operation."""
    cls = layer_json.get("class_name")
    module = layer_json.get("module") or ""
    if not isinstance(cls, str):
        raise ConversionError(f"layer {layer_json.get('name')!r}: class_name {cls!r:.60} is not a string")
    if module.startswith(("keras.src.ops", "keras.ops")):
        return f"ops.{cls}"
    return cls


def parse_config(top, where):
    """Model config JSON -> (layers in order, input layer name, input (H, W, C), output layer name)."""
    if not isinstance(top, dict) or "class_name" not in top:
        raise ConversionError(f"{where}: model config has no class_name")
    cls = top["class_name"]
    cfg = top.get("config", {})
    if cls == "Sequential":
        items = cfg if isinstance(cfg, list) else cfg.get("layers", [])
        layers, prev, hwc, in_name = [], None, None, None
        for i, lj in enumerate(items):
            lc = lj.get("config", {})
            name = lc.get("name") or lj.get("name") or f"layer_{i}"
            if lj.get("class_name") == "InputLayer":
                hwc = _shape_hwc(lc.get("batch_shape", lc.get("batch_input_shape")), f"{where}: layer {name!r}")
                in_name = prev = name
                continue
            if hwc is None:
                bis = lc.get("batch_input_shape") or (cfg.get("build_input_shape") if isinstance(cfg, dict) else None)
                if bis is None:
                    raise ConversionError(f"{where}: the Sequential model has no input shape (build it or add an "
                                          "InputLayer before saving)")
                hwc = _shape_hwc(bis, f"{where}: layer {name!r}")
                in_name = prev = "input"
            layers.append(Layer(name, class_key(lj), lc, [("t", prev)]))
            prev = name
        if hwc is None or not layers:
            raise ConversionError(f"{where}: the Sequential model has no layers")
        return layers, in_name, hwc, prev
    if cls in ("Functional", "Model"):
        ins = _io_names(cfg.get("input_layers", []), where)
        outs = _io_names(cfg.get("output_layers", []), where)
        if len(ins) != 1 or len(outs) != 1:
            raise ConversionError(f"{where}: the model has {len(ins)} inputs and {len(outs)} outputs; exactly one "
                                  "of each is supported")
        layers, hwc = [], None
        for lj in cfg.get("layers", []):
            lc = lj.get("config", {})
            name = lj.get("name") or lc.get("name")
            if lj.get("class_name") == "InputLayer":
                if name != ins[0]:
                    raise ConversionError(f"{where}: input layer {name!r} is not the model input")
                hwc = _shape_hwc(lc.get("batch_shape", lc.get("batch_input_shape")), f"{where}: layer {name!r}")
                continue
            calls = _calls(lj, f"{where}: layer {name!r}")
            if len(calls) != 1:
                raise ConversionError(f"{where}: layer {name!r} ({lj.get('class_name')}) is called {len(calls)} "
                                      "times; shared layers are not supported")
            layers.append(Layer(name, class_key(lj), lc, calls[0]))
        if hwc is None:
            raise ConversionError(f"{where}: the functional model has no InputLayer")
        return layers, ins[0], hwc, outs[0]
    raise ConversionError(f"{where}: model class {cls!r} is not supported (Sequential or functional models only; "
                          "subclassed models have no config graph)")


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------

def _h5_attr_list(group, name) -> list[str]:
    """An HDF5 string-list attribute, possibly chunked into ``name0``, ``name1``..."""
    if name in group.attrs:
        return [_decode(v) for v in np.atleast_1d(group.attrs[name])]
    out, i = [], 0
    while f"{name}{i}" in group.attrs:
        out.extend(_decode(v) for v in np.atleast_1d(group.attrs[f"{name}{i}"]))
        i += 1
    return out


def _snake(name: str) -> str:
    s = re.sub(r"\W+", "", name)
    s = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", s)
    return re.sub("([a-z])([A-Z])", r"\1_\2", s).lower()


def _weights_keras3(h5file, layers):
    """``model.weights.h5`` of a .keras archive -> {layer name: [(None, array), ...]}."""
    import h5py  # noqa: PLC0415

    by_attr, by_path = {}, {}

    def visit(path, obj):
        if isinstance(obj, h5py.Group) and "vars" in obj and isinstance(obj["vars"], h5py.Group):
            v = obj["vars"]
            keys = sorted(v.keys(), key=lambda k: int(k) if k.isdigit() else 1 << 30)
            arrs = [(None, np.array(v[k])) for k in keys]
            if "name" in v.attrs:
                by_attr[_decode(v.attrs["name"])] = arrs
            by_path[path.split("/")[-1]] = arrs

    h5file.visititems(visit)
    out = {}
    counts: dict[str, int] = {}
    for lay in layers:  # fallback: Keras names the groups snake_case(class) with _1, _2 ... suffixes
        if lay.cls.startswith("ops."):
            continue
        base = _snake(lay.cls)
        k = counts.get(base, 0)
        counts[base] = k + 1
        path_name = base if k == 0 else f"{base}_{k}"
        if lay.name in by_attr:
            out[lay.name] = by_attr[lay.name]
        elif not by_attr and path_name in by_path:
            out[lay.name] = by_path[path_name]
    return out


def _weights_legacy(f):
    """``model_weights`` group of a legacy .h5 file -> {layer name: [(weight name, array), ...]}."""
    g = f["model_weights"] if "model_weights" in f else f
    out = {}
    for lname in _h5_attr_list(g, "layer_names"):
        if lname not in g:
            raise FormatError(f"legacy h5: layer {lname!r} is listed but has no weights group")
        lg = g[lname]
        arrs = []
        for wn in _h5_attr_list(lg, "weight_names"):
            try:
                arrs.append((wn, np.array(lg[wn])))
            except KeyError:
                raise FormatError(f"legacy h5: weight {wn!r} of layer {lname!r} is missing") from None
        out[lname] = arrs
    return out


def _names_map(raw, path):
    """The ``udfc_names.json`` member -> dict, or None when absent / not ours."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {NAMES_FILE} in the archive is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != "udfc-ref keras names":
        return None
    return d


def read_file(path):
    """Path -> (config JSON, weights, name map or None, Keras major version or None); no keras import.

    ``weights`` maps a layer name to ``[(weight name or None, array), ...]``.
    """
    import h5py  # noqa: PLC0415

    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                cfg = json.loads(z.read("config.json").decode("utf-8"))
                wbytes = z.read("model.weights.h5")
                names = _names_map(z.read(NAMES_FILE), path) if NAMES_FILE in z.namelist() else None
        except KeyError as e:
            raise FormatError(f"{path}: .keras archive lacks {e.args[0]}") from None
        except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: unreadable .keras archive ({e})") from None
        layers = parse_config(cfg, path)[0]
        try:
            with h5py.File(io.BytesIO(wbytes), "r") as f:
                return cfg, _weights_keras3(f, layers), names, 3
        except OSError as e:
            raise FormatError(f"{path}: model.weights.h5 in the archive is unreadable ({e})") from None
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise FormatError(f"{path}: legacy .h5 without a 'model_config' attribute (a weights-only file? "
                                  "save the whole model)")
            cfg = json.loads(_decode(f.attrs["model_config"]))
            version = _decode(f.attrs["keras_version"]) if "keras_version" in f.attrs else ""
            major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else None
            return cfg, _weights_legacy(f), None, major
    except OSError as e:
        raise FormatError(f"{path}: neither a .keras archive nor an HDF5 file ({e})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: model_config is not valid JSON ({e})") from None


def read_live(obj, keras):
    """A live keras.Model -> (config JSON, weights, None, 3) through the Keras API."""
    cls = type(obj).__name__
    if cls not in ("Sequential", "Functional"):
        raise ConversionError(f"model {getattr(obj, 'name', '?')!r}: class {cls} is not supported "
                              "(Sequential or functional models only)")
    try:
        cfg = keras.saving.serialize_keras_object(obj)
        cfg = json.loads(json.dumps(cfg, default=_jsonable))
    except Exception as e:  # noqa: BLE001 - keras raises many types
        raise ConversionError(f"model {obj.name!r}: cannot get its config ({type(e).__name__}: {e})") from None
    weights = {lay.name: [(v.name, np.asarray(keras.ops.convert_to_numpy(v))) for v in lay.weights]
               for lay in obj.layers}
    return cfg, weights, None, 3


def _jsonable(o):
    """json.dumps fallback for a live config: arrays become lists, anything else None."""
    if isinstance(o, np.ndarray):
        return {"class_name": "__numpy__", "config": {"value": o.tolist(), "dtype": str(o.dtype)}}
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return None
