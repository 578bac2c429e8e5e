"""The field model: channel statistics at every spatial lag (derivation
section 13, Eq. F1-F8).

The data model (A2) takes the covariance of a layer's input patch as
separable, ``C_in (x) R_s(rho)``: one channel covariance times one spatial
correlation ``rho^(|dy| + |dx|)`` for every pair of channels.  Measured on
the benchmark networks, that alone errs by 0.40-0.48 (relative, off-diagonal
correlations) in a conv's output even when ``C_in`` is the real one.  The
field model keeps instead, for every value of C channels on an H x W map, the
**lag covariances** of a stationary Gaussian field (Eq. F1)::

    S[c, k](d) = Cov(x_c(u), x_k(u + d)),   d in [-(H-1), H-1] x [-(W-1), W-1]

and propagates them exactly through every linear op -- a conv is a product
per spatial frequency, ``S^_y(w) = W^(w) S^_x(w) W^(w)^H`` (Eq. F2) -- and
through a pointwise activation by Mehler's expansion at every lag (Eq. F4,
M3 on the lag correlations).  A value read through a global average pool
gets the exact covariance of the average of a finite stationary map
(Eq. F6), which the separable model cannot give (there it is proportional to
the per-position one).  Borders are ignored (the field is stationary; zero
padding is the same approximation as R2 / D10).

Like ``jointmodel``, a value can hold the original network's channels and
the compressed network's ones stacked (``Field.n`` original channels first):
cross-covariances at every lag come for free, and the same two statistics
sources exist -- independent (each pair on the original input) and
sequential (the compressed network as built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from .activation_moments import activation_key
from .datamodel import DataModel, ValueStats, bn_affine, dense_filters
from .graph import Model, Node
from .jointmodel import JointModel, JointStats, _safe_inv
from .moments import activation_covariance, activation_mean_var, hermite_coefficients
from .ops import ACTIVATION_OPS
from .solve import PairStats

#: the largest lag kept per axis; a map wider than 2 * MAX_LAG + 1 keeps lags up to it only
MAX_LAG = 27


@dataclass
class Field:
    """Lag statistics of a value (Eq. F1): ``mean`` (C,), ``S`` (C, C, Ly, Lx)
    with lag (0, 0) at the centre ``(Ly // 2, Lx // 2)``; ``n`` of the C
    channels are the original network's, the others (if any) the compressed
    network's.  A vector value (after a global pool) has Ly = Lx = 1."""

    mean: np.ndarray
    S: np.ndarray
    n: int

    @property
    def lag0(self) -> np.ndarray:
        ly, lx = self.S.shape[2:]
        return self.S[:, :, ly // 2, lx // 2]

    @property
    def orig(self) -> "Field":
        return Field(self.mean[: self.n], self.S[: self.n, : self.n], self.n)

    @property
    def mean_c(self):  # compatibility with JointValue (None when only the original is held)
        return None if self.mean.shape[0] == self.n else self.mean[self.n:]

    def undamaged(self) -> "Field":
        """The original channels stacked twice: a compressed side equal to the original."""
        o = self.orig
        idx = np.concatenate([np.arange(o.n), np.arange(o.n)])
        return Field(o.mean[idx], o.S[np.ix_(idx, idx)], o.n)

    def pair_stats(self, kept) -> PairStats:
        c, n = self.lag0, self.n
        return PairStats(self.mean[:n].copy(), np.diag(c)[:n].copy(), self.mean[n:].copy(), c[n:, n:].copy(),
                         c[:n, n:].copy(), np.asarray(kept))


def _center(ly, lx):
    return ly // 2, lx // 2


def _crop(S: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Keep lags |dy| <= ry, |dx| <= rx."""
    ly, lx = S.shape[2:]
    cy, cx = _center(ly, lx)
    return S[:, :, cy - ry:cy + ry + 1, cx - rx:cx + rx + 1]


def _lag_radius(h: int, w: int) -> tuple[int, int]:
    return min(h - 1, MAX_LAG), min(w - 1, MAX_LAG)


def linear_field(f: Field, F: np.ndarray, stride, dilation, out_hw, bias=None, n_out=None) -> Field:
    """Eq. F2: ``y_i(u) = sum_{c,p} F[i, c, p] x_c(s u + p)`` on lag statistics:
    ``T_ij(d) = sum_{c,k,p,q} F_icp F_jkq S_ck(d + q - p)``, one matrix
    product per spatial frequency of an FFT grid large enough that nothing
    wraps, then the lags ``d = s D`` of the output.  ``F`` (O, C, kh, kw)."""
    o, c, kh, kw = F.shape
    ly, lx = f.S.shape[2:]
    ry, rx = ly // 2, lx // 2
    ey, ex = (kh - 1) * dilation[0], (kw - 1) * dilation[1]
    gy = scipy.fft.next_fast_len(ly + 2 * ey)
    gx = scipy.fft.next_fast_len(lx + 2 * ex)
    grid = np.zeros((c, c, gy, gx))
    dy, dx = np.arange(-ry, ry + 1) % gy, np.arange(-rx, rx + 1) % gx
    grid[:, :, dy[:, None], dx[None, :]] = f.S
    Sh = scipy.fft.rfft2(grid, axes=(2, 3))  # (C, C, gy, gx//2+1)
    fg = np.zeros((o, c, gy, gx))
    fg[:, :, (np.arange(kh) * dilation[0])[:, None], (np.arange(kw) * dilation[1])[None, :]] = F
    Fh = scipy.fft.rfft2(fg, axes=(2, 3))  # (O, C, gy, gx//2+1)
    Fh = np.moveaxis(Fh, (0, 1), (-2, -1))  # (gy, gx', O, C)
    Sh = np.moveaxis(Sh, (0, 1), (-2, -1))
    Th = Fh @ Sh @ np.conj(np.swapaxes(Fh, -1, -2))  # (gy, gx', O, O)
    T = scipy.fft.irfft2(np.moveaxis(Th, (-2, -1), (0, 1)), s=(gy, gx), axes=(2, 3))
    oy, ox = _lag_radius(*out_hw)
    sy, sx = stride
    iy = (np.arange(-oy, oy + 1) * sy) % gy
    ix = (np.arange(-ox, ox + 1) * sx) % gx
    S = T[:, :, iy[:, None], ix[None, :]]
    S = (S + np.swapaxes(S, 0, 1)[:, :, ::-1, ::-1]) / 2  # exact symmetry S_ij(d) = S_ji(-d)
    mean = np.einsum("ocyx,c->o", F, f.mean)
    if bias is not None:
        mean = mean + bias
    return Field(mean, S, o if n_out is None else n_out)


def depthwise_field(f: Field, w: np.ndarray, stride, dilation, out_hw, bias=None) -> Field:
    """Eq. F3: a depthwise conv (one filter ``w`` (C, kh, kw) per channel):
    ``T^_ck(w) = w^_c(w) S^_ck(w) conj(w^_k(w))``."""
    c, kh, kw = w.shape
    ly, lx = f.S.shape[2:]
    ry, rx = ly // 2, lx // 2
    ey, ex = (kh - 1) * dilation[0], (kw - 1) * dilation[1]
    gy = scipy.fft.next_fast_len(ly + 2 * ey)
    gx = scipy.fft.next_fast_len(lx + 2 * ex)
    grid = np.zeros((c, c, gy, gx))
    dy, dx = np.arange(-ry, ry + 1) % gy, np.arange(-rx, rx + 1) % gx
    grid[:, :, dy[:, None], dx[None, :]] = f.S
    Sh = scipy.fft.rfft2(grid, axes=(2, 3))
    fg = np.zeros((c, gy, gx))
    fg[:, (np.arange(kh) * dilation[0])[:, None], (np.arange(kw) * dilation[1])[None, :]] = w
    wh = scipy.fft.rfft2(fg, axes=(1, 2))
    Th = wh[:, None] * Sh * np.conj(wh[None, :])
    T = scipy.fft.irfft2(Th, s=(gy, gx), axes=(2, 3))
    oy, ox = _lag_radius(*out_hw)
    iy = (np.arange(-oy, oy + 1) * stride[0]) % gy
    ix = (np.arange(-ox, ox + 1) * stride[1]) % gx
    S = T[:, :, iy[:, None], ix[None, :]]
    S = (S + np.swapaxes(S, 0, 1)[:, :, ::-1, ::-1]) / 2
    mean = f.mean * w.reshape(c, -1).sum(1)
    if bias is not None:
        mean = mean + bias
    return Field(mean, S, f.n)


def global_pool_field(f: Field, hw) -> Field:
    """Eq. F6: the average of a finite H x W stationary map:
    ``Cov = sum_d S(d) (H - |dy|)(W - |dx|) / (H W)^2``."""
    h, w = hw
    ly, lx = f.S.shape[2:]
    ry, rx = ly // 2, lx // 2
    wy = np.clip(h - np.abs(np.arange(-ry, ry + 1)), 0, None)
    wx = np.clip(w - np.abs(np.arange(-rx, rx + 1)), 0, None)
    cov = np.einsum("ckyx,y,x->ck", f.S, wy.astype(float), wx.astype(float)) / float(h * w) ** 2
    cov = (cov + cov.T) / 2
    return Field(f.mean.copy(), cov[:, :, None, None], f.n)


def activation_field(f: Field, key: str) -> Field:
    """Eq. F4: Mehler's expansion (M3) at every lag, each channel with its
    own marginals: ``S'_ck(d) = sum_n rho_ck(d)^n c_n(c) c_n(k)``,
    ``rho_ck(d) = S_ck(d) / (s_c s_k)``; the variance (lag 0, c = k) exact."""
    c = f.mean.shape[0]
    ly, lx = f.S.shape[2:]
    cy, cx = _center(ly, lx)
    s = np.sqrt(np.clip(np.diagonal(f.S[:, :, cy, cx]), 0, None))
    m, v = activation_mean_var(f.mean, s, key)
    coef = hermite_coefficients(f.mean, s, key)
    inv = _safe_inv(s)
    rho = np.clip(f.S * inv[:, None, None, None] * inv[None, :, None, None], -1.0, 1.0)
    L = ly * lx
    rho2 = rho.reshape(c, c * L)
    out = activation_covariance(rho2, coef, np.repeat(coef, L, axis=1), v, np.repeat(v, L))
    S = out.reshape(c, c, ly, lx)
    S[np.arange(c), np.arange(c), cy, cx] = v
    return Field(m, S, f.n)


def scale_field(f: Field, a: np.ndarray, b: np.ndarray) -> Field:
    """A per-channel affine map ``y = a x + b`` (exact)."""
    return Field(a * f.mean + b, f.S * a[:, None, None, None] * a[None, :, None, None], f.n)


def pool_field(f: Field, node: Node, out_hw) -> Field:
    """A k x k pool of stride s (Eq. F7): an average pool exactly (a
    depthwise conv with weights 1/k^2); a max pool keeps the per-position
    statistics and samples the lags at the stride (the data model's
    approximation, D8, at every lag)."""
    kh, kw = node.attrs["kernel"]
    if node.op == "avg_pool2d":
        c = f.mean.shape[0]
        return depthwise_field(f, np.full((c, kh, kw), 1.0 / (kh * kw)), node.attrs["stride"], (1, 1), out_hw)
    oy, ox = _lag_radius(*out_hw)
    ly, lx = f.S.shape[2:]
    cy, cx = _center(ly, lx)
    sy, sx = node.attrs["stride"]
    iy = cy + np.arange(-oy, oy + 1) * sy
    ix = cx + np.arange(-ox, ox + 1) * sx
    ok_y, ok_x = (iy >= 0) & (iy < ly), (ix >= 0) & (ix < lx)
    S = np.zeros(f.S.shape[:2] + (iy.size, ix.size))
    S[:, :, np.nonzero(ok_y)[0][:, None], np.nonzero(ok_x)[0][None, :]] = f.S[:, :, iy[ok_y][:, None], ix[ok_x][None, :]]
    return Field(f.mean.copy(), S, f.n)


class FieldModel(JointModel):
    """Eq. F1-F8 on ``orig`` and (stacked) ``comp``; the walk, the frontier
    and the sources are those of :class:`~udfc_ref.jointmodel.JointModel`."""

    def __init__(self, orig: Model, comp: Model, track_comp: bool = True):
        super().__init__(orig, comp, track_comp)
        c, h, w = orig.input_shape
        ry, rx = _lag_radius(h, w)
        rho = self._input_rho()
        dy, dx = np.arange(-ry, ry + 1), np.arange(-rx, rx + 1)
        r = np.power(rho, np.abs(dy)[:, None] + np.abs(dx)[None, :]) if rho > 0 else \
            ((dy[:, None] == 0) & (dx[None, :] == 0)).astype(float)
        S = np.eye(c)[:, :, None, None] * r[None, None]
        f = Field(np.zeros(c), S, c)
        self.values[orig.input_name] = f.undamaged() if track_comp else f

    def _input_rho(self) -> float:
        """The input's lag-1 correlation: the data model's Eq. D3 on the first
        layer reading the input (A3)."""
        for n in self.orig.consumers(self.orig.input_name):
            if n.op in ("conv2d", "linear"):
                dm = DataModel(self.orig, lazy=True)
                dm.values = {self.orig.input_name: ValueStats(np.zeros(self.orig.input_shape[0]),
                                                              np.eye(self.orig.input_shape[0]))}
                dm._propagate(n)
                im = dm.inputs.get(n.name)
                return 0.0 if im is None else float(im.rho_s)
        return 0.0

    def hw(self, value: str):
        s = self.orig.shapes[value]
        return (s[1], s[2]) if len(s) == 3 else (1, 1)

    def propagate(self, n: Node, ins: dict, embedded=None, with_comp=None):
        comp_on = self.track_comp if with_comp is None else with_comp
        js = [ins.get(v) for v in n.inputs]
        src = js[0] if js else None
        out_hw = self.hw(n.output)
        if n.op in ("conv2d", "linear"):
            return self._layer(n, ins, embedded, comp_on, out_hw)
        if src is None:
            return None
        if not comp_on and src.mean.shape[0] != src.n:
            src = src.orig
        if n.op == "batch_norm":
            return self._batch_norm(n, src, embedded)
        if n.op in ACTIVATION_OPS and n.op != "identity":
            return activation_field(src, activation_key(n))
        if n.op in ("max_pool2d", "avg_pool2d"):
            return pool_field(src, n, out_hw)
        if n.op == "global_avg_pool":
            return global_pool_field(src, self.hw(n.inputs[0]))
        if n.op == "affine":
            if n.attrs["axis"] != 1:
                return None
            a, b = self._affine_params(n, src)
            return scale_field(src, a, b)
        if n.op in ("add", "concat", "mul") and any(j is None for j in js):
            return None
        if n.op == "add":
            js = [j if comp_on or j.mean.shape[0] == j.n else j.orig for j in js]
            return Field(sum(j.mean for j in js), sum(_crop_to(j.S, js[0].S) for j in js), js[0].n)
        if n.op == "concat":
            return _concat([j if comp_on or j.mean.shape[0] == j.n else j.orig for j in js])
        if n.op == "mul":
            a, g = [j if comp_on or j.mean.shape[0] == j.n else j.orig for j in js]
            if a.S.shape[2] == 1 and g.S.shape[2] > 1:
                a, g = g, a
            mg = g.mean
            sg = g.lag0 + np.outer(mg, mg)
            m = a.mean * mg
            S = (a.S + np.outer(a.mean, a.mean)[:, :, None, None]) * sg[:, :, None, None] \
                - np.outer(m, m)[:, :, None, None]
            return Field(m, S, a.n)
        if n.op in ("identity", "pad"):
            return src
        if n.op in ("reshape", "flatten", "permute"):
            s_in, s_out = self.orig.shapes[n.inputs[0]], self.orig.shapes[n.output]
            keep = s_out[0] == s_in[0] and (n.op != "permute" or n.attrs["perm"][1] == 1)
            if n.op == "flatten":
                keep = all(d == 1 for d in s_in[1:])
            if not keep:
                return None
            ly, lx = _lag_radius(*out_hw)
            return Field(src.mean, _crop(src.S, ly, lx) if src.S.shape[2] > 2 * ly + 1 else src.S, src.n)
        return None

    def _affine_params(self, n, src):
        no = src.n
        wo, bo = self.orig.param(n, "weight"), self.orig.param(n, "bias")
        wo = np.ones(no) if wo is None else wo.astype(np.float64)
        bo = np.zeros(no) if bo is None else bo.astype(np.float64)
        if src.mean.shape[0] == no:
            return wo, bo
        cn = self.comp.node(n.name)
        m = src.mean.shape[0] - no
        wc, bc = self.comp.param(cn, "weight"), self.comp.param(cn, "bias")
        wc = np.ones(m) if wc is None else wc.astype(np.float64)
        bc = np.zeros(m) if bc is None else bc.astype(np.float64)
        return np.concatenate([wo, wc]), np.concatenate([bo, bc])

    def _layer(self, n: Node, ins: dict, emb, comp_on: bool, out_hw):
        m = self.orig
        src = ins.get(n.inputs[0])
        if n.op == "linear" and len(m.shapes[n.inputs[0]]) > 1:
            return None  # a linear layer on the last axis of a map
        hw_in = self.hw(n.inputs[0])
        flat = False
        if n.op == "linear":
            p = m.producer(n.inputs[0])
            if p is not None and p.op == "flatten":
                src, hw_in, flat = ins.get(p.inputs[0]), self.hw(p.inputs[0]), True
        wo = m.tensors[n.params["weight"]]
        c_in = wo.shape[1] if n.op == "linear" else None
        if src is None:  # unknown input: white, the same values in both networks (as the data model)
            c = (m.shapes[p.inputs[0]][0] if flat else m.shapes[n.inputs[0]][0])
            src = Field(np.zeros(c), np.eye(c)[:, :, None, None], c)
            src = src.undamaged() if comp_on else src
        emb_here = emb is not None and emb.producer == n.name
        if emb_here or (not comp_on and src.mean.shape[0] != src.n):
            src = src.orig.undamaged() if emb_here else src.orig
        no_in = src.n
        mc_in = src.mean.shape[0] - no_in
        Fo, dwo, geom = self._filters(m, n, no_in, hw_in, flat)
        bo = m.param(n, "bias")
        bo = None if bo is None else bo.astype(np.float64)
        if mc_in == 0:
            if dwo is not None:
                return depthwise_field(src, dwo, *geom, out_hw, bo)
            return linear_field(src, Fo, *geom, out_hw, bo)
        if emb_here:
            kh, kw = Fo.shape[2:]
            Fc, dwc = emb.Wq.reshape(emb.Wq.shape[0], emb.Wq.shape[1], kh, kw), None
            bc = emb.bias
        else:
            cn = self.comp.node(n.name)
            Fc, dwc, _ = self._filters(self.comp, cn, mc_in, hw_in, flat)
            bc = self.comp.param(cn, "bias")
            bc = None if bc is None else bc.astype(np.float64)
        zo = np.zeros((Fo if dwo is None else dwo).shape[0]) if bo is None else bo
        zc = np.zeros((Fc if dwc is None else dwc).shape[0]) if bc is None else bc
        if dwo is not None and dwc is not None:
            return depthwise_field(src, np.concatenate([dwo, dwc]), *geom, out_hw, np.concatenate([zo, zc]))
        if dwo is not None:
            Fo = _dense_depthwise(dwo)
        if dwc is not None:
            Fc = _dense_depthwise(dwc)
        F = np.zeros((Fo.shape[0] + Fc.shape[0], no_in + mc_in) + Fo.shape[2:])
        F[: Fo.shape[0], :no_in] = Fo
        F[Fo.shape[0]:, no_in:] = Fc
        return linear_field(src, F, *geom, out_hw, np.concatenate([zo, zc]), n_out=Fo.shape[0])

    def _filters(self, model: Model, node: Node, c_in: int, hw_in, flat):
        """(dense (O, C, kh, kw) or None, depthwise (O, kh, kw) or None,
        (stride, dilation)) of a layer of ``model`` reading ``c_in`` channels."""
        w = model.tensors[node.params["weight"]].astype(np.float64)
        if node.op == "linear":
            if flat:
                return w.reshape(w.shape[0], c_in, hw_in[0], hw_in[1]), None, ((1, 1), (1, 1))
            return w.reshape(w.shape[0], c_in, 1, 1), None, ((1, 1), (1, 1))
        g = node.attrs["groups"]
        geom = (tuple(node.attrs["stride"]), tuple(node.attrs["dilation"]))
        if g != 1 and g == c_in and w.shape[:2] == (c_in, 1):
            return None, w[:, 0], geom
        d = dense_filters(model, node)
        return d.reshape(d.shape[0], d.shape[1], w.shape[2], w.shape[3]), None, geom

    def _batch_norm(self, n: Node, src: Field, emb) -> Field:
        """A1 for the original channels (standardised by the propagated
        std, the BN's marginals) and Eq. J3 for the compressed ones."""
        g, beta, mu, sig = bn_affine(self.orig, n)
        no = src.n
        s_all = np.sqrt(np.clip(np.diagonal(src.lag0), 0, None))
        s = s_all[:no]
        a_o = g * _safe_inv(s)
        b_o = beta - a_o * src.mean[:no]
        if src.mean.shape[0] == no:
            return scale_field(src, a_o, b_o)
        idx = self.kept_of.get(n.name)
        m = src.mean.shape[0] - no
        if emb is not None and emb.bn == n.name:
            gc, bc, muc, sigc = g[idx], beta[idx], mu[idx], sig[idx]
        else:
            gc, bc, muc, sigc = bn_affine(self.comp, self.comp.node(n.name))
        if idx is None:
            if m != no:
                raise RuntimeError(f"field model: BN {n.name!r} has {m} of {no} channels, which is unknown")
            idx = np.arange(m)
        gk, sk = g[idx], s[idx]
        ratio = np.where(gk != 0, (gc / sigc) / np.where(gk != 0, gk / sig[idx], 1.0), 1.0)
        a_c = ratio * a_o[idx]
        b_c = -a_c * src.mean[:no][idx] + ratio * gk * (mu[idx] - muc) * _safe_inv(sk) + bc
        return scale_field(src, np.concatenate([a_o, a_c]), np.concatenate([b_o, b_c]))


def _dense_depthwise(dw: np.ndarray) -> np.ndarray:
    c = dw.shape[0]
    F = np.zeros((c, c) + dw.shape[1:])
    F[np.arange(c), np.arange(c)] = dw
    return F


def _crop_to(S, ref):
    if S.shape[2:] == ref.shape[2:]:
        return S
    ly, lx = ref.shape[2:]
    return _crop(S, ly // 2, lx // 2)


def _concat(js) -> Field:
    """Block-diagonal in the channels (independent inputs, A4), each part's
    original channels first: [o1, o2, ..., c1, c2, ...]."""
    ly = min(j.S.shape[2] for j in js)
    lx = min(j.S.shape[3] for j in js)
    parts_o = [np.arange(j.n) for j in js]
    parts_c = [np.arange(j.n, j.mean.shape[0]) for j in js]
    sizes = [j.mean.shape[0] for j in js]
    offs = np.cumsum([0] + sizes[:-1])
    order = np.concatenate([o + p for o, p in zip(offs, parts_o)] + [o + p for o, p in zip(offs, parts_c)])
    total = sum(sizes)
    S = np.zeros((total, total, ly, lx))
    mean = np.concatenate([j.mean for j in js])
    for o, j in zip(offs, js):
        k = j.mean.shape[0]
        S[o:o + k, o:o + k] = _crop(j.S, ly // 2, lx // 2)
    return Field(mean[order], S[np.ix_(order, order)], sum(j.n for j in js))


class FieldStats(JointStats):
    """The statistics source of the field model (Eq. F8): as
    :class:`~udfc_ref.jointmodel.JointStats`, with lag statistics."""

    def __init__(self, orig: Model, comp: Model, sequential: bool = False):
        self.orig, self.comp, self.sequential = orig, comp, sequential
        self.jm = FieldModel(orig, comp, track_comp=sequential)
        self.name = "field-joint" if sequential else "field"
