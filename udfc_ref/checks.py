"""Numerical validation of a model's tensors, done before any work.

Raises :class:`NumericError` naming the tensor: NaN/Inf anywhere, negative BN
running variance, zero variance with ``eps == 0`` (division by zero), a
quantization scale that is not finite and positive.  :func:`check_layer` is
the same check for one layer just rewritten by the compression, naming the
step that produced the values.
"""

from __future__ import annotations

import numpy as np

from .errors import NumericError
from .tensors import Tensors


def check_numbers(model) -> None:
    """Raise NumericError naming the first unusable tensor of ``model``.

    Checks every parameter tensor a node uses for NaN/Inf, and every
    batch_norm for ``running_var >= 0`` and ``running_var + eps > 0``
    (evaluated in float64, so a float16 variance is judged by its value, not
    by an underflowing sum).  A weight held as codes is judged on its codes
    (``QuantizedTensor.finite``), without a dequantized copy."""
    used = {}
    for n in model.nodes:
        for role, t in n.params.items():
            used[t] = (n, role)
    for t, (n, role) in used.items():
        if _held_finite(model, t):
            continue
        a = model.tensors[t]
        if not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise NumericError(f"tensor {t!r} (node {n.name!r}, {role}) holds {bad} NaN/Inf value(s)")
    for t, q in model.quant.items():
        if t in used and not (np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)):
            n, role = used[t]
            raise NumericError(f"tensor {t!r} (node {n.name!r}, {role}): quantization scales must be finite and "
                               "positive")
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


def _held_finite(model, t: str) -> bool:
    """True when ``t`` is held as codes whose dequantized values are all
    finite (decided on the codes, ``QuantizedTensor.finite``); False when it
    is not held as codes or is not finite (the caller then reads the values)."""
    tensors = model.tensors
    return isinstance(tensors, Tensors) and tensors.is_codes(t) and tensors.codes(t).finite()


def check_layer(model, node, what: str, hint: str = "") -> None:
    """Raise NumericError naming ``node`` when one of its tensors holds
    NaN/Inf (or a quantized weight a scale that is not finite and positive)
    after ``what`` (e.g. "compensating the pruned channels of 'c0'")
    rewrote it: the values overflowed the tensor's dtype.  ``hint`` says
    how the user can avoid it.

    Values cast to float16/float32 beyond the dtype's range become Inf; this
    check turns that into an error before anything is written."""
    for role, t in node.params.items():
        q = model.quant.get(t)
        bad_scale = q is not None and not (np.all(np.isfinite(q.scale)) and np.all(q.scale > 0))
        if not bad_scale and _held_finite(model, t):
            continue
        a = model.tensors[t]
        if bad_scale or not np.all(np.isfinite(a)):
            limit = f"{np.finfo(a.dtype).max:.3g}" if a.dtype.kind == "f" else "its range"
            raise NumericError(f"layer {node.name!r}: {what} makes its {role} {t!r} overflow {a.dtype} "
                               f"(|value| > {limit}): the weights are too close to the {a.dtype} limit for this "
                               "compression" + (f" ({hint})" if hint else ""))
