"""benchmarks/stats_ladder.py: the copula rung against Monte-Carlo, and the
ordering every ladder must have (the measured statistics are the least-squares
optimum on the same samples, so no other rung can leave a smaller residual)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ladder():
    spec = importlib.util.spec_from_file_location("_bench_stats_ladder", os.path.join(ROOT, "benchmarks", "stats_ladder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _relu(t):
    return np.maximum(t, 0)


@pytest.mark.parametrize("marginal", ["gauss", "lognormal"])
def test_copula_stats_against_monte_carlo(marginal):
    """Gaussian copula with correlation 0.6; marginals Gaussian or lognormal
    (skewed, like real pre-activations): mean and covariance of
    relu(BN(z)) against the sample moments of 400,000 draws."""
    sl = _ladder()
    rng = np.random.default_rng(1)
    r = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    v = rng.multivariate_normal(np.zeros(3), r, size=400_000)
    z = v if marginal == "gauss" else np.exp(0.7 * v)
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -0.5, 0.3])
    mu_bn, var_bn = z.mean(0), z.var(0)
    mean, cov = sl.copula_stats(z[:100_000], _relu, gamma, beta, mu_bn, var_bn, 0.0)
    a = _relu(gamma * (z - mu_bn) / np.sqrt(var_bn) + beta)
    np.testing.assert_allclose(mean, a.mean(0), atol=0.01)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False), atol=0.02 * np.abs(np.cov(a, rowvar=False)).max())


def test_measured_rung_is_the_least_squares_optimum():
    sl = _ladder()
    x = np.load(os.path.join(ROOT, "benchmarks", "models", "digits_test.npz"))["x"][:120].astype(np.float32)
    noise = np.random.default_rng(1).standard_normal((30,) + x.shape[1:]).astype(np.float32)
    rows = sl.ladder("vgg_digits", 0.5, x, np.random.default_rng(0), rows=4000, synthetic=noise)
    assert [r["pair"] for r in rows] == ["features.0", "features.3", "features.7", "features.10"]
    assert "synthetic" in sl.table(rows)
    for r in rows:
        assert r["measured cov err"] == 0.0 and r["synthetic cov err"] > 0
        for rung in sl.RUNGS[:-1] + ["synthetic"]:
            assert r["measured"] <= r[rung] + 1e-9, (r["pair"], rung)
        assert 0 < r["measured"] < r["drop"] <= 1
