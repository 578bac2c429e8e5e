"""Measured error of the activation moments (derivation Eq. M1-M8).

For every activation key of ``udfc_ref.moments`` and a grid of ``beta`` x
``gamma``, compares ``E f``, ``Var f`` and the Hermite coefficients ``c_n``
(n = 1..30) with adaptive ``scipy.integrate.quad`` of the defining integrals
(split at the kinks), and, for the activations without a closed form, with
plain Gauss-Hermite quadrature in ``u`` (the first reading of "quadrature"),
at 100 and 200 nodes.  Errors are in units of the standard deviation of
``f(z)`` (variance errors relative to the variance).  Grid points where
``f(z)`` is constant to float64 precision (``sd(f) < 1e-8 (1 + |E f|)``, e.g.
GELU at beta = -6, gamma = 0.02: f ~ 1e-10, sd ~ 1e-11, where the float64
rounding of f itself, ~1e-16, is 1e-5 of sd) are counted and left out.

Usage::

    python benchmarks/moments_error.py            # prints the markdown table
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scipy import integrate  # noqa: E402

from udfc_ref.activation_moments import evaluate  # noqa: E402
from udfc_ref.moments import ACTIVATIONS, EXTRA_ACTIVATIONS, activation_mean_var, hermite_coefficients  # noqa: E402

BETAS = (-6.0, -3.0, -1.0, -0.3, 0.0, 0.5, 1.0, 2.0, 4.0, 6.0)
GAMMAS = (0.02, 0.1, 0.3, 1.0, 2.0, 5.0, 10.0, 30.0)
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardsigmoid": (-3.0, 3.0), "hardswish": (-3.0, 3.0)}
N = 30


def reference(act, beta, gamma):
    pts = sorted(p for p in ((k - beta) / gamma for k in KINKS.get(act, (-1.0, 0.0, 1.0))) if -13 < p < 13)

    def e(g):
        return integrate.quad(lambda u: g(u) * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi), -13, 13,
                              points=pts or None, limit=500, epsabs=1e-15, epsrel=1e-12)[0]

    def f(u):
        return float(evaluate(act, beta + gamma * u))

    m = e(f)
    v = e(lambda u: (f(u) - m) ** 2)
    c = np.empty(N)
    for n in range(1, N + 1):
        k = np.zeros(n + 1)
        k[n] = 1.0
        c[n - 1] = e(lambda u: f(u) * np.polynomial.hermite_e.hermeval(u, k)) / math.sqrt(math.factorial(n))
    return m, v, c


def gauss_hermite(act, beta, gamma, nodes):
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    f = evaluate(act, beta + gamma * x)
    m = float(w @ f)
    v = float(w @ (f - m) ** 2)
    he = np.empty((N + 1, nodes))
    he[0], he[1] = 1.0, x
    for k in range(1, N):
        he[k + 1] = (x * he[k] - math.sqrt(k) * he[k - 1]) / math.sqrt(k + 1)
    return m, v, he[1:] @ (w * f)


def errors(got, ref):
    (m, v, c), (rm, rv, rc) = got, ref
    sd = math.sqrt(rv)
    return (abs(m - rm) / (sd + 1e-15), abs(v - rv) / (rv + 1e-15 * sd + 1e-30),
            float(np.max(np.abs(c - rc))) / (sd + 1e-15))


def main() -> int:
    rows = []
    flat: dict[str, int] = {}
    t0 = time.perf_counter()
    for act in tuple(ACTIVATIONS) + EXTRA_ACTIVATIONS:
        worst = {"udfc": np.zeros(3), "gh100": np.zeros(3), "gh200": np.zeros(3)}
        for beta in BETAS:
            for gamma in GAMMAS:
                ref = reference(act, beta, gamma)
                if math.sqrt(ref[1]) < 1e-8 * (1 + abs(ref[0])):  # f constant to float64 precision here
                    flat[act] = flat.get(act, 0) + 1
                    continue
                m, v = activation_mean_var(np.array([beta]), np.array([gamma]), act)
                c = hermite_coefficients(np.array([beta]), np.array([gamma]), act, N)[:, 0]
                worst["udfc"] = np.maximum(worst["udfc"], errors((m[0], v[0], c), ref))
                for k in (100, 200):
                    worst[f"gh{k}"] = np.maximum(worst[f"gh{k}"], errors(gauss_hermite(act, beta, gamma, k), ref))
        rows.append((act, worst))
        print(f"{act}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"Grid: beta in {BETAS}, gamma in {GAMMAS}; max over the grid of |error| / sd(f) "
          f"(Var: relative), c_n for n = 1..{N}.\n")
    print("| activation | E f | Var f | max_n c_n | Gauss-Hermite 100: E f / Var f / c_n | Gauss-Hermite 200 | "
          "points left out |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for act, w in rows:
        u, g1, g2 = w["udfc"], w["gh100"], w["gh200"]
        print(f"| {act} | {u[0]:.1e} | {u[1]:.1e} | {u[2]:.1e} | {g1[0]:.1e} / {g1[1]:.1e} / {g1[2]:.1e} | "
              f"{g2[0]:.1e} / {g2[1]:.1e} / {g2[2]:.1e} | {flat.get(act, 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
