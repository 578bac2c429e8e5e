"""A progress bar with a time estimate, on stderr, for work that takes a while.

The bar is drawn only when its stream is a terminal and only once the work
has taken longer than ``delay`` (1 s): quick commands, pipes and log files
never see it.  Typical use::

    with Progress(len(layers), "compress") as bar:
        for i, layer in enumerate(layers):
            bar.update(i, layer.name)      # i items done, working on layer
            ...
        # leaving the block normally completes the bar and ends its line;
        # an exception erases it, so an error message starts on a clean line

    compress [##########..........]  52%  13/25  0:04 left  conv3

:func:`message` prints a line (a warning, an error) above an active bar and
:func:`abort_all` erases every bar still drawn (the CLI calls it before it
prints an error), so a bar never mixes with other output.
"""

from __future__ import annotations

import shutil
import sys
import time

#: seconds of work before a bar first appears (module-wide default)
DELAY = 1.0

#: bars currently drawn (at most a few: nested work)
_ACTIVE: list["Progress"] = []


def _clock_text(seconds: float) -> str:
    """0:07, 12:30, 1:02:03."""
    s = int(max(seconds, 0) + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` items of work.

    Parameters
    ----------
    total : int
        Number of items (layers, samples ...); at least 1 is assumed.
    label : str
        Shown before the bar (``"compress"``, ``"eval"``, ``"import"``).
    delay : float, optional
        Seconds of work before the bar first appears (default :data:`DELAY`, 1 s).
    stream : file, optional
        Where to draw (default: ``sys.stderr`` at construction).
    enabled : bool, optional
        ``None`` (default): draw only when ``stream.isatty()``; ``False``:
        never draw (a no-op bar, so callers need no ``if``); ``True``: draw
        even on a non-terminal (tests).
    clock : callable, optional
        Seconds as a float (default ``time.monotonic``; tests pass a fake).
    """

    def __init__(self, total: int, label: str = "", delay: float | None = None, stream=None,
                 enabled: bool | None = None, clock=time.monotonic):
        self.total = max(int(total), 1)
        self.label = label
        self.delay = DELAY if delay is None else delay
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = bool(self.stream.isatty())
            except (AttributeError, ValueError, OSError):
                enabled = False
        self.enabled = enabled
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.note = ""
        self._last_draw = None
        self._width = 0  # characters of the line currently on screen (0: nothing drawn)
        self.shown = False  # drawn at least once

    # ------------------------------------------------------------- drawing
    def _text(self, now: float, final: bool = False) -> str:
        frac = min(self.done / self.total, 1.0)
        cols = shutil.get_terminal_size((80, 24)).columns - 1
        n = 20
        bar = "#" * int(n * frac) + "." * (n - int(n * frac))
        elapsed = now - self.start
        if final:
            when = f"{_clock_text(elapsed)} total"
        elif self.done > 0:
            when = f"{_clock_text(elapsed * (self.total - self.done) / self.done)} left"
        else:
            when = "-:-- left"
        text = f"{self.label} [{bar}] {100 * frac:3.0f}%  {self.done}/{self.total}  {when}"
        if self.note and not final:
            text += f"  {self.note}"
        return text[:max(cols, 20)]

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not turn progress into an error
            self.enabled = False

    def _draw(self, now: float, final: bool = False) -> None:
        text = self._text(now, final)
        pad = max(self._width - len(text), 0)
        self._write("\r" + text + " " * pad)
        self._width = len(text)
        self._last_draw = now
        self.shown = True
        if self not in _ACTIVE:
            _ACTIVE.append(self)

    def _erase(self) -> None:
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    # ----------------------------------------------------------------- API
    def update(self, done: int, note: str = "") -> None:
        """``done`` items are finished; ``note`` names the current one."""
        self.done = min(max(int(done), 0), self.total)
        self.note = str(note).replace("\n", " ").replace("\r", " ")
        if not self.enabled:
            return
        now = self.clock()
        if now - self.start < self.delay:
            return
        if self._last_draw is not None and now - self._last_draw < 0.1 and self.done < self.total:
            return
        self._draw(now)

    def advance(self, n: int = 1, note: str = "") -> None:
        """``n`` more items are finished."""
        self.update(self.done + n, note)

    def close(self) -> None:
        """The work is complete: if the bar was shown, draw it full with the
        total time and end its line."""
        if self._width:
            self.done = self.total
            self._draw(self.clock(), final=True)
            self._write("\n")
            self._width = 0
        self._forget()

    def abort(self) -> None:
        """The work failed: erase the bar (nothing of it stays on screen)."""
        self._erase()
        self._forget()

    def _forget(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def abort_all() -> None:
    """Erase every bar still drawn (an error is about to be printed)."""
    for bar in list(_ACTIVE):
        bar.abort()


def message(text: str, stream=None) -> None:
    """Print ``text`` as one line on ``stream`` (default stderr) without
    mixing it into a drawn bar: active bars are erased first and redraw at
    their next update."""
    stream = stream if stream is not None else sys.stderr
    for bar in _ACTIVE:
        bar._erase()
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass
