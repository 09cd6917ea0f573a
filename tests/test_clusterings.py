"""Stage-0 clusterings: batched torch EM against scikit-learn, responsibilities against scipy,
the diversity audit against naive oracles, and every user-visible error message."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import comb
from scipy.stats import multivariate_normal
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from hcdiag.clusterings import ClusteringSet, audit, check_r0, fit_clusterings
from hcdiag.errors import InputError


def gmm_data(rng, n=600, dim=4, k=3, spread=0.6, aniso=True):
    """Rows of a K-component GMM with well-separated means and (optionally) correlated components."""
    means = rng.normal(0.0, 3.0, size=(k, dim))
    labels = rng.integers(0, k, size=n)
    z = rng.standard_normal((n, dim)) * spread
    if aniso:
        mix = np.eye(dim) + 0.4 * rng.standard_normal((k, dim, dim))  # (K, N, N)
        z = np.einsum("ni,nij->nj", z, mix[labels])
    return (means[labels] + z).astype(np.float32)


def hand_set(centroids, covariance_type="diag"):
    """A ClusteringSet built by hand from centroids (R, K, N) with unit covariances."""
    c = np.asarray(centroids, dtype=np.float64)
    r, k, n = c.shape
    cov = np.ones((r, k, n)) if covariance_type == "diag" else np.broadcast_to(np.eye(n), (r, k, n, n)).copy()
    return ClusteringSet(centroids=c, weights=np.full((r, k), 1.0 / k), covariances=cov,
                         covariance_type=covariance_type, seeds=np.arange(r), loglik=np.zeros(r),
                         n_iter=np.ones(r), converged=np.ones(r, bool), backend="hand", init="hand")


# ------------------------------------------------------------------------------ torch EM vs sklearn


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_torch_em_loglik_within_one_percent_of_sklearn(seed, covariance, init):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=500, dim=4, k=3)
    kw = dict(covariance=covariance, init=init, seed=seed % 1000, max_iter=200)
    t = fit_clusterings(x, 4, 3, backend="torch", device="cpu", **kw)
    s = fit_clusterings(x, 4, 3, backend="sklearn", **kw)
    # the claim of the task: mean log-likelihood within 1% of scikit-learn's on the same data and seeds
    assert abs(t.loglik.mean() - s.loglik.mean()) <= 0.01 * abs(s.loglik.mean())
    # the reported loglik is the mean log-likelihood at the final parameters (float64 scipy oracle);
    # torch's quadratic-feature expansion of (x-m)^T P (x-m) loses ~eps * cond(Sigma) (1.5e-9 seen at cond 1e4)
    np.testing.assert_allclose(t.loglik, t.score(x), rtol=1e-7, atol=1e-9)
    # scikit-learn fits float32 data in float32 (means_, covariances_ float32), so its own score matches
    # the float64 oracle only to ~1e-7 * cond(Sigma): compare the well-conditioned runs
    cov = s.covariances
    cond = cov.max(-1) / cov.min(-1) if covariance == "diag" else np.linalg.cond(cov)  # (R, K)
    ok = cond.max(axis=1) < 1e3
    np.testing.assert_allclose(s.loglik[ok], s.score(x)[ok], rtol=1e-5, atol=1e-5)
    assert t.converged.all() and s.converged.all()
    assert t.centroids.shape == (4, 3, 4) and t.centroids.dtype == np.float32
    np.testing.assert_allclose(t.weights.sum(1), 1.0, atol=1e-12)


def test_torch_random_init_follows_sklearn_trajectory(seed):
    """Random init draws the same responsibilities as sklearn, so each run lands on the same optimum."""
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=400, dim=3, k=3).astype(np.float64)  # float64 so sklearn computes in float64 too
    kw = dict(covariance="full", init="random", seed=seed % 1000, max_iter=300, tol=1e-8)
    t = fit_clusterings(x, 2, 3, backend="torch", device="cpu", **kw)
    s = fit_clusterings(x, 2, 3, backend="sklearn", **kw)
    # tol 1e-8 drives both to the same fixed point
    np.testing.assert_allclose(t.loglik, s.loglik, rtol=1e-4)


def test_torch_float32_full_matches_float64(seed):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=500, dim=5, k=3)
    a = fit_clusterings(x, 2, 3, covariance="full", backend="torch", dtype="float64", device="cpu", seed=seed % 100)
    b = fit_clusterings(x, 2, 3, covariance="full", backend="torch", dtype="float32", device="cpu", seed=seed % 100)
    assert b.config["dtype"] == "float32" and a.config["dtype"] == "float64"
    np.testing.assert_allclose(b.loglik, a.loglik, rtol=1e-3)


def test_sklearn_backend_is_gaussian_mixture_with_seed_plus_r(seed):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=300, dim=3, k=2)
    s0 = seed % 1000
    cs = fit_clusterings(x, 2, 2, covariance="full", backend="sklearn", seed=s0)
    assert cs.seeds.tolist() == [s0, s0 + 1]
    gm = GaussianMixture(n_components=2, covariance_type="full", random_state=s0 + 1, tol=1e-3,
                         reg_covar=1e-6, max_iter=100).fit(x)
    np.testing.assert_allclose(cs.centroids[1], gm.means_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cs.covariances[1], gm.covariances_, rtol=1e-6, atol=1e-8)
    assert cs.loglik[1] == pytest.approx(gm.score(x), rel=1e-12)
    assert cs.n_iter[1] == gm.n_iter_


def test_torch_is_reproducible_and_reports_progress(seed):
    x = gmm_data(np.random.default_rng(seed), n=300, dim=3, k=2)
    lines = []
    a = fit_clusterings(x, 2, 2, backend="torch", device="cpu", seed=7, progress=lines.append)
    b = fit_clusterings(x, 2, 2, backend="torch", device="cpu", seed=7)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.seeds.tolist() == [7, 8] and any("EM iteration 1" in s for s in lines)


# --------------------------------------------------------------------------------- responsibilities


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_responsibilities_match_naive_scipy_loop(seed, covariance):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=400, dim=3, k=3)
    cs = fit_clusterings(x, 2, 3, covariance=covariance, backend="torch", device="cpu", seed=seed % 1000)
    xe = x[:50].astype(np.float64)
    resp = cs.responsibilities(xe)
    assert resp.shape == (2, 50, 3) and resp.dtype == np.float64
    np.testing.assert_allclose(resp.sum(2), 1.0, atol=1e-12)
    naive = np.zeros_like(resp)
    for r in range(2):
        for k in range(3):
            cov = cs.covariances[r, k]
            cov = np.diag(cov) if covariance == "diag" else cov
            naive[r, :, k] = cs.weights[r, k] * multivariate_normal(cs.centroids[r, k].astype(np.float64), cov).pdf(xe)
        naive[r] /= naive[r].sum(1, keepdims=True)
    np.testing.assert_allclose(resp, naive, rtol=1e-8, atol=1e-12)
    ll = np.log(sum(cs.weights[0, k] * multivariate_normal(cs.centroids[0, k].astype(np.float64),
                                                           np.diag(cs.covariances[0, k]) if covariance == "diag"
                                                           else cs.covariances[0, k]).pdf(xe) for k in range(3)))
    assert cs.score(xe)[0] == pytest.approx(ll.mean(), rel=1e-10)


def test_responsibilities_refuse_wrong_dimension_and_missing_covariances():
    cs = hand_set(np.zeros((2, 2, 3)))
    with pytest.raises(InputError, match="The data has 2 columns but the clusterings have dimension 3"):
        cs.responsibilities(np.zeros((4, 2)))
    bare = ClusteringSet.from_dict({**cs.to_dict(), "covariances": None})
    with pytest.raises(InputError, match="carry no covariances"):
        bare.responsibilities(np.zeros((4, 3)))


def test_to_dict_round_trip_and_shape_check():
    cs = hand_set(np.arange(12.0).reshape(2, 2, 3))
    back = ClusteringSet.from_dict(cs.to_dict(include_covariances=True))
    np.testing.assert_array_equal(back.centroids, cs.centroids)
    np.testing.assert_array_equal(back.covariances, cs.covariances)
    assert cs.to_dict()["r0"] == 2 and "covariances" not in cs.to_dict()
    with pytest.raises(InputError, match=r"weights must have shape \(2, 2\) to match centroids"):
        ClusteringSet(centroids=np.zeros((2, 2, 3)), weights=np.ones((2, 3)), covariances=None,
                      covariance_type="diag", seeds=[0, 1], loglik=[0, 0], n_iter=[1, 1],
                      converged=[True, True], backend="hand", init="hand")


# ------------------------------------------------------------------------------------ input errors


def test_check_r0_messages():
    assert check_r0(16) == 16 and check_r0(2) == 2 and check_r0(24, uneven=True) == 24
    with pytest.raises(InputError, match=r"24 is not a power of two; use 16 or 32, or pass uneven=True"):
        check_r0(24)
    with pytest.raises(InputError, match="3 is not a power of two; use 2 or 4"):
        check_r0(3)
    with pytest.raises(InputError, match=r"'r0' parameter must be >= 2: halving ends with a pair.*Got 1\."):
        check_r0(1)
    with pytest.raises(InputError, match=r"'r0' parameter must be >= 2.*Got 1\."):
        check_r0(1, uneven=True)
    with pytest.raises(InputError, match=r"'r0' parameter must be an integer >= 2 .*Got 16\.0\."):
        check_r0(16.0)


def test_fit_refuses_bad_input():
    x = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(InputError, match="K=10 components but the data has only 5 rows"):
        fit_clusterings(x, 2, 10)
    with pytest.raises(InputError, match=r"'k' parameter must be an integer >= 1.*Got 0\."):
        fit_clusterings(x, 2, 0)
    with pytest.raises(InputError, match="24 is not a power of two; use 16 or 32"):
        fit_clusterings(x, 24, 2)
    with pytest.raises(InputError, match="'r0' parameter must be >= 2"):
        fit_clusterings(x, 1, 2)
    with pytest.raises(InputError, match="'covariance' parameter must be one of diag, full. Got 'tied'"):
        fit_clusterings(x, 2, 2, covariance="tied")
    with pytest.raises(InputError, match="'backend' parameter must be one of sklearn, torch. Got 'jax'"):
        fit_clusterings(x, 2, 2, backend="jax")
    with pytest.raises(InputError, match="'init' parameter must be one of kmeans, random"):
        fit_clusterings(x, 2, 2, init="k-means++")
    with pytest.raises(InputError, match=r"'tol' parameter must be a float >= 0"):
        fit_clusterings(x, 2, 2, tol=-1.0)
    with pytest.raises(InputError, match=r"'reg_covar' parameter must be a float >= 0"):
        fit_clusterings(x, 2, 2, reg_covar=float("nan"))
    with pytest.raises(InputError, match=r"'max_iter' parameter must be an integer >= 1"):
        fit_clusterings(x, 2, 2, max_iter=0)
    with pytest.raises(InputError, match=r"'seed' parameter must be an integer in \[0, 2\*\*32 - r0\]"):
        fit_clusterings(x, 2, 2, seed=-1)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match=r"The data holds 1 row\(s\) with NaN or inf \(rows 3\)"):
        fit_clusterings(bad, 2, 2)


def test_uneven_r0_is_fitted():
    x = gmm_data(np.random.default_rng(1), n=200, dim=2, k=2)
    cs = fit_clusterings(x, 3, 2, backend="torch", device="cpu", uneven=True)
    assert cs.r == 3 and cs.seeds.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------- audit


def naive_ari(a, b):
    """Hubert-Arabie adjusted Rand index from the contingency table."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    n = len(a)
    sum_ij = comb(table, 2).sum()
    sa, sb = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = sa * sb / comb(n, 2)
    return (sum_ij - expected) / (0.5 * (sa + sb) - expected)


def test_audit_ari_and_hungarian_against_naive(seed):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=300, dim=3, k=4, spread=1.5)
    cs = fit_clusterings(x, 4, 4, backend="torch", init="random", device="cpu", seed=seed % 1000, max_iter=5)
    au = audit(cs, x)
    labels = cs.weighted_log_prob(x).argmax(2)
    mu = cs.centroids.astype(np.float64)
    for a, b in itertools.combinations(range(4), 2):
        assert au.ari[a, b] == pytest.approx(naive_ari(labels[a], labels[b]), abs=1e-12)
        assert au.ari[a, b] == pytest.approx(adjusted_rand_score(labels[a], labels[b]), abs=1e-12)
        d = np.linalg.norm(mu[a][:, None] - mu[b][None], axis=2)  # (K, K)
        costs = [d[np.arange(4), list(p)] for p in itertools.permutations(range(4))]
        best = min(costs, key=lambda c: c.sum())
        assert au.centroid_dist[a, b] == pytest.approx(best.mean(), rel=1e-12)
        assert au.matched_max_dist[a, b] == pytest.approx(best.max(), rel=1e-12)
        assert au.min_pair_centroid_dist[a, b] == pytest.approx(d.min(), rel=1e-12)
    np.testing.assert_array_equal(np.diag(au.ari), 1.0)
    np.testing.assert_array_equal(au.centroid_dist, au.centroid_dist.T)
    # the default tolerance is 1% of sqrt(total variance) of the data
    assert au.tol == pytest.approx(0.01 * math.sqrt(x.astype(np.float64).var(0).sum()), rel=1e-9)
    assert au.n_rows == 300


def test_audit_finds_duplicates_and_one_shared_centroid(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 10, size=(3, 2))  # K=3 centroids in 2-D
    other = base + np.array([[30.0, 0], [0, 30.0], [-30.0, -30.0]])
    shared = base + np.array([[40.0, 40.0], [-40.0, 40.0], [0.0, 0.0]])
    shared[2] = base[2] + 1e-4  # clustering 3 shares exactly one centroid with clustering 0 (and its duplicate 1)
    other2 = other + np.array([[0, 60.0], [60.0, 0], [70.0, 70.0]])
    c = np.stack([base, base[[2, 0, 1]] + 1e-5, other, shared, other2])  # clustering 1 = 0 permuted
    au = audit(hand_set(c), tol=1e-2)
    assert au.duplicate_groups == [[0, 1]]
    pairs = {(a, b) for a, _, b, _, _ in au.shared_centroids}
    assert pairs == {(0, 1), (0, 3), (1, 3)}
    assert sum(1 for a, _, b, _, _ in au.shared_centroids if (a, b) == (0, 1)) == 3
    hit = [s for s in au.shared_centroids if (s[0], s[2]) == (0, 3)]
    assert [(j, k) for _, j, _, k, _ in hit] == [(2, 2)] and hit[0][4] == pytest.approx(math.sqrt(2) * 1e-4, abs=1e-5)
    assert au.min_pair_centroid_dist[0, 3] == pytest.approx(math.sqrt(2) * 1e-4, abs=1e-5)
    assert au.ari is None and any("share a centroid" in w for w in au.warnings)
    assert not any("identical" in w for w in au.warnings)
    d = au.to_dict()
    assert d["duplicate_groups"] == [[0, 1]] and d["shared_centroids"][0]["a"] == 0


def test_audit_warns_when_all_clusterings_are_identical(seed):
    rng = np.random.default_rng(seed)
    x = gmm_data(rng, n=400, dim=3, k=3, spread=0.3, aniso=False)
    mu = rng.normal(0, 5, size=(3, 3))
    cs = hand_set(np.stack([mu[rng.permutation(3)] for _ in range(4)]))
    au = audit(cs, x)
    assert au.duplicate_groups == [[0, 1, 2, 3]]
    assert any("All 4 clusterings are (nearly) identical" in w and "reduces to standard training" in w
               for w in au.warnings)
    np.testing.assert_allclose(au.ari, 1.0)
    # nearly all: 3 of 4 identical
    c = np.stack([mu, mu, mu, mu + 20.0])
    au = audit(hand_set(c))
    assert au.duplicate_groups == [[0, 1, 2]]
    assert any("3 of 4 clusterings are (nearly) identical" in w for w in au.warnings)


def test_audit_no_identical_warning_for_diverse_set(seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 10, size=(4, 3, 2)) + 100.0 * np.arange(4)[:, None, None]
    au = audit(hand_set(c))
    assert au.duplicate_groups == [] and au.shared_centroids == [] and au.warnings == []
    with pytest.raises(InputError, match=r"'tol' parameter must be a distance >= 0 \(data units\). Got -1"):
        audit(hand_set(c), tol=-1.0)


def test_audit_without_covariances_uses_nearest_centroid(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, 2))
    mu = rng.normal(size=(2, 3, 2))
    cs = ClusteringSet.from_dict({**hand_set(mu).to_dict(), "covariances": None})
    lab = cs.hard_assignments(x)
    naive = np.linalg.norm(x[None, :, None] - mu[:, None].astype(np.float32).astype(np.float64), axis=3).argmin(2)
    np.testing.assert_array_equal(lab, naive)
    assert audit(cs, x).ari.shape == (2, 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 4), st.integers(1, 4))
def test_audit_distance_ordering_property(s, r, k):
    c = np.random.default_rng(s).normal(size=(r, k, 3))
    au = audit(hand_set(c))
    off = ~np.eye(r, dtype=bool)
    assert np.all(au.min_pair_centroid_dist[off] <= au.centroid_dist[off] + 1e-12)
    assert np.all(au.centroid_dist[off] <= au.matched_max_dist[off] + 1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_cuda_batched_em_matches_cpu(seed, covariance):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = gmm_data(np.random.default_rng(seed), n=2000, dim=6, k=4)
    kw = dict(covariance=covariance, backend="torch", init="random", seed=seed % 1000)  # identical initial resp
    cpu = fit_clusterings(x, 4, 4, device="cpu", **kw)
    gpu = fit_clusterings(x, 4, 4, device="cuda", **kw)
    assert gpu.config["device"].startswith("cuda")
    # same float64 arithmetic, different reduction order: equal up to rounding
    np.testing.assert_allclose(gpu.loglik, cpu.loglik, rtol=1e-6)
    np.testing.assert_allclose(gpu.loglik, gpu.score(x), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ the stage-0 cache


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_cache_returns_the_fit_it_would_make_and_keys_on_data_and_settings(seed, backend, tmp_path):
    from hcdiag.clusterings import fit_clusterings_cached

    x = gmm_data(np.random.default_rng(seed), n=300, dim=3)
    kw = dict(covariance="full", backend=backend, seed=seed, device="cpu")
    direct = fit_clusterings(x, 4, 3, **kw)
    first, hit1 = fit_clusterings_cached(tmp_path, x, 4, 3, **kw)
    again, hit2 = fit_clusterings_cached(tmp_path, x, 4, 3, **kw)
    assert (hit1, hit2) == (False, True)
    for cs in (first, again):
        for name in ("centroids", "weights", "covariances", "seeds", "loglik", "n_iter", "converged"):
            np.testing.assert_array_equal(getattr(cs, name), getattr(direct, name), err_msg=name)
        assert (cs.covariance_type, cs.backend, cs.init) == (direct.covariance_type, direct.backend, direct.init)
    assert len(list(tmp_path.glob("em-*.npz"))) == 1
    # another seed, another K, or one changed data value: another entry, never the cached one
    y = x.copy()
    y[0, 0] += 1.0
    for args, over in (((x, 4, 3), {"seed": seed + 1}), ((x, 4, 2), {}), ((y, 4, 3), {})):
        cs, hit = fit_clusterings_cached(tmp_path, *args, **{**kw, **over})
        assert not hit
        np.testing.assert_array_equal(cs.centroids, fit_clusterings(*args, **{**kw, **over}).centroids)
    assert len(list(tmp_path.glob("em-*.npz"))) == 4 and not list(tmp_path.glob(".*tmp*"))


def test_cache_refits_an_unreadable_entry(seed, tmp_path):
    from hcdiag.clusterings import fit_clusterings_cached

    x = gmm_data(np.random.default_rng(seed), n=200, dim=2)
    fit_clusterings_cached(tmp_path, x, 2, 2, seed=seed)
    (entry,) = tmp_path.glob("em-*.npz")
    entry.write_bytes(b"not a zip file")
    cs, hit = fit_clusterings_cached(tmp_path, x, 2, 2, seed=seed)
    assert not hit
    np.testing.assert_array_equal(cs.centroids, fit_clusterings(x, 2, 2, seed=seed).centroids)
    assert fit_clusterings_cached(tmp_path, x, 2, 2, seed=seed)[1]


def test_cache_folder_that_cannot_be_made(tmp_path):
    from hcdiag.clusterings import fit_clusterings_cached

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"^Cannot create the EM cache folder .*file/em: .*; choose a writable folder\.$"):
        fit_clusterings_cached(blocker / "em", np.zeros((4, 2), np.float32) + np.arange(4)[:, None], 2, 2)
