"""hcdiag.theory against closed forms DERIVED here with sympy, numpy's pPCA likelihood and naive loops."""

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from hcdiag.errors import InputError
from hcdiag.theory import (alphabar, betas, critical_multiple, critical_timestep, linear_vae_optimum,
                           phase_table)

# ----------------------------------------------------------------------------- sympy derivation

lam, s2, u, w, v, t = sp.symbols("lambda s2 u w v t", positive=True)


def _derive():
    """Derive the linear VAE's optimum along ONE principal direction (eigenvalue lam).

    1. pPCA (Tipping & Bishop): C = W W^T + s2 I restricted to the direction is the scalar
       u + s2 with u = w^2 >= 0; its negative log-likelihood (without 0.5 log 2 pi) is
       f(u) = 0.5 [log(u + s2) + lam / (u + s2)], minimised over u >= 0.
    2. ELBO of the linear VAE along the direction, y = u_i^T (x - xbar) with E y^2 = lam:
       encoder mean v y, posterior variance t, decoder weight w; negative ELBO (without
       0.5 log 2 pi) g = 0.5 log s2 + [lam (1 - w v)^2 + w^2 t] / (2 s2) + KL,
       KL = 0.5 [t + v^2 lam - 1 - log t] (Gaussian KL of N(v y, t) to N(0, 1) averaged over y).
    """
    f = sp.Rational(1, 2) * (sp.log(u + s2) + lam / (u + s2))
    df = sp.factor(sp.diff(f, u))
    # df = (u + s2 - lam) / (2 (u + s2)^2): its sign is that of u + s2 - lam, so on u >= 0 the
    # minimiser is the stationary point when lam > s2 and the boundary u = 0 otherwise.
    stationary = sp.solve(sp.Eq(df, 0), u)
    assert stationary == [lam - s2]
    assert sp.simplify(df * 2 * (u + s2) ** 2 - (u + s2 - lam)) == 0
    u_active = stationary[0]
    assert sp.simplify(sp.diff(f, u, 2).subs(u, u_active) - 1 / (2 * lam ** 2)) == 0  # > 0: a minimum

    kl = sp.Rational(1, 2) * (t + v ** 2 * lam - 1 - sp.log(t))
    g = sp.Rational(1, 2) * sp.log(s2) + (lam * (1 - w * v) ** 2 + w ** 2 * t) / (2 * s2) + kl
    sol = sp.solve([sp.diff(g, v), sp.diff(g, t)], [v, t], dict=True)
    assert len(sol) == 1
    v_opt, t_opt = sol[0][v], sol[0][t]
    # With the optimal encoder the ELBO equals the pPCA likelihood for every w (tight bound).
    assert sp.simplify(g.subs({v: v_opt, t: t_opt}) - f.subs(u, w ** 2)) == 0

    def at(w2):
        wv = sp.sqrt(w2)
        sub = {v: v_opt.subs(w, wv), t: t_opt.subs(w, wv)}
        return {
            "w2": w2,
            "posterior_var": sp.simplify(t_opt.subs(w, wv)),
            "mu_var": sp.simplify((v_opt.subs(w, wv)) ** 2 * lam),        # Var_x(v y) = v^2 lam
            "kl": sp.simplify(kl.subs(sub)),
            "neg_elbo": sp.simplify(g.subs(w, wv).subs(sub)),               # per direction, no log 2 pi
        }

    return at(u_active), at(sp.Integer(0))


ACTIVE, INACTIVE = _derive()


def test_sympy_derivation_gives_the_documented_closed_forms():
    assert sp.simplify(ACTIVE["posterior_var"] - s2 / lam) == 0
    assert sp.simplify(ACTIVE["mu_var"] - (1 - s2 / lam)) == 0
    assert sp.simplify(sp.expand_log(ACTIVE["kl"] - sp.log(lam / s2) / 2, force=True)) == 0
    assert sp.simplify(sp.expand_log(ACTIVE["neg_elbo"] - (sp.log(lam) + 1) / 2, force=True)) == 0
    assert INACTIVE["posterior_var"] == 1 and INACTIVE["mu_var"] == 0 and INACTIVE["kl"] == 0
    assert sp.simplify(INACTIVE["neg_elbo"] - (sp.log(s2) + lam / s2) / 2) == 0


_NUM = {key: (sp.lambdify((lam, s2), ACTIVE[key], "math"), sp.lambdify((lam, s2), INACTIVE[key], "math"))
        for key in ("w2", "posterior_var", "mu_var", "kl", "neg_elbo")}


def _sym(key, lam_v, s2_v):
    fa, fi = _NUM[key]
    return float(fa(lam_v, s2_v) if lam_v > s2_v else fi(lam_v, s2_v))


def test_numeric_optimum_matches_sympy_per_dimension(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        N = int(rng.integers(1, 12))
        n = int(rng.integers(1, N + 1))
        ev = np.sort(rng.uniform(0.01, 10.0, N))[::-1]
        s2v = float(rng.uniform(0.01, 12.0))
        opt = linear_vae_optimum(ev, s2v, n)
        for i in range(n):
            assert opt.active[i] == (ev[i] > s2v)
            assert opt.decoder_norm2[i] == pytest.approx(_sym("w2", ev[i], s2v), rel=1e-10, abs=1e-12)
            assert opt.posterior_var[i] == pytest.approx(_sym("posterior_var", ev[i], s2v), rel=1e-10)
            assert opt.mu_var[i] == pytest.approx(_sym("mu_var", ev[i], s2v), rel=1e-10, abs=1e-12)
            assert opt.kl_per_dim[i] == pytest.approx(_sym("kl", ev[i], s2v), rel=1e-10, abs=1e-12)
        assert opt.kl == pytest.approx(sum(_sym("kl", ev[i], s2v) for i in range(n)), rel=1e-10, abs=1e-12)
        # Directions beyond the latent dim cannot be active: they contribute the inactive term.
        expected = 0.5 * N * math.log(2 * math.pi) + sum(
            _sym("neg_elbo", ev[i], s2v) if i < n else _NUM["neg_elbo"][1](ev[i], s2v) for i in range(N))
        assert opt.neg_elbo == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert opt.recon == pytest.approx(opt.neg_elbo - opt.kl, rel=1e-12)


def _ppca_nll(sigma, W, s2v):
    """Exact pPCA negative log-likelihood per sample, 0.5 [N log 2pi + log det C + tr(C^-1 Sigma)]."""
    N = sigma.shape[0]
    C = W @ W.T + s2v * np.eye(N)
    _, logdet = np.linalg.slogdet(C)
    return 0.5 * (N * math.log(2 * math.pi) + logdet + np.trace(np.linalg.solve(C, sigma)))


def test_neg_elbo_equals_numeric_ppca_likelihood_from_top_eigenvalues(seed):
    rng = np.random.default_rng(seed)
    N, n = 12, 4
    scales = np.sort(rng.uniform(0.2, 3.0, N))[::-1]
    x = rng.normal(size=(3000, N)) * scales @ np.linalg.qr(rng.normal(size=(N, N)))[0]
    sigma = np.cov(x, rowvar=False, bias=True)
    ev, U = np.linalg.eigh(sigma)
    ev, U = ev[::-1], U[:, ::-1]
    for m in (0.1, 0.3, 0.7, 1.0, 2.5):
        s2v = m * ev[0]
        W = U[:, :n] * np.sqrt(np.maximum(ev[:n] - s2v, 0.0))   # Tipping & Bishop, R = I
        opt = linear_vae_optimum(ev[:n], s2v, n, trace=float(np.trace(sigma)), N=N)
        assert opt.neg_elbo == pytest.approx(_ppca_nll(sigma, W, s2v), rel=1e-10, abs=1e-10)
        # ...and no other decoder of rank n does better (random perturbations of the optimum).
        for _ in range(5):
            Wp = W + 0.05 * rng.normal(size=W.shape)
            assert _ppca_nll(sigma, Wp, s2v) >= opt.neg_elbo - 1e-12


def test_kl_is_zero_at_and_beyond_lambda_max(seed):
    rng = np.random.default_rng(seed)
    ev = np.sort(rng.uniform(0.1, 5.0, 10))[::-1]
    for m in (1.0, 1.5, 10.0):
        opt = linear_vae_optimum(ev, m * ev[0], 5)
        assert opt.kl == 0.0 and opt.n_active == 0 and opt.au_burda == 0
    assert critical_multiple(ev) == 1.0
    assert critical_multiple(ev, lambda_max=2 * ev[0]) == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(ev=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=20),
       s2a=st.floats(1e-3, 1e3), s2b=st.floats(1e-3, 1e3), n=st.integers(1, 25))
def test_properties_kl_nonnegative_monotone_active_bounded(ev, s2a, s2b, n):
    lo, hi = sorted((s2a, s2b))
    N = len(ev)
    a = linear_vae_optimum(ev, lo, n)
    b = linear_vae_optimum(ev, hi, n)
    assert a.kl >= 0 and b.kl >= 0
    assert b.kl <= a.kl + 1e-12
    assert a.n_active <= min(n, N) and a.au_burda <= a.n_active
    assert a.kl_per_dim.shape == (n,) and np.all(a.kl_per_dim >= 0)
    assert np.all((a.mu_var >= 0) & (a.mu_var < 1)) and np.all((a.posterior_var > 0) & (a.posterior_var <= 1))


def test_phase_table_rows_match_optimum(seed):
    rng = np.random.default_rng(seed)
    ev = np.sort(rng.uniform(0.1, 5.0, 30))[::-1]
    mults = [0.25, 0.5, 1, 2, 5, 10]
    rows = phase_table(ev[:8], mults, 8, trace=float(ev.sum()), N=30)
    assert [r["multiple"] for r in rows] == mults
    for r in rows:
        opt = linear_vae_optimum(ev, r["multiple"] * ev[0], 8)
        assert r["s2"] == pytest.approx(r["multiple"] * ev[0], rel=1e-12)
        assert r["active"] == int((ev[:8] > r["s2"]).sum())
        assert r["active_dims"] == [i for i in range(8) if ev[i] > r["s2"]]
        assert r["kl"] == pytest.approx(opt.kl, rel=1e-12, abs=1e-15)
        assert r["neg_elbo"] == pytest.approx(opt.neg_elbo, rel=1e-12, abs=1e-12)
        assert r["au_burda"] == int((opt.mu_var > 0.01).sum())
    assert rows[2]["kl"] == 0.0 and all(r["kl"] == 0 for r in rows[2:])


def test_latent_dim_beyond_data_dim_pads_inactive():
    opt = linear_vae_optimum([4.0, 1.0], 0.5, 4)
    assert opt.active.tolist() == [True, True, False, False]
    assert opt.kl == pytest.approx(0.5 * math.log(8) + 0.5 * math.log(2), rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eigenvalues=[1.0], s2=0.0, latent_dim=1), r"'s2' parameter must be a finite float > 0\. Got 0\.0"),
    (dict(eigenvalues=[1.0], s2=float("nan"), latent_dim=1), r"'s2' parameter must be a finite float > 0"),
    (dict(eigenvalues=[1.0], s2=1.0, latent_dim=0), r"'latent_dim' parameter must be an integer >= 1\. Got 0"),
    (dict(eigenvalues=[], s2=1.0, latent_dim=1), r"'eigenvalues' parameter is empty"),
    (dict(eigenvalues=[1.0, -2.0], s2=1.0, latent_dim=1), r"'eigenvalues' parameter must be >= 0"),
    (dict(eigenvalues=[1.0, np.nan], s2=1.0, latent_dim=1), r"holds 1 non-finite value"),
    (dict(eigenvalues=[3.0, 1.0], s2=1.0, latent_dim=2, N=10), r"'trace' parameter is required when only the top 2 of N=10"),
    (dict(eigenvalues=[3.0, 1.0], s2=1.0, latent_dim=2, trace=10.0), r"'N' parameter is required when 'trace' is given"),
    (dict(eigenvalues=[3.0, 1.0], s2=1.0, latent_dim=3, trace=10.0, N=10), r"has 2 value\(s\) but latent_dim=3 needs the top 3"),
    (dict(eigenvalues=[3.0, 1.0], s2=1.0, latent_dim=2, trace=1.0, N=10), r"'trace' parameter \(1\) is smaller than the sum"),
    (dict(eigenvalues=[3.0, 1.0, 1.0], s2=1.0, latent_dim=2, trace=9.0, N=2), r"'N' parameter \(2\) is smaller than the number"),
])
def test_optimum_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        linear_vae_optimum(**kwargs)


@pytest.mark.parametrize("mults", [[0.0], [1.0, -1.0], [float("inf")], ["a"], []])
def test_phase_table_rejects_bad_multiples(mults):
    with pytest.raises(InputError, match=r"'multiples' parameter must hold (floats > 0|at least one)"):
        phase_table([2.0, 1.0], mults, 1)


# ----------------------------------------------------------------------------- diffusion

def _naive_linear_alphabar(T):
    out, prod = [], 1.0
    for k in range(1, T + 1):
        beta = 1e-4 + (k - 1) * (0.02 - 1e-4) / (T - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


def _cos_f(k, T, s=0.008):
    return math.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_linear_alphabar_matches_naive_loop(T):
    assert np.allclose(alphabar("linear", T), _naive_linear_alphabar(T), rtol=1e-12, atol=0)
    assert betas("linear", T)[0] == pytest.approx(1e-4) and betas("linear", T)[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("T", [2, 50, 1000])
def test_cosine_alphabar_matches_formula(T):
    ab = alphabar("cosine", T)
    prod, clipped = 1.0, False
    for k in range(1, T + 1):
        beta = 1.0 - _cos_f(k, T) / _cos_f(k - 1, T)
        clipped = clipped or beta > 0.999
        prod *= 1.0 - min(beta, 0.999)
        assert ab[k - 1] == pytest.approx(prod, rel=1e-10, abs=1e-300)
        if not clipped:  # Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0) until the clip bites
            assert ab[k - 1] == pytest.approx(_cos_f(k, T) / _cos_f(0, T), rel=1e-10)
    assert clipped  # f(T) = cos^2(pi/2) = 0: the last beta is always clipped


@settings(max_examples=80, deadline=None)
@given(lmax=st.floats(1e-6, 0.9999, allow_nan=False), schedule=st.sampled_from(["linear", "cosine"]),
       T=st.sampled_from([2, 10, 100, 1000]))
def test_critical_timestep_satisfies_definition(lmax, schedule, T):
    res = critical_timestep(lmax, schedule, T)
    g = 1.0 - alphabar(schedule, T)
    if g[0] <= lmax <= g[-1]:
        assert res.t_c_reason is None
        tc = res.t_c
        assert g[tc - 1] >= lmax and (tc == 1 or g[tc - 2] < lmax)
        assert tc - 1 <= res.t_c_frac <= tc
        if tc > 1:  # linear interpolation of 1 - abar hits lambda_max at t_c_frac
            k = res.t_c_frac - (tc - 1)
            assert (1 - k) * g[tc - 2] + k * g[tc - 1] == pytest.approx(lmax, rel=1e-9)
    else:
        assert res.t_c is None and res.t_c_frac is None
        assert ("below the smallest" in res.t_c_reason) if lmax < g[0] else ("exceeds the largest" in res.t_c_reason)


@settings(max_examples=40, deadline=None)
@given(lmax=st.floats(1.0, 1e4), schedule=st.sampled_from(["linear", "cosine"]))
def test_no_critical_timestep_when_lambda_max_at_least_one(lmax, schedule):
    res = critical_timestep(lmax, schedule)
    assert res.t_c is None and res.t_c_frac is None
    assert ">= 1 but the noise variance 1 - alphabar_t < 1" in res.t_c_reason
    assert res.noise_range[1] < 1.0


@settings(max_examples=80, deadline=None)
@given(lmax=st.floats(1e-6, 1e6), schedule=st.sampled_from(["linear", "cosine"]),
       T=st.sampled_from([2, 10, 1000]))
def test_snr_timestep_equation(lmax, schedule, T):
    res = critical_timestep(lmax, schedule, T)
    ab = alphabar(schedule, T)
    a_star = 1.0 / (1.0 + lmax)
    assert res.alphabar_snr * lmax == pytest.approx(1.0 - res.alphabar_snr, rel=1e-12)
    if ab[-1] <= a_star <= ab[0]:
        ts = res.t_snr
        assert ab[ts - 1] * lmax <= 1 - ab[ts - 1] + 1e-15
        assert ts == 1 or ab[ts - 2] * lmax > 1 - ab[ts - 2]
        if ts > 1:
            k = res.t_snr_frac - (ts - 1)
            assert 0 <= k <= 1
            assert (1 - k) * ab[ts - 2] + k * ab[ts - 1] == pytest.approx(a_star, rel=1e-9)
    else:
        assert res.t_snr is None and "signal-to-noise ratio" in res.t_snr_reason


def test_ddpm_linear_reference_values():
    # Published DDPM value: abar_T for the linear schedule at T = 1000 is about 4.04e-5.
    ab = alphabar("linear", 1000)
    assert ab[-1] == pytest.approx(4.0358e-5, rel=1e-3)
    res = critical_timestep(0.5, "linear", 1000)
    assert res.to_dict()["t_c"] == res.t_c and res.to_dict()["noise_range"][0] == pytest.approx(1e-4)


@pytest.mark.parametrize("args, match", [
    ((0.0,), r"'lambda_max' parameter must be a finite float > 0\. Got 0\.0"),
    ((-1.0,), r"'lambda_max' parameter must be a finite float > 0\. Got -1\.0"),
    ((float("nan"),), r"'lambda_max' parameter must be a finite float > 0"),
    ((0.5, "quadratic"), r"'schedule' parameter must be one of linear, cosine\. Got 'quadratic'"),
    ((0.5, "linear", 1), r"'T' parameter must be an integer >= 2\. Got 1"),
    ((0.5, "linear", 2.5), r"'T' parameter must be an integer >= 2\. Got 2\.5"),
])
def test_diffusion_input_errors(args, match):
    with pytest.raises(InputError, match=match):
        critical_timestep(*args)
