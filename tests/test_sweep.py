"""``udfc sweep`` / ``udfc_ref.sweep``: the grid, its numbers, Dask, resume, failures, the CLI.

The reference for every number is an independent computation in the test:
``compress`` + ``evaluate.top1`` on the arrays loaded with ``np.load``, and
the model's own ``param_count`` / ``weight_bytes`` / ``flops``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import udfc_ref
from udfc_ref.cli import main
from udfc_ref.errors import NumericError, OptionError, UDFCError
from udfc_ref.evaldata import DataError, open_data
from udfc_ref.evaluate import top1
from udfc_ref.examples import EXAMPLE_TEST_ACCURACY, example_data_path, example_model_path

S = importlib.import_module("udfc_ref.sweep")  # the module (udfc_ref.sweep, the attribute, is the function)
MODEL, DATA = example_model_path(), example_data_path()
GRID = dict(prune_ratios=[0.0, 0.3], weight_bits=[None, 4], methods=["none", "udfc"])


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in S.TIMING_FIELDS} for r in rows]


@pytest.fixture(scope="module")
def example():
    with np.load(DATA) as f:
        return udfc_ref.load(MODEL), f["x"], f["y"]


@pytest.fixture(scope="module")
def sequential_rows(tmp_path_factory):
    """The GRID computed sequentially, batches of 64."""
    out = tmp_path_factory.mktemp("seq") / "rows.csv"
    return S.sweep(MODEL, DATA, **GRID, workers=0, batch_size=64, out=str(out)), out


@pytest.fixture(scope="module")
def client():
    """Two in-process Dask workers (threads: starts in well under a second,
    and a monkeypatched seam reaches the workers)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


# ----------------------------------------------------------------------------- numbers

def test_rows_match_an_independent_computation(example, sequential_rows):
    model, x, y = example
    rows, out = sequential_rows
    assert len(rows) == 8
    assert [(r["prune_ratio"], r["weight_bits"], r["method"]) for r in rows] == [
        (p, b, m) for p in (0.0, 0.3) for b in (None, 4) for m in ("none", "udfc")]
    for r in rows:
        assert r["error"] is None
        opts = {k: r[k] for k in S.OPTION_FIELDS}
        small, rep = udfc_ref.compress(model, **opts)
        assert r["top1"] == top1(small, x, y, batch_size=64) == r["correct"] / len(y)
        assert r["n_test"] == len(y) == 540
        assert (r["params"], r["bytes"], r["macs"]) == (small.param_count(), small.weight_bytes(), small.flops())
        assert (r["params_before"], r["bytes_before"], r["macs_before"]) == (
            model.param_count(), model.weight_bytes(), model.flops())
        ea = [lr.error_after for lr in rep.layers if lr.error_after is not None]
        if r["prune_ratio"] > 0:
            assert r["mean_err_after"] == pytest.approx(np.mean(ea), rel=1e-12)
            assert r["max_err_after"] == pytest.approx(np.max(ea), rel=1e-12)
            if r["method"] == "udfc":  # compensation lowers the predicted error; without it, nothing changes
                assert r["mean_err_after"] < r["mean_err_before"]
            else:
                assert r["mean_err_after"] == r["mean_err_before"]
        assert r["seconds"] >= r["compress_seconds"] > 0
    # the uncompressed cell is the bundled model's recorded accuracy (538 / 540)
    assert rows[0]["top1"] == EXAMPLE_TEST_ACCURACY
    assert _strip(S.read_rows(out)) == _strip(rows)  # the file holds exactly the returned rows


def test_dask_gives_the_sequential_numbers_with_chunked_tasks(client, sequential_rows, tmp_path):
    distributed = pytest.importorskip("distributed")
    rows, _ = sequential_rows
    out = tmp_path / "dask.json"
    with distributed.get_task_stream(client) as ts:
        drows = S.sweep(MODEL, DATA, **GRID, scheduler=client, batch_size=64, chunk_size=128, out=str(out))
    assert _strip(drows) == _strip(rows)
    assert _strip(S.read_rows(out)) == _strip(rows)
    names = [t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in ts.data]
    count = {p: sum(1 for k in names if str(k).startswith(p)) for p in ("_task_compress", "_task_eval", "_task_reduce")}
    # one compress and one reduce task per cell, one evaluation task per (cell, chunk): ceil(540 / 128) = 5
    assert count == {"_task_compress": 8, "_task_eval": 8 * 5, "_task_reduce": 8}


def test_grid_is_the_product_in_option_order():
    cells = S.grid(prune_ratios=[0, 0.0, 0.5], weight_bits=None, methods=["udfc", "nm"], bias_correction=[False, True],
                   skip="c1")
    assert [(c["prune_ratio"], c["method"], c["bias_correction"]) for c in cells] == [
        (0.0, "udfc", False), (0.0, "udfc", True), (0.0, "nm", False), (0.0, "nm", True),
        (0.5, "udfc", False), (0.5, "udfc", True), (0.5, "nm", False), (0.5, "nm", True)]  # 0 and 0.0: one cell
    assert all(c["weight_bits"] is None and c["skip"] == ["c1"] and c["alpha1"] == 0.01 for c in cells)
    keys = {S.cell_key(c, "m", "d", 10) for c in cells}
    assert len(keys) == 8 and S.cell_key(cells[0], "m", "d", 11) not in keys
    assert S.cell_key(cells[0], "m2", "d", 10) not in keys and S.cell_key(cells[0], "m", "d2", 10) not in keys


def test_auto_chunk_size_spreads_a_small_grid_over_many_workers():
    cs = S.auto_chunk_size(n_test=10_000, batch_size=100, sample_bytes=4, slots=40, n_cells=4)
    assert cs % 100 == 0 and 4 * -(-10_000 // cs) >= 80  # 4 cells keep 40 workers busy twice over
    assert S.auto_chunk_size(n_test=50, batch_size=100, sample_bytes=4, slots=40, n_cells=4) == 100
    big = S.auto_chunk_size(n_test=1000, batch_size=10, sample_bytes=10 << 20, slots=1, n_cells=100)
    assert big % 10 == 0 and big * (10 << 20) <= 256 << 20  # at most ~256 MiB of inputs per task


# ----------------------------------------------------------------------------- resume and failures

def _counting(monkeypatch, fail=None):
    calls = []
    real = S._compress_model

    def fake(model, options):
        calls.append(dict(options))
        if fail is not None and fail(options):
            raise NumericError("injected failure in layer 'c1'")
        return real(model, options)

    monkeypatch.setattr(S, "_compress_model", fake)
    return calls


def test_resume_recomputes_nothing_already_done(sequential_rows, tmp_path, monkeypatch):
    rows, src = sequential_rows
    out = tmp_path / "r.csv"
    text = src.read_text()
    # poison one finished row: if it were recomputed, the true value would come back
    lines = text.splitlines()
    header = lines[0].split(",")
    target = next(i for i, ln in enumerate(lines) if i and ",udfc," in ln and ",0.3," in ln)
    cols = next(csv.reader([lines[target]]))
    cols[header.index("top1")] = "0.123"
    lines[target] = ",".join(cols)
    out.write_text("\n".join(lines) + "\n")
    calls = _counting(monkeypatch)
    again = S.sweep(MODEL, DATA, **GRID, workers=0, batch_size=64, out=str(out))
    assert calls == []
    assert [r["top1"] for r in again].count(0.123) == 1
    # a larger grid computes only its new cells and keeps the old rows
    more = S.sweep(MODEL, DATA, **dict(GRID, methods=["none", "udfc", "nm"]), workers=0, batch_size=64, out=str(out))
    assert len(calls) == 4 and all(c["method"] == "nm" for c in calls)
    assert len(more) == 12 and len(S.read_rows(out)) == 12
    # another sample count is another key: everything is recomputed
    calls.clear()
    S.sweep(MODEL, DATA, prune_ratios=0.3, weight_bits=4, methods="udfc", workers=0, max_samples=100, out=str(out))
    assert len(calls) == 1 and len(S.read_rows(out)) == 13


def test_a_failing_cell_is_a_row_and_is_retried(tmp_path, monkeypatch, example):
    model, x, y = example
    out = tmp_path / "f.csv"
    calls = _counting(monkeypatch, fail=lambda o: o["method"] == "udfc" and o["prune_ratio"] > 0)
    rows = S.sweep(MODEL, DATA, **GRID, workers=0, out=str(out))
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 2 and all(r["method"] == "udfc" and r["prune_ratio"] == 0.3 for r in bad)
    assert all(r["error"] == "NumericError: injected failure in layer 'c1'" and r["top1"] is None for r in bad)
    assert all(r["top1"] is not None for r in rows if not r["error"])
    assert [r["error"] for r in S.read_rows(out)] == [r["error"] for r in rows]
    # the rerun retries the failed cells only
    monkeypatch.setattr(S, "_compress_model", lambda m, o: udfc_ref.compress(m, **o))
    calls.clear()
    fixed = S.sweep(MODEL, DATA, **GRID, workers=0, out=str(out))
    assert not any(r["error"] for r in fixed)
    small, _ = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=4, method="udfc")
    assert fixed[7]["top1"] == top1(small, x, y)


def test_a_failing_cell_on_dask(client, tmp_path, monkeypatch):
    _counting(monkeypatch, fail=lambda o: o["weight_bits"] == 4 and o["method"] == "none")
    rows = S.sweep(MODEL, DATA, **GRID, scheduler=client, out=str(tmp_path / "f.csv"), chunk_size=256)
    assert [bool(r["error"]) for r in rows] == [False, False, True, False] * 2
    assert "injected failure" in rows[2]["error"]


def test_bad_option_stops_before_any_work(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    out = tmp_path / "o.csv"
    with pytest.raises(OptionError, match="prune ratio"):
        S.sweep(MODEL, DATA, prune_ratios=[0.3, 1.5], weight_bits=6, methods="udfc", workers=0, out=str(out))
    with pytest.raises(OptionError, match="method"):
        S.sweep(MODEL, DATA, prune_ratios=0.3, methods=["udfc", "magic"], workers=0, out=str(out))
    with pytest.raises(OptionError, match="multiple of batch_size"):
        S.sweep(MODEL, DATA, workers=0, batch_size=64, chunk_size=100, out=str(out))
    assert calls == [] and not out.exists()


def test_an_unrelated_out_file_is_never_overwritten(tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(OptionError, match="not a sweep result"):
        S.sweep(MODEL, DATA, prune_ratios=0.3, weight_bits=6, methods="udfc", workers=0, out=str(out))
    assert out.read_text() == "a,b\n1,2\n"


# ----------------------------------------------------------------------------- data

def test_uncompressed_npz_and_npy_dir_are_memory_mapped(tmp_path, example):
    _, x, y = example
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "x.npy", x)
    np.save(tmp_path / "dir" / "y.npy", y)
    for name, mapped in (("plain.npz", True), ("packed.npz", False), ("dir", True)):
        d = open_data(tmp_path / name)
        assert d.mapped is mapped and isinstance(d.x, np.memmap) is mapped, name
        assert np.array_equal(np.asarray(d.x), x) and np.array_equal(d.y, y), name
    # both mapped layouts give the same numbers as the compressed bundled file
    r1 = S.sweep(MODEL, str(tmp_path / "plain.npz"), prune_ratios=0.3, weight_bits=6, methods="udfc", workers=0)
    r2 = S.sweep(MODEL, str(tmp_path / "dir"), prune_ratios=0.3, weight_bits=6, methods="udfc", workers=0)
    assert r1[0]["top1"] == r2[0]["top1"] == 479 / 540  # as in the README's demo table


def test_data_errors_stop_the_sweep(tmp_path, example):
    _, x, y = example
    bad = x.copy()
    bad[300, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad, y=y)
    out = tmp_path / "o.csv"
    with pytest.raises(DataError, match=r"NaN/Inf \(sample 300\)"):
        S.sweep(MODEL, str(tmp_path / "nan.npz"), prune_ratios=0.3, weight_bits=6, methods="udfc", workers=0,
                out=str(out))
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 1, 9, 9), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"samples are \(1, 9, 9\), the model .* takes \(1, 8, 8\)"):
        S.sweep(MODEL, str(tmp_path / "shape.npz"), workers=0)
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        S.sweep(MODEL, str(tmp_path / "nolabels.npz"), workers=0)
    np.savez(tmp_path / "labels.npz", x=x, y=np.where(np.arange(len(y)) == 7, 10, y))
    with pytest.raises(DataError, match=r"1 of 540 labels lie outside the model's 10 classes"):
        S.sweep(MODEL, str(tmp_path / "labels.npz"), workers=0)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match="a .npy file"):
        S.sweep(MODEL, str(tmp_path / "x.npy"), workers=0)
    os.mkfifo(tmp_path / "fifo.npz")  # never opened for reading: that would block
    with pytest.raises(DataError, match="not a regular file"):
        S.sweep(MODEL, str(tmp_path / "fifo.npz"), workers=0)
    assert not out.exists()  # nothing was written: every data check comes before any work


def test_data_error_on_dask_stops_the_sweep(client, tmp_path, example):
    _, x, y = example
    bad = x.copy()
    bad[500] = np.inf
    np.savez(tmp_path / "inf.npz", x=bad, y=y)
    with pytest.raises(DataError, match=r"sample 500"):
        S.sweep(MODEL, str(tmp_path / "inf.npz"), prune_ratios=0.3, weight_bits=6, methods="udfc",
                scheduler=client, chunk_size=256)


# ----------------------------------------------------------------------------- optional parts

def test_public_api():
    assert udfc_ref.sweep is S.sweep and "sweep" in udfc_ref.__all__


def test_core_imports_without_dask():
    code = ("import sys, udfc_ref, udfc_ref.sweep, udfc_ref.cli; udfc_ref.cli.build_parser(); "
            "bad = [m for m in ('dask', 'distributed', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(S.__file__))]
                                                      + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_without_dask_sequential_works_and_dask_mode_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(OptionError, match=r"udfc-ref\[dask\]"):
        S.sweep(MODEL, DATA, prune_ratios=0.3, weight_bits=6, methods="udfc")
    rows = S.sweep(MODEL, DATA, prune_ratios=0.3, weight_bits=6, methods="udfc", workers=0)
    assert rows[0]["top1"] == 479 / 540


def test_plot(tmp_path, sequential_rows):
    pytest.importorskip("matplotlib")
    rows, _ = sequential_rows
    p = tmp_path / "p.png"
    S.plot_rows(rows, p, title="t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- CLI

def test_cli_sweep_sequential_then_local_cluster(tmp_path, capsys, example):
    model, x, y = example
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.csv"
    args = ["sweep", MODEL, "--data", DATA, "--prune-ratios", "0.3", "--weight-bits", "6",
            "--methods", "none,udfc", "--bias-correction", "both"]
    assert main(args + ["--out", str(out1), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n") == 1 + 4 + 1 and "bias_correction" in text and f"wrote {out1}" in text
    rows = S.read_rows(out1)
    assert len(rows) == 4
    for r in rows:
        small, _ = udfc_ref.compress(model, prune_ratio=0.3, weight_bits=r["weight_bits"], method=r["method"],
                                     bias_correction=r["bias_correction"])
        assert r["top1"] == top1(small, x, y)
    with open(out1, newline="") as f:
        assert next(csv.reader(f)) == list(S.FIELDS)
    # the default backend: a local cluster of worker processes, same rows
    pytest.importorskip("distributed")
    assert main(args + ["--out", str(out2), "--workers", "2"]) == 0
    assert _strip(S.read_rows(out2)) == _strip(rows)
    # a rerun reuses every row
    assert main(args + ["--out", str(out2), "--workers", "2"]) == 0
    assert "4 of 4 cells are already in" in capsys.readouterr().err


def test_cli_sweep_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.csv"
    base = ["sweep", MODEL, "--data", DATA, "--out", str(out), "--workers", "0"]
    # bad values are usage errors (exit 2, one line), before any work
    for bad, msg in ((["--prune-ratios", "0.3,1.5"], "prune ratio must be"), (["--prune-ratios", "0.3,,0.5"], "list"),
                     (["--methods", "udfc,magic"], "expected one of"), (["--weight-bits", "6,9"], "weight bits"),
                     (["--bias-correction", "maybe"], "off, on or both"), (["--plot", "p.gif"], "must end in .png"),
                     (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not allowed with"),
                     (["--batch-size", "0"], ">= 1")):
        with pytest.raises(SystemExit) as e:
            main(base[:-2] + bad if "--workers" in bad else base + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("udfc: error:") and msg in err[0], (bad, err)
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["sweep", MODEL, "--data", DATA, "--out", str(tmp_path / "o.txt")])
    assert e.value.code == 2 and "must end in .csv or .json" in capsys.readouterr().err
    # failed cells: the rows are written, the exit status is 1 with one line naming the first error
    _counting(monkeypatch, fail=lambda o: o["method"] == "nm")
    assert main(base + ["--prune-ratios", "0.3", "--weight-bits", "6"]) == 1
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines()[-1].startswith("udfc: error: 1 of 3 cells failed")
    assert "error: NumericError: injected failure" in cap.out
    assert [r["error"] is None for r in S.read_rows(out)] == [True, False, True]
    assert json.loads(json.dumps(S.read_rows(out)))  # plain data


def test_cli_unreachable_scheduler(tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(S, "CONNECT_TIMEOUT", 1)
    out = tmp_path / "o.csv"
    code = main(["sweep", MODEL, "--data", DATA, "--prune-ratios", "0.3", "--weight-bits", "6", "--methods", "udfc",
                 "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 1
    assert "cannot connect to the Dask scheduler" in capsys.readouterr().err and not out.exists()
