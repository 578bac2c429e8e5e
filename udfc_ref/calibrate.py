"""Calibration statistics: the pair statistics measured on unlabeled images
(derivation section 13, Eq. C1-C7).

With ``compress(..., calibration=x)`` the solver reads, instead of the data
model's :class:`~udfc_ref.solve.PairStats`, the sample moments of real
activations: the original network's channels ``a`` (the target) and the
compressed network's kept channels ``a~_K`` on the images ``x``:

* ``"sequential"`` (default): ``a~_K`` is computed by the compressed network
  as built so far -- every upstream pair already pruned, quantized and
  compensated -- so each pair also corrects what earlier pairs left;
  the walk then solves every row of ``T`` on all kept channels (Eq. C6) and
  refits each consumer to the original network's output of it (Eq. C7,
  :meth:`CalibratedStats.refit`);
* ``"oracle"``: the sequential statistics with the data-free solver (U1-U4)
  unchanged -- the reference the data-free statistics are measured against;
* ``"independent"``: ``a~_K`` is the pair's own compressed channels on the
  *original* network's input of the producer (the kept filters with their
  quantization error in the original input coordinates, Eq. D4, then the
  compressed BN / depthwise chain / gate): each pair is fitted alone.

Both are taken where the consumers read the channels (:func:`sources.read_value`,
Eq. C3): after the pools between the activation and the consumers.

Bounded memory and linear work (Eq. C2): the images are streamed in batches
and only sums of moments are kept per pair (Eq. C1).  Each network (the
original, and in the sequential / oracle modes the compressed one) runs every node once:
the values a later node still needs -- the *frontier* -- are kept for all
images (in RAM up to :data:`RAM_BUDGET` bytes, beyond that in temporary
memory-mapped files), so nothing is recomputed from the input for a later
pair, and a value is dropped as soon as every node reading it has run.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from .errors import NumericError, OptionError
from .forward import conv2d, linear, run_node
from .graph import Model, Node
from .covselect import select_by_output
from .datamodel import bn_affine
from .solve import PairStats
from .sources import StatsRequest, read_value

MODES = ("sequential", "oracle", "independent")

#: bytes of frontier activations kept in RAM; more go to temporary memory-mapped files
RAM_BUDGET = 512 * 1024 * 1024
#: bytes of one value of one batch the batch size aims at (at most MAX_BATCH, at least 1 image)
BATCH_BYTES = 32 * 1024 * 1024
MAX_BATCH = 256


# ----------------------------------------------------------------- input

def check_calibration(model: Model, x, where: str = "calibration", error=OptionError) -> None:
    """Raise ``error`` (OptionError) unless ``x`` is a float (N, C, H, W)
    array of the model's input shape with N >= 2 (finiteness is checked batch
    by batch); ``where`` names the images in the message (the CLI: the file
    and its array)."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None or len(shape) != 4 or np.dtype(dtype).kind != "f":
        raise error(f"{where} must be a float (N, C, H, W) array of images, got "
                    f"{type(x).__name__} {'' if shape is None else tuple(shape)} {dtype or ''}".rstrip())
    if tuple(shape[1:]) != tuple(model.input_shape):
        raise error(f"{where}: the images have shape {tuple(shape[1:])}, the model's input "
                    f"{model.input_name!r} takes {tuple(model.input_shape)}")
    if shape[0] < 2:
        raise error(f"{where} needs at least 2 images (covariances), got {shape[0]}")


def load_calibration(path) -> np.ndarray:
    """The array ``x`` (N, C, H, W) float of an ``.npz`` file (other members,
    e.g. labels, are ignored).  Checked like ``udfc eval`` checks its data
    (a regular zip file, the member's header against its bytes, plain
    numbers, never unpickled); an uncompressed member is memory-mapped, so a
    large calibration set is read batch by batch.  Raises DataError (a
    FormatError, as for ``udfc eval --data``)."""
    from .evaldata import DataError, read_npz

    path = os.fspath(path)
    x, _ = read_npz(path, ("x",), "calibration images are an .npz with the array x (numpy.savez(path, x=x))",
                    "calibration images are the array 'x'; the file has ",
                    "calibration images are an .npz with the array x")["x"]
    if x.ndim != 4 or x.dtype.kind != "f":
        raise DataError(f"{path}: 'x' must be a float (N, C, H, W) array, got {x.dtype} {x.shape}")
    step = max(1, BATCH_BYTES // max(1, x[:1].nbytes))
    for s in range(0, x.shape[0], step):  # before any work, in bounded memory
        bad = _first_nonfinite(np.asarray(x[s:s + step]))
        if bad is not None:
            raise DataError(f"{path}: 'x' holds NaN/Inf (image {s + bad})")
    return x


def _first_nonfinite(xb: np.ndarray) -> int | None:
    """Index of the first image of the batch ``xb`` (B, ...) holding NaN/Inf, or None."""
    if np.all(np.isfinite(xb)):
        return None
    return int(np.nonzero(~np.isfinite(xb.reshape(xb.shape[0], -1)).all(axis=1))[0][0])


# ----------------------------------------------------------------- moments (Eq. C1)

class Moments:
    """Streaming first and second moments of two row sets ``a`` (S, N) and
    ``q`` (S, M) observed together (Eq. C1): means, ``Var a``, ``Cov(q)``,
    ``Cov(a, q)`` over all rows seen, merged batch by batch with the pairwise
    update of Chan et al. (centred sums, no cancellation of raw sums)."""

    def __init__(self):
        self.n = 0

    def add(self, a: np.ndarray, q: np.ndarray) -> None:
        a = np.asarray(a, np.float64)
        q = np.asarray(q, np.float64)
        nb = a.shape[0]
        if nb == 0:
            return
        ma, mq = a.mean(0), q.mean(0)
        da, dq = a - ma, q - mq
        va = np.einsum("sn,sn->n", da, da)
        cq = dq.T @ dq
        cx = da.T @ dq
        if self.n == 0:
            self.n, self.ma, self.mq, self.va, self.cq, self.cx = nb, ma, mq, va, cq, cx
            return
        n = self.n + nb
        ea, eq = ma - self.ma, mq - self.mq
        f = self.n * nb / n
        self.va += va + f * ea * ea
        self.cq += cq + f * np.outer(eq, eq)
        self.cx += cx + f * np.outer(ea, eq)
        self.ma += ea * (nb / n)
        self.mq += eq * (nb / n)
        self.n = n

    def stats(self, kept) -> PairStats:
        """The PairStats of the rows seen (population moments, divided by S)."""
        n = max(self.n, 1)
        return PairStats(self.ma.copy(), self.va / n, self.mq.copy(), self.cq / n, self.cx / n,
                         np.asarray(kept))


def rows(v: np.ndarray) -> np.ndarray:
    """(B, C, H, W) or (B, C, ...) -> (S, C): one row per image and position."""
    v = np.asarray(v)
    if v.ndim > 2:
        return np.moveaxis(v, 1, -1).reshape(-1, v.shape[1])
    return v.reshape(v.shape[0], -1)


# ----------------------------------------------------------------- the frontier (Eq. C2)

class _Store:
    """Arrays over all calibration images: in RAM up to ``budget`` bytes, in
    temporary memory-mapped files beyond (removed by :meth:`close`)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.ram = 0
        self.arrays: dict[str, np.ndarray] = {}
        self._tmp = None
        self.peak = 0
        self.spilled = 0
        self._files = 0  # a new name per file: a name is never reused while a map of it may live

    def new(self, key: str, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.ram + nbytes <= self.budget:
            a = np.empty(shape, dtype)
            self.ram += nbytes
            self.peak = max(self.peak, self.ram)
        else:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="udfc-calib-")
            self._files += 1
            fn = os.path.join(self._tmp.name, f"{self._files}.bin")
            a = np.memmap(fn, dtype=dtype, mode="w+", shape=tuple(shape))
            self.spilled += nbytes
        self.arrays[key] = a
        return a

    def drop(self, key: str) -> None:
        a = self.arrays.pop(key, None)
        if a is None:
            return
        if isinstance(a, np.memmap):
            fn = a.filename
            del a
            try:
                os.remove(fn)
            except OSError:
                pass
        else:
            self.ram -= a.nbytes

    def close(self) -> None:
        for k in list(self.arrays):
            self.drop(k)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class Network:
    """One network's values on the calibration images, computed node by node
    over batches; every node runs once (Eq. C2).

    :meth:`ensure` runs the nodes a set of values needs that have not run
    yet, keeping (in the shared :class:`_Store`) every value some node that
    has not run yet reads; :meth:`collect` drops the values every reader of
    which has run."""

    def __init__(self, model: Model, x, batch: int, store: _Store, tag: str):
        self.model = model
        self.x = x
        self.batch = batch
        self.store = store
        self.tag = tag
        self.index = {n.name: i for i, n in enumerate(model.nodes)}
        self.ran: set[str] = set()
        self.kept: set[str] = set()  # values held in the store
        self.pinned: set[str] = set()
        self.held: set[str] = set()  # kept by the caller beyond one request (see :meth:`hold`)

    def key(self, value: str) -> str:
        return f"{self.tag}:{value}"

    def batches(self):
        n = self.x.shape[0]
        for s in range(0, n, self.batch):
            yield s, min(s + self.batch, n)

    def input_batch(self, s: int, e: int) -> np.ndarray:
        xb = np.ascontiguousarray(self.x[s:e])
        bad = _first_nonfinite(xb)
        if bad is not None:
            raise OptionError(f"calibration images hold NaN/Inf (image {s + bad})")
        return xb

    def read(self, value: str, s: int, e: int, local=None):
        """Batch ``s:e`` of a value held in the store (or in ``local``)."""
        if local is not None and value in local:
            return local[value]
        if value == self.model.input_name:
            return self.input_batch(s, e)
        return self.store.arrays[self.key(value)][s:e]

    def missing(self, values) -> list[Node]:
        """The nodes (in graph order) that must run to hold ``values``."""
        need, stack, seen = {}, [v for v in values], set()
        while stack:
            v = stack.pop()
            if v in seen or v in self.kept or v == self.model.input_name:
                continue
            seen.add(v)
            p = self.model.producer(v)
            if p.name in self.ran:
                raise RuntimeError(f"calibration: value {v!r} was dropped before its last reader ran")
            need[p.name] = p
            stack.extend(p.inputs)
        return sorted(need.values(), key=lambda n: self.index[n.name])

    def ensure(self, values) -> None:
        """Run what ``values`` need; keep them (pinned until :meth:`collect`)
        and every value a node that has not run yet reads."""
        nodes = self.missing(values)
        self.pinned |= set(values)
        if not nodes:
            return
        run = {n.name for n in nodes}
        keep = set()
        last = {}
        for i, n in enumerate(nodes):
            for v in n.inputs:
                last[v] = i
            outside = [c for c in self.model.consumers(n.output) if c.name not in run and c.name not in self.ran]
            if n.output in self.pinned or outside:
                keep.add(n.output)
        for s, e in self.batches():
            local = {}
            for i, n in enumerate(nodes):
                y = run_node(self.model, n, [self.read(v, s, e, local) for v in n.inputs])
                local[n.output] = y
                if n.output in keep:
                    k = self.key(n.output)
                    if k not in self.store.arrays:
                        self.store.new(k, (self.x.shape[0],) + y.shape[1:], y.dtype)
                    self.store.arrays[k][s:e] = y
                for v in n.inputs:
                    if last.get(v) == i:
                        local.pop(v, None)
        self.ran |= run
        self.kept |= keep

    def hold(self, values) -> None:
        """Keep ``values`` through :meth:`collect` until :meth:`unhold`."""
        self.held |= set(values)

    def unhold(self) -> None:
        self.held.clear()

    def collect(self) -> None:
        """Unpin everything; drop the values whose readers have all run
        (unless held)."""
        self.pinned.clear()
        for v in list(self.kept):
            if v not in self.held and all(c.name in self.ran for c in self.model.consumers(v)):
                self.store.drop(self.key(v))
                self.kept.discard(v)


def _subgraph(model: Model, producer: Node, target: str) -> list[Node]:
    """The nodes between ``producer`` (included) and ``target`` that depend
    on the producer, in graph order (a pair's chain / gate, Eq. C4)."""
    index = {n.name: i for i, n in enumerate(model.nodes)}
    lo = index[producer.name]
    found, stack = {}, [target]
    while stack:
        v = stack.pop()
        p = model.producer(v)
        if p is None or p.name in found or index[p.name] < lo:
            continue
        found[p.name] = p
        if p is not producer and p.name != producer.name:
            stack.extend(p.inputs)
    nodes = sorted(found.values(), key=lambda n: index[n.name])
    inside = {producer.output}
    out = []
    for n in nodes:
        if n.name == producer.name or any(i in inside for i in n.inputs):
            inside.add(n.output)
            out.append(n)
    return out


def embedded_bias(orig: Model, req: StatsRequest) -> np.ndarray | None:
    """(M,) pre-BN constant of a pair's kept channels in the independent
    model (Eq. C4): the original bias at the kept channels plus ``req.extra``
    (the pair's own bias-correction shift); None when both are absent."""
    b = orig.param(req.pair.producer, "bias")
    b = None if b is None else b.astype(np.float64)[req.kept]
    if req.extra is not None:
        b = req.extra if b is None else b + req.extra
    return b


class CalibratedStats:
    """The statistics source of ``compress(..., calibration=x)``: the PairStats
    of every pair measured on the images ``x`` (Eq. C1-C4).

    Parameters
    ----------
    orig : the original model.
    comp : the compressed model being built by ``compress`` (read, never written).
    x : (N, C, H, W) float images (an array or a memory map).
    mode : ``"sequential"``, ``"oracle"`` or ``"independent"``.
    """

    name = "calibration"

    def __init__(self, orig: Model, comp: Model, x, mode: str = "sequential", batch: int | None = None):
        if mode not in MODES:
            raise OptionError(f"calibration_mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_calibration(orig, x)
        self.orig, self.comp, self.x, self.mode = orig, comp, x, mode
        if batch is None:
            per_image = max(int(np.prod(s)) for s in orig.shapes.values()) * 4
            batch = int(min(MAX_BATCH, max(1, BATCH_BYTES // max(per_image, 1))))
        self.batch = batch
        self.store = _Store(RAM_BUDGET)
        self.onet = Network(orig, x, batch, self.store, "orig")
        self.cnet = Network(comp, x, batch, self.store, "comp") if mode != "independent" else None
        self.seconds = 0.0

    @property
    def n_images(self) -> int:
        return int(self.x.shape[0])

    def stats(self, req: StatsRequest) -> PairStats:
        t0 = time.perf_counter()
        try:
            return self._stats(req)
        finally:
            self.seconds += time.perf_counter() - t0

    def _stats(self, req: StatsRequest) -> PairStats:
        p = req.pair
        target = read_value(self.orig, p, req.which)
        mom = Moments()
        if self.mode != "independent":
            self.onet.ensure([target])
            self.cnet.ensure([target])
            for s, e in self.onet.batches():
                mom.add(rows(self.onet.read(target, s, e)), rows(self.cnet.read(target, s, e)))
            self.cnet.collect()
        else:
            nodes = _subgraph(self.comp, self.comp.node(p.producer.name), target)
            names = {n.output for n in nodes}
            outer = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in names))
            self.onet.ensure(outer + [target])
            self.onet.hold(outer)  # the pair's next request (an SE gate's gated value) reads them again
            wq = _producer_weight(self.orig, p.producer, req.Wq)
            bias = embedded_bias(self.orig, req)
            bn = bn_affine(self.orig, p.bn)
            bn = [a[req.kept] for a in bn]
            for s, e in self.onet.batches():
                local = {}
                for n in nodes:
                    ins = [self.onet.read(v, s, e, local) for v in n.inputs]
                    if n.name == p.producer.name:
                        y = _embedded_producer(n, wq, bias, ins[0])
                    elif n.name == p.bn.name:  # the original's rows (an upstream shift absorbed there is not ours)
                        y = _bn(ins[0], *bn)
                    else:
                        y = run_node(self.comp, n, ins)
                    local[n.output] = y
                mom.add(rows(self.onet.read(target, s, e)), rows(local[target]))
        self.onet.collect()
        return mom.stats(req.kept)

    def selection_cov(self, pair) -> np.ndarray:
        """``Cov(a)`` of the original network's channels where the consumers
        read them, on the images (Eq. S4)."""
        target = read_value(self.orig, pair, "value")
        extra = [read_value(self.orig, pair, "gap")] if pair.se is not None else []
        self.onet.ensure([target] + extra)
        self.onet.hold([target] + extra)  # read again by the pair's statistics requests
        mom = Moments()
        for s, e in self.onet.batches():
            a = rows(self.onet.read(target, s, e))
            mom.add(a, a)
        return mom.stats(np.arange(mom.ma.shape[0])).cov_q

    @property
    def refits(self) -> bool:
        """True in the sequential mode: the walk solves Eq. C6 and refits the
        consumers (Eq. C7); the other modes only replace the statistics."""
        return self.mode == "sequential"

    def refit(self, start: str, node: Node, kernel) -> tuple[np.ndarray, np.ndarray] | None:
        """Eq. C7: the weight ``W`` (O, D) and bias ``b`` (O,) of the consumer
        ``node`` that best give the original network's output of it from the
        compressed network's input of it, on the images; None unless
        :func:`refit_reads` (``start``: the pair's value) and the sequential mode.

        Rows: every image and output position, at most :data:`REFIT_ROWS`
        in all (the positions of each image drawn without replacement, seed 0,
        the same positions in both networks).  Not refitted (None) when the
        input is wider than :data:`REFIT_MAX_DIM` columns (its (D, D) moments
        are held) or there are fewer than 2 D rows."""
        if not self.refits or not refit_reads(self.orig, start, node):
            return None
        w = self.comp.tensors[self.comp.node(node.name).params["weight"]]
        if not self._fits(node, int(np.prod(w.shape[1:]))):  # too wide to hold, or too few rows: W' T stays
            return None
        t0 = time.perf_counter()
        try:
            mom = self._consumer_moments(node, kernel, self.cnet)
            return refit_solve(mom)
        finally:
            self.seconds += time.perf_counter() - t0

    def _fits(self, node: Node, dim: int) -> bool:
        """True when Eq. C7 (and S5) can fit the consumer ``node`` with ``dim``
        input columns: at most :data:`REFIT_MAX_DIM` of them (the (D, D)
        moments are held) and at least :data:`REFIT_ROWS_PER_DIM` rows each."""
        per = int(np.prod(self.orig.shapes[node.output][1:])) if node.op == "conv2d" else 1
        n_rows = self.n_images * min(per, -(-REFIT_ROWS // self.n_images))
        return dim <= REFIT_MAX_DIM and n_rows >= REFIT_ROWS_PER_DIM * dim

    def _consumer_moments(self, node: Node, kernel, unet: "Network") -> Moments:
        """The moments (Eq. C1) of the rows ``(z, u)`` of Eq. C7: ``u`` the
        consumer's input (``patches``) in ``unet``, ``z`` the original network's
        output of the consumer at the same positions; every image, at most
        :data:`REFIT_ROWS` rows in all (the positions of each image drawn
        without replacement, seed 0: the same positions on every call)."""
        src = node.inputs[0]
        # the original's output of the consumer (runs it once, kept), with its input when both come from it
        self.onet.ensure([node.output] + ([src] if unet is self.onet else []))
        unet.ensure([src])
        mom = Moments()
        rng = np.random.default_rng(0)
        for s, e in self.onet.batches():
            u = patches(node, np.asarray(unet.read(src, s, e), np.float64), kernel)
            z = rows(self.onet.read(node.output, s, e))
            per = u.shape[0] // (e - s)  # output positions per image
            take = max(1, min(per, -(-REFIT_ROWS // self.n_images)))
            if take < per:
                pick = np.sort(rng.random((e - s, per)).argsort(1)[:, :take], 1)
                idx = (np.arange(e - s)[:, None] * per + pick).ravel()
                u, z = u[idx], z[idx]
            mom.add(z, u)
        unet.collect()
        self.onet.collect()
        return mom

    def select_by_output(self, pair, n_keep: int, gamma=None, scores=None) -> np.ndarray | None:
        """Eq. S5 in the sequential mode: the ``n_keep`` channels of ``pair``
        kept by :func:`covselect.select_by_output` on the rows of Eq. C7 of the
        pair's one consumer, with Eq. C7's ridge; both ``u`` and ``z`` are read
        in the *original* network (as Eq. S4 reads the original's ``Cov(a)``;
        the refit then reads the compressed one).  None -- Eq. S4 selects --
        unless the pair has exactly one consumer, it is refitted
        (:func:`refit_reads`, :meth:`_fits`) and its input columns are one
        block per channel."""
        if not self.refits or len(pair.consumers) != 1:
            return None
        node = pair.consumers[0].node
        if not refit_reads(self.orig, pair.value, node):
            return None
        w = self.orig.tensors[node.params["weight"]]
        n = int(self.orig.shapes[pair.value][0])  # the pair's channels (shapes hold no batch axis)
        dim = int(np.prod(w.shape[1:]))
        if dim % n or not self._fits(node, dim):
            return None
        t0 = time.perf_counter()
        try:
            keep = [read_value(self.orig, pair, "value")] + ([read_value(self.orig, pair, "gap")] if pair.se else [])
            self.onet.ensure(keep)
            self.onet.hold(keep + [node.output])  # read again by the pair's statistics requests and its refit
            mom = self._consumer_moments(node, w.shape[2:] if node.op == "conv2d" else None, self.onet)
            if not (np.isfinite(mom.cq).all() and np.isfinite(mom.cx).all()):
                raise NumericError(f"calibration: the moments of {node.name!r}'s input and output on the images "
                                   f"are not finite (selecting the channels of {pair.name!r}, Eq. S5): the original "
                                   f"network overflows on these images")
            s = max(mom.n, 1)
            return select_by_output(mom.cq / s, mom.cx.T / s, n, n_keep, REFIT_RIDGE, gamma=gamma, scores=scores)
        finally:
            self.seconds += time.perf_counter() - t0

    def release(self, layer: str) -> None:
        self.onet.unhold()
        self.onet.collect()

    def close(self) -> None:
        self.store.close()


def _producer_weight(orig: Model, producer: Node, Wq: np.ndarray) -> np.ndarray:
    """The kept filters in the original input coordinates (Eq. D4) laid out
    as the producer's weight with groups = 1: (M, C, kh, kw) or (M, C*R)."""
    dtype = orig.tensors[producer.params["weight"]].dtype
    if producer.op == "conv2d":
        kh, kw = orig.tensors[producer.params["weight"]].shape[2:]
        return np.ascontiguousarray(Wq.reshape(Wq.shape[0], Wq.shape[1], kh, kw), dtype=dtype)
    return np.ascontiguousarray(Wq.reshape(Wq.shape[0], -1), dtype=dtype)


def _bn(x, gamma, beta, mu, sigma):
    """A BN with the given (float64) parameters, in ``x``'s dtype."""
    sh = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - mu.reshape(sh)) * (gamma / sigma).reshape(sh) + beta.reshape(sh)).astype(x.dtype, copy=False)


def _embedded_producer(node: Node, wq: np.ndarray, bias, x: np.ndarray) -> np.ndarray:
    """The pair's producer in the independent model (Eq. C4, D4-D5): the
    kept filters in the original input coordinates ``wq`` on the original
    network's input, plus ``bias`` (the original's kept entries and the pair's
    own bias-correction shift)."""
    b = None if bias is None else bias.astype(x.dtype)
    if node.op == "conv2d":
        a = node.attrs
        return conv2d(x, wq, b, a["stride"], a["padding"], a["dilation"], 1)
    return linear(x.reshape(x.shape[0], -1), wq, b)


# ----------------------------------------------------------------- consumer refit (Eq. C7)

#: ops a refitted consumer may read the pair's value through (one input each, no new channels)
REFIT_PASS = ("max_pool2d", "avg_pool2d", "global_avg_pool", "identity", "flatten", "reshape", "pad")
#: rows (images x sampled output positions) of the consumer's input the refit accumulates at most
REFIT_ROWS = 100_000
#: the refit's relative ridge lambda (Eq. C7)
REFIT_RIDGE = 1e-3
#: widest consumer input (D = kept channels x kernel positions) refitted: its (D, D) moments are held
REFIT_MAX_DIM = 4096
#: fewest rows per input column a refit needs (fewer: W' T stays)
REFIT_ROWS_PER_DIM = 2


def refit_reads(model: Model, start: str, node: Node) -> bool:
    """True when ``node`` is a conv with groups = 1 or a linear layer reading
    the value ``start`` (a pair's value, or its SE gate's global average)
    through single-input pass ops only (``REFIT_PASS``): its input is then
    final once the pair is."""
    if node.op not in ("conv2d", "linear") or (node.op == "conv2d" and node.attrs["groups"] != 1):
        return False
    v = node.inputs[0]
    while v != start:
        p = model.producer(v)
        if p is None or p.op not in REFIT_PASS or len(p.inputs) != 1:
            return False
        v = p.inputs[0]
    return True


def patches(node: Node, x: np.ndarray, kernel) -> np.ndarray:
    """The consumer's input rows: (B*Ho*Wo, C*kh*kw) im2col of a conv's input
    ``x`` (B, C, H, W) in the weight's column order (c, i, j), (B, D) for a
    linear layer."""
    if node.op == "linear":
        return x.reshape(x.shape[0], -1)
    from .forward import _pad, _windows

    a = node.attrs
    w = _windows(_pad(x, a["padding"]), kernel, a["stride"], a["dilation"])  # B, C, Ho, Wo, kh, kw
    b, c, ho, wo, kh, kw = w.shape
    return w.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)


def refit_solve(mom: Moments, ridge: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. C7 from the moments of the rows (z, u) (``Moments.add(z, u)``):
    ``W = Cov(z, u) (Cov(u) + lambda diag Cov(u))^-1``, ``b = E z - W E u``;
    (O, D), (O,); ``lambda`` = ``ridge`` (default :data:`REFIT_RIDGE`)."""
    from .solve import _solve_psd

    ridge = REFIT_RIDGE if ridge is None else ridge
    n = max(mom.n, 1)
    cu = mom.cq / n
    A = cu + ridge * np.diag(np.diag(cu))
    W = _solve_psd(A, (mom.cx / n).T).T
    return W, mom.ma - W @ mom.mq
