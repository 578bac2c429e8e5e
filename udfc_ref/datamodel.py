"""The data-free data model: Gaussian statistics of every value, from weights
and BatchNorm statistics only (derivation section 4, Eq. D1-D8).

Assumptions (stated in ``docs/derivation.md``):

* A1  a BN output ``z_i = gamma_i u_i + beta_i`` has standard normal ``u_i``;
* A2  the input patch ``x`` of a layer (the C input channels at the K kernel
      positions) has covariance ``Sigma_x = C_in (x) R_s(rho_s)``: the channel
      covariance ``C_in`` of the input value times a spatial correlation
      ``R_s[p, q] = rho_s ** manhattan(p, q)`` between kernel positions;
* A3  ``rho_s`` is the value in [0, 0.99] whose predicted output variances
      ``diag(W Sigma_x W^T)`` best match the BN running variances up to one
      common scale (least squares in log space) -- the BN statistics calibrate
      the input model;
* A4  channel statistics propagate: activations by the Hermite expansion
      (``moments.py``), pooling and identity unchanged, residual ``add`` as a
      sum of independent branches, ``concat`` block-diagonal; the network
      input is standardised and white (mean 0, covariance I).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from .activation_moments import activation_key
from .graph import Model, Node
from .moments import ACTIVATIONS, activation_covariance, activation_mean_var, hermite_coefficients
from .ops import ACTIVATION_OPS

RHO_GRID = np.concatenate([np.linspace(0.0, 0.95, 20), [0.98, 0.99]])


@dataclass
class ValueStats:
    """Per-channel mean (C,), channel covariance (C, C) and lag-1 spatial
    correlation ``rho`` (None when unknown or not spatial) of a value."""

    mean: np.ndarray
    cov: np.ndarray
    rho: float | None = None


def dense_filters(model: Model, node: Node, dtype=np.float64) -> np.ndarray:
    """Layer weights as (O, C_in, K) in ``dtype`` (Eq. D1 layout): a grouped
    conv expanded with zeros to all input channels; a linear layer after a
    flatten of (C, H, W) split into C channels of H*W columns (C-order).
    ``dtype=None``: the stored dtype, at least float32 (every value exact:
    half the memory of float64 for a float32 model)."""
    w = model.tensors[node.params["weight"]]
    w = w.astype(np.result_type(w.dtype, np.float32) if dtype is None else dtype)
    if node.op == "linear":
        src = _flatten_source_shape(model, node)
        c = src[0] if src is not None else w.shape[1]
        return w.reshape(w.shape[0], c, -1)
    o, cg, kh, kw = w.shape
    g = node.attrs["groups"]
    if g == 1:
        return w.reshape(o, cg, kh * kw)
    dense = np.zeros((o, cg * g, kh * kw), dtype=w.dtype)
    og = o // g
    grp = np.arange(o) // og
    cols = grp[:, None] * cg + np.arange(cg)[None, :]
    dense[np.arange(o)[:, None], cols, :] = w.reshape(o, cg, kh * kw)
    return dense


def depthwise_filters(model: Model, node: Node) -> np.ndarray | None:
    """(N, K) float64 filters of a depthwise conv (groups = input channels =
    output channels, one K-position filter per channel), else None."""
    if node.op != "conv2d" or node.attrs["groups"] == 1:
        return None
    w = model.tensors[node.params["weight"]]
    n = model.shapes[node.inputs[0]][0]
    if node.attrs["groups"] != n or w.shape[:2] != (n, 1):
        return None
    return w.reshape(n, -1).astype(np.float64)


def spatial_positions(node: Node, model: Model) -> np.ndarray:
    """(K, 2) grid coordinates of a producer's input positions (Eq. D2)."""
    if node.op == "conv2d":
        w = model.tensors[node.params["weight"]]
        kh, kw = w.shape[2:]
        dh, dw = node.attrs["dilation"]
        yy, xx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    else:
        # linear: the flattened (C, H, W) map, or a single position
        src = _flatten_source_shape(model, node)
        h, w_ = (src[1], src[2]) if src is not None and len(src) == 3 else (1, 1)
        yy, xx = np.meshgrid(np.arange(h), np.arange(w_), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _layer_filters(model: Model, node: Node) -> np.ndarray:
    """The (O, C_in, K) filters of Eq. D1 in the stored dtype: a view of the
    weight tensor (no copy) for a dense conv or a linear layer, the float64
    dense expansion (:func:`dense_filters`) for a grouped conv."""
    if node.op == "conv2d" and node.attrs["groups"] != 1:
        return dense_filters(model, node)
    w = model.tensors[node.params["weight"]]
    if node.op == "linear":
        src = _flatten_source_shape(model, node)
        return w.reshape(w.shape[0], src[0] if src is not None else w.shape[1], -1)
    return w.reshape(w.shape[0], w.shape[1], -1)


def _flatten_source_shape(model: Model, node: Node):
    p = model.producer(node.inputs[0])
    if p is not None and p.op == "flatten":
        return model.shapes[p.inputs[0]]
    return None


def spatial_correlation(pos: np.ndarray, rho: float) -> np.ndarray:
    """R_s[p, q] = rho ** (|dy| + |dx|) (Eq. D2)."""
    d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)
    return np.power(rho, d) if rho > 0 else (d == 0).astype(np.float64)


#: rows per block of the symmetric Gram products (Eq. D4, :func:`gram_sym`)
GRAM_BLOCK = 384


@functools.lru_cache(maxsize=8)
def _strict_lower(n: int) -> np.ndarray:
    """(n, n) bool mask of the entries below the diagonal, built once per
    block size (read-only; n^2 bytes, no index arrays)."""
    mask = np.tri(n, k=-1, dtype=bool)
    mask.flags.writeable = False
    return mask


def gram_sym(a: np.ndarray, b: np.ndarray, block: int = GRAM_BLOCK) -> np.ndarray:
    """``a @ b.T`` for a product known to be symmetric, ``a = F Sigma_x``,
    ``b = F`` (rows ``(n, K*C)``; Eq. D4): only the blocks on and above the
    diagonal are multiplied (about half the flops of the full product, one BLAS
    call per block row) and the lower triangle is their mirror, so the result
    is exactly symmetric.  Returns (n, n)."""
    n = a.shape[0]
    g = np.empty((n, n), dtype=np.result_type(a, b))
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        g[i0:i1, i0:] = a[i0:i1] @ b[i0:].T
        d = g[i0:i1, i0:i1]
        np.copyto(d, d.T, where=_strict_lower(i1 - i0))  # the diagonal block: its upper triangle, mirrored
        g[i1:, i0:i1] = g[i0:i1, i1:].T
    return g


def _row_slices(n: int, size: int = 256) -> list:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _channel_half(fkc: np.ndarray, cov_c: np.ndarray) -> np.ndarray:
    """``A1[i, p, :] = C_in F[i, :, p]`` as (n, K, C) from filters laid out
    (n, K, C): the channel half of ``Sigma_x F^T`` (one BLAS product)."""
    n, k, c = fkc.shape
    return (fkc.reshape(n * k, c) @ cov_c).reshape(n, k, c)


def _filters_kc(f: np.ndarray, dtype=np.float64) -> np.ndarray:
    """(n, C, K) filters as a C-ordered (n, K, C) array of ``dtype``."""
    return np.ascontiguousarray(np.asarray(f).transpose(0, 2, 1), dtype=dtype)


def _patch_moments(a1: np.ndarray, fkc: np.ndarray) -> np.ndarray:
    """``M_i[p, q] = F_i[:, p]^T C_in F_i[:, q]``, (n, K, K), symmetric in
    (p, q): every diagonal second moment of the layer's output under A2 is a
    contraction of it, ``(W Sigma_x(rho) W^T)_ii = sum_pq R(rho)[p, q] M_i[p, q]``
    (D3 for all grid values, D6 for both lags) -- O(n K^2 C) instead of a
    product with ``C_in`` per value of ``rho``."""
    return np.matmul(a1, fkc.transpose(0, 2, 1))


@dataclass
class InputModel:
    """Covariance model of one layer's input patch (A2) and its calibration (A3).

    ``gram(F1, F2) = F1 Sigma_x F2^T`` for filters F of shape (n, C, K);
    ``mean_dot(F) = F . E[x]``."""

    mean_c: np.ndarray  # (C,)
    cov_c: np.ndarray  # (C, C)
    rho_s: float
    pos: np.ndarray  # (K, 2)
    _r: np.ndarray | None = field(default=None, repr=False, compare=False)
    _memo: tuple | None = field(default=None, repr=False, compare=False)

    def r_s(self) -> np.ndarray:
        if self._r is None:
            self._r = spatial_correlation(self.pos, self.rho_s)
        return self._r

    def remember(self, w: np.ndarray, a: np.ndarray) -> None:
        """Keep ``a = cov_times(F)`` for the layer's own filters, ``F`` the
        weight tensor ``w`` in the (n, C, K) layout (a reshape of it: dense
        conv or linear layer): the pair's statistics (``solve.pair_stats``)
        read the same product.  Only a reference to ``w`` is kept."""
        self._memo = (w, a)

    def cached(self, f: np.ndarray) -> np.ndarray | None:
        """``cov_times(f)`` if ``f`` holds the remembered weights (equal
        values, any float dtype), else None.  Read-only."""
        m = self._memo
        if m is None or m[0].size != f.size or m[1].shape[0] != f.shape[0]:
            return None
        w = m[0].reshape(f.shape[0], -1)
        same = all(np.array_equal(w[r], f[r].reshape(w[r].shape)) for r in _row_slices(f.shape[0]))
        return m[1] if same else None

    def cov_times(self, f: np.ndarray) -> np.ndarray:
        """(Sigma_x F^T) arranged as (n, K, C), see :func:`cov_times`.  Any Gram
        matrix is then ``cov_times(F1).reshape(n1, -1) @ F2^T`` with F2 laid out
        as (n2, K, C)."""
        hit = self.cached(f)
        if hit is not None:
            return hit
        r = self.r_s() if f.shape[2] > 1 and self.rho_s > 0 else None
        return cov_times(f, self.cov_c, r)

    def cov_times_kc(self, fkc: np.ndarray) -> np.ndarray:
        """:meth:`cov_times` for filters already laid out (n, K, C) in the
        covariance's dtype (no transposed copy)."""
        r = self.r_s() if fkc.shape[1] > 1 and self.rho_s > 0 else None
        return _cov_times_kc(fkc, self.cov_c, r)

    def gram(self, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
        a = self.cov_times(f1)
        return a.reshape(a.shape[0], -1) @ _filters_kc(f2, a.dtype).reshape(f2.shape[0], -1).T

    def gram_diag(self, f: np.ndarray) -> np.ndarray:
        a = self.cov_times(f)
        return np.einsum("nkc,nck->n", a, f)

    def mean_dot(self, f: np.ndarray) -> np.ndarray:
        return np.einsum("nck,c->n", f, self.mean_c)


def cov_times(f: np.ndarray, cov_c: np.ndarray, r: np.ndarray | None) -> np.ndarray:
    """Sigma_x F^T for ``Sigma_x = C_in (x) R`` (Eq. A2), the one product every
    second moment of a layer's output is built from (D3, D4, D6).

    Parameters
    ----------
    f : (n, C, K) filters.
    cov_c : (C, C) channel covariance ``C_in``.
    r : (K, K) spatial matrix, a stack (G, K, K) of them (one batched BLAS
        product for all G), or None for the identity.

    Returns
    -------
    (n, K, C), or (G, n, K, C) for a stack: ``out[.., i, p, c] =
    sum_{c', q} C_in[c, c'] R[p, q] F[i, c', q]``.  The filters are cast to ``cov_c``'s dtype (float32 on the fast path,
    float64 on the exact one) and the products run in it.
    """
    return _cov_times_kc(_filters_kc(f, cov_c.dtype), cov_c, r)


def _cov_times_kc(fkc: np.ndarray, cov_c: np.ndarray, r: np.ndarray | None) -> np.ndarray:
    """:func:`cov_times` for filters laid out (n, K, C) in ``cov_c``'s dtype."""
    return _spatial_half(_channel_half(fkc, cov_c), r)


def _spatial_half(a: np.ndarray, r: np.ndarray | None) -> np.ndarray:
    """``R (F C_in)`` from the channel half ``a`` (n, K, C) (:func:`_channel_half`):
    (n, K, C) for one (K, K) matrix ``r``, (G, n, K, C) for a stack, ``a`` for None."""
    if r is None:
        return a
    r = r.astype(a.dtype, copy=False)
    if r.ndim == 2:
        return np.matmul(r, a)  # one (K, K) x (K, C) product per filter
    n, k, c = a.shape
    b = r @ a.transpose(1, 0, 2).reshape(k, n * c)  # a stack (G, K, K): (G, K, n C) in one batched product
    return np.moveaxis(b.reshape(r.shape[:-2] + (k, n, c)), -3, -2)


def fit_rho_s(f: np.ndarray, cov_c: np.ndarray, pos: np.ndarray, bn_var: np.ndarray) -> float:
    """Eq. D3: rho_s minimising the spread of log(bn_var_i / (W Sigma_x(rho) W^T)_ii).

    The BN running variances are the only BN statistic the data model reads
    (A3); all grid values are evaluated in one batched product."""
    if pos.shape[0] == 1:
        return 0.0
    fkc = _filters_kc(f)
    return _fit_rho(_patch_moments(_channel_half(fkc, cov_c), fkc), pos, bn_var)


def _fit_rho(mom: np.ndarray, pos: np.ndarray, bn_var: np.ndarray) -> float:
    """Eq. D3 from the patch moments (:func:`_patch_moments`): all grid values
    of rho in one (n, K^2) x (K^2, 22) product,
    ``diag(W Sigma_x(rho) W^T)_i = sum_pq R(rho)[p, q] M_i[p, q]``."""
    if pos.shape[0] == 1:
        return 0.0
    n = mom.shape[0]
    rg = np.stack([spatial_correlation(pos, rho) for rho in RHO_GRID])
    q = (mom.reshape(n, -1) @ rg.reshape(len(RHO_GRID), -1).T).T  # (G, n): diag(W Sigma_x(rho) W^T)
    live = bn_var > 0
    best, best_err = 0.0, np.inf
    for rho, qg in zip(RHO_GRID, q):
        ok = live & (qg > 0)
        if ok.sum() < 2:
            continue
        d = np.log(bn_var[ok]) - np.log(qg[ok])
        err = float(np.var(d))
        if err < best_err - 1e-12:
            best, best_err = float(rho), err
    return best


def bn_affine(model: Model, bn: Node):
    """(gamma, beta, mean, sigma) of a BN node in float64, sigma = sqrt(var + eps)."""
    g = model.param(bn, "weight").astype(np.float64)
    b = model.param(bn, "bias").astype(np.float64)
    m = model.param(bn, "running_mean").astype(np.float64)
    s = np.sqrt(model.param(bn, "running_var").astype(np.float64) + bn.attrs["eps"])
    return g, b, m, s


def lag_correlation(f: np.ndarray, im: "InputModel", stride) -> float:
    """Eq. D6: lag-1 spatial correlation of a conv's output, variance weighted
    over channels, for input correlation ``im.rho_s`` (horizontal and vertical
    lags averaged; an output lag of 1 is an input lag of ``stride``):
    ``sum_i W_i Cov(x(0), x(stride e)) W_i^T / sum_i W_i Sigma_x W_i^T`` with
    ``Cov(x_p(0), x_q(s e))[p, q] = C_in rho^(|p - q - s e|_1)`` (Manhattan, D2;
    ``0^0 = 1``: a white input still gives correlated outputs where the
    receptive fields overlap).  Kept in [0, 0.99] like every rho."""
    fkc = _filters_kc(f)
    return _lag(_patch_moments(_channel_half(fkc, im.cov_c), fkc).sum(0), im.pos, im.rho_s, stride)


def _lag(msum: np.ndarray, pos: np.ndarray, rho: float, stride) -> float:
    """Eq. D6 from the channel-summed patch moments ``msum = sum_i M_i`` (K, K):
    numerator ``sum_pq rho^|p - q - s e|_1 msum[p, q]`` averaged over the two
    axes, denominator ``sum_i G_ii = sum_pq R_s[p, q] msum[p, q]`` (``0^0 = 1``)."""
    den = float(np.sum(spatial_correlation(pos, rho) * msum))
    if den <= 0:
        return 0.0
    num = 0.0
    for axis, s in ((0, stride[0]), (1, stride[1])):
        shift = np.zeros(2)
        shift[axis] = s
        d = np.abs(pos[:, None, :] - pos[None, :, :] - shift).sum(-1)
        num += float(np.sum(np.power(rho, d) * msum)) / 2
    return float(np.clip(num / den, 0.0, 0.99))


def pool_lag_correlation(rho: float, kernel, stride) -> float:
    """Eq. D8: lag-1 correlation of a k x k pool's output (stride s) for an
    input field with correlation ``rho^(|dy| + |dx|)``, horizontal and vertical
    averaged:  ``sum_{a,b<k} rho^|s + b - a| / sum_{a,b<k} rho^|b - a|`` per axis
    (exact for an average pool of such a field, e.g. rho (1 + rho) / 2 for
    2 x 2 stride 2, padding and borders aside; max pooling uses Eq. D8')."""
    out = 0.0
    for k, s in zip(kernel[:2], stride[:2]):
        a = np.arange(k)
        lag = a[None, :] - a[:, None]
        out += np.power(rho, np.abs(s + lag)).sum() / np.power(rho, np.abs(lag)).sum() / 2
    return float(np.clip(out, 0.0, 0.99))


def _corr(cov: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(cov), 0, None))
    inv = (1.0 / np.where(d > 0, d, 1.0)).astype(cov.dtype)
    r = cov * inv[:, None]
    r *= inv[None, :]
    np.fill_diagonal(r, 1.0)
    return np.clip(r, -1.0, 1.0, out=r)


def activation_stats(mean: np.ndarray, cov: np.ndarray, act: str, rho=None) -> ValueStats:
    """Stats of f(z) for Gaussian z with the given mean/cov (Eq. M1-M3); the
    spatial correlation maps as rho -> sum_n rho^n c_n^2 / Var (Eq. D7)."""
    if act == "identity":
        return ValueStats(mean.copy(), cov.copy(), rho)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    m, v = activation_mean_var(mean, std, act)
    c = hermite_coefficients(mean, std, act)
    rho_out = None
    if rho is not None and v.sum() > 0:
        tail = np.clip(v - (c**2).sum(0), 0, None)
        num = (np.power(rho, np.arange(1, c.shape[0] + 1))[:, None] * c**2).sum() + rho ** (c.shape[0] + 1) * tail.sum()
        rho_out = float(np.clip(num / v.sum(), 0.0, 0.99))
    cov_out = activation_covariance(_corr(cov), c, c, v, v, same=True, marginals=(mean, std, mean, std, act))
    return ValueStats(m, cov_out, rho_out)


class DataModel:
    """Statistics of every value of ``model`` under assumptions A1-A4.

    ``inputs[node]`` is the :class:`InputModel` of each conv/linear layer and
    ``values[name]`` the :class:`ValueStats` of each value (None when
    unknown, e.g. after a flatten).

    With ``lazy=True`` nothing is computed up front: :meth:`advance_to`
    propagates up to a node, the statistics of a value are dropped as soon as
    every node reading it has been propagated, and :meth:`release` drops a
    layer's input model once its caller is done with it -- so memory holds
    only the frontier of the graph, not every N x N covariance at once.
    With ``lazy=True`` and ``skip_unread=True`` (what ``compress`` uses) a
    conv/linear output whose statistics no later node reads (the classifier's
    logits) gets its input model but no output statistics (``value`` is then
    None for it).

    ``dtype`` is the precision of the N x N covariances and of the matrix
    products that build them (Eq. D4, M3): ``float64`` (default) is the exact
    reference path; ``float32`` (what ``compress`` uses unless ``exact``)
    halves their memory and time, with the Mehler series cut at float32
    resolution (derivation, "Precision").  Means, variances and the BN
    calibration (D3) stay float64."""

    def __init__(self, model: Model, lazy: bool = False, dtype=np.float64, skip_unread: bool = False):
        self.model = model
        self.values: dict[str, ValueStats | None] = {}
        self.inputs: dict[str, InputModel] = {}
        self.lazy = lazy
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"the data model's dtype must be float32 or float64, got {self.dtype}")
        c = model.input_shape[0]
        self.values[model.input_name] = ValueStats(np.zeros(c), np.eye(c, dtype=self.dtype))
        self._index = {n.name: i for i, n in enumerate(model.nodes)}
        self._last_use: dict[str, int] = {}
        for i, n in enumerate(model.nodes):
            for v in n.inputs:
                self._last_use[v] = i
            if n.op == "linear":  # a linear after a flatten reads the flatten's input statistics
                p = model.producer(n.inputs[0])
                if p is not None and p.op == "flatten":
                    self._last_use[p.inputs[0]] = max(self._last_use.get(p.inputs[0], i), i)
        self._needed = self._needed_values() if lazy and skip_unread else None
        self._released: set = set()
        self._done = 0
        self.seconds = 0.0  # time spent propagating, for the report's stage split
        if not lazy:
            self.advance_to(model.nodes[-1].name if model.nodes else None)

    def _needed_values(self) -> set:
        """Values whose statistics some later step reads: the inputs of every
        conv/linear layer (its input model) and, backwards, the inputs of every
        node whose own output is needed (one reverse pass, linear)."""
        m = self.model
        needed: set = set()
        for n in reversed(m.nodes):
            if n.op in ("conv2d", "linear") or n.output in needed:
                needed.update(n.inputs)
                if n.op == "linear":
                    p = m.producer(n.inputs[0])
                    if p is not None and p.op == "flatten":
                        needed.add(p.inputs[0])
        return needed

    def advance_to(self, node_name) -> None:
        """Propagate the statistics through ``node_name`` (inclusive)."""
        if node_name is None:
            return
        stop = self._index[node_name]
        t0 = time.perf_counter()
        while self._done <= stop:
            n = self.model.nodes[self._done]
            self.values[n.output] = self._propagate(n)
            if self.lazy:
                for v in n.inputs:
                    if self._last_use.get(v) == self._done:
                        self.values.pop(v, None)
            self._done += 1
        self.seconds += time.perf_counter() - t0

    def propagated(self, node_name: str) -> bool:
        """Whether the statistics have been propagated through ``node_name``
        (it reads none of the node's weights again)."""
        return self._done > self._index[node_name]

    def input_model(self, node_name: str) -> InputModel | None:
        self.advance_to(node_name)
        return self.inputs.get(node_name)

    def value(self, value_name: str) -> ValueStats | None:
        p = self.model.producer(value_name)
        if p is not None:
            self.advance_to(p.name)
        return self.values.get(value_name)

    def release(self, node_name: str) -> None:
        """The caller is done with this layer's input model: drop it (lazy
        mode), also when the data model has not reached the layer yet (it is
        then never kept)."""
        if self.lazy:
            self.inputs.pop(node_name, None)
            self._released.add(node_name)

    def _propagate(self, n: Node) -> ValueStats | None:
        m = self.model
        ins = [self.values.get(i) for i in n.inputs]
        if n.op == "linear" and len(m.shapes[n.inputs[0]]) > 1:
            return None  # a linear on the last axis of a map: not a channel statistic
        if n.op in ("conv2d", "linear"):
            src = ins[0]
            if src is None and n.op == "linear":
                p = m.producer(n.inputs[0])
                if p is not None and p.op == "flatten":
                    src = self.values.get(p.inputs[0])
            dwf = depthwise_filters(m, n)
            f = _layer_filters(m, n) if dwf is None else None
            c_in = f.shape[1] if dwf is None else dwf.shape[0]
            if src is None:
                src = ValueStats(np.zeros(c_in), np.eye(c_in, dtype=self.dtype))
            if c_in != src.mean.shape[0]:
                return None
            pos = spatial_positions(n, m)
            keep = n.name not in self._released
            if self._needed is not None and n.output not in self._needed:  # nobody reads the output statistics
                if keep:
                    self.inputs[n.name] = InputModel(src.mean, src.cov, src.rho if src.rho is not None else 0.0, pos)
                return None
            k = pos.shape[0]
            # a depthwise conv's channel i sees input channel i only: the diagonal quantities (D3, D6) are
            # those of one-channel filters w_i sqrt(C_ii) on a unit input (Eq. D1 without its zeros)
            fd = f if dwf is None else (dwf * np.sqrt(np.clip(np.diag(src.cov), 0, None))[:, None])[:, None, :]
            cd = src.cov if dwf is None else np.eye(1, dtype=self.dtype)
            fkc = _filters_kc(fd, self.dtype)
            a1 = _channel_half(fkc, cd)  # the channel half of Sigma_x F^T, computed once per layer
            mom = _patch_moments(a1, fkc) if k > 1 else None
            nxt = m.consumers(n.output)
            if src.rho is not None and (n.op == "conv2d" or k > 1):
                rho = src.rho  # Eq. D6-D8: propagated
            elif len(nxt) == 1 and nxt[0].op == "batch_norm" and k > 1:
                var = m.param(nxt[0], "running_var").astype(np.float64) + nxt[0].attrs["eps"]
                if mom.dtype != np.float64:  # D3 picks a grid point: always decided in float64
                    f64 = _filters_kc(fd)
                    mom = _patch_moments(_channel_half(f64, cd.astype(np.float64)), f64)
                rho = _fit_rho(mom, pos, var)  # Eq. D3: calibrated on the BN variances
            else:
                rho = 0.0
            im = InputModel(src.mean, src.cov, rho, pos)
            if keep:
                self.inputs[n.name] = im
            if dwf is None:
                a = _spatial_half(a1, im.r_s() if k > 1 and rho > 0 else None)  # Sigma_x F^T (cov_times), (N, K, C)
                if self.lazy and keep and n.attrs.get("groups", 1) == 1:
                    im.remember(m.tensors[n.params["weight"]], a)
                g = gram_sym(a.reshape(a.shape[0], -1), fkc.reshape(fkc.shape[0], -1))
                mean = im.mean_dot(f)
            else:  # G_ij = C_ij w_i R_s w_j^T: O(N^2 K) instead of the dense O(N^3 K)
                g = src.cov * (dwf @ im.r_s() @ dwf.T).astype(self.dtype)
                mean = src.mean * dwf.sum(1)
            b = m.param(n, "bias")
            if b is not None:
                mean = mean + b
            rho_out = None
            if n.op == "conv2d":
                msum = mom.sum(0) if mom is not None else np.einsum("nkc,nkc->", a1, fkc).reshape(1, 1)
                rho_out = _lag(msum, pos, rho, n.attrs["stride"])
            return ValueStats(mean, g, rho_out)
        if n.op == "batch_norm":
            src = ins[0]
            gamma, beta, _, _ = bn_affine(m, n)
            corr = _corr(src.cov) if src is not None and src.cov.shape[0] == gamma.shape[0] else None
            if src is None or src.cov.shape[0] != gamma.shape[0]:
                corr = np.eye(gamma.shape[0], dtype=self.dtype)
            gg = gamma.astype(corr.dtype)
            corr *= gg[:, None]
            corr *= gg[None, :]
            return ValueStats(beta, corr, None if src is None else src.rho)
        if n.op in ACTIVATIONS and n.op != "identity":
            return None if ins[0] is None else activation_stats(ins[0].mean, ins[0].cov, n.op, ins[0].rho)
        if n.op == "identity":
            return ins[0]
        if n.op in ("max_pool2d", "avg_pool2d"):
            s = ins[0]
            if s is None:
                return None
            rho = s.rho
            if rho is not None and n.op == "avg_pool2d":
                rho = pool_lag_correlation(rho, n.attrs["kernel"], n.attrs["stride"])  # Eq. D8
            elif rho is not None:
                rho = float(np.mean(np.power(rho, n.attrs["stride"][:2])))  # Eq. D8': max pool, measured choice
            return ValueStats(s.mean, s.cov, rho)
        if n.op == "global_avg_pool":
            return None if ins[0] is None else ValueStats(ins[0].mean, ins[0].cov, None)
        if n.op in ("add", "concat"):
            if any(s is None for s in ins):
                return None
            rhos = [s.rho for s in ins]
            w = [np.trace(s.cov) for s in ins]
            rho = None if any(r is None for r in rhos) or sum(w) <= 0 else float(np.dot(rhos, w) / sum(w))
            if n.op == "add":
                return ValueStats(sum(s.mean for s in ins), sum(s.cov for s in ins), rho)
            from scipy.linalg import block_diag

            return ValueStats(np.concatenate([s.mean for s in ins]), block_diag(*[s.cov for s in ins]), rho)
        return self._propagate_more(n, ins)

    def _propagate_more(self, n: Node, ins) -> ValueStats | None:
        """A4 through the activations of ``activation_moments`` (Eq. M4-M8)
        and the layout / gating ops (Eq. D9-D11); None (unknown) for the rest
        (softmax, layer_norm, permute across the channel axis, flatten of a
        map, ...)."""
        m = self.model
        src = ins[0] if ins else None
        if n.op in ACTIVATION_OPS:
            return None if src is None else activation_stats(src.mean, src.cov, activation_key(n), src.rho)
        if src is None:
            return None
        s_in, s_out = m.shapes[n.inputs[0]], m.shapes[n.output]
        if n.op == "affine":  # Eq. D9, exact: y_c = w_c x_c + b_c
            if n.attrs["axis"] != 1:
                return None
            w, b = m.param(n, "weight"), m.param(n, "bias")
            w = np.ones(s_in[0]) if w is None else w.astype(np.float64)
            b = np.zeros(s_in[0]) if b is None else b.astype(np.float64)
            return ValueStats(src.mean * w + b, src.cov * np.outer(w, w).astype(src.cov.dtype), src.rho)
        if n.op == "pad":  # Eq. D10: the interior's statistics (as for a conv's own zero padding)
            return src
        if n.op in ("reshape", "flatten", "permute"):  # exact when the channel axis stays axis 1
            keep = s_out[0] == s_in[0] and (n.op != "permute" or n.attrs["perm"][1] == 1)
            if n.op == "flatten":
                keep = all(d == 1 for d in s_in[1:])
            if not keep:
                return None
            return ValueStats(src.mean, src.cov, src.rho if tuple(s_out[1:]) == tuple(s_in[1:]) else None)
        if n.op == "mul":  # Eq. D11: product of independent factors (a gate and a map)
            other = ins[1]
            if other is None or other.mean.shape != src.mean.shape:
                return None
            mean = src.mean * other.mean
            second = (src.cov + np.outer(src.mean, src.mean)) * (other.cov + np.outer(other.mean, other.mean))
            spatial = [s for s, name in zip(ins, n.inputs) if len(m.shapes[name]) == 3 and
                       np.prod(m.shapes[name][1:]) > 1]
            rho = spatial[0].rho if len(spatial) == 1 else None
            return ValueStats(mean, (second - np.outer(mean, mean)).astype(src.cov.dtype), rho)
        return None


def sample_patches(im: InputModel, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` input patches x ~ N(E[x], Sigma_x) of the data model (A2),
    shape (n, C, K).  For auditing the closed forms by Monte Carlo (small C*K)."""
    cov = np.kron(im.cov_c, im.r_s())
    mean = np.repeat(im.mean_c, im.pos.shape[0])
    w, v = np.linalg.eigh(cov)
    root = v * np.sqrt(np.clip(w, 0, None))
    x = mean + rng.standard_normal((n, mean.size)) @ root.T
    return x.reshape(n, im.cov_c.shape[0], im.pos.shape[0])
