"""The parameter tensors of a model: name -> float array, where a quantized
weight may be held as its integer codes only.

A compressed model's quantized weights are what its file stores: integer
codes, a scale per channel and, asymmetric, a zero point
(:class:`~udfc_ref.quantize.QuantizedTensor`).  Holding the dequantized
float copy ``scale * (q - zero_point)`` (Eq. Q1) beside the codes would
cost 4 bytes per parameter more than the codes' one: 65 MiB of a 98 MiB
ResNet-50 at 30 % pruning + 6-bit.  :class:`Tensors` holds such a weight as
its codes and dequantizes it each time it is read (1.1 ms per million
parameters, one thread); the array a read returns is read-only (a write
into it could not reach the codes).  Every other entry is the array itself.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from .quantize import QuantizedTensor


class TensorSpec:
    """Shape and dtype of a tensor held as codes (the attributes of an array
    a reader of shapes needs: ``shape``, ``dtype``, ``size``, ``ndim``,
    ``nbytes`` of the dequantized array)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class Tensors(MutableMapping):
    """A mapping name -> float array whose quantized entries may be held as
    codes (:meth:`hold_codes`) and are dequantized when read.

    ``tensors[name]`` is always an ndarray of the parameter's float values;
    :meth:`spec` gives shape and dtype without dequantizing.  Assigning an
    array to a name replaces whatever was held under it."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        if isinstance(items, Tensors):
            self._items = dict(items._items)
        else:
            self._items = dict(items)

    # the mapping
    def __getitem__(self, name):
        v = self._items[name]
        if isinstance(v, QuantizedTensor):
            a = v.dequantize()
            a.flags.writeable = False  # a write could not reach the codes: refuse it
            return a
        return v

    def __setitem__(self, name, value) -> None:
        self._items[name] = value

    def __delitem__(self, name) -> None:
        del self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Tensors({len(self._items)} tensors, {len(self.held_as_codes())} held as codes)"

    # codes
    def hold_codes(self, name: str, q: QuantizedTensor) -> None:
        """Hold ``name`` as the codes ``q`` only: a read returns ``q.dequantize()``."""
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"tensor {name!r}: hold_codes needs a QuantizedTensor, got {type(q).__name__}")
        self._items[name] = q

    def held_as_codes(self) -> list[str]:
        """Names of the entries held as codes."""
        return [k for k, v in self._items.items() if isinstance(v, QuantizedTensor)]

    def is_codes(self, name: str) -> bool:
        """Whether ``name`` is held as codes."""
        return isinstance(self._items.get(name), QuantizedTensor)

    def codes(self, name: str) -> QuantizedTensor:
        """The codes an entry is held as (KeyError when it is held as an array)."""
        v = self._items[name]
        if not isinstance(v, QuantizedTensor):
            raise KeyError(f"tensor {name!r} is held as an array, not as codes")
        return v

    def spec(self, name):
        """The array itself, or for an entry held as codes a :class:`TensorSpec`
        (its shape and float dtype), without dequantizing."""
        v = self._items[name]
        if isinstance(v, QuantizedTensor):
            return TensorSpec(v.codes.shape, v.dtype)
        return v

    def copy(self, quant: dict | None = None) -> "Tensors":
        """A copy sharing the arrays; entries held as codes are re-bound to
        ``quant[name]`` when given (the copy's own quantization table)."""
        t = Tensors(self)
        if quant:
            for k, v in t._items.items():
                if isinstance(v, QuantizedTensor) and k in quant:
                    t._items[k] = quant[k]
        return t
