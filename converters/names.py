"""Names read from a model file are data, never code.

A framework module tree is addressed by dotted attribute paths, and tools
such as ``torch.fx`` print those paths into generated Python source.  A tensor
name from a file (``features.0.weight``, but just as well
``a" + __import__("os").system("...") + "``) must therefore never reach a
framework as an attribute path unless it is provably harmless.

:func:`safe_paths` keeps a name exactly when every dot-separated component is
a plain ASCII identifier or a decimal index (``features.0.weight``), and maps
every other name to a fresh identifier.  The caller keeps the map
(safe -> original) as *data* next to the model (an extra file, a JSON field),
so a round trip restores the original names.
"""

from __future__ import annotations

import keyword
import re

#: one dot-separated component that may be used as an attribute name: an
#: ASCII identifier, or a decimal index (``nn.Sequential`` children)
_COMPONENT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,63}|[0-9]{1,9})\Z")
#: at most this many components in a kept path
MAX_DEPTH = 16


def is_safe_component(c: str, reserved=frozenset()) -> bool:
    """True for an ASCII identifier (not a keyword, not ``__dunder__``, not
    in ``reserved``) or a decimal index, at most 64 characters."""
    return (
        isinstance(c, str)
        and _COMPONENT.match(c) is not None
        and not keyword.iskeyword(c)
        and not (c.startswith("__") and c.endswith("__"))
        and c not in reserved
    )


def safe_paths(names, reserved=frozenset(), prefix: str = "udfc_tensor_") -> dict[str, str]:
    """Map each name to a dotted path that is safe as a framework attribute path.

    Parameters
    ----------
    names : iterable of str
        Names from a file (tensor names, layer names).
    reserved : set of str
        Components that must not be used (e.g. the attributes every
        ``nn.Module`` already has, such as ``forward`` or ``training``).
    prefix : str
        Stem of the generated names (``<prefix><i>``, one component).

    Returns
    -------
    dict original -> safe path
        A name keeps its spelling when every component passes
        :func:`is_safe_component`, it has at most ``MAX_DEPTH`` components,
        and no other name uses it as a prefix (a path cannot be both a tensor
        and a submodule).  Every other name becomes ``<prefix><i>``, unique
        and distinct from the first component of every kept name.  Linear in
        the total length of the names.
    """
    names = list(dict.fromkeys(names))
    candidates = []
    for n in names:
        parts = n.split(".") if isinstance(n, str) else []
        if parts and len(parts) <= MAX_DEPTH and all(is_safe_component(p, reserved) for p in parts):
            candidates.append(n)
    cand = set(candidates)
    internal = set()
    for n in candidates:
        parts = n.split(".")
        for i in range(1, len(parts)):
            internal.add(".".join(parts[:i]))
    kept = {n for n in cand if n not in internal}
    tops = {n.split(".")[0] for n in kept}
    out, i = {}, 0
    for n in names:
        if n in kept:
            out[n] = n
            continue
        while f"{prefix}{i}" in tops:
            i += 1
        out[n] = f"{prefix}{i}"
        i += 1
    return out
