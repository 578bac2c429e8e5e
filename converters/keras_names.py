"""Keras layer names for udfc-ref node names, and the map back.

Keras 3 refuses some layer names: ``/`` anywhere (``Operation.__init__``),
``.`` on the PyTorch backend (a layer's variables become a
``torch.nn.ParameterDict`` keyed ``<layer>/<variable>``, and PyTorch refuses
parameter names with dots), names TensorFlow's name scopes reject
(a leading ``_`` or ``-``, non-ASCII), and two layers with one name.  A
udfc-ref node may be called anything (``features.0``, a PyTorch module
path, or a hostile string from a file), so :class:`KerasNames` keeps a name
only when it is an ASCII identifier-like string that every backend takes,
and maps every other one to a readable safe name (``features.0`` ->
``features_0``, made unique).  The original node, value and tensor names
travel as data in the written ``.keras`` archive (``udfc_names.json``, see
``docs/converters.md``); nothing of a name is ever executed.
"""

from __future__ import annotations

import re

#: a Keras layer name kept as it is: starts with a letter; ASCII letters,
#: digits, '_' and '-'; at most 64 characters
KEEP = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}\Z")
#: the automatic names of the keras.ops operations the exporter creates
#: (``keras.ops.gelu`` names itself ``gelu``, ``gelu_1`` ...): never given to a layer
RESERVED = re.compile(r"gelu(_[0-9]+)?\Z")
#: stem of generated names that would otherwise be empty or start with a non-letter
PREFIX = "udfc_"


class KerasNames:
    """Hands out unique Keras layer names (one instance per exported model)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, name) -> str:
        """A unique safe Keras name for ``name`` (kept when it is already safe)."""
        if isinstance(name, str) and KEEP.match(name) and not RESERVED.match(name) and name not in self.used:
            self.used.add(name)
            return name
        base = re.sub(r"[^A-Za-z0-9_]+", "_", name if isinstance(name, str) else "").strip("_")[:48]
        if not base or not base[0].isalpha() or RESERVED.match(base):
            base = PREFIX + base
        out, i = base, 1
        while out in self.used or RESERVED.match(out):
            out, i = f"{base}_{i}", i + 1
        self.used.add(out)
        return out
