"""``udfc import`` / ``udfc export``: the converter subcommands of the CLI.

:func:`add_subcommands` is called by ``udfc_ref.cli.build_parser`` with its
argparse subparsers object.  Frameworks are imported lazily in the handlers,
so ``udfc --help`` works without PyTorch or Keras.
"""

from __future__ import annotations

import argparse
import os

from udfc_ref.atomic import check_output_path

IMPORT_EPILOG = """\
examples:
  # a module class (or zero-argument factory) plus a plain state_dict
  udfc import torch resnet.safetensors --module mypkg.models:resnet18 \\
      --weights resnet18.pth --input-shape 3,224,224
  # a model defined in a local file, weights already inside
  udfc import torch net.safetensors --module ./mynet.py:build --input-shape 3,32,32
  # a module in the current directory (found as `python -m` finds it)
  udfc import torch net.safetensors --module mynet:Net --input-shape 3,32,32
  # a Keras model
  udfc import keras model.keras model.safetensors
"""

EXPORT_EPILOG = """\
examples:
  # a torch.export program; run it with torch.export.load("small.pt2").module() (udfc-ref not needed)
  udfc export torch small.safetensors small.pt2
  # a Keras model file
  udfc export keras small.safetensors small.keras
"""


KERAS_BACKEND_NOTE = ("Keras backend: KERAS_BACKEND if set, else the backend of ~/.keras/keras.json; when "
                      "TensorFlow is not installed and neither names another installed backend, udfc uses the "
                      "PyTorch backend (KERAS_BACKEND=torch).")


def _keras():
    try:
        from converters import keras as ck  # noqa: PLC0415
    except ImportError as e:
        from udfc_ref.errors import ConversionError  # noqa: PLC0415

        raise ConversionError(f"the Keras converter is unavailable ({e}); install it with: "
                              "pip install 'udfc-ref[keras]'") from None
    return ck


def cmd_import_torch(a) -> int:
    from converters import torch as ct  # noqa: PLC0415

    check_output_path(a.out, inputs=(a.weights,))
    shape = ct._parse_shape(a.input_shape)
    module = ct.load_module_spec(a.module, weights=a.weights)
    model = ct.export(module, a.out, shape, progress=True)
    print(f"wrote {a.out}: {len(model.nodes)} nodes, {model.param_count():,} parameters, "
          f"input {tuple(model.input_shape)}, output {model.shapes[model.output_name]}")
    return 0


def cmd_import_keras(a) -> int:
    check_output_path(a.out, inputs=(a.src,))
    _keras().export(a.src, a.out, progress=True)
    print(f"wrote {a.out}")
    return 0


def cmd_export_torch(a) -> int:
    from udfc_ref.cli import REFUSED_OUTPUTS  # noqa: PLC0415

    check_output_path(a.out, inputs=(a.src,))
    stem, suffix = os.path.splitext(a.out)
    if suffix.lower() in REFUSED_OUTPUTS:
        from udfc_ref.errors import OptionError  # noqa: PLC0415

        raise OptionError(f"{a.out}: " + REFUSED_OUTPUTS[suffix.lower()].format(stem=stem))
    if not a.out.endswith(".pt2"):
        from udfc_ref.errors import OptionError  # noqa: PLC0415

        raise OptionError(f"{a.out}: the PyTorch output must end in .pt2 (a torch.export program)")
    from converters import torch as ct  # noqa: PLC0415

    ct.save_pt2(a.src, a.out, progress=True)
    print(f"wrote {a.out} (torch.export program; run it with torch.export.load({a.out!r}).module())")
    return 0


def cmd_export_keras(a) -> int:
    check_output_path(a.out, inputs=(a.src,))
    _keras().save_keras(a.src, a.out, progress=True)
    print(f"wrote {a.out}")
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``import`` and ``export`` (each with ``torch`` / ``keras``) to the
    ``udfc`` CLI's ``subparsers``."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "import", help="convert a PyTorch or Keras model to a udfc-ref file",
        description="Convert a framework model to a udfc-ref .safetensors file (eval mode). The converted "
                    "model is checked against the framework's own forward pass.",
        epilog=IMPORT_EPILOG, formatter_class=fmt)
    fw = p.add_subparsers(dest="framework", metavar="FRAMEWORK", required=True)

    s = fw.add_parser(
        "torch", help="a torch.nn.Module (captured with torch.export)",
        description="Capture a torch.nn.Module with torch.export (eval mode, for the given input shape) and "
                    "write its ATen graph as a udfc-ref file. Tensor names are the module's state_dict keys. "
                    "A forward returning a dict or a model-output object gives its 'logits' (else its first "
                    "tensor). Supported: 2-D convolutions, batch norm, linear, layer norm over the last axis, "
                    "ReLU/ReLU6/sigmoid/SiLU/hard-sigmoid/hard-swish/GELU, softmax, +, products (gates), "
                    "constant per-axis scales and shifts, cat on channels, reshapes, per-sample permutes, "
                    "constant padding, max/average/adaptive-average pooling, mean over H and W, dropout "
                    "(see docs/converters.md).",
        epilog=IMPORT_EPILOG, formatter_class=fmt)
    s.add_argument("out", metavar="OUT.safetensors", help="udfc-ref file to write (atomically)")
    s.add_argument("--module", required=True, metavar="SPEC",
                   help="'package.module:attr' (imported as python -m would: the current directory first on "
                        "sys.path) or 'path/to/file.py:attr'; attr (dotted allowed) is an nn.Module instance, "
                        "or a class / factory called with no arguments")
    s.add_argument("--weights", metavar="FILE",
                   help="plain state_dict to load first (.safetensors, or .pt/.pth read with "
                        "torch.load(weights_only=True)); keys must match exactly")
    s.add_argument("--input-shape", required=True, metavar="C,H,W",
                   help="one input sample without the batch axis, e.g. 3,224,224")
    s.set_defaults(func=cmd_import_torch)

    s = fw.add_parser(
        "keras", help="a Keras .keras or .h5 model file (read without importing Keras)",
        description="Convert a Keras 3 .keras archive or a legacy .h5 file (Sequential or functional, one NHWC "
                    "image input) to a udfc-ref file; the file is read with zipfile/h5py, Keras is not needed. "
                    "Supported layers: Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, BatchNormalization, "
                    "LayerNormalization, Rescaling, Normalization, ReLU, Softmax, Activation (relu, relu6, "
                    "sigmoid, silu/swish, hard_sigmoid, hard_silu/hard_swish, gelu, softmax), pooling, "
                    "ZeroPadding2D, Flatten, Reshape, Permute, Add, Multiply, Concatenate, Dropout and other "
                    "no-op layers, keras.ops arithmetic with constants (docs/converters.md). "
                    + KERAS_BACKEND_NOTE,
        epilog=IMPORT_EPILOG, formatter_class=fmt)
    s.add_argument("src", metavar="IN.keras|IN.h5", help="Keras model file (never modified)")
    s.add_argument("out", metavar="OUT.safetensors", help="udfc-ref file to write (atomically)")
    s.set_defaults(func=cmd_import_keras)

    p = subparsers.add_parser(
        "export", help="convert a udfc-ref file to a torch.export program or a Keras model",
        description="Rebuild a (possibly compressed) udfc-ref model in a framework. Quantized weights are "
                    "written as their dequantized floats.",
        epilog=EXPORT_EPILOG, formatter_class=fmt)
    fw = p.add_subparsers(dest="framework", metavar="FRAMEWORK", required=True)

    s = fw.add_parser(
        "torch", help="a torch.export program (.pt2; torch.export.load works without udfc-ref)",
        description="Write a torch.export program (.pt2) whose outputs match the udfc-ref NumPy forward (checked "
                    "after loading the bytes back, before writing), with a dynamic batch axis and state_dict "
                    "keys equal to the file's tensor names (names that are not dotted identifiers are renamed; "
                    "the originals are the archive's extra file udfc_names.json). TorchScript (.pt) is no "
                    "longer written: PyTorch deprecates it.", epilog=EXPORT_EPILOG, formatter_class=fmt)
    s.add_argument("src", metavar="IN.safetensors", help="udfc-ref file (never modified)")
    s.add_argument("out", metavar="OUT.pt2", help="torch.export program to write (atomically)")
    s.set_defaults(func=cmd_export_torch)

    s = fw.add_parser(
        "keras", help="Keras .keras model file (loads with keras.saving.load_model)",
        description="Write a Keras 3 functional model rebuilt from a udfc-ref file (quantized weights as their "
                    "dequantized floats). Layer names Keras refuses (e.g. 'features.0') are replaced by safe "
                    "ones; the original names are recorded in the archive (udfc_names.json) and restored when "
                    "udfc reads the file. The file is loaded back with Keras and checked against the udfc-ref "
                    "forward before it is written. " + KERAS_BACKEND_NOTE,
        epilog=EXPORT_EPILOG, formatter_class=fmt)
    s.add_argument("src", metavar="IN.safetensors", help="udfc-ref file, or a Keras .keras/.h5 file (never modified)")
    s.add_argument("out", metavar="OUT.keras", help="Keras model file to write (atomically; must end in .keras)")
    s.set_defaults(func=cmd_export_keras)
