"""keras.applications as they come: import, parity, compression, and back to Keras.

Six Keras applications with ``weights=None`` and their default heads
(``include_top=True``, ``classifier_activation="softmax"``), shrunk only in
size (input at or near each model's minimum, 10 classes, ``alpha`` for the
MobileNets), BatchNorm moving statistics / gamma / beta and Normalization
mean / variance randomised so that nothing is degenerate.  For each model:
read from a saved ``.keras`` file and from the live model, the NumPy forward
matches Keras' on random input (output and pre-softmax logits), compression
at 30 % pruning + 6-bit (udfc) prunes channels, and the compressed model
written back to ``.keras`` loads with plain ``keras.saving.load_model`` and
matches its NumPy forward.  Each model is built and compressed once per
module (fixtures); one batch of two small inputs.
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

import udfc_ref  # noqa: E402
from converters import keras as ck  # noqa: E402

L = keras.layers
A = keras.applications
TOL = 1e-4

#: name -> (application, keyword arguments besides weights=None, classes=10)
ZOO = {
    "MobileNetV2": (A.MobileNetV2, dict(input_shape=(32, 32, 3), alpha=0.35)),
    "ResNet50": (A.ResNet50, dict(input_shape=(32, 32, 3))),
    "DenseNet121": (A.DenseNet121, dict(input_shape=(32, 32, 3))),
    "EfficientNetB0": (A.EfficientNetB0, dict(input_shape=(32, 32, 3))),
    "MobileNetV3Small": (A.MobileNetV3Small, dict(input_shape=(32, 32, 3), alpha=0.75)),
    "Xception": (A.Xception, dict(input_shape=(71, 71, 3))),
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomise(km, rng):
    """BN: gamma U(0.5, 1.5), beta and moving mean N(0, 0.5), moving variance U(0.5, 2);
    Normalization: mean U(0.3, 0.7), variance U(0.04, 0.09) (image-like inputs in [0, 1])."""
    for layer in km.layers:
        if isinstance(layer, L.BatchNormalization):
            new = {"gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.normal(0, 0.5, s),
                   "moving_mean": lambda s: rng.normal(0, 0.5, s),
                   "moving_variance": lambda s: rng.uniform(0.5, 2.0, s)}
        elif isinstance(layer, L.Normalization):
            new = {"mean": lambda s: rng.uniform(0.3, 0.7, s), "variance": lambda s: rng.uniform(0.04, 0.09, s)}
        else:
            continue
        old = layer.get_weights()
        layer.set_weights([new[v.name](w.shape).astype(w.dtype) if v.name in new else w
                           for v, w in zip(layer.weights, old)])


def keras_logits(km, x):
    """Keras' pre-softmax logits: the input of a final Activation('softmax'), or the
    features into a final Dense(activation='softmax') times its kernel plus bias."""
    last = km.layers[-1]
    sub = keras.Model(km.input, last.input)
    z = keras.ops.convert_to_numpy(sub(x, training=False)).astype(np.float64)
    if isinstance(last, L.Dense):
        assert last.get_config()["activation"] == "softmax"
        kern, bias = last.get_weights()
        z = z @ kern + bias
    return z


def ir_logits(model, x):
    """The input of the IR's final softmax."""
    out = model.producer(model.output_name)
    assert out.op == "softmax"
    return model.forward(x, return_values=True)[out.inputs[0]]


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def build(name):
    """The application ``name`` randomised (seeded by its name) and a batch of two inputs."""
    cls, kw = ZOO[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    km = cls(weights=None, classes=10, **kw)
    randomise(km, rng)
    x = rng.uniform(0, 255, size=(2,) + kw["input_shape"]).astype("float32")
    if not isinstance(km.layers[1], L.Rescaling):  # models without their own preprocessing
        x = (x - 127.5) / 64.0
    return km, x


@pytest.fixture(scope="module", params=list(ZOO))
def zoo(request, tmp_path_factory):
    """Per model: the Keras model, a random batch, Keras' output and logits, the saved
    .keras file, and the model compressed at 30 % + 6-bit."""
    name = request.param
    km, x = build(name)
    path = str(tmp_path_factory.mktemp(name) / f"{name}.keras")
    km.save(path)
    out = {"name": name, "keras": km, "x": x, "path": path,
           "y": keras.ops.convert_to_numpy(km(x, training=False)), "logits": keras_logits(km, x)}
    out["model"] = ck.read(path)
    out["small"], out["report"] = udfc_ref.compress(out["model"], prune_ratio=0.3, weight_bits=6, method="udfc")
    return out


def test_import_parity(zoo):
    """From the saved .keras file and from the live model: output and logits match Keras."""
    for m in (zoo["model"], ck.read(zoo["keras"])):
        assert rel(m.forward(nchw(zoo["x"])), zoo["y"]) <= TOL
        assert rel(ir_logits(m, nchw(zoo["x"])), zoo["logits"]) <= TOL
        assert m.input_shape == (3,) + zoo["x"].shape[1:3]


def test_compressed_channels_pruned(zoo):
    """30 % + 6-bit prunes output channels of some layers (fewer MACs) and quantizes the rest."""
    m, small = zoo["model"], zoo["small"]
    pruned = [n for n in m.nodes if n.op in ("conv2d", "linear")
              and small.tensors[small.node(n.name).params["weight"]].shape[0] < m.tensors[n.params["weight"]].shape[0]]
    assert pruned, zoo["report"].format()
    assert small.flops() < m.flops()
    assert small.quant and all(q.bits == 6 for q in small.quant.values())


def test_compressed_back_to_keras(zoo, tmp_path):
    """The compressed model written as .keras loads with plain keras.saving.load_model and
    matches the NumPy forward of the compressed model (output and logits)."""
    small, x = zoo["small"], zoo["x"]
    out = str(tmp_path / "small.keras")
    ck.save_keras(small, out)
    k = keras.saving.load_model(out)
    assert rel(keras.ops.convert_to_numpy(k(x, training=False)), small.forward(nchw(x))) <= TOL
    last = k.layers[-1]
    assert isinstance(last, L.Softmax)
    z = keras.ops.convert_to_numpy(keras.Model(k.input, last.input)(x, training=False))
    assert rel(z, ir_logits(small, nchw(x))) <= TOL
    # the original layer and tensor names come back on reading (udfc_names.json in the archive)
    back = ck.read(out)
    assert set(back.tensors) == set(small.tensors)
    assert {n.name for n in back.nodes} == {n.name for n in small.nodes}


def _table(tmp):  # pragma: no cover - `python tests/test_zoo_keras.py` prints the per-model measurements
    import time

    rows = []
    for name in ZOO:
        km, x = build(name)
        path = os.path.join(tmp, f"{name}.keras")
        km.save(path)
        y = keras.ops.convert_to_numpy(km(x, training=False))
        t0 = time.perf_counter()
        model = ck.read(path)
        ti = time.perf_counter() - t0
        t0 = time.perf_counter()
        small, _ = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6, method="udfc")
        tc = time.perf_counter() - t0
        out = os.path.join(tmp, f"{name}_small.keras")
        t0 = time.perf_counter()
        ck.save_keras(small, out)
        te = time.perf_counter() - t0
        k = keras.saving.load_model(out)
        back = rel(keras.ops.convert_to_numpy(k(x, training=False)), small.forward(nchw(x)))
        layers = [n.name for n in model.nodes if n.op in ("conv2d", "linear")]
        rows.append(f"| {name} | {rel(model.forward(nchw(x)), y):.1e} | {back:.1e} | "
                    f"{len(small.record.get('layers', {}))} / {len(layers)} | {small.flops() / model.flops():.3f} | "
                    f"{small.param_count() / model.param_count():.3f} | {ti:.2f} | {tc:.2f} | {te:.2f} |")
    head = ("| model | import parity | round-trip parity | layers pruned / conv+linear | MACs kept | params kept | "
            "import s | compress s | export .keras s |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + rows)


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(_table(d))
