"""Sample-quality metrics (hcdiag.diffusion.quality): the energy distance against a naive double loop and scipy,
its bootstrap against explicitly resampled arrays, and the Gaussian-mixture log-density and mode coverage against
scipy and per-row loops."""

from __future__ import annotations

import math
import re
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from hcdiag.diffusion import quality as Q
from hcdiag.diffusion.quality import energy_distance, energy_test, gmm_loglik, mode_coverage, paired_difference
from hcdiag.errors import InputError


def naive_ed(a, b):
    """The V-statistic by a double Python loop over all pairs, the diagonal included."""
    def mean_dist(x, y):
        return sum(math.sqrt(sum((xi - yi) ** 2 for xi, yi in zip(u, v))) for u in x for v in y) / (len(x) * len(y))
    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def rng_for(seed, k):
    return np.random.default_rng([seed, k])


# ---------------------------------------------------------------- energy_distance


@pytest.mark.parametrize("n, m, d", [(2, 2, 1), (7, 13, 3), (25, 18, 5)])
def test_energy_distance_matches_a_naive_double_loop(seed, n, m, d):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(0.5, 2.0, size=(m, d))
    want = naive_ed(a.tolist(), b.tolist())
    assert energy_distance(a, b) == pytest.approx(want, rel=1e-10, abs=0)
    assert energy_distance(b, a) == pytest.approx(want, rel=1e-10, abs=0)


def test_energy_distance_in_1d_is_the_square_of_scipys(seed):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=40), rng.exponential(size=23)
    # scipy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|), all pairs (its docstring: sqrt(2) times the l2 distance of
    # the empirical CDFs); the relation itself, checked on the naive V-statistic:
    assert stats.energy_distance(u, v) ** 2 == pytest.approx(naive_ed(u[:, None].tolist(), v[:, None].tolist()),
                                                             rel=1e-10)
    assert energy_distance(u[:, None], v[:, None]) == pytest.approx(stats.energy_distance(u, v) ** 2, rel=1e-10)


def test_energy_distance_is_zero_for_identical_arrays_and_positive_otherwise(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(300, 6))
    assert abs(energy_distance(a, a.copy())) <= 1e-12 * energy_distance(a, a + 1.0)
    assert energy_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)  # row order does not matter
    assert energy_distance(a, a + 0.1) > 0


def test_energy_distance_sums_in_chunks_within_its_memory_budget(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(1500, 4)), rng.normal(size=(1200, 4))  # one full 1500 x 1500 block: 18 MB
    whole = energy_distance(a, b)
    monkeypatch.setattr(Q, "_CHUNK_BYTES", 2**20)
    tracemalloc.start()
    try:
        chunked = energy_distance(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chunked == pytest.approx(whole, rel=1e-12)
    assert peak < 2 * 2**20, peak  # one block of at most 1 MiB (measured: 1.05 MB), not 18 MB


@pytest.mark.parametrize("a, b, msg", [
    (np.zeros((5, 3)), np.zeros((4, 2)), r"energy_distance needs \(n, d\) arrays with the same d; got a \(5, 3\) "
                                         r"and b \(4, 2\)"),
    (np.zeros(5), np.zeros((4, 1)), r"a must be an \(n, d\) array .*reshape a 1-D sample to \(n, 1\)"),
    (np.zeros((1, 2)), np.zeros((4, 2)), "needs at least 2 rows in a; got 1"),
    (np.zeros((3, 2)), np.array([[0.0, np.nan], [1, 1], [np.inf, 0]]), "b holds non-finite values .* in 2 of 3 rows"),
    (np.zeros((3, 0)), np.zeros((3, 0)), r"a must be an \(n, d\) array"),
    ("abc", np.zeros((3, 1)), r"a must be a numeric \(n, d\) array"),
])
def test_energy_distance_rejects_bad_input_in_one_line(a, b, msg):
    with pytest.raises(InputError, match=msg) as info:
        energy_distance(a, b)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- bootstrap


def test_a_weighted_replicate_equals_the_energy_distance_of_the_explicit_resample(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(30, 3)), rng.normal(1.0, 1.0, size=(22, 3))
    Dxy, Dxx, Dyy = (Q.cdist(u, v) for u, v in ((x, y), (x, x), (y, y)))
    ix, iy = rng.integers(0, 30, (4, 30)), rng.integers(0, 22, (4, 22))
    wx = np.stack([np.bincount(i, minlength=30) for i in ix]).astype(float)
    wy = np.stack([np.bincount(i, minlength=22) for i in iy]).astype(float)
    got = Q._ed_boot(Dxy, Dxx, Dyy, wx, wy)
    want = [energy_distance(x[i], y[j]) for i, j in zip(ix, iy)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # _counts is the same bincount of the same draws
    draws = np.random.default_rng(7).integers(0, 30, (4, 30))
    np.testing.assert_array_equal(Q._counts(np.random.default_rng(7), 4, 30),
                                  [np.bincount(i, minlength=30) for i in draws])


def test_energy_test_is_the_percentile_bootstrap_of_explicit_resamples(seed):
    rng = np.random.default_rng(seed)
    S, H, T = rng.normal(0.3, 1.0, size=(12, 2)), rng.normal(size=(15, 2)), rng.normal(size=(12, 2))
    out = energy_test(S, H, T, n_boot=20, seed=seed)
    r = np.random.default_rng(seed)  # the documented draw order: samples, heldout, train per batch
    i, j, k = r.integers(0, 12, (20, 12)), r.integers(0, 15, (20, 15)), r.integers(0, 12, (20, 12))
    eds = np.array([energy_distance(S[a], H[b]) for a, b in zip(i, j)])
    floors = np.array([energy_distance(T[c], H[b]) for c, b in zip(k, j)])
    assert out["ed"] == pytest.approx(energy_distance(S, H), rel=1e-12)
    assert out["floor"] == pytest.approx(energy_distance(T, H), rel=1e-12)
    assert out["excess"] == pytest.approx(out["ed"] - out["floor"], rel=1e-12)
    for key, reps in (("ed_ci", eds), ("floor_ci", floors), ("excess_ci", eds - floors)):
        np.testing.assert_allclose(out[key], np.percentile(reps, [2.5, 97.5]), rtol=1e-9, atol=1e-12)
    assert all(type(v) in (float, int, list) for v in out.values())
    assert all(type(v) is float for key in ("ed_ci", "floor_ci", "excess_ci") for v in out[key])


def test_paired_difference_is_the_percentile_bootstrap_of_explicit_resamples(seed):
    rng = np.random.default_rng(seed)
    A, B, H = rng.normal(0.5, 1.0, size=(10, 3)), rng.normal(size=(10, 3)), rng.normal(size=(14, 3))
    out = paired_difference(A, B, H, n_boot=20, seed=seed)
    r = np.random.default_rng(seed)  # samples_a, samples_b, heldout
    i, k, j = r.integers(0, 10, (20, 10)), r.integers(0, 10, (20, 10)), r.integers(0, 14, (20, 14))
    diffs = [energy_distance(A[a], H[b]) - energy_distance(B[c], H[b]) for a, c, b in zip(i, k, j)]
    assert out["ed_a"] == pytest.approx(energy_distance(A, H), rel=1e-12)
    assert out["ed_b"] == pytest.approx(energy_distance(B, H), rel=1e-12)
    assert out["diff"] == pytest.approx(out["ed_a"] - out["ed_b"], rel=1e-12)
    np.testing.assert_allclose(out["diff_ci"], np.percentile(diffs, [2.5, 97.5]), rtol=1e-9, atol=1e-12)


def test_the_bootstrap_is_reproducible_from_its_seed(seed):
    rng = np.random.default_rng(seed)
    S, H, T = (rng.normal(size=(40, 2)) for _ in range(3))
    assert energy_test(S, H, T, seed=3) == energy_test(S, H, T, seed=3)
    assert energy_test(S, H, T, seed=3)["excess_ci"] != energy_test(S, H, T, seed=4)["excess_ci"]


@pytest.mark.parametrize("k", [0, 1])
def test_samples_of_the_data_law_score_the_noise_floor(seed, k):
    rng = rng_for(seed, k)
    S, H, T = (rng.normal(size=(200, 4)) for _ in range(3))
    out = energy_test(S, H, T, seed=seed)
    lo, hi = out["excess_ci"]
    assert lo <= out["excess"] <= hi
    # about 0: the bootstrap of this degenerate null is conservative (|excess| / half-width stayed below 1 over 400
    # seeds), so three half-widths never fail by chance
    assert abs(out["excess"]) < 3 * (hi - lo) / 2 + 1e-3, out
    pd = paired_difference(S, T, H, seed=seed)
    lo, hi = pd["diff_ci"]
    assert lo <= pd["diff"] <= hi
    assert abs(pd["diff"]) < 3 * (hi - lo) / 2 + 1e-3, pd


@pytest.mark.parametrize("k", [0, 1])
def test_shifted_samples_stand_far_above_the_floor(seed, k):
    rng = rng_for(seed, k)
    H, T = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    S = rng.normal(size=(200, 4)) + 1.0  # ED about 1.2; the floor about (1/200 + 1/200) E||X - X'|| = 0.026
    out = energy_test(S, H, T, seed=seed)
    assert out["ed_ci"][0] <= out["ed"] <= out["ed_ci"][1]
    assert out["floor_ci"][0] < out["floor_ci"][1]
    assert out["ed"] > 5 * out["floor"], out  # at least 16x over 150 seeds
    assert out["ed_ci"][0] > out["floor_ci"][1], out
    assert out["excess_ci"][0] > 0 and out["excess_ci"][0] <= out["excess"] <= out["excess_ci"][1], out
    pd = paired_difference(T, S, H, seed=seed)  # the faithful sample a beats the shifted sample b
    assert pd["diff_ci"][0] <= pd["diff"] <= pd["diff_ci"][1]
    assert pd["diff_ci"][1] < 0, pd


def test_energy_test_and_paired_difference_reject_bad_input():
    z = np.zeros((10, 2))
    with pytest.raises(InputError, match="needs train with as many rows as samples .* got 9 and 10: pass a random "
                                         "subsample of 10 training rows"):
        energy_test(z, z, z[:9])
    with pytest.raises(InputError, match=r"energy_test needs \(n, d\) arrays with the same d; got samples \(10, 2\) "
                                         r"and heldout \(10, 2\) and train \(10, 3\)"):
        energy_test(z, z, np.zeros((10, 3)))
    with pytest.raises(InputError, match="energy_test: heldout holds non-finite values"):
        energy_test(z, np.full((10, 2), np.nan), z)
    with pytest.raises(InputError, match="energy_test needs at least 2 rows in samples; got 1"):
        energy_test(z[:1], z, z[:1])
    for bad in (5, 2.5, True, None):
        msg = re.escape("n_boot must be an integer >= 20") + ".*" + re.escape(repr(bad))
        with pytest.raises(InputError, match=msg):
            energy_test(z, z, z, n_boot=bad)
    with pytest.raises(InputError, match="paired_difference needs samples_a and samples_b with the same number of "
                                         "rows .* got 10 and 8: subsample the larger one"):
        paired_difference(z, z[:8], z)
    with pytest.raises(InputError, match=r"paired_difference needs \(n, d\) arrays with the same d"):
        paired_difference(z, z, np.zeros((10, 1)))
    with pytest.raises(InputError, match="paired_difference: n_boot must be an integer >= 20"):
        paired_difference(z, z, z, n_boot=0)


# ---------------------------------------------------------------- Gaussian mixture


def mixture(rng, K=8, d=32, sep=3.0):
    """K means drawn N(0, sep^2 I): pairwise distances about sep sqrt(2 d) (24 at d = 32), far beyond a
    component's radius spread sqrt(d) (2.8 at spread 0.5)."""
    mu = sep * rng.normal(size=(K, d))
    gaps = np.linalg.norm(mu[:, None] - mu[None], axis=-1)[np.triu_indices(K, 1)]
    assert gaps.min() > 8.0, gaps.min()  # fails with probability far below 1e-12
    return mu


def draw(rng, mu, spread, n, comps=None):
    comps = np.arange(len(mu)) if comps is None else np.asarray(comps)
    k = comps[rng.integers(0, len(comps), n)]
    return mu[k] + spread * rng.normal(size=(n, mu.shape[1]))


@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 0.3], [0.0, 2.0, 6.0]])
def test_gmm_loglik_matches_scipy_summed_over_components(seed, weights):
    rng = np.random.default_rng(seed)
    mu, s = rng.normal(size=(3, 4)), 0.7
    x = np.concatenate([draw(rng, mu, s, 20), rng.normal(0, 3, size=(5, 4))])
    w = np.full(3, 1 / 3) if weights is None else np.asarray(weights) / np.sum(weights)
    want = [math.log(sum(w[k] * stats.multivariate_normal(mu[k], s * s * np.eye(4)).pdf(row) for k in range(3)))
            for row in x]
    np.testing.assert_allclose(gmm_loglik(x, mu, s, weights), want, rtol=1e-10)


def test_gmm_loglik_stays_exact_where_the_densities_underflow():
    mu = np.array([[0.0, 0.0], [1.0, 0.0]])
    x = np.array([[200.0, 0.0]])  # exp(-0.5 * 200^2) underflows to 0: log of a plain sum would be -inf
    want = np.logaddexp(*[stats.multivariate_normal(m, np.eye(2)).logpdf(x[0]) for m in mu]) - math.log(2)
    got = gmm_loglik(x, mu, 1.0)
    assert got.shape == (1,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, [want], rtol=1e-12)


@pytest.mark.parametrize("args, kw, msg", [
    ((np.zeros((3, 2)), np.zeros((0, 2)), 1.0), {}, r"needs means of shape \(K, d\) with K >= 1 and d = 2 .* got "
                                                    r"\(0, 2\)"),
    ((np.zeros((3, 2)), np.zeros((2, 3)), 1.0), {}, r"d = 2 \(the columns of x\); got \(2, 3\)"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), 0.0), {}, r"needs a finite spread > 0 .*; got 0.0"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), float("nan")), {}, "needs a finite spread > 0"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), "wide"), {}, "needs a finite spread > 0"),
    ((np.zeros((3, 2)), np.array([[0, np.inf], [0, 0]]), 1.0), {}, "means hold non-finite values"),
    ((np.full((3, 2), np.nan), np.zeros((2, 2)), 1.0), {}, "x holds non-finite values"),
    ((np.zeros((0, 2)), np.zeros((2, 2)), 1.0), {}, "needs at least 1 row in x; got 0"),
    ((np.zeros(3), np.zeros((2, 1)), 1.0), {}, r"x must be an \(n, d\) array"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), 1.0), {"weights": [1.0]}, r"needs weights of shape \(2,\)"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), 1.0), {"weights": [1.0, -0.5]}, "non-negative and not all zero"),
    ((np.zeros((3, 2)), np.zeros((2, 2)), 1.0), {"weights": [0.0, 0.0]}, "non-negative and not all zero"),
])
def test_gmm_loglik_rejects_bad_input(args, kw, msg):
    with pytest.raises(InputError, match="gmm_loglik.*" + msg):
        gmm_loglik(*args, **kw)


def naive_coverage(x, mu, s, radius):
    K, (n, d) = len(mu), x.shape
    counts, assigned = [0] * K, [0] * K
    for row in x:
        dists = [float(np.linalg.norm(row - m)) for m in mu]
        k = dists.index(min(dists))
        assigned[k] += 1
        if dists[k] <= s * (math.sqrt(d) + radius):
            counts[k] += 1
    kl = sum(c / n * math.log(K * c / n) for c in assigned if c)
    return counts, assigned, kl


@pytest.mark.parametrize("k", [0, 1])
def test_samples_of_the_mixture_cover_every_mode(seed, k):
    rng = rng_for(seed, k)
    mu = mixture(rng)
    x = draw(rng, mu, 0.5, 2000)
    out = mode_coverage(x, mu, 0.5)
    assert out["K"] == 8 and out["covered"] == 8, out
    assert out["high_quality"] > 0.95, out  # a true row fails with probability < 7e-5 (chi tail)
    assert out["kl_modes"] < 0.05, out  # multinomial noise: about (K - 1) / (2 n) = 0.002
    counts, assigned, kl = naive_coverage(x, mu, 0.5, 3.0)
    assert (out["counts"], out["assigned"]) == (counts, assigned)
    assert out["kl_modes"] == pytest.approx(kl, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("k", [0, 1])
def test_samples_of_three_modes_cover_three(seed, k):
    rng = rng_for(seed, k)
    mu = mixture(rng)
    comps = rng.choice(8, 3, replace=False)
    x = draw(rng, mu, 0.5, 2000, comps)
    out = mode_coverage(x, mu, 0.5)
    assert out["covered"] == 3, out
    assert sorted(np.nonzero(out["counts"])[0].tolist()) == sorted(comps.tolist())
    assert out["kl_modes"] == pytest.approx(math.log(8 / 3), abs=0.02), out
    counts, assigned, kl = naive_coverage(x, mu, 0.5, 3.0)
    assert (out["counts"], out["assigned"]) == (counts, assigned)
    assert out["kl_modes"] == pytest.approx(kl, rel=1e-12)


@pytest.mark.parametrize("k", [0, 1])
def test_pure_noise_is_low_quality(seed, k):
    rng = rng_for(seed, k)
    mu = mixture(rng)
    x = math.sqrt(10.0) * rng.normal(size=(500, 32))  # N(0, 10 I): about 21 from the nearest mean, the bar is 4.3
    out = mode_coverage(x, mu, 0.5)
    assert out["high_quality"] < 0.05 and out["covered"] == 0, out
    counts, assigned, _ = naive_coverage(x, mu, 0.5, 3.0)
    assert (out["counts"], out["assigned"]) == (counts, assigned)


def test_mode_coverage_radius_and_the_covered_threshold_are_as_documented():
    mu = np.array([[0.0, 0.0], [100.0, 0.0]])
    bar = 1.0 * (math.sqrt(2) + 3.0)
    x = np.array([[bar - 1e-9, 0.0], [bar + 1e-6, 0.0], [100.0, 0.0], [100.0, 1.0]])
    out = mode_coverage(x, mu, 1.0)
    assert out["counts"] == [1, 2] and out["assigned"] == [2, 2] and out["high_quality"] == 0.75
    assert out["covered"] == 2 and out["kl_modes"] == 0.0  # 1 >= 0.25 * 4 / 2
    x8 = np.zeros((8, 2))  # all rows at one mean: KL = log K; the other mode is not covered
    out = mode_coverage(x8, mu, 1.0, radius=0.0)
    assert out["counts"] == [8, 0] and out["covered"] == 1
    assert out["kl_modes"] == pytest.approx(math.log(2), rel=1e-15)
    assert mode_coverage(np.zeros((1, 2)), mu[:1], 1.0)["covered"] == 1  # K = 1, one row


@pytest.mark.parametrize("kw, msg", [
    ({"radius": -1.0}, r"mode_coverage needs a finite radius >= 0 .*; got -1.0"),
    ({"radius": float("inf")}, "mode_coverage needs a finite radius >= 0"),
    ({"spread": -2.0}, r"mode_coverage needs a finite spread > 0 .*; got -2.0"),
    ({"means": np.zeros((0, 2))}, r"mode_coverage needs means of shape \(K, d\) with K >= 1"),
    ({"x": np.zeros((4, 3))}, r"mode_coverage needs means of shape \(K, d\) with K >= 1 and d = 3"),
    ({"x": [[1.0, np.nan]]}, "mode_coverage: x holds non-finite values"),
])
def test_mode_coverage_rejects_bad_input(kw, msg):
    args = {"x": np.zeros((4, 2)), "means": np.zeros((2, 2)), "spread": 1.0} | kw
    radius = args.pop("radius", 3.0)
    with pytest.raises(InputError, match=msg) as info:
        mode_coverage(args["x"], args["means"], args["spread"], radius=radius)
    assert "\n" not in str(info.value)
