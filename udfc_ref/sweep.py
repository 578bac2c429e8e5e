"""``sweep``: the accuracy-compression grid of one model on one test set.

Every *cell* of the grid is one call of :func:`udfc_ref.compress` with one
combination of options (prune ratio x weight bits x method x ...) followed by
top-1 on the test set.  A cell's row holds the options that made it, top-1,
the compressed model's parameters / weight bytes / MACs, the report's
data-model errors (Eq. E2: mean over pairs before and after compensation,
and the worst pair after) and the seconds spent.

Backends (``docs/sweep.md``):

* sequential (``workers=0``): everything in this process, NumPy only;
* Dask (``dask.distributed``, the optional extra ``dask``): a ``LocalCluster``
  on this machine's cores by default, or an existing cluster (``scheduler``).
  The model file's bytes are scattered once; each cell is a *compress* task,
  then one *evaluate* task per chunk of the test set, then a *reduce* task,
  so a grid of 4 cells can still keep 40 workers busy.  Workers read the test
  set from its path (which they must see), memory-mapped
  (``udfc_ref.evaldata``), one batch at a time.

Both backends read the same batches ``[k * batch_size, (k + 1) * batch_size)``
(chunks are whole numbers of batches), so they give identical numbers.

Resume: each row carries a ``key`` (hash of the cell's options, the model
file's SHA-256, the test set's fingerprint and the number of samples); a
cell whose key is already in ``out`` without an error is not recomputed.
``out`` is rewritten whole and atomically (temp file + fsync + rename) after
a finished cell, at most once a second, and always at the end or on an
interruption; a killed sweep loses at most the last second's cells.

Dask is imported only inside the functions that use it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict

import numpy as np

from .errors import FormatError, OptionError, UDFCError
from .evaldata import DataError, open_cached, open_data, read_batch
from .evaldata import fingerprint as data_fingerprint
from .progress import Progress

#: the compress options a cell is made of, in the order the grid is enumerated
#: (the last one varies fastest; ``skip`` is the same for every cell)
OPTION_FIELDS = ("prune_ratio", "weight_bits", "method", "criterion", "per_tensor", "asymmetric", "mse_clip",
                 "alpha1", "alpha2", "bias_correction", "min_keep", "skip")
#: the measured numbers of a cell
RESULT_FIELDS = ("top1", "correct", "params", "bytes", "macs", "params_before", "bytes_before", "macs_before",
                 "mean_err_before", "mean_err_after", "max_err_after", "compress_seconds", "eval_seconds",
                 "seconds", "error")
#: the columns of a result file, in order
FIELDS = ("model", "data", "n_test") + OPTION_FIELDS + RESULT_FIELDS + ("model_sha256", "data_hash", "key")
#: suffixes of a result file / a plot
RESULT_SUFFIXES = (".csv", ".json")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: columns that differ between two runs of the same cell (wall-clock time)
TIMING_FIELDS = ("compress_seconds", "eval_seconds", "seconds")
DASK_EXTRA = "pip install 'udfc-ref[dask]'"
#: seconds to wait for a scheduler to answer / for its first worker
CONNECT_TIMEOUT = 10

_INT = ("n_test", "correct", "params", "bytes", "macs", "params_before", "bytes_before", "macs_before", "min_keep")
_FLOAT = ("prune_ratio", "alpha1", "alpha2", "top1", "mean_err_before", "mean_err_after", "max_err_after",
          "compress_seconds", "eval_seconds", "seconds")
_BOOL = ("per_tensor", "asymmetric", "mse_clip", "bias_correction")


# ----------------------------------------------------------------------------- the grid

def _as_list(v) -> list:
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def grid(prune_ratios=(0.0,), weight_bits=(None,), methods=("udfc",), criteria=("l1",), per_tensor=(False,),
         asymmetric=(False,), mse_clip=(False,), alpha1=(0.01,), alpha2=(0.008,), bias_correction=(False,),
         min_keep=(1,), skip=()) -> list[dict]:
    """The cells of a grid: the product of the option lists, in
    :data:`OPTION_FIELDS` order (``bias_correction`` and ``min_keep`` vary
    fastest).  Each argument is a value or a list of values; duplicates
    are dropped.

    Returns
    -------
    list of dict
        ``compress`` keyword arguments, one dict per cell.
    """
    axes = [_as_list(prune_ratios), _as_list(weight_bits), _as_list(methods), _as_list(criteria),
            _as_list(per_tensor), _as_list(asymmetric), _as_list(mse_clip), _as_list(alpha1), _as_list(alpha2),
            _as_list(bias_correction), _as_list(min_keep)]
    for name, ax in zip(OPTION_FIELDS, axes):
        if not ax:
            raise OptionError(f"sweep: the list of {name} values is empty")
    skip = sorted(str(s) for s in _as_list(skip) if s is not None) if skip else []
    cells, seen = [], set()
    for combo in itertools.product(*axes):
        cell = {k: _norm(k, v) for k, v in zip(OPTION_FIELDS, combo)}
        cell["skip"] = list(skip)
        ident = json.dumps(cell, sort_keys=True, default=repr)
        if ident not in seen:
            seen.add(ident)
            cells.append(cell)
    return cells


def _norm(name, v):
    """Canonical value of one option (0 and 0.0 are the same cell); values of
    the wrong kind are passed through for ``compress`` to reject by name."""
    if name in ("prune_ratio", "alpha1", "alpha2") and isinstance(v, (int, float, np.floating, np.integer)) \
            and not isinstance(v, bool):
        return float(v)
    if name in ("weight_bits", "min_keep") and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if name in _BOOL and isinstance(v, (bool, np.bool_)):
        return bool(v)
    return v


def cell_key(options: dict, model_sha256: str, data_hash: str, n_test: int) -> str:
    """The resume key of a cell: a hash of everything that determines its numbers."""
    payload = json.dumps({"model_sha256": model_sha256, "data_hash": data_hash, "n_test": int(n_test),
                          "options": {k: options[k] for k in OPTION_FIELDS}}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _check_cells(model, cells) -> None:
    """Validate every cell's options against the model before any work
    (the checks ``compress`` itself starts with)."""
    from .compression import _check_options

    for c in cells:
        _check_options(model, c["prune_ratio"], c["weight_bits"], c["method"], c["criterion"], c["alpha1"],
                       c["alpha2"], c["skip"], c["min_keep"])
        for k in _BOOL:
            if not isinstance(c[k], bool):
                raise OptionError(f"{k} must be True or False, got {c[k]!r}")


# ----------------------------------------------------------------------------- one cell

def _compress_model(model, options):
    """``compress(model, **options)`` (a seam: tests replace it to inject a failure)."""
    from .compression import compress

    return compress(model, **options)


def _compress_info(model, options) -> tuple:
    """Compress one cell; return the model and the numbers of its report."""
    small, rep = _compress_model(model, options)
    eb = [r.error_before for r in rep.layers if r.error_before is not None]
    ea = [r.error_after for r in rep.layers if r.error_after is not None]
    info = {"params": rep.params_after, "bytes": rep.bytes_after, "macs": rep.flops_after,
            "params_before": rep.params_before, "bytes_before": rep.bytes_before, "macs_before": rep.flops_before,
            "mean_err_before": float(np.mean(eb)) if eb else None,
            "mean_err_after": float(np.mean(ea)) if ea else None,
            "max_err_after": float(np.max(ea)) if ea else None,
            "compress_seconds": float(rep.seconds)}
    return small, info


def count_correct(model, data, start: int, stop: int, batch_size: int) -> int:
    """Number of samples ``start:stop`` of ``data`` (an :class:`EvalData`)
    whose arg-max output equals the label, read ``batch_size`` at a time
    (``start`` must be a multiple of ``batch_size`` for the batches to be the
    same whatever the chunking)."""
    correct = 0
    for i in range(start, stop, batch_size):
        x, y = read_batch(data, i, min(i + batch_size, stop))
        out = model.forward(x)
        correct += int((out.reshape(out.shape[0], -1).argmax(1) == y).sum())
    return correct


def _error_text(e: BaseException, where: str = "") -> str:
    msg = " ".join(str(e).split())
    return f"{where}{type(e).__name__}: {msg}" if msg else f"{where}{type(e).__name__}"


# ---------------------------------------------------------------------- Dask tasks (run on workers)

_MODELS: OrderedDict = OrderedDict()
_MODELS_LOCK = threading.Lock()


def _model_from_bytes(blob: bytes, sha: str):
    """Parse a udfc-ref file held in memory (``io.load`` reads a path, so the
    bytes go through a private temp file); cached per process by SHA-256."""
    with _MODELS_LOCK:
        if sha in _MODELS:
            _MODELS.move_to_end(sha)
            return _MODELS[sha]
    from .io import load

    fd, tmp = tempfile.mkstemp(prefix="udfc-sweep-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the client has shown the file's warnings already
            model = load(tmp)
    finally:
        os.unlink(tmp)
    with _MODELS_LOCK:
        _MODELS[sha] = model
        while len(_MODELS) > 4:
            _MODELS.popitem(last=False)
    return model


def _describe(d, n_classes: int) -> dict:
    """Size, sample shape and fingerprint of an opened test set, whose
    labels are checked against the model's ``n_classes`` outputs."""
    from .evaluate import check_labels

    try:
        check_labels(d.y, n_classes, where=f"{d.path}: 'y'")
    except UDFCError as e:
        raise DataError(str(e)) from None
    return {"n": d.n, "sample_shape": list(d.sample_shape), "sample_bytes": d.sample_bytes, "mapped": d.mapped,
            "data_hash": data_fingerprint(d.path)}


def _task_describe(path: str, n_classes: int) -> dict:
    """:func:`_describe` where the workers see the test set."""
    return _describe(open_data(path), n_classes)


def _task_compress(model_blob: bytes, model_sha: str, options: dict) -> dict:
    from .io import to_bytes

    try:
        model = _model_from_bytes(model_blob, model_sha)
        small, info = _compress_info(model, options)
        blob = to_bytes(small)
    except Exception as e:  # a failing cell is a row with its error
        return {"error": _error_text(e)}
    return {"info": info, "model": blob, "sha": hashlib.sha256(blob).hexdigest()}


def _task_eval(compressed: dict, data_path: str, start: int, stop: int, batch_size: int) -> dict | None:
    if "error" in compressed:
        return None
    t = time.perf_counter()
    try:
        model = _model_from_bytes(compressed["model"], compressed["sha"])
        correct = count_correct(model, open_cached(data_path), start, stop, batch_size)
    except DataError:
        raise  # not the cell's fault: stops the sweep
    except Exception as e:
        return {"error": _error_text(e, "evaluation: ")}
    return {"correct": correct, "seconds": time.perf_counter() - t}


def _task_reduce(compressed: dict, evals: list) -> dict:
    if "error" in compressed:
        return {"error": compressed["error"]}
    for e in evals:
        if "error" in e:
            return {"error": e["error"]}
    return {"info": compressed["info"], "correct": sum(e["correct"] for e in evals),
            "eval_seconds": sum(e["seconds"] for e in evals)}


# ----------------------------------------------------------------------------- backends

def _run_sequential(model, data, n_test, batch_size, todo, emit) -> None:
    for cell in todo:
        try:
            small, info = _compress_info(model, cell["options"])
        except Exception as e:
            emit(cell, {"error": _error_text(e)})
            continue
        t = time.perf_counter()
        try:
            correct = count_correct(small, data, 0, n_test, batch_size)
        except DataError:
            raise
        except Exception as e:
            emit(cell, {"error": _error_text(e, "evaluation: ")})
            continue
        emit(cell, {"info": info, "correct": correct, "eval_seconds": time.perf_counter() - t})


def _import_distributed():
    try:
        import distributed  # noqa: PLC0415
    except ImportError:
        raise OptionError(f"the Dask backend needs the optional extra 'dask' ({DASK_EXTRA}); without it run the "
                          "sequential mode (workers=0, --workers 0)") from None
    return distributed


@contextlib.contextmanager
def dask_client(scheduler=None, workers=None):
    """A ``distributed.Client`` for several sweeps on one cluster::

        with dask_client(workers=4) as c:
            for path in models:
                sweep(path, data, scheduler=c, ...)

    ``scheduler``: address of an existing cluster; otherwise a LocalCluster
    of ``workers`` processes (default one per core), closed on exit."""
    if scheduler is not None and workers is not None:
        raise OptionError("give either scheduler (an existing cluster) or workers (a local one), not both")
    with contextlib.ExitStack() as stack:
        yield _open_client(scheduler, workers, stack)


def _open_client(scheduler, workers, stack):
    """A ``distributed.Client``: the one given, one connected to the address
    ``scheduler``, or a new LocalCluster of ``workers`` processes (one thread
    each; default: this machine's cores).  Closed by ``stack``."""
    distributed = _import_distributed()
    if isinstance(scheduler, distributed.Client):
        return scheduler
    import logging

    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            raise OptionError(f"cannot connect to the Dask scheduler at {scheduler!r} ({e})") from None
        stack.callback(client.close)
    else:
        n = workers or os.cpu_count() or 1
        try:
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=logging.ERROR)
        except Exception as e:  # e.g. worker processes that cannot start (spawned from an unimportable __main__)
            raise UDFCError(f"cannot start a local Dask cluster of {n} workers ({_error_text(e)}); "
                            "--workers 0 runs without Dask") from e
        stack.callback(cluster.close)
        client = distributed.Client(cluster)
        stack.callback(client.close)
    try:
        client.wait_for_workers(1, timeout=6 * CONNECT_TIMEOUT)
    except (TimeoutError, OSError) as e:
        raise OptionError(f"no Dask worker joined the scheduler at {scheduler!r} within {6 * CONNECT_TIMEOUT} s "
                          f"({e})") from None
    return client


def _describe_on(client, path, n_classes) -> dict:
    return client.submit(_task_describe, path, n_classes, pure=False).result()


def _run_dask(client, model_blob, model_sha, data_path, n_test, batch_size, chunk_size, todo, emit) -> None:
    """Submit compress -> evaluate-per-chunk -> reduce per cell, at most
    ``max(4, 2 x slots)`` cells in flight (bounds the compressed models held by
    the workers), and emit each cell's result as it finishes."""
    distributed = _import_distributed()
    slots = max(sum(client.nthreads().values()), 1)
    chunks = [(i, min(i + chunk_size, n_test)) for i in range(0, n_test, chunk_size)]
    model_f = client.scatter(model_blob, hash=False)  # the model file travels once; workers share it peer to peer
    inflight = {}
    ac = distributed.as_completed()
    cells = iter(todo)

    def submit(cell):
        cf = client.submit(_task_compress, model_f, model_sha, cell["options"], pure=False)
        efs = [client.submit(_task_eval, cf, data_path, a, b, batch_size, pure=False) for a, b in chunks]
        rf = client.submit(_task_reduce, cf, efs, pure=False)
        inflight[rf.key] = (cell, rf)
        ac.add(rf)

    try:
        for cell in itertools.islice(cells, max(4, 2 * slots)):
            submit(cell)
        for rf in ac:
            cell, _ = inflight.pop(rf.key)
            try:
                res = rf.result()
            except DataError:
                raise
            except Exception as e:  # e.g. a worker killed by this cell (out of memory)
                res = {"error": _error_text(e)}
            emit(cell, res)
            nxt = next(cells, None)
            if nxt is not None:
                submit(nxt)
    finally:
        if inflight:
            client.cancel([f for _, f in inflight.values()])
        del model_f


# ----------------------------------------------------------------------------- result files

def _fmt(name, v) -> str:
    if name == "weight_bits":
        return "none" if v is None else str(v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if name == "skip":
        return json.dumps(list(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _parse(name, s: str):
    if name == "weight_bits":
        return None if s in ("none", "") else int(s)
    if s == "" and name not in ("model", "data", "method", "criterion"):
        return None
    if name in _INT:
        return int(s)
    if name in _FLOAT:
        return float(s)
    if name in _BOOL:
        if s.lower() not in ("true", "false"):
            raise ValueError(f"not true/false: {s!r}")
        return s.lower() == "true"
    if name == "skip":
        v = json.loads(s)
        if not isinstance(v, list):
            raise ValueError("skip is not a JSON list")
        return v
    return s


def read_rows(path) -> list[dict]:
    """The rows of a result file (``.csv`` or ``.json``) written by :func:`sweep`.

    Raises
    ------
    OptionError
        The file exists but is not a sweep result (it is never overwritten).
    """
    path = os.fspath(path)
    hint = "; it is never overwritten: choose another output"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{path}: cannot read the existing results ({e}){hint}") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text) if text.strip() else []
        except ValueError as e:
            raise OptionError(f"{path}: not a sweep result file ({e}){hint}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("key"), str) for r in rows):
            raise OptionError(f"{path}: not a sweep result file (a JSON list of rows with a 'key'){hint}")
        return [{k: r.get(k) for k in FIELDS} for r in rows]
    reader = csv.DictReader(io.StringIO(text))
    if text.strip() and (reader.fieldnames is None or "key" not in reader.fieldnames):
        raise OptionError(f"{path}: not a sweep result file (no 'key' column){hint}")
    rows = []
    for i, r in enumerate(reader, start=2):
        try:
            rows.append({k: _parse(k, r.get(k) or "") for k in FIELDS})
        except (ValueError, TypeError) as e:
            raise OptionError(f"{path}: line {i}: unreadable value ({e}){hint}") from None
    return rows


def rows_bytes(rows, path) -> bytes:
    """A result file's bytes: CSV, or JSON when ``path`` ends in ``.json``."""
    if os.fspath(path).endswith(".json"):
        return (json.dumps([{k: r.get(k) for k in FIELDS} for r in rows], indent=1) + "\n").encode()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([_fmt(k, r.get(k)) for k in FIELDS])
    return buf.getvalue().encode()


# ----------------------------------------------------------------------------- plot

def plot_rows(rows, path, title: str = "") -> None:
    """Top-1 against weight bytes (left) and MACs (right): every cell a dot,
    one line per method through its best cells (those more accurate than
    every smaller cell of the same method).  Written atomically; the format
    follows the suffix (.png, .pdf, .svg)."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise OptionError("--plot needs matplotlib (pip install matplotlib)") from None
    from .atomic import write_bytes_atomic

    ok = [r for r in rows if not r.get("error")]
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    colors = {"none": "tab:gray", "nm": "tab:blue", "udfc": "tab:red"}
    for ax, key, label in ((axes[0], "bytes", "weight bytes"), (axes[1], "macs", "MACs per sample")):
        for m in dict.fromkeys(r["method"] for r in ok):
            pts = sorted(((r[key], 100 * r["top1"]) for r in ok if r["method"] == m), key=lambda p: (p[0], -p[1]))
            c = colors.get(m)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.35, color=c)
            front, best = [], -1.0
            for p in pts:
                if p[1] > best:
                    front.append(p)
                    best = p[1]
            ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=4, color=c, label=m)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    axes[0].legend(title="method (line: best cells)", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=90)
    write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- the sweep

def _read_model(model):
    """(Model, the bytes workers load, SHA-256 of the input file, name)."""
    from .graph import Model
    from .io import load, to_bytes

    if isinstance(model, Model):
        blob = to_bytes(model)
        return model, blob, hashlib.sha256(blob).hexdigest(), "model"
    try:
        path = os.fspath(model)
    except TypeError:
        raise OptionError(f"sweep: model must be a Model or a file path, got {type(model).__name__}") from None
    if path.endswith((".keras", ".h5", ".hdf5")):
        from converters import keras as ck  # noqa: PLC0415

        m = ck.read(path)
        blob = to_bytes(m)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        sha = h.hexdigest()
    elif path.endswith((".pt", ".pth")):
        raise FormatError(f"{path}: convert a PyTorch model first (udfc import torch ...), then sweep the "
                          ".safetensors file")
    else:
        m = load(path)  # checks the file and names what is wrong with it
        with open(path, "rb") as f:
            blob = f.read()
        sha = hashlib.sha256(blob).hexdigest()
    return m, blob, sha, os.path.basename(path)


def _check_int(name, v, lo, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise OptionError(f"sweep: {name} must be an int >= {lo}{' or None' if allow_none else ''}, got {v!r}")


def _check_out(path, what, suffixes, inputs):
    from .atomic import check_output_path

    p = os.fspath(path)
    if not p.lower().endswith(suffixes):
        raise OptionError(f"{what} {p!r} must end in {' or '.join(suffixes)}")
    check_output_path(p, inputs=inputs)


# ----------------------------------------------------------------------------- argparse types

def list_of(item):
    """An argparse type: a comma-separated list, each element through the
    argparse type ``item`` (``"0,0.1,0.3"`` -> [0.0, 0.1, 0.3])."""
    def parse(s: str) -> list:
        items = [x.strip() for x in s.split(",")]
        if not s.strip() or any(not x for x in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
        return [item(x) for x in items]
    return parse


def one_of(choices):
    """An argparse type: one of ``choices``."""
    def parse(s: str) -> str:
        if s not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {s!r}")
        return s
    return parse


def parse_switch(s: str) -> list[bool]:
    """``off`` -> [False], ``on`` -> [True], ``both`` -> [False, True]."""
    v = {"off": [False], "on": [True], "both": [False, True]}.get(s.lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected off, on or both, got {s!r}")
    return v


def suffix_type(suffixes):
    """An argparse type: a path ending in one of ``suffixes``."""
    def parse(s: str) -> str:
        if not s.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"{s!r} must end in {' or '.join(suffixes)} (the suffix picks the format)")
        return s
    return parse


def auto_chunk_size(n_test, batch_size, sample_bytes, slots, n_cells) -> int:
    """Samples per evaluation task: enough chunks that cells x chunks is at
    least twice the worker slots, and at most ~256 MiB of inputs per task
    (unless one batch is larger); always a whole number of batches."""
    n_batches = math.ceil(n_test / batch_size)
    per_cell = min(max(math.ceil(2 * slots / max(n_cells, 1)), 1), n_batches)
    cap = max(1, (256 << 20) // (batch_size * max(sample_bytes, 1)))
    return batch_size * min(math.ceil(n_batches / per_cell), cap)


def sweep(model, data, *, prune_ratios=(0.0, 0.1, 0.3, 0.5), weight_bits=(None, 8, 6, 4),
          methods=("none", "nm", "udfc"), criteria=("l1",), per_tensor=(False,), asymmetric=(False,),
          mse_clip=(False,), alpha1=(0.01,), alpha2=(0.008,), bias_correction=(False,), min_keep=(1,), skip=(),
          out=None, plot=None, scheduler=None, workers=None, batch_size: int = 256, chunk_size=None,
          max_samples=None, progress: bool = False, log=None) -> list[dict]:
    """Compress ``model`` with every combination of the option lists and
    measure each result on the test set ``data``.

    Parameters
    ----------
    model : str or Model
        A udfc-ref ``.safetensors`` file (or ``.keras``/``.h5``, converted on
        the fly), or a :class:`~udfc_ref.graph.Model`.
    data : str
        The test set: an ``.npz`` with ``x`` (N, C, H, W) float and ``y`` (N,)
        int, or a directory with ``x.npy`` and ``y.npy``; memory-mapped
        (``udfc_ref.evaldata``).  With Dask the workers open this path.
    prune_ratios, weight_bits, methods, criteria, per_tensor, asymmetric, mse_clip, alpha1, alpha2, \
bias_correction, min_keep :
        A value or a list of values of the :func:`~udfc_ref.compress` option
        of that name (``methods`` -> ``method``, ``criteria`` -> ``criterion``);
        the grid is their product (:func:`grid`).
    skip : list of str
        Layers every cell leaves untouched.
    out : str, optional
        Result file, ``.csv`` or ``.json``: one row per cell (:data:`FIELDS`).
        Rows already there (same key, no error) are not recomputed.
    plot : str, optional
        Also draw top-1 against bytes and MACs (matplotlib) to this file.
    scheduler : str or distributed.Client, optional
        Address of an existing Dask scheduler (``tcp://host:8786``), or a client.
    workers : int, optional
        0: sequential, in this process (no Dask).  N >= 1: a local Dask
        cluster of N worker processes.  Default: a local cluster with one
        worker per core.
    batch_size : int
        Samples per forward pass.
    chunk_size : int, optional
        Samples per evaluation task (a multiple of ``batch_size``); default
        :func:`auto_chunk_size`.
    max_samples : int, optional
        Evaluate on the first ``max_samples`` samples only.
    progress : bool
        Show cells done / total on stderr.
    log : callable, optional
        Called with one-line messages (cells reused from ``out``, the summary).

    Returns
    -------
    list of dict
        The rows of this grid, in grid order (:data:`FIELDS`); a failed cell
        has its message in ``error`` and None in the measured fields.

    Raises
    ------
    UDFCError
        Bad options, model or data (before any work), or a data error found
        while evaluating (the rows finished so far are kept in ``out``).
    """
    from .atomic import write_bytes_atomic

    _check_int("batch_size", batch_size, 1)
    _check_int("chunk_size", chunk_size, 1, allow_none=True)
    _check_int("max_samples", max_samples, 1, allow_none=True)
    _check_int("workers", workers, 0, allow_none=True)
    if chunk_size is not None and chunk_size % batch_size:
        raise OptionError(f"sweep: chunk_size ({chunk_size}) must be a multiple of batch_size ({batch_size}), so "
                          "that every backend evaluates the same batches")
    if scheduler is not None and workers is not None:
        raise OptionError("sweep: give either scheduler (an existing cluster) or workers (a local one), not both")
    try:
        data = os.path.abspath(os.fspath(data))  # workers resolve it, possibly from another directory
    except TypeError:
        raise OptionError(f"sweep: data must be a path, got {type(data).__name__}") from None
    model_path = None if hasattr(model, "nodes") else model
    if out is not None:
        _check_out(out, "result file", RESULT_SUFFIXES, (model_path, data))
    if plot is not None:
        _check_out(plot, "plot", PLOT_SUFFIXES, (model_path, data, out))
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise OptionError("--plot needs matplotlib (pip install matplotlib)") from None
    old = read_rows(out) if out is not None and os.path.exists(out) else []
    dask_mode = workers != 0
    if dask_mode:
        _import_distributed()
    m, blob, model_sha, name = _read_model(model)
    cells = grid(prune_ratios, weight_bits, methods, criteria, per_tensor, asymmetric, mse_clip, alpha1, alpha2,
                 bias_correction, min_keep, skip)
    _check_cells(m, cells)
    n_classes = int(np.prod(m.shapes[m.output_name]))

    with contextlib.ExitStack() as stack:
        client = local = None
        if os.path.exists(data) or not dask_mode:  # read here; with Dask, start no cluster unless there is work
            local = open_data(data)
            desc = _describe(local, n_classes)
        else:  # only the workers of a remote cluster see this path
            client = _open_client(scheduler, workers, stack)
            desc = _describe_on(client, data, n_classes)
        if tuple(desc["sample_shape"]) != tuple(m.input_shape):
            raise DataError(f"{data}: samples are {tuple(desc['sample_shape'])}, the model {name!r} takes "
                            f"{tuple(m.input_shape)}")
        n_test = min(desc["n"], max_samples or desc["n"])
        ident = {"model": name, "data": os.path.basename(data), "n_test": n_test, "model_sha256": model_sha,
                 "data_hash": desc["data_hash"]}
        for c in cells:
            c_key = cell_key(c, model_sha, desc["data_hash"], n_test)
            c.update(_key=c_key)
        keys = [c["_key"] for c in cells]
        done = {r["key"]: r for r in old if not r.get("error")}
        todo = [{"options": {k: c[k] for k in OPTION_FIELDS}, "key": c["_key"]} for c in cells
                if c["_key"] not in done]
        # finished rows, and failed ones until their retry finishes (an interrupted retry loses nothing)
        by_key = {r["key"]: r for r in old}
        results: dict[str, dict] = {k: by_key[k] for k in keys if k in by_key}
        others = [r for r in old if r["key"] not in set(keys)]
        state = {"written": time.monotonic(), "dirty": False, "failed": 0, "n": 0}

        def flush():
            if out is not None and state["dirty"]:
                write_bytes_atomic(out, rows_bytes(others + [results[k] for k in keys if k in results], out))
                state["dirty"] = False
                state["written"] = time.monotonic()

        say = log or (lambda msg: None)
        if len(keys) - len(todo):
            say(f"{len(keys) - len(todo)} of {len(keys)} cells are already in {out} (not recomputed)")
        bar = Progress(len(todo), f"sweep {name}") if progress and todo else None
        t_start = time.perf_counter()

        def emit(cell, res):
            row = dict(ident, **cell["options"], key=cell["key"])
            row.update({k: None for k in RESULT_FIELDS})
            if "error" in res:
                row["error"] = res["error"]
                state["failed"] += 1
            else:
                row.update(res["info"])
                row["correct"] = int(res["correct"])
                row["top1"] = res["correct"] / n_test
                row["eval_seconds"] = round(res["eval_seconds"], 4)
                row["compress_seconds"] = round(row["compress_seconds"], 4)
                row["seconds"] = round(row["compress_seconds"] + row["eval_seconds"], 4)
            results[cell["key"]] = row
            state["n"] += 1
            state["dirty"] = True
            if time.monotonic() - state["written"] >= 1.0:
                flush()
            if bar is not None:
                o = cell["options"]
                rate = (time.perf_counter() - t_start) / state["n"]
                note = f"{rate:.1f} s/cell, last r={o['prune_ratio']:g} b={o['weight_bits'] or 'float'} " \
                       f"{o['method']}" + (f", {state['failed']} failed" if state["failed"] else "")
                bar.update(state["n"], note)

        try:
            if todo and dask_mode:
                if client is None:
                    client = _open_client(scheduler, workers, stack)
                    remote = _describe_on(client, data, n_classes) if scheduler is not None else desc
                    if remote["data_hash"] != desc["data_hash"]:
                        raise DataError(f"{data}: the Dask workers see another file at this path than this "
                                        "machine (different content)")
                cs = chunk_size or auto_chunk_size(n_test, batch_size, desc["sample_bytes"],
                                                   sum(client.nthreads().values()), len(todo))
                _run_dask(client, blob, model_sha, data, n_test, batch_size, cs, todo, emit)
            elif todo:
                _run_sequential(m, local, n_test, batch_size, todo, emit)
        finally:
            if bar is not None:
                bar.close()
            flush()
    rows = [results[k] for k in keys]
    say(f"{len(keys)} cells: {state['n']} computed in {time.perf_counter() - t_start:.1f} s, "
        f"{len(keys) - state['n']} from an earlier run, {sum(1 for r in rows if r.get('error'))} failed"
        + (f" ({'sequential' if not dask_mode else 'dask'})" if todo else ""))
    if plot is not None:
        plot_rows(rows, plot, title=f"{name} on {os.path.basename(data)} ({n_test} samples)")
    return rows


def format_rows(rows) -> str:
    """A plain-text table of sweep rows: the options that vary, then the numbers."""
    if not rows:
        return "(no cells)"
    vary = [k for k in OPTION_FIELDS if k in ("prune_ratio", "weight_bits", "method")
            or len({json.dumps(r[k], default=repr) for r in rows}) > 1]
    head = [{"prune_ratio": "prune", "weight_bits": "bits"}.get(k, k) for k in vary]
    nhead = ["top1", "params", "bytes", "MACs", "err after", "seconds"]

    def opt(r, k):
        v = r[k]
        if k == "weight_bits":
            return "float" if v is None else str(v)
        return f"{v:g}" if isinstance(v, float) else ("on" if v is True else "off" if v is False else str(v))

    body = []
    for r in rows:
        o = [opt(r, k) for k in vary]
        if r.get("error"):
            body.append((o, None, r["error"]))
        else:
            ea = "-" if r["mean_err_after"] is None else f"{r['mean_err_after']:.4f}"
            body.append((o, [f"{r['top1']:.4f}", f"{r['params']:,}", f"{r['bytes']:,}", f"{r['macs']:,}", ea,
                             f"{r['seconds']:.2f}"], None))
    wo = [max(len(h), *(len(b[0][i]) for b in body)) for i, h in enumerate(head)]
    wn = [max([len(h)] + [len(b[1][i]) for b in body if b[1] is not None]) for i, h in enumerate(nhead)]
    line = lambda o, n: "  ".join(c.ljust(w) for c, w in zip(o, wo)) + "  " + n  # noqa: E731
    out = [line(head, "  ".join(h.rjust(w) for h, w in zip(nhead, wn)))]
    for o, n, err in body:
        out.append(line(o, "  ".join(c.rjust(w) for c, w in zip(n, wn)) if n is not None else "error: " + err))
    return "\n".join(out)


__all__ = ["sweep", "dask_client", "grid", "cell_key", "read_rows", "rows_bytes", "plot_rows", "format_rows",
           "count_correct", "auto_chunk_size", "FIELDS", "OPTION_FIELDS", "RESULT_FIELDS", "TIMING_FIELDS", "DataError"]
