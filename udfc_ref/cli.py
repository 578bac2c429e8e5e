"""The ``udfc`` command line.

Exit status: 0 success; 1 a UDFCError (one ``udfc: error: ...`` line on
stderr, ``--debug`` shows the traceback); 2 a usage error (one line too: an
unknown option, a bad option value, an output suffix no writer handles); 130
Ctrl-C; 143 SIGTERM; 141 stdout closed early (a pipe into ``head``).  Interrupted or failed commands leave no partial output
(``atomic.py``).  Warnings are one ``udfc: warning: ...`` line each; the
progress bar (``progress.py``) is drawn only on a terminal and is erased
before an error is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings

from .errors import UDFCError

EPILOG = """examples:
  udfc demo                                   compress the bundled digits CNN, before/after table
  udfc info model.safetensors                 layers, channels, parameters, bytes
  udfc compress in.safetensors out.safetensors --prune-ratio 0.3 --weight-bits 6 --method udfc
  udfc eval out.safetensors --data test.npz   top-1 accuracy (arrays x: N,C,H,W float; y: N int)
  udfc import keras model.keras model.safetensors
  udfc compress model.keras small.keras --prune-ratio 0.3 --weight-bits 6              Keras in, Keras out
  udfc compress weights.pth small.pt2 --torch-module mynet.py:Net --input-shape 3,32,32 \\
       --prune-ratio 0.3 --weight-bits 6                                               PyTorch in, torch.export out

exit status: 0 success, 1 error (one 'udfc: error:' line; --debug shows the traceback),
2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 output pipe closed
"""


# ------------------------------------------------------------- file formats

def _write_udfc(model, path, input_path=None) -> None:
    from .io import save

    save(model, path, input_path=input_path)


def _write_keras(model, path, input_path=None) -> None:
    from converters import keras as ck  # noqa: PLC0415

    ck.save_keras(model, path, progress=True)


def _write_pt2(model, path, input_path=None) -> None:
    from converters import torch as ct  # noqa: PLC0415

    ct.save_pt2(model, path, progress=True)


#: output suffix -> (format name, writer(model, path, input_path)).  The one
#: place the output formats live: the suffix of an output alone picks its
#: format, and a suffix not listed here is a usage error.  A converter adds a
#: format with :func:`register_output_format`.
OUTPUT_FORMATS: dict[str, tuple[str, object]] = {
    ".safetensors": ("udfc-ref", _write_udfc),
    ".keras": ("Keras", _write_keras),
    ".pt2": ("torch.export", _write_pt2),
}
#: suffixes refused as outputs, with the reason (checked before any work)
REFUSED_OUTPUTS = {
    ".pt": "TorchScript output (.pt/.pth) is no longer written, PyTorch deprecates TorchScript; write a "
           "torch.export program instead: {stem}.pt2 (load it with torch.export.load)",
}
REFUSED_OUTPUTS[".pth"] = REFUSED_OUTPUTS[".pt"]


def register_output_format(suffix: str, name: str, writer) -> None:
    """Let ``udfc compress`` / ``udfc demo --output`` write ``suffix`` files
    with ``writer(model, path, input_path=None)`` (atomically, checking the
    result: the writer's job)."""
    if not (suffix.startswith(".") and len(suffix) > 1):
        raise ValueError(f"a suffix starts with '.', got {suffix!r}")
    OUTPUT_FORMATS[suffix.lower()] = (name, writer)


def supported_outputs() -> str:
    """'.safetensors (udfc-ref), .keras (Keras), .pt2 (torch.export)'."""
    by_name: dict[str, list[str]] = {}
    for suffix, (name, _) in OUTPUT_FORMATS.items():
        by_name.setdefault(name, []).append(suffix)
    return ", ".join(f"{'/'.join(s)} ({name})" for name, s in by_name.items())


def output_format(path: str) -> tuple[str, object]:
    """(format name, writer) for ``path`` by its suffix; ValueError naming
    the supported suffixes otherwise."""
    stem, suffix = os.path.splitext(os.fspath(path))
    suffix = suffix.lower()
    if suffix in REFUSED_OUTPUTS:
        raise ValueError(f"{os.fspath(path)}: " + REFUSED_OUTPUTS[suffix].format(stem=stem))
    if suffix not in OUTPUT_FORMATS:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise ValueError(f"output {os.fspath(path)!r} has {what}; the suffix picks the format, supported: "
                         f"{supported_outputs()}")
    return OUTPUT_FORMATS[suffix]


#: input suffix -> reader kind; anything else is read as a udfc-ref file
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth")


# ---------------------------------------------------------- option parsing

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``udfc: error: ...`` (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"udfc: error: {message} (see '{self.prog} --help')\n")


def _ratio(s: str) -> float:
    try:
        r = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (math.isfinite(r) and 0.0 <= r < 1.0):
        raise argparse.ArgumentTypeError(f"prune ratio must be a number in [0, 1), got {s!r}")
    return r


def _bits(s: str):
    if s.strip().lower() in ("none", "float"):
        return None
    try:
        b = int(s)
    except ValueError:
        b = None
    if b is None or not (2 <= b <= 8 or b == 16):
        raise argparse.ArgumentTypeError(f"weight bits must be 2..8, 16, or 'none' (float weights), got {s!r}")
    return b


def _checked(convert, ok, what: str):
    """An argparse type: ``convert(s)`` that must satisfy ``ok`` (else a usage error saying ``what``)."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if convert is int else 'a number'}: {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    return parse


_nonnegative = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _compress_bits(s: str):
    """--weight-bits of compress/demo: :func:`_bits` or 'auto' (bits chosen per layer by a byte budget)."""
    return "auto" if s.strip().lower() == "auto" else _bits(s)


def _fraction(s: str) -> float:
    """A budget: a fraction of the original in (0, 1) (else a usage error, exit 2, like --prune-ratio);
    whether it is reachable is checked by compress (exit 1)."""
    try:
        f = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise argparse.ArgumentTypeError(f"must be a fraction of the original in (0, 1), got {s!r}")
    return f


def _bit_list(s: str) -> list:
    try:
        return [int(b) for b in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of bit widths: {s!r}") from None
_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")


def _model_output(s: str) -> str:
    try:
        output_format(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def add_compress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--prune-ratio", type=_ratio, default=0.0, metavar="R",
                   help="fraction in [0, 1) of the output channels of every compressible layer to remove "
                        "(default 0: no pruning)")
    g.add_argument("--weight-bits", type=_compress_bits, default=None, metavar="B",
                   help="quantize weights to B bits: 2..8 or 16; 'none' (or 'float', the default): float weights; "
                        "'auto' (with --target-bytes): each layer's bits chosen from --bit-choices")
    g.add_argument("--method", choices=("udfc", "nm", "none"), default="udfc",
                   help="compensation: udfc (closed form, default), nm (Neuron Merging), none (drop/round only)")
    g.add_argument("--criterion", choices=("l1", "l2", "l1-bn", "l2-bn", "cov"), default="l1",
                   help="channel selection: filter L1/L2 norm, optionally times |gamma|/sigma of the BN, or cov: "
                        "keep the channels the others are best rebuilt from, under the statistics; with "
                        "--calibration (sequential mode) those whose consumer input best gives the original "
                        "consumer's output (default l1)")
    g.add_argument("--per-tensor", action="store_true", help="one quantization scale per tensor (default per channel)")
    g.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) quantization (default symmetric)")
    g.add_argument("--mse-clip", action="store_true", help="search the clipping range minimising the weight MSE")
    g.add_argument("--alpha1", type=_nonnegative, default=0.01, metavar="A",
                   help="UDFC ridge weight of the pruning solve, >= 0 (default 0.01)")
    g.add_argument("--alpha2", type=_nonnegative, default=0.008, metavar="A",
                   help="UDFC weight pulling quantization rescales to 1, >= 0 (default 0.008)")
    g.add_argument("--bias-correction", action="store_true",
                   help="remove the expected output shift of each quantized layer (DFQ-style)")
    g.add_argument("--skip", nargs="+", default=[], metavar="LAYER",
                   help="conv/linear layers left untouched (names as 'udfc info' prints them)")
    g.add_argument("--min-keep", type=_positive_int, default=1, metavar="N",
                   help="channels every pruned layer keeps at least (default 1)")
    g.add_argument("--exact", action="store_true",
                   help="float64 statistics with the Mehler series to 1e-10 (the reference path; about 2x the time "
                        "and memory of the default float32 statistics, which agree with it to the tolerance in "
                        "docs/derivation.md, 'Precision')")
    g.add_argument("--prune-coupled", action="store_true",
                   help="also prune coupled channels (residual streams, concat inputs, grouped-conv inputs), "
                        "rebuilt in every layer reading them; default: only the paper's conv-BN-act pairs")
    g = p.add_argument_group("budget (one at a time; instead of --prune-ratio)")
    for what, help_ in (("macs", "multiply-accumulates"), ("params", "parameters"),
                        ("bytes", "stored weight bytes")):
        g.add_argument(f"--target-{what}", type=_fraction, default=None, metavar="F",
                       help=f"keep at most the fraction F in (0, 1) of the original's {help_}: each layer's prune "
                            "ratio (and with --weight-bits auto its bits) is chosen to minimise the predicted error, "
                            "hedged against the predictor's uncertainty: the uniform ratio that meets the budget "
                            "unless a per-layer choice is predicted clearly better")
    g.add_argument("--bit-choices", type=_bit_list, default=None, metavar="LIST",
                   help="bit widths --weight-bits auto chooses from (default 8,6,4)")


def compress_kwargs(a) -> dict:
    ratio = a.prune_ratio
    if ratio is None:  # demo's default: 0.3 unless a budget chooses the ratios
        ratio = 0.0 if any(v is not None for v in (a.target_macs, a.target_params, a.target_bytes)) else 0.3
    return dict(prune_ratio=ratio, weight_bits=a.weight_bits, method=a.method, criterion=a.criterion,
                per_tensor=a.per_tensor, asymmetric=a.asymmetric, mse_clip=a.mse_clip, alpha1=a.alpha1,
                alpha2=a.alpha2, bias_correction=a.bias_correction, skip=a.skip, min_keep=a.min_keep,
                prune_coupled=a.prune_coupled, target_macs=a.target_macs, target_params=a.target_params,
                target_bytes=a.target_bytes, bit_choices=a.bit_choices, exact=a.exact)


def add_torch_input_options(p: argparse.ArgumentParser) -> None:
    """--torch-module / --input-shape: a PyTorch state_dict as the input model (see :func:`read_model`)."""
    g = p.add_argument_group("PyTorch input")
    g.add_argument("--torch-module", metavar="SPEC",
                   help="the module the input state_dict belongs to: 'package.module:Class' or 'file.py:factory'")
    g.add_argument("--input-shape", metavar="C,H,W", help="input shape the PyTorch module is captured for "
                                                         "(torch.export)")


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (optional; the default is data-free)")
    g.add_argument("--calibration", metavar="FILE.npz",
                   help="unlabeled images (array x, (N, C, H, W) float; other arrays are ignored): the pair "
                        "statistics are measured on them instead of the data model's, and the report shows the "
                        "data model's predicted error next to the measured one for every pair")
    g.add_argument("--calibration-mode", choices=("sequential", "oracle", "independent", "audit"),
                   default="sequential",
                   help="sequential (default): kept channels from the network compressed so far, every "
                        "compensation row fitted on all kept channels and each consumer refitted to the "
                        "original's output of it; oracle: the same statistics with the data-free solver (the "
                        "reference for auditing the data model); independent: each pair on the original "
                        "network; audit: compress data-free, measure on the images")


# ------------------------------------------------------------ reading/writing

def _bundled_files() -> tuple[str, str]:
    from .examples import example_data_path, example_model_path

    return example_model_path(), example_data_path()


def check_output(path, *inputs) -> str:
    """``atomic.check_output_path`` plus the CLI's rule: the bundled example
    model and data (inputs of ``udfc demo``) and anything in their directory
    are never written."""
    from .atomic import check_output_path
    from .errors import OptionError

    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:
        real = None  # not a path: check_output_path says so
    data_dir = os.path.dirname(os.path.realpath(_bundled_files()[0]))
    if real is not None and os.path.dirname(real) == data_dir:
        raise OptionError(f"output path {path!r} is in the directory of udfc-ref's bundled example files "
                          f"({data_dir}); package data is never overwritten: choose another directory")
    return check_output_path(path, inputs=inputs)


def read_model(path: str, torch_module=None, input_shape=None):
    """A udfc-ref file; a Keras .keras/.h5 file converted on the fly; or, with
    ``torch_module``, a PyTorch module (spec ``pkg.mod:attr``) whose weights are
    ``path`` (a state_dict in .safetensors/.pt/.pth).  Every input must be a
    regular file (a FIFO would block)."""
    from .atomic import check_input_file
    from .io import load

    check_input_file(path)
    if torch_module is not None:
        if input_shape is None:
            raise UDFCError("--torch-module needs --input-shape C,H,W")
        from converters import torch as ct  # noqa: PLC0415

        return ct.to_udfc(ct.load_module_spec(torch_module, weights=path), input_shape, progress=True)
    if path.lower().endswith(".pt2"):
        from converters.torch import refuse_pt2_input  # noqa: PLC0415

        raise refuse_pt2_input(path)
    if path.lower().endswith(KERAS_SUFFIXES):
        from converters import keras as ck  # noqa: PLC0415

        return ck.read(path, progress=True)
    if path.lower().endswith(TORCH_SUFFIXES):
        raise UDFCError(f"{path}: a PyTorch file needs its module: add --torch-module pkg.mod:Net --input-shape C,H,W")
    return load(path, writable=False)  # read-only map: compress gives the pages back as it goes


def write_model(model, path: str, input_path=None) -> None:
    """Save in the format the suffix of ``path`` names (:data:`OUTPUT_FORMATS`)."""
    from .errors import OptionError

    try:
        _, writer = output_format(path)
    except ValueError as e:
        raise OptionError(str(e)) from None
    check_output(path, input_path)
    writer(model, path, input_path=input_path)


# ------------------------------------------------------------------ commands

def cmd_info(a) -> int:
    m = read_model(a.model)
    print(f"model   {a.model}")
    print(f"input   {m.input_name} {tuple(m.input_shape)}  output {m.output_name} {m.shapes[m.output_name]}")
    print(f"{'layer':<28} {'op':<12} {'in':>6} {'out':>6} {'params':>10}  quant")
    for n in m.nodes:
        if n.op not in ("conv2d", "linear", "batch_norm"):
            continue
        shape_in = m.shapes[n.inputs[0]]
        shape_out = m.shapes[n.output]
        params = sum(m.tensors[t].size for t in n.params.values())
        q = m.quant.get(n.params.get("weight", ""))
        qs = "-" if q is None else f"{q.bits}-bit {'sym' if q.symmetric else 'asym'} " \
                                   f"{'per-channel' if q.per_channel else 'per-tensor'}"
        op = n.op if n.op != "conv2d" or n.attrs["groups"] == 1 else f"conv2d/g{n.attrs['groups']}"
        print(f"{n.name:<28} {op:<12} {shape_in[0]:>6} {shape_out[0]:>6} {params:>10,}  {qs}")
    print(f"parameters {m.param_count():,}   bytes {m.weight_bytes():,}   MACs {m.flops():,}")
    if m.record:
        r = m.record
        layers = r.get("layers")
        print(f"compressed: method={r.get('method')} prune_ratio={r.get('prune_ratio')} "
              f"weight_bits={r.get('weight_bits')} pruned layers={len(layers) if isinstance(layers, dict) else 0}"
              + (" prune_coupled=True" if r.get("prune_coupled") is True else ""))
        b = r.get("budget")
        if isinstance(b, dict):  # types checked when the file was read (io._check_record)
            print(f"budget: {b['target']} <= {100 * b['fraction']:.1f}% of the original, achieved "
                  f"{100 * b['achieved']:.2f}%")
    else:
        print("uncompressed")
    return 0


def cmd_eval(a) -> int:
    from .atomic import check_input_file
    from .evaluate import check_labels, load_npz, top1

    check_input_file(a.data)  # before the (possibly slow) model: a FIFO or a typo fails at once
    m = read_model(a.model)
    x, y = load_npz(a.data)
    n_classes = 1
    for d in m.shapes[m.output_name]:
        n_classes *= d
    check_labels(y, n_classes, where=f"{a.data}: 'y'")
    acc = top1(m, x, y, batch_size=a.batch_size, progress=True)
    print(f"top1={acc:.4f}")
    return 0


def cmd_compress(a) -> int:
    from . import compress

    check_output(a.output, a.input)
    if a.report:
        check_output(a.report, a.input, a.output)
    kw = compress_kwargs(a)
    if a.calibration:
        from .atomic import check_input_file
        from .calibrate import check_calibration, load_calibration

        check_input_file(a.calibration)  # before the (possibly slow) model: a FIFO or a typo fails at once
        kw.update(calibration=load_calibration(a.calibration), calibration_mode=a.calibration_mode)
    m = read_model(a.input, a.torch_module, a.input_shape)
    if a.calibration:
        from .evaldata import DataError

        check_calibration(m, kw["calibration"], f"{a.calibration}: array 'x'", DataError)
    small, rep = compress(m, progress=True, **kw)
    write_model(small, a.output, input_path=a.input)
    print(rep.format())
    print(f"wrote {a.output}")
    if a.report:
        from .atomic import write_bytes_atomic

        write_bytes_atomic(a.report, rep.to_json().encode())
        print(f"wrote {a.report}")
    return 0


def cmd_demo(a) -> int:
    from . import compress
    from .evaluate import top1
    from .examples import load_example, load_example_data

    if a.output:
        check_output(a.output)
    m = load_example()
    x, y = load_example_data()
    kw = compress_kwargs(a)
    t = time.perf_counter()
    base = top1(m, x, y)
    t_base = time.perf_counter() - t
    print(f"bundled example: digits CNN, {x.shape[0]} held-out 8x8 digits; "
          f"prune_ratio={kw['prune_ratio']} weight_bits={kw['weight_bits']}")
    rows = [("original", base, m.param_count(), m.weight_bytes(), m.flops(), 0.0, t_base)]
    # the requested method comes last, so ``small`` is its model after the loop
    methods = [kw["method"]] if a.only else [mm for mm in ("none", "nm", "udfc") if mm != kw["method"]] + [kw["method"]]
    for meth in methods:
        kw2 = dict(kw, method=meth)
        small, rep = compress(m, **kw2)
        t = time.perf_counter()
        acc = top1(small, x, y)
        rows.append((f"compressed ({meth})", acc, small.param_count(), small.weight_bytes(), small.flops(),
                     rep.seconds, time.perf_counter() - t))
    print(f"{'model':<22} {'top1':>7} {'params':>9} {'bytes':>9} {'MACs':>10} {'compress s':>11} {'eval s':>7}")
    for name, acc, p, b, f, tc, te in rows:
        print(f"{name:<22} {acc:>7.4f} {p:>9,} {b:>9,} {f:>10,} {tc:>11.3f} {te:>7.3f}")
    if a.output:
        write_model(small, a.output)
        print(f"wrote {a.output}")
    return 0


def cmd_sweep(a) -> int:
    from .progress import message
    from .sweep import format_rows, sweep

    rows = sweep(a.model, a.data, prune_ratios=a.prune_ratios, weight_bits=a.weight_bits, methods=a.methods,
                 criteria=a.criteria, per_tensor=a.per_tensor, asymmetric=a.asymmetric, mse_clip=a.mse_clip,
                 alpha1=a.alpha1, alpha2=a.alpha2, bias_correction=a.bias_correction, min_keep=a.min_keep,
                 skip=a.skip, out=a.out, plot=a.plot, scheduler=a.scheduler, workers=a.workers,
                 batch_size=a.batch_size, chunk_size=a.chunk_size, max_samples=a.max_samples, progress=True,
                 log=message)
    print(format_rows(rows))
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    failed = [r for r in rows if r["error"]]
    if failed:
        raise UDFCError(f"{len(failed)} of {len(rows)} cells failed (their rows in {a.out} hold the error; a rerun "
                        f"retries them); first: {failed[0]['error']}")
    return 0


def cmd_synthesize(a) -> int:
    import io as _io

    import numpy as np

    from .atomic import write_bytes_atomic
    from .calibrate import check_calibration, load_calibration
    from .synthetic import bn_mismatch, synthesize

    check_output(a.output, a.model)
    m = read_model(a.model, a.torch_module, a.input_shape)
    x = synthesize(m, n=a.n, steps=a.steps, lr=a.lr, batch=a.batch, seed=a.seed, threads=a.threads, progress=True)
    rows = bn_mismatch(m, x)
    print(f"{'BatchNorm':30s} {'mean mismatch':>14s} {'var mismatch':>13s}   (Eq. Z2, measured by the NumPy forward)")
    for r in rows:
        print(f"{r.node:30s} {r.mean:14.4f} {r.var:13.4f}")
    buf = _io.BytesIO()
    np.savez(buf, x=x)

    def verify(tmp):  # never write a file `udfc compress --calibration` cannot read back
        back = load_calibration(tmp)
        check_calibration(m, back, f"{a.output}: array 'x'")
        if not np.array_equal(np.asarray(back), x):
            raise UDFCError(f"{a.output}: the images read back differ from those written; nothing was written")

    write_bytes_atomic(a.output, buf.getvalue(), verify=verify)
    print(f"wrote {a.output} ({len(x)} images {tuple(x.shape[1:])}); use it with: udfc compress MODEL OUT "
          f"--calibration {a.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="udfc",
        description="udfc-ref: data-free channel pruning + weight quantization of CNNs (Unified Data-Free "
                    "Compression), NumPy reference implementation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    from . import __version__

    p.add_argument("--version", action="version", version=f"udfc-ref {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                           help="run 'udfc COMMAND --help' for its options")

    s = sub.add_parser("info", help="layers, channels, parameter count, size, quantization state",
                       description="Print a model's layers (channels in/out, parameters, quantization), its "
                                   "parameter count, stored bytes and MACs, and how it was compressed.")
    s.add_argument("model", help="udfc-ref .safetensors file (or a Keras .keras/.h5 file)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="top-1 accuracy on an .npz file (arrays x, y)",
                       description="Top-1 accuracy of a model on labelled data; prints one line top1=0.XXXX.")
    s.add_argument("model", help="udfc-ref .safetensors file (or a Keras .keras/.h5 file)")
    s.add_argument("--data", required=True, metavar="FILE.npz",
                   help=".npz (numpy.savez) with x (N, C, H, W) float and y (N,) int labels in [0, classes)")
    s.add_argument("--batch-size", type=_positive_int, default=256, metavar="N",
                   help="samples per forward pass (default 256; lower it to use less memory)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compress", help="prune and/or quantize a model without data",
                       description="Prune and/or quantize a model without data; the next layer of every pruned "
                                   "layer is rewritten to compensate (see docs/derivation.md). The output's "
                                   "suffix picks its format: " + supported_outputs() + ".",
                       epilog="examples:\n  udfc compress in.safetensors out.safetensors --prune-ratio 0.3 "
                              "--weight-bits 6 --method udfc --report report.json\n"
                              "  udfc compress model.keras small.keras --prune-ratio 0.3 --weight-bits 6\n"
                              "  udfc compress weights.pth small.pt2 --torch-module mynet.py:Net --input-shape 3,32,32 "
                              "--prune-ratio 0.3 --weight-bits 6",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("input", help="udfc-ref .safetensors file, a Keras .keras/.h5 file, or PyTorch weights "
                                 "(with --torch-module)")
    s.add_argument("output", type=_model_output,
                   help="where to write the compressed model (atomically; never the input); the suffix picks "
                        "the format: .safetensors udfc-ref, .keras Keras, .pt2 torch.export program")
    add_torch_input_options(s)
    add_compress_options(s)
    add_calibration_options(s)
    s.add_argument("--report", metavar="FILE.json", help="also write the report as JSON (atomically)")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("demo", help="compress the bundled digits example and print a before/after table",
                       description="Compress the bundled digits CNN with each method (none, nm, udfc) and print "
                                   "accuracy, parameters, bytes and MACs before and after. Defaults: "
                                   "--prune-ratio 0.3 --weight-bits 6.")
    add_compress_options(s)
    s.set_defaults(prune_ratio=None, weight_bits=6)  # None: 0.3, or 0 with a --target-* budget
    s.add_argument("--only", action="store_true", help="run only --method, not the baselines beside it")
    s.add_argument("--output", metavar="FILE", type=_model_output,
                   help="also save the model compressed with --method (suffix picks the format; never the "
                        "bundled files)")
    s.set_defaults(func=cmd_demo)

    from .sweep import suffix_type
    from .synthetic import BATCH, LR, N_IMAGES, STEPS

    s = sub.add_parser(
        "synthesize", help="synthetic calibration images matched to the model's BatchNorm statistics (no data)",
        description="Optimise images until every BatchNorm layer sees, on them, the mean and variance its running "
                    "statistics record (Eq. Z1, docs/derivation.md section 14; ZeroQ's distilled data). No data "
                    "is read: the images come from the weights and BN statistics alone. Use them as "
                    "'udfc compress --calibration FILE.npz' (the sequential mode then measures the pair "
                    "statistics on them). Needs PyTorch (pip install 'udfc-ref[torch]') for the gradient.",
        epilog="example:\n  udfc synthesize model.safetensors synthetic.npz --n 256\n"
               "  udfc compress model.safetensors small.safetensors --prune-ratio 0.5 --weight-bits 6 "
               "--calibration synthetic.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model", help="udfc-ref .safetensors file, a Keras .keras/.h5 file, or PyTorch weights "
                                 "(with --torch-module)")
    s.add_argument("output", type=suffix_type((".npz",)),
                   help="where to write the images (.npz with the array x, written atomically)")
    add_torch_input_options(s)
    g = s.add_argument_group("optimisation")
    g.add_argument("--n", type=_checked(int, lambda v: v >= 2, "an integer >= 2"), default=N_IMAGES, metavar="N",
                   help=f"number of images (default {N_IMAGES})")
    g.add_argument("--steps", type=_positive_int, default=STEPS, metavar="N",
                   help=f"Adam steps per batch (default {STEPS}); the table printed at the end shows how well "
                        "the statistics are matched")
    g.add_argument("--lr", type=_checked(float, lambda v: 0 < v < float("inf"), "a positive number"), default=LR,
                   metavar="X", help=f"Adam step size on the pixels (default {LR})")
    g.add_argument("--batch", type=_positive_int, default=BATCH, metavar="N",
                   help=f"images optimised together, each batch matching the statistics on its own (default {BATCH})")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="PyTorch threads (default: PyTorch's choice; 1 is often faster on a busy machine)")
    s.set_defaults(func=cmd_synthesize)

    from .compression import CRITERIA, METHODS
    from .sweep import PLOT_SUFFIXES, RESULT_SUFFIXES, list_of, one_of, parse_switch, suffix_type

    s = sub.add_parser(
        "sweep", help="the accuracy-compression grid: compress + evaluate every combination of options",
        description="Compress MODEL with every combination of the listed options (the grid) and measure each "
                    "result on the test set: top-1, parameters, weight bytes, MACs, the report's predicted error "
                    "(Eq. E2), seconds. One row per cell in --out; rows already there are not recomputed. Runs on "
                    "a local Dask cluster (default), an existing one (--scheduler) or sequentially (--workers 0). "
                    "See docs/sweep.md.",
        epilog="examples:\n  udfc sweep model.safetensors --data test.npz --out results.csv --plot results.png\n"
               "  udfc sweep model.safetensors --data test.npz --prune-ratios 0,0.3,0.5 --weight-bits none,6,4 "
               "--methods nm,udfc --bias-correction both --out results.csv\n"
               "  udfc sweep model.safetensors --data /shared/test.npz --scheduler tcp://10.0.0.5:8786 "
               "--out results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model", help="udfc-ref .safetensors file (or .keras/.h5, converted on the fly)")
    s.add_argument("--data", required=True, metavar="TEST",
                   help="test set: .npz with x (N, C, H, W) float and y (N,) int, or a directory with x.npy and "
                        "y.npy; memory-mapped (store the .npz uncompressed, np.savez, for data larger than memory)")
    g = s.add_argument_group("grid (comma-separated lists; the grid is their product)")
    g.add_argument("--prune-ratios", type=list_of(_ratio), default=[0.0, 0.1, 0.3, 0.5], metavar="LIST",
                   help="fractions in [0, 1) of channels removed (default 0,0.1,0.3,0.5)")
    g.add_argument("--weight-bits", type=list_of(_bits), default=[None, 8, 6, 4], metavar="LIST",
                   help="weight bits, 2..8 or 16, 'none' for float (default none,8,6,4)")
    g.add_argument("--methods", type=list_of(one_of(METHODS)), default=["none", "nm", "udfc"], metavar="LIST",
                   help="compensation methods among udfc, nm, none (default none,nm,udfc)")
    g.add_argument("--criteria", type=list_of(one_of(CRITERIA)), default=["l1"], metavar="LIST",
                   help="channel scores among l1, l2, l1-bn, l2-bn (default l1)")
    for flag, what in (("--bias-correction", "DFQ bias correction"), ("--per-tensor", "one scale per tensor"),
                       ("--asymmetric", "asymmetric quantization"), ("--mse-clip", "MSE clipping search")):
        g.add_argument(flag, type=parse_switch, default=[False], metavar="{off,on,both}",
                       help=f"{what}: off (default), on, or both (two cells)")
    g.add_argument("--alpha1", type=list_of(_nonnegative), default=[0.01], metavar="LIST",
                   help="UDFC ridge weights of the pruning solve (default 0.01)")
    g.add_argument("--alpha2", type=list_of(_nonnegative), default=[0.008], metavar="LIST",
                   help="UDFC weights pulling quantization rescales to 1 (default 0.008)")
    g.add_argument("--min-keep", type=list_of(_positive_int), default=[1], metavar="LIST",
                   help="channels every pruned layer keeps at least (default 1)")
    g.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers every cell leaves untouched")
    g = s.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="FILE", type=suffix_type(RESULT_SUFFIXES),
                   help="results, .csv or .json (by suffix), one row per cell, rewritten atomically as cells "
                        "finish; rows already in it are not recomputed (failed ones are retried)")
    g.add_argument("--plot", metavar="FILE", type=suffix_type(PLOT_SUFFIXES),
                   help="also plot top-1 against bytes and MACs (.png, .pdf, .svg; needs matplotlib)")
    g = s.add_argument_group("execution")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing Dask cluster (e.g. tcp://host:8786); its workers must see --data at "
                        "the same path")
    x.add_argument("--workers", type=_checked(int, lambda v: v >= 0, "an integer >= 0"), metavar="N",
                   help="local Dask cluster of N worker processes (default: one per core); 0 runs sequentially "
                        "in this process, without Dask")
    g.add_argument("--batch-size", type=_positive_int, default=256, metavar="N",
                   help="samples per forward pass (default 256)")
    g.add_argument("--chunk-size", type=_positive_int, metavar="N",
                   help="samples per evaluation task, a multiple of --batch-size (default: automatic)")
    g.add_argument("--max-samples", type=_positive_int, metavar="N", help="evaluate on the first N samples only")
    s.set_defaults(func=cmd_sweep)

    try:
        from converters import cli as ccli
    except ImportError:
        ccli = None
    if ccli is not None and hasattr(ccli, "add_subcommands"):
        ccli.add_subcommands(sub)
    return p


# ------------------------------------------------------------------ running

class Terminated(BaseException):
    """SIGTERM arrived.  Raised by the CLI's handler so the work unwinds like
    Ctrl-C does: temp files are removed, outputs stay as they were."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Every warning as one ``udfc: warning: ...`` line (no source line)."""
    from .progress import message as progress_message

    text = " ".join(str(message).split())
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    progress_message(f"udfc: warning: {text}", file)


def _fail(text: str) -> None:
    from .progress import abort_all

    abort_all()  # an error after a second of work: the bar is erased, not left behind
    print(f"udfc: error: {' '.join(text.split())}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "command", None):
        parser.print_help()
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_terminated)
        with warnings.catch_warnings():
            if not a.debug:
                warnings.showwarning = _show_warning
            return int(a.func(a) or 0)
    except UDFCError as e:
        if a.debug:
            traceback.print_exc()
        _fail(str(e))
        return 1
    except MemoryError:
        if a.debug:
            traceback.print_exc()
        _fail("out of memory (the model or data is too large for this machine)")
        return 1
    except BrokenPipeError:
        # stdout closed early (`udfc info m | head -1`): stop quietly, as a killed pipe writer would
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); no partial output was left")
        return 130
    except Terminated:
        _fail("terminated (SIGTERM); no partial output was left")
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
