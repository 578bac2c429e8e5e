"""The measurements behind the "exact / approximate" claims of
``docs/derivation.md`` (issue 11).  Every number the derivation quotes for an
approximation is printed by one section of this script:

* ``m3``     Eq. M3': the truncated Mehler series against quadrature, for the
             old remainder (``rho^(n+1) sqrt(r_i r_k)``), no remainder, and
             the remainder built from the exact value at rho = +-1 (now used);
* ``d7``     Eq. D7 against quadrature;
* ``kept``   the reported residual of kept quantized channels (E1) against
             Monte Carlo, old and new remainder;
* ``d8``     Eq. D6/D8 on simulated fields: average pools (exact for a field
             with correlation rho^(|dy|+|dx|)), after a ReLU (not such a
             field), max pools; the one-number (geometric) approximation;
* ``d8real`` the same pooling rules on the benchmark models' real activations;
* ``zrows``  whether the per-channel rows minimise the consumer's output error
             Z (R' = 1 vs a 3 x 3 consumer, alpha1 = 0 vs 0.01, quantized kept
             channels);
* ``top1`` / ``top1grid``  udfc's top-1 on the benchmark models (the
             before/after table of ``docs/results.md``), not a claim check.

References are independent of ``udfc_ref``: numerical quadrature and the
field sampler of ``tests/mathref.py``, explicit conv / pool loops.

Usage::

    python benchmarks/math_audit.py m3 d7 kept d8 d8real zrows   # the derivation's numbers
    python benchmarks/math_audit.py top1       # udfc top-1, 30 / 50 % + 6 bits (TOP1_JSON=f.json saves rows)
    UDFC_CODE=/tmp/before python benchmarks/math_audit.py top1   # the same with an older udfc_ref
    MAXPOOL_AS_AVG=1 python benchmarks/math_audit.py top1grid     # max pools by D8 (rejected variant)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# UDFC_CODE=<dir> runs the top1 sections against another code tree (e.g. an
# exported older commit) -- its udfc_ref is imported instead of this one
for p in (os.path.join(ROOT, "tests"), ROOT, os.environ.get("UDFC_CODE", ROOT)):
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)

import mathref  # noqa: E402  (tests/mathref.py: quadrature, field sampler)

import udfc_ref  # noqa: E402
import udfc_ref.moments as mm  # noqa: E402
import udfc_ref.solve as solve  # noqa: E402
import udfc_ref.datamodel as dmodel  # noqa: E402  (attributes looked up late: UDFC_CODE may be older)


def _terms_needed(rho, n_max, same, tol=1e-10):
    """The series length used before issue 14 (one count per matrix): |rho|^n
    below ``tol`` past it for the largest off-diagonal |rho|."""
    a = np.abs(rho)
    if same and a.shape[0] == a.shape[1] and a.shape[0] > 1:
        a = a.copy()
        np.fill_diagonal(a, 0.0)
    rmax = float(a.max()) if a.size else 0.0
    if rmax >= 1.0 - 1e-12:
        return n_max
    if rmax <= 0.0:
        return 1
    return int(min(n_max, max(1, np.ceil(np.log(tol) / np.log(rmax)))))


def old_remainder_covariance(rho, ca, cb, var_a=None, var_b=None, same=False, marginals=None):
    """Eq. M3 with the remainder used before issue 11: rho^(n+1) sqrt(r_i r_k),
    r = Var - sum_n c_n^2 (exact only for proportional marginals)."""
    rho = np.clip(np.asarray(rho, dtype=np.float64), -1.0, 1.0)
    n_terms = _terms_needed(rho, ca.shape[0], same)
    out = np.zeros_like(rho)
    if marginals is not None:
        ba, ga, bb, gb, act = marginals
        va = mm.activation_mean_var(ba, ga, act)[1]
        vb = mm.activation_mean_var(bb, gb, act)[1]
        ra = np.sqrt(np.clip(va - (ca[:n_terms] ** 2).sum(0), 0, None))
        rb = np.sqrt(np.clip(vb - (cb[:n_terms] ** 2).sum(0), 0, None))
        out = ra[:, None] * rb[None, :]
    for n in range(n_terms - 1, -1, -1):
        out *= rho
        out += ca[n][:, None] * cb[n][None, :]
    out *= rho
    if same and var_a is not None:
        np.fill_diagonal(out, var_a)
    return out


def no_remainder_covariance(rho, ca, cb, var_a=None, var_b=None, same=False, marginals=None):
    return mm.activation_covariance(rho, ca, cb, var_a, var_b, same)


VARIANTS = {"old remainder": old_remainder_covariance, "no remainder": no_remainder_covariance,
            "exact-at-+-1 remainder (now)": mm.activation_covariance}


def _stat(v):
    v = np.asarray(v)
    return f"median {np.median(v):.1e}, max {v.max():.1e}"


# ----------------------------------------------------------------- m3, d7

def section_m3(n_cases=200):
    rng = np.random.default_rng(0)
    print("## M3': |Cov error| / sqrt(Var_i Var_k), ReLU and ReLU6, quadrature reference\n")
    print("| marginals | rho | " + " | ".join(VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    for kind, rhos in (("unequal", (1.0, -1.0, 0.99, -0.99, 0.9)), ("kept quantized (near-equal)", (0.999, 0.99))):
        for rho in rhos:
            errs = {k: [] for k in VARIANTS}
            for case in range(n_cases):
                act = ("relu", "relu6")[case % 2]
                if kind == "unequal":
                    b1, b2 = rng.normal(0, 1, 2)
                    g1, g2 = rng.uniform(0.3, 2, 2)
                else:  # a channel and its quantized copy: mean shift and scale change of a few percent
                    b1, g1 = rng.normal(0, 1), rng.uniform(0.3, 2)
                    b2, g2 = b1 + g1 * rng.normal(0, 0.03), g1 * (1 + rng.normal(0, 0.03))
                ref = mathref.cov_quad(b1, g1, b2, g2, rho, act)
                scale = math.sqrt(mathref.moments_quad(b1, g1, act)[1] * mathref.moments_quad(b2, g2, act)[1])
                ca = mm.hermite_coefficients(np.array([b1]), np.array([g1]), act)
                cb = mm.hermite_coefficients(np.array([b2]), np.array([g2]), act)
                marg = (np.array([b1]), np.array([g1]), np.array([b2]), np.array([g2]), act)
                for k, f in VARIANTS.items():
                    errs[k].append(abs(f(np.array([[rho]]), ca, cb, marginals=marg)[0, 0] - ref) / scale)
            print(f"| {kind} | {rho:g} | " + " | ".join(_stat(errs[k]) for k in VARIANTS) + " |")
    print()


def section_d7():
    print("## D7: |rho_out - quadrature|, 6 channels per case, ReLU / ReLU6\n")
    rng = np.random.default_rng(1)
    print("| rho | max error |\n|---:|---:|")
    for rho in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
        worst = 0.0
        for act in ("relu", "relu6"):
            for _ in range(5):
                b, g = rng.normal(0, 1.5, 6), rng.uniform(0.3, 2.5, 6)
                num = sum(mathref.cov_quad(bi, gi, bi, gi, rho, act) for bi, gi in zip(b, g))
                den = sum(mathref.moments_quad(bi, gi, act)[1] for bi, gi in zip(b, g))
                worst = max(worst, abs(dmodel.activation_stats(b, np.diag(g**2), act, rho).rho - num / den))
        print(f"| {rho} | {worst:.1e} |")
    print()


# ----------------------------------------------------------------- kept

def section_kept(n_pairs=40):
    """Relative error of the closed-form residual l_k of kept quantized
    channels against 200k Monte-Carlo samples of the data model."""
    from test_solver import random_pair, sample_patches

    print("## Kept quantized channels: (closed-form l_k - Monte Carlo) / Monte Carlo\n")
    rng = np.random.default_rng(2)
    rows = {k: [] for k in ("old remainder", "exact-at-+-1 remainder (now)")}
    zs = {k: [] for k in rows}
    for _ in range(n_pairs):
        seed, n, c, ks = int(rng.integers(0, 2**31)), int(rng.integers(3, 10)), int(rng.integers(1, 5)), 3
        act, bits, dil = str(rng.choice(["relu", "relu6"])), int(rng.choice([4, 6])), int(rng.choice([1, 2]))
        W, Wq, im, gamma, beta, kept = random_pair(seed, n, c, ks, act, 1, bits, dil)
        x = sample_patches(im, dil, 200_000, np.random.default_rng(1)).reshape(200_000, -1)
        f, fq = W.reshape(n, -1), Wq.reshape(kept.size, -1)
        mx = np.repeat(im.mean_c, im.pos.shape[0])
        tap = np.stack(np.meshgrid(np.arange(ks), np.arange(ks), indexing="ij"), -1).reshape(-1, 2)
        cov_x = np.kron(im.cov_c, (im.rho_s**dil) ** np.abs(tap[:, None] - tap[None, :]).sum(-1))
        sd = np.sqrt(np.einsum("nk,kl,nl->n", f, cov_x, f))
        lo, hi = mathref.CLIP[act]
        a = np.clip(gamma * ((x - mx) @ f.T / sd) + beta, lo, hi)
        aq = np.clip(gamma[kept] * ((x @ fq.T - mx @ f[kept].T) / sd[kept]) + beta[kept], lo, hi)
        for k in rows:
            solve.activation_covariance = VARIANTS[k]
            try:
                st = solve.pair_stats(W, Wq, im, gamma, beta, act, kept)
                T, t = solve.udfc(st, n, 0.01, 0.008)
                closed = solve.objective(st, T, t)[kept]
            finally:
                solve.activation_covariance = mm.activation_covariance
            e = a[:, kept] - aq * np.diag(T[kept]) - t[kept]
            mc = (e**2).mean(0)
            se = (e**2).std(0) / math.sqrt(e.shape[0])
            live = mc > 1e-8 * a[:, kept].var(0)
            rows[k] += list(((closed - mc) / mc)[live])
            zs[k] += list(((closed - mc) / se)[live])
    print("| remainder | median rel. error | 5 % / 95 % quantile | median |z| (MC standard errors) |")
    print("|---|---:|---:|---:|")
    for k in rows:
        r = np.array(rows[k])
        print(f"| {k} | {np.median(r):+.2%} | {np.quantile(r, 0.05):+.2%} / {np.quantile(r, 0.95):+.2%} | "
              f"{np.median(np.abs(zs[k])):.1f} |")
    print()


# ----------------------------------------------------------------- d8

def _lag(v, k=1, mean=None):
    v = np.asarray(v, dtype=np.float64)
    v = v - (v.mean(axis=(0, 2, 3)) if mean is None else np.asarray(mean))[None, :, None, None]
    var = (v * v).mean(axis=(0, 2, 3)).sum()
    h = (v[:, :, k:] * v[:, :, :-k]).mean(axis=(0, 2, 3)).sum()
    w = (v[:, :, :, k:] * v[:, :, :, :-k]).mean(axis=(0, 2, 3)).sum()
    return 0.5 * (h + w) / var


def section_d8():
    rng = np.random.default_rng(3)
    print("## D8 on simulated fields (1000 fields of 48 x 48)\n")
    print("Average pool of a field with correlation rho^(|dy|+|dx|) (premise of D8):\n")
    print("| rho | pool | simulated | D8 | old rho^s |\n|---:|---|---:|---:|---:|")
    for rho in (0.3, 0.5, 0.7, 0.9):
        x = mathref.ar_fields(rng, 1000, 1, 48, 48, rho)
        for k, s in ((2, 2), (3, 2), (2, 1)):
            sim = _lag(mathref.pool(x, k, s, "avg"), mean=[0.0])
            print(f"| {rho} | avg {k}x{k}/{s} | {sim:.3f} | {dmodel.pool_lag_correlation(rho, (k, k), (s, s)):.3f} | "
                  f"{rho**s:.3f} |")
    print("\nAfter a ReLU (a = relu(beta + u), u with correlation rho_u^(|dy|+|dx|); rho_a = the measured lag-1 "
          "correlation of a, the input of the rule):\n")
    print("| beta | rho_u | rho_a | avg 2x2/2 sim | D8(rho_a) | max 2x2/2 sim | rho_a^2 | max 3x3/2 sim "
          "| D8(rho_a) 3x3/2 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    err_avg, err_max_d8, err_max_sq = [], [], []
    for beta in (-1.0, 0.0, 1.0):
        for rho in (0.3, 0.5, 0.7, 0.9):
            a = np.maximum(mathref.ar_fields(rng, 1000, 1, 48, 48, rho) + beta, 0)
            ra = _lag(a)
            avg, mx, mx3 = _lag(mathref.pool(a, 2, 2, "avg")), _lag(mathref.pool(a, 2, 2, "max")), \
                _lag(mathref.pool(a, 3, 2, "max"))
            d8, d83 = dmodel.pool_lag_correlation(ra, (2, 2), (2, 2)), dmodel.pool_lag_correlation(ra, (3, 3), (2, 2))
            err_avg.append(abs(avg - d8))
            err_max_d8 += [abs(mx - d8), abs(mx3 - d83)]
            err_max_sq += [abs(mx - ra**2), abs(mx3 - ra**2)]
            print(f"| {beta} | {rho} | {ra:.3f} | {avg:.3f} | {d8:.3f} | {mx:.3f} | {ra**2:.3f} | {mx3:.3f} "
                  f"| {d83:.3f} |")
    print(f"\nmax |avg sim - D8| after ReLU {max(err_avg):.3f}; max pools: |sim - D8| max {max(err_max_d8):.3f} "
          f"(mean {np.mean(err_max_d8):.3f}), |sim - rho^s| {min(err_max_sq):.3f} .. {max(err_max_sq):.3f} "
          f"(mean {np.mean(err_max_sq):.3f})\n")
    print("One number per value: lag-2 correlation of a conv output / ReLU output vs the geometric rho^2 "
          "(3x3 conv, random filters, input rho 0.7):\n")
    x = mathref.ar_fields(rng, 400, 4, 40, 40, 0.7)
    y = mathref.conv(x, rng.standard_normal((8, 4, 3, 3)))
    r1, r2 = _lag(y, 1, [0.0] * 8), _lag(y, 2, [0.0] * 8)
    a = np.maximum(y / y.std(axis=(0, 2, 3), keepdims=True) - 0.5, 0)
    a1, a2 = _lag(a, 1), _lag(a, 2)
    print(f"conv output: lag 1 {r1:.3f}, lag 2 {r2:.3f} vs rho^2 {r1**2:.3f}; ReLU output: lag 1 {a1:.3f}, "
          f"lag 2 {a2:.3f} vs {a1**2:.3f}\n")


def section_d8real():
    sys.path.insert(0, HERE)
    import accuracy
    from udfc_ref.evaluate import load_npz

    print("## Pooling rules on real activations (300 test images, lag-1 correlation, channel-variance weighted)\n")
    print("| model | pool | real in | real out | D8 formula(real in) | rho^s(real in) |")
    print("|---|---|---:|---:|---:|---:|")
    e_d8, e_sq = [], []
    md = os.path.join(HERE, "models")
    for name in accuracy.MODELS:
        m = udfc_ref.load(os.path.join(md, f"{name}.safetensors"))
        x, _ = load_npz(os.path.join(md, f"{accuracy.data_of(name)}_test.npz"))
        vals = m.forward(x[:300], return_values=True)
        for n in m.nodes:
            if n.op not in ("max_pool2d", "avg_pool2d") or vals[n.output].shape[2] < 2:
                continue
            rin, rout = _lag(vals[n.inputs[0]]), _lag(vals[n.output])
            d8 = dmodel.pool_lag_correlation(rin, n.attrs["kernel"], n.attrs["stride"])
            sq = rin ** max(n.attrs["stride"])
            e_d8.append(d8 - rout)
            e_sq.append(sq - rout)
            print(f"| {name} | {n.op} {n.name} | {rin:.3f} | {rout:.3f} | {d8:.3f} | {sq:.3f} |")
    print(f"\nD8 formula - real: {min(e_d8):+.3f} .. {max(e_d8):+.3f} (mean |.| {np.mean(np.abs(e_d8)):.3f}); "
          f"rho^s - real: {min(e_sq):+.3f} .. {max(e_sq):+.3f} (mean |.| {np.mean(np.abs(e_sq)):.3f})\n")
    print("Data model's rho vs real lag-1 correlation at every spatial value (mean |error|), with max pools by rho^s "
          "(D8') or by the average-pool formula:\n")
    import udfc_ref.datamodel as dmod

    for rule in ("rho^s", "avg formula"):
        errs = []
        for name in accuracy.MODELS:
            m = udfc_ref.load(os.path.join(md, f"{name}.safetensors"))
            x, _ = load_npz(os.path.join(md, f"{accuracy.data_of(name)}_test.npz"))
            vals = m.forward(x[:300], return_values=True)
            if rule == "avg formula":
                for n in m.nodes:
                    if n.op == "max_pool2d":
                        n.op = "avg_pool2d"  # the data model only (the forward ran above)
                        n.attrs.setdefault("count_include_pad", True)
            dm = dmod.DataModel(m)
            for n in m.nodes:
                st = dm.values.get(n.output)
                v = vals[n.output]
                if st is None or st.rho is None or v.ndim != 4 or v.shape[2] < 2:
                    continue
                errs.append(abs(st.rho - _lag(v)))
        print(f"- max pool by {rule}: mean |rho_model - rho_real| {np.mean(errs):.3f} over {len(errs)} values")
    print()


# ----------------------------------------------------------------- zrows

def _z_excess(a, aq, kept, pruned, T_rows, t_rows, wc, kept_T=None):
    """Consumer-output error of given pruned rows vs the best pruned rows for
    that consumer (in sample): the kept rows are fixed (identity or the U1
    scales), the pruned rows (and intercepts) are refit by least squares on
    Z = conv(W', a) directly."""
    m = kept.size
    kt = np.eye(m) if kept_T is None else np.diag(kept_T)
    ek = a[:, kept] - np.einsum("km,nmhw->nkhw", kt, aq) - 0.0  # kept residual (intercepts refit below)
    ek -= ek.mean(axis=(0, 2, 3), keepdims=True)
    base = mathref.conv(ek, wc[:, kept]) + mathref.conv(a[:, pruned], wc[:, pruned])  # Z error with pruned rows = 0

    def z_err(rows, ts):
        rec = np.einsum("pm,nmhw->nphw", rows, aq) + ts[None, :, None, None]
        e = base - mathref.conv(rec, wc[:, pruned])
        return float(((e - e.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean())

    feats = [mathref.conv(aq[:, [k]], wc[:, [pruned[j]]]) for j in range(pruned.size) for k in range(m)]
    F = np.stack([f.reshape(-1) for f in feats], 1)
    F -= F.mean(0)
    tgt = base.reshape(-1) - base.mean()
    # per output channel means: centre each output channel (intercepts are free)
    o = base.shape[1]
    idx = np.broadcast_to(np.arange(o)[None, :, None, None], base.shape).reshape(-1)
    for c in range(o):
        sel = idx == c
        F[sel] -= F[sel].mean(0)
        tgt[sel] -= tgt[sel].mean()
    best = np.linalg.lstsq(F, tgt, rcond=None)[0].reshape(pruned.size, m)
    return z_err(T_rows, t_rows), z_err(best, np.zeros(pruned.size))


def section_zrows():
    print("## Do the per-channel rows minimise the consumer's output error Z? (in sample)\n")
    print("Producer 3x3 conv (8 channels) on simulated fields (rho 0.6), BN calibrated, ReLU; 2 channels pruned; "
          "rows = per-position least squares on the same samples (what U2 computes when the data model is the "
          "sample), Z-optimal rows refit on the consumer's output.\n")
    print("| consumer | alpha1 | kept bits | Z(rows) / Z(optimal) - 1 |\n|---|---:|---|---:|")
    for seed in (0, 1, 2):
        rng = np.random.default_rng(10 + seed)
        x = mathref.ar_fields(rng, 600, 3, 20, 20, 0.6)
        W = rng.standard_normal((8, 3, 3, 3))
        h = mathref.conv(x, W)
        z = (h - h.mean(axis=(0, 2, 3), keepdims=True)) / h.std(axis=(0, 2, 3), keepdims=True)
        g, b = rng.uniform(0.5, 1.5, 8)[None, :, None, None], rng.normal(0, 0.5, 8)[None, :, None, None]
        a = np.maximum(g * z + b, 0)
        pruned, kept = np.array([2, 5]), np.array([0, 1, 3, 4, 6, 7])
        for bits in (None, 4):
            if bits is None:
                aq = a[:, kept]
            else:  # kept filters with a uniform rounding error of a 4-bit grid, through the original BN and ReLU
                step = np.abs(W[kept]).reshape(kept.size, -1).max(1) / (2 ** (bits - 1) - 1)
                Wq = W[kept] + rng.uniform(-0.5, 0.5, W[kept].shape) * step[:, None, None, None]
                hq = mathref.conv(x, Wq)
                mu, sd = h.mean(axis=(0, 2, 3), keepdims=True), h.std(axis=(0, 2, 3), keepdims=True)
                zq = (hq - mu[:, kept]) / sd[:, kept]
                aq = np.maximum(g[:, kept] * zq + b[:, kept], 0)
            A = aq.transpose(0, 2, 3, 1).reshape(-1, kept.size)
            P = a[:, pruned].transpose(0, 2, 3, 1).reshape(-1, pruned.size)
            Ac = A - A.mean(0)
            C = Ac.T @ Ac / len(A)
            X = (P - P.mean(0)).T @ Ac / len(A)
            kept_T = None
            if bits is not None:
                K = a[:, kept].transpose(0, 2, 3, 1).reshape(-1, kept.size)
                kept_T = ((K - K.mean(0)) * Ac).mean(0) / Ac.var(0)
            for alpha1 in (0.0, 0.01):
                rows = np.linalg.solve(C + alpha1 * np.diag(np.diag(C)), X.T).T
                for name, k in (("1x1", 1), ("3x3", 3)):
                    wc = rng.standard_normal((6, 8, k, k))
                    zr, zo = _z_excess(a, aq, kept, pruned, rows, np.zeros(2), wc, kept_T)
                    print(f"| {name} (seed {seed}) | {alpha1} | {bits or 'float'} | {zr / zo - 1:.2e} |")
    print()


def _top1(cells, out):
    sys.path.insert(0, HERE)
    import json

    import accuracy
    from udfc_ref.evaluate import load_npz

    if os.environ.get("MAXPOOL_AS_AVG"):  # the rejected variant of D8': max pools by the average-pool expression
        orig = dmodel.DataModel._propagate

        def propagate(self, n):
            s = self.values.get(n.inputs[0]) if n.op == "max_pool2d" else None
            if s is not None and s.rho is not None:
                rho = dmodel.pool_lag_correlation(s.rho, n.attrs["kernel"], n.attrs["stride"])
                return dmodel.ValueStats(s.mean, s.cov, rho)
            return orig(self, n)

        dmodel.DataModel._propagate = propagate
    print(f"## top-1 of udfc, code from {os.path.dirname(os.path.dirname(udfc_ref.__file__))}"
          f"{', max pools by D8' if os.environ.get('MAXPOOL_AS_AVG') else ''}\n")
    print("| model | prune | bits | bc | top-1 |\n|---|---:|---|---|---:|")
    rows = []
    md = os.path.join(HERE, "models")
    for name in accuracy.MODELS:
        m = udfc_ref.load(os.path.join(md, f"{name}.safetensors"))
        x, y = load_npz(os.path.join(md, f"{accuracy.data_of(name)}_test.npz"))
        for r, b, bc in cells:
            t = accuracy.run_cell(m, x, y, r, b, "udfc", bc)["top1"]
            rows.append({"model": name, "ratio": r, "bits": b, "bc": bc, "top1": t})
            print(f"| {name} | {r} | {b or 'float'} | {'on' if bc else 'off'} | {100 * t:.1f} |", flush=True)
    if out:
        from udfc_ref.atomic import write_bytes_atomic

        write_bytes_atomic(out, json.dumps(rows, indent=1).encode())
    print()


def section_top1():
    """udfc at 30 % / 50 % pruning + 6 bits, bias correction off / on."""
    _top1([(r, 6, bc) for r in (0.3, 0.5) for bc in (False, True)], os.environ.get("TOP1_JSON"))


def section_top1grid():
    """udfc over prune 0.1-0.7 x float/8/6/4 bits x bias correction off/on."""
    _top1([(r, b, bc) for r in (0.1, 0.3, 0.5, 0.7) for b in (None, 8, 6, 4) for bc in (False, True)],
          os.environ.get("TOP1_JSON"))


SECTIONS = {"m3": section_m3, "d7": section_d7, "kept": section_kept, "d8": section_d8, "d8real": section_d8real,
            "zrows": section_zrows, "top1": section_top1, "top1grid": section_top1grid}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", help=f"some of {', '.join(SECTIONS)} (default: all)")
    a = ap.parse_args(argv)
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    for s in a.sections or [k for k in SECTIONS if not k.startswith("top1")]:
        SECTIONS[s]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
