"""The discrete rules: channel selection (S1), rounding (Q1) and Neuron
Merging (N1-N2), each against its definition computed here, with the merge's
constant mismatch measured by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import vgg

from udfc_ref import compress
from udfc_ref.quantize import quantize
from udfc_ref.solve import neuron_merging

# ----------------------------------------------------------------- S1

# four filters of 2 x 3 x 3 = 18 weights whose L1 and L2 orders differ
FILTERS = np.zeros((4, 18))
FILTERS[0, :] = 0.1  # l1 1.8, l2 0.42
FILTERS[1, 0] = 1.0  # l1 1.0, l2 1.0
FILTERS[2, :4] = 0.35  # l1 1.4, l2 0.70
FILTERS[3, :9] = 0.25  # l1 2.25, l2 0.75
SIGMA = np.array([2.0, 0.5, 1.0, 3.0])
GAMMA = np.array([1.5, 3.0, 1.0, 0.7]) * SIGMA * np.array([1, -1, 1, 1])  # |gamma|/sigma = 1.5, 3, 1, 0.7


@pytest.mark.parametrize("criterion", ["l1", "l2", "l1-bn", "l2-bn"])
def test_s1_each_criterion_prunes_its_own_lowest_channel(criterion):
    """S1: ||W_i||_1 or ||W_i||_2, times |gamma_i| / sigma_i for the -bn
    criteria; the four criteria prune four different channels here."""
    m = vgg(0, channels=(2, 4, 4))
    m.tensors["c0.weight"] = FILTERS.reshape(4, 2, 3, 3).astype(np.float32)
    m.tensors["b0.weight"] = GAMMA.astype(np.float32)
    m.tensors["b0.running_var"] = (SIGMA**2 - 1e-5).astype(np.float32)
    norm = np.abs(FILTERS).sum(1) if criterion.startswith("l1") else np.sqrt((FILTERS**2).sum(1))
    if criterion.endswith("-bn"):
        norm = norm * np.abs(GAMMA) / SIGMA
    small, _ = compress(m, prune_ratio=0.25, criterion=criterion, skip=["c1"])
    pruned = set(range(4)) - set(small.record["layers"]["c0"]["kept"])
    assert pruned == {int(np.argmin(norm))}
    assert {"l1": 1, "l2": 0, "l1-bn": 2, "l2-bn": 3}[criterion] in pruned


# ----------------------------------------------------------------- Q1

@pytest.mark.parametrize("symmetric", [True, False])
def test_q1_rounds_half_to_even(symmetric):
    """Q1: codes are rint(x / s) + z with ties to even (scale exactly 1 here:
    max |x| = 7 on the 4-bit symmetric grid, range [0, 15] asymmetric)."""
    top = 7.0 if symmetric else 15.0
    w = np.array([[top, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]], np.float32)
    if symmetric:
        w = np.concatenate([w, -w])
    q = quantize(w, 4, symmetric=symmetric)
    assert np.all(q.scale == 1.0)
    expect = np.array([top, 0, 2, 2, 4, 4, 6, 6])
    if symmetric:
        expect = np.stack([expect, -expect])
    zp = 0 if q.zero_point is None else q.zero_point.astype(np.int64)[:, None]
    assert np.array_equal(q.codes.astype(np.int64) - zp, expect.reshape(q.codes.shape))


# ----------------------------------------------------------------- N1-N2

def _measured_mismatch(W, gamma, beta, mean, sigma, j, c, rng):
    """Simulate z = gamma (W x - mu) / sigma + beta for random inputs and return
    (S, the constant of z_j - S z_c in units of z_c), for W_j parallel to W_c."""
    x = rng.standard_normal((1000, W.shape[1]))
    z = gamma * (x @ W.T - mean) / sigma + beta
    S = np.std(z[:, j]) / np.std(z[:, c]) * np.sign(np.corrcoef(z[:, j], z[:, c])[0, 1])
    const = z[:, j] - S * z[:, c]
    assert np.ptp(const) <= 1e-9 * (1 + np.abs(const).max())  # z_j = S z_c + const exactly
    return S, abs(const.mean()) / S


def _bn(rng, n):
    return rng.uniform(0.5, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.5, 2, n)


def test_n2_merge_scale_and_constant_mismatch_by_simulation():
    """N2: for W_j = s W_c, z_j = S z_c + const with S = s gamma_j sigma_c /
    (gamma_c sigma_j); among equally similar candidates the partner is the one
    with the smallest |const| / S (the mismatch in units of z_c) -- here
    measured, and chosen differently than by the METHOD-NOTES expression."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(6)
    W = np.stack([base * 0.8, base * 1.7, base * 0.6, base * 1.2])  # channel 0 pruned; 1, 2, 3 all parallel
    gamma, beta, mean, sigma = _bn(rng, 4)
    beta[1:] = [2.0, -1.0, 0.3]
    kept = np.array([1, 2, 3])
    T, t = neuron_merging(W, gamma, beta, mean, sigma, kept)
    meas = [_measured_mismatch(W, gamma, beta, mean, sigma, 0, c, rng) for c in kept]
    best = int(np.argmin([b for _, b in meas]))
    assert np.flatnonzero(T[0]).tolist() == [best] and T[0, best] == pytest.approx(meas[best][0], rel=1e-9)
    assert np.all(t == 0) and np.array_equal(T[kept], np.eye(3))
    # the METHOD-NOTES expression |(g_c/s_c)(s (mu_j - s_j b_j / g_j) - mu_c) + b_c| / S ranks them otherwise
    s = np.linalg.norm(W[0]) / np.linalg.norm(W[kept], axis=1)
    S = s * gamma[0] * sigma[kept] / (gamma[kept] * sigma[0])
    notes = np.abs(gamma[kept] / sigma[kept] * (s * (mean[0] - sigma[0] * beta[0] / gamma[0]) - mean[kept])
                   + beta[kept]) / S
    assert int(np.argmin(notes)) != best


def _two_candidates(cos1, cos2, rng):
    """Pruned filter 0 and kept filters 1, 2 at the given cosine similarities."""
    e = np.linalg.qr(rng.standard_normal((8, 3)))[0].T
    return np.stack([e[0], cos1 * e[0] + np.sqrt(1 - cos1**2) * e[1], cos2 * e[0] + np.sqrt(1 - cos2**2) * e[2]])


@pytest.mark.parametrize("lam", [0.85, 0.3, 0.99])
def test_n1_partner_minimises_lambda_cosine_plus_normalised_mismatch(lam):
    """N1: score = lam (1 - cos) + (1 - lam) B_norm, B min-max normalised over
    the candidates; with two candidates B_norm is 0 for one and 1 for the
    other, so the choice flips at lam = 1 / (1 + (cos1 - cos2)) ..."""
    rng = np.random.default_rng(1)
    W = _two_candidates(0.95, 0.80, rng)
    gamma, beta, mean, sigma = np.ones(3), np.array([0.0, 3.0, 0.1]), np.zeros(3), np.ones(3)
    T, _ = neuron_merging(W, gamma, beta, mean, sigma, np.array([1, 2]), lam=lam)
    S = np.linalg.norm(W[0]) / np.linalg.norm(W[1:], axis=1)
    B = np.abs(beta[1:] - beta[0] / S)  # here b = beta (mu = 0, gamma = sigma = 1)
    score = lam * (1 - np.array([0.95, 0.80])) + (1 - lam) * (B - B.min()) / (B.max() - B.min())
    assert np.flatnonzero(T[0]).tolist() == [int(np.argmin(score))]
    assert {0.85: 1, 0.3: 1, 0.99: 0}[lam] == int(np.argmin(score))  # the three lam cover both choices


@pytest.mark.parametrize("cos,merged", [(0.09, False), (0.11, True), (-0.5, False)])
def test_n1_threshold_and_sign(cos, merged):
    """N1: no merge when the best cosine similarity is below t = 0.1, nor
    when S <= 0 (opposite BN signs)."""
    rng = np.random.default_rng(2)
    W = _two_candidates(cos, cos, rng)[:2]
    one = np.ones(2)
    T, _ = neuron_merging(W, one, np.zeros(2), np.zeros(2), one, np.array([1]))
    assert (T[0, 0] != 0) == merged
    T, _ = neuron_merging(W, np.array([1.0, -1.0]), np.zeros(2), np.zeros(2), one, np.array([1]))
    assert T[0, 0] == 0  # S < 0


# ----------------------------------------------------------------- packing (docs/format.md)

def _pack_reference(codes, bits, qmin):
    """docs/format.md, written out with Python strings: u = q - qmin, `bits`
    bits each, MSB first, concatenated in C order, cut into bytes, zero padded."""
    s = "".join(format(int(q) - qmin, f"0{bits}b") for q in np.asarray(codes).reshape(-1))
    s += "0" * (-len(s) % 8)
    return np.array([int(s[i: i + 8], 2) for i in range(0, len(s), 8)], np.uint8)


def test_packed_layout_is_the_documented_one():
    """The format's own example (4-bit symmetric [-7, 0, 7] -> 0x07 0xE0) and
    random codes of every packed width, both schemes, against the string
    reference; unpacking inverts it."""
    from udfc_ref.quantize import pack_codes, qrange, unpack_codes

    assert pack_codes(np.array([-7, 0, 7], np.int8), 4, True).tolist() == [0x07, 0xE0]
    rng = np.random.default_rng(0)
    for bits in range(2, 8):
        for symmetric in (True, False):
            qmin, qmax = qrange(bits, symmetric)
            for shape in ((3, 5), (7,), (2, 3, 2, 2)):
                codes = rng.integers(qmin, qmax + 1, shape).astype(np.int8 if symmetric else np.uint8)
                packed = pack_codes(codes, bits, symmetric)
                assert np.array_equal(packed, _pack_reference(codes, bits, qmin)), (bits, symmetric, shape)
                back = unpack_codes(packed, bits, symmetric, shape)
                assert back.dtype == (np.int8 if symmetric else np.uint8) and back.shape == shape
                assert np.array_equal(back.astype(np.int64), codes.astype(np.int64))


def _nm_reference(W, gamma, beta, mean, sigma, kept, lam=0.85, threshold=0.1):
    """N1-N2 written out channel by channel from the derivation."""
    n = W.shape[0]
    T = np.zeros((n, len(kept)))
    for m, k in enumerate(kept):
        T[k, m] = 1.0
    b = beta - gamma * mean / sigma
    for j in sorted(set(range(n)) - set(kept)):
        wj = W[j].ravel()
        cand = []
        for m, c in enumerate(kept):
            wc = W[c].ravel()
            nj, nc = np.linalg.norm(wj), np.linalg.norm(wc)
            cos = float(wj @ wc / (nj * nc)) if nj > 0 and nc > 0 else 0.0
            s = nj / nc if nc > 0 else nj
            kappa = s * gamma[j] * sigma[c] / (gamma[c] * sigma[j]) if gamma[c] != 0 else 0.0
            # a candidate with kappa <= 0 is never chosen; its mismatch (taken as |b_c|)
            # still enters the min-max range of the others
            mismatch = abs(b[c] - b[j] / kappa) if kappa > 0 else abs(b[c])
            cand.append((m, cos, kappa, mismatch))
        lo, hi = min(x[3] for x in cand), max(x[3] for x in cand)
        best = None
        for m, cos, kappa, mismatch in cand:
            bn = (mismatch - lo) / (hi - lo) if hi > lo else 0.0
            score = lam * (1 - cos) + (1 - lam) * bn if kappa > 0 else np.inf
            if best is None or score < best[0]:
                best = (score, m, cos, kappa)
        if np.isfinite(best[0]) and best[2] >= threshold:
            T[j, best[1]] = best[3]
    return T


@pytest.mark.parametrize("seed", range(6))
def test_n1_matches_the_written_out_rule(seed):
    """N1-N2 on random layers: filters of norms well below and above 1, three
    pruned channels, BN statistics with negative gammas, one dead pruned
    channel, one all-zero kept filter; against the rule written out above."""
    rng = np.random.default_rng(seed)
    n, kept = 9, np.array([0, 2, 3, 5, 6, 8])
    base = rng.standard_normal((3, 12))
    W = (rng.standard_normal((n, 3)) @ base + 0.3 * rng.standard_normal((n, 12))) * rng.choice([0.05, 0.3, 3.0], (n, 1))
    W[6] = 0.0
    gamma = rng.uniform(0.3, 2, n) * rng.choice([1, 1, -1], n)
    gamma[4] = 0.0
    beta, mean, sigma = rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.3, 3, n)
    for lam, thr in ((0.85, 0.1), (0.5, 0.3)):
        T, t = neuron_merging(W.reshape(n, 3, 4), gamma, beta, mean, sigma, kept, lam=lam, threshold=thr)
        ref = _nm_reference(W, gamma, beta, mean, sigma, kept, lam, thr)
        assert np.allclose(T, ref, rtol=1e-12, atol=0) and np.all(t == 0), (T, ref)


def test_n1_mismatch_is_normalised_per_pruned_channel():
    """N1: B is min-max normalised over the candidates of *each* pruned
    channel.  Pruned channel 0 has mismatches (3, 3.2) to its candidates and
    is closer in cosine to the second (0.95 vs 0.80): normalised per channel
    B = (0, 1) and lam = 0.85 picks the first (0.17 < 0.1925); normalised with
    the smallest mismatch of the whole layer (0.1, pruned channel 3's) it
    would be (0.935, 1) and pick the second (mutmut survivor
    ``neuron_merging__mutmut_90``)."""
    W = _two_candidates(0.80, 0.95, np.random.default_rng(1))
    W = np.vstack([W, W[:1]])  # pruned 0 and 3, kept 1 and 2
    one, beta = np.ones(4), np.array([0.0, 3.0, 3.2, 3.1])
    kept = np.array([1, 2])
    T, _ = neuron_merging(W, one, beta, np.zeros(4), one, kept)
    assert np.allclose(T, _nm_reference(W, one, beta, np.zeros(4), one, kept, 0.85, 0.1), rtol=1e-12, atol=0)
    assert np.flatnonzero(T[0]).tolist() == [0] and np.flatnonzero(T[3]).tolist() == [1]


def test_n1_threshold_is_inclusive():
    """Cosine similarity exactly t = 0.1 merges (only below t does not):
    filters (1, 0, 0, 0) and (1, 3, 3, 9) / 10 have cosine 1/10 in floats."""
    W = np.array([[1.0, 0, 0, 0], [1.0, 3, 3, 9]])
    one = np.ones(2)
    T, _ = neuron_merging(W, one, np.zeros(2), np.zeros(2), one, np.array([1]))
    assert T[0, 0] == pytest.approx(0.1)


# ----------------------------------------------------------------- S1 selection rules

def test_s1_selection_rules():
    """select_kept: round(ratio N) lowest scores pruned, lower index first on
    ties; dead channels (|gamma| <= 1e-12) first and even beyond the ratio,
    but never at ratio 0; at most N - min_keep pruned (min_keep 1 by default)."""
    from udfc_ref.select import channel_scores, select_kept

    scores = np.array([5.0, 1.0, 3.0, 1.0, 4.0, 2.0, 6.0, 7.0])
    assert select_kept(scores, 0.25).tolist() == [0, 2, 4, 5, 6, 7]  # ties 1.0: index 1 then 3
    gamma = np.ones(8)
    gamma[[0, 6, 7]] = [0.0, 1e-13, -1e-12]
    assert select_kept(scores, 0.1, gamma=gamma).tolist() == [1, 2, 3, 4, 5]  # 3 dead > round(0.8) = 1
    assert select_kept(scores, 0.0, gamma=gamma).tolist() == list(range(8))
    assert select_kept(scores, 0.99).tolist() == [7]
    assert select_kept(scores, 0.99, min_keep=3).tolist() == [0, 6, 7]
    w = np.arange(-6.0, 6.0).reshape(2, 6)
    assert np.array_equal(channel_scores(w), np.abs(w).sum(1))  # l1 by default
    assert np.array_equal(channel_scores(w, "l1", np.array([2.0, -1.0]), np.array([4.0, 0.5])),
                          np.abs(w).sum(1) * [0.5, 2.0])


# ----------------------------------------------------------------- R2 where the shift goes

def test_r2_the_shift_goes_into_bias_running_mean_or_a_new_bias():
    """rewrite.shift_output keeps the framework's module layout: into the
    layer's bias when it has one; into the running mean of a BN that reads
    it alone (mu - delta); otherwise a new float32 tensor <layer>.bias (a
    free name), and absorb adds none when t = 0.  The output moves by delta
    in every case."""
    from udfc_ref.rewrite import absorb, shift_output

    m = vgg(0, channels=(2, 4, 4))
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 8)).astype(np.float32)
    delta = np.array([0.5, -1.0, 2.0, 0.25])
    ref = m.forward(x, return_values=True)
    # conv without bias feeding a BN alone: the BN's running mean
    a = m.copy()
    names = set(a.tensors)
    shift_output(a, a.node("c0"), delta, np.float32)
    assert set(a.tensors) == names and "bias" not in a.node("c0").params
    assert np.allclose(a.tensors["b0.running_mean"], m.tensors["b0.running_mean"] - delta)
    assert a.tensors["b0.running_mean"].dtype == np.float32
    assert np.allclose(a.forward(x, return_values=True)["b0"], ref["b0"] + (m.tensors["b0.weight"] * delta /
                       np.sqrt(m.tensors["b0.running_var"] + 1e-5))[None, :, None, None], atol=1e-5)
    # a layer with a bias: the bias
    fc = m.node("fc")
    b = m.copy()
    shift_output(b, b.node("fc"), np.arange(5.0), np.float32)
    assert np.allclose(b.tensors["fc.bias"], m.tensors["fc.bias"] + np.arange(5.0)) and set(b.tensors) == names
    assert b.tensors["fc.bias"].dtype == np.float32
    # no bias, no BN reading it alone: a new tensor named after the weight, never over an existing one
    c = m.copy()
    del c.tensors[fc.params["bias"]]
    del c.node("fc").params["bias"]
    c.tensors["fc.bias"] = np.zeros(1, np.float32)  # an unrelated tensor already holds the name
    shift_output(c, c.node("fc"), np.arange(5.0), np.float32)
    key = c.node("fc").params["bias"]
    assert key == "fc.bias_1" and c.tensors[key].dtype == np.float32 and c.tensors["fc.bias"].shape == (1,)
    assert np.allclose(c.forward(x), m.forward(x) - m.tensors["fc.bias"] + np.arange(5.0), atol=1e-5)
    # absorb with t = 0 adds no tensor
    d = m.copy()
    del d.tensors[fc.params["bias"]]
    del d.node("fc").params["bias"]
    names = set(d.tensors)
    absorb(d, d.node("c1"), np.eye(4), np.zeros(4), np.float32)
    assert set(d.tensors) == names and "bias" not in d.node("c1").params
    # no bias, read by something else than a lone BN, not the network output: a new tensor too
    from udfc_ref import Model, Node

    rng = np.random.default_rng(1)
    t = {"c.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
         "d.weight": rng.standard_normal((3, 4, 1, 1)).astype(np.float32)}
    e = Model(t, [Node("c", "conv2d", ["x"], "h", {"padding": 1}, {"weight": "c.weight"}),
                  Node("r", "relu", ["h"], "a"), Node("d", "conv2d", ["a"], "y", {}, {"weight": "d.weight"})],
              "x", (2, 8, 8))
    before = e.forward(x, return_values=True)["h"]
    shift_output(e, e.node("c"), delta, np.float32)
    assert e.node("c").params["bias"] == "c.bias" and np.array_equal(e.tensors["c.bias"], delta.astype(np.float32))
    assert np.allclose(e.forward(x, return_values=True)["h"], before + delta[None, :, None, None], atol=1e-5)


# ----------------------------------------------------------------- storage

def test_storage_bytes_and_bad_packed_arrays():
    """Bytes of a quantized tensor: ceil(n bits / 8) for the codes, the
    scales, ceil(#zero points * bits / 8); unpacking refuses a wrong size,
    shape or dtype."""
    from udfc_ref.quantize import pack_codes, unpack_codes

    w = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    for bits, sym in ((4, True), (3, False), (8, True), (16, False)):
        q = quantize(w, bits, symmetric=sym)
        zp = 0 if sym else int(np.ceil(3 * bits / 8))
        assert q.storage_bytes() == int(np.ceil(21 * bits / 8)) + 3 * 4 + zp
    packed = pack_codes(quantize(w, 4).codes, 4, True)
    for bad in (packed[:-1], packed.reshape(1, -1), packed.astype(np.int8)):
        with pytest.raises(ValueError):
            unpack_codes(bad, 4, True, (3, 7))


# ----------------------------------------------------------------- Q1-Q3 in detail

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_q2_scale_zero_point_and_dtypes(dtype):
    """Q2 per channel, written out: symmetric s = max|x| / (2^(b-1) - 1);
    asymmetric s = (max(x, 0) - min(x, 0)) / (2^b - 1), z = rint(-min(x, 0) / s)
    (channel maxima below 1 here); codes rint(x / s) + z with the stored
    scale; a zero range gives s = 1; codes int8 (uint8 for 8-bit asymmetric),
    int16 (uint16 asymmetric) and the weight's dtype kept through dequantize."""
    w = np.array([[0.3, -0.7, 0.05, 0.2], [0.01, 0.02, 0.04, 0.03], [0.0, 0.0, 0.0, 0.0]], dtype)
    x = w.astype(np.float64)
    for bits, sym in ((4, True), (4, False), (8, True), (8, False), (16, True), (16, False)):
        q = quantize(w, bits, symmetric=sym)
        qmax = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
        rng = np.abs(x).max(1) if sym else np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)
        exact = np.where(rng > 0, rng / qmax, 1.0)
        s = q.scale.astype(np.float64)
        # stored in the weight dtype: to nearest, or one step up where that is more than 2^-20 low
        step = np.abs(np.spacing(s.astype(dtype))).astype(np.float64)
        assert s[2] == 1.0 and np.all(s >= exact * (1 - 2.0**-20)) and np.all(np.abs(s - exact) <= step)
        z = np.zeros(3) if sym else np.rint(-np.minimum(x.min(1), 0) / s)
        assert sym == (q.zero_point is None) and (sym or np.array_equal(q.zero_point.astype(np.int64), z))
        assert np.array_equal(q.codes.astype(np.int64), np.rint(x / s[:, None]) + z[:, None])
        assert q.codes.dtype == {(True, 4): np.int8, (False, 4): np.int8, (True, 8): np.int8, (False, 8): np.uint8,
                                 (True, 16): np.int16, (False, 16): np.uint16}[(sym, bits)]
        assert sym or q.zero_point.dtype == q.codes.dtype
        assert q.dequantize().dtype == dtype and q.scale.dtype == dtype
    # the defaults: symmetric, per channel
    d = quantize(w, 4)
    assert d.symmetric and d.per_channel and d.scale.shape == (3,)


def test_q2_subnormal_and_underflowing_scales():
    """A float32 scale that rounds down by more than 2^-20 (subnormal) is
    rounded up instead, so the range fits the codes -- down to a scale that
    would underflow to 0, which becomes the smallest subnormal."""
    hits = 0
    for x in np.float32(1e-39) * np.arange(1, 40, dtype=np.float32):
        s64 = float(x) / 32767
        nearest = float(np.float32(s64))
        if nearest >= s64 * (1 - 2.0**-20):
            continue
        hits += 1
        q = quantize(np.array([[x, -x]], np.float32), 16)
        assert float(q.scale[0]) >= s64 and np.all(np.abs(q.codes.astype(np.int64)) <= 32767)
    assert hits > 0
    q = quantize(np.array([[1e-44, 0.0]], np.float32), 16, symmetric=False)
    assert float(q.scale[0]) >= 1e-44 / 65535 and float(q.scale[0]) > 0 and q.codes.max() <= 65535
    assert np.allclose(q.dequantize().astype(np.float64), [[1e-44, 0.0]], atol=float(q.scale[0]))


def _best_on_grid(row, bits, symmetric):
    """Q3 by brute force: the clip ratio r in {1, 63/64, ..., 1/64} minimising
    the squared error, the scale rounded to float32 as stored."""
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    best = None
    for r in np.linspace(1.0, 1.0 / 64, 64):
        lo, hi = min(row.min(), 0.0) * r, max(row.max(), 0.0) * r
        if symmetric:
            s = float(np.float32(max(-lo, hi) / qmax))
            z = 0.0
        else:
            s = float(np.float32((hi - lo) / (qmax - qmin)))
            z = float(np.clip(np.rint(qmin - lo / s), qmin, qmax))
        deq = (np.clip(np.rint(row / s) + z, qmin, qmax) - z) * s
        err = ((deq - row) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, s, z)
    return best


@pytest.mark.parametrize("symmetric", [True, False])
def test_q3_mse_clip_is_the_best_grid_ratio_per_channel(symmetric):
    """Q3: per channel, the ratio of the 64-point grid with the least
    squared error; outliers on both sides clip to the code range; a channel
    without outliers keeps r = 1."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 256)).astype(np.float32)
    w[0, 0], w[0, 1] = 9.0, -7.0  # outliers both sides
    w[1, 5] = -8.0
    q = quantize(w, 4, symmetric=symmetric, mse_clip=True)
    qmin, qmax = (-7, 7) if symmetric else (0, 15)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax
    deq = q.dequantize().astype(np.float64)
    for c in range(3):
        err, s, z = _best_on_grid(w[c].astype(np.float64), 4, symmetric)
        assert float(q.scale[c]) == pytest.approx(s, rel=1e-7)
        assert ((deq[c] - w[c]) ** 2).sum() == pytest.approx(err, rel=1e-6)
        if not symmetric:
            assert int(q.zero_point[c]) == z
    assert float(q.scale[2]) == pytest.approx(float(quantize(w[2:], 4, symmetric=symmetric).scale[0]), rel=0.2)


# ----------------------------------------------------------------- BN parameters (A1, S1, N2)

def test_bn_affine_is_torch_batch_norm_in_eval_mode():
    """(gamma, beta, mu, sigma) of a BN, sigma = sqrt(running_var + eps), give
    PyTorch's eval-mode batch norm gamma (x - mu) / sigma + beta (a large eps,
    so that sqrt(var - eps) or sqrt(var) would show); sigma enters S1's -bn
    criteria and N2's merge scale."""
    import torch
    from helpers import bn_params

    from udfc_ref import Model, Node
    from udfc_ref.datamodel import bn_affine

    rng = np.random.default_rng(3)
    t = {}
    node = Node("bn", "batch_norm", ["x"], "y", {"eps": 0.7}, bn_params(rng, 3, "bn", t))
    g, b, mu, sigma = bn_affine(Model(t, [node], "x", (3, 4, 4)), node)
    x = rng.standard_normal((2, 3, 4, 4))
    ref = torch.nn.functional.batch_norm(
        torch.from_numpy(x), *(torch.from_numpy(t[f"bn.{k}"].astype(np.float64))
                               for k in ("running_mean", "running_var", "weight", "bias")),
        training=False, eps=0.7).numpy()
    got = g[:, None, None] * (x - mu[:, None, None]) / sigma[:, None, None] + b[:, None, None]
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_q2_codes_come_from_the_stored_scale_also_after_the_q3_search():
    """Q2: the scale is rounded to float32 *before* the codes are computed,
    also for the scales the Q3 search tries, so q = rint(w / s) holds for the
    stored s.  The row is built (by a search) so that one weight lies between
    the rounding boundaries j + 1/2 of the float64 scale A / 7 and of its
    float32 rounding: the two scales give different codes for it."""
    for k in range(1, 5000):
        big = np.float32(1 + k * 1e-4)
        s64 = float(big) / 7
        s32 = float(np.float32(s64))
        for h in (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5):
            lo, hi = sorted((h * s64, h * s32))
            e = np.float32(lo)
            e = e if float(e) > lo else np.nextafter(e, np.float32(np.inf))
            if lo < float(e) < hi:
                break
        else:
            continue
        break
    assert np.rint(float(e) / s32) != np.rint(float(e) / s64)
    w = np.array([[big] * 20 + [-big] * 20 + [e]], np.float32)  # 40 big weights: clipping them costs most
    q = quantize(w, 4, mse_clip=True)
    assert float(q.scale[0]) == s32  # r = 1
    assert np.array_equal(q.codes[0].astype(np.float64), np.clip(np.rint(w[0].astype(np.float64) / s32), -7, 7))
