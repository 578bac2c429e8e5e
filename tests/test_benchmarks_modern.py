"""The two modern benchmark networks (EfficientNet- and MobileNetV3-style) of
``benchmarks/train.py``: exported through their ``emit`` methods, equal to
the PyTorch forward, with the SE chains ``compress`` prunes."""

from __future__ import annotations


import numpy as np
import pytest
from helpers import benchmark_script

def _train():
    return benchmark_script("train")


@pytest.mark.parametrize("name,act,gate", [("efficientnet_mnist", "silu", "sigmoid"),
                                           ("mobilenetv3_mnist", "hardswish", "hardsigmoid")])
def test_modern_nets_export_and_prune(tmp_path, name, act, gate):
    """Untrained modules with randomised BN statistics (training itself is the
    shared ``train_torch`` path of the other networks): ``export_modern``
    checks its graph against the PyTorch forward before saving; the file has
    the SE chains, and ``compress`` prunes them."""
    torch = pytest.importorskip("torch")
    import udfc_ref
    from udfc_ref.pairs import find_pairs

    train = _train()
    torch.manual_seed(0)
    module = train._nets()[name][0]()
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.5)
    path = tmp_path / f"{name}.safetensors"
    train.export_modern(module, path, (1, 28, 28))
    m = udfc_ref.load(path)
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert np.abs(m.forward(x) - ref).max() <= 1e-5 * np.abs(ref).max()
    assert {act, gate, "mul", "global_avg_pool", "add"} <= {n.op for n in m.nodes}
    assert set(m.tensors) <= set(module.state_dict())
    pairs, _ = find_pairs(m)
    se = [p for p in pairs if p.se is not None]
    assert len(se) >= 2 and all(p.dw is not None for p in se)
    small, rep = udfc_ref.compress(m, prune_ratio=0.3, weight_bits=6)
    assert all(small.record["layers"][p.name]["channels_after"] < small.record["layers"][p.name]["channels_before"]
               for p in se)
