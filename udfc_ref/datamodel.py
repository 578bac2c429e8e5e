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

import time
from dataclasses import dataclass

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


def dense_filters(model: Model, node: Node) -> np.ndarray:
    """Layer weights as (O, C_in, K) in float64 (Eq. D1 layout): a grouped
    conv expanded with zeros to all input channels; a linear layer after a
    flatten of (C, H, W) split into C channels of H*W columns (C-order)."""
    w = model.tensors[node.params["weight"]].astype(np.float64)
    if node.op == "linear":
        src = _flatten_source_shape(model, node)
        c = src[0] if src is not None else w.shape[1]
        return w.reshape(w.shape[0], c, -1)
    o, cg, kh, kw = w.shape
    g = node.attrs["groups"]
    if g == 1:
        return w.reshape(o, cg, kh * kw)
    dense = np.zeros((o, cg * g, kh * kw))
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


def _flatten_source_shape(model: Model, node: Node):
    p = model.producer(node.inputs[0])
    if p is not None and p.op == "flatten":
        return model.shapes[p.inputs[0]]
    return None


def spatial_correlation(pos: np.ndarray, rho: float) -> np.ndarray:
    """R_s[p, q] = rho ** (|dy| + |dx|) (Eq. D2)."""
    d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)
    return np.power(rho, d) if rho > 0 else (d == 0).astype(np.float64)


@dataclass
class InputModel:
    """Covariance model of one layer's input patch (A2) and its calibration (A3).

    ``gram(F1, F2) = F1 Sigma_x F2^T`` for filters F of shape (n, C, K);
    ``mean_dot(F) = F . E[x]``."""

    mean_c: np.ndarray  # (C,)
    cov_c: np.ndarray  # (C, C)
    rho_s: float
    pos: np.ndarray  # (K, 2)

    def r_s(self) -> np.ndarray:
        return spatial_correlation(self.pos, self.rho_s)

    def cov_times(self, f: np.ndarray) -> np.ndarray:
        """(Sigma_x F^T) arranged as (n, K, C), see :func:`cov_times`.  Any Gram
        matrix is then ``cov_times(F1).reshape(n1, -1) @ F2^T`` with F2 laid out
        as (n2, K, C)."""
        r = self.r_s() if f.shape[2] > 1 and self.rho_s > 0 else None
        return cov_times(f, self.cov_c, r)

    def gram(self, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
        a = self.cov_times(f1)
        return a.reshape(a.shape[0], -1) @ f2.transpose(0, 2, 1).reshape(f2.shape[0], -1).T

    def gram_diag(self, f: np.ndarray) -> np.ndarray:
        a = self.cov_times(f)
        return np.einsum("nkc,nkc->n", a, f.transpose(0, 2, 1))

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
    sum_{c', q} C_in[c, c'] R[p, q] F[i, c', q]``.
    """
    n, c, k = f.shape
    a = (f.transpose(0, 2, 1).reshape(n * k, c) @ cov_c).reshape(n, k, c)  # channel half: F C_in
    if r is None:
        return a
    b = r @ a.transpose(1, 0, 2).reshape(k, n * c)  # spatial half: R (F C_in), (..., K, n C)
    return np.moveaxis(b.reshape(r.shape[:-2] + (k, n, c)), -3, -2)


def fit_rho_s(f: np.ndarray, cov_c: np.ndarray, pos: np.ndarray, bn_var: np.ndarray) -> float:
    """Eq. D3: rho_s minimising the spread of log(bn_var_i / (W Sigma_x(rho) W^T)_ii).

    The BN running variances are the only BN statistic the data model reads
    (A3); all grid values are evaluated in one batched product."""
    if pos.shape[0] == 1:
        return 0.0
    r = np.stack([spatial_correlation(pos, rho) for rho in RHO_GRID])
    q = np.einsum("gnkc,nck->gn", cov_times(f, cov_c, r), f)  # (G, n): diag(W Sigma_x(rho) W^T)
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
    den = im.gram_diag(f).sum()
    if den <= 0:
        return 0.0
    shifts = np.diag(np.asarray(stride, dtype=np.float64)[:2])  # (2, 2): vertical, horizontal
    d = np.abs(im.pos[None, :, None, :] - im.pos[None, None, :, :] - shifts[:, None, None, :]).sum(-1)
    num = np.einsum("gnkc,nck->", cov_times(f, im.cov_c, np.power(im.rho_s, d)), f) / 2
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
    inv = 1.0 / np.where(d > 0, d, 1.0)
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
    only the frontier of the graph, not every N x N covariance at once."""

    def __init__(self, model: Model, lazy: bool = False):
        self.model = model
        self.values: dict[str, ValueStats | None] = {}
        self.inputs: dict[str, InputModel] = {}
        self.lazy = lazy
        c = model.input_shape[0]
        self.values[model.input_name] = ValueStats(np.zeros(c), np.eye(c))
        self._index = {n.name: i for i, n in enumerate(model.nodes)}
        self._last_use: dict[str, int] = {}
        for i, n in enumerate(model.nodes):
            for v in n.inputs:
                self._last_use[v] = i
            if n.op == "linear":  # a linear after a flatten reads the flatten's input statistics
                p = model.producer(n.inputs[0])
                if p is not None and p.op == "flatten":
                    self._last_use[p.inputs[0]] = max(self._last_use.get(p.inputs[0], i), i)
        self._done = 0
        self.seconds = 0.0  # time spent propagating, for the report's stage split
        if not lazy:
            self.advance_to(model.nodes[-1].name if model.nodes else None)

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

    def input_model(self, node_name: str) -> InputModel | None:
        self.advance_to(node_name)
        return self.inputs.get(node_name)

    def value(self, value_name: str) -> ValueStats | None:
        p = self.model.producer(value_name)
        if p is not None:
            self.advance_to(p.name)
        return self.values.get(value_name)

    def release(self, node_name: str) -> None:
        if self.lazy:
            self.inputs.pop(node_name, None)

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
            f = dense_filters(m, n) if dwf is None else None
            c_in = f.shape[1] if dwf is None else dwf.shape[0]
            if src is None:
                src = ValueStats(np.zeros(c_in), np.eye(c_in))
            if c_in != src.mean.shape[0]:
                return None
            pos = spatial_positions(n, m)
            # a depthwise conv's channel i sees input channel i only: the diagonal quantities (D3, D6) are
            # those of one-channel filters w_i sqrt(C_ii) on a unit input (Eq. D1 without its zeros)
            fd = f if dwf is None else (dwf * np.sqrt(np.clip(np.diag(src.cov), 0, None))[:, None])[:, None, :]
            cd = src.cov if dwf is None else np.eye(1)
            nxt = m.consumers(n.output)
            if src.rho is not None and (n.op == "conv2d" or pos.shape[0] > 1):
                rho = src.rho  # Eq. D6-D8: propagated
            elif len(nxt) == 1 and nxt[0].op == "batch_norm":
                var = m.param(nxt[0], "running_var").astype(np.float64) + nxt[0].attrs["eps"]
                rho = fit_rho_s(fd, cd, pos, var)  # Eq. D3: calibrated on the BN variances
            else:
                rho = 0.0
            im = InputModel(src.mean, src.cov, rho, pos)
            self.inputs[n.name] = im
            if dwf is None:
                g = im.gram(f, f)
                mean = im.mean_dot(f)
            else:  # G_ij = C_ij w_i R_s w_j^T: O(N^2 K) instead of the dense O(N^3 K)
                g = src.cov * (dwf @ im.r_s() @ dwf.T)
                mean = src.mean * dwf.sum(1)
            b = m.param(n, "bias")
            if b is not None:
                mean = mean + b
            im_d = im if dwf is None else InputModel(np.zeros(1), cd, rho, pos)
            rho_out = lag_correlation(fd, im_d, n.attrs["stride"]) if n.op == "conv2d" else None
            return ValueStats(mean, g, rho_out)
        if n.op == "batch_norm":
            src = ins[0]
            gamma, beta, _, _ = bn_affine(m, n)
            corr = _corr(src.cov) if src is not None and src.cov.shape[0] == gamma.shape[0] else np.eye(gamma.shape[0])
            return ValueStats(beta, corr * np.outer(gamma, gamma), None if src is None else src.rho)
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
            return ValueStats(src.mean * w + b, src.cov * np.outer(w, w), src.rho)
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
            return ValueStats(mean, second - np.outer(mean, mean), rho)
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
