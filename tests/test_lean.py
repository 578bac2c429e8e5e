"""Memory of compress and save (issue 14, "peak memory <= 2 x the model").

* the compressed model holds a quantized weight as its codes only: no
  dequantized float copy beside them (measured with tracemalloc), and a read
  gives ``scale * (q - zero_point)`` as an independent NumPy evaluation of
  Eq. Q1 does, read-only;
* shape bookkeeping (validate, parameter / MAC / byte counts) never
  dequantizes;
* save's read-back check holds no dequantized copy of the model;
* compress starts its walk with the pages of a read-only mapped input given
  back (the selection's reads are not kept resident).
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from helpers import vgg

import udfc_ref
from udfc_ref import compression
from udfc_ref.quantize import QuantizedTensor
from udfc_ref.tensors import Tensors


def _wide(layers=8, c=96):
    """A VGG of ``layers`` equal 3x3 convs (c -> c): the quantized weights dominate its memory."""
    return vgg(3, channels=(3,) + (c,) * layers, hw=4)


def _reference_dequantize(q):
    s = q.scale.astype(np.float64).reshape((-1,) + (1,) * (q.codes.ndim - 1))
    z = 0.0 if q.zero_point is None else q.zero_point.astype(np.float64).reshape(s.shape)
    return ((q.codes.astype(np.float64) - z) * s).astype(q.dtype)


@pytest.mark.parametrize("asym", [False, True])
def test_compressed_weights_are_held_as_codes_and_read_as_eq_q1(asym):
    small, _ = udfc_ref.compress(vgg(), prune_ratio=0.3, weight_bits=4, asymmetric=asym)
    held = set(small.tensors.held_as_codes())
    assert held and held == set(small.quant)
    for k in held:
        w = small.tensors[k]
        q = small.quant[k]
        assert w.dtype == np.float32 and w.shape == q.codes.shape
        assert np.array_equal(w, _reference_dequantize(q))
        with pytest.raises(ValueError):
            w[...] = 0  # a write could not reach the codes: refused, not lost
        assert small.tensors.spec(k).shape == w.shape and small.tensors.spec(k).dtype == w.dtype


def test_compress_does_not_hold_dequantized_copies():
    """Memory the compressed model holds beyond the input model: the codes
    (1 byte a parameter) and small vectors, not a 4-byte float copy of every
    quantized weight beside its codes (which alone would be >= 1 x their
    float32 size)."""
    model = _wide()
    qbytes_before = sum(model.tensors[n.params["weight"]].nbytes for n in model.nodes if n.op == "conv2d")
    tracemalloc.start()
    try:
        small, _ = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=6)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    qbytes = sum(small.tensors.spec(k).nbytes for k in small.quant)
    assert qbytes > 0.4 * qbytes_before  # the quantized layers are most of the model
    assert held < 0.5 * qbytes, (held, qbytes)


def test_shape_bookkeeping_never_dequantizes(monkeypatch):
    small, _ = udfc_ref.compress(vgg(), prune_ratio=0.3, weight_bits=6)
    calls = []
    real = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize", lambda self: calls.append(1) or real(self))
    small.validate()
    counts = small.param_count(), small.flops(), small.weight_bytes()
    copy = small.copy(share_tensors=True)
    assert calls == []
    assert counts == (copy.param_count(), copy.flops(), copy.weight_bytes())
    assert counts[0] == sum(small.tensors[t].size for t in {t for n in small.nodes for t in n.params.values()})


def test_copies_keep_the_codes_and_the_values():
    small, _ = udfc_ref.compress(vgg(), prune_ratio=0.3, weight_bits=6)
    x = np.random.default_rng(1).standard_normal((2,) + small.input_shape).astype(np.float32)
    for deep in (False, True):
        c = small.copy(share_tensors=not deep)
        assert set(c.tensors.held_as_codes()) == set(small.quant)
        for k in c.quant:  # the copy's tensors read its own quantization table
            assert c.tensors.codes(k) is c.quant[k]
            assert (c.quant[k] is small.quant[k]) == (not deep)
        np.testing.assert_array_equal(c.forward(x), small.forward(x))


def test_assigning_an_array_replaces_the_codes():
    t = Tensors({"a": np.zeros(3, np.float32)})
    q = udfc_ref.quantize.quantize(np.arange(6, dtype=np.float32).reshape(2, 3), 8)
    t.hold_codes("b", q)
    assert "b" in t and len(t) == 2 and t.held_as_codes() == ["b"]
    t["b"] = np.ones((2, 3), np.float32)
    assert t.held_as_codes() == [] and t["b"].flags.writeable
    with pytest.raises(KeyError):
        t.codes("b")
    with pytest.raises(TypeError):
        t.hold_codes("c", np.zeros(2))


def test_save_holds_no_dequantized_copy(tmp_path):
    """save packs the codes, writes, and reads every tensor back one at a
    time: its peak is the packed codes plus one tensor's temporaries, far
    below the float32 size of the quantized weights (which holding each
    read-back tensor until the end would reach)."""
    small, _ = udfc_ref.compress(_wide(layers=32, c=64), prune_ratio=0.3, weight_bits=6)
    qbytes = sum(small.tensors.spec(k).nbytes for k in small.quant)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        udfc_ref.save(small, tmp_path / "s.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 0.8 * qbytes, (peak - base, qbytes)  # holding every read-back copy: > 1.0
    back = udfc_ref.load(tmp_path / "s.safetensors")
    for k in small.tensors:
        assert np.array_equal(back.tensors[k], small.tensors[k])


def _mapped_rss_kib(path) -> int | None:
    """Resident KiB of the process's mappings of ``path`` (/proc/self/smaps), None where unavailable."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.endswith(os.fspath(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_the_walk_starts_with_the_input_given_back(tmp_path, monkeypatch):
    """The channel selection reads every producer's filters before the walk;
    their pages are given back before the walk starts (read again, from the
    page cache, when it reaches them): the input is resident a few layers at
    a time, not whole."""
    path = tmp_path / "m.safetensors"
    udfc_ref.save(_wide(layers=6, c=128), path)
    size_kib = os.path.getsize(path) // 1024
    ro = udfc_ref.load(path, writable=False)
    sum(float(np.abs(v).sum()) for v in ro.tensors.values())  # every page resident
    assert size_kib > 2048 and _mapped_rss_kib(path) > size_kib // 2
    seen = []
    real = compression._give_back

    def spy(orig, layer_nodes, done, step, dm):
        if step == 0:
            seen.append(_mapped_rss_kib(path))
        return real(orig, layer_nodes, done, step, dm)

    monkeypatch.setattr(compression, "_give_back", spy)
    small, _ = udfc_ref.compress(ro, prune_ratio=0.3, weight_bits=6)
    assert seen and seen[0] < size_kib // 8, (seen, size_kib)
    ref, _ = udfc_ref.compress(udfc_ref.load(path), prune_ratio=0.3, weight_bits=6)
    for k in ref.tensors:  # the pages read again hold the same values
        assert np.array_equal(small.tensors[k], ref.tensors[k]), k


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("sym", [True, False])
def test_finite_from_the_codes_matches_the_dequantized_values(per_channel, sym):
    """``QuantizedTensor.finite`` (extreme codes only) against isfinite of
    the whole dequantized tensor, scales pushed past the float32 limit."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    q = udfc_ref.quantize.quantize(w, 6, symmetric=sym, per_channel=per_channel)
    lim = float(np.finfo(np.float32).max)
    for s in (1.0, lim / 40, lim / 20, lim / 10, lim / 2, np.inf, np.nan):
        scale = q.scale.copy()
        scale[-1] = s
        q2 = QuantizedTensor(q.codes, scale, q.zero_point, q.bits, q.symmetric, q.per_channel, q.dtype)
        with np.errstate(all="ignore"):
            want = bool(np.all(np.isfinite(q2.dequantize())))
        assert q2.finite() == want, s


def test_same_as_sees_one_code_and_one_scale_bit():
    w = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    q = udfc_ref.quantize.quantize(w, 4, symmetric=False)
    same = QuantizedTensor(q.codes.astype(np.uint8), q.scale.copy(), q.zero_point.astype(np.uint8), 4, False, True)
    assert same.same_as(q)  # values, not code dtypes (a file holds them unsigned)
    codes = q.codes.copy()
    codes[2, 3] = codes[2, 3] + 1 if codes[2, 3] < 15 else codes[2, 3] - 1
    assert not QuantizedTensor(codes, q.scale, q.zero_point, 4, False, True).same_as(q)
    scale = q.scale.copy()
    scale.view(np.uint32)[1] ^= 1
    assert not QuantizedTensor(q.codes, scale, q.zero_point, 4, False, True).same_as(q)
    assert not QuantizedTensor(q.codes, q.scale, q.zero_point, 5, False, True).same_as(q)


def test_compressing_a_compressed_model_reads_its_codes(tmp_path):
    """A model holding codes is an input like any other: compressing it again
    gives what compressing the same model loaded from its file gives."""
    small, _ = udfc_ref.compress(vgg(), prune_ratio=0.3, weight_bits=6)
    udfc_ref.save(small, tmp_path / "s.safetensors")
    loaded = udfc_ref.load(tmp_path / "s.safetensors")
    assert not loaded.tensors.held_as_codes() and small.tensors.held_as_codes()
    a, ra = udfc_ref.compress(small, prune_ratio=0.2, weight_bits=4)
    b, rb = udfc_ref.compress(loaded, prune_ratio=0.2, weight_bits=4)
    assert [r.error_after for r in ra.layers] == [r.error_after for r in rb.layers]
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert np.array_equal(a.tensors[k], b.tensors[k]), k
