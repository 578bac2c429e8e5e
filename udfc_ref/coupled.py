"""Pruning coupled channel groups (derivation section 11, Eq. G1-G4).

A coupled group (``groups.Group``: a residual stream, a concat input, a
chain feeding a grouped conv ...) keeps one set of channels ``K`` everywhere
(Eq. G1); every layer that writes its channels loses the rows of the others
(:func:`trim_rows`), and every layer that *reads* a value holding them
rebuilds that value from its own kept channels with the ``T, t`` fitted on
the statistics of that value (Eq. G2-G3, :func:`rebuild_value`).
"""

from __future__ import annotations

import numpy as np

from .checks import check_layer
from .datamodel import DataModel
from .graph import Model, Node
from .rewrite import absorb, absorb_grouped, keep_rows
from .solve import PairStats, chain_stats, drop, objective, udfc

BN_ROLES = ("weight", "bias", "running_mean", "running_var")


def value_kept(cg, kept: dict) -> dict:
    """``{value: kept channel indices}`` for every value holding channels of
    a group in ``kept`` (``{group index: kept indices}``)."""
    out = {}
    for v, segs in cg.layout.items():
        if any(g in kept for g in segs):
            out[v] = cg.kept_index(v, kept)
    return out


def trim_rows(model: Model, cg, pruned, vkept: dict, in_kept: dict, notes: dict) -> None:
    """Eq. G1: remove the channels not kept from every node that writes them
    -- producers' rows (and bias), BatchNorm / affine entries, depthwise
    convs' rows (their ``groups`` becomes the kept count), the channel entry
    of a ``(C,) <-> (C, 1, 1)`` reshape.  ``model`` is the model being
    compressed (tensors are replaced, never written into).  Records the input
    channels each depthwise conv keeps in ``in_kept`` and a report note for
    every trimmed layer in ``notes``."""
    done = set()
    for g in pruned:
        lead = g.name
        dw = {d.name for d in g.depthwise}
        for n in g.producers + g.depthwise + g.companions:
            if n.name in done:
                continue
            done.add(n.name)
            node = model.node(n.name)
            kept = vkept[n.output]
            if n.op == "reshape":
                node.attrs["shape"] = [int(kept.size)] + list(node.attrs["shape"][1:])
            elif n.op == "batch_norm":
                keep_rows(model, node, kept, BN_ROLES)
            else:
                keep_rows(model, node, kept)
            if n.name in dw:
                node.attrs["groups"] = int(kept.size)
                in_kept[n.name] = kept
                notes[n.name] = f"depthwise, pruned with the channel group of {lead!r}"
            elif n.name == lead:
                notes[n.name] = (f"channel group: {len(g.producers)} producer(s), {len(g.depthwise)} depthwise, "
                                 f"{len(g.consumers)} reading layer(s)")
            elif n.op in ("conv2d", "linear"):
                notes[n.name] = f"pruned with the channel group of {lead!r}"


def block_udfc(st: PairStats, n: int, blocks: int, alpha1: float, alpha2: float):
    """Eq. G4: U1-U3 with ``T`` block diagonal -- for a grouped conv consumer
    a channel of block ``b`` is rebuilt from the kept channels of block ``b``
    (each block keeps the same count, so block ``b`` of the sorted kept set is
    ``kept[b M/G : (b+1) M/G]``)."""
    og, mg = n // blocks, st.kept.size // blocks
    T = np.zeros((n, st.kept.size))
    t = np.zeros(n)
    for b in range(blocks):  # one solve per block of channels (not per channel)
        rows = slice(b * og, (b + 1) * og)
        cols = slice(b * mg, (b + 1) * mg)
        sub = PairStats(st.mean_a[rows], st.var_a[rows], st.mean_q[cols], st.cov_q[cols, cols],
                        st.cross[rows, cols], st.kept[cols] - b * og)
        T[rows, cols], t[rows] = udfc(sub, og, alpha1, alpha2)
    return T, t


def column_energy(model: Model, node: Node, n: int) -> np.ndarray:
    """``w_i = ||W'_{:, i, :}||_F^2`` of a consumer over its ``n`` input
    channels (Eq. E2 weights); a grouped conv's columns are per block."""
    w = model.tensors[node.params["weight"]]  # summed in float64 without a float64 copy of the layer
    if node.op == "conv2d" and node.attrs["groups"] > 1:
        g = node.attrs["groups"]
        wg = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        return np.einsum("gocr,gocr->gc", wg, wg, dtype=np.float64).reshape(n)  # (G, C/G) blocks
    wr = w.reshape(w.shape[0], n, -1)
    return np.einsum("onr,onr->n", wr, wr, dtype=np.float64)


def rebuild_value(out: Model, orig: Model, dm: DataModel, onode: Node, value: str, kept: np.ndarray, method: str,
                  alpha1: float, alpha2: float):
    """Eq. G2-G3: the consumer ``onode`` reads ``value`` (N channels) of
    which ``kept`` remain; rebuild the others from the kept ones with
    ``T, t`` from the data model's statistics of ``value`` (``udfc``: U1-U3 on
    ``C~ = Cov(v_K)``, ``X = Cov(v, v_K)``; ``none`` and ``nm``: drop) and
    absorb them into the consumer's columns (Eq. R2).

    Returns the per-channel ``(w, err_drop, err_after, energy)`` (N,) of
    Eq. E2 for the report: ``w`` the column energy, ``err_*`` Eq. E1 without
    and with the compensation, ``energy`` ``E[v_i^2]``."""
    vs = dm.value(value)
    node = out.node(onode.name)
    n = orig.shapes[value][0]
    grouped = onode.op == "conv2d" and onode.attrs["groups"] > 1
    if vs is None:  # unknown statistics: the channels are dropped
        st = PairStats(np.zeros(n), np.zeros(n), np.zeros(kept.size), np.zeros((kept.size, kept.size)),
                       np.zeros((n, kept.size)), kept)
    else:
        st = chain_stats(vs, kept)
    T0, t0 = drop(st, n)
    if method == "udfc" and vs is not None:
        T, t = block_udfc(st, n, onode.attrs["groups"], alpha1, alpha2) if grouped else udfc(st, n, alpha1,
                                                                                                alpha2)
    else:
        T, t = T0, t0
    dtype = orig.tensors[onode.params["weight"]].dtype
    (absorb_grouped if grouped else absorb)(out, node, T, t, dtype)
    check_layer(out, node, f"rebuilding the pruned channels of {value!r}",
                "--skip the group's producers or leave out --prune-coupled")
    w = column_energy(orig, onode, n)
    return w, objective(st, T0, t0), objective(st, T, t), st.var_a + st.mean_a**2
