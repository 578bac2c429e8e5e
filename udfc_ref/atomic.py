"""Safe file access: inputs are regular files, outputs are written atomically.

Inputs: :func:`check_input_file` / :func:`open_input` accept only regular
files (a FIFO, a device or a socket would block forever or never end), and
the open itself cannot block (``O_NONBLOCK``, then ``fstat``).

Outputs: a temp file in the target directory, then ``os.replace``.  A failure
at any point before the rename - an OSError, an exception, Ctrl-C, SIGTERM -
leaves the previous file (if any) untouched and no partial file behind.
SIGINT/SIGTERM are held back for the few system calls between creating a temp
file and owning its cleanup, so no signal can strand one.  Every failure is an
:class:`~udfc_ref.errors.OptionError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading

from .errors import FormatError, OptionError

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back while the block runs; a signal arriving
    meanwhile is delivered to its usual handler right after the block.

    Used around "create a temp file -> record that it must be removed" and
    around the removal itself, so an interrupt never strands a temp file.
    Python runs signal handlers in the main thread only, so this swaps the
    handlers there (``pthread_sigmask`` would not do: another thread, e.g.
    one of BLAS, may take the signal and the main thread still runs the
    handler at once); elsewhere no handler can interrupt the block anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for sig in _HELD_SIGNALS:
        h = signal.getsignal(sig)
        if h is None:  # installed outside Python: cannot be restored, leave it
            continue
        old[sig] = h
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for sig in pending:
            h = old[sig]
            if callable(h):
                h(sig, None)  # e.g. KeyboardInterrupt, or the CLI's Terminated
            elif h == signal.SIG_DFL:
                signal.raise_signal(sig)  # pragma: no cover - the default action ends the process


def _fspath(path) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        raise OptionError(f"output path {path!r} is not a path") from None


def _kind(mode: int) -> str:
    """'a FIFO', 'a character device' ... for a non-regular file mode."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"  # pragma: no cover - no other file types on Linux


# ------------------------------------------------------------------ inputs

def check_input_file(path, what: str = "input") -> str:
    """Return ``path`` as a str if it names an existing regular file (symlinks
    followed); raise FormatError otherwise.  ``what`` names the role of the
    file in the message only when the path is not even a path."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise FormatError(f"{what} {path!r} is not a file path") from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FormatError(f"{path}: not a regular file (a directory)")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file ({_kind(st.st_mode)}); udfc-ref reads only regular files")
    return path


def open_input(path):
    """Open a regular file for binary reading without ever blocking: the open
    is non-blocking (a FIFO with no writer would hang a plain ``open``) and
    the opened file is checked with ``fstat``, so a path swapped for a FIFO
    after :func:`check_input_file` is still refused.  Raises FormatError."""
    path = check_input_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: not a regular file ({_kind(st.st_mode)}); udfc-ref reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ----------------------------------------------------------------- outputs

def _probe_writable(d: str) -> None:
    """Create and delete a temp file in ``d``.

    ``os.access`` is not trusted: it answers "writable" for root on a 0o555
    directory and ignores read-only mounts; actually creating a file is the
    only reliable test.  Signals are held while the probe file exists."""
    err = None
    with signals_held():
        try:
            fd, tmp = tempfile.mkstemp(prefix=".udfc-probe.", suffix=".tmp", dir=d)
        except OSError as e:
            err = e
        else:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:  # pragma: no cover - we just created it
                pass
    if err is not None:
        raise OptionError(f"output directory {d!r} is not writable ({err.strerror or err})")


def _final_mode(path: str) -> int:
    """The mode of the file being replaced, else 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_dir(d: str) -> None:
    """Best effort: make the rename itself durable."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path, inputs=()) -> str:
    """Validate an output path before any work is done.

    Raises OptionError when the directory is missing or not writable (tested
    by creating a temp file there), when the path is a directory or another
    non-regular file (a FIFO or a device node is never replaced), when the
    output is one of the ``inputs`` (we never overwrite an input)."""
    path = _fspath(path)
    if not path:
        raise OptionError("output path is empty")
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        parent = d
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            raise OptionError(f"output directory {d!r} cannot exist: {parent!r} is a file")
        raise OptionError(f"output directory {d!r} does not exist")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None  # a new file (or a dangling symlink, which the rename replaces)
    except OSError as e:
        raise OptionError(f"output path {path!r} cannot be checked ({e.strerror or e})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OptionError(f"output path {path!r} is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OptionError(f"output path {path!r} is {_kind(st.st_mode)}, not a regular file; udfc-ref never "
                          "replaces one (choose a file name)")
    for i in inputs:
        if i is None:
            continue
        i = os.fspath(i)
        same = os.path.abspath(i) == os.path.abspath(path)
        if not same and os.path.exists(i) and st is not None:
            same = os.path.samefile(i, path)
        if same:
            raise OptionError(f"output path {path!r} is the input file; choose another name (inputs are never overwritten)")
    _probe_writable(d)
    return path


def write_bytes_atomic(path, data, verify=None) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    ``data`` is a bytes-like object or a list of them (written in order, so a
    large file can be streamed from existing buffers without joining them).
    ``verify``, when given, is called with the complete temp file's path
    before the rename; if it raises, nothing is written.

    On any failure (including KeyboardInterrupt and any other exception) the
    temp file is removed and a previous file at ``path`` is left as it was;
    an ``OSError`` is re-raised as OptionError."""
    path = _fspath(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    tmp = f = None
    try:
        with signals_held():  # from here on ``tmp`` is always removed on failure
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
            f = os.fdopen(fd, "wb")
        with f:
            os.fchmod(f.fileno(), _final_mode(path))  # mkstemp makes 0o600; an output should be readable as usual
            for chunk in (data if isinstance(data, list) else [data]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        with signals_held():
            os.replace(tmp, path)
            tmp = None
        _fsync_dir(d)
    except BaseException as e:
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if tmp is not None:
            with signals_held():
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if isinstance(e, OSError):
            raise OptionError(f"cannot write {path!r}: {e.strerror or e} (nothing was written)") from None
        raise
