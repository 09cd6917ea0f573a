"""Theorem 4.4 kernels (claims.md T1, T2, T2b) against naive loops, scipy, and the T2 inequality."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from hcdiag.checks.delta import (
    delta_star,
    delta_star_pair,
    delta_t1,
    min_enclosing_ball,
    shared_centroid_pairs,
    t2b_floor,
)
from hcdiag.errors import InputError
from hcdiag.metrics import clustering_losses


def _objective(c, cents):
    """Historical loss of the constant c: max_s min_k ||c - mu_k^s||^2 (naive)."""
    return max(min(float(np.sum((c - mu) ** 2)) for mu in cl) for cl in cents)


def _meb_slsqp(P):
    """Squared radius of the minimum enclosing ball by scipy: min t s.t. ||c - p_s||^2 <= t."""
    c0 = P.mean(axis=0)
    x0 = np.r_[c0, ((P - c0) ** 2).sum(1).max()]
    cons = {"type": "ineq", "fun": lambda v: v[-1] - ((P - v[:-1]) ** 2).sum(1)}
    res = minimize(lambda v: v[-1], x0, constraints=[cons], method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return float(((P - res.x[:-1]) ** 2).sum(1).max())  # the radius of the ball scipy found


# ---------------------------------------------------------------------------------- T2, the fact itself

@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(1, 12),
       st.booleans())
def test_pair_value_lower_bounds_every_model(s, ka, kb, n, b, share):
    rng = np.random.default_rng(s)
    ca = rng.normal(size=(ka, n)) * rng.uniform(0.1, 5)
    cb = rng.normal(size=(kb, n)) * rng.uniform(0.1, 5)
    if share:
        cb[0] = ca[-1]  # a shared centroid: delta* = 0
    ds = delta_star_pair(ca, cb)
    assert ds.exact and ds.lower == ds.value == ds.upper
    xhat = rng.normal(size=(b, n)) * rng.uniform(0.1, 5)
    cents = np.zeros((2, max(ka, kb), n))
    cents[0] = np.concatenate([ca, np.repeat(ca[:1], max(ka, kb) - ka, axis=0)])
    cents[1] = np.concatenate([cb, np.repeat(cb[:1], max(ka, kb) - kb, axis=0)])
    losses = clustering_losses(xhat, cents).numpy()
    # claims.md T2: max(l_a, l_b) >= min_{k,j} ||mu_k^a - mu_j^b||^2 / 4 for EVERY model
    assert losses.max() >= ds.value * (1 - 1e-12) - 1e-12
    # equality for the constant at the midpoint of the closest pair
    const = np.tile(ds.c.numpy(), (b, 1))
    l_const = clustering_losses(const, cents).numpy()
    assert l_const.max() == pytest.approx(ds.value, rel=1e-10, abs=1e-12)
    # and delta* is at most every pairwise quarter squared distance, with equality at the argmin
    quarter = [float(np.sum((p - q) ** 2)) / 4 for p in ca for q in cb]
    assert ds.value <= min(quarter) * (1 + 1e-12) + 1e-15
    assert ds.value == pytest.approx(min(quarter), rel=1e-10, abs=1e-15)
    k, j = ds.choice
    np.testing.assert_allclose(ds.c.numpy(), (ca[k] + cb[j]) / 2, rtol=1e-12, atol=1e-14)


def test_delta_star_exact_equals_pair_formula_for_two(seed):
    rng = np.random.default_rng(seed)
    cents = rng.normal(size=(2, 5, 7))
    exact = delta_star(cents)
    pair = delta_star_pair(cents[0], cents[1])
    assert exact.exact and exact.method == "enumeration"
    assert exact.value == pytest.approx(pair.value, rel=1e-10)
    np.testing.assert_allclose(exact.c.numpy(), pair.c.numpy(), atol=1e-8)
    assert exact.choice == pair.choice


@pytest.mark.parametrize("k", [2, 3])
def test_delta_star_three_clusterings_against_scipy_and_grid(seed, k):
    rng = np.random.default_rng(seed)
    cents = rng.normal(size=(3, k, 2)) * 2
    ds = delta_star(cents)
    assert ds.exact and ds.lower == ds.value == ds.upper
    assert ds.value == pytest.approx(_objective(ds.c.numpy(), cents), rel=1e-12)
    # oracle 1: per choice, scipy's enclosing ball; the minimum over choices
    oracle = min(_meb_slsqp(cents[np.arange(3), list(ch)]) for ch in itertools.product(range(k), repeat=3))
    assert ds.value == pytest.approx(oracle, rel=1e-6, abs=1e-10)
    # oracle 2: a grid over the centroids' box can never beat delta*, and the nearest grid point to
    # the optimum is within delta = half a cell diagonal: F(c* + e) <= (sqrt(F(c*)) + |e|)^2
    lo, hi = cents.reshape(-1, 2).min(0), cents.reshape(-1, 2).max(0)
    g = 301
    xs, ys = np.linspace(lo[0], hi[0], g), np.linspace(lo[1], hi[1], g)
    C = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    F = np.max([np.min(((C[:, None, :] - cl[None]) ** 2).sum(-1), axis=1) for cl in cents], axis=0)
    half_diag = 0.5 * np.hypot(xs[1] - xs[0], ys[1] - ys[0])
    assert ds.value <= F.min() + 1e-12
    assert F.min() <= (np.sqrt(ds.value) + half_diag) ** 2 + 1e-12


@pytest.mark.parametrize("S,K,N", [(3, 3, 4), (4, 3, 6), (5, 2, 3), (4, 4, 30)])
def test_bounds_bracket_the_exact_value(seed, S, K, N):
    rng = np.random.default_rng(seed)
    cents = rng.normal(size=(S, K, N))
    exact = delta_star(cents)
    assert exact.exact and exact.method == "enumeration"
    # local search only, and branch and bound cut short: brackets around the exact value
    for budget in (0, 3):
        bounds = delta_star(cents, max_enumeration=0, max_balls=budget, seed=seed)
        assert bounds.method in ("bounds", "branch-and-bound")
        assert bounds.lower <= exact.value * (1 + 1e-10) + 1e-12
        assert exact.value <= bounds.upper * (1 + 1e-10) + 1e-12
        assert bounds.value == bounds.upper == pytest.approx(_objective(bounds.c.numpy(), cents), rel=1e-12)
    # branch and bound with its default budget closes on these sizes, at the enumerated value
    bb = delta_star(cents, max_enumeration=0, seed=seed)
    assert bb.exact and bb.value == pytest.approx(exact.value, rel=1e-9)
    # the best constant's historical loss, through the training pipeline's own loss function
    const = np.tile(exact.c.numpy(), (3, 1))
    assert clustering_losses(const, cents).max().item() == pytest.approx(exact.value, rel=1e-10)
    # a subset's delta* never exceeds the set's; the largest pairwise value is a lower bound
    pairs = [delta_star_pair(cents[a], cents[b]).value for a, b in itertools.combinations(range(S), 2)]
    assert max(pairs) <= exact.value * (1 + 1e-10)
    assert delta_star(cents[:-1]).value <= exact.value * (1 + 1e-10)
    assert exact.choice == tuple(int(np.argmin(((exact.c.numpy() - cl) ** 2).sum(1))) for cl in cents)


def test_delta_star_zero_when_all_share_a_centroid(seed):
    rng = np.random.default_rng(seed)
    cents = rng.normal(size=(4, 3, 5))
    shared = rng.normal(size=5)
    cents[np.arange(4), rng.integers(0, 3, size=4)] = shared
    ds = delta_star(cents)
    assert ds.value == pytest.approx(0.0, abs=1e-20)
    np.testing.assert_allclose(ds.c.numpy(), shared, atol=1e-12)
    single = delta_star(cents[:1])
    assert single.value == 0.0 and single.exact


def test_delta_star_follows_device_and_reports():
    cents = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[2.0, 0.0], [-9.0, 5.0]]])
    ds = delta_star(cents)
    assert ds.value == 1.0 and ds.c.tolist() == [1.0, 0.0] and ds.choice == (0, 0)
    assert ds.c.device == cents.device and ds.c.dtype == torch.float64
    assert ds.to_dict()["choice"] == [0, 0] and ds.to_dict()["exact"] is True


# ---------------------------------------------------------------------------------- minimum enclosing ball

@pytest.mark.parametrize("S,N", [(1, 3), (2, 1), (5, 2), (8, 2), (9, 3), (6, 20), (12, 5)])
def test_min_enclosing_ball_kkt_and_scipy(seed, S, N):
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(S, N))
    if S > 2:
        P[-1] = P[0]  # duplicates happen (shared centroids)
    ball = min_enclosing_ball(P)
    d2 = ((P - ball.center) ** 2).sum(1)
    # KKT certificate: weights on the simplex, centre their combination, support on the sphere
    assert (ball.weights >= 0).all() and ball.weights.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(ball.weights @ P, ball.center, atol=1e-12)
    assert (d2 <= ball.r2 * (1 + 1e-12) + 1e-15).all()
    support = ball.weights > 1e-9
    np.testing.assert_allclose(d2[support], ball.r2, rtol=1e-9, atol=1e-14)
    assert ball.dual == pytest.approx(ball.r2, rel=1e-9, abs=1e-14)
    assert ball.r2 <= _meb_slsqp(P) * (1 + 1e-9) + 1e-14
    assert ball.r2 == pytest.approx(_meb_slsqp(P), rel=1e-6, abs=1e-12)


# ---------------------------------------------------------------------------------- shared centroids

def test_shared_centroid_pairs_hand_made():
    cents = np.zeros((3, 2, 2))
    cents[0] = [[0.0, 0.0], [5.0, 5.0]]
    cents[1] = [[0.0, 0.0], [5.0, 5.3]]  # one exact duplicate of clustering 0, one at 0.3
    cents[2] = [[9.0, 9.0], [5.1, 5.0]]  # 0.1 from 0's second centroid, sqrt(0.1^2+0.3^2) from 1's
    got = shared_centroid_pairs(cents, tol=0.2)
    assert [(p.a, p.k, p.b, p.j) for p in got] == [(0, 0, 1, 0), (0, 1, 2, 1)]
    assert got[0].dist == 0.0 and got[1].dist == pytest.approx(0.1, rel=1e-12)
    wide = shared_centroid_pairs(cents, tol=0.35)
    assert [(p.a, p.k, p.b, p.j) for p in wide] == [(0, 0, 1, 0), (0, 1, 1, 1), (0, 1, 2, 1), (1, 1, 2, 1)]
    assert wide[3].dist == pytest.approx(np.hypot(0.1, 0.3), rel=1e-12)
    a, k, b, j, dist = wide[0]  # plain tuples too
    assert (a, k, b, j, dist) == (0, 0, 1, 0, 0.0)
    assert shared_centroid_pairs(cents, tol=0.0) == [got[0]]
    # the exact duplicate puts delta* of clusterings {0, 1} at 0
    assert delta_star(cents[:2]).value == 0.0


def test_shared_pairs_match_naive_loop(seed):
    rng = np.random.default_rng(seed)
    cents = rng.integers(0, 3, size=(4, 3, 2)).astype(float)  # a small lattice: many coincidences
    tol = float(rng.uniform(0, 2))
    naive = [(a, k, b, j) for a, b in itertools.combinations(range(4), 2) for k in range(3) for j in range(3)
             if np.linalg.norm(cents[a, k] - cents[b, j]) <= tol]
    assert [(p.a, p.k, p.b, p.j) for p in shared_centroid_pairs(cents, tol)] == naive


# ---------------------------------------------------------------------------------- T1

def test_delta_t1_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    R, K, N = 6, 4, 5
    cents = rng.normal(size=(R, K, N))
    xbar = rng.normal(size=N) * 0.3
    per = [min(sum((xbar[i] - cents[r, k, i]) ** 2 for i in range(N)) for k in range(K)) for r in range(R)]
    t1 = delta_t1(xbar, torch.from_numpy(cents))
    np.testing.assert_allclose(t1.per_clustering.numpy(), per, rtol=1e-12)
    r = int(np.argmin(per))
    assert t1.value == pytest.approx(per[r], rel=1e-12) and t1.clustering == r
    assert t1.centroid == int(np.argmin(((cents[r] - xbar) ** 2).sum(1)))
    assert t1.to_dict()["clustering"] == r


# ---------------------------------------------------------------------------------- T2b

def _collapsed_loss(c, x, mu, beta, s2, convention):
    """The pipeline's per-sample loss of a constant output c (KL 0), averaged over the data."""
    rec = np.mean(np.sum((x - c) ** 2, axis=1))
    clu = np.sum((c - mu) ** 2)
    n = x.shape[1]
    if convention == "literal":
        return rec / (2 * s2) + beta * clu
    if convention == "mean":
        return rec / n / (2 * s2) + beta * clu / n
    return rec / (2 * s2) + beta * clu / (2 * s2)  # scaled


@pytest.mark.parametrize("convention", ["literal", "mean", "scaled"])
def test_t2b_constant_is_the_minimiser(seed, convention):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4)) + 1.0
    xbar = x.mean(axis=0)
    mus = rng.normal(size=(3, 4)) * 2
    beta = float(rng.uniform(0.1, 4))
    s2 = float(rng.uniform(0.5, 5))
    floors = []
    for k, mu in enumerate(mus):
        res = minimize(_collapsed_loss, xbar, args=(x, mu, beta, s2, convention), method="BFGS",
                       options={"gtol": 1e-12})
        one = t2b_floor(xbar, mu, beta=beta, s2=s2, convention=convention)
        np.testing.assert_allclose(one.c.numpy(), res.x, rtol=1e-6, atol=1e-7)
        assert one.l == pytest.approx(float(np.sum((res.x - mu) ** 2)), rel=1e-5, abs=1e-9)
        floors.append(float(np.sum((res.x - mu) ** 2)))
    allk = t2b_floor(torch.from_numpy(xbar), torch.from_numpy(mus), beta=beta, s2=s2, convention=convention)
    assert allk.centroid == int(np.argmin(floors))
    assert allk.l == pytest.approx(min(floors), rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(allk.per_centroid.numpy(), floors, rtol=1e-5, atol=1e-9)
    pull = 2 * beta * s2 if convention != "scaled" else beta
    assert allk.l == pytest.approx(np.sum((xbar - mus[allk.centroid]) ** 2) / (1 + pull) ** 2, rel=1e-12)


def test_t2b_errors():
    with pytest.raises(InputError, match=r"The 'convention' parameter must be one of literal, scaled, mean. Got 'sum'"):
        t2b_floor(np.zeros(2), np.zeros(2), beta=1, s2=1, convention="sum")
    with pytest.raises(InputError, match=r"The 'beta' parameter must be a finite float >= 0. Got -1"):
        t2b_floor(np.zeros(2), np.zeros(2), beta=-1, s2=1)
    with pytest.raises(InputError, match=r"The 's2' parameter must be a finite float > 0. Got 0"):
        t2b_floor(np.zeros(2), np.zeros(2), beta=1, s2=0)
    with pytest.raises(InputError, match=r"The 'xbar' argument must have length N = 2 \(the centroids' length\); got 3"):
        t2b_floor(np.zeros(3), np.zeros((4, 2)), beta=1, s2=1)
    with pytest.raises(InputError, match=r"The 'mu' argument must have shape \(N,\) or \(K, N\); got shape \(1, 2, 2\)"):
        t2b_floor(np.zeros(2), np.zeros((1, 2, 2)), beta=1, s2=1)


def test_delta_errors():
    with pytest.raises(InputError, match=r"The 'centroids' argument must be a 3-D array of shape \(R, K, N\); got shape \(2, 2\)"):
        delta_star(np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"The 'centroids' argument holds 1 non-finite value\(s\); the clusterings must have finite centroids"):
        delta_star(np.array([[[0.0, np.nan]]]))
    with pytest.raises(InputError, match=r"The 'max_enumeration' parameter must be an int >= 0. Got -1"):
        delta_star(np.zeros((2, 2, 2)), max_enumeration=-1)
    with pytest.raises(InputError, match=r"The 'max_balls' parameter must be an int >= 0. Got -2"):
        delta_star(np.zeros((2, 2, 2)), max_balls=-2)
    with pytest.raises(InputError, match=r"The 'max_starts' parameter must be an int >= 1. Got 0"):
        delta_star(np.zeros((2, 2, 2)), max_starts=0)
    with pytest.raises(InputError, match=r"The 'ca' and 'cb' arguments must be non-empty with the same length N; got \(2, 3\) and \(2, 4\)"):
        delta_star_pair(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(InputError, match=r"The 'tol' parameter must be a finite float >= 0. Got -0.1"):
        shared_centroid_pairs(np.zeros((2, 2, 2)), tol=-0.1)
    with pytest.raises(InputError, match=r"The 'xbar' argument must have length N = 2 \(the centroids' length\); got 5"):
        delta_t1(np.zeros(5), np.zeros((3, 2, 2)))
    with pytest.raises(InputError, match=r"The 'points' argument must be a 2-D array of shape \(S, N\) with S >= 1; got shape \(3,\)"):
        min_enclosing_ball(np.zeros(3))
