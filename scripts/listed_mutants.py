"""Plant each hand-written mutant of the math (issue 11's list and a few
more), run the fast math tests on the mutated copy, and report which tests
kill it.  On demand, not part of the test suite:

    python scripts/listed_mutants.py              # all mutants
    python scripts/listed_mutants.py b1-sign q1-half-up
    python scripts/listed_mutants.py --list

Each mutant is one textual replacement in a copy of the worktree
(``udfc_ref/``, ``tests/``, ``converters/``, ``pyproject.toml`` in a temporary
directory); the worktree itself is never edited.  A mutant that no longer
applies (the code moved) is reported as such, not as survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = ["tests/test_math_moments.py", "tests/test_math_spatial.py", "tests/test_math_propagation.py",
         "tests/test_math_chain.py", "tests/test_math_rules.py", "tests/test_solver.py", "tests/test_quantize.py",
         "tests/test_compress.py"]

# name: (file, old, new, what it breaks)
MUTANTS = {
    "a4-running-mean": ("udfc_ref/datamodel.py", "gamma, beta, _, _ = bn_affine(m, n)",
                        "gamma, _, beta, _ = bn_affine(m, n)", "A4: BN output mean = running_mean, not beta"),
    "b1-sign": ("udfc_ref/compression.py", "shift_output(model, node, -shift,", "shift_output(model, node, shift,",
                "B1: bias correction with its sign flipped"),
    "d5-b1-shift-kept": ("udfc_ref/compression.py", "extra = -_bias_correct(bc_model, node, eps_w, dm, onode, ik)",
                         "_bias_correct(bc_model, node, eps_w, dm, onode, ik)",
                         "D5 with B1: the corrected shift not removed from delta"),
    "d4-not-embedded": ("udfc_ref/compression.py", "            Wq += E\n", "            pass\n",
                        "D4: quantization error not embedded in W~ (first layer of a pair chain)"),
    "d4-not-embedded-ik": ("udfc_ref/compression.py", "            Wq[:, ik, :] += E\n", "            pass\n",
                           "D4: quantization error not embedded in W~ (pruned input columns)"),
    "d6-no-stride": ("udfc_ref/datamodel.py", "np.diag(np.asarray(stride, dtype=np.float64)[:2])", "np.eye(2)",
                     "D6: stride ignored"),
    "d8-dropped": ("udfc_ref/datamodel.py", 'rho = pool_lag_correlation(rho, n.attrs["kernel"], n.attrs["stride"])',
                   "rho = rho", "D8: pooling keeps rho"),
    "d8-rho-power-s": ("udfc_ref/datamodel.py",
                       'rho = pool_lag_correlation(rho, n.attrs["kernel"], n.attrs["stride"])',
                       'rho = rho ** max(n.attrs["stride"])', "D8: the old rho -> rho^s for an average pool"),
    "d2-no-dilation": ("udfc_ref/datamodel.py", 'dh, dw = node.attrs["dilation"]', "dh, dw = 1, 1",
                       "D2: dilation ignored"),
    "d2-euclidean": ("udfc_ref/datamodel.py", "d = np.abs(pos[:, None, :] - pos[None, :, :]).sum(-1)",
                     "d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))", "D2: Euclidean distance"),
    "d7-rho-n-minus-1": ("udfc_ref/datamodel.py", "np.power(rho, np.arange(1, c.shape[0] + 1))",
                         "np.power(rho, np.arange(0, c.shape[0]))", "D7: rho^(n-1)"),
    "q1-half-up": ("udfc_ref/quantize.py", "q = np.rint(x64 / scale.reshape(shp))",
                   "q = np.floor(x64 / scale.reshape(shp) + 0.5)", "Q1: round half up"),
    # beyond the list
    "s1-l2-as-l1": ("udfc_ref/select.py", 's = np.abs(w).sum(1) if criterion == "l1" else np.sqrt((w * w).sum(1))',
                    "s = np.abs(w).sum(1)", "S1: l2 computed as l1"),
    "s1-bn-times-sigma": ("udfc_ref/select.py", "s = s * np.abs(gamma) / sigma", "s = s * np.abs(gamma) * sigma",
                          "S1: |gamma| sigma instead of |gamma| / sigma"),
    "s1-bn-ignored": ("udfc_ref/compression.py", 'if criterion.endswith("-bn") else', 'if False else',
                      "S1: -bn criteria not scaled"),
    "n1-lambda-swapped": ("udfc_ref/solve.py", "score = lam * (1 - cos) + (1 - lam) * Bn",
                          "score = (1 - lam) * (1 - cos) + lam * Bn", "N1: lambda weights swapped"),
    "n1-no-threshold": ("udfc_ref/solve.py", ">= threshold)", ">= -2.0)", "N1: threshold ignored"),
    "n1-notes-mismatch": ("udfc_ref/solve.py",
                          "B = np.abs(bbar[kept][None, :] - _safe_div(bbar[pruned][:, None], kappa))",
                          "B = np.abs(bbar[kept][None, :] - bbar[pruned][:, None] * s**2 / kappa) / kappa",
                          "N1: the METHOD-NOTES form of the mismatch"),
    "e2-weights-not-squared": ("udfc_ref/coupled.py", 'return np.einsum("onr,onr->n", wr, wr, dtype=np.float64)',
                               "return np.abs(wr).astype(np.float64).sum(axis=(0, 2))", "E2: L1 column weights"),
    "u4-not-min-norm": ("udfc_ref/solve.py", "return scipy.linalg.lstsq(A, B, cond=1e-10, check_finite=False)[0]",
                        "return np.linalg.solve(A + 1e-6 * scale * np.eye(A.shape[0]), B)",
                        "U4: a ridge-jitter solve instead of the minimum-norm least squares"),
    "u1-alpha2-sign": ("udfc_ref/solve.py", "(xk + alpha2 * vq)", "(xk - alpha2 * vq)", "U1: alpha2 sign"),
    "d5-delta-dropped": ("udfc_ref/solve.py", "delta = _safe_div(shift, sk)", "delta = 0 * _safe_div(shift, sk)",
                         "D5: the quantization mean shift of kept channels ignored"),
    "d5-scale-dropped": ("udfc_ref/solve.py", "scale = np.where(sk > 0, scale, 1.0)", "scale = np.ones_like(scale)",
                         "D5: the std of the compressed kept channels taken as the original's"),
    "d5-gamma-sign": ("udfc_ref/solve.py", "sgn = np.where(gamma < 0, -1.0, 1.0)", "sgn = np.ones_like(gamma)",
                      "D5: negative gamma not flipping the correlations"),
    "m3p-no-tail": ("udfc_ref/moments.py", "out[i, k] = np.where(", "out[i, k] = 0 * np.where(",
                    "M3': remainder dropped"),
    "m3p-tail-sign": ("udfc_ref/moments.py", "(-1.0) ** (n_terms + 1) * r_minus", "r_minus",
                      "M3': remainder with the sign of rho^(n+1) at negative rho"),
    # mutmut survivors of the run in docs/mutation.md, killed by tests added after it
    "n1-global-min": ("udfc_ref/solve.py", "lo, hi = B.min(1, keepdims=True)", "lo, hi = B.min(keepdims=True)",
                      "N1: mismatch normalised over the layer, not per pruned channel (neuron_merging__mutmut_92)"),
    "a4-linear-on-input": ("udfc_ref/datamodel.py",
                           'if p is not None and p.op == "flatten":\n                    self._last_use',
                           'if p is not None or p.op == "flatten":\n                    self._last_use',
                           "A4: a linear layer reading the network input (DataModel.__init____mutmut_26)"),
    "a1-dead-corr": ("udfc_ref/datamodel.py", "inv = 1.0 / np.where(d > 0, d, 1.0)",
                     "inv = 1.0 / np.where(d >= 0, d, 1.0)", "A1: a dead BN channel divided by 0 (_corr__mutmut_19)"),
    "bn-sigma-minus-eps": ("udfc_ref/datamodel.py", 'astype(np.float64) + bn.attrs["eps"])',
                           'astype(np.float64) - bn.attrs["eps"])', "sigma = sqrt(var - eps) (bn_affine__mutmut_27)"),
    "d2-two-taps": ("udfc_ref/datamodel.py", "if f.shape[2] > 1 and self.rho_s > 0", "if f.shape[2] > 2 and self.rho_s > 0",
                    "D2: R_s skipped for a 1x2 kernel (cov_times__mutmut_7)"),
    "q3-unrounded-scales": ("udfc_ref/quantize.py", "s, z = _scale_zp(lo * r, hi * r, bits, symmetric, dtype)",
                            "s, z = _scale_zp(lo * r, hi * r, bits, symmetric, None)",
                            "Q2/Q3: candidate scales not rounded to the storage dtype (quantize__mutmut_78)"),
    "r2-bn-branch": ("udfc_ref/rewrite.py", 'cs[0].op == "batch_norm" and node.output != model.output_name',
                     'cs[0].op == "batch_norm" or node.output != model.output_name',
                     "R2: a bias-free layer read by a ReLU sent to the BN branch (shift_output__mutmut_15)"),
    "m12-tail-mass": ("udfc_ref/moments.py", "mass = np.where(a > 0, ndtr(-a) - ndtr(-b), Pb - Pa)",
                      "mass = np.where(None, ndtr(-a) - ndtr(-b), Pb - Pa)",
                      "M1-M2: the clipped mass with 1 - Phi cancellation (clipped_gaussian_moments__mutmut_74)"),
    "a4-1x1-refit": ("udfc_ref/datamodel.py", 'if src.rho is not None and (n.op == "conv2d" or pos.shape[0] > 1):',
                     'if src.rho is not None and (n.op != "conv2d" or pos.shape[0] > 1):',
                     "A4/D6: a 1x1 conv refits rho instead of reading the propagated one (_propagate__mutmut_84)"),
    "d6-no-lower-clip": ("udfc_ref/datamodel.py", "return float(np.clip(num / den, 0.0, 0.99))",
                         "return float(np.clip(num / den, None, 0.99))", "D6: rho below 0 kept (lag_correlation__mutmut_43)"),
}


def run(name, keep_going=True):
    path, old, new, _ = MUTANTS[name]
    tmp = tempfile.mkdtemp(prefix=f"mutant-{name}-")
    try:
        for d in ("udfc_ref", "tests", "converters"):
            shutil.copytree(os.path.join(ROOT, d), os.path.join(tmp, d),
                            ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp)
        f = os.path.join(tmp, path)
        src = open(f).read()
        if src.count(old) != 1:
            return "does not apply", []
        open(f, "w").write(src.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp, CI="1", KERAS_BACKEND="torch")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf"] + TESTS
        if not keep_going:
            cmd.insert(4, "-x")
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
        return ("killed" if r.returncode != 0 else "SURVIVED"), failed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = ap.parse_args(argv)
    if a.list:
        for k, v in MUTANTS.items():
            print(f"{k:24s} {v[3]}")
        return 0
    names = a.names or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutant(s): {', '.join(unknown)}")
    survived = 0
    for n in names:
        status, failed = run(n)
        survived += status != "killed"
        short = sorted({f.split("::")[0].replace("tests/", "") + "::" + f.split("::")[1].split("[")[0] for f in failed})
        print(f"{n:24s} {status:14s} {MUTANTS[n][3]}\n    killed by: {', '.join(short) or '-'}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
