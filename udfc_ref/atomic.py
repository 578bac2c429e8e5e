"""Atomic file output: a temp file in the target directory, then ``os.replace``.

A failure at any point before the rename leaves the previous file (if any)
untouched and no partial file behind.  Every failure is an
:class:`~udfc_ref.errors.OptionError` naming the path.
"""

from __future__ import annotations

import os
import tempfile

from .errors import OptionError


def _fspath(path) -> str:
    try:
        return os.fspath(path)
    except TypeError:
        raise OptionError(f"output path {path!r} is not a path") from None


def _probe_writable(d: str) -> None:
    """Create and delete a temp file in ``d``.

    ``os.access`` is not trusted: it answers "writable" for root on a 0o555
    directory and ignores read-only mounts; actually creating a file is the
    only reliable test."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".udfc-probe.", suffix=".tmp", dir=d)
    except OSError as e:
        raise OptionError(f"output directory {d!r} is not writable ({e.strerror or e})") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:  # pragma: no cover - we just created it
        pass


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
    by creating a temp file there), when the path is a directory, or when the
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
    if os.path.isdir(path):
        raise OptionError(f"output path {path!r} is a directory")
    for i in inputs:
        if i is None:
            continue
        i = os.fspath(i)
        same = os.path.abspath(i) == os.path.abspath(path)
        if not same and os.path.exists(i) and os.path.exists(path):
            same = os.path.samefile(i, path)
        if same:
            raise OptionError(f"output path {path!r} is the input file; choose another name (inputs are never overwritten)")
    _probe_writable(d)
    return path


def write_bytes_atomic(path, data) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    ``data`` is a bytes-like object or a list of them (written in order, so a
    large file can be streamed from existing buffers without joining them).

    On any failure the temp file is removed and a previous file at ``path`` is
    left as it was; an ``OSError`` is re-raised as OptionError."""
    path = _fspath(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    except OSError as e:
        raise OptionError(f"cannot write {path!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _final_mode(path))  # mkstemp makes 0o600; an output should be readable as usual
            for chunk in (data if isinstance(data, list) else [data]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OptionError(f"cannot write {path!r}: {e.strerror or e} (nothing was written)") from None
        raise
