"""The ``udfc`` command line.

Exit status: 0 success, 1 a UDFCError (one line on stderr; ``--debug`` shows
the traceback), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from .errors import UDFCError

EPILOG = """examples:
  udfc demo                                   compress the bundled digits CNN, before/after table
  udfc info model.safetensors                 layers, channels, parameters, bytes
  udfc compress in.safetensors out.safetensors --prune-ratio 0.3 --weight-bits 6 --method udfc
  udfc eval out.safetensors --data test.npz   top-1 accuracy (arrays x: N,C,H,W float; y: N int)
  udfc import keras model.keras model.safetensors
  udfc compress model.keras small.keras --prune-ratio 0.3 --weight-bits 6              Keras in, Keras out
  udfc compress weights.pth small.pt --torch-module mynet.py:Net --input-shape 3,32,32 \
       --prune-ratio 0.3 --weight-bits 6                                               PyTorch in, TorchScript out
"""


def _ratio(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def _bits(s: str):
    if s.lower() in ("none", "float", "32"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an int (2..8 or 16) or 'none', got {s!r}") from None


def add_compress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--prune-ratio", type=_ratio, default=0.0, metavar="R",
                   help="fraction in [0, 1) of the output channels of every compressible layer to remove "
                        "(default 0: no pruning)")
    g.add_argument("--weight-bits", type=_bits, default=None, metavar="B",
                   help="quantize weights to B bits (2..8 or 16); absent or 'none': float weights")
    g.add_argument("--method", choices=("udfc", "nm", "none"), default="udfc",
                   help="compensation: udfc (closed form, default), nm (Neuron Merging), none (drop/round only)")
    g.add_argument("--criterion", choices=("l1", "l2", "l1-bn", "l2-bn"), default="l1",
                   help="channel score: filter L1/L2 norm, optionally times |gamma|/sigma of the BN (default l1)")
    g.add_argument("--per-tensor", action="store_true", help="one quantization scale per tensor (default per channel)")
    g.add_argument("--asymmetric", action="store_true", help="asymmetric (zero point) quantization (default symmetric)")
    g.add_argument("--mse-clip", action="store_true", help="search the clipping range minimising the weight MSE")
    g.add_argument("--alpha1", type=float, default=0.01, help="UDFC ridge weight of the pruning solve (default 0.01)")
    g.add_argument("--alpha2", type=float, default=0.008,
                   help="UDFC weight pulling quantization rescales to 1 (default 0.008)")
    g.add_argument("--bias-correction", action="store_true",
                   help="remove the expected output shift of each quantized layer (DFQ-style)")
    g.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers left untouched")
    g.add_argument("--min-keep", type=int, default=1, help="channels every pruned layer keeps at least (default 1)")


def compress_kwargs(a) -> dict:
    return dict(prune_ratio=a.prune_ratio, weight_bits=a.weight_bits, method=a.method, criterion=a.criterion,
                per_tensor=a.per_tensor, asymmetric=a.asymmetric, mse_clip=a.mse_clip, alpha1=a.alpha1,
                alpha2=a.alpha2, bias_correction=a.bias_correction, skip=a.skip, min_keep=a.min_keep)


def read_model(path: str, torch_module=None, input_shape=None):
    """A udfc-ref file; a Keras .keras/.h5 file converted on the fly; or, with
    ``torch_module``, a PyTorch module (spec ``pkg.mod:attr``) whose weights are
    ``path`` (a state_dict in .safetensors/.pt/.pth)."""
    from .io import load

    if torch_module is not None:
        if input_shape is None:
            raise UDFCError("--torch-module needs --input-shape C,H,W")
        from converters import torch as ct  # noqa: PLC0415

        return ct.to_udfc(ct.load_module_spec(torch_module, weights=path), input_shape)
    if path.endswith((".keras", ".h5", ".hdf5")):
        from converters import keras as ck  # noqa: PLC0415

        return ck.read(path)
    if path.endswith((".pt", ".pth")):
        raise UDFCError(f"{path}: a PyTorch file needs its module: add --torch-module pkg.mod:Net --input-shape C,H,W")
    return load(path)


def write_model(model, path: str, input_path=None) -> None:
    """Save as udfc-ref (.safetensors, default), Keras (.keras) or TorchScript (.pt/.pth)."""
    from .atomic import check_output_path
    from .io import save

    check_output_path(path, inputs=(input_path,))
    if path.endswith(".keras"):
        from converters import keras as ck  # noqa: PLC0415

        ck.save_keras(model, path)
    elif path.endswith((".pt", ".pth")):
        from converters import torch as ct  # noqa: PLC0415

        ct.save_torchscript(model, path)
    else:
        save(model, path, input_path=input_path)


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
        print(f"compressed: method={r.get('method')} prune_ratio={r.get('prune_ratio')} "
              f"weight_bits={r.get('weight_bits')} pruned layers={len(r.get('layers', {}))}")
    else:
        print("uncompressed")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import load_npz, top1

    m = read_model(a.model)
    x, y = load_npz(a.data)
    acc = top1(m, x, y, batch_size=a.batch_size, progress=True)
    print(f"top1={acc:.4f}")
    return 0


def cmd_compress(a) -> int:
    from . import compress
    from .atomic import check_output_path

    check_output_path(a.output, inputs=(a.input,))
    if a.report:
        check_output_path(a.report, inputs=(a.input, a.output))
    m = read_model(a.input, a.torch_module, a.input_shape)
    small, rep = compress(m, progress=True, **compress_kwargs(a))
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
        from .atomic import check_output_path

        check_output_path(a.output)
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
        from .io import save

        save(small, a.output)
        print(f"wrote {a.output}")
    return 0


def cmd_sweep(a) -> int:
    from .sweep import format_rows, sweep

    def note(msg):
        print(msg, file=sys.stderr)

    rows = sweep(a.model, a.data, prune_ratios=a.prune_ratios, weight_bits=a.weight_bits, methods=a.methods,
                 criteria=a.criteria, per_tensor=a.per_tensor, asymmetric=a.asymmetric, mse_clip=a.mse_clip,
                 alpha1=a.alpha1, alpha2=a.alpha2, bias_correction=a.bias_correction, min_keep=a.min_keep,
                 skip=a.skip, out=a.out, plot=a.plot, scheduler=a.scheduler, workers=a.workers,
                 batch_size=a.batch_size, chunk_size=a.chunk_size, max_samples=a.max_samples, progress=True,
                 log=note)
    print(format_rows(rows))
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    failed = [r for r in rows if r["error"]]
    if failed:
        raise UDFCError(f"{len(failed)} of {len(rows)} cells failed (their rows in {a.out} hold the error; a rerun "
                        f"retries them); first: {failed[0]['error']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udfc",
        description="udfc-ref: data-free channel pruning + weight quantization of CNNs (Unified Data-Free "
                    "Compression), NumPy reference implementation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    from . import __version__

    p.add_argument("--version", action="version", version=f"udfc-ref {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="layers, channels, parameter count, size, quantization state")
    s.add_argument("model", help="udfc-ref .safetensors file (or .keras/.h5)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="top-1 accuracy on an .npz file (arrays x, y)")
    s.add_argument("model")
    s.add_argument("--data", required=True, help=".npz with x (N, C, H, W) float32 and y (N,) int labels")
    s.add_argument("--batch-size", type=int, default=256)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compress", help="prune and/or quantize a model without data",
                       description="Prune and/or quantize a model without data; the next layer of every pruned "
                                   "layer is rewritten to compensate (see docs/derivation.md).",
                       epilog="examples:\n  udfc compress in.safetensors out.safetensors --prune-ratio 0.3 "
                              "--weight-bits 6 --method udfc --report report.json\n"
                              "  udfc compress model.keras small.keras --prune-ratio 0.3 --weight-bits 6\n"
                              "  udfc compress weights.pth small.pt --torch-module mynet.py:Net --input-shape 3,32,32 "
                              "--prune-ratio 0.3 --weight-bits 6",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("input", help="udfc-ref .safetensors file, a Keras .keras/.h5 file, or PyTorch weights "
                                 "(with --torch-module)")
    s.add_argument("output", help="where to write the compressed model (atomically; never the input): "
                                  ".safetensors udfc-ref file, .keras Keras model, or .pt/.pth TorchScript")
    g = s.add_argument_group("PyTorch input")
    g.add_argument("--torch-module", metavar="SPEC",
                   help="the module the input state_dict belongs to: 'package.module:Class' or 'file.py:factory'")
    g.add_argument("--input-shape", metavar="C,H,W", help="input shape for tracing the PyTorch module")
    add_compress_options(s)
    s.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("demo", help="compress the bundled digits example and print a before/after table")
    add_compress_options(s)
    s.set_defaults(prune_ratio=0.3, weight_bits=6)
    s.add_argument("--only", action="store_true", help="run only --method, not the baselines beside it")
    s.add_argument("--output", metavar="FILE", help="also save the compressed example")
    s.set_defaults(func=cmd_demo)

    from .sweep import parse_bits, parse_floats, parse_ints, parse_switch, parse_words

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
    g.add_argument("--prune-ratios", type=parse_floats, default=[0.0, 0.1, 0.3, 0.5], metavar="LIST",
                   help="fractions in [0, 1) of channels removed (default 0,0.1,0.3,0.5)")
    g.add_argument("--weight-bits", type=parse_bits, default=[None, 8, 6, 4], metavar="LIST",
                   help="weight bits, 2..8 or 16, 'none' for float (default none,8,6,4)")
    g.add_argument("--methods", type=parse_words, default=["none", "nm", "udfc"], metavar="LIST",
                   help="compensation methods among udfc, nm, none (default none,nm,udfc)")
    g.add_argument("--criteria", type=parse_words, default=["l1"], metavar="LIST",
                   help="channel scores among l1, l2, l1-bn, l2-bn (default l1)")
    for flag, what in (("--bias-correction", "DFQ bias correction"), ("--per-tensor", "one scale per tensor"),
                       ("--asymmetric", "asymmetric quantization"), ("--mse-clip", "MSE clipping search")):
        g.add_argument(flag, type=parse_switch, default=[False], metavar="{off,on,both}",
                       help=f"{what}: off (default), on, or both (two cells)")
    g.add_argument("--alpha1", type=parse_floats, default=[0.01], metavar="LIST",
                   help="UDFC ridge weights of the pruning solve (default 0.01)")
    g.add_argument("--alpha2", type=parse_floats, default=[0.008], metavar="LIST",
                   help="UDFC weights pulling quantization rescales to 1 (default 0.008)")
    g.add_argument("--min-keep", type=parse_ints, default=[1], metavar="LIST",
                   help="channels every pruned layer keeps at least (default 1)")
    g.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers every cell leaves untouched")
    g = s.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="FILE",
                   help="results, .csv or .json (by suffix), one row per cell, rewritten atomically as cells "
                        "finish; rows already in it are not recomputed (failed ones are retried)")
    g.add_argument("--plot", metavar="FILE", help="also plot top-1 against bytes and MACs (.png, .pdf, .svg; "
                                                  "needs matplotlib)")
    g = s.add_argument_group("execution")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing Dask cluster (e.g. tcp://host:8786); its workers must see --data at "
                        "the same path")
    x.add_argument("--workers", type=int, metavar="N",
                   help="local Dask cluster of N worker processes (default: one per core); 0 runs sequentially "
                        "in this process, without Dask")
    g.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default 256)")
    g.add_argument("--chunk-size", type=int, metavar="N",
                   help="samples per evaluation task, a multiple of --batch-size (default: automatic)")
    g.add_argument("--max-samples", type=int, metavar="N", help="evaluate on the first N samples only")
    s.set_defaults(func=cmd_sweep)

    try:
        from converters import cli as ccli
    except ImportError:
        ccli = None
    if ccli is not None and hasattr(ccli, "add_subcommands"):
        ccli.add_subcommands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "command", None):
        parser.print_help()
        return 2
    try:
        return int(a.func(a) or 0)
    except UDFCError as e:
        if a.debug:
            traceback.print_exc()
        msg = str(e).replace("\n", " ")
        print(f"udfc: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("udfc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
