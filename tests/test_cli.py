"""The ``udfc`` command line: outputs, exit codes, errors."""

from __future__ import annotations

import argparse
import json
import os
import stat

import numpy as np
import pytest
from helpers import vgg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udfc_ref import OptionError, UDFCError, load, save
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


# ------------------------------------------------------- issue 9: bad input

def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("udfc: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def run(argv):
    """main(argv) -> exit code, usage errors (SystemExit) included."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def files_in(d):
    return sorted(os.listdir(d))


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@needs_fifo
@pytest.mark.parametrize("which", ["data", "model", "keras model"])
def test_fifo_inputs_fail_at_once(model_file, data_file, tmp_path, capsys, which):
    """`udfc eval --data FIFO` used to block forever: every input must be a regular file."""
    fifo = tmp_path / ("m.keras" if which == "keras model" else "f.npz")
    os.mkfifo(fifo)
    argv = ["eval", model_file, "--data", fifo] if which == "data" else ["eval", fifo, "--data", data_file]
    assert run(argv) == 1
    one_error_line(capsys, str(fifo), "not a regular file", "FIFO")


def test_npy_instead_of_npz(model_file, tmp_path, capsys):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((2, 3, 8, 8), np.float32))
    assert run(["eval", model_file, "--data", p]) == 1
    one_error_line(capsys, ".npy file", "np" "z")


def _npz_with_shape(tmp_path, shape, compressed=False):
    """An .npz whose 'x' member header claims ``shape`` while its bytes stay
    those of a real (4, 3, 8, 8) float32 array."""
    import io
    import zipfile

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.arange(4) % 5
    head = np.lib.format.header_data_from_array_1_0(x)
    head["shape"] = tuple(shape)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, head)
    member.write(x.tobytes())
    ybuf = io.BytesIO()
    np.save(ybuf, y)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", member.getvalue())
        z.writestr("y.npy", ybuf.getvalue())
    return bad


@pytest.mark.parametrize("shape", [(10**6, 10**6, 1, 1), (2**40, 3, 8, 8), (0, 3, 8, 8), (4, 3, 8, 9)])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_header_that_disagrees_with_its_bytes(model_file, tmp_path, capsys, shape, compressed):
    """A header claiming 10^12 elements used to be a MemoryError: the member
    headers are checked against the stored bytes before anything is allocated."""
    bad = _npz_with_shape(tmp_path, shape, compressed)
    assert run(["eval", model_file, "--data", bad]) == 1
    one_error_line(capsys, str(bad), "'x'")


@given(st.lists(st.integers(0, 2**64), min_size=0, max_size=6), st.booleans())
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_npz_shape_claim_is_read_or_refused(tmp_path, shape, compressed):
    from udfc_ref.evaluate import load_npz

    bad = _npz_with_shape(tmp_path, shape, compressed)
    try:
        x, y = load_npz(bad)
    except UDFCError as e:
        assert "\n" not in str(e)
    else:
        assert x.size * 4 == 4 * 3 * 8 * 8 * 4 and x.shape[0] == y.shape[0]


@given(st.binary(max_size=80))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_npy_header_is_a_format_error(tmp_path, junk):
    """NumPy parses an .npy header with tokenize/ast: junk there raised
    tokenize.TokenError (found by the shape test above)."""
    import io
    import zipfile

    from udfc_ref.evaluate import load_npz

    y = io.BytesIO()
    np.save(y, np.arange(2))
    member = b"\x93NUMPY\x01\x00" + len(junk).to_bytes(2, "little") + junk + bytes(8)
    p = tmp_path / "g.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", member)
        z.writestr("y.npy", y.getvalue())
    with pytest.raises(UDFCError) as e:
        load_npz(p)
    assert "\n" not in str(e.value) and "'x'" in str(e.value)


def test_npz_object_array_is_never_unpickled(model_file, tmp_path, capsys):
    p = tmp_path / "o.npz"
    np.savez(p, x=np.array([object()] * 2, dtype=object), y=np.arange(2))
    assert run(["eval", model_file, "--data", p]) == 1
    one_error_line(capsys, "'x'", "object")


@pytest.mark.parametrize("labels", [[0, 1, 5, 2], [-1, 0, 1, 2], [0, 1, 2, 10**9]])
def test_labels_outside_the_model_classes(model_file, tmp_path, capsys, labels):
    """top1=0.0000 without a word used to be the answer; now one error naming the range."""
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 3, 8, 8), np.float32), y=np.array(labels))
    assert run(["eval", model_file, "--data", p]) == 1
    one_error_line(capsys, "'y'", "5 classes [0, 4]", f"[{min(labels)}, {max(labels)}]")


@pytest.mark.parametrize("name", ["out.h5", "out.hdf5", "out", "out.npz", "out.SAFETENSORS.bak", "out.onnx"])
def test_output_suffix_picks_the_format_unknown_is_a_usage_error(model_file, tmp_path, capsys, name):
    """`udfc compress in.safetensors out.h5` used to write safetensors bytes under .h5."""
    out = tmp_path / name
    before = files_in(tmp_path)
    assert run(["compress", model_file, out, "--prune-ratio", "0.3"]) == 2
    one_error_line(capsys, ".safetensors (udfc-ref)", ".keras (Keras)", ".pt2 (torch.export)")
    assert files_in(tmp_path) == before


def test_output_suffix_table_is_extensible(model_file, tmp_path, capsys, monkeypatch):
    from udfc_ref import cli

    written = []
    monkeypatch.setitem(cli.OUTPUT_FORMATS, ".pt2", ("torch.export", lambda m, p, input_path=None: written.append(p)))
    assert run(["compress", model_file, tmp_path / "o.pt2"]) == 0
    assert written == [str(tmp_path / "o.pt2")]
    assert ".pt2 (torch.export)" in cli.supported_outputs()


def test_uppercase_suffix_is_the_same_format(model_file, tmp_path):
    assert run(["compress", model_file, tmp_path / "o.SafeTensors", "--prune-ratio", "0.3"]) == 0
    assert load(tmp_path / "o.SafeTensors").record["prune_ratio"] == 0.3


@needs_fifo
def test_existing_fifo_output_is_not_replaced(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    os.mkfifo(out)
    assert run(["compress", model_file, out, "--prune-ratio", "0.3"]) == 1
    one_error_line(capsys, "FIFO", "not a regular file")
    assert stat.S_ISFIFO(os.stat(out).st_mode) and files_in(tmp_path) == ["m.safetensors", "o.safetensors"]


def test_device_node_output_is_not_replaced(model_file, tmp_path, capsys):
    """As root, /dev/null used to be replaced by a regular file."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    link = tmp_path / "o.safetensors"
    os.symlink("/dev/null", link)
    assert run(["compress", model_file, link, "--prune-ratio", "0.3"]) == 1
    one_error_line(capsys, "character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    from udfc_ref.atomic import check_output_path

    with pytest.raises(OptionError, match="character device"):
        check_output_path("/dev/null")


def _bundled():
    from udfc_ref.examples import example_data_path, example_model_path

    return example_model_path(), example_data_path()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_demo_never_overwrites_the_bundled_files(tmp_path, capsys, which):
    """`udfc demo --output <bundled digits_cnn.safetensors>` used to overwrite it."""
    import hashlib

    model, data = _bundled()
    digest = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (model, data)}
    target = [model, data.replace(".npz", ".safetensors"), os.path.join(os.path.dirname(model), "new.safetensors")]
    assert run(["demo", "--only", "--output", target[which]]) == 1
    one_error_line(capsys, "bundled")
    assert {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (model, data)} == digest
    assert not os.path.exists(target[2])


def test_compress_never_writes_over_the_bundled_model(tmp_path, capsys):
    model, _ = _bundled()
    before = open(model, "rb").read()
    assert run(["compress", tmp_path / "nope.safetensors", model]) == 1
    one_error_line(capsys, "bundled")
    assert open(model, "rb").read() == before


def test_warning_is_one_line_and_the_command_succeeds(tmp_path, capsys):
    from safetensors.numpy import load as st_load, save as st_save

    m = tmp_path / "m.safetensors"
    save(vgg(0, channels=(3, 8, 12, 12)), m)
    data = m.read_bytes()
    (n,) = __import__("struct").unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    t = dict(st_load(data))
    t["optimizer.step"] = np.array([3], np.int64)
    m.write_bytes(st_save(t, metadata=meta))
    assert run(["info", m]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("udfc: warning: ") and "optimizer.step" in err, err
    # the same file with a broken graph: only the error, no warning (and no source line)
    meta["graph"] = meta["graph"].replace('"relu"', '"frobnicate"')
    m.write_bytes(st_save(t, metadata=meta))
    assert run(["info", m]) == 1
    one_error_line(capsys, "frobnicate")


def test_every_option_and_command_has_help():
    from udfc_ref.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{prefix} {name}")
                    walk(sub, f"{prefix} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "udfc")
    assert missing == []


# ------------------------------------------------------- signals

def test_sigterm_while_writing_leaves_nothing(model_file, tmp_path, capsys, monkeypatch):
    """SIGTERM used to leave .out.safetensors.XXXX.tmp: it is handled like Ctrl-C."""
    import signal

    from udfc_ref import atomic

    real_fsync = os.fsync

    def fsync_then_terminated(fd):
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the temp file is complete but not renamed

    monkeypatch.setattr(atomic.os, "fsync", fsync_then_terminated)
    out = tmp_path / "o.safetensors"
    assert run(["compress", model_file, out, "--prune-ratio", "0.3"]) == 143
    monkeypatch.undo()
    one_error_line(capsys, "terminated (SIGTERM)")
    assert files_in(tmp_path) == ["m.safetensors"]
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # main() restored the handler


def test_sigterm_in_a_real_process(model_file, tmp_path):
    """A real `udfc compress` process, killed with SIGTERM while its temp file exists."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o.safetensors"
    code = ("import os, sys, time\n"
            "from udfc_ref import atomic\n"
            "real = os.fsync\n"
            "def slow(fd):\n"
            "    real(fd)\n"
            "    sys.stdout.write('writing\\n'); sys.stdout.flush()\n"
            "    time.sleep(60)\n"
            "atomic.os.fsync = slow\n"
            "from udfc_ref.cli import main\n"
            f"sys.exit(main(['compress', {str(model_file)!r}, {str(out)!r}, '--prune-ratio', '0.3']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        assert any(f.endswith(".tmp") for f in files_in(tmp_path))  # the temp file exists now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert err.startswith("udfc: error: terminated") and err.count("\n") == 1, err
    assert files_in(tmp_path) == ["m.safetensors"]
    time.sleep(0)


def test_stdout_closed_early_is_quiet(model_file, capsys, monkeypatch):
    """`udfc info m | head -1`: the reader went away; no traceback, exit 141 like a killed pipe writer."""
    class ClosedPipe:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert run(["info", model_file]) == 141
    assert capsys.readouterr().err == ""
