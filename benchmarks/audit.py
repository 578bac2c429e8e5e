"""Per-layer audit: the data-free reconstruction error vs the same error
measured on real activations, and the data-dependent least-squares oracle.

For every pair of every model, at a given prune ratio / bit width, this runs
``udfc_ref.compress`` with ``method`` = none, nm and udfc and captures what the
solver used for each pair (the ``pair_stats`` / ``chain_stats`` inputs and
the ``T, t`` handed to ``rewrite.absorb``) by wrapping those functions in the
``udfc_ref.compression`` namespace for the duration of the call (nothing in
``udfc_ref`` is edited). Then, on real test images run through the
*original* model (``model.forward(x, return_values=True)``):

* ``a``  (S, N): the pair's original activations (after BN and ReLU/ReLU6,
  at every spatial position; S = samples x positions);
* ``a~`` (S, M): the compressed kept channels exactly as the solver models
  them -- the kept filters with their quantization error embedded in the
  original input coordinates (``Wq``), applied to the real input of the
  producer, plus the bias-correction shift, through the original BN and
  activation. For a depthwise chain the solver takes the kept channels as
  undamaged (``chain_stats``), and so does the measurement: ``a~ = a[:, K]``.

The measured error is Eq. E2 with the expectations replaced by sample means:
``err = sum_i w_i mean_s (a_i - T_i a~ - t_i)^2 / sum_i w_i mean_s a_i^2``,
``w_i`` the consumers' column energy -- the same weights as the report.
The oracle fits ``T, t`` by least squares on the same real activations, in
the same reconstruction form (pruned rows on all kept channels plus an
intercept; kept rows one scale plus an intercept), and reports its E2: the
best any method of this form could do on these samples. ``energy`` is the
weighted variance of the rebuilt activations over the original's (< 1:
the reconstruction shrinks the signal). ``*_post`` is the same E2 measured
where the consumer reads the channels, after the pooling nodes between the
activation and the consumer: ``T pool(a~) + t`` against ``pool(a)`` (R2 rebuilds
through a max pool only approximately). With ``--alone``, the top-1 on the
full test split when only that pair is compressed (all other conv/linear
layers passed to ``skip``) separates one layer's damage from compounding.

Writes ``<out>/audit_r<ratio>_<bits>[_bc].csv`` / ``.json`` / ``.md`` and
prints one table per model and setting.

Usage::

    python benchmarks/audit.py                          # ratio 0.3, 6 bit and float
    python benchmarks/audit.py --ratio 0.5 --bits 4 --models vgg_mnist
    python benchmarks/audit.py --alone                  # + top-1 with one pair compressed
    python benchmarks/audit.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import udfc_ref  # noqa: E402
import udfc_ref.compression as _comp  # noqa: E402
import udfc_ref.sources as _src  # noqa: E402
from udfc_ref.atomic import write_bytes_atomic  # noqa: E402
from udfc_ref.datamodel import bn_affine  # noqa: E402
from udfc_ref.evaluate import load_npz, top1  # noqa: E402
from udfc_ref.forward import run_node  # noqa: E402
from udfc_ref.pairs import PASS_OPS, find_pairs  # noqa: E402

MODELS = ("vgg_mnist", "resnet_mnist", "mobilenet_mnist", "keras_mnist", "vgg_digits", "vgg_small_mnist")


@contextlib.contextmanager
def capture():
    """Record, per pair in visiting order, the solver's inputs and its T, t."""
    log: list[dict] = []
    orig_ps, orig_cs, orig_abs = _src.pair_stats, _src.chain_stats, _comp.absorb

    def pair_stats(W, Wq, im, gamma, beta, act, kept, extra_shift=None):
        log.append({"kind": "pair", "Wq": np.array(Wq), "kept": np.array(kept),
                    "extra": None if extra_shift is None else np.array(extra_shift)})
        return orig_ps(W, Wq, im, gamma, beta, act, kept, extra_shift=extra_shift)

    def chain_stats(values, kept):
        log.append({"kind": "chain", "kept": np.array(kept)})
        return orig_cs(values, kept)

    def absorb(model, node, T, t, dtype, **kw):
        if "T" not in log[-1]:
            log[-1]["T"], log[-1]["t"] = np.array(T), np.array(t)
        return orig_abs(model, node, T, t, dtype, **kw)

    # the data-free statistics source (udfc_ref.sources.DataFreeStats) calls these two
    _src.pair_stats, _src.chain_stats, _comp.absorb = pair_stats, chain_stats, absorb
    try:
        yield log
    finally:
        _src.pair_stats, _src.chain_stats, _comp.absorb = orig_ps, orig_cs, orig_abs


def _act(z, act):
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "relu6":
        return np.clip(z, 0.0, 6.0)
    return z


def _rows(v):
    """(B, C, H, W) or (B, C) -> (S, C) float64."""
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 4:
        return v.transpose(0, 2, 3, 1).reshape(-1, v.shape[1])
    return v.reshape(v.shape[0], -1)


def _producer_out(model, node, x, w):
    """Apply producer ``node``'s op with weight ``w`` (M, C, R) to real input
    ``x`` (B, C, H, W) or (B, C): returns the pre-BN outputs (B, M, H', W') or (B, M)."""
    if node.op == "linear":
        return np.asarray(x, np.float64).reshape(x.shape[0], -1) @ w.reshape(w.shape[0], -1).T
    import torch
    import torch.nn.functional as F

    kh, kw = model.tensors[node.params["weight"]].shape[2:]
    a = node.attrs
    pt, pb, pl, pr = a["padding"]
    xt = F.pad(torch.from_numpy(np.asarray(x, np.float64)), (pl, pr, pt, pb))
    wt = torch.from_numpy(w.reshape(w.shape[0], w.shape[1], kh, kw))
    with torch.no_grad():
        z = F.conv2d(xt, wt, stride=tuple(a["stride"]), dilation=tuple(a["dilation"]))
    return z.numpy()


def _pass_nodes(model, value):
    """The pooling / identity nodes between ``value`` and the consumers
    (derivation section 1), in order; stops before a flatten."""
    nodes = []
    while True:
        cons = model.consumers(value)
        if len(cons) != 1 or cons[0].op not in PASS_OPS:
            return nodes, value
        nodes.append(cons[0])
        value = cons[0].output


def _apply(model, nodes, v):
    for n in nodes:
        v = run_node(model, n, [v])
    return v


def _e2(a, ahat, w):
    """Eq. E2 on samples: sum_i w_i mean (a_i - ahat_i)^2 / sum_i w_i mean a_i^2."""
    num = w @ ((a - ahat) ** 2).mean(0)
    den = w @ (a**2).mean(0)
    return float(num / den) if den > 0 else 0.0


def _energy(a, ahat, w):
    """Weighted variance of the rebuilt activations over that of the originals:
    sum_i w_i Var ahat_i / sum_i w_i Var a_i (1 = the signal's energy kept;
    least squares gives < 1, it regresses towards the mean)."""
    den = w @ a.var(0)
    return float(w @ ahat.var(0) / den) if den > 0 else 1.0


def _oracle(a, aq, kept):
    """Least-squares T, t in the reconstruction form R1 on real samples."""
    n, m = a.shape[1], aq.shape[1]
    ahat = np.empty_like(a)
    pruned = np.setdiff1d(np.arange(n), kept)
    if pruned.size:
        A = np.c_[aq, np.ones(len(aq))]
        coef = np.linalg.lstsq(A, a[:, pruned], rcond=None)[0]
        ahat[:, pruned] = A @ coef
    # kept rows: one scale + intercept each (vectorised simple regression)
    ak, qk = a[:, kept], aq
    qm, am = qk.mean(0), ak.mean(0)
    var = ((qk - qm) ** 2).mean(0)
    cov = ((qk - qm) * (ak - am)).mean(0)
    s = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    ahat[:, kept] = (qk - qm) * s + am
    return ahat


def alone_top1(model, x, y, layer, ratio, bits, method, bc=False) -> float:
    """Top-1 when only ``layer``'s pair is compressed (every other conv/linear
    layer passed as ``skip``: neither pruned nor quantized)."""
    others = [n.name for n in model.nodes if n.op in ("conv2d", "linear") and n.name != layer]
    small, _ = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, method=method, bias_correction=bc,
                                 skip=others)
    return top1(small, x, y)


def audit_model(name, model, x, ratio, bits, bc=False, log=print, xy_acc=None) -> list[dict]:
    """One row per pair: model / real E2 for none, nm, udfc, and the oracle;
    with ``xy_acc = (x, y)`` also the top-1 when only that pair is compressed."""
    vals = model.forward(x, return_values=True)
    pairs, _ = find_pairs(model)
    by_name = {p.name: p for p in pairs}
    runs = {}
    for method in ("none", "nm", "udfc"):
        with capture() as cap:
            _, rep = udfc_ref.compress(model, prune_ratio=ratio, weight_bits=bits, method=method, bias_correction=bc)
        lrep = [r for r in rep.layers if r.error_after is not None]
        if len(lrep) != len(cap):
            raise RuntimeError(f"{name}: captured {len(cap)} pairs but the report has {len(lrep)}")
        runs[method] = list(zip(lrep, cap))
    rows = []
    for i, (lr, cap0) in enumerate(runs["udfc"]):
        p = by_name[lr.layer]
        kept = cap0["kept"]
        # real activations a (S, N) and the column weights of Eq. E2
        if p.dw is None:
            act_val = p.bn.output if p.act == "identity" else model.consumers(p.bn.output)[0].output
        else:
            act_val = p.value
        a4 = vals[act_val]
        a = _rows(a4)
        n = a.shape[1]
        pnodes, post_val = _pass_nodes(model, act_val)
        a_post = _rows(vals[post_val])
        w = np.zeros(n)
        for c in p.consumers:
            wc = model.tensors[c.node.params["weight"]].astype(np.float64)
            w += (wc.reshape(wc.shape[0], n, -1) ** 2).sum(axis=(0, 2))
        row = {"model": name, "prune_ratio": ratio, "weight_bits": bits, "bias_correction": bc, "layer": lr.layer,
               "kind": cap0["kind"], "channels": f"{lr.channels_before}->{lr.channels_after}", "samples": a.shape[0],
               "pooled": "+".join(nd.op for nd in pnodes)}
        aq_u = None
        for method in ("none", "nm", "udfc"):
            lrm, cap = runs[method][i]
            assert lrm.layer == lr.layer and np.array_equal(cap["kept"], kept)
            if cap["kind"] == "chain":
                aq4 = np.asarray(a4, np.float64)[:, kept]
            else:
                gamma, beta, mu, sigma = bn_affine(model, p.bn)
                z = _producer_out(model, p.producer, vals[p.producer.inputs[0]], cap["Wq"])
                b = model.param(p.producer, "bias")
                sh = (1, -1) + (1,) * (z.ndim - 2)  # channel axis 1
                if b is not None:
                    z = z + b.astype(np.float64)[kept].reshape(sh)
                if cap["extra"] is not None:
                    z = z + cap["extra"].reshape(sh)
                z = (gamma[kept] / sigma[kept]).reshape(sh) * (z - mu[kept].reshape(sh)) + beta[kept].reshape(sh)
                aq4 = _act(z, p.act)
            aq = _rows(aq4)
            aq_post = _rows(_apply(model, pnodes, aq4))
            if method == "udfc":
                aq_u = aq
            ahat = aq @ cap["T"].T + cap["t"]
            # what the consumer actually sees: T applied after the pools (R2)
            row[f"{method}_post"] = _e2(a_post, aq_post @ cap["T"].T + cap["t"], w)
            if method == "none":
                row["before_model"] = lrm.error_before
                row["before_real"] = _e2(a, ahat, w)
            else:
                row[f"{method}_model"] = lrm.error_after
                row[f"{method}_real"] = _e2(a, ahat, w)
                row[f"{method}_energy"] = _energy(a, ahat, w)
        row["oracle_real"] = _e2(a, _oracle(a, aq_u, kept), w)
        if xy_acc is not None:
            for method in ("none", "nm", "udfc"):
                row[f"{method}_alone_top1"] = alone_top1(model, *xy_acc, lr.layer, ratio, bits, method, bc)
        rows.append(row)
        log(f"  {name} {lr.layer}: before {row['before_model']:.3f}/{row['before_real']:.3f} "
            f"nm {row['nm_model']:.3f}/{row['nm_real']:.3f} udfc {row['udfc_model']:.3f}/{row['udfc_real']:.3f} "
            f"oracle {row['oracle_real']:.3f}", flush=True)
    return rows


def markdown(rows) -> str:
    out = []
    keys = list(dict.fromkeys((r["model"], r["prune_ratio"], r["weight_bits"], r["bias_correction"]) for r in rows))
    for k in keys:
        rs = [r for r in rows if (r["model"], r["prune_ratio"], r["weight_bits"], r["bias_correction"]) == k]
        out.append(f"**{k[0]}**, prune {k[1]:g}, {k[2] or 'float'}{' bits' if k[2] else ''}"
                   f"{', bias correction' if k[3] else ''} ({rs[0]['samples']:,} activation rows):\n")
        alone = "none_alone_top1" in rs[0]
        out.append("| layer | channels | none: model / real | nm: model / real | udfc: model / real | oracle (real) "
                   "| energy nm / udfc | after pool: none / nm / udfc |"
                   + (" top-1 % alone none / nm / udfc |" if alone else ""))
        out.append("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if alone else ""))
        for r in rs:
            tag = " (dw chain)" if r["kind"] == "chain" else ""
            out.append(f"| {r['layer']}{tag} | {r['channels']} | {r['before_model']:.3f} / {r['before_real']:.3f} | "
                       f"{r['nm_model']:.3f} / {r['nm_real']:.3f} | {r['udfc_model']:.3f} / {r['udfc_real']:.3f} | "
                       f"{r['oracle_real']:.3f} | {r['nm_energy']:.2f} / {r['udfc_energy']:.2f} | "
                       + ("-" if not r["pooled"] else
                          f"{r['none_post']:.3f} / {r['nm_post']:.3f} / {r['udfc_post']:.3f}") + " |"
                       + (f" {100 * r['none_alone_top1']:.1f} / {100 * r['nm_alone_top1']:.1f} / "
                          f"{100 * r['udfc_alone_top1']:.1f} |" if alone else ""))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None)
    ap.add_argument("--model-dir", default=os.path.join(HERE, "models"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--bits", default="6,float", help="comma separated bit widths, 'float' for none")
    ap.add_argument("--bias-correction", action="store_true")
    ap.add_argument("--n", type=int, default=300, help="test samples used (default 300)")
    ap.add_argument("--alone", action="store_true",
                    help="also the top-1 (full test split) when only one pair is compressed")
    ap.add_argument("--smoke", action="store_true", help="one model, 6 bit, 20 samples")
    a = ap.parse_args(argv)
    if a.models:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
    else:
        models = [m for m in MODELS if os.path.exists(os.path.join(a.model_dir, f"{m}.safetensors"))]
    bits = [None if b.strip() == "float" else int(b) for b in a.bits.split(",")]
    if a.smoke:
        models, bits, a.n = models[:1], [6], 20
    rows = []
    for name in models:
        model = udfc_ref.load(os.path.join(a.model_dir, f"{name}.safetensors"))
        xall, yall = load_npz(os.path.join(a.model_dir, f"{'digits' if name.endswith('digits') else 'mnist'}_test.npz"))
        if a.smoke:
            xall, yall = xall[:a.n], yall[:a.n]
        x = xall[:a.n]
        for b in bits:
            print(f"{name}: prune {a.ratio}, {b or 'float'} bits", flush=True)
            rows += audit_model(name, model, x, a.ratio, b, a.bias_correction,
                                xy_acc=(xall, yall) if a.alone else None)
    os.makedirs(a.out, exist_ok=True)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    stem = f"audit_r{a.ratio:g}_" + "-".join(str(b or "float") for b in bits) + ("_bc" if a.bias_correction else "")
    write_bytes_atomic(os.path.join(a.out, stem + ".csv"), buf.getvalue().encode())
    write_bytes_atomic(os.path.join(a.out, stem + ".json"), (json.dumps(rows, indent=1) + "\n").encode())
    md = markdown(rows)
    write_bytes_atomic(os.path.join(a.out, stem + ".md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
