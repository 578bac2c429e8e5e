"""Bad compression options end in an OptionError naming the option, before
any work; extreme but legal options still give a working model."""

from __future__ import annotations

import numpy as np
import pytest

import udfc_ref
from udfc_ref import OptionError

from helpers import resnet_block, vgg


@pytest.fixture(scope="module")
def model():
    return vgg()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.3", None])
def test_prune_ratio_outside_unit_interval(model, ratio):
    with pytest.raises(OptionError, match="prune ratio"):
        udfc_ref.compress(model, prune_ratio=ratio)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32, 4.5, "4", -8])
def test_weight_bits_outside_range(model, bits):
    with pytest.raises(OptionError, match="bits"):
        udfc_ref.compress(model, prune_ratio=0.0, weight_bits=bits)


@pytest.mark.parametrize("bits", [2, 8, 16, None])
def test_weight_bits_edges_accepted(model, bits):
    small, _ = udfc_ref.compress(model, prune_ratio=0.0, weight_bits=bits)
    assert small.forward(np.ones((1, 3, 8, 8), np.float32)).shape == (1, 5)


@pytest.mark.parametrize("method", ["UDFC ", "foo", "", None])
def test_unknown_method(model, method):
    with pytest.raises(OptionError, match="method"):
        udfc_ref.compress(model, prune_ratio=0.3, method=method)


def test_skip_layer_that_does_not_exist(model):
    with pytest.raises(OptionError, match="'conv99'"):
        udfc_ref.compress(model, prune_ratio=0.3, skip=["conv99"])


def test_skip_layer_that_is_not_conv_or_linear(model):
    with pytest.raises(OptionError, match="'b0'"):
        udfc_ref.compress(model, prune_ratio=0.3, skip=["b0"])


def test_skip_existing_layer_is_left_untouched(model):
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, skip=["c0"])
    assert small.tensors["c0.weight"].shape == model.tensors["c0.weight"].shape


@pytest.mark.parametrize("build", [vgg, resnet_block])
def test_extreme_ratio_keeps_at_least_one_channel(build):
    m = build()
    small, _ = udfc_ref.compress(m, prune_ratio=0.99, weight_bits=4)
    for n in small.nodes:
        if n.op in ("conv2d", "linear"):
            assert small.tensors[n.params["weight"]].shape[0] >= 1, n.name
    y = small.forward(np.ones((2,) + m.input_shape, np.float32))
    assert y.shape == (2,) + small.shapes[small.output_name]


def test_min_keep_below_one(model):
    with pytest.raises(OptionError, match="min_keep"):
        udfc_ref.compress(model, prune_ratio=0.3, min_keep=0)


def test_bad_options_leave_the_model_unchanged(model):
    before = {k: v.copy() for k, v in model.tensors.items()}
    with pytest.raises(OptionError):
        udfc_ref.compress(model, prune_ratio=2.0)
    udfc_ref.compress(model, prune_ratio=0.5, weight_bits=4)  # a good call does not modify its input either
    assert all(np.array_equal(before[k], model.tensors[k]) for k in before)


@pytest.mark.parametrize("args,word,code", [(["--prune-ratio", "1.5"], "prune ratio", 2),
                                            (["--weight-bits", "9"], "bits", 2),
                                            (["--weight-bits", "32"], "bits", 2),
                                            (["--skip", "nope"], "'nope'", 1)])
def test_cli_bad_option_is_one_line(tmp_path, capsys, args, word, code):
    from udfc_ref.cli import main

    p, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    udfc_ref.save(vgg(), p)
    try:
        got = main(["compress", str(p), str(out)] + args)
    except SystemExit as e:  # usage errors leave through argparse
        got = e.code
    assert got == code
    err = capsys.readouterr().err
    assert err.startswith("udfc: error: ") and err.count("\n") == 1 and word in err, err
    assert not out.exists()
