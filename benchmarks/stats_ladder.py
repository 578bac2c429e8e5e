"""Which assumption of the data model costs the most?  A ladder of pair statistics.

For every plain pair (a conv/linear producer -> BN -> ReLU/ReLU6, no depthwise
chain or gate) of the benchmark models, the statistics the solver reads --
the mean and covariance of the pair's activations ``a`` -- are built five
ways, each a step closer to the real activations:

1. ``data-free``: the data model (derivation section 4: A1 Gaussian BN
   marginals, A2/A4 propagated correlations, M1-M3);
2. ``df+true scales``: the data model's correlations of ``a`` with the
   measured means and variances of ``a`` (what fitting the marginals alone
   could reach);
3. ``gauss+true corr``: A1 kept (each standardised pre-activation Gaussian),
   but the correlation of the pre-activations measured on images (so A2-A4
   are replaced by the truth);
4. ``true marg+copula``: the measured marginal law of every pre-activation
   (its empirical quantile function) joined by a Gaussian copula whose
   correlation is measured (the normal scores' correlation); the activation's
   moments are then Eq. M3 with the Hermite coefficients of ``f(q_i(v))``,
   ``v ~ N(0, 1)`` -- what any model with Gaussian dependence could reach;
5. ``measured``: the sample mean and covariance of ``a`` (the oracle);

and, with ``--synthetic DIR`` (the images ``benchmarks/synthetic.py`` caches,
``DIR/<model>.npz``), ``synthetic``: the sample moments of ``a`` on the
synthetic images of Eq. Z1 (derivation section 14) -- no data.

Each set gives the linear reconstruction of the pruned channels from the kept
ones (``T = Cov_PK Cov_KK^-1``, ``t = E a_P - T E a_K``; the kept channels of
``criterion="l1"`` at ``--ratio``, no quantization, no ridge), and the
measured residual ``E||a_P - T a_K - t||^2 / E||a - E a||^2`` on the images
shows what the statistics' errors cost.  ``cov err`` is
``||Cov_pred - Cov_meas||_F / ||Cov_meas||_F`` of the activations.
Diagnostic only: test images are used to *measure*, nothing is fitted to
them that ``udfc_ref`` uses.

Usage::

    python benchmarks/stats_ladder.py                  # every model, ratio 0.5
    python benchmarks/stats_ladder.py --models vgg_mnist --ratio 0.3
"""
from __future__ import annotations

import argparse
import json
import sys
from math import factorial
from pathlib import Path

import numpy as np
from scipy.stats import norm, rankdata

from udfc_ref import io
from udfc_ref.calibrate import rows
from udfc_ref.datamodel import DataModel, activation_stats
from udfc_ref.pairs import find_pairs
from udfc_ref.select import pair_scores, select_kept

HERE = Path(__file__).resolve().parent
MODELS = ["vgg_mnist", "resnet_mnist", "mobilenet_mnist", "keras_mnist", "vgg_digits",
          "vgg_small_mnist", "efficientnet_mnist", "mobilenetv3_mnist"]
RUNGS = ["data-free", "df+true scales", "gauss+true corr", "true marg+copula", "measured"]
N_QUANTILES = 4000
N_HERMITE = 12
ROWS = 100_000  # sample rows (image x position) used for the moments


def _hermite(v: np.ndarray, n: int) -> np.ndarray:
    """Probabilists' Hermite polynomials He_0..He_n at v, (n + 1, len(v))."""
    h = [np.ones_like(v), v]
    for k in range(1, n):
        h.append(v * h[k] - k * h[k - 1])
    return np.array(h[: n + 1])


def _corr(c: np.ndarray) -> np.ndarray:
    s = np.sqrt(np.clip(np.diag(c), 1e-300, None))
    return c / np.outer(s, s)


def copula_stats(z: np.ndarray, f, gamma, beta, mu_bn, var_bn, eps) -> tuple[np.ndarray, np.ndarray]:
    """Mean / covariance of ``f(BN(z))`` for the measured marginals of ``z``
    (S, N) joined by a Gaussian copula with the measured normal-score
    correlation: ``Cov = sum_n c_n c_n^T r^n / n!`` (Mehler, Eq. M3)."""
    q = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    he = _hermite(norm.ppf(q), N_HERMITE)
    quant = np.quantile(z, q, axis=0)  # (Q, N)
    a = f(gamma * (quant - mu_bn) / np.sqrt(var_bn + eps) + beta)
    c = (he @ a / N_QUANTILES).T  # (N, n+1): E[f He_n]
    v = norm.ppf((np.apply_along_axis(rankdata, 0, z) - 0.5) / len(z))
    r = np.corrcoef(v, rowvar=False)
    cov = sum(np.outer(c[:, n], c[:, n]) * r**n / factorial(n) for n in range(1, N_HERMITE + 1))
    return c[:, 0], cov


def _rows(v: np.ndarray) -> np.ndarray:
    """(B, C[, H, W]) -> (B*H*W, C) in float64 (``calibrate.rows``)."""
    return rows(v).astype(np.float64)


def ladder(name: str, ratio: float, x: np.ndarray, rng: np.random.Generator, rows: int = ROWS,
           models_dir: Path = HERE / "models", synthetic: np.ndarray | None = None) -> list[dict]:
    """One row per plain pair of ``name``: the measured residual of each rung
    (and of the ``synthetic`` rung when synthetic images are given)."""
    model = io.load(models_dir / f"{name}.safetensors")
    vals = model.forward(x, return_values=True)
    syn_vals = None if synthetic is None else model.forward(synthetic, return_values=True)
    dm = DataModel(model)
    acts = {"relu": lambda t: np.maximum(t, 0), "relu6": lambda t: np.clip(t, 0, 6)}
    out = []
    for p in find_pairs(model)[0]:
        if p.dw is not None or p.se is not None or p.act not in acts:
            continue
        bn = p.bn
        t = model.tensors
        gamma, beta = (t[bn.params[k]].astype(np.float64) for k in ("weight", "bias"))
        mu_bn, var_bn = (t[bn.params[k]].astype(np.float64) for k in ("running_mean", "running_var"))
        act_value = model.consumers(bn.output)[0].output
        z_all, a_all = _rows(vals[p.producer.output]), _rows(vals[act_value])
        pick = rng.choice(len(z_all), min(len(z_all), rows), replace=False)
        z, a = z_all[pick], a_all[pick]
        n = z.shape[1]
        scores, gam = pair_scores(model, p, "l1")
        kept = np.asarray(select_kept(scores, ratio, gam))
        pruned = np.setdiff1d(np.arange(n), kept)
        vs = dm.value(act_value)
        g = activation_stats(beta, np.outer(gamma, gamma) * _corr(np.cov(z, rowvar=False)), p.act)
        stats = {
            "data-free": (vs.mean, vs.cov),
            "gauss+true corr": (g.mean, g.cov),
            "true marg+copula": copula_stats(z, acts[p.act], gamma, beta, mu_bn, var_bn, bn.attrs.get("eps", 1e-5)),
            "measured": (a.mean(0), np.cov(a, rowvar=False)),
        }
        # the data model's correlations with the measured means and variances
        sd = np.sqrt(np.diag(stats["measured"][1]) / np.clip(np.diag(vs.cov), 1e-30, None))
        stats["df+true scales"] = (a.mean(0), vs.cov * np.outer(sd, sd))
        if syn_vals is not None:
            s_a = _rows(syn_vals[act_value])
            stats["synthetic"] = (s_a.mean(0), np.cov(s_a, rowvar=False))
        cov_m = stats["measured"][1]
        total = ((a - a.mean(0)) ** 2).sum(1).mean()
        row = {"model": name, "pair": p.producer.name, "N": n, "kept": len(kept)}
        for rung, (mu, cov) in stats.items():
            ck = cov[np.ix_(kept, kept)]
            T = np.linalg.solve(ck + 1e-9 * np.trace(ck) / len(kept) * np.eye(len(kept)), cov[np.ix_(kept, pruned)]).T
            res = a[:, pruned] - a[:, kept] @ T.T - (mu[pruned] - T @ mu[kept])
            row[rung] = float((res**2).sum(1).mean() / total)
            row[rung + " cov err"] = float(np.linalg.norm(cov - cov_m) / np.linalg.norm(cov_m))
        row["drop"] = float(((a[:, pruned] - a[:, pruned].mean(0)) ** 2).sum(1).mean() / total)
        out.append(row)
        print(f"{name:18s} {p.producer.name:22s} " + "  ".join(f"{row[r]:.3f} ({row[r + ' cov err']:.2f})"
                                                          for r in RUNGS + ["synthetic"] if r in row)
              + f"  drop {row['drop']:.3f}", flush=True)
    return out


def table(rows: list[dict]) -> str:
    rungs = RUNGS + (["synthetic"] if rows and "synthetic" in rows[0] else [])
    head = "| model | pair | " + " | ".join(rungs) + " | drop (mean only) |"
    lines = [head, "|---|---|" + "---:|" * (len(rungs) + 1)]
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f} ({r[k + ' cov err']:.2f})" for k in rungs)
        lines.append(f"| {r['model']} | {r['pair']} | {cells} | {r['drop']:.3f} |")
    for k in [k for k in rungs if k not in ("data-free", "measured")]:
        share = [(r["data-free"] - r[k]) / (r["data-free"] - r["measured"]) for r in rows if r["data-free"] > r["measured"]]
        lines.append(f"\n{k}: closes a median {np.median(share):.0%} (range {min(share):.0%} .. {max(share):.0%}) "
                     "of the gap between data-free and measured")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated benchmark models")
    ap.add_argument("--ratio", type=float, default=0.5, help="prune ratio of every pair (default 0.5)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "stats_ladder.json", help="rows as JSON")
    ap.add_argument("--synthetic", type=Path, metavar="DIR",
                    help="also the statistics measured on DIR/<model>.npz (benchmarks/synthetic.py's cache, "
                         "e.g. benchmarks/results/synthetic_images)")
    args = ap.parse_args(argv)
    rows = []
    rng = np.random.default_rng(0)
    print(f"{'model':18s} {'pair':22s} residual/total (cov err) for: " + ", ".join(RUNGS))
    for name in args.models.split(","):
        data = np.load(HERE / "models" / ("digits_test.npz" if "digits" in name else "mnist_test.npz"))
        syn = None
        if args.synthetic is not None:
            syn = np.load(args.synthetic / f"{name}.npz")["x"].astype(np.float32)
        rows += ladder(name, args.ratio, data["x"].astype(np.float32), rng, synthetic=syn)
    args.out.write_text(json.dumps({"ratio": args.ratio, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
