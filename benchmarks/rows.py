"""A benchmark's result rows, kept in a JSON file and resumed.

``Rows(path, key)`` loads the rows already in ``path`` (none if it does not
exist); ``key(row)`` names a row's cell, so a script skips the cells that
are already there (``cell in rows``, ``rows[cell]``) and adds each new row
with :meth:`Rows.add`, which rewrites the whole file atomically
(``udfc_ref.atomic.write_bytes_atomic``): an interrupted run loses at most
the row it was computing and never leaves a half-written file.
"""

from __future__ import annotations

import json
import os

from udfc_ref.atomic import write_bytes_atomic


class Rows:
    def __init__(self, path: str, key):
        self.path = path
        self.key = key
        self.rows: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                self.rows = json.load(f)
        self.done = {key(r): r for r in self.rows}

    def __contains__(self, cell) -> bool:
        return cell in self.done

    def __getitem__(self, cell) -> dict:
        return self.done[cell]

    def add(self, row: dict) -> None:
        """Append ``row`` and rewrite the file with every row."""
        self.rows.append(row)
        self.done[self.key(row)] = row
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        write_bytes_atomic(self.path, (json.dumps(self.rows, indent=1) + "\n").encode())
