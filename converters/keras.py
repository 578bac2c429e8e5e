"""Keras <-> udfc-ref converter.

``read`` turns a Keras model into a :class:`udfc_ref.Model`.  It reads a
``.keras`` archive (zip: ``config.json`` + ``model.weights.h5``) or a legacy
``.h5`` file (``model_config`` attribute + ``model_weights`` group) with
``zipfile``, ``json`` and ``h5py`` only: Keras itself is *not* imported.  A
live ``keras.Model`` object is also accepted (its config and weights are
taken through the Keras API).

``to_model`` rebuilds a Keras functional model from a udfc-ref model (for
example a compressed one with fewer channels); ``save_keras`` writes it to a
``.keras`` file atomically.  Keras is imported lazily, only there.

Layout conventions (Keras is NHWC, the IR is NCHW):

* conv kernel (kh, kw, in/g, out) -> OIHW by ``transpose(3, 2, 0, 1)``;
* depthwise kernel (kh, kw, in, mult) -> (in*mult, 1, kh, kw), groups=in,
  Keras output channel ``c*mult + m`` = IR output channel ``c*mult + m``;
* dense kernel (in, out) -> (out, in); after a ``Flatten`` of an (H, W, C)
  tensor Keras orders the features (h, w, c) while the IR flattens (c, h, w),
  so the columns of the consuming dense weight are permuted;
* ``padding='same'``: total = max((ceil(n/s)-1)*s + (k-1)*d + 1 - n, 0),
  top = total // 2, bottom = total - top (TensorFlow's rule), stored exactly
  as the IR's [top, bottom, left, right].
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile

import numpy as np

from udfc_ref.atomic import check_output_path
from udfc_ref.errors import ConversionError, FormatError, GraphError
from udfc_ref.graph import Model, Node

__all__ = ["read", "export", "to_model", "save_keras"]

_INSTALL_HINT = "pip install 'udfc-ref[keras]'"


def _import_keras():
    """Import keras lazily; a missing keras is a ConversionError naming the extra."""
    try:
        import keras  # noqa: PLC0415
    except ImportError as e:
        raise ConversionError(
            f"Keras is needed for this conversion but cannot be imported ({e}); install it with {_INSTALL_HINT} "
            "and set KERAS_BACKEND (e.g. KERAS_BACKEND=torch) if TensorFlow is not installed"
        ) from None
    return keras


# ===========================================================================
# reading the file: config + weights, no keras
# ===========================================================================

class _Layer:
    """One Keras layer as found in the config: name, class, config, input layer names."""

    def __init__(self, name, cls, cfg, inbound):
        self.name, self.cls, self.cfg, self.inbound = name, cls, cfg, inbound


def _history_names(obj, out):
    """Collect ``keras_history`` layer names (in argument order) from a Keras 3 node."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            out.append(obj["config"]["keras_history"][0])
            return
        for v in obj.values():
            _history_names(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _history_names(v, out)


def _inbound(layer_json) -> list[list[str]]:
    """Per call of the layer, the names of the layers feeding it (Keras 2 and 3)."""
    calls = []
    for node in layer_json.get("inbound_nodes", []) or []:
        names: list[str] = []
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            _history_names(node.get("args", []), names)
        elif isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
            for t in node:
                if isinstance(t, list) and t and isinstance(t[0], str):
                    names.append(t[0])
        calls.append(names)
    return calls


def _shape_hwc(shape, where) -> tuple[int, int, int]:
    if not isinstance(shape, (list, tuple)) or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        raise ConversionError(f"{where}: input shape {shape!r} is not (batch, H, W, C) with known sizes; only "
                              "image models with one fixed-size NHWC input are supported")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _first_output(spec, where):
    """``output_layers`` / ``input_layers`` of a functional config -> list of layer names."""
    if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        spec = [spec]
    try:
        return [s[0] for s in spec]
    except (TypeError, IndexError, KeyError):
        raise ConversionError(f"{where}: cannot read the model's input/output layers {spec!r}") from None


def _parse_config(top, where):
    """Model config JSON -> (layers in order, input layer name or None, input HWC, output layer name)."""
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
                in_name = name
                prev = name
                continue
            if hwc is None:
                bis = lc.get("batch_input_shape") or (cfg.get("build_input_shape") if isinstance(cfg, dict) else None)
                if bis is None:
                    raise ConversionError(f"{where}: the Sequential model has no input shape (build it or add an "
                                          "InputLayer before saving)")
                hwc = _shape_hwc(bis, f"{where}: layer {name!r}")
                in_name = "input"
                prev = in_name
            layers.append(_Layer(name, lj.get("class_name"), lc, [prev]))
            prev = name
        if hwc is None or not layers:
            raise ConversionError(f"{where}: the Sequential model has no layers")
        return layers, in_name, hwc, prev
    if cls in ("Functional", "Model"):
        ins = _first_output(cfg.get("input_layers", []), where)
        outs = _first_output(cfg.get("output_layers", []), where)
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
            calls = _inbound(lj)
            if len(calls) != 1:
                raise ConversionError(f"{where}: layer {name!r} ({lj.get('class_name')}) is called {len(calls)} "
                                      "times; shared layers are not supported")
            layers.append(_Layer(name, lj.get("class_name"), lc, calls[0]))
        if hwc is None:
            raise ConversionError(f"{where}: the functional model has no InputLayer")
        return layers, ins[0], hwc, outs[0]
    raise ConversionError(f"{where}: model class {cls!r} is not supported (Sequential or functional models only; "
                          "subclassed models have no config graph)")


def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


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
        base = _snake(lay.cls or "")
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


def _read_file(path):
    """Path -> (config JSON, {layer name: [(weight name or None, array)]}); no keras import."""
    import h5py  # noqa: PLC0415

    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                cfg = json.loads(z.read("config.json").decode("utf-8"))
                wbytes = z.read("model.weights.h5")
        except KeyError as e:
            raise FormatError(f"{path}: .keras archive lacks {e.args[0]}") from None
        except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: unreadable .keras archive ({e})") from None
        layers = _parse_config(cfg, path)[0]
        try:
            with h5py.File(io.BytesIO(wbytes), "r") as f:
                return cfg, _weights_keras3(f, layers)
        except OSError as e:
            raise FormatError(f"{path}: model.weights.h5 in the archive is unreadable ({e})") from None
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise FormatError(f"{path}: legacy .h5 without a 'model_config' attribute (a weights-only file? "
                                  "save the whole model)")
            cfg = json.loads(_decode(f.attrs["model_config"]))
            return cfg, _weights_legacy(f)
    except OSError as e:
        raise FormatError(f"{path}: neither a .keras archive nor an HDF5 file ({e})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: model_config is not valid JSON ({e})") from None


def _read_live(obj):
    """A live keras.Model -> (config JSON, weights) through the Keras API."""
    cls = type(obj).__name__
    if cls not in ("Sequential", "Functional"):
        raise ConversionError(f"model {getattr(obj, 'name', '?')!r}: class {cls} is not supported "
                              "(Sequential or functional models only)")
    keras = _import_keras()
    try:
        cfg = keras.saving.serialize_keras_object(obj)
        cfg = json.loads(json.dumps(cfg, default=lambda o: None))
    except Exception as e:  # noqa: BLE001 - keras raises many types
        raise ConversionError(f"model {obj.name!r}: cannot get its config ({type(e).__name__}: {e})") from None
    weights = {lay.name: [(None, np.asarray(w)) for w in lay.get_weights()] for lay in obj.layers}
    return cfg, weights


# ===========================================================================
# config + weights -> IR
# ===========================================================================

class _Val:
    """A Keras tensor in IR terms: IR value name, IR shape (C, H, W) or (F,),
    ``flat`` = (C, H, W) when it is a Keras Flatten of an H*W > 1 map (feature
    order h, w, c), ``pad`` = pending ZeroPadding2D [t, b, l, r]."""

    def __init__(self, name, shape, flat=None, pad=None):
        self.name, self.flat, self.pad = name, flat, pad
        self.shape = None if shape is None else tuple(shape)


def _pair(v, name, key):
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return [int(v[0]), int(v[1])]
    raise ConversionError(f"layer {name!r}: {key} {v!r} is not an int or a pair of ints")


def same_padding(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """Keras/TensorFlow 'same' padding along one axis: (before, after)."""
    total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


class _Builder:
    def __init__(self, where):
        self.where = where
        self.tensors: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.vals: dict[str, _Val] = {}

    def err(self, lay, msg):
        return ConversionError(f"{self.where}: layer {lay.name!r} ({lay.cls}): {msg}")

    def add(self, name, op, inputs, attrs=None, params=None):
        self.nodes.append(Node(name=name, op=op, inputs=list(inputs), output=name, attrs=attrs or {},
                               params=params or {}))
        return name

    # ------------------------------------------------------------- helpers
    def weights(self, lay, store, roles):
        """Assign the stored arrays of ``lay`` to ``roles`` (by weight name when known, else by order)."""
        arrs = store.get(lay.name, [])
        if len(arrs) != len(roles):
            raise self.err(lay, f"expected {len(roles)} weight(s) {roles}, the file has {len(arrs)}")
        if all(n is not None for n, _ in arrs):
            by = {}
            for n, a in arrs:
                key = n.split("/")[-1].split(":")[0]
                key = "kernel" if key == "depthwise_kernel" else key
                by[key] = a
            if set(by) == set(roles):
                return [by[r] for r in roles]
        return [a for _, a in arrs]

    def activation(self, lay, act, out):
        if isinstance(act, dict):
            act = act.get("config", {}).get("name", act.get("class_name"))
        if act in (None, "linear"):
            return out
        if act in ("relu", "relu6"):
            return self.add(f"{lay.name}.{act}", act, [out])
        raise self.err(lay, f"activation {act!r} is not supported (relu, relu6 or linear)")

    def nonnegative(self, value) -> bool:
        """True when IR ``value`` is >= 0 by construction (relu / relu6, through max pools)."""
        prod = {n.output: n for n in self.nodes}
        p = prod.get(value)
        while p is not None and p.op == "max_pool2d":
            p = prod.get(p.inputs[0])
        return p is not None and p.op in ("relu", "relu6")

    def check_input(self, lay, v: _Val, pad_ok=False, flat_ok=False):
        if v.pad is not None and not pad_ok:
            raise self.err(lay, "follows a ZeroPadding2D; only a convolution, a valid average pooling or a max "
                                "pooling of a post-ReLU map can absorb the padding")
        if v.flat is not None and not flat_ok:
            raise self.err(lay, "consumes a Flatten of an (H, W, C) map; only Dense layers can take it (their "
                                "columns are permuted to the IR's (C, H, W) order)")

    def spatial_padding(self, lay, v: _Val, mode, kernel, stride, dilation=(1, 1)):
        """IR padding [t, b, l, r] for ``mode`` plus any pending ZeroPadding2D."""
        c, h, w = v.shape
        zp = v.pad or [0, 0, 0, 0]
        hp, wp = h + zp[0] + zp[1], w + zp[2] + zp[3]
        if mode == "valid":
            p = [0, 0, 0, 0]
        elif mode == "same":
            p = [*same_padding(hp, kernel[0], stride[0], dilation[0]), *same_padding(wp, kernel[1], stride[1],
                                                                                      dilation[1])]
        else:
            raise self.err(lay, f"padding {mode!r} is not supported (valid or same)")
        return [a + b for a, b in zip(p, zp)], p

    # -------------------------------------------------------------- layers
    def layer(self, lay, store):
        cfg, cls = lay.cfg, lay.cls
        ins = [self.vals[i] for i in lay.inbound]
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise self.err(lay, f"data_format {cfg.get('data_format')!r} is not supported (channels_last only)")
        v = ins[0] if ins else None
        if cls in ("Dropout", "SpatialDropout2D") or (cls == "Activation" and cfg.get("activation") == "linear"):
            return v  # identity at inference
        if cls in ("Conv2D", "DepthwiseConv2D"):
            self.check_input(lay, v, pad_ok=True)
            if len(v.shape) != 3:
                raise self.err(lay, f"needs an (H, W, C) input, got IR shape {v.shape}")
            k = _pair(cfg["kernel_size"], lay.name, "kernel_size")
            s = _pair(cfg.get("strides", 1), lay.name, "strides")
            d = _pair(cfg.get("dilation_rate", 1), lay.name, "dilation_rate")
            pad, _ = self.spatial_padding(lay, v, cfg.get("padding", "valid"), k, s, d)
            use_bias = cfg.get("use_bias", True)
            arrs = self.weights(lay, store, ["kernel"] + (["bias"] if use_bias else []))
            kern = arrs[0]
            if cls == "Conv2D":
                groups = int(cfg.get("groups", 1))
                if kern.ndim != 4 or kern.shape[2] * groups != v.shape[0]:
                    raise self.err(lay, f"kernel {kern.shape} does not match {v.shape[0]} input channels")
                w = kern.transpose(3, 2, 0, 1)
            else:
                mult = int(cfg.get("depth_multiplier", 1))
                if kern.ndim != 4 or kern.shape[2] != v.shape[0] or kern.shape[3] != mult:
                    raise self.err(lay, f"depthwise kernel {kern.shape} does not match {v.shape[0]} channels x "
                                        f"multiplier {mult}")
                groups = v.shape[0]
                w = kern.transpose(2, 3, 0, 1).reshape(v.shape[0] * mult, 1, k[0], k[1])
            params = {"weight": f"{lay.name}.weight"}
            self.tensors[params["weight"]] = np.ascontiguousarray(w)
            if use_bias:
                params["bias"] = f"{lay.name}.bias"
                self.tensors[params["bias"]] = np.ascontiguousarray(arrs[1])
            out = self.add(lay.name, "conv2d", [v.name], {"stride": s, "padding": pad, "dilation": d,
                                                           "groups": groups}, params)
            out = self.activation(lay, cfg.get("activation", "linear"), out)
            return _Val(out, None)
        if cls == "Dense":
            self.check_input(lay, v, flat_ok=True)
            if len(v.shape) != 1:
                raise self.err(lay, f"Dense on a {len(v.shape)}-D input (IR shape {v.shape}) is not supported; "
                                    "add a Flatten or GlobalAveragePooling2D")
            use_bias = cfg.get("use_bias", True)
            arrs = self.weights(lay, store, ["kernel"] + (["bias"] if use_bias else []))
            kern = arrs[0]
            if kern.ndim != 2 or kern.shape[0] != v.shape[0]:
                raise self.err(lay, f"kernel {kern.shape} does not take {v.shape[0]} input features")
            if v.flat is not None:
                c, h, ww = v.flat
                w = kern.reshape(h, ww, c, -1).transpose(3, 2, 0, 1).reshape(kern.shape[1], c * h * ww)
            else:
                w = kern.T
            params = {"weight": f"{lay.name}.weight"}
            self.tensors[params["weight"]] = np.ascontiguousarray(w)
            if use_bias:
                params["bias"] = f"{lay.name}.bias"
                self.tensors[params["bias"]] = np.ascontiguousarray(arrs[1])
            out = self.add(lay.name, "linear", [v.name], {}, params)
            return _Val(self.activation(lay, cfg.get("activation", "linear"), out), None)
        if cls == "BatchNormalization":
            self.check_input(lay, v)
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            ok = (-1, 3) if len(v.shape) == 3 else (-1, 1)
            if axis not in ok:
                raise self.err(lay, f"axis {cfg.get('axis')!r} is not the channel axis (-1)")
            center, scale = cfg.get("center", True), cfg.get("scale", True)
            roles = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
            arrs = dict(zip(roles, self.weights(lay, store, roles)))
            c = v.shape[0]
            dt = arrs["moving_mean"].dtype
            vals = {
                "weight": arrs.get("gamma", np.ones(c, dt)),
                "bias": arrs.get("beta", np.zeros(c, dt)),
                "running_mean": arrs["moving_mean"],
                "running_var": arrs["moving_variance"],
            }
            params = {}
            for role, a in vals.items():
                params[role] = f"{lay.name}.{role}"
                self.tensors[params[role]] = np.ascontiguousarray(a)
            out = self.add(lay.name, "batch_norm", [v.name], {"eps": float(cfg.get("epsilon", 1e-3))}, params)
            return _Val(out, None)
        if cls == "ReLU":
            self.check_input(lay, v)
            mx = cfg.get("max_value")
            if (cfg.get("negative_slope") or 0.0) != 0.0 or (cfg.get("threshold") or 0.0) != 0.0:
                raise self.err(lay, "negative_slope / threshold other than 0 are not supported")
            if mx is None:
                op = "relu"
            elif float(mx) == 6.0:
                op = "relu6"
            else:
                raise self.err(lay, f"max_value {mx!r} is not supported (None or 6)")
            return _Val(self.add(lay.name, op, [v.name]), None)
        if cls == "Activation":
            self.check_input(lay, v)
            act = cfg.get("activation")
            if act not in ("relu", "relu6"):
                raise self.err(lay, f"activation {act!r} is not supported (relu, relu6 or linear)")
            return _Val(self.add(lay.name, act, [v.name]), None)
        if cls in ("MaxPooling2D", "AveragePooling2D"):
            avg = cls == "AveragePooling2D"
            # zeros are exact -inf padding for a nonnegative (post-ReLU) map, as in ResNet's pool1_pad
            self.check_input(lay, v, pad_ok=avg or self.nonnegative(v.name))
            if len(v.shape) != 3:
                raise self.err(lay, f"needs an (H, W, C) input, got IR shape {v.shape}")
            k = _pair(cfg.get("pool_size", 2), lay.name, "pool_size")
            s = _pair(cfg.get("strides") or k, lay.name, "strides")
            mode = cfg.get("padding", "valid")
            if avg and v.pad is not None and mode != "valid":
                raise self.err(lay, "a ZeroPadding2D before a 'same' average pooling cannot be represented")
            pad, _ = self.spatial_padding(lay, v, mode, k, s)
            if max(pad[:2]) > k[0] // 2 or max(pad[2:]) > k[1] // 2:
                raise self.err(lay, f"padding {pad} exceeds half the pool size {k}")
            attrs = {"kernel": k, "stride": s, "padding": pad}
            if avg:
                attrs["count_include_pad"] = v.pad is not None  # zeros of ZeroPadding2D count; 'same' pads don't
            return _Val(self.add(lay.name, "avg_pool2d" if avg else "max_pool2d", [v.name], attrs), None)
        if cls == "GlobalAveragePooling2D":
            self.check_input(lay, v)
            keep = bool(cfg.get("keepdims", False))
            return _Val(self.add(lay.name, "global_avg_pool", [v.name], {"keepdims": keep}), None)
        if cls == "Flatten":
            self.check_input(lay, v)
            if len(v.shape) == 1:
                return v
            out = self.add(lay.name, "flatten", [v.name])
            c, h, w = v.shape
            return _Val(out, None, flat=(c, h, w) if h * w > 1 else None)
        if cls == "ZeroPadding2D":
            self.check_input(lay, v, pad_ok=True)
            p = cfg.get("padding", 1)
            if isinstance(p, int):
                p = [p, p, p, p]
            elif isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p):
                p = [p[0], p[0], p[1], p[1]]
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                p = [p[0][0], p[0][1], p[1][0], p[1][1]]
            else:
                raise self.err(lay, f"padding {p!r} is not understood")
            old = v.pad or [0, 0, 0, 0]
            return _Val(v.name, v.shape, pad=[a + int(b) for a, b in zip(old, p)])
        if cls in ("Add", "Concatenate"):
            for x in ins:
                self.check_input(lay, x)
            if len(ins) < 2:
                raise self.err(lay, "needs at least two inputs")
            if cls == "Concatenate":
                axis = cfg.get("axis", -1)
                if axis not in (-1, len(v.shape)):
                    raise self.err(lay, f"axis {axis} is not the channel axis (-1)")
            op = "add" if cls == "Add" else "concat"
            return _Val(self.add(lay.name, op, [x.name for x in ins], {"axis": 1} if op == "concat" else {}), None)
        raise ConversionError(f"{self.where}: layer {lay.name!r} of class {cls} is not supported")


def _convert(cfg, store, where) -> Model:
    layers, in_name, hwc, out_name = _parse_config(cfg, where)
    b = _Builder(where)
    h, w, c = hwc
    b.vals[in_name] = _Val(in_name, (c, h, w))
    shapes = {in_name: (c, h, w)}
    for lay in layers:
        for i in lay.inbound:
            if i not in b.vals:
                raise ConversionError(f"{where}: layer {lay.name!r} reads {i!r}, which is not defined before it")
        for x in lay.inbound:  # IR shapes of the inputs, for the padding arithmetic
            b.vals[x].shape = shapes.get(b.vals[x].name, b.vals[x].shape)
        n_before = len(b.nodes)
        v = b.layer(lay, store)
        if len(b.nodes) > n_before:  # infer the new shapes with the IR's own rules
            try:
                m = Model(b.tensors, b.nodes, input_name=in_name, input_shape=(c, h, w), validate=True)
            except GraphError as e:
                raise ConversionError(f"{where}: layer {lay.name!r} ({lay.cls}): {e}") from None
            shapes = m.shapes
            v.shape = shapes[v.name]
        b.vals[lay.name] = v
    out = b.vals[out_name]
    if out.flat is not None:
        raise ConversionError(f"{where}: the model output is a Flatten of an (H, W, C) map; the IR would return its "
                              "features in (C, H, W) order, so add the consuming Dense layer or a global pooling")
    if out.pad is not None:
        raise ConversionError(f"{where}: the model ends with a ZeroPadding2D, which the IR cannot represent")
    if out.name == in_name:
        raise ConversionError(f"{where}: the model has no computing layer")
    return Model(b.tensors, b.nodes, input_name=in_name, input_shape=(c, h, w), output_name=out.name)


def read(src) -> Model:
    """Read a Keras model into a :class:`udfc_ref.Model` (float32 weights, NCHW).

    Parameters
    ----------
    src : str, os.PathLike or keras.Model
        A ``.keras`` archive, a legacy ``.h5`` file (read with zipfile/h5py,
        no Keras import), or a live Sequential / functional ``keras.Model``.

    Raises
    ------
    ConversionError
        For a layer, activation, padding or layout the IR cannot represent
        (the message names the layer and its class).
    FormatError
        For an unreadable file.
    """
    if isinstance(src, (str, os.PathLike)):
        where, load = os.fspath(src), _read_file
    elif hasattr(src, "get_config") and hasattr(src, "layers"):
        where, load = f"model {src.name!r}", _read_live
    else:
        raise ConversionError(f"cannot read a Keras model from {type(src).__name__} (give a .keras / .h5 path or "
                              "a keras.Model)")
    try:
        cfg, store = load(where if load is _read_file else src)
        return _convert(cfg, store, where)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ConversionError(f"{where}: malformed or unexpected Keras model config "
                              f"({type(e).__name__}: {e})") from None


def export(src, path) -> None:
    """``read(src)`` and write it as a udfc-ref file at ``path`` (atomically;
    ``path`` must not be ``src``)."""
    inp = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    check_output_path(path, inputs=(inp,))
    from udfc_ref.io import save  # noqa: PLC0415

    save(read(src), path, input_path=inp)


# ===========================================================================
# IR -> keras
# ===========================================================================

def _as_model(src) -> Model:
    if isinstance(src, Model):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if path.endswith((".keras", ".h5", ".hdf5")):
            return read(path)
        from udfc_ref.io import load  # noqa: PLC0415

        return load(path)
    raise ConversionError(f"to_model needs a udfc-ref Model or file path, got {type(src).__name__}")


def _nonnegative(model: Model, value: str) -> bool:
    """True when ``value`` is >= 0 by construction (relu / relu6, through max pools)."""
    p = model.producer(value)
    while p is not None and p.op == "max_pool2d":
        p = model.producer(p.inputs[0])
    return p is not None and p.op in ("relu", "relu6")


def to_model(path_or_model):
    """Build a Keras functional model computing the same function as a udfc-ref model.

    The Keras model takes NHWC input of shape (H, W, C); its predictions
    match ``model.forward`` on the transposed NCHW input.  Asymmetric or
    explicit convolution padding becomes ``ZeroPadding2D`` + a 'valid'
    convolution; a flatten of a (C, H, W) map becomes ``Permute((3, 1, 2))``
    + ``Flatten`` so the IR's (c, h, w) feature order and weights carry over.

    Parameters
    ----------
    path_or_model : str, os.PathLike or udfc_ref.Model
        A udfc-ref file (``.keras`` / ``.h5`` are read with :func:`read`).

    Returns
    -------
    keras.Model
    """
    model = _as_model(path_or_model)
    keras = _import_keras()
    L = keras.layers
    used: set[str] = set()

    def kname(base):
        s = re.sub(r"[^A-Za-z0-9_.\-]", "_", base) or "layer"
        n, i = s, 1
        while n in used:
            n, i = f"{s}_{i}", i + 1
        used.add(n)
        return n

    c, h, w = model.input_shape
    inp = keras.Input((h, w, c), name=kname(model.input_name))
    kt = {model.input_name: inp}
    pending = []  # (layer, [weights]) set after the model is built

    def pad_then(n, x, pad):
        if any(pad):
            x = L.ZeroPadding2D(((pad[0], pad[1]), (pad[2], pad[3])), name=kname(n.name + "_pad"))(x)
        return x

    for n in model.nodes:
        a = n.attrs
        x = kt[n.inputs[0]]
        ishape = model.shapes[n.inputs[0]]
        if n.op == "conv2d":
            wt = model.param(n, "weight")
            b = model.param(n, "bias")
            o, ig, kh, kw = wt.shape
            g = a["groups"]
            x = pad_then(n, x, a["padding"])
            common = dict(strides=tuple(a["stride"]), padding="valid", dilation_rate=tuple(a["dilation"]),
                          use_bias=b is not None, name=kname(n.name))
            if g > 1 and ig == 1 and g == ishape[0] and o % g == 0 and a["stride"][0] == a["stride"][1] \
                    and (a["dilation"] == [1, 1] or a["stride"] == [1, 1]):
                mult = o // g
                layer = L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, **common)
                kern = wt.reshape(g, mult, kh, kw).transpose(2, 3, 0, 1)
            else:
                layer = L.Conv2D(o, (kh, kw), groups=g, **common)
                kern = wt.transpose(2, 3, 1, 0)
            y = layer(x)
            pending.append((layer, [kern] + ([b] if b is not None else [])))
        elif n.op == "batch_norm":
            layer = L.BatchNormalization(axis=-1, epsilon=a["eps"], name=kname(n.name))
            y = layer(x)
            pending.append((layer, [model.param(n, r) for r in ("weight", "bias", "running_mean", "running_var")]))
        elif n.op == "linear":
            wt, b = model.param(n, "weight"), model.param(n, "bias")
            layer = L.Dense(wt.shape[0], use_bias=b is not None, name=kname(n.name))
            y = layer(x)
            pending.append((layer, [wt.T] + ([b] if b is not None else [])))
        elif n.op in ("relu", "relu6"):
            y = L.ReLU(max_value=6.0 if n.op == "relu6" else None, name=kname(n.name))(x)
        elif n.op == "identity":
            y = x
        elif n.op == "add":
            y = L.Add(name=kname(n.name))([kt[i] for i in n.inputs])
        elif n.op == "concat":
            y = L.Concatenate(axis=-1, name=kname(n.name))([kt[i] for i in n.inputs])
        elif n.op == "flatten":
            if len(ishape) == 3 and ishape[1] * ishape[2] > 1:
                x = L.Permute((3, 1, 2), name=kname(n.name + "_chw"))(x)
            y = L.Flatten(name=kname(n.name))(x) if len(ishape) == 3 else x
        elif n.op in ("max_pool2d", "avg_pool2d"):
            k, s, p = a["kernel"], a["stride"], a["padding"]
            same = [*same_padding(ishape[1], k[0], s[0]), *same_padding(ishape[2], k[1], s[1])]
            P = L.MaxPooling2D if n.op == "max_pool2d" else L.AveragePooling2D
            if not any(p):
                mode = "valid"
            elif list(p) == same and (n.op == "max_pool2d" or not a["count_include_pad"]):
                mode = "same"
            elif n.op == "avg_pool2d" and a["count_include_pad"]:
                x, mode = pad_then(n, x, p), "valid"
            elif n.op == "max_pool2d" and _nonnegative(model, n.inputs[0]):
                x, mode = pad_then(n, x, p), "valid"  # zeros never win the max of a nonnegative map
            else:
                raise ConversionError(f"node {n.name!r}: {n.op} padding {p} (count_include_pad="
                                      f"{a.get('count_include_pad')}) has no exact Keras equivalent")
            y = P(tuple(k), tuple(s), padding=mode, name=kname(n.name))(x)
        elif n.op == "global_avg_pool":
            y = L.GlobalAveragePooling2D(keepdims=a["keepdims"], name=kname(n.name))(x)
        else:  # pragma: no cover - validate() rejects unknown ops
            raise ConversionError(f"node {n.name!r}: op {n.op!r} has no Keras equivalent")
        kt[n.output] = y
    km = keras.Model(inp, kt[model.output_name], name=kname("udfc_model"))
    for layer, ws in pending:
        want = [tuple(v.shape) for v in layer.weights]
        ws = [np.asarray(v, dtype=np.float32) for v in ws]
        if [v.shape for v in ws] != want:
            raise ConversionError(f"layer {layer.name!r}: weight shapes {[v.shape for v in ws]} do not match "
                                  f"Keras' {want}")
        layer.set_weights(ws)
    return km


def save_keras(src_path, out_path) -> None:
    """``to_model(src_path)`` saved as a ``.keras`` file at ``out_path``, atomically
    (a temp ``.keras`` file in the target directory, then ``os.replace``)."""
    inp = os.fspath(src_path) if isinstance(src_path, (str, os.PathLike)) else None
    out_path = check_output_path(out_path, inputs=(inp,))
    if not out_path.endswith(".keras"):
        raise ConversionError(f"output {out_path!r}: Keras 3 saves whole models as .keras files; use that suffix")
    km = to_model(src_path)
    d = os.path.dirname(os.path.abspath(out_path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out_path) + ".", suffix=".keras", dir=d)
    os.close(fd)
    try:
        km.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
