"""The torch.export import path: output selection, constant folding into
``affine``, pad folding, in-place ops, decomposed ATen forms, modern
activations and channels-last blocks, and its error cases.  Every parity
check is against the module's own PyTorch forward."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from converters import torch as ct  # noqa: E402
from converters import torch_import as ti  # noqa: E402
from udfc_ref.errors import ConversionError  # noqa: E402

import families  # noqa: E402

RTOL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


def check(net, shape, batch=2, seed=0):
    """Convert ``net``; assert NumPy forward, to_module and the .pt2 program
    all match the module's forward; return the Model."""
    model = ct.to_udfc(net, shape)
    x = torch.randn((batch,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = ct.pick_output(net(x)).numpy()
        assert rel_err(model.forward(x.numpy()), ref) <= RTOL
        assert rel_err(ct.to_module(model)(x).numpy(), ref) <= RTOL
    return model


def ops(model):
    return [n.op for n in model.nodes]


# ------------------------------------------------------------ output rule

class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def features(self, x):
        return self.conv(x).mean((2, 3))


class ReturnsDict(Body):
    def forward(self, x):
        f = self.features(x)
        return {"features": f, "logits": self.fc(f)}


class ReturnsDictWithoutLogits(Body):
    def forward(self, x):
        f = self.features(x)
        return {"hidden": None, "embedding": self.fc(f), "features": f}


class ReturnsTuple(Body):
    def forward(self, x):
        f = self.features(x)
        return None, (self.fc(f), f)


@dataclasses.dataclass
class Out:
    features: torch.Tensor
    logits: torch.Tensor


class ReturnsObject(Body):
    def forward(self, x):
        f = self.features(x)
        return Out(f, self.fc(f))


class ReturnsModelOutput(Body):
    def forward(self, x):
        from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

        f = self.features(x)
        return ImageClassifierOutputWithNoAttention(logits=self.fc(f), pooler_output=f) \
            if "pooler_output" in ImageClassifierOutputWithNoAttention.__dataclass_fields__ \
            else ImageClassifierOutputWithNoAttention(logits=self.fc(f), hidden_states=(f,))


@pytest.mark.parametrize("cls", [ReturnsDict, ReturnsDictWithoutLogits, ReturnsTuple, ReturnsObject,
                                 ReturnsModelOutput])
def test_output_is_logits_else_first_tensor(cls):
    net = families.randomize(cls(), 0)
    model = check(net, (3, 6, 6))
    assert model.shapes[model.output_name] == (5,)  # the linear head, never the features
    assert ops(model)[-1] == "linear"


class ReturnsNothing(nn.Module):
    def forward(self, x):
        return {"n": 3}


def test_output_without_tensor_is_an_error():
    with pytest.raises(ConversionError, match="holds no tensor"):
        ct.to_udfc(ReturnsNothing(), (3, 4, 4))


class Same(nn.Module):
    def forward(self, x):
        return x.contiguous()


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.w * 2


def test_trivial_outputs_are_errors():
    with pytest.raises(ConversionError, match="returns its input unchanged"):
        ct.to_udfc(Same(), (3, 4, 4))
    with pytest.raises(ConversionError, match="does not depend on its input"):
        ct.to_udfc(Constant(), (3, 4, 4))


# ------------------------------------------------- constants and folding

class Normalised(nn.Module):
    """Per-channel input normalisation from buffers, a lifted constant, a
    scalar affine, a channels-last layer scale and a bias added in forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, -0.2, 0.1]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.9, 1.3, 0.7]).view(1, 3, 1, 1), persistent=False)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.shift = nn.Parameter(torch.linspace(-1, 1, 6).view(6, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # a lifted constant
        y = self.conv(0.5 * x + 1.0)
        y = (y.permute(0, 2, 3, 1) * self.gamma).permute(0, 3, 1, 2)  # layer scale on channels-last
        return 2.0 - (y + self.shift)


def test_constants_become_affine_with_stable_names():
    net = families.randomize(Normalised(), 1)
    model = check(net, (3, 7, 5))
    assert ops(model).count("affine") == 8 and "pad" not in ops(model)
    names = set(model.tensors)
    assert {"conv.weight", "conv.bias", "gamma"} <= names  # used as they are: state_dict names
    assert "shift" in names  # a (6, 1, 1) parameter stored as its (6,) vector keeps its name
    derived = names - {"conv.weight", "conv.bias", "gamma", "shift"}
    assert len(derived) == 7 and all(n.endswith((".weight", ".bias")) for n in derived), derived
    # names are stable: a second conversion gives the same names and values
    again = ct.to_udfc(net, (3, 7, 5))
    assert set(again.tensors) == names
    assert all(np.array_equal(again.tensors[k], model.tensors[k]) for k in names)


def test_float64_model_keeps_float64_constants():
    net = families.randomize(Normalised(), 1).double()
    model = ct.to_udfc(net, (3, 7, 5))
    assert {t.dtype for t in model.tensors.values()} == {np.dtype(np.float64)}
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model.forward(x.numpy()), net(x).numpy()) <= 1e-12


class PerElement(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("mask", torch.rand(1, 4, 5, 5))

    def forward(self, x):
        return self.conv(x) * self.mask


def test_constant_along_several_axes_is_an_error():
    with pytest.raises(ConversionError, match=r"aten\.mul\.Tensor.*varies along 3 axes"):
        ct.to_udfc(PerElement(), (3, 5, 5))


# ------------------------------------------------------------------ pads

class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, groups=4)

    def forward(self, x):
        x = self.conv(F.pad(x, (1, 2, 0, 1)))  # (left, right, top, bottom)
        x = F.max_pool2d(F.pad(x, (0, 1, 1, 0), value=-math.inf), 2, 1)
        x = self.dw(F.pad(F.pad(x, (1, 0, 0, 0)), (0, 1, 1, 1)))  # a pad of a pad
        x = F.avg_pool2d(F.pad(x, (1, 1, 0, 0)), 3, 1)
        return torch.relu(F.pad(x, (1, 1, 1, 1), value=0.5))  # not before a conv / pool: a pad node


def test_pads_fold_into_conv_and_pool():
    net = families.randomize(Padded(), 2)
    model = check(net, (3, 11, 10))
    assert model.node("conv").attrs["padding"] == [0, 1, 1, 2]
    assert model.node("dw").attrs["padding"] == [1, 1, 1, 1]
    pools = [n for n in model.nodes if n.op in ("max_pool2d", "avg_pool2d")]
    assert [n.attrs["padding"] for n in pools] == [[1, 0, 0, 1], [0, 0, 1, 1]]
    pads = [n for n in model.nodes if n.op == "pad"]
    assert len(pads) == 1 and pads[0].attrs == {"padding": [1, 1, 1, 1], "value": 0.5}


class ZeroPadBeforeMaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1)), 2)  # zeros are not -inf: not folded


def test_zero_pad_is_not_folded_into_max_pool():
    model = check(families.randomize(ZeroPadBeforeMaxPool(), 3), (3, 9, 9))
    assert ops(model).count("pad") == 1


# ---------------------------------------------------------- in-place ops

class InPlaceSafe(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        return y.relu_()


class InPlaceThroughView(InPlaceSafe):
    def forward(self, x):
        y = self.a(x)
        v = y.view(y.shape)
        v.relu_()  # changes y too
        return y + self.b(x)


def test_in_place_ops():
    x = torch.zeros(2, 3, 6, 6)
    safe = ti.capture(InPlaceSafe().eval(), (3, 6, 6), torch.float32)
    assert any(n.target is torch.ops.aten.add_.Tensor for n in safe.graph.nodes)  # kept: its result is used
    viewed = ti.capture(InPlaceThroughView().eval(), (3, 6, 6), torch.float32)
    assert not any(str(n.target).endswith("_.default") for n in viewed.graph.nodes)  # functionalised
    for cls in (InPlaceSafe, InPlaceThroughView):
        net = families.randomize(cls(), 4)
        model = check(net, (3, 6, 6))
        assert "relu" in ops(model)
    assert x.abs().sum() == 0


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x)


def test_state_changing_forward_is_an_error():
    with pytest.raises(ConversionError, match="changes its state"):
        ct.to_udfc(Counter(), (3, 6, 6))


# ---------------------------------------------------------- shapes / Python

class ShapeDependent(nn.Module):
    """Python on sizes in forward, as Hugging Face models have: a channel
    check and TF-style 'same' padding computed with int()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph = max((math.ceil(h / 2) - 1) * 2 + 3 - h, 0)
        pw = max((math.ceil(w / 2) - 1) * 2 + 3 - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.flatten(2).mean(-1))


def test_shape_dependent_python_is_specialised():
    net = families.randomize(ShapeDependent(), 5)
    model = check(net, (3, 10, 9))
    assert model.node("conv").attrs["padding"] == [0, 1, 1, 1]
    model2 = check(net, (3, 11, 11))  # another input shape: other padding
    assert model2.node("conv").attrs["padding"] == [1, 1, 1, 1]


class MixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x).reshape(1, -1)


def test_reshape_across_the_batch_is_an_error():
    with pytest.raises(ConversionError, match="does not run|mixes the batch axis|differ"):
        ct.to_udfc(MixesBatch(), (3, 4, 4))


# --------------------------------------------------- modern ops, layouts

class Modern(nn.Module):
    """SiLU / hard-swish / GELU (both forms) / sigmoid, a squeeze-excitation
    gate, a ConvNeXt channels-last block with layer norm and a layer scale,
    and a softmax head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16, eps=1e-6)
        self.pw1 = nn.Linear(16, 32)
        self.pw2 = nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.head_norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        g = torch.sigmoid(self.se_expand(F.hardswish(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = x * g
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)), approximate="tanh"))
        x = x + (self.scale * F.gelu(y)).permute(0, 3, 1, 2)
        x = F.hardsigmoid(x) * x
        return torch.softmax(self.head(self.head_norm(x.mean([-2, -1]))), dim=-1)


def test_modern_ops_and_channels_last_block(tmp_path):
    net = families.randomize(Modern(), 6)
    model = check(net, (3, 9, 8))
    for op in ("silu", "hardswish", "sigmoid", "mul", "permute", "layer_norm", "gelu", "affine", "hardsigmoid",
               "softmax", "global_avg_pool"):
        assert op in ops(model), op
    gelus = [n.attrs["approximate"] for n in model.nodes if n.op == "gelu"]
    assert sorted(gelus) == ["none", "tanh"]
    assert model.node("norm").attrs == {"axis": 3, "eps": 1e-6}
    assert "scale" in model.tensors  # the layer scale keeps its state_dict name
    pt2 = tmp_path / "m.pt2"
    ct.save_pt2(model, pt2)
    x = torch.randn(4, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(torch.export.load(str(pt2)).module()(x).numpy(), net(x).numpy()) <= RTOL


# ---------------------------------------------------- decomposed ATen forms

@pytest.mark.parametrize("family", ["vgg_bn", "mobilenet_v2"])
@pytest.mark.parametrize("table", ["functional", "core"])
def test_decomposed_forms(family, table):
    """The handlers also read the graphs run_decompositions produces (empty
    table: functional ATen; default table: core ATen with convolution, addmm,
    _native_batch_norm_legit_no_training, max_pool2d_with_indices ...)."""
    import warnings

    net = families.build(family, seed=8)
    ep = ti.capture(net, families.INPUT_SHAPE, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = ep.run_decompositions({} if table == "functional" else None)
    model = ti.Importer(ep, families.INPUT_SHAPE).run()
    x = families.example_input(seed=2)
    with torch.no_grad():
        assert rel_err(model.forward(x.numpy()), net(x).numpy()) <= RTOL
    keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(model.tensors) == keys


# ------------------------------------------------------------- progress

def test_import_shows_progress(capsys, monkeypatch):
    from udfc_ref import progress

    init = progress.Progress.__init__

    def drawn_at_once(self, total, label="", *args, **kwargs):  # the bar drawn at once, also on a non-TTY
        kwargs.update(delay=0.0, enabled=True)
        init(self, total, label, **kwargs)

    monkeypatch.setattr(progress.Progress, "__init__", drawn_at_once)
    ct.to_udfc(families.build("vgg_bn"), families.INPUT_SHAPE, progress=True)
    err = capsys.readouterr().err
    assert "import torch" in err and err.endswith("\n")
    ct.to_udfc(families.build("vgg_bn"), families.INPUT_SHAPE)
    assert capsys.readouterr().err == ""
