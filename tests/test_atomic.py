"""Output safety: save never touches its input, never leaves a partial file,
and refuses unusable output paths up front with an OptionError."""

from __future__ import annotations

import os

import numpy as np
import pytest

import udfc_ref
from udfc_ref import OptionError, UDFCError
from udfc_ref import atomic
from udfc_ref.atomic import check_output_path, write_bytes_atomic

from helpers import resnet_block, vgg


def listing(d):
    return sorted(os.listdir(d))


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "in.safetensors"
    udfc_ref.save(vgg(), p)
    return p


def test_load_and_save_elsewhere_leave_the_input_untouched(saved, tmp_path):
    before, st = saved.read_bytes(), os.stat(saved)
    m = udfc_ref.load(saved)
    m.tensors["c0.weight"][:] = 0  # mutating the loaded model must not reach the file
    out = tmp_path / "out.safetensors"
    udfc_ref.save(m, out, input_path=saved)
    after = os.stat(saved)
    assert saved.read_bytes() == before
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert np.all(udfc_ref.load(out).tensors["c0.weight"] == 0)
    assert listing(tmp_path) == ["in.safetensors", "out.safetensors"]


def test_save_refuses_the_input_path(saved):
    before = saved.read_bytes()
    with pytest.raises(OptionError, match="is the input file"):
        udfc_ref.save(udfc_ref.load(saved), saved, input_path=saved)
    assert saved.read_bytes() == before


def test_save_refuses_the_input_by_another_name(saved, tmp_path):
    link = tmp_path / "link.safetensors"
    os.link(saved, link)
    with pytest.raises(OptionError, match="is the input file"):
        udfc_ref.save(vgg(), link, input_path=str(saved))
    rel = os.path.relpath(saved)
    with pytest.raises(OptionError, match="is the input file"):
        udfc_ref.save(vgg(), saved, input_path=rel)


def test_output_directory_missing(tmp_path):
    with pytest.raises(OptionError, match="does not exist"):
        udfc_ref.save(vgg(), tmp_path / "no" / "such" / "dir" / "m.safetensors")
    assert listing(tmp_path) == []


def test_output_directory_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_bytes(b"x")
    with pytest.raises(OptionError, match="is a file"):
        udfc_ref.save(vgg(), f / "m.safetensors")
    assert f.read_bytes() == b"x"


def test_output_path_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OptionError, match="is a directory"):
        udfc_ref.save(vgg(), tmp_path / "d")


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_output_path_not_a_path(bad):
    with pytest.raises(OptionError):
        check_output_path(bad)


def test_output_directory_read_only(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o555)
    try:
        try:  # root ignores the mode bits: then this cannot be provoked with chmod
            open(d / "probe", "wb").close()
            os.unlink(d / "probe")
            pytest.skip("running as root (CAP_DAC_OVERRIDE): a chmod 0o555 directory is still writable, "
                        "so it cannot provoke the failure; "
                        "see test_unwritable_directory_under_proc for the root case")
        except PermissionError:
            pass
        with pytest.raises(OptionError, match="not writable"):
            udfc_ref.save(vgg(), d / "m.safetensors")
        assert listing(d) == []
    finally:
        os.chmod(d, 0o755)


def test_unwritable_directory_under_proc():
    # /proc/self refuses file creation even for root: the probe must catch what os.access misses
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    with pytest.raises(OptionError, match="not writable"):
        check_output_path("/proc/self/m.safetensors")


def test_check_output_path_probes_instead_of_trusting_os_access(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: True)

    def no_tmp(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", no_tmp)
    with pytest.raises(OptionError, match="not writable.*Permission denied"):
        check_output_path(tmp_path / "m.safetensors")


def test_check_output_path_leaves_no_probe_file(tmp_path):
    check_output_path(tmp_path / "m.safetensors")
    assert listing(tmp_path) == []


# ------------------------------------------------------------- failure midway

def _fail(*a, **k):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_failure_midway_keeps_previous_output(tmp_path, monkeypatch, where):
    out = tmp_path / "out.safetensors"
    udfc_ref.save(vgg(), out)
    before = out.read_bytes()
    if where == "replace":
        monkeypatch.setattr(atomic.os, "replace", _fail)
    elif where == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", _fail)
    else:
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # half the bytes reach the temp file, then the disk is full
                _fail()

            def __getattr__(self, k):
                return getattr(self.f, k)

        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OptionError, match="No space left on device"):
        udfc_ref.save(resnet_block(), out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert listing(tmp_path) == ["out.safetensors"]  # no temp file left
    assert udfc_ref.load(out).nodes[0].name == "c0"


def test_failure_midway_without_previous_output(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", _fail)
    with pytest.raises(UDFCError):
        udfc_ref.save(vgg(), tmp_path / "new.safetensors")
    assert listing(tmp_path) == []


def test_interrupt_midway_cleans_up_and_propagates(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(tmp_path / "x.bin", b"abc")
    assert listing(tmp_path) == []


def test_serialisation_failure_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")

    def boom(model):
        raise RuntimeError("serialiser bug")

    monkeypatch.setattr(udfc_ref.io, "_chunks", boom)
    with pytest.raises(RuntimeError):
        udfc_ref.save(vgg(), out)
    assert out.read_bytes() == b"previous" and listing(tmp_path) == ["out.safetensors"]


def test_failure_midway_through_a_streamed_write(tmp_path, monkeypatch):
    """save streams the header and then each tensor; a failure after some of
    them were written leaves the previous file and no temp file."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    real = udfc_ref.io._chunks

    def half(model):
        chunks = real(model)
        return chunks[:3] + [object()] + chunks[3:]  # f.write(object()) raises TypeError

    monkeypatch.setattr(udfc_ref.io, "_chunks", half)
    with pytest.raises(TypeError):
        udfc_ref.save(vgg(), out)
    assert out.read_bytes() == b"previous" and listing(tmp_path) == ["out.safetensors"]


def test_write_bytes_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes_atomic(p, b"a" * 1000)
    write_bytes_atomic(p, b"bc")
    assert p.read_bytes() == b"bc" and listing(tmp_path) == ["f.bin"]


def test_new_output_gets_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "new.bin", b"x")
    finally:
        os.umask(mask)
    assert os.stat(tmp_path / "new.bin").st_mode & 0o777 == 0o644  # not mkstemp's 0o600


def test_replaced_output_keeps_its_mode(tmp_path):
    p = tmp_path / "old.bin"
    p.write_bytes(b"old")
    os.chmod(p, 0o640)
    write_bytes_atomic(p, b"new")
    assert p.read_bytes() == b"new" and os.stat(p).st_mode & 0o777 == 0o640


# ------------------------------------------------- issue 9: signals, odd files

def _mkstemp_then_signal(sig):
    """A mkstemp that creates its file and then sends ``sig`` to this process:
    the moment a signal used to strand a temp file."""
    import signal
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        fd, name = real(*a, **k)
        os.kill(os.getpid(), getattr(signal, sig))
        return fd, name

    return mkstemp


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises like the CLI's handler does (``udfc_ref.cli.Terminated``),
    and SIGINT raises KeyboardInterrupt as in an interactive Python, also when
    the test run was started with SIGINT ignored (a shell's background job)."""
    import signal

    from udfc_ref.cli import Terminated, _raise_terminated

    old = signal.signal(signal.SIGTERM, _raise_terminated)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield Terminated
    signal.signal(signal.SIGTERM, old)
    signal.signal(signal.SIGINT, old_int)


def test_sigint_inside_the_writability_probe_leaves_no_probe_file(tmp_path, monkeypatch, sigterm_raises):
    """SIGINT between mkstemp and unlink used to leave .udfc-probe.XXXX.tmp."""
    monkeypatch.setattr(atomic.tempfile, "mkstemp", _mkstemp_then_signal("SIGINT"))
    with pytest.raises(KeyboardInterrupt):
        check_output_path(tmp_path / "o.safetensors")
    assert listing(tmp_path) == []


def test_sigterm_inside_the_writability_probe_leaves_no_probe_file(tmp_path, monkeypatch, sigterm_raises):
    monkeypatch.setattr(atomic.tempfile, "mkstemp", _mkstemp_then_signal("SIGTERM"))
    with pytest.raises(sigterm_raises):
        check_output_path(tmp_path / "o.safetensors")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_right_after_the_temp_file_is_created(tmp_path, monkeypatch, sigterm_raises, sig):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", _mkstemp_then_signal(sig))
    with pytest.raises((KeyboardInterrupt, sigterm_raises)):
        write_bytes_atomic(out, b"new")
    assert listing(tmp_path) == ["out.bin"] and out.read_bytes() == b"previous"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_writing(tmp_path, monkeypatch, sigterm_raises, sig):
    import signal

    out = tmp_path / "out.safetensors"

    class Chunk:
        """A buffer whose write is interrupted by a signal (as when a user hits Ctrl-C mid-write)."""

        def __buffer__(self, flags):
            os.kill(os.getpid(), getattr(signal, sig))
            return memoryview(b"xyz")

    def write_then_signal(model):
        return [b"head", np.frombuffer(b"abc", np.uint8)] + [Chunk()]

    monkeypatch.setattr(udfc_ref.io, "_chunks", write_then_signal)
    with pytest.raises((KeyboardInterrupt, sigterm_raises, TypeError)):
        udfc_ref.save(vgg(), out)
    assert listing(tmp_path) == []


def test_verify_failure_writes_nothing(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"previous")

    def reject(tmp):
        assert os.path.getsize(tmp) == 3  # the complete temp file is what is checked
        raise UDFCError("does not read back")

    with pytest.raises(UDFCError, match="does not read back"):
        write_bytes_atomic(out, b"new", verify=reject)
    assert out.read_bytes() == b"previous" and listing(tmp_path) == ["o.bin"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_output_is_refused(tmp_path):
    f = tmp_path / "out.safetensors"
    os.mkfifo(f)
    with pytest.raises(OptionError, match="FIFO"):
        udfc_ref.save(vgg(), f)
    assert listing(tmp_path) == ["out.safetensors"]


def test_device_output_is_refused():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(OptionError, match="character device"):
        udfc_ref.save(vgg(), "/dev/null")
    import stat

    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_open_input_refuses_what_check_input_file_missed(tmp_path, monkeypatch):
    """A path swapped for a FIFO after the check is still refused, and the
    open does not block."""
    from udfc_ref import FormatError

    f = tmp_path / "in.bin"
    os.mkfifo(f)
    monkeypatch.setattr(atomic, "check_input_file", lambda p, what="input": os.fspath(p))
    with pytest.raises(FormatError, match="FIFO"):
        atomic.open_input(f)


def test_check_input_file_messages(tmp_path):
    from udfc_ref import FormatError

    with pytest.raises(FormatError, match="no such file"):
        atomic.check_input_file(tmp_path / "nope")
    with pytest.raises(FormatError, match="directory"):
        atomic.check_input_file(tmp_path)
    with pytest.raises(FormatError, match="not a file path"):
        atomic.check_input_file(None)
