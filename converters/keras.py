"""Keras <-> udfc-ref converter.

``read`` turns a Keras model into a :class:`udfc_ref.Model`.  It reads a
``.keras`` archive or a legacy ``.h5`` file with ``zipfile``, ``json`` and
``h5py`` only (``keras_file.py``; Keras itself is *not* imported), or takes a
live ``keras.Model``.  Each Keras layer class has one small handler
(``keras_layers.py``); exact rewrites then shrink the graph
(``keras_passes.py``).

``to_model`` rebuilds a Keras functional model from a udfc-ref model (for
example a compressed one with fewer channels), one exporter per IR op
(``keras_export.py``); ``save_keras`` writes it to a ``.keras`` file, with
the original udfc-ref names recorded in the archive (``udfc_names.json``), after
loading the bytes back with Keras and with :func:`read` and checking both
against the NumPy forward.  Keras is imported lazily, only there; when
TensorFlow is absent and ``KERAS_BACKEND`` is unset, :func:`choose_backend`
picks the PyTorch backend first.

Layout (Keras is NHWC, the IR NCHW): a Keras value (H, W, C) is the IR value
(C, H, W); values of other ranks are the same in both.  Conv kernels
(kh, kw, in/g, out) become OIHW, depthwise kernels (kh, kw, C, m) become
(C*m, 1, kh, kw), dense kernels (in, out) become (out, in), and
``padding='same'`` follows TensorFlow's rule (total = max((ceil(n/s)-1)*s +
(k-1)*d + 1 - n, 0), top = total // 2), stored exactly as [t, b, l, r].
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import zipfile

import numpy as np

from udfc_ref.atomic import check_output_path, write_bytes_atomic
from udfc_ref.errors import ConversionError, GraphError
from udfc_ref.graph import Model

from . import keras_file
from .keras_file import NAMES_FILE, _history_names, parse_config  # noqa: F401  (re-exported)
from .keras_layers import HANDLERS, Builder, Val, same_padding  # noqa: F401  (re-exported)
from .keras_passes import simplify

__all__ = ["read", "export", "to_model", "save_keras", "choose_backend", "same_padding"]

_INSTALL_HINT = "pip install 'udfc-ref[keras]'"
#: relative error (max |diff| / max |reference|) above which a written file is refused
CHECK_RTOL = 1e-4
#: Keras backends tried, in order, when TensorFlow is absent and none is configured
FALLBACK_BACKENDS = ("torch", "jax")


def _configured_backend():
    """The backend named in Keras' config file (``$KERAS_HOME/keras.json`` or
    ``~/.keras/keras.json``), or None."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            b = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return b if isinstance(b, str) else None


def choose_backend() -> str | None:
    """Pick a Keras backend before Keras is first imported, when Keras' own
    default cannot work.

    Keras 3 uses ``KERAS_BACKEND``, else the ``backend`` of its config file,
    else TensorFlow.  When ``KERAS_BACKEND`` is unset, Keras is not imported
    yet and TensorFlow is not installed (checked with
    ``importlib.util.find_spec``, without importing it), this sets
    ``os.environ["KERAS_BACKEND"]`` to the config file's backend if that one
    is installed, else to the first installed of ``torch``, ``jax``.

    Returns
    -------
    str or None
        The backend set, or None when nothing was changed.
    """
    if os.environ.get("KERAS_BACKEND") or "keras" in sys.modules:
        return None
    if importlib.util.find_spec("tensorflow") is not None:
        return None
    cfg = _configured_backend()
    candidates = ((cfg,) if cfg not in (None, "tensorflow") else ()) + FALLBACK_BACKENDS
    for b in candidates:
        if b == "numpy" or importlib.util.find_spec(b) is not None:
            os.environ["KERAS_BACKEND"] = b
            return b
    return None


def _import_keras():
    """Import keras lazily (choosing a backend first); a missing keras is a
    ConversionError naming the extra."""
    choose_backend()
    try:
        import keras  # noqa: PLC0415
    except ImportError as e:
        raise ConversionError(
            f"Keras is needed for this conversion but cannot be imported ({e}); install it with {_INSTALL_HINT} "
            "and PyTorch or TensorFlow as its backend (KERAS_BACKEND=torch selects PyTorch)"
        ) from None
    return keras


# ===========================================================================
# Keras -> IR
# ===========================================================================

def _convert(cfg, store, names, keras_major, where, bar=None) -> Model:
    layers, in_name, (h, w, c), out_name = parse_config(cfg, where)
    if bar is not None:
        bar.total = max(len(layers), 1)
    b = Builder(where, keras_major)
    b.store = store
    b.reserved = {lay.name for lay in layers} | {in_name}
    b.vals[in_name] = Val(in_name, (c, h, w))
    b.shapes[in_name] = (c, h, w)
    for li, lay in enumerate(layers):
        if bar is not None:
            bar.update(li, lay.name)
        for i in lay.inbound:
            if i not in b.vals:
                raise ConversionError(f"{where}: layer {lay.name!r} reads {i!r}, which is not defined before it")
        handler = HANDLERS.get(lay.cls)
        if handler is None:
            raise ConversionError(f"{where}: layer {lay.name!r} of class {lay.cls} is not supported (supported: "
                                  "see docs/converters.md, Keras section)")
        if lay.cfg.get("data_format", "channels_last") not in (None, "channels_last"):
            raise b.err(lay, f"data_format {lay.cfg.get('data_format')!r} is not supported (channels_last only)")
        if not lay.inbound:
            raise b.err(lay, "has no tensor input")
        b.layer = lay
        b.vals[lay.name] = handler(b, lay, [b.vals[i] for i in lay.inbound])
    out = b.vals[out_name].name
    nodes, tensors, out = simplify(b.nodes, b.tensors, b.shapes, out, in_name)
    if out == in_name:
        raise ConversionError(f"{where}: the model has no computing layer")
    if names is not None:
        nodes, tensors, in_name, out = _restore_names(nodes, tensors, in_name, out, names)
    try:
        return Model(tensors, nodes, input_name=in_name, input_shape=(c, h, w), output_name=out)
    except GraphError as e:
        raise ConversionError(f"{where}: {e}") from None


def _restore_names(nodes, tensors, in_name, out, names):
    """Give nodes, values and tensors back the udfc-ref names recorded in
    ``udfc_names.json`` (keyed by Keras layer name).  A recorded name that
    would clash with one already in use is not applied."""
    entries = names.get("layers") if isinstance(names.get("layers"), dict) else {}
    inp = names.get("input") if isinstance(names.get("input"), dict) else {}
    value_map = {}
    if inp.get("keras") == in_name and isinstance(inp.get("name"), str):
        value_map[in_name] = inp["name"]
    node_names, tensor_map = {}, {}
    for n in nodes:
        e = entries.get(n.name)
        if not isinstance(e, dict):
            continue
        if isinstance(e.get("node"), str):
            node_names[n.name] = e["node"]
        if isinstance(e.get("output"), str):
            value_map[n.output] = e["output"]
        ts = e.get("tensors") if isinstance(e.get("tensors"), dict) else {}
        for role, t in n.params.items():
            if isinstance(ts.get(role), str):
                tensor_map.setdefault(t, ts[role])

    def injective(m, keep):
        """Drop renames whose target is taken by another (renamed or kept) name."""
        count: dict[str, int] = {}
        for old in keep:
            new = m.get(old, old)
            count[new] = count.get(new, 0) + 1
        return {k: v for k, v in m.items() if count[v] == 1}

    values = [in_name] + [n.output for n in nodes]
    value_map = injective(value_map, values)
    node_names = injective(node_names, [n.name for n in nodes])
    # names that stay win; a rename onto a name in use is applied only when the arrays are equal (a tensor
    # shared by several nodes in the source comes back as one); otherwise the tensor keeps its Keras name
    new_tensors = {t: a for t, a in tensors.items() if tensor_map.get(t, t) == t}
    for t, a in tensors.items():
        nt = tensor_map.get(t, t)
        if nt == t:
            continue
        if nt in new_tensors and not np.array_equal(new_tensors[nt], a):
            nt, i = t, 1
            while nt in new_tensors:
                nt, i = f"{t}_{i}", i + 1
        tensor_map[t] = nt
        new_tensors.setdefault(nt, a)
    for n in nodes:
        n.name = node_names.get(n.name, n.name)
        n.inputs = [value_map.get(i, i) for i in n.inputs]
        n.output = value_map.get(n.output, n.output)
        n.params = {r: tensor_map.get(t, t) for r, t in n.params.items()}
    return nodes, new_tensors, value_map.get(in_name, in_name), value_map.get(out, out)


def read(src, progress: bool = False) -> Model:
    """Read a Keras model into a :class:`udfc_ref.Model` (float32 weights, NCHW).

    Parameters
    ----------
    src : str, os.PathLike or keras.Model
        A ``.keras`` archive, a legacy ``.h5`` file (read with zipfile/h5py,
        no Keras import), or a live Sequential / functional ``keras.Model``.
        Names recorded by :func:`save_keras` (``udfc_names.json``) are restored.
    progress : bool
        A progress bar with a time estimate on stderr (a terminal, work over
        a second), one step per Keras layer.

    Raises
    ------
    ConversionError
        For a layer, activation, padding or layout the IR cannot represent
        (the message names the layer and its class).
    FormatError
        For an unreadable file.
    """
    if isinstance(src, (str, os.PathLike)):
        where = os.fspath(src)
        load = lambda: keras_file.read_file(where)  # noqa: E731
    elif hasattr(src, "get_config") and hasattr(src, "layers"):
        where = f"model {src.name!r}"
        load = lambda: keras_file.read_live(src, _import_keras())  # noqa: E731
    else:
        raise ConversionError(f"cannot read a Keras model from {type(src).__name__} (give a .keras / .h5 path or "
                              "a keras.Model)")
    from udfc_ref.progress import Progress  # noqa: PLC0415

    try:
        with Progress(1, "import keras", enabled=None if progress else False) as bar:
            bar.update(0, "reading the file")
            cfg, store, names, major = load()
            return _convert(cfg, store, names, major, where, bar)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ConversionError(f"{where}: malformed or unexpected Keras model config "
                              f"({type(e).__name__}: {e})") from None


def export(src, path, progress: bool = False) -> None:
    """``read(src)`` and write it as a udfc-ref file at ``path`` (atomically;
    ``path`` must not be ``src``); ``progress`` as for :func:`read`."""
    inp = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    check_output_path(path, inputs=(inp,))
    from udfc_ref.io import save  # noqa: PLC0415

    save(read(src, progress=progress), path, input_path=inp)


# ===========================================================================
# IR -> Keras
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
    raise ConversionError(f"expected a udfc-ref Model or a file path, got {type(src).__name__}")


def _build(model):
    from .keras_export import build  # noqa: PLC0415

    return build(model, _import_keras())


def to_model(path_or_model):
    """Build a Keras functional model computing the same function as a udfc-ref model.

    The Keras model takes NHWC input of shape (H, W, C); its predictions
    match ``model.forward`` on the transposed NCHW input.  Layer names are
    the node names where Keras accepts them, else safe replacements
    (``features.0`` -> ``features_0``, see ``keras_names.py``).

    Parameters
    ----------
    path_or_model : str, os.PathLike or udfc_ref.Model
        A udfc-ref file (``.keras`` / ``.h5`` are read with :func:`read`).

    Returns
    -------
    keras.Model
    """
    return _build(_as_model(path_or_model))[0]


def _relerr(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(got - ref).max() / scale)


def save_keras(src_path, out_path, progress: bool = False) -> None:
    """Write ``to_model(src_path)`` as a ``.keras`` file at ``out_path``.

    The archive gets one extra member, ``udfc_names.json``: per Keras layer,
    the udfc-ref node, value and tensor names it stands for, so that
    :func:`read` restores the original names.  Before anything is written the
    bytes are loaded back with ``keras.saving.load_model`` and with
    :func:`read`, and both forwards are checked against the NumPy forward on
    a seeded random batch (relative error <= ``CHECK_RTOL``); the file is
    then written atomically.  ``out_path`` must end in ``.keras`` and must
    not be the input.  ``progress``: a progress bar with a time estimate on
    stderr (a terminal, work over a second): one step per node, then the
    save, the two loads back and the check.
    """
    from udfc_ref.progress import Progress  # noqa: PLC0415

    inp = os.fspath(src_path) if isinstance(src_path, (str, os.PathLike)) else None
    out_path = check_output_path(out_path, inputs=(inp,))
    if not out_path.endswith(".keras"):
        raise ConversionError(f"output {out_path!r}: Keras 3 saves whole models as .keras files; use that suffix")
    model = _as_model(src_path)
    n = len(model.nodes)
    with Progress(n + 3, "export keras", enabled=None if progress else False) as bar:
        from .keras_export import build  # noqa: PLC0415

        keras = _import_keras()
        km, names = build(model, keras, bar)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2,) + tuple(model.input_shape)).astype(np.float32)
        ref = model.forward(x)
        with tempfile.TemporaryDirectory(prefix="udfc-keras-") as d:
            tmp = os.path.join(d, "model.keras")
            bar.update(n, "saving the archive")
            try:
                km.save(tmp)
                with zipfile.ZipFile(tmp, "a") as z:
                    z.writestr(NAMES_FILE, json.dumps(names, ensure_ascii=True))
            except OSError as e:
                raise ConversionError(f"cannot write the Keras archive ({e})") from None
            bar.update(n + 1, "loading it back with Keras")
            try:
                back = keras.saving.load_model(tmp)
                got = keras.ops.convert_to_numpy(back(x.transpose(0, 2, 3, 1), training=False))
            except Exception as e:  # noqa: BLE001 - whatever Keras raises, nothing is written
                msg = str(e).splitlines()[0] if str(e) else ""
                raise ConversionError(f"the written Keras model does not load back ({type(e).__name__}: {msg}); "
                                      "nothing was written") from None
            bar.update(n + 2, "reading it back and checking")
            ours = read(tmp)
            for what, y in (("keras.saving.load_model", _nhwc_to_ir(got, ref)), ("converters.keras.read",
                                                                                 ours.forward(x))):
                err = _relerr(y, ref)
                if not np.isfinite(err) or err > CHECK_RTOL:
                    raise ConversionError(f"the written Keras model, loaded with {what}, differs from the "
                                          f"udfc-ref forward by {err:.3g} of max |output| (tolerance {CHECK_RTOL}); "
                                          "nothing was written")
            with open(tmp, "rb") as f:
                data = f.read()
    write_bytes_atomic(out_path, data)


def _nhwc_to_ir(y, ref):
    """A Keras output -> IR layout (rank-3 values are (H, W, C) in Keras)."""
    y = np.asarray(y)
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 and np.ndim(ref) == 4 else y

