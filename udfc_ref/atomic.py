"""Atomic file output: a temp file in the target directory, then ``os.replace``.

A failure at any point before the rename leaves the previous file (if any)
untouched and no partial file behind.
"""

from __future__ import annotations

import os
import tempfile

from .errors import OptionError


def check_output_path(path, inputs=()) -> str:
    """Validate an output path before any work is done.

    Raises OptionError when the directory is missing or not writable, or when
    the output is one of the ``inputs`` (we never overwrite an input)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise OptionError(f"output directory {d!r} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OptionError(f"output directory {d!r} is not writable")
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
    return path


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
