"""A quiet progress line on stderr: shown only once work has taken > 1 s."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", delay: float = 1.0, stream=None):
        self.total = max(int(total), 1)
        self.label = label
        self.delay = delay
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if now - self.start < self.delay or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        self.shown = True
        frac = min(done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{self.total} {note}"[:100].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
