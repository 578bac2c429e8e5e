"""PyTorch <-> udfc-ref converter (public functions).

* :func:`to_udfc` / :func:`export` -- capture an ``nn.Module`` with
  ``torch.export`` and map its ATen graph onto the udfc-ref IR
  (``torch_import.py``, one handler per ATen op in ``torch_ops.py``); tensor
  names are the ``state_dict`` keys.  The result is checked by running the
  NumPy forward against the torch forward.
* :func:`export_state_dict` -- a plain state_dict file (safetensors, .pt,
  .pth) plus the module definition; :func:`load_module_spec`,
  :func:`read_state_dict`, :func:`load_weights` (``torch_weights.py``).
* :func:`to_module` -- a runnable eval-mode ``torch.fx.GraphModule`` from a
  (possibly compressed) udfc-ref file or :class:`udfc_ref.Model`;
  :func:`save_pt2` -- the same as a ``torch.export`` program (``.pt2``);
  :func:`save_torchscript` -- TorchScript, deprecated (``torch_export.py``).

PyTorch is imported lazily inside the functions: ``import converters.torch``
works without it.  (This module is named ``torch`` inside the ``converters``
package; the submodules' ``import torch`` is an absolute import and finds
PyTorch.)
"""

from __future__ import annotations

from udfc_ref.errors import ConversionError

# the private names are kept for callers of the former single-module converter (the CLI, benchmarks)
from .torch_common import CHECK_RTOL, NAMES_FILE, parse_shape as _parse_shape, torch_module as _torch  # noqa: F401
from .torch_export import check_against as _check_against  # noqa: F401
from .torch_export import module_names, pt2_bytes, save_pt2, save_torchscript, to_module
from .torch_import import EXPORT_BATCH, export, pick_output, to_udfc
from .torch_weights import export_state_dict, load_module_spec, load_weights, read_state_dict

__all__ = [
    "to_udfc", "export", "export_state_dict", "load_module_spec", "read_state_dict", "load_weights", "to_module",
    "save_pt2", "save_torchscript", "pt2_bytes", "module_names", "pick_output", "refuse_pt2_input", "CHECK_RTOL",
    "NAMES_FILE", "EXPORT_BATCH",
]


def refuse_pt2_input(path) -> ConversionError:
    """The error for a ``.pt2`` given as input: ``torch.export.load`` unpickles,
    and nothing read from a file may run as code."""
    return ConversionError(f"{path}: a .pt2 program is read with torch.export.load, which uses pickle; udfc-ref "
                           "never loads a file that can run code. Import the module it was made from instead: "
                           "udfc import torch OUT.safetensors --module pkg.mod:Net --input-shape C,H,W")
