"""One command from a framework file to a compressed model of the same framework."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from udfc_ref import compress
from udfc_ref.cli import main

NET = textwrap.dedent("""
    import torch.nn as nn

    def Net():
        return nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 5))
""")


def test_torch_weights_in_pt2_out(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from converters.torch import load_module_spec, to_udfc

    (tmp_path / "mynet.py").write_text(NET)
    spec = f"{tmp_path / 'mynet.py'}:Net"
    torch.manual_seed(0)
    net = load_module_spec(spec)
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-0.5, 0.5)
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "small.pt2"
    args = ["--prune-ratio", "0.3", "--weight-bits", "6"]
    assert main(["compress", str(weights), str(out), "--torch-module", spec, "--input-shape", "3,8,8"] + args) == 0
    capsys.readouterr()
    prog = torch.export.load(str(out)).module()
    ref, _ = compress(to_udfc(net.eval(), (3, 8, 8)), prune_ratio=0.3, weight_bits=6)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = prog(torch.from_numpy(x)).numpy()
    y_ref = ref.forward(x)
    assert np.abs(y - y_ref).max() <= 1e-4 * np.abs(y_ref).max()
    assert sum(p.numel() for p in prog.parameters()) < sum(p.numel() for p in net.parameters())
    # a .pth without its module is a clear error
    assert main(["compress", str(weights), str(tmp_path / "o.safetensors")]) == 1
    assert "--torch-module" in capsys.readouterr().err


def test_keras_in_keras_out(tmp_path, capsys):
    keras = pytest.importorskip("keras")
    from converters.keras import read

    keras.utils.set_random_seed(0)
    km = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(12, 3, padding="same", use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5),
    ])
    src = tmp_path / "m.keras"
    km.save(src)
    out = tmp_path / "small.keras"
    assert main(["compress", str(src), str(out), "--prune-ratio", "0.3", "--weight-bits", "6"]) == 0
    capsys.readouterr()
    small_k = keras.saving.load_model(out)
    ref, _ = compress(read(str(src)), prune_ratio=0.3, weight_bits=6)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.asarray(small_k.predict(x.transpose(0, 2, 3, 1), verbose=0))
    y_ref = ref.forward(x)
    assert np.abs(y - y_ref).max() <= 1e-4 * np.abs(y_ref).max()
    assert small_k.count_params() == ref.param_count() < km.count_params()
