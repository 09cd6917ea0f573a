"""Checks D1-D4 (hcdiag.checks.diffusion): each verdict where it holds, fails and is inconclusive, on oracles whose
answer is known (the exact denoiser of Gaussian data; a denoiser that ignores x_t) and on hand-made evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hcdiag.checks.diffusion import (decide_critical, decide_diversity, decide_flexibility, decide_spectral,
                                     eq13_timestep, matched_eps, schedule_dependence, selection_confound,
                                     snr_timestep, timestep_grid)
from hcdiag.diffusion.critical import normalized_gain
from hcdiag.diffusion.model import Denoiser, Tables, gaussian_eps, model_eps
from hcdiag.diffusion.schedules import Schedule, family


def _oracle_gain(lam: float, schedule: Schedule, seed: int, n: int = 400):
    tab = Tables(schedule)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64) * math.sqrt(lam)
    ts = timestep_grid(schedule.T)
    gain, se = normalized_gain(gaussian_eps(np.zeros(1), np.array([[lam]]), tab), tab, x0, torch.ones(1), ts,
                               generator=g, with_se=True)
    return ts, gain, se


def test_criteria_timesteps_against_naive_scans():
    s = Schedule("linear")
    a = s.alphabar()
    for lam in (0.05, 0.5, 4.0):
        t = snr_timestep(s, lam)
        first = next(i + 1 for i in range(s.T) if a[i] * lam <= 1 - a[i])  # the first t past SNR lam = 1
        assert first - 1 <= t <= first
    for lam in (0.05, 0.5):
        t = eq13_timestep(s, lam)
        first = next(i + 1 for i in range(s.T) if 1 - a[i] >= lam)
        assert first - 1 <= t <= first
    assert eq13_timestep(s, 4.0) is None  # 1 - abar < 1: eq. 13 has no solution for lambda_max >= 1


@pytest.mark.parametrize("lam,follows", [(4.0, ["snr"]), (0.05, ["snr", "eq13"])])
def test_d1_d2_hold_on_the_exact_gaussian_denoiser(seed, lam, follows):
    s = Schedule("linear")
    ts, gain, se = _oracle_gain(lam, s, seed)
    d1 = decide_critical(ts, gain, se, lam=lam, schedule=s)
    assert d1.verdict == "holds", d1.summary
    assert d1.values["max_gap_to_gaussian"] < 0.06  # Monte Carlo over 400 rows of an exact formula
    d2 = decide_spectral(d1.values["t_measured"], s, lam)
    assert d2.verdict == "holds" and d2.values["follows"] == follows
    assert abs(d1.values["t_measured"] - snr_timestep(s, lam)) < 0.05 * s.T


def test_d1_fails_when_the_schedule_ends_before_x_t_stops_mattering(seed):
    s = Schedule("linear", beta_end=0.002)  # terminal SNR 0.54: with lambda 10, SNR lambda = 5.4 at t = T
    ts, gain, se = _oracle_gain(10.0, s, seed)
    d1 = decide_critical(ts, gain, se, lam=10.0, schedule=s)
    assert d1.verdict == "fails" and "still depends on x_t at t = T" in d1.summary
    assert decide_spectral(None, s, 10.0).verdict == "inconclusive"


def test_d1_fails_for_a_denoiser_that_ignores_x_t(seed):
    s = Schedule("linear")
    tab = Tables(s)

    def collapsed(x, t):  # E[x0 | xt] = 0 for every x_t
        return x / (1 - tab.abar[t])[:, None].sqrt().to(x.dtype)

    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ts = timestep_grid(s.T)
    gain, se = normalized_gain(collapsed, tab, x0, torch.tensor([1.0, 0.0]), ts, with_se=True)
    assert np.allclose(gain, 0, atol=1e-9)
    d1 = decide_critical(ts, gain, se)
    assert d1.verdict == "fails" and "ignores x_t already at the first timestep" in d1.summary


def test_d1_inconclusive_for_a_partial_run_noisy_gain_or_an_incomplete_transition():
    ts = np.array([1, 10, 100, 1000])
    good = np.array([0.99, 0.9, 0.3, 0.01])
    assert decide_critical(ts, good, np.full(4, 0.01)).verdict == "holds"
    r = decide_critical(ts, good, np.full(4, 0.01), complete=False)
    assert r.verdict == "inconclusive" and "partial" in r.reason
    r = decide_critical(ts, good, np.array([0.01, 0.2, 0.01, 0.01]))
    assert r.verdict == "inconclusive" and "standard error reaches 0.2" in r.reason
    r = decide_critical(ts, np.array([0.99, 0.9, 0.45, 0.4]), np.full(4, 0.01))
    assert r.verdict == "inconclusive" and "transition is incomplete" in r.reason


def test_d2_fails_when_the_crossing_is_not_where_lambda_max_puts_it():
    s = Schedule("linear")
    t_true = snr_timestep(s, 4.0)
    r = decide_spectral(t_true, s, 0.01)  # a crossing of lambda 4 judged with lambda_max 0.01
    assert r.verdict == "fails" and r.values["follows"] == []
    assert decide_spectral(t_true, s, 4.0, complete=False).verdict == "inconclusive"


def _diff(lo, hi):
    return {"diff": (lo + hi) / 2, "diff_ci": [lo, hi]}


def test_d3_decisions():
    floor = 0.01
    assert decide_diversity({"single": _diff(-0.2, -0.1), "logsnr": _diff(-0.3, -0.05)}, floor).verdict == "holds"
    r = decide_diversity({"single": _diff(-0.2, -0.1), "logsnr": _diff(0.02, 0.1)}, floor)
    assert r.verdict == "fails" and "logsnr" in r.summary
    r = decide_diversity({"single": _diff(-0.005, 0.008)}, floor)
    assert r.verdict == "fails" and "no improvement beyond the noise floor" in r.summary
    r = decide_diversity({"single": _diff(-0.2, 0.1)}, floor)
    assert r.verdict == "inconclusive" and "bootstrap intervals" in r.reason
    r = decide_diversity({}, floor)
    assert r.verdict == "inconclusive" and "needs the control runs" in r.reason
    assert decide_diversity({"single": _diff(-0.2, -0.1)}, floor, complete=False).verdict == "inconclusive"


def test_d4_decisions():
    floor = 0.01
    assert decide_flexibility({"cosine": _diff(-0.02, 0.009)}, floor).verdict == "holds"
    r = decide_flexibility({"cosine": _diff(-0.02, 0.009), "sigmoid": _diff(0.05, 0.2)}, floor)
    assert r.verdict == "fails" and "sigmoid" in r.summary
    assert decide_flexibility({"cosine": _diff(-0.02, 0.05)}, floor).verdict == "inconclusive"
    assert decide_flexibility({}, floor).verdict == "inconclusive"
    assert decide_flexibility({"cosine": _diff(-0.02, 0.009)}, floor, complete=False).verdict == "inconclusive"


def test_matched_eps_reads_the_home_timestep_of_the_nearest_log_snr(seed):
    torch.manual_seed(seed)
    home, target = Tables(Schedule("linear")), Tables(Schedule("cosine"))
    model = Denoiser(2, widths=(8,), emb_dim=8, conditioning="schedule", n_schedules=4).eval()
    x = torch.randn(5, 2, dtype=torch.float64)
    same = matched_eps(model, home, 1, home)
    t = torch.tensor([1, 7, 300, 999, 1000])
    with torch.no_grad():
        assert torch.equal(same(x, t), model_eps(model, home, 1)(x, t))
        got = matched_eps(model, home, 1, target)(x, t)
        hl = home.log_snr[1:].numpy()
        want_t = torch.tensor([int(np.argmin(np.abs(hl - float(target.log_snr[int(tt)])))) + 1 for tt in t])
        want = model(x.float(), want_t, home.log_snr[want_t].float(), torch.full_like(want_t, 1)).double()
    assert torch.equal(got, want)


def test_schedule_dependence_is_zero_for_noise_level_conditioning_and_not_for_a_schedule_index(seed):
    torch.manual_seed(seed)
    tabs = [Tables(s) for s in family("linear", 4)]
    x0 = torch.randn(64, 3)
    ls = Denoiser(3, widths=(16,), emb_dim=8, conditioning="logsnr", n_schedules=4).eval()
    idx = Denoiser(3, widths=(16,), emb_dim=8, conditioning="schedule", n_schedules=4).eval()
    one = Denoiser(3, widths=(16,), emb_dim=8, conditioning="timestep").eval()
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    assert schedule_dependence(ls, tabs, x0, generator=g()) == 0.0
    assert schedule_dependence(idx, tabs, x0, generator=g()) > 1e-4
    assert schedule_dependence(one, tabs, x0, generator=g()) is None


def test_selection_confound_names_rounds_that_kept_the_noisiest_schedules():
    class Run:
        pass

    run = Run()
    run.config = type("C", (), {"method": "consensus"})()
    run.schedules = family("linear", 8)  # beta_end increasing: mean alphabar decreasing with the index
    run.rounds = [{"active": list(range(8)), "kept": [4, 5, 6, 7]}, {"active": [4, 5, 6, 7], "kept": [4, 7]}]
    c = selection_confound(run)
    assert np.all(np.diff(c["mean_alphabar"]) < 0)
    assert [r["kept_noisiest"] for r in c["rounds"]] == [True, False]
    assert c["rounds"][1]["noisiest"] == [6, 7] and not c["all_kept_noisiest"]


@pytest.mark.parametrize("kind", ["cosine", "sigmoid", "linear"])
def test_d2_places_the_crossing_in_log_snr_so_the_exact_denoiser_follows_the_snr_criterion(seed, kind):
    # the geometric grid's last interval spans log SNR -2.7..-19.8 under cosine: a crossing interpolated in t there
    # missed SNR lambda = 1 by more than a factor 2 for lambda 100 (found by a review)
    s = Schedule(kind)
    for lam in (0.3, 100.0):
        ts, gain, se = _oracle_gain(lam, s, seed)
        d1 = decide_critical(ts, gain, se, lam=lam, schedule=s)
        if d1.verdict != "holds":  # a schedule whose terminal SNR leaves x_t informative at this lambda
            assert d1.verdict == "fails" and s.terminal_snr * lam > 1
            continue
        assert abs(d1.values["log_snr_measured"] + math.log(lam)) < 1e-6  # logit G is linear in log SNR
        d2 = decide_spectral(d1.values["t_measured"], s, lam, log_snr_measured=d1.values["log_snr_measured"])
        assert d2.verdict == "holds" and "snr" in d2.values["follows"]


def test_d1_fails_only_beyond_two_standard_errors():
    ts = np.array([1, 10, 100, 1000])
    gain = np.array([0.99, 0.9, 0.7, 0.6])
    assert decide_critical(ts, gain, np.full(4, 0.01)).verdict == "fails"
    r = decide_critical(ts, gain, np.array([0.01, 0.01, 0.01, 0.06]))  # 0.6 - 2 x 0.06 < 0.5
    assert r.verdict == "inconclusive" and "two standard errors" in r.reason


def test_d3_an_improvement_below_the_noise_floor_is_no_improvement():
    floor = 0.01
    r = decide_diversity({"single": _diff(-0.009, -0.001)}, floor)  # significant, but smaller than the floor
    assert r.verdict == "fails" and "no improvement beyond the noise floor" in r.summary
    assert decide_diversity({"single": _diff(-0.05, -0.011)}, floor).verdict == "holds"
    assert decide_diversity({"single": _diff(-0.05, -0.005)}, floor).verdict == "inconclusive"
    r = decide_diversity({"single": _diff(-0.05, -0.02)}, floor, extra={"diverged": "3 of 60 rows non-finite"})
    assert r.verdict == "fails" and "diverge" in r.summary


class _Eps(torch.nn.Module):
    """An eps(x_t, t) function as a denoiser module (what competence() and the checks call)."""

    conditioning = "time"

    def __init__(self, fn):
        super().__init__()
        self.fn, self.p = fn, torch.nn.Parameter(torch.zeros(1))

    def forward(self, xt, t, log_snr, r=None):
        return self.fn(xt.double(), t).float()


@pytest.mark.parametrize("lam", [0.25, 4.0])
def test_competence_against_the_data_free_predictor_on_gaussian_data(seed, lam):
    """The exact denoiser of N(0, diag(lam, lam/4, lam/16)) beats the data-free predictor; one that outputs 0 and the
    data-free predictor itself do not (a tie is not learning). The data-free loss is checked against its closed
    form, mean over t of abar^2 d + abar (1 - abar) tr(Sigma) per row (Monte Carlo, 4 draws of 20,000 rows)."""
    from hcdiag.checks.diffusion import competence

    cov = np.diag([lam, lam / 4, lam / 16])
    tab = Tables(family("linear", 4)[2])
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.as_tensor(np.sqrt(np.diag(cov)))
    exact = competence(_Eps(gaussian_eps(np.zeros(3), cov, tab)), tab, 0, rows, seed=seed)
    a = tab.abar[1:].numpy()
    closed = float(np.mean(a ** 2 * 3 + a * (1 - a) * np.trace(cov)))
    assert exact["data_free_loss"] == pytest.approx(closed, rel=0.03)
    assert exact["learned"] and exact["model_loss"] < 0.97 * exact["data_free_loss"]
    zero = competence(_Eps(lambda xt, t: torch.zeros_like(xt)), tab, 0, rows, seed=seed)
    assert not zero["learned"] and zero["model_loss"] == pytest.approx(3.0, rel=0.03)  # E||eps||^2 = d
    free = competence(_Eps(lambda xt, t: (1 - tab.abar[t])[:, None].sqrt() * xt), tab, 0, rows, seed=seed)
    assert not free["learned"] and free["model_loss"] == pytest.approx(free["data_free_loss"], rel=1e-5)


def test_checks_read_nothing_from_a_denoiser_that_has_not_learned(seed, one_thread):
    """A run trained for a few steps with hidden widths below the data dimension (the paper preset's 128 against
    Fashion-MNIST's 196 did this) loses to the data-free predictor: D1, D2, D4 say so instead of a verdict."""
    from hcdiag.checks.diffusion import run_diffusion_checks
    from hcdiag.data import synthetic
    from hcdiag.diffusion.data import prepare
    from hcdiag.diffusion.runfile import run_dict, validate
    from hcdiag.diffusion.train import DiffusionConfig, train_diffusion

    data = prepare(synthetic(n=1200, dim=16, k=4, seed=seed % 1000))
    out = train_diffusion(data.x, DiffusionConfig(method="single", R=4, T=100, epochs_per_round=1, widths=(2,),
                                                  seed=seed % 1000))
    run = validate(run_dict(out, data))
    res = {r.id: r for r in run_diffusion_checks(run, select=["D1", "D2", "D4"], n_samples=60, seed=seed)}
    for i in ("D1", "D2", "D4"):
        assert res[i].verdict == "inconclusive" and "has not learned the data" in res[i].reason, i
        c = res[i].values["competence"]
        assert c["model_loss"] >= c["data_free_loss"]
