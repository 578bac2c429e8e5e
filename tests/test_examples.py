"""The bundled example model and data (udfc_ref/data)."""

import os

import numpy as np

import udfc_ref
from udfc_ref.examples import (EXAMPLE_TEST_ACCURACY, example_data_path, example_model_path, load_example,
                               load_example_data)

#: measured by scripts/train_digits.py (torch and NumPy agree): 538 / 540
MEASURED_TOP1 = 0.9963


def test_files_exist_and_are_small():
    for p in (example_model_path(), example_data_path()):
        assert os.path.isfile(p)
        assert 10_000 < os.path.getsize(p) < 200_000


def test_model_layers():
    m = load_example()
    assert isinstance(m, udfc_ref.Model)
    assert m.input_shape == (1, 8, 8)
    ops = [n.op for n in m.nodes]
    assert ops == ["conv2d", "batch_norm", "relu"] * 2 + ["max_pool2d"] + ["conv2d", "batch_norm", "relu"] * 2 \
        + ["max_pool2d", "flatten", "linear", "relu", "linear"]
    convs = [m.tensors[n.params["weight"]].shape for n in m.nodes if n.op == "conv2d"]
    assert convs == [(16, 1, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (32, 32, 3, 3)]
    assert all("bias" not in n.params for n in m.nodes if n.op == "conv2d")
    assert m.tensors["classifier.3.weight"].shape == (10, 64)
    assert m.record is None and not m.quant


def test_data_shapes_dtypes():
    x, y = load_example_data()
    assert x.dtype == np.float32 and x.shape == (540, 1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (540,)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    assert np.all(np.bincount(y) >= 50)  # stratified 30 % of ~180 per class


def test_top1_matches_measured():
    m = load_example()
    x, y = load_example_data()
    logits = m.forward(x)
    assert logits.shape == (540, 10)
    acc = float((logits.argmax(1) == y).mean())
    assert round(acc, 4) == MEASURED_TOP1
    assert round(EXAMPLE_TEST_ACCURACY, 4) == MEASURED_TOP1
