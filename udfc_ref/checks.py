"""Numerical validation of a model's tensors, done before any work.

Raises :class:`NumericError` naming the tensor: NaN/Inf anywhere, negative BN
running variance, zero variance with ``eps == 0`` (division by zero).
"""

from __future__ import annotations

import numpy as np

from .errors import NumericError


def check_numbers(model) -> None:
    """Raise NumericError naming the first unusable tensor of ``model``.

    Checks every parameter tensor a node uses for NaN/Inf, and every
    batch_norm for ``running_var >= 0`` and ``running_var + eps > 0``
    (evaluated in float64, so a float16 variance is judged by its value, not
    by an underflowing sum)."""
    used = {}
    for n in model.nodes:
        for role, t in n.params.items():
            used[t] = (n, role)
    for t, (n, role) in used.items():
        a = model.tensors[t]
        if not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise NumericError(f"tensor {t!r} (node {n.name!r}, {role}) holds {bad} NaN/Inf value(s)")
    for n in model.nodes:
        if n.op != "batch_norm":
            continue
        var = np.asarray(model.param(n, "running_var"), dtype=np.float64)
        if np.any(var < 0):
            i = int(np.flatnonzero(var < 0)[0])
            raise NumericError(f"tensor {n.params['running_var']!r} (node {n.name!r}): running variance is negative "
                               f"in channel {i} ({var[i]:g})")
        if np.any(var + n.attrs["eps"] <= 0):
            i = int(np.flatnonzero(var + n.attrs["eps"] <= 0)[0])
            raise NumericError(f"tensor {n.params['running_var']!r} (node {n.name!r}): running variance is 0 in "
                               f"channel {i} and eps is {n.attrs['eps']:g} (division by zero)")
