"""Synthetic calibration images (udfc_ref/synthetic.py, Eq. Z1-Z2).

References are independent of the code under test: the BatchNorm inputs of
the whole image set from one ``Model.forward`` with ``np.mean`` / ``np.var``
(for Z2 and for the value of the Z1 objective that PyTorch differentiates),
and the CLI's file read back by the reader ``udfc compress --calibration``
uses."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from helpers import resnet_block, vgg
from udfc_ref import Model, Node, OptionError, UDFCError, load, save
from udfc_ref.cli import main
from udfc_ref.errors import ConversionError

torch = pytest.importorskip("torch")
syn = pytest.importorskip("udfc_ref.synthetic")


def _direct_stats(model, x):
    """{bn node: (mean, biased var) of its input over images and positions}, one forward."""
    vals = model.forward(x, return_values=True)
    out = {}
    for n in model.nodes:
        if n.op == "batch_norm":
            v = np.asarray(vals[n.inputs[0]], np.float64)
            axes = (0,) + tuple(range(2, v.ndim))
            out[n.name] = (v.mean(axes), v.var(axes))
    return out


def _z1(model, x):
    """Eq. Z1 by hand, from the forward's values."""
    total = 0.0
    for name, (m, v) in _direct_stats(model, x).items():
        node = next(n for n in model.nodes if n.name == name)
        mu = model.tensors[node.params["running_mean"]].astype(np.float64)
        var = model.tensors[node.params["running_var"]].astype(np.float64)
        total += ((m - mu) ** 2).sum() / var.sum() + ((v - var) ** 2).sum() / (var**2).sum()
    return total


def _renamed_bn(model: Model) -> Model:
    """The same network with one BN's tensors under names that are not module
    paths: the PyTorch rebuild then uses a functional batch_norm for it."""
    tensors = dict(model.tensors)
    nodes = []
    for n in model.nodes:
        if n.name == "b1":
            params = {}
            for role, t in n.params.items():
                params[role] = f"b1 {role}!"
                tensors[params[role]] = tensors.pop(t)
            n = Node(n.name, n.op, n.inputs, n.output, n.attrs, params)
        nodes.append(n)
    return Model(tensors, nodes, model.input_name, model.input_shape)


def test_bn_mismatch_against_direct_statistics():
    m = vgg(0)
    x = np.random.default_rng(3).standard_normal((11, 3, 8, 8)).astype(np.float32) * 1.7 + 0.3
    ref = _direct_stats(m, x)
    got = syn.bn_mismatch(m, x, batch=4)  # streamed over uneven batches
    assert [r.node for r in got] == ["b0", "b1", "b2"]
    for r in got:
        node = next(n for n in m.nodes if n.name == r.node)
        mu, var = (m.tensors[node.params[k]].astype(np.float64) for k in ("running_mean", "running_var"))
        mean, v = ref[r.node]
        assert r.mean == pytest.approx(np.linalg.norm(mean - mu) / np.sqrt(var.sum()), rel=1e-6)
        assert r.var == pytest.approx(np.linalg.norm(v - var) / np.linalg.norm(var), rel=1e-6)


@pytest.mark.parametrize("build", [vgg, resnet_block, lambda: _renamed_bn(vgg(1))],
                         ids=["vgg", "resnet_block", "functional_bn"])
def test_objective_is_eq_z1(build):
    """The loss PyTorch differentiates equals Eq. Z1 computed from the NumPy
    forward: every BN is seen (module or functional), with its own statistics."""
    from converters.torch_export import to_module

    m = build() if callable(build) else build
    x = np.random.default_rng(4).standard_normal((6,) + tuple(m.input_shape)).astype(np.float32)
    module = to_module(m)
    got = float(syn.bn_matching_loss(module, torch.from_numpy(x), torch).detach())
    assert got == pytest.approx(_z1(m, x), rel=1e-4)


def _attainable(model: Model, x: np.ndarray) -> Model:
    """``model`` with every BN's running statistics set, in topological
    order, to the statistics of its input on ``x``: statistics some input
    distribution really has (random ones may be unattainable)."""
    tensors = dict(model.tensors)
    for n in model.nodes:
        if n.op == "batch_norm":
            mean, var = _direct_stats(Model(tensors, model.nodes, model.input_name, model.input_shape), x)[n.name]
            tensors[n.params["running_mean"]] = mean.astype(np.float32)
            tensors[n.params["running_var"]] = var.astype(np.float32)
    return Model(tensors, model.nodes, model.input_name, model.input_shape)


def test_synthesize_matches_the_statistics_and_is_deterministic():
    rng = np.random.default_rng(5)
    shape = tuple(resnet_block(2).input_shape)
    data = (0.5 + 2.0 * rng.standard_normal((400,) + shape).cumsum(axis=-1) / 3).astype(np.float32)  # not N(0, 1)
    m = _attainable(resnet_block(2), data)
    noise = np.random.default_rng(0).standard_normal((12,) + shape).astype(np.float32)
    x = syn.synthesize(m, n=12, steps=150, batch=6, seed=0, threads=1)
    assert x.shape == (12,) + shape and x.dtype == np.float32
    before, after = syn.bn_mismatch(m, noise), syn.bn_mismatch(m, x)
    assert min(b.mean + b.var for b in before) > 0.3  # the noise does not match
    for a in after:
        assert a.mean < 0.05 and a.var < 0.1, a
    assert _z1(m, x[:6]) < 0.02 * _z1(m, noise[:6])
    assert np.array_equal(syn.synthesize(m, n=12, steps=150, batch=6, seed=0, threads=1), x)  # deterministic


@pytest.mark.parametrize("kw, word", [(dict(n=1), "n"), (dict(steps=0), "steps"), (dict(lr=-0.1), "lr"),
                                      (dict(batch=0), "batch"), (dict(threads=0), "threads"),
                                      (dict(lr=float("nan")), "lr")])
def test_bad_options(kw, word):
    with pytest.raises(OptionError, match=word):
        syn.synthesize(vgg(0), **kw)


def test_no_batch_norm_is_one_clear_error():
    m = vgg(0)
    nodes = [n for n in m.nodes if n.op != "batch_norm"]
    nodes = [Node(n.name, n.op, [i.replace("b", "c") if i.startswith("b") else i for i in n.inputs], n.output,
                  n.attrs, n.params) for n in nodes]
    plain = Model({k: v for k, v in m.tensors.items() if not k.startswith("b")}, nodes, m.input_name, m.input_shape)
    with pytest.raises(UDFCError, match="no batch_norm"):
        syn.synthesize(plain, n=4, steps=2)


def test_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConversionError, match="pip install"):
        syn.synthesize(vgg(0), n=4, steps=2)


def test_cli_writes_images_compress_reads(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    save(vgg(0, channels=(3, 8, 12, 12)), model)
    out = tmp_path / "syn.npz"
    assert main(["synthesize", str(model), str(out), "--n", "8", "--steps", "30", "--batch", "4", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "b0" in text and "b2" in text and "wrote" in text
    from udfc_ref.calibrate import load_calibration

    x = np.asarray(load_calibration(out))
    assert x.shape == (8, 3, 8, 8) and np.all(np.isfinite(x))
    small = tmp_path / "s.safetensors"
    assert main(["compress", str(model), str(small), "--prune-ratio", "0.5", "--weight-bits", "6",
                 "--calibration", str(out)]) == 0
    assert load(small).tensors["c0.weight"].shape[0] == 4


def test_cli_errors_write_nothing(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    save(vgg(0), model)
    before = model.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["synthesize", str(model), str(tmp_path / "x.txt")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["synthesize", str(model), str(tmp_path / "y.npz"), "--steps", "0"])
    assert e.value.code == 2
    assert not os.path.exists(tmp_path / "y.npz") and model.read_bytes() == before
