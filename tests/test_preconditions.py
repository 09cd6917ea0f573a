"""Preconditions before any training (``hcdiag.testing``): the phase transition (s2 against lambda_max) and
Theorem 4.4's exclusion (delta*(S) against eps), as functions and as pytest plugin options.

Oracles: numpy's ``eigvalsh`` for lambda_max, the closed form ``KL = 0.5 sum_{lambda_i > s2} log(lambda_i / s2)``,
a brute-force loop over centroid pairs for a pair's delta*, a naive loop for a constant's historical loss, and
in one dimension the exact delta*(S) of any S (the best constant lies at a midpoint of two centroids).
"""

pytest_plugins = ["pytester"]

import itertools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hcdiag.clusterings import fit_clusterings  # noqa: E402
from hcdiag.data import load  # noqa: E402
from hcdiag.errors import InputError  # noqa: E402
from hcdiag.spectrum import spectrum  # noqa: E402
from hcdiag.testing import (assert_exclusion_precondition, assert_phase_precondition,  # noqa: E402
                            exclusion_precondition, phase_precondition)

pytestmark = pytest.mark.usefixtures("one_thread")


def num(pattern: str, text: str) -> float:
    """The number captured by ``pattern`` in ``text`` (the messages print 4 significant digits)."""
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in: {text}"
    return float(m.group(1))


# ---------------------------------------------------------------------------------------------------
# oracles

def eigenvalues(x) -> np.ndarray:
    """The covariance spectrum (1/n), descending, by numpy's eigvalsh."""
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]


def closed_form(lam: np.ndarray, s2: float, latent_dim: int) -> tuple[float, int]:
    """The linear VAE's KL (nats) and active dimensions at s2: 0.5 log(lambda_i / s2) for each lambda_i > s2."""
    top = lam[:latent_dim]
    return 0.5 * sum(math.log(v / s2) for v in top if v > s2), int(sum(v > s2 for v in top))


def pair_brute(cents) -> tuple[float, tuple[int, int, int, int]]:
    """min over clusterings a < b and centroids k, j of ||mu_k^a - mu_j^b||^2 / 4, and where, by loops."""
    best = (math.inf, None)
    R, K, _ = cents.shape
    for a, b in itertools.combinations(range(R), 2):
        for k in range(K):
            for j in range(K):
                d2 = float(sum((cents[a, k, i] - cents[b, j, i]) ** 2 for i in range(cents.shape[2])))
                if d2 / 4 < best[0]:
                    best = (d2 / 4, (a, k, b, j))
    return best


def historical_loss(c, cents, S) -> float:
    """L_S(c) = max_{s in S} min_k ||c - mu_k^s||^2 of the constant reconstruction c, by loops."""
    worst = 0.0
    for s in S:
        nearest = min(sum((float(c[i]) - float(cents[s, k, i])) ** 2 for i in range(len(c)))
                      for k in range(cents.shape[1]))
        worst = max(worst, nearest)
    return worst


def delta_star_1d(cents, S) -> float:
    """Exact delta*(S) in one dimension: max_s dist(c, C_s) is piecewise linear with slopes +-1, so its minimum
    lies where a rising and a falling piece meet, at the midpoint of two centroids."""
    pts = cents[list(S), :, 0].ravel()
    return min(historical_loss([(p + q) / 2], cents, S) for p in pts for q in pts)


# ---------------------------------------------------------------------------------------------------
# the phase-transition precondition

@pytest.fixture
def x(seed):
    """2000 rows in 5 dims with one dominant direction: lambda_max ~ 9, the next ~ 2.25."""
    return np.random.default_rng(seed).normal(size=(2000, 5)) * [3.0, 1.5, 1.0, 1.0, 1.0]


def test_phase_holds_below_lambda_max_with_the_closed_form(x):
    lam = eigenvalues(x)
    res = assert_phase_precondition(x, multiple=0.5, latent_dim=3)
    kl, active = closed_form(lam, 0.5 * lam[0], 3)
    assert res.holds and res.outcome == "holds"
    assert res.lambda_max == pytest.approx(lam[0], rel=1e-10)
    assert res.s2 == pytest.approx(0.5 * lam[0], rel=1e-10) and res.multiple == pytest.approx(0.5)
    assert res.kl == pytest.approx(kl, rel=1e-9) and res.n_active == active == len(res.active_dims)
    assert res.s2_max == pytest.approx(0.9 * lam[0], rel=1e-10) and res.ci is None
    msg = res.message
    assert msg.startswith("phase-transition precondition holds: ")
    assert num(r"lambda_max = ([\d.e+-]+);", msg) == pytest.approx(lam[0], rel=1e-3)
    assert num(r"KL = ([\d.e+-]+) nats", msg) == pytest.approx(kl, rel=1e-3)
    assert f"with {active} of 3 latent dimensions active" in msg and "n = 2000 rows, N = 5" in msg


def test_phase_takes_s2_itself(x):
    lam = eigenvalues(x)
    s2 = 0.3 * lam[0]
    res = assert_phase_precondition(x, s2=s2, latent_dim=5)
    kl, active = closed_form(lam, s2, 5)
    assert res.s2 == s2 and res.multiple == pytest.approx(0.3, rel=1e-10)
    assert res.kl == pytest.approx(kl, rel=1e-9) and res.n_active == active


def test_phase_fails_above_lambda_max_with_its_numbers(x):
    lam = eigenvalues(x)
    with pytest.raises(AssertionError) as info:
        assert_phase_precondition(x, multiple=2.0, latent_dim=3)
    msg = str(info.value)
    assert msg.startswith("phase-transition precondition fails: the linear VAE would collapse: KL = 0 nats with 0 of 3 "
                          "latent dimensions active at s2 = ")
    assert num(r"at s2 = ([\d.e+-]+) =", msg) == pytest.approx(2 * lam[0], rel=1e-3)
    assert num(r"= ([\d.e+-]+) lambda_max \(", msg) == pytest.approx(2.0)
    assert num(r"\(lambda_max = ([\d.e+-]+);", msg) == pytest.approx(lam[0], rel=1e-3)
    assert num(r"choose s2 <= ([\d.e+-]+) \(multiple <= 0\.9, margin 0\.1\)", msg) == pytest.approx(0.9 * lam[0],
                                                                                                   rel=1e-3)
    assert "\n" not in msg  # one paragraph
    res = phase_precondition(x, multiple=2.0, latent_dim=3)  # the same verdict, without raising
    assert not res.holds and res.outcome == "collapses" and res.kl == 0.0 and res.n_active == 0
    assert res.message == msg


def test_phase_fails_within_the_margin(x):
    lam = eigenvalues(x)
    kl, active = closed_form(lam, 0.95 * lam[0], 3)
    with pytest.raises(AssertionError, match=r"is below lambda_max .* but not by the margin 0\.1: it must be <= "
                                             r"\(1 - margin\) lambda_max = ") as info:
        assert_phase_precondition(x, multiple=0.95, latent_dim=3)
    msg = str(info.value)
    assert num(r"lambda_max = ([\d.e+-]+);", msg) == pytest.approx(lam[0], rel=1e-3)
    assert num(r"KL = ([\d.e+-]+) nats", msg) == pytest.approx(kl, rel=1e-3)
    assert f"with {active} of 3 latent dimensions active" in msg
    assert assert_phase_precondition(x, multiple=0.95, latent_dim=3, margin=0.04).holds  # a smaller margin passes


def test_phase_fails_when_the_closed_form_kl_is_below_the_collapse_threshold(x):
    lam = eigenvalues(x)
    kl, _ = closed_form(lam, 0.995 * lam[0], 3)  # 0.5 log(1 / 0.995) = 0.0025 nats
    assert kl < 0.01
    with pytest.raises(AssertionError, match=r"below 0\.01, the paper's collapse threshold") as info:
        assert_phase_precondition(x, multiple=0.995, latent_dim=3, margin=0.001)
    msg = str(info.value)
    assert num(r"KL = ([\d.e+-]+) nats", msg) == pytest.approx(kl, rel=1e-3)
    assert num(r"exp\(-2 \* 0\.01\) = ([\d.e+-]+) always", msg) == pytest.approx(lam[0] * math.exp(-0.02), rel=1e-3)


def test_phase_at_lambda_max_with_no_margin_collapses(x):
    res = phase_precondition(x, multiple=1.0, latent_dim=3, margin=0.0)
    assert res.outcome == "collapses" and res.kl == 0.0 and "since s2 >= lambda_max" in res.message


def test_phase_reports_the_bootstrap_ci(x, seed):
    spec = spectrum(x, top=3, bootstrap=50, seed=seed % 1000)
    res = assert_phase_precondition(x, multiple=0.5, latent_dim=3, bootstrap=50, seed=seed % 1000)
    assert res.ci == spec.ci and res.bootstrap == 50 and res.ci[0] > res.s2
    assert num(r"95% CI \[([\d.e+-]+), ", res.message) == pytest.approx(spec.ci[0], rel=1e-3)
    assert num(r"95% CI \[[\d.e+-]+, ([\d.e+-]+)\]", res.message) == pytest.approx(spec.ci[1], rel=1e-3)
    assert "from 50 bootstrap resamples" in res.message


def test_phase_inside_the_ci_is_undecidable(seed):
    small = np.random.default_rng(seed).normal(size=(40, 4)) * [3.0, 1.0, 1.0, 1.0]  # a wide CI
    spec = spectrum(small, top=2, bootstrap=100, seed=1)
    assert spec.ci[0] < spec.ci[1]
    s2 = 0.5 * (spec.ci[0] + spec.ci[1])
    with pytest.raises(AssertionError) as info:
        assert_phase_precondition(small, s2=s2, latent_dim=2, bootstrap=100, seed=1, margin=0.0)
    msg = str(info.value)
    assert msg.startswith("phase-transition precondition undecidable at this sample size: s2 = ")
    assert "lies inside the bootstrap CI of lambda_max" in msg and "or use more rows" in msg
    assert num(r"CI \[([\d.e+-]+),", msg) == pytest.approx(spec.ci[0], rel=1e-3)
    assert num(r"choose s2 < ([\d.e+-]+) \(below the CI", msg) == pytest.approx(min(spec.ci[0], spec.lambda_max),
                                                                                rel=1e-3)
    assert phase_precondition(small, s2=s2, latent_dim=2, bootstrap=100, seed=1).outcome == "undecidable"


def test_phase_loads_a_dataset_by_name_and_takes_a_spectrum():
    data = load("synthetic", n_samples=3000).x
    lam = eigenvalues(data)
    res = assert_phase_precondition("synthetic", multiple=0.25, latent_dim=8, load_options={"n_samples": 3000})
    kl, active = closed_form(lam, 0.25 * lam[0], 8)
    assert res.data == "synthetic" and res.N == 32 and res.n == 3000
    assert res.lambda_max == pytest.approx(lam[0], rel=1e-9) and res.kl == pytest.approx(kl, rel=1e-8)
    assert res.n_active == active and "; synthetic, n = 3000 rows, N = 32)" in res.message
    same = assert_phase_precondition(spectrum(data, top=8), multiple=0.25, latent_dim=8)
    assert (same.kl, same.n_active, same.lambda_max) == (res.kl, res.n_active, res.lambda_max)


@pytest.mark.parametrize("kw, match", [
    ({"s2": 1.0, "multiple": 0.5}, r"^Pass exactly one of the 's2' parameter \(a decoder variance\) and the "
                                   r"'multiple' parameter \(s2 = multiple \* lambda_max\)\. "
                                   r"Got s2=1\.0, multiple=0\.5\."),
    ({}, r"^Pass exactly one of the 's2' parameter .* Got s2=None, multiple=None\."),
    ({"s2": -1.0}, r"^The 's2' parameter must be a finite float > 0\. Got -1\.0\.$"),
    ({"multiple": float("nan")}, r"^The 'multiple' parameter must be a finite float > 0\. Got nan\.$"),
    ({"multiple": 0.5, "margin": 1.0}, r"^The 'margin' parameter must be a finite float in \[0, 1\)\. Got 1\.0\.$"),
    ({"multiple": 0.5, "latent_dim": 0}, r"^The 'latent_dim' parameter must be an integer >= 1\. Got 0\.$"),
    ({"multiple": 0.5, "bootstrap": 1}, r"^The 'bootstrap' parameter must be 0 \(no CI\) or at least 2 resamples"),
    ({"multiple": 0.5, "load_options": {"n_samples": 10}}, r"^The 'load_options' parameter applies only to a dataset "
                                                           r"name or path"),
])
def test_phase_bad_arguments(x, kw, match):
    kw = {"latent_dim": 3, **kw}
    with pytest.raises(InputError, match=match):
        phase_precondition(x, **kw)


def test_phase_bad_data():
    with pytest.raises(InputError, match=r"^Unknown dataset 'no-such-data': use one of synthetic"):
        assert_phase_precondition("no-such-data", multiple=0.5, latent_dim=2)
    with pytest.raises(InputError, match=r"^lambda_max of the array is 0 \(constant rows\), so s2 cannot be compared"):
        assert_phase_precondition(np.ones((10, 3)), multiple=0.5, latent_dim=2)
    with pytest.raises(InputError, match=r"^The 'bootstrap' parameter must be 0 when a Spectrum is given"):
        assert_phase_precondition(spectrum(np.eye(4), top=2), multiple=0.5, latent_dim=2, bootstrap=10)
    with pytest.raises(InputError, match=r"^The spectrum holds the top 1 eigenvalue\(s\) but latent_dim=3 needs 3"):
        assert_phase_precondition(spectrum(np.eye(4), top=1), multiple=0.5, latent_dim=3)


# ---------------------------------------------------------------------------------------------------
# Theorem 4.4's precondition

def far_centroids(seed, R=4, K=3, N=5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(R, K, N)) * 10.0


def shared_brute(cents, tol) -> set:
    R, K, _ = cents.shape
    return {(a, k, b, j) for a, b in itertools.combinations(range(R), 2) for k in range(K) for j in range(K)
            if np.sqrt(((cents[a, k] - cents[b, j]) ** 2).sum()) <= tol}


def test_exclusion_holds_for_every_pair_of_distant_clusterings(seed):
    cents = far_centroids(seed)
    value, (a, k, b, j) = pair_brute(cents)
    res = assert_exclusion_precondition(cents, eps=1e-4)
    assert res.holds and res.every_pair and res.exact and res.subset == (a, b)
    assert res.delta_star == pytest.approx(value, rel=1e-12) and res.threshold == pytest.approx(1.05e-4)
    assert res.closest_pair == (a, k, b, j) and res.closest_distance == pytest.approx(2 * math.sqrt(value), rel=1e-12)
    assert historical_loss(res.c, cents, (a, b)) == pytest.approx(res.delta_star, rel=1e-12)
    for p, q in itertools.combinations(range(4), 2):  # every pair's delta*, against the loops
        assert res.pairwise[p, q] == pytest.approx(pair_brute(cents[[p, q]])[0], rel=1e-12)
    msg = res.message
    assert msg.startswith("Theorem 4.4's precondition holds: delta*(S) = ")
    assert num(r"delta\*\(S\) = ([\d.e+-]+),", msg) == pytest.approx(value, rel=1e-3)
    assert f"S = clusterings {{{a}, {b}}}, the pair of smallest delta* among all 6 pairs of the 4 clusterings" in msg
    assert "no model reaches eps" in msg  # a pair's delta* bounds every model (claims.md T2)


def test_exclusion_fails_on_the_closest_centroid_pair_with_its_numbers(seed):
    rng = np.random.default_rng(seed)
    cents = far_centroids(seed)
    a, b = sorted(rng.choice(4, size=2, replace=False))
    k, j = rng.integers(3, size=2)
    cents[b, j] = cents[a, k] + 1e-3 * rng.normal(size=5)  # nearly a shared centroid
    value, (a0, k0, b0, j0) = pair_brute(cents)
    with pytest.raises(AssertionError) as info:
        assert_exclusion_precondition(cents, eps=1e-4)
    msg = str(info.value)
    assert msg.startswith("Theorem 4.4's precondition fails: a collapsed (constant-output) model fits inside F_T = "
                          "{L_S <= eps}: delta*(S) = ")
    assert num(r"delta\*\(S\) = ([\d.e+-]+),", msg) == pytest.approx(value, rel=1e-3)
    assert num(r"eps \(1 \+ tau\) = ([\d.e+-]+) \(eps 0\.0001, tau 0\.05\)", msg) == pytest.approx(1.05e-4)
    d = num(rf"with d = ([\d.e+-]+) the distance of the closest centroids, centroid {k0} of clustering {a0} and "
            rf"centroid {j0} of clustering {b0}\)", msg)
    assert d == pytest.approx(2 * math.sqrt(value), rel=1e-3)
    res = exclusion_precondition(cents, eps=1e-4)
    assert res.outcome == "fails" and res.message == msg and res.subset == (a0, b0)
    c = np.array([num(r"the constant c = \[([\d.e+-]+),", msg)])
    assert c[0] == pytest.approx(res.c[0], rel=1e-3, abs=1e-3)
    assert np.allclose(res.c, (cents[a0, k0] + cents[b0, j0]) / 2, rtol=0, atol=1e-12)  # their midpoint
    assert historical_loss(res.c, cents, (a0, b0)) == pytest.approx(res.delta_star, rel=1e-9)
    assert num(r"has historical loss L_S\(c\) = ([\d.e+-]+);", msg) == pytest.approx(value, rel=1e-3)
    assert {(p.a, p.k, p.b, p.j) for p in res.shared} == shared_brute(cents, res.shared_tol)
    assert f"{a0}:{k0}~{b0}:{j0} (" in msg
    assert num(r"Choose eps < delta\* / \(1 \+ tau\) = ([\d.e+-]+),", msg) == pytest.approx(value / 1.05, rel=1e-3)


def test_exclusion_of_a_given_pair_sharing_a_centroid_is_zero(seed):
    cents = far_centroids(seed)
    cents[3, 2] = cents[0, 1]  # a shared centroid: the constant on it has zero historical loss
    res = exclusion_precondition(cents, eps=1e-4, subset=(0, 3))
    assert res.outcome == "fails" and res.delta_star == 0.0 and res.closest_pair == (0, 1, 3, 2)
    assert not res.every_pair and res.pairwise is None and "S = clusterings {0, 3} of 4" in res.message
    assert (0, 1, 3, 2, 0.0) in [tuple(p) for p in res.shared] and "0:1~3:2 (0)" in res.message
    assert res.message.endswith("No eps > 0 excludes it: choose clusterings of S that share no centroid.")
    far = exclusion_precondition(cents, eps=1e-4, subset=[1, 2])  # another pair of the same set holds
    assert far.holds and far.delta_star == pytest.approx(pair_brute(cents[[1, 2]])[0], rel=1e-12)


def test_exclusion_of_a_larger_set_is_exact_in_one_dimension(seed):
    cents = np.random.default_rng(seed).normal(size=(5, 3, 1)) * 5.0
    S = (0, 2, 4)
    exact = delta_star_1d(cents, S)
    res = assert_exclusion_precondition(cents, eps=0.5 * exact / 1.05, subset=S)
    assert res.exact and res.delta_star == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert historical_loss(res.c, cents, S) == pytest.approx(res.delta_star, rel=1e-9, abs=1e-12)
    assert "exact (" in res.message and "a bound" not in res.message
    with pytest.raises(AssertionError, match=r"the centre of the smallest ball enclosing centroids \[\d, \d, \d\] of "
                                             r"clusterings \[0, 2, 4\]") as info:
        assert_exclusion_precondition(cents, eps=2.0 * exact, subset=S)
    assert num(r"delta\*\(S\) = ([\d.e+-]+),", str(info.value)) == pytest.approx(exact, rel=1e-3)


def test_exclusion_says_when_delta_star_is_a_bound(seed):
    # an acute triangle, one centroid per clustering, rotated and moved by the seed: delta* = its circumradius^2
    # 4 + 25/36; the search's lower bound (uniform weights) is 42/9, and with no enumeration and no branch and
    # bound the bracket stays open
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    cents = (np.array([[0.0, 0.0], [4.0, 0.0], [2.0, 3.0]]) @ rot.T + rng.normal(size=2))[:, None, :]
    kw = {"subset": [0, 1, 2], "max_enumeration": 0, "max_balls": 0, "tolerance": 0.0}
    held = assert_exclusion_precondition(cents, eps=4.5, **kw)
    assert not held.exact and held.lower == pytest.approx(42 / 9) and held.upper == pytest.approx(4 + 25 / 36)
    assert "a bound: delta* lies in [4.667, 4.694]" in held.message and "(its lower bound 4.667)" in held.message
    open_ = exclusion_precondition(cents, eps=4.68, **kw)
    assert open_.outcome == "undecided" and "Theorem 4.4's precondition undecided: " in open_.message
    with pytest.raises(AssertionError, match=r"precondition undecided: .*a bound: delta\* lies in \[4\.667, 4\.694\]"):
        assert_exclusion_precondition(cents, eps=4.68, **kw)
    with pytest.raises(AssertionError, match=r"precondition fails: .*a bound: delta\* lies in \[4\.667, 4\.694\]"):
        assert_exclusion_precondition(cents, eps=4.8, **kw)
    closed = assert_exclusion_precondition(cents, eps=4.5, subset=[0, 1, 2], tolerance=0.0)  # enumeration: exact
    assert closed.exact and closed.delta_star == pytest.approx(4 + 25 / 36)


def test_exclusion_fits_the_clusterings_or_reads_them(seed, tmp_path):
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.normal(-5, 1, (150, 3)), rng.normal(5, 1, (150, 3))])
    cs = fit_clusterings(data, 2, 2, seed=3)  # both runs find the two blobs: shared centroids
    value, _ = pair_brute(cs.centroids.astype(np.float64))
    fitted = exclusion_precondition(data=data, r0=2, k=2, seed=3, eps=1e-2)
    assert fitted.outcome == "fails" and fitted.delta_star == pytest.approx(value, rel=1e-9, abs=1e-15)
    assert len(fitted.shared) == 2  # each blob's centroid, once per run
    assert exclusion_precondition(cs, eps=1e-2).delta_star == fitted.delta_star
    np.savez(tmp_path / "c.npz", centroids=cs.centroids)
    np.save(tmp_path / "c.npy", cs.centroids)
    for path in (tmp_path / "c.npz", tmp_path / "c.npy"):
        assert exclusion_precondition(str(path), eps=1e-2).delta_star == fitted.delta_star


@pytest.mark.parametrize("kw, match", [
    ({"eps": 0.0}, r"^The 'eps' parameter must be a finite float > 0\. Got 0\.0\.$"),
    ({"eps": 1e-4, "tolerance": -0.1}, r"^The 'tolerance' parameter must be a finite float >= 0\. Got -0\.1\.$"),
    ({"eps": 1e-4, "subset": [0, 0]}, r"^The 'subset' parameter must hold at least 2 distinct clustering indices in "
                                      r"\[0, 3\] \(S, e\.g\. the final pair\), or be None for every pair\. "
                                      r"Got \[0, 0\]\."),
    ({"eps": 1e-4, "subset": [1, 4]}, r"^The 'subset' parameter must hold at least 2 distinct .* Got \[1, 4\]\."),
    ({"eps": 1e-4, "subset": 2}, r"^The 'subset' parameter must hold at least 2 distinct .* Got 2\."),
    ({"eps": 1e-4, "data": np.zeros((4, 5))}, r"^Pass either the 'clusterings' argument .* got both\.$"),
    ({"eps": 1e-4, "r0": 4}, r"^The 'r0', 'k' and 'fit_options' parameters apply only when clusterings are fitted"),
    ({"eps": 1e-4, "shared_tol": float("inf")}, r"^The 'shared_tol' parameter must be a finite float >= 0\."),
])
def test_exclusion_bad_arguments(seed, kw, match):
    with pytest.raises(InputError, match=match):
        exclusion_precondition(far_centroids(seed), **kw)


def test_exclusion_bad_clusterings(tmp_path):
    with pytest.raises(InputError, match=r"^Pass either the 'clusterings' argument .* got neither\.$"):
        exclusion_precondition(eps=1e-4)
    with pytest.raises(InputError, match=r"^The 'r0' and 'k' parameters are required to fit clusterings to 'data'"):
        exclusion_precondition(data=np.zeros((10, 2)), k=2, eps=1e-4)
    with pytest.raises(InputError, match=r"^The 'clusterings' argument holds R = 1 clustering; delta\* needs at least "
                                         r"2"):
        exclusion_precondition(np.zeros((1, 3, 2)), eps=1e-4)
    with pytest.raises(InputError, match=r"^The 'clusterings' argument must be a 3-D array of shape \(R, K, N\); got "
                                         r"shape \(3, 2\)\."):
        exclusion_precondition(np.zeros((3, 2)), eps=1e-4)
    with pytest.raises(InputError, match=r"^The 'clusterings' argument holds 1 non-finite value\(s\); the "
                                         r"clusterings must have finite centroids\.$"):
        exclusion_precondition(np.array([[[0.0, np.nan]], [[1.0, 1.0]]]), eps=1e-4)
    missing = tmp_path / "none.npz"
    with pytest.raises(InputError, match=rf"^{re.escape(str(missing))}: no such file; pass a \.npz holding "
                                         r"'centroids'"):
        exclusion_precondition(str(missing), eps=1e-4)
    np.savez(tmp_path / "other.npz", means=np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match=r"^\S*other\.npz: holds no array 'centroids' \(it has means\); pass a \.npz"):
        exclusion_precondition(str(tmp_path / "other.npz"), eps=1e-4)
    (tmp_path / "bad.npz").write_bytes(b"PK not a zip file")
    with pytest.raises(InputError, match=r"^\S*bad\.npz: unreadable \(.*\); pass a \.npz holding 'centroids'"):
        exclusion_precondition(str(tmp_path / "bad.npz"), eps=1e-4)
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(InputError, match=r"^\S*c\.txt: not a \.npz or \.npy file"):
        exclusion_precondition(str(tmp_path / "c.txt"), eps=1e-4)


# ---------------------------------------------------------------------------------------------------
# the pytest plugin options

def test_plugin_phase_items_pass_and_fail_with_the_numbers(pytester, x, tmp_path):
    lam = eigenvalues(x)
    np.save(tmp_path / "x.npy", x)
    result = pytester.runpytest("--hcdiag-data", str(tmp_path / "x.npy"), "--hcdiag-s2-multiple", "0.5",
                                "--hcdiag-s2-multiple", "2", "--hcdiag-latent-dim", "3", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines([r".*hcdiag-phase\[.*x\.npy\]::multiple=0\.5 PASSED.*",
                                  r".*hcdiag-phase\[.*x\.npy\]::multiple=2 FAILED.*"])
    out = result.stdout.str()
    assert "the linear VAE would collapse: KL = 0 nats with 0 of 3 latent dimensions active" in out
    assert num(r"\(lambda_max = ([\d.e+-]+);", out) == pytest.approx(lam[0], rel=1e-3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_plugin_exclusion_items_pass_and_fail_with_the_numbers(pytester, seed, tmp_path):
    far = far_centroids(seed)
    near = far.copy()
    near[2, 0] = near[1, 1] + 1e-3
    np.savez(tmp_path / "far.npz", centroids=far)
    np.savez(tmp_path / "near.npz", centroids=near)
    result = pytester.runpytest("--hcdiag-clusterings", str(tmp_path / "far.npz"), "--hcdiag-clusterings",
                                str(tmp_path / "near.npz"), "--hcdiag-eps", "1e-4", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines([r".*hcdiag-exclusion\[.*far\.npz\]::every-pair PASSED.*",
                                  r".*hcdiag-exclusion\[.*near\.npz\]::every-pair FAILED.*"])
    out = result.stdout.str()
    assert "Theorem 4.4's precondition fails: a collapsed (constant-output) model fits inside F_T" in out
    assert num(r"delta\*\(S\) = ([\d.e+-]+),", out) == pytest.approx(pair_brute(near)[0], rel=1e-3)
    subset = pytester.runpytest("--hcdiag-clusterings", str(tmp_path / "near.npz"), "--hcdiag-eps", "1e-4",
                                "--hcdiag-subset", "0,3", "-v", "-p", "no:cacheprovider")
    subset.assert_outcomes(passed=1)
    subset.stdout.re_match_lines([r".*::S=0,3 PASSED.*"])


def test_plugin_fits_clusterings_to_the_data(pytester, seed, tmp_path):
    rng = np.random.default_rng(seed)
    np.save(tmp_path / "blobs.npy", np.concatenate([rng.normal(-5, 1, (150, 3)), rng.normal(5, 1, (150, 3))]))
    result = pytester.runpytest("--hcdiag-data", str(tmp_path / "blobs.npy"), "--hcdiag-eps", "1e-2", "--hcdiag-r0",
                                "2", "--hcdiag-k", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # the two runs find the same blobs: shared centroids, delta* ~ 0
    result.stdout.re_match_lines([r".*hcdiag-exclusion\[.*blobs\.npy, R0=2, K=2\]::every-pair FAILED.*"])
    assert "2 shared centroid pair(s)" in result.stdout.str()


@pytest.mark.parametrize("args, line", [
    (["--hcdiag-s2-multiple", "0.5"], "hcdiag: --hcdiag-s2 and --hcdiag-s2-multiple need --hcdiag-data DATA."),
    (["--hcdiag-data", "synthetic"], "hcdiag: --hcdiag-data needs --hcdiag-s2 or --hcdiag-s2-multiple "
                                     "(phase-transition precondition) or --hcdiag-eps (Theorem 4.4 precondition)."),
    (["--hcdiag-eps", "1e-4"], "hcdiag: --hcdiag-eps needs --hcdiag-clusterings FILE, or --hcdiag-data DATA to fit "
                               "clusterings (--hcdiag-r0, --hcdiag-k)."),
    (["--hcdiag-clusterings", "c.npz"], "hcdiag: --hcdiag-clusterings needs --hcdiag-eps EPS (the refinement "
                                        "threshold)."),
    (["--hcdiag-data", "synthetic", "--hcdiag-s2-multiple", "half"], "hcdiag: --hcdiag-s2-multiple must be a number. "
                                                                     "Got 'half'."),
    (["--hcdiag-data", "synthetic", "--hcdiag-s2", "-1"], "hcdiag: The --hcdiag-s2 option must be a finite float > 0. "
                                                          "Got -1.0."),
    (["--hcdiag-data", "synthetic", "--hcdiag-s2-multiple", "0.5", "--hcdiag-margin", "2"],
     "hcdiag: The --hcdiag-margin option must be a finite float in [0, 1). Got 2.0."),
    (["--hcdiag-data", "synthetic", "--hcdiag-s2-multiple", "0.5", "--hcdiag-latent-dim", "2.5"],
     "hcdiag: --hcdiag-latent-dim must be an integer. Got '2.5'."),
    (["--hcdiag-data", "no-such-data", "--hcdiag-s2-multiple", "0.5"], "hcdiag: Unknown dataset 'no-such-data'"),
    (["--hcdiag-clusterings", "c.npz", "--hcdiag-eps", "0"], "hcdiag: The --hcdiag-eps option must be a finite float "
                                                             "> 0. Got 0.0."),
    (["--hcdiag-clusterings", "c.npz", "--hcdiag-eps", "1e-4", "--hcdiag-subset", "0,9"],
     "hcdiag: The --hcdiag-subset option must hold at least 2 distinct clustering indices in [0, 3]"),
    (["--hcdiag-clusterings", "missing.npz", "--hcdiag-eps", "1e-4"], "hcdiag: missing.npz: no such file"),
])
def test_plugin_bad_options_are_one_line(pytester, seed, args, line):
    np.savez(pytester.path / "c.npz", centroids=far_centroids(seed))
    result = pytester.runpytest(*args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    errors = [ln for ln in err.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: {line}"), err
    assert "Traceback" not in err + result.stdout.str()
