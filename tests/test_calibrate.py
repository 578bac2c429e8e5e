"""Calibration statistics (derivation section 13, Eq. C1-C5): compress with
unlabeled images.  References are independent of the streaming code: the
whole calibration set run through ``Model.forward`` at once, ``np.cov``, and
a PyTorch convolution for the independent mode's embedded producer."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import pytest

import udfc_ref
import udfc_ref.calibrate as cal
from udfc_ref.errors import FormatError, OptionError
from udfc_ref.evaldata import DataError
from udfc_ref.sources import read_value
from udfc_ref.pairs import find_pairs

from helpers import mobilenet_block, vgg
from modern_blocks import mbconv_net, regnet_net


def _images(model, n=40, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + model.input_shape).astype(np.float32)


def _rows(v):
    v = np.asarray(v, np.float64)
    return np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]) if v.ndim > 2 else v.reshape(v.shape[0], -1)


def _capture(monkeypatch):
    """Record (pair, which, PairStats) of every calibrated request."""
    log = []
    orig = cal.CalibratedStats.stats

    def stats(self, req):
        st = orig(self, req)
        log.append((req.pair, req.which, st))
        return st

    monkeypatch.setattr(cal.CalibratedStats, "stats", stats)
    return log


def _moments(a, q):
    """PairStats fields by np.cov on whole arrays (population moments)."""
    c = np.cov(np.c_[a, q].T, bias=True)
    n = a.shape[1]
    return a.mean(0), np.diag(c)[:n], q.mean(0), c[n:, n:], c[:n, n:]


def _check(st, ref, tol=1e-5):
    for got, want in zip((st.mean_a, st.var_a, st.mean_q, st.cov_q, st.cross), ref):
        scale = max(np.abs(want).max(), 1e-12)
        assert np.abs(got - want).max() <= tol * scale


@pytest.mark.parametrize("build, options", [
    (lambda: vgg(seed=3), {}), (lambda: mobilenet_block(seed=4), {}), (lambda: mbconv_net(seed=5), {}),
    (lambda: regnet_net(seed=6, se=True), dict(bias_correction=True, asymmetric=True, criterion="cov"))],
    ids=["vgg", "dw-chain", "mbconv-se", "grouped-se-bias-correction"])
def test_sequential_statistics_are_the_compressed_networks_moments(build, options, monkeypatch):
    """Eq. C1-C2: in sequential mode, a~_K is the compressed network itself:
    the final model's values at the read value (every layer upstream of a
    pair is final when its statistics are read -- also with bias correction
    and grouped / SE producers), a the original's."""
    model = build()
    x = _images(model)
    monkeypatch.setattr(cal, "BATCH_BYTES", 1)  # one image per batch: many merges of Eq. C1
    log = _capture(monkeypatch)
    small, rep = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=6, calibration=x, **options)
    assert log
    ov = model.forward(x, return_values=True)
    cv = small.forward(x, return_values=True)
    for pair, which, st in log:
        v = read_value(model, pair, which)
        _check(st, _moments(_rows(ov[v]), _rows(cv[v])))
    assert rep.options["calibration"] == {"mode": "sequential", "images": 40}
    assert small.record["calibration"] == {"mode": "sequential", "images": 40}


@pytest.mark.parametrize("bits", [6, None])
def test_independent_statistics_use_the_original_input(bits, monkeypatch):
    """Eq. C4: the kept filters with their quantization error in the original
    input coordinates, on the original network's input of the producer,
    through the original BN's kept rows.  Reference: PyTorch's convolution.
    At 6 bits the first pair (whose input is not pruned: the embedded
    filters are the quantized layer itself); in float every pair read at
    its activation (the embedded filters are the original kept rows)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    model = vgg(seed=6)
    x = _images(model)
    log = _capture(monkeypatch)
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=bits, calibration=x,
                                 calibration_mode="independent")
    ov = model.forward(x, return_values=True)
    checked = 0
    for pair, which, st in log:
        p, kept = pair.producer, st.kept
        v = read_value(model, pair, which)
        if v != pair.value or (bits is not None and p.name != "c0"):
            continue
        w = (small.tensors[small.node(p.name).params["weight"]] if bits is not None
             else model.tensors[p.params["weight"]][kept]).astype(np.float64)
        z = F.conv2d(torch.from_numpy(np.asarray(ov[p.inputs[0]], np.float64)), torch.from_numpy(w),
                     padding=1).numpy()
        g, b, mu, var = (model.tensors[pair.bn.params[r]].astype(np.float64)[kept]
                         for r in ("weight", "bias", "running_mean", "running_var"))
        sh = (1, -1, 1, 1)
        z = (z - mu.reshape(sh)) * (g / np.sqrt(var + 1e-5)).reshape(sh) + b.reshape(sh)
        _check(st, _moments(_rows(ov[v]), _rows(np.maximum(z, 0))), tol=1e-4)
        checked += 1
    assert checked == (1 if bits is not None else 2)


def test_each_node_runs_once_per_batch_and_memory_spills_to_temp_files(monkeypatch):
    """Eq. C2: linear work (every node of each network once per batch) and
    bounded RAM: with a zero RAM budget every kept value is a memory map, the
    results are the same, and the temporary files are gone afterwards."""
    model = vgg(seed=7)
    x = _images(model, n=24)
    monkeypatch.setattr(cal, "BATCH_BYTES", 1)
    want, rep_want = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=6, calibration=x)
    counts = {}
    real = cal.run_node

    def counting(m, n, ins):
        counts[(id(m), n.name)] = counts.get((id(m), n.name), 0) + 1
        return real(m, n, ins)

    monkeypatch.setattr(cal, "run_node", counting)
    monkeypatch.setattr(cal, "RAM_BUDGET", 0)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "udfc-calib-*")))
    got, rep = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=6, calibration=x)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "udfc-calib-*"))) == before
    assert counts and set(counts.values()) == {24}  # one image per batch, each node once per batch
    assert len(counts) <= 2 * len(model.nodes)
    for k in want.tensors:
        np.testing.assert_array_equal(want.tensors[k], got.tensors[k])
    assert [r.measured_after for r in rep.layers] == [r.measured_after for r in rep_want.layers]


def test_an_exact_duplicate_is_rebuilt_exactly_with_calibration(monkeypatch):
    """A channel that equals another on every image: the covariance
    selection (Eq. S4, measured Cov) prunes one of the two, and it is rebuilt
    exactly from measured statistics (alpha = 0, refit ridge 0), in every mode."""
    monkeypatch.setattr(cal, "REFIT_RIDGE", 0.0)
    model = vgg(seed=8)
    w = model.tensors["c0.weight"].copy()
    w[0] = w[5]
    model.tensors["c0.weight"] = w
    for r in ("weight", "bias", "running_mean", "running_var"):
        t = model.tensors[f"b0.{r}"].copy()
        t[0] = t[5]
        model.tensors[f"b0.{r}"] = t
    x = _images(model, n=30)
    skip = [n.name for n in model.nodes if n.op in ("conv2d", "linear") and n.name != "c0"]
    y0 = model.forward(x)
    for mode in ("sequential", "oracle", "independent"):
        small, rep = udfc_ref.compress(model, prune_ratio=1 / 8, calibration=x, calibration_mode=mode, alpha1=0.0,
                                       alpha2=0.0, skip=skip, criterion="cov")
        kept = small.record["layers"]["c0"]["kept"]
        assert len(kept) == 7 and set(range(8)) - set(kept) in ({0}, {5})
        np.testing.assert_allclose(small.forward(x), y0, rtol=1e-4, atol=1e-4)
        assert rep.layers[0].measured_after < 1e-8


def test_audit_mode_compresses_data_free_and_measures():
    """``calibration_mode="audit"``: the model is the data-free one, bit for
    bit; the report holds the measured and the predicted errors."""
    model = mobilenet_block(seed=9)
    x = _images(model)
    free, rep_free = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=6)
    aud, rep = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=6, calibration=x, calibration_mode="audit")
    for k in free.tensors:
        np.testing.assert_array_equal(free.tensors[k], aud.tensors[k])
    pairs = [r for r in rep.layers if r.error_after is not None]
    assert pairs and all(r.measured_after is not None and r.stats_error is not None for r in pairs)
    # in audit mode the solver's own error is the data model's prediction
    assert [r.predicted_after for r in pairs] == [r.error_after for r in pairs]
    assert [r.error_after for r in pairs] == [r.error_after for r in rep_free.layers if r.error_after is not None]
    text = rep.format()
    assert "measured" in text and "predicted" in text and "audit" in text
    assert rep.stage_seconds["calibration"] > 0 and "calibration" not in rep_free.stage_seconds


def test_moments_merge_matches_numpy():
    """Eq. C1: the batch-merged moments equal np.cov of all rows (offset data:
    no cancellation of raw sums)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1000, 5)) * 3 + 1e4
    q = a[:, :3] * 0.5 + rng.standard_normal((1000, 3)) - 7e3
    m = cal.Moments()
    edges = [0, 1, 8, 300, 301, 1000]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m.add(a[lo:hi], q[lo:hi])
    st = m.stats(np.arange(3))
    _check(st, _moments(a, q), tol=1e-9)


def test_calibration_errors_name_the_problem(tmp_path):
    model = vgg(seed=10)
    x = _images(model, n=4)
    with pytest.raises(OptionError, match="calibration_mode"):
        udfc_ref.compress(model, prune_ratio=0.3, calibration=x, calibration_mode="both")
    with pytest.raises(OptionError, match="takes"):
        udfc_ref.compress(model, prune_ratio=0.3, calibration=x[:, :, :4])
    with pytest.raises(OptionError, match="at least 2"):
        udfc_ref.compress(model, prune_ratio=0.3, calibration=x[:1])
    with pytest.raises(OptionError, match="float"):
        udfc_ref.compress(model, prune_ratio=0.3, calibration=x.astype(np.int64))
    bad = x.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(OptionError, match="image 2"):
        udfc_ref.compress(model, prune_ratio=0.3, calibration=bad)
    # files: x only, compressed or not; a .npy or a file without x is refused
    p = tmp_path / "c.npz"
    np.savez(p, x=x, y=np.zeros(4, np.int64))
    got = cal.load_calibration(p)
    assert isinstance(got, np.memmap) and np.array_equal(got, x)
    np.savez_compressed(tmp_path / "z.npz", x=x)
    assert np.array_equal(cal.load_calibration(tmp_path / "z.npz"), x)
    np.savez(tmp_path / "n.npz", images=x)
    with pytest.raises(FormatError, match="'x'"):
        cal.load_calibration(tmp_path / "n.npz")
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(DataError, match=".npy"):  # a FormatError, as for udfc eval --data
        cal.load_calibration(tmp_path / "a.npy")
    np.savez(tmp_path / "i.npz", x=np.zeros((4, 3, 8, 8), np.int32))
    with pytest.raises(FormatError, match="float"):
        cal.load_calibration(tmp_path / "i.npz")


def test_cli_calibration(tmp_path, capsys):
    from udfc_ref.cli import main

    model = vgg(seed=11)
    src = tmp_path / "m.safetensors"
    udfc_ref.save(model, src)
    x = _images(model, n=16)
    np.savez(tmp_path / "c.npz", x=x)
    out = tmp_path / "o.safetensors"
    assert main(["compress", str(src), str(out), "--prune-ratio", "0.5", "--weight-bits", "6", "--calibration",
                 str(tmp_path / "c.npz"), "--calibration-mode", "independent", "--criterion", "cov"]) == 0
    text = capsys.readouterr().out
    assert "calibration: 16 images, mode independent" in text
    assert udfc_ref.load(out).record["calibration"] == {"mode": "independent", "images": 16}



def test_cli_bad_calibration_files(tmp_path, capsys):
    """Every bad --calibration file: one 'udfc: error:' line naming the file
    (and the array), exit 1, no output written, the input untouched."""
    from udfc_ref.cli import main

    model = vgg(seed=11)
    src = tmp_path / "m.safetensors"
    udfc_ref.save(model, src)
    before = src.read_bytes()
    x = _images(model, n=6)
    nan = x.copy()
    nan[4, 1, 2, 3] = np.inf
    cases = {"shape.npz": dict(x=x[:, :, :4]), "one.npz": dict(x=x[:1]), "nan.npz": dict(x=nan),
             "int.npz": dict(x=x.astype(np.int16)), "noX.npz": dict(images=x)}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    want = {"shape.npz": "array 'x': the images have shape (3, 4, 8), the model's input 'x' takes (3, 8, 8)",
            "one.npz": "array 'x' needs at least 2 images", "nan.npz": "'x' holds NaN/Inf (image 4)",
            "int.npz": "'x' must be a float (N, C, H, W) array", "noX.npz": "the array 'x'; the file has images",
            "a.npy": "a .npy file", "junk.npz": "cannot read as .npz", "missing.npz": "missing.npz"}
    out = tmp_path / "o.safetensors"
    for name, msg in want.items():
        path = str(tmp_path / name)
        assert main(["compress", str(src), str(out), "--prune-ratio", "0.5", "--calibration", path]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"udfc: error: {path}") and msg in err[0], (name, err)
        assert not out.exists()
    assert src.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        main(["compress", str(src), str(out), "--calibration-mode", "both"])
    assert e.value.code == 2
    assert "--calibration-mode" in capsys.readouterr().err


def test_pairs_are_found_in_the_test_models():
    for m in (vgg(), mobilenet_block(), mbconv_net()):
        assert find_pairs(m)[0]


def test_oracle_coefficients_are_numpy_least_squares_on_the_activations():
    """Independent reference for the oracle mode (the sequential statistics,
    the data-free solver): with alpha = 0
    the pruned rows of T are the least-squares regression (np.linalg.lstsq,
    intercept column) of the original channels on the compressed network's
    kept channels, the kept rows the per-channel regression (Eq. U2-U3);
    the consumer's new weight is W' T (Eq. R2).  Float weights, so the
    consumer is not rounded afterwards; c0 is pruned too, so a~_K is not a
    copy of a_K."""
    model = vgg(seed=12)
    x = _images(model, n=48, seed=3)
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, calibration_mode="oracle", alpha1=0.0,
                                 alpha2=0.0)
    kept1 = np.asarray(small.record["layers"]["c1"]["kept"])
    kept2 = np.asarray(small.record["layers"]["c2"]["kept"])
    a = _rows(model.forward(x, return_values=True)["a1"])  # (S, N) the original's channels
    q = _rows(small.forward(x, return_values=True)["a1"])  # (S, M) the compressed network's kept channels
    n = a.shape[1]
    T = np.zeros((n, kept1.size))
    design = np.c_[q, np.ones(len(q))]
    pruned = np.setdiff1d(np.arange(n), kept1)
    T[pruned] = np.linalg.lstsq(design, a[:, pruned], rcond=None)[0][:-1].T
    for k, i in enumerate(kept1):
        T[i, k] = np.linalg.lstsq(np.c_[q[:, k], np.ones(len(q))], a[:, i], rcond=None)[0][0]
    w2 = model.tensors["c2.weight"].astype(np.float64)[kept2]
    want = np.einsum("onhw,nm->omhw", w2, T)
    got = small.tensors["c2.weight"].astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # and it is not the data-free T
    free, _ = udfc_ref.compress(model, prune_ratio=0.5, alpha1=0.0, alpha2=0.0)
    assert np.abs(free.tensors["c2.weight"].astype(np.float64) - want).max() > 1e-2 * np.abs(want).max()


def _one_pair_model(seed=13, c_in=4, hidden=6, classes=3):
    """A one-pair network on a (c_in, 1, 1) input for which the data model is
    exact: white Gaussian input (A4), BN running statistics equal to the true
    ones (A1: mean 0, variance diag(W W^T), eps 0), no spatial extent (A2)."""
    from udfc_ref import Model, Node

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((hidden, c_in, 1, 1))
    t = {"p.weight": w.astype(np.float32), "bn.weight": rng.uniform(0.5, 1.5, hidden).astype(np.float32),
         "bn.bias": rng.normal(0, 0.5, hidden).astype(np.float32),
         "bn.running_mean": np.zeros(hidden, np.float32),
         "bn.running_var": (w.reshape(hidden, -1) ** 2).sum(1).astype(np.float32),
         "fc.weight": rng.standard_normal((classes, hidden)).astype(np.float32)}
    nodes = [Node("p", "conv2d", ["x"], "p", {}, {"weight": "p.weight"}),
             Node("bn", "batch_norm", ["p"], "bn", {"eps": 0.0},
                  {r: f"bn.{r}" for r in ("weight", "bias", "running_mean", "running_var")}),
             Node("act", "relu", ["bn"], "act"), Node("flat", "flatten", ["act"], "flat"),
             Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight"})]
    return Model(t, nodes, "x", (c_in, 1, 1))


@pytest.mark.parametrize("bits", [6, None])
def test_calibration_drawn_from_the_data_models_assumptions_agrees_with_data_free(bits):
    """Monte Carlo: where the data model's assumptions hold exactly, 200,000
    images drawn from them give the data model's statistics (relative error
    of every PairStats field < 2 %, the sampling error is ~0.5 %), the same
    E2, and both modes give the data-free model's compensation."""
    model = _one_pair_model()
    x = np.random.default_rng(5).standard_normal((200_000,) + model.input_shape)
    free, _ = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=bits)
    _, rep = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=bits, calibration=x, calibration_mode="audit")
    (lay,) = [r for r in rep.layers if r.stats_error is not None]
    assert max(lay.stats_error.values()) < 0.02, lay.stats_error
    assert abs(lay.predicted_after - lay.measured_after) < 0.05 * lay.measured_after + 1e-3
    assert abs(lay.predicted_before - lay.measured_before) < 0.02 * lay.measured_before
    wf = free.tensors["fc.weight"].astype(np.float64)
    for mode in ("independent", "sequential"):
        cal_model, _ = udfc_ref.compress(model, prune_ratio=0.5, weight_bits=bits, calibration=x,
                                         calibration_mode=mode)
        wc = cal_model.tensors["fc.weight"].astype(np.float64)
        assert np.abs(wc - wf).max() <= 0.05 * np.abs(wf).max(), mode


def _unfold(v):
    """(B, C, H, W) -> (B*H*W, C*9) 3x3 patches, padding 1, by torch's unfold (column order c, i, j)."""
    import torch

    u = torch.nn.functional.unfold(torch.as_tensor(np.asarray(v, np.float64)), 3, padding=1)  # B, C*9, H*W
    return u.permute(0, 2, 1).reshape(-1, u.shape[1]).numpy()


def _lstsq_affine(u, z):
    """W (O, D), b (O,): np.linalg.lstsq of z (S, O) on [u, 1]."""
    sol = np.linalg.lstsq(np.c_[u, np.ones(len(u))], z, rcond=None)[0]
    return sol[:-1].T, sol[-1]


def test_sequential_refit_is_numpy_least_squares_of_the_consumers_output(monkeypatch):
    """Eq. C7 against an independent reference: with ridge 0, the refitted
    3x3 consumer (padding 1, no bias: its constant goes into the following
    BN's running mean) is np.linalg.lstsq of the original network's output of
    it on torch-unfolded patches of the compressed network's input, with an
    intercept column; the refitted linear consumer behind max pool + flatten
    likewise on the flattened values (its constant into its bias)."""
    monkeypatch.setattr(cal, "REFIT_RIDGE", 0.0)
    model = vgg(seed=21)
    x = _images(model, n=300, seed=4)
    ref = model.forward(x, return_values=True)
    # c1 alone: its consumer c2 (not pruned, float) is refitted
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, skip=["c0", "c2"])
    assert small.record["layers"]["c1"]["refit"] == ["c2"]
    got = small.forward(x, return_values=True)
    u = _unfold(got["a1"])  # the compressed network's input of c2, (S, 8 * 9)
    z = _rows(ref["c2"])  # the original's output of c2 (no bias), (S, 16)
    W, b = _lstsq_affine(u, z)
    w2 = small.tensors["c2.weight"].astype(np.float64).reshape(16, -1)
    assert w2.shape == W.shape
    assert np.abs(w2 - W).max() <= 1e-4 * np.abs(W).max()
    g, be = (model.tensors[f"b2.{r}"].astype(np.float64) for r in ("weight", "bias"))
    mu, var = (model.tensors[f"b2.running_{r}"].astype(np.float64) for r in ("mean", "var"))
    want_bn = (u @ W.T + b - mu) * g / np.sqrt(var + 1e-5) + be  # BN of the fitted output, original BN
    assert np.abs(_rows(got["b2"]) - want_bn).max() <= 1e-4 * np.abs(want_bn).max()
    # the fit is not W' T: the oracle mode (same statistics, data-free solver) gives another weight
    orc, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, calibration_mode="oracle", skip=["c0", "c2"])
    assert np.abs(orc.tensors["c2.weight"].astype(np.float64).reshape(16, -1) - W).max() > 1e-2 * np.abs(W).max()
    # c2 alone: its consumer fc reads max pool + flatten; 300 images >= 2 x (8 x 4) columns
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, skip=["c0", "c1"])
    kept = small.record["layers"]["c2"]["kept"]
    flat = small.forward(x, return_values=True)["flat"]
    W, b = _lstsq_affine(np.asarray(flat, np.float64), np.asarray(ref["y"], np.float64))
    assert np.abs(small.tensors["fc.weight"] - W).max() <= 1e-4 * np.abs(W).max()
    assert np.abs(small.tensors["fc.bias"] - b).max() <= 1e-4 * np.abs(b).max()
    assert len(kept) == 8 and small.tensors["fc.weight"].shape == (5, 8 * 16)


def test_sequential_rows_are_all_least_squares_when_the_consumer_is_not_refitted(monkeypatch):
    """Eq. C6: in the sequential mode every row of T -- the kept channels'
    too -- is np.linalg.lstsq of the original channel on all kept compressed
    channels (alpha1 = 0, intercept column); the consumer gets W' T (refit
    turned off by a zero width limit)."""
    monkeypatch.setattr(cal, "REFIT_MAX_DIM", 0)
    model = vgg(seed=12)
    x = _images(model, n=48, seed=3)
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, alpha1=0.0, alpha2=0.0)
    assert "refit" not in small.record["layers"]["c1"]
    kept2 = np.asarray(small.record["layers"]["c2"]["kept"])
    a = _rows(model.forward(x, return_values=True)["a1"])
    q = _rows(small.forward(x, return_values=True)["a1"])
    T, _ = _lstsq_affine(q, a)  # (N, M), every row
    want = np.einsum("onhw,nm->omhw", model.tensors["c2.weight"].astype(np.float64)[kept2], T)
    got = small.tensors["c2.weight"].astype(np.float64)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_refit_rows_are_sampled_in_both_networks_alike(monkeypatch):
    """Above REFIT_ROWS the refit uses a sample of the output positions; the
    sampled fit must be a fit of the same rows in both networks: its error on
    all rows is within 5 % of the all-row least squares' (a misaligned
    sample fits noise and is far off), and not identical to it."""
    model = vgg(seed=22)
    x = _images(model, n=200, seed=5)
    ref = model.forward(x, return_values=True)

    def fit_error():
        small, _ = udfc_ref.compress(model, prune_ratio=0.5, calibration=x, skip=["c0", "c2"])
        u = _unfold(small.forward(x, return_values=True)["a1"])
        z = _rows(ref["c2"])
        w = small.tensors["c2.weight"].astype(np.float64).reshape(16, -1)
        r = z - u @ w.T
        return ((r - r.mean(0)) ** 2).sum(), u, z

    monkeypatch.setattr(cal, "REFIT_RIDGE", 0.0)
    full, u, z = fit_error()
    W, b = _lstsq_affine(u, z)
    best = ((z - u @ W.T - b) ** 2).sum()
    assert abs(full - best) <= 1e-6 * best
    monkeypatch.setattr(cal, "REFIT_ROWS", 200 * 20)  # 20 of 64 positions per image
    sampled, _, _ = fit_error()
    assert best < sampled <= 1.05 * best


def test_cov_selection_with_the_refit_is_by_the_consumers_output():
    """Eq. S5 in the walk: in the sequential mode with criterion "cov", a pair
    whose one consumer is refitted keeps the channels chosen by backward
    elimination of the ridge least squares of the original consumer's output
    on its input (tests/mathref.py, from torch-unfolded patches of the
    original network's values, not the walk's rows); the record says which
    equation chose.  The oracle mode and the data-free path keep Eq. S4."""
    from mathref import backward_elimination

    model = vgg(seed=23)
    x = _images(model, n=100, seed=6)
    ref = model.forward(x, return_values=True)
    small, _ = udfc_ref.compress(model, prune_ratio=0.5, criterion="cov", calibration=x, skip=["c0", "c2"])
    rec = small.record["layers"]["c1"]
    assert rec["selection"] == "output (Eq. S5)"
    want = backward_elimination(_unfold(ref["a1"]), _rows(ref["c2"]), 16, 8, cal.REFIT_RIDGE)
    assert rec["kept"] == want
    for kw in (dict(calibration=x, calibration_mode="oracle"), {}):
        other, _ = udfc_ref.compress(model, prune_ratio=0.5, criterion="cov", skip=["c0", "c2"], **kw)
        assert other.record["layers"]["c1"]["selection"] == "covariance (Eq. S4)"
        assert other.record["layers"]["c1"]["kept"] != want  # here S4 keeps another set


def test_cov_selection_on_images_the_network_overflows_on_names_the_layer():
    """Images that are finite but make the original network overflow: Eq. S5
    stops with a NumericError naming the consumer and the pair, nothing raw."""
    from udfc_ref.errors import NumericError

    model = vgg(seed=24)
    for c in ("c1", "c2"):  # c1's output ~1e30 (its BN keeps the scale), c2's overflows float32
        model.tensors[f"{c}.weight"] = model.tensors[f"{c}.weight"] * np.float32(1e30)
    x = _images(model, n=40, seed=2)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point
        assert not np.isfinite(model.forward(x, return_values=True)["c2"]).all()
        with pytest.raises(NumericError, match=r"'c2'.*not finite.*'c1', Eq. S5"):
            udfc_ref.compress(model, prune_ratio=0.5, criterion="cov", calibration=x)
