"""Names from a model file are data, never code (issue: Security).

A tensor or node name may hold quotes, newlines, unicode, ``__import__`` or
10 kB of text; exporting such a file to PyTorch must neither run it nor fail
on it, and the original names travel as data beside the module."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
import udfc_ref
from converters.names import is_safe_component, safe_paths

HOSTILE = [
    'classifier.3.b" + str(getattr(__import__("os"), "system")("touch {canary}")) + "',
    "line\nbreak.weight",
    "ünïcode.weight",
    "__import__",
    "x" * 10_000,
    "forward.weight",
    "graph",
    "a..b",
    ".lead",
    "trail.",
    "print.weight",
    "self",
    "torch.nn.functional",
    "0x1.weight",
    "'); import os; os.system('touch {canary}'); ('",
]


def _hostile_model(canary):
    m = helpers.vgg(seed=3)
    names = sorted({t for n in m.nodes for t in n.params.values()})
    ren = {t: HOSTILE[i % len(HOSTILE)].format(canary=canary) + (str(i) if i >= len(HOSTILE) else "")
           for i, t in enumerate(names)}
    m.tensors = {ren.get(k, k): v for k, v in m.tensors.items()}
    for n in m.nodes:
        n.params = {r: ren[t] for r, t in n.params.items()}
        n.name = n.name + f'"); __import__("os").system("touch {canary}") #'
    m.validate()
    return m, ren


SAFE_PATH = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,63}|[0-9]{1,9})(?:\.(?:[A-Za-z_][A-Za-z0-9_]{0,63}|[0-9]{1,9}))*$")


@given(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=30, unique=True))
@settings(max_examples=200, deadline=None)
def test_safe_paths_are_identifiers_and_injective(names):
    out = safe_paths(names, reserved={"forward"})
    assert set(out) == set(names)
    vals = list(out.values())
    assert len(set(vals)) == len(vals)  # injective
    for orig, safe in out.items():
        assert SAFE_PATH.match(safe), (orig, safe)
        assert all(is_safe_component(c, {"forward"}) for c in safe.split("."))
    # no safe path is a proper prefix of another (a tensor cannot also be a submodule)
    prefixes = {".".join(v.split(".")[:i]) for v in vals for i in range(1, len(v.split(".")))}
    assert not (prefixes & set(vals))


def test_safe_paths_keep_framework_names():
    names = ["features.0.weight", "features.0.bias", "classifier.fc.weight", "layer1.0.bn1.running_mean"]
    assert safe_paths(names) == {n: n for n in names}
    out = safe_paths(["a.b", "a.b.c", "forward.weight"], reserved={"forward"})
    assert out["a.b.c"] == "a.b.c" and out["a.b"] != "a.b" and out["forward.weight"] != "forward.weight"


def test_hostile_names_never_run_and_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from converters import torch as ct

    canary = tmp_path / "PWNED"
    m, ren = _hostile_model(canary)
    src = tmp_path / "evil.safetensors"
    udfc_ref.save(m, src)
    m2 = udfc_ref.load(src)
    gm = ct.to_module(m2)
    for k in gm.state_dict():
        assert SAFE_PATH.match(k), k
    x = np.random.default_rng(0).standard_normal((2,) + m.input_shape).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), m.forward(x), rtol=1e-4, atol=1e-5)

    pt = tmp_path / "evil.pt"
    with pytest.warns(DeprecationWarning, match="save_pt2"):
        ct.save_torchscript(src, pt)
    extra = {ct.NAMES_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sm = torch.jit.load(str(pt), _extra_files=extra)
    names = json.loads(extra[ct.NAMES_FILE])
    # every renamed module tensor maps back to its original (hostile) name
    assert set(names.values()) <= set(ren.values())
    assert set(names) <= set(sm.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(sm(torch.from_numpy(x)).numpy(), m.forward(x), rtol=1e-4, atol=1e-5)

    # the torch.export program (.pt2): safe names in the program, the originals as data in its extra file
    pt2 = tmp_path / "evil.pt2"
    ct.save_pt2(src, pt2)
    extra = {ct.NAMES_FILE: ""}
    prog = torch.export.load(str(pt2), extra_files=extra)
    names2 = json.loads(extra[ct.NAMES_FILE])
    assert names2 == names
    for k in prog.state_dict:
        assert SAFE_PATH.match(k), k
    with torch.no_grad():
        np.testing.assert_allclose(prog.module()(torch.from_numpy(x)).numpy(), m.forward(x), rtol=1e-4, atol=1e-5)

    # the CLI paths that write PyTorch files: export and compress
    from udfc_ref.cli import main

    assert main(["export", "torch", str(src), str(tmp_path / "e.pt2")]) == 0
    assert main(["compress", str(src), str(tmp_path / "c.pt2"), "--prune-ratio", "0.3", "--weight-bits", "6"]) == 0
    assert not os.path.exists(canary), "a name from the file ran as code"
