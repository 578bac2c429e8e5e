"""Models as they come: Hugging Face ``transformers`` vision CNNs built from
their configs (random weights, no download), shrunk only in size, imported
with no hand edits, compressed, and taken back to PyTorch.

For each model:

* the import (``converters.torch.to_udfc``) matches the model's own
  ``logits`` to <= 1e-4 relative on a random input;
* ``udfc`` at 30 % pruning + 6-bit prunes channels of every network with
  BatchNorm (MACs drop), quantizes every conv / linear weight, and records a
  reason for every conv / linear layer it leaves unpruned;
* the compressed model goes back to PyTorch, as ``to_module`` and as a
  ``.pt2`` torch.export program (loaded back with ``torch.export.load``),
  both <= 1e-4 relative to the NumPy forward of the compressed model.

``python tests/test_zoo_torch.py`` prints the per-model measurements (parity,
layers pruned / total, MACs kept, seconds).
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import udfc_ref  # noqa: E402
from converters import torch as ct  # noqa: E402
from udfc_ref.errors import ConversionError  # noqa: E402

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one intra-op thread

RTOL = 1e-4
INPUT_SHAPE = (3, 32, 32)


def _configs():
    t = transformers
    return {
        # ResNet-50 layout (bottleneck blocks, 1x1 projection shortcuts), two narrow stages
        "resnet50": (t.ResNetForImageClassification,
                     t.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[2, 1], layer_type="bottleneck",
                                    num_labels=10)),
        # the default tf_padding=True (TF 'same' padding computed in forward), width x0.35
        "mobilenet_v2": (t.MobileNetV2ForImageClassification,
                         t.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=10)),
        # RegNetX / RegNetY: grouped convs (group width scaled with the widths), Y with squeeze-excitation
        "regnet_x": (t.RegNetForImageClassification,
                     t.RegNetConfig(embedding_size=16, hidden_sizes=[24, 48], depths=[1, 2], groups_width=8,
                                    layer_type="x", num_labels=10)),
        "regnet_y": (t.RegNetForImageClassification,
                     t.RegNetConfig(embedding_size=16, hidden_sizes=[24, 48], depths=[1, 2], groups_width=8,
                                    layer_type="y", num_labels=10)),
        # no BatchNorm: channels-last blocks with layer norm, GELU, layer scale
        "convnext": (t.ConvNextForImageClassification,
                     t.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2], image_size=32,
                                      num_labels=10)),
    }


MODELS = ("resnet50", "mobilenet_v2", "regnet_x", "regnet_y", "convnext")
WITH_BN = ("resnet50", "mobilenet_v2", "regnet_x", "regnet_y")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """He-normal conv / linear weights, N(0, 0.1) biases; every BatchNorm gets
    running_mean ~ N(0, 0.3), running_var ~ U(0.5, 2), gamma ~ U(0.5, 1.5),
    beta ~ N(0, 0.3); layer norms gamma ~ U(0.5, 1.5), beta ~ N(0, 0.3); any
    other parameter (ConvNeXt's layer scale, 1e-6 at init) ~ U(0.5, 1.5).
    Nothing is degenerate; eval mode."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            else:
                continue
            done.update(id(p) for p in m.parameters(recurse=False))
        for p in model.parameters():
            if id(p) not in done:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    cls, cfg = _configs()[name]
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


def measure(name: str) -> dict:
    """Import, compress and export ``name``; every number the tests assert on
    and the report prints."""
    net = build(name, seed=MODELS.index(name))
    x = torch.randn((2,) + INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = net(x)
    logits = out.logits.numpy()  # a ModelOutput: the converter takes its logits

    t0 = time.perf_counter()
    model = ct.to_udfc(net, INPUT_SHAPE)
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, rep = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6, method="udfc")
    t_compress = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = ct.pt2_bytes(small)
    t_export = time.perf_counter() - t0

    xs = x.numpy()
    y_small = small.forward(xs)
    prog = torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():
        y_pt2 = prog(x).numpy()
        y_mod = ct.to_module(small)(x).numpy()
    layers = [n.name for n in model.nodes if n.op in ("conv2d", "linear")]
    return {
        "model": model, "small": small, "layers": layers, "record": small.record,
        "parity": rel_err(model.forward(xs), logits),
        "parity_pt2": rel_err(y_pt2, y_small), "parity_module": rel_err(y_mod, y_small),
        "pruned": len(small.record.get("layers", {})), "total": len(layers),
        "macs_kept": small.flops() / model.flops(),
        "params_kept": small.param_count() / model.param_count(),
        "seconds": (t_import, t_compress, t_export),
        "warnings": [str(w.message) for w in caught],
    }


@pytest.mark.parametrize("name", MODELS)
def test_model_as_it_comes(name):
    r = measure(name)
    # import: the model's own logits
    assert r["parity"] <= RTOL, r["parity"]
    # compression: every conv / linear weight quantized to 6 bits
    rec = r["record"]
    quantized = {v["tensor"] for v in rec["quantized"].values()}
    assert {r["model"].node(n).params["weight"] for n in r["layers"]} <= quantized
    assert all(v["bits"] == 6 for v in rec["quantized"].values())
    # every conv / linear layer is pruned or has a recorded reason
    for layer in r["layers"]:
        assert layer in rec["layers"] or rec.get("unpruned", {}).get(layer), layer
    # a ratio that prunes nothing says so (ConvNeXt: no BatchNorm), once; the others do not warn
    nothing = [w for w in r["warnings"] if "pruned no channel" in w]
    assert len(nothing) == (0 if name in WITH_BN else 1), r["warnings"]
    if name in WITH_BN:  # channels actually pruned, with the requested ratio
        assert r["pruned"] >= 1 and r["macs_kept"] < 1.0
        for layer, v in rec["layers"].items():
            c, g = v["channels_before"], v.get("groups", 1)  # a grouped conv prunes round(0.3 c/g) per group (S2)
            assert v["channels_after"] == c - g * round(0.3 * c / g) and len(v["kept"]) == v["channels_after"], layer
    # back to PyTorch: the compressed model, same parity
    assert r["parity_module"] <= RTOL, r["parity_module"]
    assert r["parity_pt2"] <= RTOL, r["parity_pt2"]


def test_unsupported_activation_names_the_op_and_module():
    """A config choosing an activation the IR does not have is one clear
    error naming the ATen op and the module it came from."""
    cfg = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=10, hidden_act="mish")
    net = transformers.MobileNetV2ForImageClassification(cfg).eval()
    with pytest.raises(ConversionError) as ei:
        ct.to_udfc(net, INPUT_SHAPE)
    msg = str(ei.value)
    assert msg.startswith("aten.mish.default from module 'mobilenet_v2.conv_stem.first_conv.activation' (")
    assert "transformers/activations.py:" in msg and "return self.act(input)" in msg and "not supported" in msg


def _table():
    rows = []
    for name in MODELS:
        r = measure(name)
        ti, tc, te = r["seconds"]
        rows.append(f"| {name} | {r['parity']:.1e} | {max(r['parity_module'], r['parity_pt2']):.1e} | "
                    f"{r['pruned']} / {r['total']} | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
                    f"{ti:.2f} | {tc:.2f} | {te:.2f} |")
    head = ("| model | import parity | round-trip parity | layers pruned / conv+linear | MACs kept | params kept | "
            "import s | compress s | export .pt2 s |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + rows)


if __name__ == "__main__":  # pragma: no cover
    print(_table())
