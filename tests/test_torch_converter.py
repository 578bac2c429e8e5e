"""The PyTorch converter: round trips, state_dict import, op coverage,
errors, the CLI, and compressed models rebuilt in PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import udfc_ref  # noqa: E402
from converters import torch as ct  # noqa: E402
from udfc_ref.errors import ConversionError, FormatError, OptionError  # noqa: E402

import families  # noqa: E402


RTOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


def run(net, x):
    with torch.no_grad():
        return net(torch.as_tensor(x)).numpy()


# ----------------------------------------------------------------- round trip

@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_round_trip_module_and_state_dict(family, tmp_path):
    net = families.build(family, seed=7)
    path = tmp_path / "m.safetensors"
    ct.export(net, path, families.INPUT_SHAPE)
    back = ct.to_module(path)
    assert not back.training
    x = families.example_input(seed=2)
    assert rel_err(run(back, x), run(net, x)) <= RTOL
    sd0 = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd1 = {k: v for k, v in back.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(sd1) == set(sd0) == set(udfc_ref.load(path).tensors)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    # the rebuilt module loads the original weights strictly (same nesting)
    net.load_state_dict(back.state_dict(), strict=True)


class Zoo(nn.Module):
    """Every spelling of the supported ops the converter normalises."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding="same")
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding="valid", padding_mode="zeros")
        self.c = nn.Conv2d(8, 8, 1)
        self.act6 = nn.Hardtanh(0.0, 6.0)
        self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.mp = nn.MaxPool2d((2, 3), stride=1, padding=(1, 1))
        self.idn = nn.Identity()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12 + 16 + 16, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        y = F.relu6(self.b(x))
        z = torch.relu(self.c(y))
        u = self.act6(y.add(z))
        u = torch.add(u, z)
        u = self.mp(self.pool(u))
        v = torch.cat([u, self.idn(u)], dim=1)
        g1 = self.flat(F.adaptive_avg_pool2d(v, 1))
        g2 = v.mean((2, 3))
        g3 = torch.flatten(F.adaptive_avg_pool2d(v, (1, 1)), 1)
        h = self.drop(self.bn1(self.fc(g1)))
        h = torch.cat([h.relu(), g2, g3.reshape(g3.shape[0], -1)], 1)
        return self.fc2(h)


def test_op_spellings():
    net = families.randomize(Zoo(), seed=4)
    model = ct.to_udfc(net, (3, 16, 14))
    ops = [n.op for n in model.nodes]
    for op in ("conv2d", "batch_norm", "relu", "relu6", "add", "avg_pool2d", "max_pool2d", "concat",
               "global_avg_pool", "flatten", "linear"):
        assert op in ops, op
    assert model.node("pool").attrs["count_include_pad"] is False
    assert model.node("a").attrs["padding"] == [1, 1, 1, 1]
    x = torch.randn(2, 3, 16, 14, generator=torch.Generator().manual_seed(0))
    assert rel_err(model.forward(x.numpy()), run(net, x)) <= RTOL
    back = ct.to_module(model)
    assert rel_err(run(back, x), run(net, x)) <= RTOL


class Viewer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.relu(self.conv(x)), 2).view(x.size(0), -1))


def test_view_size_and_dataparallel_prefix():
    net = families.randomize(Viewer(), 0)
    model = ct.to_udfc(nn.DataParallel(net), (3, 14, 14))
    assert "flatten" in [n.op for n in model.nodes]
    assert set(model.tensors) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}


# ---------------------------------------------------------------- errors

class WithSin(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.sin(y).mean((2, 3))  # SIN-LINE: not an op the IR has


class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))

    def forward(self, x):
        return self.body(x).mean((2, 3))


def _line_of(marker):
    src = open(__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(src) if marker in line and "def " not in line)


def test_unsupported_op_names_the_op_and_source_line():
    with pytest.raises(ConversionError) as ei:
        ct.to_udfc(WithSin(), (3, 8, 8))
    msg = str(ei.value)
    assert "aten.sin.default" in msg and "not supported" in msg
    assert f"test_torch_converter.py:{_line_of('SIN-LINE')}" in msg and "torch.sin(y)" in msg
    assert "\n" not in msg  # one line
    # the model's whole source stack is the cause (printed by udfc --debug)
    assert "test_torch_converter.py" in str(ei.value.__cause__)


def test_unsupported_module_names_the_path():
    with pytest.raises(ConversionError, match=r"aten\.group_norm\.default from module 'body\.1' \(GroupNorm\)"):
        ct.to_udfc(WithGroupNorm(), (3, 8, 8))


def test_debug_traceback_reaches_the_model_source(tmp_path, capsys):
    from udfc_ref.cli import main

    (tmp_path / "sinnet.py").write_text("import torch\n\n"
                                        "class Net(torch.nn.Module):\n"
                                        "    def __init__(self):\n"
                                        "        super().__init__()\n"
                                        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n\n"
                                        "    def forward(self, x):\n"
                                        "        return torch.sin(self.conv(x))\n")
    args = ["import", "torch", str(tmp_path / "o.safetensors"), "--module", f"{tmp_path / 'sinnet.py'}:Net",
            "--input-shape", "3,8,8"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("udfc: error: aten.sin.default") and "sinnet.py:9" in err
    assert main(["--debug"] + args) == 1
    err = capsys.readouterr().err
    assert 'sinnet.py", line 9, in forward' in err and "return torch.sin(self.conv(x))" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_capture_failure_is_one_line_naming_the_model_line(tmp_path, capsys):
    from udfc_ref.cli import main

    (tmp_path / "ddnet.py").write_text("import torch\n\n"
                                       "class Net(torch.nn.Module):\n"
                                       "    def __init__(self):\n"
                                       "        super().__init__()\n"
                                       "        self.conv = torch.nn.Conv2d(3, 4, 3)\n\n"
                                       "    def forward(self, x):\n"
                                       "        y = self.conv(x)\n"
                                       "        if y.sum() > 0:  # data-dependent control flow\n"
                                       "            return y.relu()\n"
                                       "        return y\n")
    args = ["import", "torch", str(tmp_path / "o.safetensors"), "--module", f"{tmp_path / 'ddnet.py'}:Net",
            "--input-shape", "3,8,8"]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1  # no torch log or graph dump around it
    assert cap.err.startswith("udfc: error: torch.export cannot capture Net")
    assert "ddnet.py:10 `if y.sum() > 0:" in cap.err
    assert main(["--debug"] + args) == 1
    assert 'ddnet.py", line 10, in forward' in capsys.readouterr().err


@pytest.mark.parametrize("layer, msg", [
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "reflect"),
    (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    (nn.AvgPool2d(2, divisor_override=3), "divisor_override"),
    (nn.Hardtanh(-1.0, 1.0), r"Hardtanh.*clamping to \[-1.0, 1.0\]"),
    (nn.BatchNorm2d(3, track_running_stats=False), "running statistics"),
    (nn.Upsample(scale_factor=2), "upsample"),
])
def test_unsupported_settings(layer, msg):
    net = nn.Sequential(nn.Conv2d(3, 3, 1), layer, nn.Flatten())
    with pytest.raises(ConversionError, match=msg):
        ct.to_udfc(net, (3, 9, 9))


def test_ceil_mode_that_changes_nothing_is_accepted():
    net = families.randomize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten()), 0)
    model = ct.to_udfc(net, (3, 8, 8))
    assert model.shapes[model.output_name] == (3 * 4 * 4,)


def test_mis_mapping_is_caught(monkeypatch):
    """The post-conversion forward check rejects a silently wrong mapping."""
    from converters import torch_ops

    net = families.randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), 0)
    monkeypatch.setattr(torch_ops, "_conv_padding", lambda *a: [1, 1, 1, 1])  # wrong padding ...
    net2 = families.randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten()), 0)
    ct.to_udfc(net2, (3, 8, 8))  # ... is right for this one
    with pytest.raises(ConversionError, match="differ"):
        ct.to_udfc(nn.Sequential(net[0], net[1], nn.AdaptiveAvgPool2d(1), nn.Flatten()), (3, 8, 8))


def test_bad_input_shape():
    with pytest.raises(ConversionError, match="C,H,W"):
        ct.to_udfc(Viewer(), (14, 14))
    with pytest.raises(ConversionError, match="does not run"):
        ct.to_udfc(Viewer(), (3, 20, 20))


def test_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import converters.torch as ct, converters.cli\n"
            "from udfc_ref.errors import ConversionError\n"
            "try:\n    ct.to_udfc(object(), (3, 8, 8))\n"
            "except ConversionError as e:\n    assert \"pip install 'udfc-ref[torch]'\" in str(e); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ------------------------------------------------------------ state dicts

def test_export_state_dict(tmp_path):
    from safetensors.torch import save_file

    net = families.build("resnet", seed=1)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, pt)
    ref = ct.to_udfc(net, families.INPUT_SHAPE)
    x = families.example_input().numpy()
    for w in (st, pt):
        out = tmp_path / (w.name + ".udfc.safetensors")
        ct.export_state_dict(w, families.ResNet, out, "3,64,64")
        m = udfc_ref.load(out)
        assert set(m.tensors) == set(ref.tensors)
        assert all(np.array_equal(m.tensors[k], ref.tensors[k]) for k in ref.tensors)
        assert rel_err(m.forward(x), ref.forward(x)) <= 1e-6
    with pytest.raises(OptionError, match="input"):
        ct.export_state_dict(st, families.ResNet, st, (3, 64, 64))


def test_export_state_dict_key_errors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in families.build("vgg_bn").state_dict().items()}
    sd.pop("features.0.weight")
    sd["extra.weight"] = torch.zeros(3)
    w = tmp_path / "w.safetensors"
    save_file(sd, str(w))
    with pytest.raises(ConversionError, match=r"missing keys: features\.0\.weight.*unexpected keys: extra\.weight"):
        ct.export_state_dict(w, families.VGGBN, tmp_path / "o.safetensors", (3, 64, 64))
    assert not (tmp_path / "o.safetensors").exists()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="bad.pt"):
        ct.export_state_dict(bad, families.VGGBN, tmp_path / "o.safetensors", (3, 64, 64))


def test_load_module_spec(tmp_path):
    spec_file = tmp_path / "mynet.py"
    spec_file.write_text("import torch\nnet = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten())\n"
                         "def build():\n    return net\n")
    assert isinstance(ct.load_module_spec(f"{spec_file}:net"), nn.Sequential)
    assert ct.load_module_spec(f"{spec_file}:build") is not None
    assert isinstance(ct.load_module_spec("families:VGGBN"), families.VGGBN)
    with pytest.raises(ConversionError, match="no attribute"):
        ct.load_module_spec(f"{spec_file}:missing")
    with pytest.raises(ConversionError, match="spec"):
        ct.load_module_spec("no_colon_here")
    with pytest.raises(ConversionError, match="importing"):
        ct.load_module_spec("surely_not_a_module_udfc:x")


# ------------------------------------------------------------------- CLI

def _cli(argv):
    from udfc_ref.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors exit 2
        return e.code


def _run_without_udfc(tmp_path, pt2, x):
    """Run a .pt2 in a fresh interpreter where udfc_ref and converters cannot
    be imported: plain torch.export.load."""
    np.save(tmp_path / "x.npy", np.asarray(x))
    code = ("import sys; sys.modules['udfc_ref'] = None; sys.modules['converters'] = None\n"
            "import numpy as np, torch\n"
            f"m = torch.export.load({str(pt2)!r}).module()\n"
            f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "with torch.no_grad():\n"
            f"    np.save({str(tmp_path / 'y.npy')!r}, m(x).numpy())\n")
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:torch", "-c", code], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(tmp_path / "y.npy")


def test_cli_import_and_export_torch(tmp_path, capsys):
    from safetensors.torch import save_file

    net = families.build("mobilenet_v2", seed=2)
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(w))
    out = tmp_path / "m.safetensors"
    spec = f"{os.path.join(REPO, 'tests', 'families.py')}:MobileNetV2"
    assert _cli(["import", "torch", out, "--module", spec, "--weights", w, "--input-shape", "3,64,64"]) == 0
    x = families.example_input()
    assert rel_err(udfc_ref.load(out).forward(x.numpy()), run(net, x)) <= RTOL
    pt2 = tmp_path / "m.pt2"
    before = out.read_bytes()
    assert _cli(["export", "torch", out, pt2]) == 0
    assert out.read_bytes() == before
    # plain torch.export.load, with udfc-ref and the converters unimportable; any batch size
    x5 = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert rel_err(_run_without_udfc(tmp_path, pt2, x5.numpy()), run(net, x5)) <= RTOL


def test_cli_refuses_torchscript_output_and_pt2_input(tmp_path, capsys):
    net = families.build("vgg_bn")
    f = tmp_path / "m.safetensors"
    ct.export(net, f, families.INPUT_SHAPE)
    for argv, code in ((["export", "torch", f, tmp_path / "m.pt"], 1),
                       (["compress", f, tmp_path / "m.pt", "--prune-ratio", "0.3"], 2),  # a usage error
                       (["compress", f, tmp_path / "m.pth"], 2)):
        assert _cli(argv) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "TorchScript" in err and ".pt2" in err
    assert not list(tmp_path.glob("m.pt*"))
    assert _cli(["export", "torch", f, tmp_path / "m.onnx"]) == 1
    assert ".pt2" in capsys.readouterr().err
    pt2 = tmp_path / "m.pt2"
    ct.save_pt2(f, pt2)
    for argv in (["info", pt2], ["compress", pt2, tmp_path / "o.safetensors"]):
        assert _cli(argv) == 1
        assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_module_from_current_directory(tmp_path, monkeypatch):
    """--module pkg.mod:attr finds a package in the current directory, as
    python -m does, also when sys.path does not hold the current directory
    (the installed console script's sys.path)."""
    pkg = tmp_path / "udfc_test_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text("import torch.nn as nn\n"
                                  "def Net():\n"
                                  "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    for m in [m for m in sys.modules if m.startswith("udfc_test_nets")]:
        monkeypatch.delitem(sys.modules, m)
    path_before = list(sys.path)
    assert _cli(["import", "torch", "o.safetensors", "--module", "udfc_test_nets.small:Net",
                 "--input-shape", "3,8,8"]) == 0
    assert udfc_ref.load(tmp_path / "o.safetensors").shapes["input"] == (3, 8, 8)
    assert sys.path == path_before  # the current directory was on sys.path for that import only


def test_cli_errors(tmp_path, capsys):
    net = families.build("vgg_bn")
    f = tmp_path / "m.safetensors"
    ct.export(net, f, families.INPUT_SHAPE)
    before = f.read_bytes()
    assert _cli(["export", "torch", f, f]) == 1
    assert "input file" in capsys.readouterr().err
    assert f.read_bytes() == before
    assert _cli(["import", "torch", tmp_path / "o.safetensors", "--module", "nope_udfc_mod:X",
                 "--input-shape", "3,64,64"]) == 1
    assert "nope_udfc_mod" in capsys.readouterr().err
    assert _cli(["import", "torch", tmp_path / "o.safetensors", "--module", "families:VGGBN",
                 "--input-shape", "3,8"]) == 1
    assert "C,H,W" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_help_mentions_examples(capsys):
    assert _cli(["import", "torch", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--input-shape" in out and "udfc import torch" in out and "torch.export" in out


def test_every_converter_option_has_help():
    import argparse

    from udfc_ref.cli import build_parser

    def walk(parser, path):
        for act in parser._actions:
            if isinstance(act, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in act._choices_actions}
                for name, sub in act.choices.items():
                    assert helps.get(name), f"subcommand {' '.join(path + [name])} has no help"
                    yield from walk(sub, path + [name])
            elif not isinstance(act, argparse._HelpAction):
                yield path, act

    sub = {a.dest: a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    n = 0
    for cmd in ("import", "export"):
        for path, act in walk(sub.choices[cmd], [cmd]):
            assert act.help, f"option {act.option_strings or act.dest} of {' '.join(path)} has no help"
            n += 1
    assert n >= 8


# ------------------------------------------------------------- compressed

@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_compressed_round_trip(family, tmp_path):
    model = ct.to_udfc(families.build(family, seed=11), families.INPUT_SHAPE)
    small, _ = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6, method="udfc")
    assert small.param_count() < model.param_count()
    path = tmp_path / "small.safetensors"
    udfc_ref.save(small, path)
    back = ct.to_module(path)
    x = families.example_input(seed=9)
    ref = udfc_ref.load(path).forward(x.numpy())
    assert rel_err(run(back, x), ref) <= RTOL
    assert rel_err(run(back, x), small.forward(x.numpy())) <= RTOL
    sd = {k: v for k, v in back.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sum(v.numel() for v in sd.values()) == small.param_count()
    assert set(sd) == {t for n in small.nodes for t in n.params.values()}
    for k, v in sd.items():  # the dequantized floats of the file
        assert np.array_equal(v.numpy(), small.tensors[k]), k
    # the torch.export program of the compressed file
    pt2 = tmp_path / "small.pt2"
    ct.save_pt2(path, pt2)
    prog = torch.export.load(str(pt2))
    with torch.no_grad():
        assert rel_err(prog.module()(x).numpy(), ref) <= RTOL
    assert set(prog.state_dict) >= set(sd)


def test_torchscript_is_deprecated_but_still_works(tmp_path):
    model = ct.to_udfc(families.build("vgg_bn", seed=1), families.INPUT_SHAPE)
    with pytest.warns(DeprecationWarning, match="save_pt2"):
        ct.save_torchscript(model, tmp_path / "m.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(tmp_path / "m.pt"))
    x = families.example_input()
    with torch.no_grad():
        assert rel_err(ts(x).numpy(), model.forward(x.numpy())) <= RTOL


def test_float64_module_and_training_flag_restored():
    net = families.randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()), 0)
    net = net.double().train()
    model = ct.to_udfc(net, (3, 8, 8))
    assert net.training  # the caller's mode is restored
    assert {v.dtype for v in model.tensors.values()} == {np.dtype(np.float64)}
    back = ct.to_module(model)
    assert next(back.parameters()).dtype == torch.float64
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(run(back, x), run(net.eval(), x)) <= 1e-12
