"""The ``udfc`` command line: outputs, exit codes, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import vgg

from udfc_ref import load, save
from udfc_ref.cli import main


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save(vgg(0, channels=(3, 8, 12, 12)), p)
    return p


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 40))
    return p


def test_info(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "c1" in out and "parameters" in out and "uncompressed" in out


def test_compress_writes_model_and_report(model_file, tmp_path, capsys):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    before = model_file.read_bytes()
    code = main(["compress", str(model_file), str(out), "--prune-ratio", "0.3", "--weight-bits", "6",
                 "--method", "udfc", "--report", str(rep), "--bias-correction"])
    assert code == 0
    assert model_file.read_bytes() == before  # input untouched
    small = load(out)
    assert small.record["method"] == "udfc" and small.record["weight_bits"] == 6
    r = json.loads(rep.read_text())
    assert r["params_after"] == small.param_count() < r["params_before"]
    assert {lr["layer"] for lr in r["layers"] if lr["pruned"]} == {"c0", "c1", "c2"}
    text = capsys.readouterr().out
    assert "params" in text and "MACs" in text
    assert main(["info", str(out)]) == 0
    assert "6-bit" in capsys.readouterr().out


def test_eval_prints_top1_line(model_file, data_file, capsys):
    assert main(["eval", str(model_file), "--data", str(data_file), "--batch-size", "7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("top1=")
    m = load(model_file)
    with np.load(data_file) as f:
        acc = float((m.forward(f["x"]).argmax(1) == f["y"]).mean())
    assert lines[0] == f"top1={acc:.4f}"


@pytest.mark.parametrize("args,needle,code", [
    (["--prune-ratio", "1.0"], "prune ratio", 2),
    (["--prune-ratio", "-0.1"], "prune ratio", 2),
    (["--prune-ratio", "nan"], "prune ratio", 2),
    (["--weight-bits", "1"], "bits", 2),
    (["--weight-bits", "12"], "bits", 2),
    (["--weight-bits", "32"], "bits", 2),
    (["--weight-bits", "4.5"], "bits", 2),
    (["--alpha1", "-1"], "alpha1", 2),
    (["--alpha2", "inf"], "alpha2", 2),
    (["--min-keep", "0"], "min-keep", 2),
    (["--skip", "nope"], "nope", 1),
])
def test_bad_options_are_one_line(model_file, tmp_path, capsys, args, needle, code):
    """A bad option value is a usage error (exit 2), an option naming nothing in
    the model a udfc-ref error (exit 1); either way one line, nothing written."""
    out = tmp_path / "o.safetensors"
    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(["compress", str(model_file), str(out)] + args)
        assert e.value.code == 2
    else:
        assert main(["compress", str(model_file), str(out)] + args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("udfc: error:") and needle in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("value,bits", [("2", 2), ("8", 8), ("16", 16), ("none", None), ("None", None),
                                        ("float", None)])
def test_weight_bits_accepted_values(model_file, tmp_path, capsys, value, bits):
    out = tmp_path / "o.safetensors"
    assert main(["compress", str(model_file), str(out), "--weight-bits", value]) == 0
    assert load(out).record["weight_bits"] == bits


def test_output_equal_to_input_is_refused(model_file, capsys):
    before = model_file.read_bytes()
    assert main(["compress", str(model_file), str(model_file), "--prune-ratio", "0.3"]) == 1
    assert "input" in capsys.readouterr().err
    assert model_file.read_bytes() == before


def test_missing_output_directory(model_file, tmp_path, capsys):
    assert main(["compress", str(model_file), str(tmp_path / "no" / "o.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["compress", "a", "b", "--method", "magic"])
    assert e.value.code == 2
    assert main([]) == 2


def test_debug_shows_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert main(["info", str(bad)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "info", str(bad)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_demo_table_and_output(tmp_path, capsys):
    out = tmp_path / "demo.safetensors"
    assert main(["demo", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {line.split(")")[0].split("(")[-1]: float(line.split()[2]) for line in text.splitlines()
            if line.startswith("compressed (")}
    assert set(rows) == {"none", "nm", "udfc"}
    small = load(out)
    assert small.record["method"] == "udfc" and small.record["prune_ratio"] == 0.3
    assert main(["demo", "--output", str(tmp_path / "no" / "x.safetensors")]) == 1
