"""Keras converter: .keras / legacy .h5 / live models -> IR -> Keras, checked by real forwards."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

os.environ["KERAS_BACKEND"] = "torch"

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")

import udfc_ref  # noqa: E402
from converters import keras as ck  # noqa: E402
from udfc_ref.errors import ConversionError, OptionError  # noqa: E402

L = keras.layers
TOL = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomise(model, seed):
    """Seeded weights; BN gets non-trivial gamma/beta and moving statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if isinstance(layer, L.BatchNormalization):
            new = []
            for v, w in zip(layer.weights, ws):
                p = v.path.split("/")[-1]
                if p == "moving_variance":
                    new.append(rng.uniform(0.5, 2.0, w.shape))
                elif p == "gamma":
                    new.append(rng.uniform(0.5, 1.5, w.shape))
                else:
                    new.append(rng.normal(0, 0.5, w.shape))
        else:
            new = [rng.normal(0, 1.0 / np.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape) for w in ws]
        layer.set_weights([n.astype("float32") for n in new])
    return model


def predict(km, x_nhwc):
    return keras.ops.convert_to_numpy(km(x_nhwc, training=False))


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def sequential_cnn():
    """Conv 'same' stride 2 on an odd size with an even kernel (asymmetric pad 1/2),
    BN, ReLU, 'same' max pool (asymmetric), ZeroPadding2D folded into a conv,
    fused relu, ReLU6, Dropout, Flatten -> Dense."""
    m = keras.Sequential([
        keras.Input((11, 11, 3)),
        L.Conv2D(8, 4, strides=2, padding="same", use_bias=False, name="conv_a"),  # 11 -> 6, pad 1/2
        L.BatchNormalization(name="bn_a"),
        L.ReLU(name="relu_a"),
        L.MaxPooling2D(2, strides=1, padding="same", name="pool_a"),  # 6 -> 6, pad 0/1
        L.ZeroPadding2D(((1, 0), (0, 1)), name="zpad"),
        L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_b"),  # 7 -> 4
        L.BatchNormalization(center=False, epsilon=1e-2, name="bn_b"),
        L.ReLU(max_value=6.0, name="relu6_b"),
        L.Dropout(0.5, name="drop"),
        L.Flatten(name="flat"),
        L.Dense(10, name="fc"),
    ], name="seq_cnn")
    return randomise(m, 1)


def functional_net():
    """Residual Add, Concatenate, DepthwiseConv2D (multiplier 2), average pool
    'same', GlobalAveragePooling2D (keepdims) -> Flatten -> Dense."""
    i = keras.Input((9, 9, 4), name="img")
    t = L.Conv2D(8, 3, padding="same", name="stem")(i)
    t = L.BatchNormalization(scale=False, name="stem_bn")(t)
    t = L.Activation("relu", name="stem_act")(t)
    d = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(t)
    d = L.BatchNormalization(name="dw_bn")(d)
    d = L.Activation("relu6", name="dw_act")(d)
    d = L.Conv2D(8, 1, name="project")(d)
    d = L.BatchNormalization(name="project_bn")(d)
    r = L.Add(name="res")([t, d])
    b = L.ZeroPadding2D(1, name="side_pad")(t)
    b = L.Conv2D(4, 3, activation="relu", name="side")(b)
    c = L.Concatenate(name="cat")([r, b])
    c = L.Conv2D(12, 3, strides=2, padding="same", name="down")(c)  # 9 -> 5
    c = L.BatchNormalization(name="down_bn")(c)
    c = L.ReLU(name="down_relu")(c)
    c = L.AveragePooling2D(3, strides=2, padding="same", name="avg")(c)  # 5 -> 3, pad 1/1
    g = L.GlobalAveragePooling2D(keepdims=True, name="gap")(c)
    g = L.Flatten(name="flat")(g)
    o = L.Dense(7, name="head")(g)
    return randomise(keras.Model(i, o, name="func_net"), 2)


def gap_net():
    """ZeroPadding2D -> MaxPooling2D after a ReLU (ResNet's pool1_pad), GlobalAveragePooling2D
    without keepdims straight into Dense, Dense with relu."""
    i = keras.Input((6, 6, 3), name="x")
    t = L.Conv2D(5, 3, name="c")(i)
    t = L.BatchNormalization(name="bn")(t)
    t = L.ReLU(name="r")(t)
    t = L.ZeroPadding2D(1, name="pool_pad")(t)
    t = L.MaxPooling2D(3, strides=2, name="pool")(t)
    t = L.GlobalAveragePooling2D(name="gap")(t)
    t = L.Dense(6, activation="relu", name="fc1")(t)
    return randomise(keras.Model(i, L.Dense(3, name="fc2")(t)), 3)


BUILDERS = {"sequential": sequential_cnn, "functional": functional_net, "gap": gap_net}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every test model saved as .keras and legacy .h5, with its Keras predictions."""
    d = tmp_path_factory.mktemp("keras_models")
    out = {}
    rng = np.random.default_rng(0)
    for name, build in BUILDERS.items():
        km = build()
        x = rng.normal(size=(4,) + tuple(km.input_shape[1:])).astype("float32")
        p_keras, p_h5 = str(d / f"{name}.keras"), str(d / f"{name}.h5")
        km.save(p_keras)
        km.save(p_h5)  # Keras 3 still writes the legacy HDF5 layout (model_config + model_weights)
        out[name] = {"model": km, "x": x, "y": predict(km, x), "keras": p_keras, "h5": p_h5}
    return out


# --------------------------------------------------------------------- read

@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("source", ["keras", "h5", "live"])
def test_read_matches_keras_predict(saved, name, source):
    s = saved[name]
    src = s["model"] if source == "live" else s[source]
    m = ck.read(src)
    y = m.forward(nchw(s["x"]))
    assert y.shape == s["y"].shape
    assert rel(y, s["y"]) <= TOL


def test_files_untouched_and_layout(saved):
    s = saved["sequential"]
    before = open(s["keras"], "rb").read()
    m = ck.read(s["keras"])
    assert open(s["keras"], "rb").read() == before
    conv_a = m.node("conv_a")
    assert conv_a.attrs["padding"] == [1, 2, 1, 2]  # TF 'same': total 3 -> top 1, bottom 2
    assert conv_a.attrs["stride"] == [2, 2]
    assert "bias" not in conv_a.params
    assert m.node("pool_a").attrs["padding"] == [0, 1, 0, 1]
    # ZeroPadding2D((1, 0), (0, 1)) folded into conv_b's own 'same' padding (7x7 padded input -> 1/1)
    assert m.node("conv_b").attrs["padding"] == [2, 1, 1, 2]
    assert m.node("conv_b.relu").op == "relu" and m.node("relu6_b").op == "relu6"
    assert m.node("bn_b").attrs["eps"] == pytest.approx(1e-2)
    assert m.node("bn_a").attrs["eps"] == pytest.approx(1e-3)
    np.testing.assert_array_equal(m.tensors["bn_b.bias"], 0.0)  # center=False -> beta 0
    kern = s["model"].get_layer("conv_a").get_weights()[0]
    np.testing.assert_array_equal(m.tensors["conv_a.weight"], kern.transpose(3, 2, 0, 1))
    assert set(m.tensors) >= {"conv_a.weight", "bn_a.weight", "bn_a.bias", "bn_a.running_mean",
                              "bn_a.running_var", "fc.weight", "fc.bias"}
    assert m.input_shape == (3, 11, 11)


def test_depthwise_and_flatten_layout(saved):
    s = saved["functional"]
    m = ck.read(s["h5"])
    dw = m.node("dw")
    assert dw.attrs["groups"] == 8 and m.tensors["dw.weight"].shape == (16, 1, 3, 3)
    k = s["model"].get_layer("dw").get_weights()[0]  # (kh, kw, in, mult)
    c, mult = 5, 1  # Keras output channel c*mult + m
    np.testing.assert_array_equal(m.tensors["dw.weight"][c * 2 + mult, 0], k[:, :, c, mult])
    np.testing.assert_array_equal(m.tensors["stem_bn.weight"], 1.0)  # scale=False -> gamma 1
    # Flatten of an (H, W, C) map: the Dense columns are permuted to (C, H, W)
    seq = saved["sequential"]
    ms = ck.read(seq["keras"])
    kern = seq["model"].get_layer("fc").get_weights()[0]  # (4*4*6, 10), rows (h, w, c)
    h, w, ch = 2, 3, 4
    np.testing.assert_array_equal(ms.tensors["fc.weight"][:, ch * 16 + h * 4 + w], kern[(h * 4 + w) * 6 + ch])


@settings(max_examples=8, deadline=None)
@given(n=st.integers(3, 9), k=st.integers(1, 4), s=st.integers(1, 3), pool=st.sampled_from(["conv", "max"]),
       seed=st.integers(0, 2 ** 16))
def test_same_padding_matches_keras(n, k, s, pool, seed):
    """Keras 'same' (TF rule, asymmetric when the total is odd) is represented exactly."""
    layer = L.Conv2D(2, k, strides=s, padding="same") if pool == "conv" else L.MaxPooling2D(k, s, padding="same")
    km = randomise(keras.Sequential([keras.Input((n, n, 2)), layer]), seed)
    x = np.random.default_rng(seed).normal(size=(2, n, n, 2)).astype("float32")
    assert rel(ck.read(km).forward(nchw(x)), nchw(predict(km, x))) <= TOL


def test_chunked_legacy_layer_names(saved, tmp_path):
    """Large legacy files split layer_names into layer_names0, layer_names1 ..."""
    import h5py

    s = saved["functional"]
    p = str(tmp_path / "chunked.h5")
    shutil.copy(s["h5"], p)
    with h5py.File(p, "r+") as f:
        g = f["model_weights"]
        names = list(g.attrs["layer_names"])
        del g.attrs["layer_names"]
        g.attrs["layer_names0"] = names[:3]
        g.attrs["layer_names1"] = names[3:]
    assert rel(ck.read(p).forward(nchw(s["x"])), s["y"]) <= TOL


def test_keras2_style_config(saved, tmp_path):
    """tf.keras 2 configs: list-style inbound_nodes, batch_input_shape, 'name:0' weight names."""
    import h5py

    s = saved["functional"]
    p = str(tmp_path / "k2.h5")
    shutil.copy(s["h5"], p)
    with h5py.File(p, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for lj in cfg["config"]["layers"]:
            if lj["class_name"] == "InputLayer":
                lj["config"]["batch_input_shape"] = lj["config"].pop("batch_shape")
            names = []
            ck._history_names(lj.get("inbound_nodes", []), names)
            lj["inbound_nodes"] = [[[n, 0, 0, {}] for n in names]] if names else []
        cfg["config"]["output_layers"] = [cfg["config"]["output_layers"]]
        f.attrs["model_config"] = json.dumps(cfg)
        # tf.keras 2 weight names: <layer>/<layer>/kernel:0, depthwise_kernel:0; list them in reverse so
        # that only name matching (not the order) assigns them correctly
        g = f["model_weights"]
        for lname in [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]:
            lg = g[lname]
            names = [n.decode() if isinstance(n, bytes) else n for n in lg.attrs["weight_names"]]
            new = []
            for wn in names:
                data = lg[wn][()]
                del lg[wn]
                suffix = wn.split("/")[-1]
                if lname == "dw" and suffix == "kernel":
                    suffix = "depthwise_kernel"
                lg[f"{lname}/{suffix}:0"] = data
                new.append(f"{lname}/{suffix}:0")
            lg.attrs["weight_names"] = [n.encode() for n in new[::-1]]
    assert rel(ck.read(p).forward(nchw(s["x"])), s["y"]) <= TOL


def test_keras_archive_without_var_names(saved, tmp_path):
    """Older Keras 3 weight files lack the 'name' attribute on the vars groups:
    the groups are then matched by Keras' snake_case(class)_N naming."""
    import io
    import zipfile

    import h5py

    s = saved["functional"]
    p = str(tmp_path / "old.keras")
    with zipfile.ZipFile(s["keras"]) as z:
        files = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO(files["model.weights.h5"])
    with h5py.File(buf, "r+") as f:
        f.visititems(lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None)
        left = []
        f.visititems(lambda n, o: left.append(n) if "name" in o.attrs else None)
        assert not left and "layers/conv2d_1/vars" in f
    files["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(p, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    assert rel(ck.read(p).forward(nchw(s["x"])), s["y"]) <= TOL


# ------------------------------------------------------------ unsupported

def _one_layer(layer, shape=(6, 6, 3)):
    return keras.Sequential([keras.Input(shape), L.Conv2D(4, 3, name="ok"), layer])


@pytest.mark.parametrize("layer, words", [
    (L.Conv2DTranspose(2, 3, name="deconv"), ["deconv", "Conv2DTranspose"]),
    (L.LeakyReLU(name="leaky_layer"), ["leaky_layer", "LeakyReLU"]),
    (L.ReLU(negative_slope=0.1, name="leaky"), ["leaky", "negative_slope"]),
    (L.ReLU(max_value=4.0, name="relu4"), ["relu4", "max_value"]),
    (L.ReLU(threshold=0.5, name="thr"), ["thr", "threshold"]),
    (L.Activation("tanh", name="tanh_act"), ["tanh_act", "tanh"]),
    (L.Conv2D(2, 3, activation="elu", name="econv"), ["econv", "elu"]),
    (L.BatchNormalization(axis=1, name="bn1"), ["bn1", "axis"]),
    (L.LayerNormalization(axis=[1, 2], name="ln12"), ["ln12", "axis"]),
    pytest.param(lambda: L.LayerNormalization(rms_scaling=True, name="rms"), ["rms", "rms_scaling"],
                  marks=pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")),
    (L.Normalization(axis=(1, 2), mean=0.0, variance=1.0, name="norm12"), ["norm12", "axis"]),
    (L.Rescaling(np.arange(64, dtype="float32").reshape(4, 4, 4), name="resc"), ["resc", "more than one axis"]),
])
def test_unsupported_layer_named(tmp_path, layer, words):
    km = _one_layer(layer() if callable(layer) and not isinstance(layer, L.Layer) else layer)
    p = str(tmp_path / "bad.keras")
    km.save(p)
    for src in (p, km):
        with pytest.raises(ConversionError) as e:
            ck.read(src)
        for w in words:
            assert w in str(e.value)


def test_zero_padding_before_max_pool_stays_explicit():
    """ZeroPadding2D -> MaxPooling2D of a map that may be negative: zeros can win the max,
    so the pad stays an explicit `pad` node (the pool pads with -inf) and the result is exact."""
    km = randomise(keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(2, 1, name="c"), L.ZeroPadding2D(1, name="zp"),
                                     L.MaxPooling2D(3, 2, name="mp")]), 4)
    m = ck.read(km)
    assert [n.op for n in m.nodes] == ["conv2d", "pad", "max_pool2d"]
    assert m.node("mp").attrs["padding"] == [0, 0, 0, 0]
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    assert rel(m.forward(nchw(x)), nchw(predict(km, x))) <= 1e-5
    assert rel(predict(ck.to_model(m), x), predict(km, x)) <= 1e-5


def test_flatten_anywhere_and_refusals(tmp_path):
    """A Flatten of an (H, W, C) map feeding a BN, or being the output, is exact
    (permute to Keras' (h, w, c) order first); RNNs and channels_first are refused."""
    rng = np.random.default_rng(7)
    for km in (keras.Sequential([keras.Input((4, 4, 2)), L.Conv2D(3, 1, name="c"), L.Flatten(name="f"),
                                 L.BatchNormalization(name="bnf")]),
               keras.Sequential([keras.Input((4, 4, 2)), L.Conv2D(3, 1, name="c"), L.Flatten(name="f_out")])):
        randomise(km, 7)
        x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
        m = ck.read(km)
        assert "permute" in [n.op for n in m.nodes]
        assert rel(m.forward(nchw(x)), predict(km, x)) <= 1e-5
    km = keras.Sequential([keras.Input((5, 3)), L.LSTM(2, name="rnn")])
    with pytest.raises(ConversionError):
        ck.read(km)
    i = keras.Input((6, 6, 3))
    km = keras.Model(i, L.Conv2D(2, 3, data_format="channels_first", name="cf")(i))
    with pytest.raises(ConversionError, match="cf.*channels_first"):
        ck.read(km)
    km = keras.Sequential([keras.Input((6, 6, 3)), L.Dropout(0.5, name="d")])
    with pytest.raises(ConversionError, match="no computing layer"):
        ck.read(km)


def test_bad_files_are_udfc_errors(saved, tmp_path):
    import zipfile

    from udfc_ref.errors import FormatError

    p = str(tmp_path / "junk.keras")
    open(p, "wb").write(b"not a model")
    with pytest.raises(FormatError):
        ck.read(p)
    with pytest.raises(FormatError):
        ck.read(str(tmp_path / "missing.keras"))
    q = str(tmp_path / "broken.keras")
    with zipfile.ZipFile(saved["gap"]["keras"]) as z, zipfile.ZipFile(q, "w") as out:
        cfg = json.loads(z.read("config.json"))
        del cfg["config"]["layers"][1]["config"]["kernel_size"]
        out.writestr("config.json", json.dumps(cfg))
        out.writestr("model.weights.h5", z.read("model.weights.h5"))
    with pytest.raises(ConversionError, match="kernel_size"):
        ck.read(q)
    r = str(tmp_path / "noweights.keras")
    with zipfile.ZipFile(r, "w") as out:
        out.writestr("config.json", json.dumps(cfg))
    with pytest.raises(FormatError, match="model.weights.h5"):
        ck.read(r)


# ---------------------------------------------------------------- to_model

@pytest.mark.parametrize("name", list(BUILDERS))
def test_to_model_roundtrip(saved, name, tmp_path):
    s = saved[name]
    m = ck.read(s["keras"])
    k2 = ck.to_model(m)
    assert rel(predict(k2, s["x"]), s["y"]) <= TOL
    assert k2.count_params() == m.param_count()  # BN moving stats counted on both sides
    # through a udfc-ref file and a saved .keras file
    f = str(tmp_path / "m.safetensors")
    ck.export(s["keras"], f)
    assert rel(udfc_ref.load(f).forward(nchw(s["x"])), s["y"]) <= TOL
    out = str(tmp_path / "back.keras")
    ck.save_keras(f, out)
    k3 = keras.saving.load_model(out)
    assert rel(predict(k3, s["x"]), s["y"]) <= TOL
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_outputs_never_overwrite_inputs(saved, tmp_path):
    s = saved["gap"]
    p = str(tmp_path / "g.keras")
    shutil.copy(s["keras"], p)
    before = open(p, "rb").read()
    with pytest.raises(OptionError):
        ck.export(p, p)
    f = str(tmp_path / "g.safetensors")
    ck.export(p, f)
    with pytest.raises(OptionError):
        ck.save_keras(f, f)
    assert open(p, "rb").read() == before


def test_to_model_grouped_and_explicit_padding():
    """Torch-style IR (symmetric padding 1 on stride-2 convs and pools, a
    non-depthwise grouped conv) rebuilt in Keras with ZeroPadding2D."""
    rng = np.random.default_rng(5)
    f32 = lambda *s: rng.normal(size=s).astype("float32")  # noqa: E731
    tensors = {"c1.weight": f32(8, 3, 3, 3), "c1.bias": f32(8), "g.weight": f32(8, 4, 3, 3),
               "fc.weight": f32(4, 8 * 2 * 2), "fc.bias": f32(4)}
    N = udfc_ref.Node
    nodes = [
        N("c1", "conv2d", ["input"], "c1", {"stride": 2, "padding": 1}, {"weight": "c1.weight", "bias": "c1.bias"}),
        N("r1", "relu", ["c1"], "r1"),
        N("p1", "max_pool2d", ["r1"], "p1", {"kernel": 3, "stride": 2, "padding": 1}),
        N("g", "conv2d", ["p1"], "g", {"padding": [0, 1, 1, 0], "groups": 2}, {"weight": "g.weight"}),
        N("a", "avg_pool2d", ["g"], "a", {"kernel": 2, "stride": 1, "padding": [1, 1, 1, 1]}),
        N("fl", "flatten", ["a"], "fl"),
        N("fc", "linear", ["fl"], "fc", {}, {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    m = udfc_ref.Model(tensors, nodes, input_shape=(3, 7, 7))
    assert m.shapes["a"] == (8, 2, 2) or m.shapes["fl"] == (32,)
    x = rng.normal(size=(3, 3, 7, 7)).astype("float32")
    k = ck.to_model(m)
    assert rel(predict(k, x.transpose(0, 2, 3, 1)), m.forward(x)) <= TOL
    assert k.count_params() == m.param_count()


def test_to_model_refuses_inexact_max_pool_padding():
    rng = np.random.default_rng(6)
    m = udfc_ref.Model({"c.weight": rng.normal(size=(2, 1, 1, 1)).astype("float32")}, [
        udfc_ref.Node("c", "conv2d", ["input"], "c", {}, {"weight": "c.weight"}),
        udfc_ref.Node("p", "max_pool2d", ["c"], "p", {"kernel": 3, "stride": 2, "padding": 1}),
    ], input_shape=(1, 4, 4))  # 'same' would pad 0/1 here, and the input may be negative
    with pytest.raises(ConversionError, match="'p'"):
        ck.to_model(m)


def test_importable_without_keras(saved, tmp_path):
    """read() needs no keras; to_model names the extra when keras is missing."""
    code = (
        "import sys; sys.modules['keras'] = None\n"
        "from converters import keras as ck\n"
        "from udfc_ref.errors import ConversionError\n"
        f"m = ck.read({saved['functional']['keras']!r})\n"
        "assert 'keras' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "try:\n    ck.to_model(m)\nexcept ConversionError as e:\n    print('ERR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "udfc-ref[keras]" in r.stdout


# ---------------------------------------------------------------- compress

@pytest.mark.parametrize("name", ["sequential", "functional"])
def test_compressed_to_keras(saved, name):
    s = saved[name]
    m = ck.read(s["keras"])
    small, _ = udfc_ref.compress(m, prune_ratio=0.3, weight_bits=6, method="udfc")
    assert small.param_count() < m.param_count()
    k = ck.to_model(small)
    assert rel(predict(k, s["x"]), small.forward(nchw(s["x"]))) <= TOL
    # both sides count every weight, bias and BN tensor (gamma, beta, moving mean and variance)
    assert k.count_params() == small.param_count()


def test_cli_import_compress_export(saved, tmp_path):
    """`udfc import keras`, `udfc compress IN.keras` and `udfc export keras` end to end."""
    from udfc_ref.cli import main

    s = saved["sequential"]

    def udfc(*args):
        assert main(list(args)) == 0

    imp, small, back = (str(tmp_path / n) for n in ("m.safetensors", "small.safetensors", "small.keras"))
    udfc("import", "keras", s["h5"], imp)
    assert rel(udfc_ref.load(imp).forward(nchw(s["x"])), s["y"]) <= TOL
    udfc("compress", "--prune-ratio", "0.3", "--weight-bits", "6", s["keras"], small)
    udfc("export", "keras", small, back)
    sm = udfc_ref.load(small)
    k = keras.saving.load_model(back)
    assert rel(predict(k, s["x"]), sm.forward(nchw(s["x"]))) <= TOL
    assert k.count_params() == sm.param_count() < ck.read(s["keras"]).param_count()


# ------------------------------------------------------ one parity test per layer class

def _normalization_adapted():
    layer = L.Normalization(axis=-1, name="norm")
    km = keras.Sequential([keras.Input((5, 6, 3)), layer])
    mean, var, count = layer.get_weights()
    layer.set_weights([np.array([0.5, -1.0, 2.0], mean.dtype), np.array([4.0, 0.25, 0.0], var.dtype), count])
    return km


def _se_block(x):
    """EfficientNet's squeeze-excitation: GAP -> Reshape((1, 1, C)) -> conv(silu) -> conv(sigmoid) -> Multiply."""
    s = L.GlobalAveragePooling2D(name="se_squeeze")(x)
    s = L.Reshape((1, 1, 3), name="se_reshape")(s)
    s = L.Conv2D(2, 1, activation="silu", name="se_reduce")(s)
    s = L.Conv2D(3, 1, activation="sigmoid", name="se_expand")(s)
    return L.Multiply(name="se_excite")([x, s])


def _hard_sigmoid_gate(x):
    """MobileNetV3 (Keras 3): hard_sigmoid(x) = ReLU(6)(x + 3.0) * (1 / 6), as keras.ops in the graph."""
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = L.Conv2D(3, 1, name="se_conv")(s)
    return L.Multiply(name="se_mul")([x, L.ReLU(6.0, name="se_relu6")(s + 3.0) * (1.0 / 6.0)])


def _fn(f, shape=(5, 6, 3)):
    def build():
        i = keras.Input(shape, name="x")
        return keras.Model(i, f(i))
    return build


#: case -> (builder, IR ops expected after reading)
LAYER_CASES = {
    "Softmax": (_fn(lambda x: L.Softmax(axis=1, name="sm")(L.Conv2D(4, 1, name="c")(x))), ["conv2d", "softmax"]),
    "Dense(softmax)": (_fn(lambda x: L.Dense(7, activation="softmax", name="fc")(L.GlobalAveragePooling2D()(x))),
                       ["global_avg_pool", "linear", "softmax"]),
    "Conv2D(softmax)": (_fn(lambda x: L.Conv2D(4, 3, activation="softmax", name="c")(x)), ["conv2d", "softmax"]),
    "Activation(softmax)": (_fn(lambda x: L.Activation("softmax")(x)), ["softmax"]),
    "Rescaling": (_fn(lambda x: L.Rescaling(1 / 127.5, offset=-1.0)(x)), ["affine"]),
    "Rescaling(per-channel)": (_fn(lambda x: L.Rescaling(np.array([0.5, 2, 3], "float32"),
                                                         offset=np.array([1, 2, -1], "float32"))(x)), ["affine"]),
    "Normalization(adapted)": (_normalization_adapted, ["affine"]),
    "Normalization(mean, variance)": (_fn(lambda x: L.Normalization(mean=[1.0, 2, 3], variance=[4.0, 0, 1e-20])(x)),
                                      ["affine"]),
    "Normalization(invert)": (_fn(lambda x: L.Normalization(mean=[1.0, 2, 3], variance=[4.0, 2, 1],
                                                            invert=True)(x)), ["affine"]),
    "ZeroPadding2D": (_fn(lambda x: L.Conv2D(4, 3, strides=2, name="c")(L.ZeroPadding2D(((0, 1), (1, 2)))(x))),
                      ["conv2d"]),
    "SeparableConv2D": (_fn(lambda x: L.SeparableConv2D(6, 3, strides=2, padding="same", depth_multiplier=2,
                                                        activation="relu", name="sep")(x), (9, 9, 4)),
                        ["conv2d", "conv2d", "relu"]),
    "ReLU(max_value=6)": (_fn(lambda x: L.ReLU(max_value=6.0)(L.Rescaling(4.0)(x))), ["affine", "relu6"]),
    "Multiply(SE gate)": (_fn(_se_block), ["global_avg_pool", "conv2d", "silu", "conv2d", "sigmoid", "mul"]),
    "keras.ops hard_sigmoid gate": (_fn(_hard_sigmoid_gate), ["global_avg_pool", "conv2d", "hardsigmoid", "mul"]),
    "Reshape": (_fn(lambda x: L.Reshape((4, 2, 3))(x), (2, 4, 3)), ["permute", "reshape", "permute"]),
    "Reshape(2-D) + Dense": (_fn(lambda x: L.Dense(5)(L.Reshape((8, 3))(x)), (2, 4, 3)),
                             ["permute", "reshape", "linear"]),
    "Permute": (_fn(lambda x: L.Permute((2, 1, 3))(x), (2, 4, 3)), ["permute"]),
    "GlobalAveragePooling2D(keepdims)": (_fn(lambda x: L.GlobalAveragePooling2D(keepdims=True)(x)),
                                         ["global_avg_pool"]),
    "GlobalMaxPooling2D": (_fn(lambda x: L.GlobalMaxPooling2D()(x)), ["max_pool2d", "reshape"]),
    "Dropout": (_fn(lambda x: L.GaussianNoise(0.3)(L.SpatialDropout2D(0.5)(L.Dropout(0.5)(L.Conv2D(3, 1)(x))))),
                ["conv2d"]),
    "LayerNormalization": (_fn(lambda x: L.LayerNormalization(epsilon=1e-5)(x)), ["layer_norm"]),
    "Dense(4-D)": (_fn(lambda x: L.Dense(4, activation="relu")(x)), ["conv2d", "relu"]),
    "keras.ops arithmetic": (_fn(lambda x: (3.0 - x / 2.0) * 0.5 - 1.0), ["affine", "affine", "affine", "affine"]),
    "keras.ops gelu(tanh) + softmax": (_fn(lambda x: keras.ops.softmax(keras.ops.gelu(x, approximate=True), axis=2)),
                                       ["gelu", "softmax"]),
    "keras.ops x * sigmoid(x)": (_fn(lambda x: keras.ops.sigmoid(x) * x), ["silu"]),
    "Multiply([x, hard_sigmoid(x)])": (_fn(lambda x: L.Multiply()([x, L.Activation("hard_sigmoid")(x)])),
                                       ["hardswish"]),
    "ZeroPadding2D -> MaxPooling2D after ReLU": (_fn(lambda x: L.MaxPooling2D(3, 2)(L.ZeroPadding2D(1)(
        L.ReLU()(L.Conv2D(4, 1)(x))))), ["conv2d", "relu", "max_pool2d"]),
    "Flatten -> BatchNormalization": (_fn(lambda x: L.BatchNormalization()(L.Flatten()(x)), (4, 4, 2)),
                                      ["permute", "flatten", "batch_norm"]),
}
#: Keras activation -> IR op (the activations the converter maps)
ACTIVATION_OPS = {"relu": "relu", "relu6": "relu6", "sigmoid": "sigmoid", "silu": "silu", "swish": "silu",
                  "hard_sigmoid": "hardsigmoid", "hard_silu": "hardswish", "hard_swish": "hardswish", "gelu": "gelu"}


def _randomise_all(km, seed):
    randomise(km, seed)  # BN statistics, conv/dense weights
    return km


def _check_layer_model(km, ops, seed=0, tol=1e-5):
    """IR forward == Keras forward, the IR has ``ops``, and to_model gives the Keras forward back."""
    x = np.random.default_rng(seed).normal(size=(3,) + tuple(km.input_shape[1:])).astype("float32") * 2
    y = predict(km, x)
    m = ck.read(km)
    assert [n.op for n in m.nodes] == ops
    got = m.forward(nchw(x))
    assert rel(got.transpose(0, 2, 3, 1) if got.ndim == 4 else got, y) <= tol
    assert rel(predict(ck.to_model(m), x), y) <= tol
    return m


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_parity(case):
    """Each Keras layer class the converter maps: read -> NumPy forward equals Keras' (<= 1e-5
    relative), the graph has the expected ops, and the Keras model rebuilt from it equals Keras'."""
    build, ops = LAYER_CASES[case]
    km = build()
    if not isinstance(km.layers[-1], L.Normalization):
        _randomise_all(km, 11)
    m = _check_layer_model(km, ops)
    if case == "Softmax":
        assert m.node("sm").attrs["axis"] == 2  # Keras axis 1 (H) of (H, W, C) is IR axis 2
    if case == "ZeroPadding2D":
        assert m.node("c").attrs["padding"] == [0, 1, 1, 2]  # folded into the conv
    if case == "SeparableConv2D":
        dw, pw = m.nodes[0], m.nodes[1]
        assert dw.name == "sep_depthwise" and dw.attrs["groups"] == 4 and pw.name == "sep"
        assert m.tensors["sep_depthwise.weight"].shape == (8, 1, 3, 3) and m.tensors["sep.weight"].shape == (6, 8, 1, 1)
    if case == "Multiply(SE gate)":
        assert m.node("se_squeeze").attrs["keepdims"]  # GAP + Reshape((1, 1, C)) -> one GAP with keepdims


@pytest.mark.parametrize("act", list(ACTIVATION_OPS))
def test_activation_parity(act):
    """activation=... inside Conv2D and Dense, and as an Activation layer."""
    op = ACTIVATION_OPS[act]
    i = keras.Input((5, 6, 3))
    t = L.Conv2D(4, 3, activation=act, name="c")(i)
    t = L.Activation(act, name="a")(t)
    o = L.Dense(3, activation=act, name="d")(L.Flatten(name="f")(t))
    km = _randomise_all(keras.Model(i, o), 12)
    _check_layer_model(km, ["conv2d", op, op, "flatten", "linear", op])


def test_keras2_hard_sigmoid_refused(saved, tmp_path):
    """tf.keras 2 defined hard_sigmoid as clip(0.2 x + 0.5, 0, 1): a Keras 2 file using it is refused."""
    import h5py

    km = keras.Sequential([keras.Input((4, 4, 2)), L.Conv2D(2, 1, activation="hard_sigmoid", name="hs")])
    p = str(tmp_path / "k2.h5")
    km.save(p)
    with h5py.File(p, "r+") as f:
        f.attrs["keras_version"] = "2.15.0"
    with pytest.raises(ConversionError, match="hs.*Keras 2"):
        ck.read(p)


# ------------------------------------------------------------------ export

def _every_op_model(names):
    """An IR model using every op the exporter maps, named with ``names(i, default)``."""
    rng = np.random.default_rng(8)
    f32 = lambda *s: rng.normal(size=s).astype("float32")  # noqa: E731
    N = udfc_ref.Node
    t, nodes = {}, []

    def node(op, ins, attrs=None, **params):
        name = names(len(nodes), f"n{len(nodes)}")
        ps = {}
        for role, arr in params.items():
            tn = names(100 + len(t), f"{name}.{role}")
            t[tn] = arr
            ps[role] = tn
        nodes.append(N(name, op, ins, name, attrs or {}, ps))
        return name

    x = names(999, "input")
    c = node("conv2d", [x], {"padding": 1}, weight=f32(6, 3, 3, 3), bias=f32(6))
    b = node("batch_norm", [c], {"eps": 1e-3}, weight=f32(6), bias=f32(6), running_mean=f32(6),
             running_var=np.abs(f32(6)) + 0.5)
    a = node("hardswish", [b])
    s = node("affine", [a], {"axis": 2}, weight=f32(7), bias=f32(7))  # along H
    ln = node("layer_norm", [s], {"axis": 1, "eps": 1e-5}, weight=f32(6), bias=f32(6))
    g = node("global_avg_pool", [ln], {"keepdims": True})
    g = node("conv2d", [g], {}, weight=f32(3, 6, 1, 1), bias=f32(3))
    g = node("relu", [g])
    g = node("conv2d", [g], {}, weight=f32(6, 3, 1, 1), bias=f32(6))
    g = node("hardsigmoid", [g])
    m = node("mul", [ln, g])
    e1 = node("gelu", [m], {"approximate": "tanh"})
    e2 = node("gelu", [m], {"approximate": "none"})
    e3 = node("silu", [m])
    e4 = node("sigmoid", [e3])
    ad = node("add", [e1, e2, e4])
    r6 = node("relu6", [ad])
    p = node("pad", [r6], {"padding": [0, 1, 1, 0]})
    mp = node("max_pool2d", [p], {"kernel": 2, "stride": 2})  # (6, 4, 4)
    dw = node("conv2d", [mp], {"groups": 6, "padding": [1, 0, 1, 0], "stride": 2}, weight=f32(12, 1, 2, 2))
    cat = node("concat", [dw, node("avg_pool2d", [mp], {"kernel": 2, "stride": 2})])  # (18, 2, 2)
    pm = node("permute", [cat], {"perm": [0, 2, 3, 1]})  # channels-last (2, 2, 18)
    li = node("linear", [pm], {}, weight=f32(5, 18), bias=f32(5))  # on the last axis of a 3-D value
    sm = node("softmax", [li], {"axis": 3})
    rs = node("reshape", [sm], {"shape": [4, 5]})
    fl = node("flatten", [rs])
    out = node("linear", [fl], {}, weight=f32(4, 20))
    out = node("softmax", [out], {"axis": 1})
    return udfc_ref.Model(t, nodes, input_name=x, input_shape=(3, 7, 8), output_name=out)


HOSTILE_NAMES = ["stem.conv", "a/b", "gelu", "gelu_3", 'x"); __import__("os").system("echo hi") #', "ünïcode",
                 "_lead", "-dash", "9start", "a.b", "a_b", "", "x" * 300, "conv2d", "input_layer", "re_lu",
                 "line\nbreak", "features.0.weight"]


@pytest.mark.parametrize("hostile", [False, True])
def test_export_every_op_and_names(hostile, tmp_path):
    """to_model / save_keras for every IR op; names Keras refuses are mapped, recorded in the archive
    (udfc_names.json) and restored by read(); the file loads with plain keras.saving.load_model."""
    import zipfile

    names = (lambda i, d: HOSTILE_NAMES[i % len(HOSTILE_NAMES)] + (f"#{i}" if i >= len(HOSTILE_NAMES) else "")) \
        if hostile else (lambda i, d: d)
    m = _every_op_model(names)
    x = np.random.default_rng(9).normal(size=(3, 3, 7, 8)).astype("float32")
    ref = m.forward(x)
    k = ck.to_model(m)
    assert rel(predict(k, x.transpose(0, 2, 3, 1)), ref) <= 1e-5
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", lay.name) for lay in k.layers)
    out = str(tmp_path / "every.keras")
    ck.save_keras(m, out)
    with zipfile.ZipFile(out) as z:
        assert "udfc_names.json" in z.namelist()
    k2 = keras.saving.load_model(out)
    assert rel(predict(k2, x.transpose(0, 2, 3, 1)), ref) <= 1e-5
    back = ck.read(out)
    assert rel(back.forward(x), ref) <= 1e-5
    assert back.input_name == m.input_name and back.output_name == m.output_name
    # the graph comes back equivalent, not identical: the pad folds into the max pool (its input is
    # >= 0), the reshape merges into the flatten, and the channels-last linear comes back as a 1x1
    # conv between permutes; every other node keeps its name, output value and tensor names
    orig = {n.name: n for n in m.nodes}
    kept = [n for n in back.nodes if n.name in orig]
    assert {n.name for n in m.nodes} - {n.name for n in kept} == {names(17, "n17"), names(22, "n22"),
                                                                  names(25, "n25")}
    for n in kept:
        assert n.output == orig[n.name].output and n.params == orig[n.name].params
    assert set(back.tensors) == set(m.tensors)
    for name, arr in m.tensors.items():
        np.testing.assert_array_equal(back.tensors[name].reshape(arr.shape), arr)


def test_export_refuses_nonzero_pad_and_writes_nothing(tmp_path):
    m = udfc_ref.Model({}, [udfc_ref.Node("p", "pad", ["input"], "p", {"padding": 1, "value": 2.0})],
                       input_shape=(2, 4, 4))
    out = tmp_path / "p.keras"
    with pytest.raises(ConversionError, match="'p'.*value 2"):
        ck.save_keras(m, str(out))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_digits_cli_without_backend(tmp_path):
    """`udfc export keras` of the bundled digits model (tensor names with dots) works and keeps
    the names; with KERAS_BACKEND unset and no TensorFlow the CLI picks the torch backend."""
    from udfc_ref.examples import example_model_path, load_example

    out = str(tmp_path / "digits.keras")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path / "keras_home")  # no keras.json naming a backend
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys; from udfc_ref.cli import main; r = main(sys.argv[1:]); import keras; "
            "print('BACKEND', keras.backend.backend()); sys.exit(r)")
    r = subprocess.run([sys.executable, "-c", code, "export", "keras", example_model_path(), out],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "BACKEND torch" in r.stdout and "Traceback" not in r.stderr
    m = load_example()
    k = keras.saving.load_model(out)
    x = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype("float32")
    assert rel(predict(k, x.transpose(0, 2, 3, 1)), m.forward(x)) <= TOL
    back = ck.read(out)
    assert sorted(back.tensors) == sorted(m.tensors) and [n.name for n in back.nodes] == [n.name for n in m.nodes]


def test_choose_backend(monkeypatch, tmp_path):
    """KERAS_BACKEND is set only when unset, keras not yet imported and TensorFlow absent;
    a non-TensorFlow backend named in keras.json is kept."""
    import importlib.util

    real = importlib.util.find_spec
    installed = {"torch"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n in installed else (None if n in ("tensorflow", "jax") else
                                                                         real(n, *a)))
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert ck.choose_backend() is None and os.environ["KERAS_BACKEND"] == "jax"  # the user's choice stays
    monkeypatch.delenv("KERAS_BACKEND")
    assert ck.choose_backend() == "torch" and os.environ["KERAS_BACKEND"] == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')  # Keras writes this default itself
    assert ck.choose_backend() == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    installed.add("jax")
    assert ck.choose_backend() == "jax"
    monkeypatch.delenv("KERAS_BACKEND")
    installed.add("tensorflow")
    assert ck.choose_backend() is None and "KERAS_BACKEND" not in os.environ  # Keras' default works
    installed.discard("tensorflow")
    monkeypatch.setitem(sys.modules, "keras", keras)
    assert ck.choose_backend() is None and "KERAS_BACKEND" not in os.environ  # too late to choose


def test_keras_cli_help_texts():
    """Every option of the Keras subcommands has help text."""
    from udfc_ref.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("import", "export"):
        fw = next(a for a in sub.choices[cmd]._actions if isinstance(a, argparse._SubParsersAction))
        kp = fw.choices["keras"]
        assert kp.description and "KERAS_BACKEND" in kp.format_help()
        for a in kp._actions:
            assert a.help, f"udfc {cmd} keras: {a.dest} has no help"


def test_crafted_name_map_never_breaks_the_model(saved, tmp_path):
    """A udfc_names.json whose names collide (two layers -> one node name, a tensor renamed onto
    another tensor's name, junk entries) is data: colliding renames are not applied, the model
    is unchanged; a map of another format is ignored; invalid JSON is a FormatError."""
    import zipfile

    from udfc_ref.errors import FormatError

    s = saved["gap"]
    names = {"format": "udfc-ref keras names", "version": 1, "input": {"keras": "x", "name": "image in"},
             "layers": {"c": {"node": "same", "output": "v1", "tensors": {"weight": "fc1.weight", "bias": 3}},
                        "bn": {"node": "same", "output": "v1", "tensors": {"weight": ["x"]}},
                        "fc2": {"node": "head.fc", "output": "logits", "tensors": {"weight": "head.fc.weight"}},
                        "nope": {"node": "ghost"}, "r": "junk"}}

    def with_map(raw, name):
        p = str(tmp_path / name)
        with zipfile.ZipFile(s["keras"]) as z, zipfile.ZipFile(p, "w") as out:
            for n in z.namelist():
                out.writestr(n, z.read(n))
            out.writestr("udfc_names.json", raw)
        return p

    m = ck.read(with_map(json.dumps(names), "crafted.keras"))
    assert rel(m.forward(nchw(s["x"])), s["y"]) <= TOL
    assert m.input_name == "image in" and m.output_name == "logits"
    assert m.node("head.fc").params["weight"] == "head.fc.weight"
    assert "same" not in {n.name for n in m.nodes} and {"c", "bn"} <= {n.name for n in m.nodes}
    assert m.node("c").params["weight"] != m.node("fc1").params["weight"]  # no tensor renamed onto another
    plain = ck.read(s["keras"])
    assert sum(a.size for a in m.tensors.values()) == sum(a.size for a in plain.tensors.values())
    other = ck.read(with_map(json.dumps({"format": "something else", "layers": {"c": {"node": "zzz"}}}), "o.keras"))
    assert [n.name for n in other.nodes] == [n.name for n in plain.nodes]
    with pytest.raises(FormatError, match="udfc_names.json"):
        ck.read(with_map(b"\xff{not json", "bad.keras"))
