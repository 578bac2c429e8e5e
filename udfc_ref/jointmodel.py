"""The joint data model of the original and the compressed network
(derivation section 12, Eq. J1-J7).

The data model (``datamodel.py``, A1-A4) gives the Gaussian statistics of
every value of the *original* network.  The solver of a pair also needs the
statistics of the *compressed* network's kept channels and their
cross-covariance with the original ones.  Today's data-free method (Eq.
D4-D5) takes the compressed channels as the pair's own filters applied to
the original input: every pair assumes a perfect upstream.  The joint model
propagates, value by value, the statistics of both networks together --

* ``orig``: the original network's :class:`~udfc_ref.datamodel.ValueStats`
  (exactly the data model's, A1-A4, D6-D11);
* ``mean_c`` (M,), ``cov_c`` (M, M): the compressed network's value, M its
  channel count there;
* ``cross`` (N, M): ``Cov(v_orig, v_comp)``;

through every op with the compressed network's *actual* weights (Eq.
J1-J6), so a pair's kept channels carry what the upstream pairs left
(``sequential``, the data-free analogue of the calibration oracle) and the
solver rebuilds the original activations from them.  With
``sequential=False`` each pair starts from the original network's input of
its producer (the compressed side equal to the original there) and only its
own damage -- its kept filters with their quantization error (Eq. D4), and,
for a depthwise chain or an SE gate, everything after the producer -- is
propagated (the data-free analogue of the independent oracle).

Only nodes a request needs are propagated, each once, when the compressed
network's weights they read are final (the walk of ``compress`` guarantees
it, section 9); a value's statistics are dropped once every node reading it
has been propagated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .activation_moments import activation_key
from .datamodel import DataModel, InputModel, ValueStats, _corr, bn_affine, dense_filters
from .graph import Model, Node
from .moments import activation_covariance, activation_mean_var, hermite_coefficients
from .ops import ACTIVATION_OPS
from .solve import PairStats
from .sources import StatsRequest, read_value


@dataclass
class JointValue:
    """Statistics of one value in both networks (Eq. J1).

    ``orig`` is the original network's ValueStats (N channels); the
    compressed network's value has M channels with mean ``mean_c`` (M,) and
    covariance ``cov_c`` (M, M); ``cross`` (N, M) is their cross-covariance."""

    orig: ValueStats
    mean_c: np.ndarray
    cov_c: np.ndarray
    cross: np.ndarray

    @classmethod
    def same(cls, vs: ValueStats) -> "JointValue":
        """The compressed value equal to the original (an undamaged input)."""
        return cls(vs, vs.mean.copy(), vs.cov.copy(), vs.cov.copy())

    def undamaged(self) -> "JointValue":
        """This value's original side, with a compressed side equal to it."""
        return JointValue.same(self.orig)

    def pair_stats(self, kept) -> PairStats:
        return PairStats(self.orig.mean.copy(), np.diag(self.orig.cov).copy(), self.mean_c.copy(), self.cov_c.copy(),
                         self.cross.copy(), np.asarray(kept))


@dataclass
class Embedded:
    """The independent model of one pair (Eq. D4-D5): the producer
    ``producer`` reads the original network's input with the kept filters in
    the original input coordinates ``Wq`` (M, C, K) and the bias ``bias``
    (M,) (the original's kept entries plus the pair's own bias-correction
    shift), and its BN ``bn`` is the original's kept rows -- so that a shift
    earlier pairs absorbed into the compressed layers is not counted twice."""

    producer: str
    Wq: np.ndarray
    bias: np.ndarray | None
    bn: str


def embedded_bias(orig: Model, req: StatsRequest) -> np.ndarray | None:
    """The pre-BN constant of a pair's kept channels in the independent
    model: the original bias at the kept channels plus ``req.extra``."""
    b = orig.param(req.pair.producer, "bias")
    b = None if b is None else b.astype(np.float64)[req.kept]
    if req.extra is not None:
        b = req.extra if b is None else b + req.extra
    return b


def _safe_inv(s):
    return np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)


def _layer_filters(model: Model, node: Node, c_in: int):
    """(dense (O, C, K) or None, depthwise (O, K) or None) of a conv / linear
    layer of ``model`` reading ``c_in`` channels (Eq. D1; the compressed
    model's recorded shapes are stale during the walk, so the channel count
    comes from the statistics)."""
    w = model.tensors[node.params["weight"]]
    if node.op == "linear":
        return w.astype(np.float64).reshape(w.shape[0], c_in, -1), None
    g = node.attrs["groups"]
    if g != 1 and g == c_in and w.shape[:2] == (c_in, 1):
        return None, w.reshape(c_in, -1).astype(np.float64)
    return dense_filters(model, node), None


class JointModel:
    """Joint statistics (Eq. J1-J6) of ``orig`` and ``comp`` (the compressed
    model ``compress`` is building; read, never written).

    :meth:`value` propagates what a value needs and returns its
    :class:`JointValue`; :meth:`set_kept` tells which original channels a
    pruned BN keeps (the compressed BN is expressed relative to the
    original's normalisation, Eq. J3).  With ``track_comp=False`` only the
    original side is kept (the JointValue's compressed fields are None)."""

    def __init__(self, orig: Model, comp: Model, track_comp: bool = True):
        self.orig, self.comp, self.track_comp = orig, comp, track_comp
        self._dm = DataModel(orig, lazy=True)  # its single-node rules give the original side (A4)
        self.index = {n.name: i for i, n in enumerate(orig.nodes)}
        self.values: dict[str, JointValue | None] = {}
        self.done: set[str] = set()
        self.held: set[str] = set()
        self.kept_of: dict[str, np.ndarray] = {}
        self.seconds = 0.0
        c = orig.input_shape[0]
        white = ValueStats(np.zeros(c), np.eye(c))
        self.values[orig.input_name] = JointValue.same(white) if track_comp else JointValue(white, None, None, None)

    def set_kept(self, bn_name: str, kept) -> None:
        self.kept_of[bn_name] = np.asarray(kept)

    # ------------------------------------------------------------ walking
    def reads(self, n: Node) -> list[str]:
        """The values a node's rule reads: its inputs, and for a linear layer
        after a flatten the flatten's input (D1)."""
        r = list(n.inputs)
        if n.op == "linear":
            p = self.orig.producer(n.inputs[0])
            if p is not None and p.op == "flatten":
                r.append(p.inputs[0])
        return r

    def _needed(self, target: str) -> list[Node]:
        need, stack, seen = {}, [target], set()
        while stack:
            v = stack.pop()
            if v in seen or v in self.values:
                continue
            seen.add(v)
            p = self.orig.producer(v)
            if p is None:
                continue
            if p.name in self.done:
                raise RuntimeError(f"joint model: value {v!r} was dropped before its last reader")
            need[p.name] = p
            stack.extend(self.reads(p))
        return sorted(need.values(), key=lambda n: self.index[n.name])

    def _all_read(self, v: str) -> bool:
        readers = list(self.orig.consumers(v))
        for c in list(readers):
            if c.op == "flatten":  # a linear after it reads the flatten's input (D1)
                readers += [r for r in self.orig.consumers(c.output) if r.op == "linear"]
        return all(c.name in self.done for c in readers)

    def hold(self, values) -> None:
        """Keep ``values`` (once propagated) until :meth:`unhold`."""
        self.held |= set(values)

    def unhold(self) -> None:
        self.held.clear()
        self._collect(())

    def _collect(self, keep) -> None:
        for v in list(self.values):
            if v not in keep and v not in self.held and self._all_read(v):
                del self.values[v]

    def value(self, name: str) -> JointValue | None:
        """The joint statistics of value ``name`` (propagated on demand;
        afterwards every value all of whose readers have been propagated is
        dropped, unless held)."""
        t0 = time.perf_counter()
        for n in self._needed(name):
            self.values[n.output] = self.propagate(n, {v: self.values.get(v) for v in self.reads(n)})
            self.done.add(n.name)
        jv = self.values.get(name)
        self._collect({name})
        self.seconds += time.perf_counter() - t0
        return jv

    # ------------------------------------------------------------ one node (Eq. J2-J6)
    def orig_rule(self, n: Node, ins: dict):
        """The data model's own rule for node ``n`` (A4, D6-D11) on the given
        original input statistics: (output ValueStats or None, InputModel or
        None).  ``DataModel._propagate`` is called on the injected inputs, so
        the original side is the data model's, rule for rule."""
        dm = self._dm
        dm.values = {k: (None if v is None else v.orig) for k, v in ins.items()}
        dm.inputs = {}
        try:
            return dm._propagate(n), dm.inputs.get(n.name)
        finally:
            dm.values, dm.inputs = {}, {}

    def propagate(self, n: Node, ins: dict, embedded: "Embedded | None" = None,
                  with_comp=None) -> JointValue | None:
        """Eq. J2-J6 for node ``n``; ``ins`` maps the values it reads to their
        JointValue.  ``embedded``: the independent model of a pair (Eq. D4-D5)
        -- its producer's compressed side is the kept filters in the original
        input coordinates on the original input, and its BN the original's
        rows.  ``with_comp`` (default ``track_comp``): propagate the
        compressed side."""
        o, im = self.orig_rule(n, ins)
        if o is None:
            return None
        if not (self.track_comp if with_comp is None else with_comp):
            return JointValue(o, None, None, None)
        cn = self.comp.node(n.name)
        js = [ins.get(v) for v in n.inputs]
        src = js[0] if js else None
        if n.op in ("conv2d", "linear"):
            emb = embedded if embedded is not None and embedded.producer == n.name else None
            return self._layer(n, cn, o, im, ins, emb)
        if src is None:
            return None
        if n.op == "batch_norm":
            return self._batch_norm(n, n if embedded is not None and embedded.bn == n.name else cn, o, src)
        if n.op in ACTIVATION_OPS and n.op != "identity":
            return JointValue(o, *_activation(o, src, activation_key(n)))
        if n.op == "affine":  # Eq. J5 (D9)
            m, no = src.mean_c.shape[0], src.orig.mean.shape[0]
            w, b = self.comp.param(cn, "weight"), self.comp.param(cn, "bias")
            w = np.ones(m) if w is None else w.astype(np.float64)
            b = np.zeros(m) if b is None else b.astype(np.float64)
            wo = self.orig.param(n, "weight")
            wo = np.ones(no) if wo is None else wo.astype(np.float64)
            return JointValue(o, src.mean_c * w + b, src.cov_c * np.outer(w, w), src.cross * np.outer(wo, w))
        if n.op in ("add", "concat", "mul") and any(j is None for j in js):
            return None
        if n.op == "add":  # Eq. J5: independent branches in both networks
            return JointValue(o, sum(j.mean_c for j in js), sum(j.cov_c for j in js), sum(j.cross for j in js))
        if n.op == "concat":
            from scipy.linalg import block_diag

            return JointValue(o, np.concatenate([j.mean_c for j in js]), block_diag(*[j.cov_c for j in js]),
                              block_diag(*[j.cross for j in js]))
        if n.op == "mul":  # Eq. J6 (D11): independent factors in both networks
            a, g = js
            mc = a.mean_c * g.mean_c
            cov_c = (a.cov_c + np.outer(a.mean_c, a.mean_c)) * (g.cov_c + np.outer(g.mean_c, g.mean_c)) \
                - np.outer(mc, mc)
            cross = (a.cross + np.outer(a.orig.mean, a.mean_c)) * (g.cross + np.outer(g.orig.mean, g.mean_c)) \
                - np.outer(o.mean, mc)
            return JointValue(o, mc, cov_c, cross)
        # identity, pools, pad, reshape / flatten / permute keeping the channel axis: unchanged (A4, D8, D10)
        return JointValue(o, src.mean_c, src.cov_c, src.cross)

    def _layer(self, n: Node, cn: Node, o: ValueStats, im: InputModel, ins: dict, emb):
        """Eq. J2: ``y = W x + b`` and ``y~ = W~ x~ + b~`` under the separable
        input model (A2) with the original's ``rho_s``:
        ``Cov(y~) = W~ (C~ (x) R) W~^T``, ``Cov(y, y~) = W (X (x) R) W~^T``
        (a depthwise conv: ``C~ o (w~ R w~^T)``, ``X o (w R w~^T)``)."""
        src = ins.get(n.inputs[0])
        if src is None and n.op == "linear":
            p = self.orig.producer(n.inputs[0])
            if p is not None and p.op == "flatten":
                src = ins.get(p.inputs[0])
        c_in = im.mean_c.shape[0]
        fo, dwo = _layer_filters(self.orig, n, c_in)
        if src is None or src.mean_c is None:  # an unknown input: white, the same values (as the data model)
            src = JointValue.same(ValueStats(im.mean_c, im.cov_c))
        if emb is not None:
            fc, dwc = emb.Wq, None
            src = JointValue.same(ValueStats(im.mean_c, im.cov_c))
        else:
            fc, dwc = _layer_filters(self.comp, cn, src.mean_c.shape[0])
        if dwc is not None:  # depthwise (no dense layout, as the data model)
            r = im.r_s()
            cov_c = src.cov_c * (dwc @ r @ dwc.T)
            cross = src.cross * (dwo @ r @ dwc.T)
            mean_c = src.mean_c * dwc.sum(1)
        else:
            r = im.r_s() if fc.shape[2] > 1 else None
            cov_c = _gram(fc, src.cov_c, fc, r)
            cross = _gram(fo, src.cross, fc, r)
            mean_c = np.einsum("nck,c->n", fc, src.mean_c)
        b = self.comp.param(cn, "bias") if emb is None else emb.bias
        if b is not None:
            mean_c = mean_c + b.astype(np.float64)
        return JointValue(o, mean_c, cov_c, cross)

    def _batch_norm(self, n: Node, cn: Node, o: ValueStats, src: JointValue) -> JointValue:
        """Eq. J3: the original BN output is standardised by the propagated
        std ``s`` and takes the BN marginals (A1), ``z = gamma (y - E y)/s + beta``;
        the compressed BN (its channels ``K`` of the original's) is the same
        map composed with the affine difference of the two BNs:
        ``z~ = A (gamma_K (y~ - E y_K)/s_K + beta_K) + B``,
        ``A = (gamma~/sigma~) / (gamma_K/sigma_K)``,
        ``B = A gamma_K (mu_K - mu~)/s_K + beta~ - A beta_K``
        (A = 1, B = 0 when the compressed BN is the original's rows; then
        this is Eq. D5)."""
        g, beta, mu, sig = bn_affine(self.orig, n)
        idx = self.kept_of.get(n.name)
        if cn is n:  # the original's rows (the independent model of a pair, Eq. D5)
            gc, bc, muc, sigc = g[idx], beta[idx], mu[idx], sig[idx]
        else:
            gc, bc, muc, sigc = bn_affine(self.comp, cn)
        m = gc.shape[0]
        if idx is None:
            if m != g.shape[0]:
                raise RuntimeError(f"joint model: BN {n.name!r} has {m} of {g.shape[0]} channels, which is unknown")
            idx = np.arange(m)
        s = np.sqrt(np.clip(np.diag(src.orig.cov), 0, None))
        a_o = g * _safe_inv(s)
        gk, sk = g[idx], s[idx]
        ratio = np.where(gk != 0, (gc / sigc) / np.where(gk != 0, gk / sig[idx], 1.0), 1.0)
        a_c = ratio * a_o[idx]
        mean_c = a_c * (src.mean_c - src.orig.mean[idx]) + ratio * gk * (mu[idx] - muc) * _safe_inv(sk) + bc
        return JointValue(o, mean_c, src.cov_c * np.outer(a_c, a_c), src.cross * np.outer(a_o, a_c))


def _gram(f1: np.ndarray, cov: np.ndarray, f2: np.ndarray, r) -> np.ndarray:
    """``F1 (C (x) R) F2^T`` for filters F1 (n1, C1, K), F2 (n2, C2, K), a
    channel (cross-)covariance C (C1, C2) and the spatial matrix R (K, K)
    (None: the identity), Eq. J2."""
    n1, c1, k = f1.shape
    a = (f1.transpose(0, 2, 1).reshape(n1 * k, c1) @ cov).reshape(n1, k, -1)  # (n1, K, C2)
    if r is not None:
        c2 = a.shape[2]
        a = (r @ a.transpose(1, 0, 2).reshape(k, n1 * c2)).reshape(k, n1, c2).transpose(1, 0, 2)
    return a.reshape(n1, -1) @ f2.transpose(0, 2, 1).reshape(f2.shape[0], -1).T


def _activation(o: ValueStats, src: JointValue, key: str):
    """Eq. J4: Mehler's expansion (M3) with each side's own marginals:
    ``Cov(f(z_i), f(z~_k)) = sum_n rho_ik^n c_n(i) c_n(k~)`` for the
    correlation ``rho_ik`` of the jointly Gaussian pre-activations."""
    s_o = np.sqrt(np.clip(np.diag(src.orig.cov), 0, None))
    s_c = np.sqrt(np.clip(np.diag(src.cov_c), 0, None))
    mean_c, var_c = activation_mean_var(src.mean_c, s_c, key)
    c_o = hermite_coefficients(src.orig.mean, s_o, key)
    c_c = hermite_coefficients(src.mean_c, s_c, key)
    var_o = np.diag(o.cov)
    cov_c = activation_covariance(_corr(src.cov_c), c_c, c_c, var_c, var_c, same=True)
    rho_x = np.clip(src.cross * _safe_inv(s_o)[:, None] * _safe_inv(s_c)[None, :], -1.0, 1.0)
    cross = activation_covariance(rho_x, c_o, c_c, var_o, var_c)
    return mean_c, cov_c, cross


class JointStats:
    """The statistics source of the joint data model (Eq. J7): each pair's
    PairStats at the value its consumers read, the kept channels from the
    compressed network (``sequential=True``) or from the pair's own damage on
    the original network's input (``sequential=False``)."""

    def __init__(self, orig: Model, comp: Model, sequential: bool = True):
        self.orig, self.comp, self.sequential = orig, comp, sequential
        self.jm = JointModel(orig, comp, track_comp=sequential)
        self.name = "joint" if sequential else "joint-independent"

    @property
    def seconds(self) -> float:
        return self.jm.seconds

    def stats(self, req: StatsRequest) -> PairStats:
        p = req.pair
        self.jm.set_kept(p.bn.name, req.kept)
        if p.bn2 is not None:
            self.jm.set_kept(p.bn2.name, req.kept)
        target = read_value(self.orig, p, req.which)
        jv = self.jm.value(target) if self.sequential else self._independent(req, target)
        if jv is None:
            raise RuntimeError(f"joint model: no statistics for {target!r}")
        return jv.pair_stats(req.kept)

    def _independent(self, req: StatsRequest, target: str) -> JointValue | None:
        """The pair's subgraph (producer to ``target``) propagated from the
        original network's input of the producer, the compressed side equal
        to the original there."""
        from .calibrate import _subgraph

        p = req.pair
        nodes = _subgraph(self.orig, p.producer, target)
        names = {n.output for n in nodes}
        outer = list(dict.fromkeys(v for n in nodes for v in self.jm.reads(n) if v not in names))
        self.jm.hold(outer)  # read again by the pair's next request (an SE gate's gated value)
        local = {}
        for v in outer:
            jv = self.jm.value(v)
            local[v] = None if jv is None else jv.undamaged()
        self.jm.value(target)  # the original side, propagated once (and its frontier advanced)
        t0 = time.perf_counter()
        emb = Embedded(p.producer.name, req.Wq, embedded_bias(self.orig, req), p.bn.name)
        for n in nodes:
            local[n.output] = self.jm.propagate(n, {v: local.get(v) for v in self.jm.reads(n)}, emb, True)
        self.jm.seconds += time.perf_counter() - t0
        return local.get(target)

    def value_stats(self, value: str):
        if not self.sequential:
            return None
        jv = self.jm.value(value)
        return None if jv is None else jv.pair_stats(np.arange(jv.mean_c.shape[0]))

    def release(self, layer: str) -> None:
        self.jm.unhold()

    def close(self) -> None:
        self.jm.values.clear()
