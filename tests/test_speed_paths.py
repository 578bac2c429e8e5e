"""The fast paths of issue 14 against their references.

* ``compress`` (float32 covariances, Mehler series cut per entry) against
  ``compress(exact=True)`` (float64, series to 1e-10): the coefficients T, t
  and the reported errors within the tolerance stated in docs/derivation.md
  ("Precision");
* the per-entry Mehler sum against the plain 30-term sum, within its bound;
* the symmetric blocked Gram product against the plain product;
* the chunked bit packing against a bit-by-bit reference;
* save's tensor-by-tensor read-back check and the memory-mapped loader.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import mobilenet_block, resnet_block, vgg
from modern_blocks import mbconv_net

import udfc_ref
from udfc_ref import compression
from udfc_ref.datamodel import DataModel, gram_sym
from udfc_ref.errors import NumericError
from udfc_ref.moments import MEHLER_TOL, MEHLER_TOL32, activation_mean_var, hermite_coefficients, mehler_sum
from udfc_ref.quantize import pack_codes, qrange, unpack_codes

#: the stated tolerance of the fast path (docs/derivation.md, "Precision")
T_RTOL = 1e-3  # relative Frobenius difference of T and of t, per layer pair
ERR_ATOL = 1e-5  # absolute difference of the reported errors (Eq. E2)


_REAL_UDFC = compression.udfc


def _solved(monkeypatch, model, exact, **kw):
    got = []
    real = _REAL_UDFC

    def spy(st, n, a1, a2):
        T, t = real(st, n, a1, a2)
        got.append((T, t))
        return T, t

    monkeypatch.setattr(compression, "udfc", spy)
    _, rep = udfc_ref.compress(model, method="udfc", exact=exact, **kw)
    return got, rep


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("build", [lambda: vgg(3, channels=(3, 16, 24, 24)), lambda: resnet_block(1, c=16),
                                   lambda: mobilenet_block(2, hidden=16), lambda: mbconv_net(4, hidden=16)],
                         ids=["vgg", "resnet", "mobilenet", "mbconv-se"])
def test_fast_path_within_tolerance_of_exact(monkeypatch, build, ratio):
    model = build()
    exact, rep_e = _solved(monkeypatch, model, True, prune_ratio=ratio, weight_bits=6)
    fast, rep_f = _solved(monkeypatch, model, False, prune_ratio=ratio, weight_bits=6)
    assert len(exact) == len(fast) > 0
    for (Te, te), (Tf, tf) in zip(exact, fast):
        assert np.linalg.norm(Tf - Te) <= T_RTOL * np.linalg.norm(Te)
        assert np.linalg.norm(tf - te) <= T_RTOL * max(np.linalg.norm(te), 1e-12)
    for a, b in zip(rep_e.layers, rep_f.layers):
        for x, y in ((a.error_before, b.error_before), (a.error_after, b.error_after)):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= ERR_ATOL


def test_exact_path_is_float64():
    dm = DataModel(vgg(), lazy=False)
    assert all(v.cov.dtype == np.float64 for v in dm.values.values() if v is not None)
    dm32 = DataModel(vgg(), lazy=False, dtype=np.float32)
    assert all(v.cov.dtype == np.float32 for v in dm32.values.values() if v is not None)


@pytest.mark.parametrize("dtype, tol", [(np.float64, MEHLER_TOL), (np.float32, MEHLER_TOL32)])
@pytest.mark.parametrize("act", ["relu", "relu6", "silu"])
def test_mehler_per_entry_truncation_within_its_bound(dtype, tol, act):
    rng = np.random.default_rng(7)
    na, nb = 60, 45
    beta, gamma = rng.normal(0, 1, na), rng.uniform(0.3, 2, na)
    beta_b, gamma_b = rng.normal(0, 1, nb), rng.uniform(0.3, 2, nb)
    ca, cb = hermite_coefficients(beta, gamma, act), hermite_coefficients(beta_b, gamma_b, act)
    va, vb = activation_mean_var(beta, gamma, act)[1], activation_mean_var(beta_b, gamma_b, act)[1]
    # a spread of magnitudes: most entries small (few terms), some near +-1 (all terms)
    rho = rng.uniform(-1, 1, (na, nb)) ** 5
    rho[rng.random((na, nb)) < 0.05] = rng.choice([-0.999, 0.97, 1.0])
    got, (i, k) = mehler_sum(rho.astype(dtype), ca.astype(dtype), cb.astype(dtype), tol=tol)
    full = sum(rho ** n * np.outer(ca[n - 1], cb[n - 1]) for n in range(1, ca.shape[0] + 1))
    bound = tol * np.sqrt(np.outer(va, vb)) + (4e-6 if dtype == np.float32 else 1e-13) * np.sqrt(np.outer(va, vb))
    assert got.dtype == dtype
    assert np.all(np.abs(got - full) <= bound)
    # the entries reported as unfinished after 30 terms are exactly those with |rho|^31 > tol
    want = np.argwhere(np.abs(rho.astype(dtype)) > tol ** (1 / 31))
    assert sorted(zip(i.tolist(), k.tolist())) == sorted(map(tuple, want.tolist()))


@pytest.mark.parametrize("n, block", [(1, 4), (7, 3), (64, 16), (50, 64)])
def test_gram_sym_is_the_symmetric_product(n, block):
    rng = np.random.default_rng(n)
    f = rng.standard_normal((n, 11))
    s = rng.standard_normal((11, 11))
    a = f @ (s @ s.T)
    g = gram_sym(a, f, block=block)
    assert np.array_equal(g, g.T)
    assert np.allclose(g, a @ f.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", range(2, 8))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_codes_against_a_bit_by_bit_reference(bits, symmetric):
    rng = np.random.default_rng(bits)
    lo, hi = qrange(bits, symmetric)
    for n in (1, 8, 13, 1001):
        codes = rng.integers(lo, hi + 1, n).astype(np.int8 if symmetric else np.uint8)
        stream = "".join(format(int(c) - lo, f"0{bits}b") for c in codes)
        stream += "0" * (-len(stream) % 8)
        ref = np.array([int(stream[j:j + 8], 2) for j in range(0, len(stream), 8)], dtype=np.uint8)
        packed = pack_codes(codes, bits, symmetric)
        assert np.array_equal(packed, ref)
        back = unpack_codes(packed, bits, symmetric, codes.shape)
        assert back.dtype == codes.dtype and np.array_equal(back, codes)


def test_save_refuses_a_file_that_differs_from_the_model(tmp_path, monkeypatch):
    """The read-back check compares every stored tensor with the model's,
    bit for bit: a serialiser that writes one wrong byte writes nothing."""
    model, rep = udfc_ref.compress(vgg(), prune_ratio=0.3, weight_bits=6)
    real = udfc_ref.io._chunks

    def corrupt(m):
        chunks = real(m)
        last = bytearray(chunks[-1])
        last[0] ^= 1
        return chunks[:-1] + [bytes(last)]

    monkeypatch.setattr(udfc_ref.io, "_chunks", corrupt)
    out = tmp_path / "o.safetensors"
    with pytest.raises((NumericError, udfc_ref.FormatError), match="nothing was written"):
        udfc_ref.save(model, out)
    assert list(tmp_path.iterdir()) == []


def test_read_only_load_and_page_release(tmp_path):
    path = tmp_path / "m.safetensors"
    m = vgg()
    udfc_ref.save(m, path)
    before = path.read_bytes()
    ro = udfc_ref.load(path, writable=False)
    w = ro.tensors["c1.weight"]
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[...] = 0
    copy = w.copy()
    udfc_ref.io.release_pages(list(ro.tensors.values()))
    assert np.array_equal(w, copy)  # the pages are read again from the file
    rw = udfc_ref.load(path)
    rw.tensors["c1.weight"][...] = 0  # private copy-on-write map
    assert path.read_bytes() == before
    small, _ = udfc_ref.compress(ro, prune_ratio=0.3, weight_bits=6)
    small2, _ = udfc_ref.compress(m, prune_ratio=0.3, weight_bits=6)
    for k, v in small2.tensors.items():
        assert np.array_equal(small.tensors[k], v)


def test_released_layers_keep_no_input_model():
    m = vgg()
    dm = DataModel(m, lazy=True)
    dm.release("c1")  # before the data model reached it
    dm.advance_to(m.nodes[-1].name)
    assert "c1" not in dm.inputs and "c2" in dm.inputs
    assert math.isfinite(float(dm.inputs["c2"].cov_c.sum()))


def test_scaling_benchmark_measures_a_whole_process_pair(tmp_path):
    """benchmarks/scaling.py: one tiny model measured as a pair of whole
    processes (compress and the I/O floor) gives positive times, a ratio, a
    peak and the stage split; the fitted exponent recovers a known power law."""
    import os

    from helpers import benchmark_script

    mod = benchmark_script("scaling")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = mod.measure(mod.wide(16), str(tmp_path), 1, env)
    assert r["compress"]["wall"] > 0 and r["floor"]["wall"] > 0 and r["ratio_wall"] > 0
    assert r["compress"]["peak_mib"] > 0 and "data model" in r["stages"] and r["params"] == mod.wide(16).param_count()
    assert os.listdir(tmp_path) == []  # the files of the pair are removed
    xs = [64, 128, 256, 512]
    assert mod.exponent(xs, [3.0 * x**2 for x in xs]) == pytest.approx(2.0, abs=1e-9)
    assert mod.exponent(xs, [5.0 + 0 * x for x in xs]) == pytest.approx(0.0, abs=1e-9)
