"""The udfc-ref writer and reader agree with the safetensors library itself."""

from __future__ import annotations

import json

import numpy as np
from helpers import vgg
from safetensors import safe_open
from safetensors.numpy import save as st_save

from udfc_ref import compress, load, save


def _models():
    m = vgg(0, channels=(3, 8, 12, 12))
    small, _ = compress(m, prune_ratio=0.3, weight_bits=4, method="udfc")
    asym, _ = compress(m, prune_ratio=0.0, weight_bits=8, asymmetric=True, per_tensor=True)
    return [m, small, asym]


def test_safetensors_reads_what_we_write(tmp_path):
    for i, m in enumerate(_models()):
        p = tmp_path / f"m{i}.safetensors"
        save(m, p)
        ours = load(p)
        with safe_open(str(p), framework="np") as f:
            meta = f.metadata()
            theirs = {k: f.get_tensor(k) for k in f.keys()}
        assert meta["format"] == "udfc-ref" and json.loads(meta["graph"]) == ours.graph_json()
        for name, arr in ours.tensors.items():
            if name in ours.quant:
                assert name + "_scale" in theirs
            else:
                assert np.array_equal(theirs[name], arr) and theirs[name].dtype == arr.dtype


def test_we_read_what_safetensors_writes(tmp_path):
    """Re-write each file with the library's own writer (same tensors, same
    metadata): our loader returns the same model, bit for bit."""
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    for i, m in enumerate(_models()):
        p = tmp_path / f"m{i}.safetensors"
        save(m, p)
        with safe_open(str(p), framework="np") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        q = tmp_path / f"lib{i}.safetensors"
        q.write_bytes(st_save(tensors, metadata=meta))
        a, b = load(p), load(q)
        assert np.array_equal(a.forward(x), b.forward(x))
        assert a.record == b.record and set(a.quant) == set(b.quant)


def test_writing_is_deterministic(tmp_path):
    m = _models()[1]
    save(m, tmp_path / "a.safetensors")
    save(m, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
