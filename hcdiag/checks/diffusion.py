"""Checks D1-D4: the four predictions of section 7.4 on a trained diffusion model (issue 14).

Every number is recomputed from the run file's denoiser and rows (``data.x``); the held-out rows are the run's
validation rows, which training never stepped on. The *home schedule* of a run is the one it would be sampled
with: for Algorithm 2 (``consensus``) the kept schedule with the smallest last-round validation loss, for the
controls (``single``, ``logsnr``) the family's middle one (index R // 2), on which ``single`` trained.

Before any of them: a denoiser that does not beat the *data-free* predictor ``eps_hat = sqrt(1 - abar) x_t`` on
held-out rows (:func:`competence`) has learned nothing of the data, and its reverse process is no evidence: D1, D2
and D4 are inconclusive for it, and so is D3 when a control has not learned (a run of Algorithm 2 that learned
nothing where its controls did is a result, and D3 decides it).

* **D1 critical timestep exists** ("for t > t_c the reverse process becomes independent of x_t"). The normalized
  gain ``G(t)`` of E[x_0 | x_t] along the top covariance direction (:mod:`hcdiag.diffusion.critical`) on a
  geometric grid of timesteps, on held-out rows under the home schedule. Holds when it starts dependent
  (``G(t_1) >= 0.75``), ends independent (``G(T) <= 0.25``) and crosses 1/2 in between; fails when it never falls
  below 1/2 (x_t matters up to T: no critical timestep in this schedule) or never rises above it (x_t matters at
  no t); inconclusive for a partial run, for standard errors above 0.1, or a gain that stops between 0.25 and 0.5.
  The Gaussian closed form ``SNR lambda_max / (1 + SNR lambda_max)`` is reported beside it (exact for Gaussian
  data; for other data the linear approximation).
* **D2 t_c is set by lambda_max**: the measured crossing against eq. 13 (``1 - abar = lambda_max``, no solution
  for lambda_max >= 1) and ``SNR(t) lambda_max = 1``, compared in log SNR: a criterion is *followed* when it is
  within ``log 2`` of the measurement (a factor 2 in SNR). Holds when one of them is followed (``follows`` says
  which), fails when neither is, inconclusive without a crossing. Across a rescaling grid (``hcdiag verify``) the
  slope of log SNR(t_c) against log lambda_max tells whether lambda_max sets it.
* **D3 historical barrier** ("prevents schedule-independent collapse, improving sample diversity"). Diversity is
  the energy distance of samples (ancestral DDPM, home schedule) to the held-out rows, beside a noise floor
  (:mod:`hcdiag.diffusion.quality`), compared with the control runs by a paired bootstrap (same held-out rows):
  holds when the run is significantly closer than every control (interval of ``ED(run) - ED(control)`` below 0),
  fails when a control is significantly closer or every difference lies within the noise floor (no improvement
  a sample of the data itself would notice), inconclusive otherwise or without controls. Where the data's true
  mixture is known, mode coverage and the exact log-likelihood of the samples are reported, and so is the same
  comparison with every model sampled under the family's middle schedule (like with like: the home schedules
  differ, and Algorithm 2's is chosen by its selection rule). The *schedule
  dependence* (how much eps-hat changes when only the schedule index changes, at matched noise level) is reported
  with a caution the paper lacks: the Bayes-optimal denoiser depends on the noise level only, so its schedule
  dependence is 0 (the ``logsnr`` control is 0 by construction); low dependence is not a collapse. So is the
  selection confound of Algorithm 2 (its rule keeps the schedules whose losses are smallest for any model: the
  noisiest; :mod:`hcdiag.diffusion.train`).
* **D4 inference flexibility** ("can be sampled with different schedules at test time without degradation"):
  samples under schedules the run never trained on (the default of its own kind and of every other kind), the
  denoiser queried at the home timestep of the nearest log SNR (a ``logsnr`` model reads the noise level
  itself), compared with the home samples by a paired bootstrap: holds when no unseen schedule's energy distance
  exceeds the home one by more than the noise floor (upper end of the interval), fails when one does
  significantly (lower end above the floor), inconclusive otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hcdiag.checks.base import CheckResult, inconclusive
from hcdiag.diffusion.critical import crossing, crossing_log_snr, gaussian_gain, normalized_gain
from hcdiag.diffusion.model import Denoiser, Tables, model_eps, sample
from hcdiag.diffusion.schedules import KINDS, Schedule
from hcdiag.errors import InputError

GAIN_HIGH, GAIN_LOW, GAIN_SE_MAX = 0.75, 0.25, 0.1
LOG_SNR_TOL = math.log(2.0)
MIN_HELDOUT = 50
CLAIMS = {
    "D1": ("There exists a timestep t_c such that for t > t_c the reverse process becomes independent of x_t",
           "7.4 (1)"),
    "D2": ("t_c is determined by lambda_max of the data covariance (eq. 13, 1 - alphabar = lambda_max, or SNR "
           "lambda_max = 1: 'follows' says which)", "7.2, 7.4 (2)"),
    "D3": ("Training with multiple noise schedules prevents schedule-independent collapse, improving sample diversity",
           "7.3, 7.4 (3)"),
    "D4": ("Models trained with historical consensus can be sampled with different schedules at test time without "
           "degradation", "7.4 (4)"),
}
IDS = tuple(CLAIMS)


def _result(id: str, verdict: str, summary: str, values: dict, reason: str | None = None) -> CheckResult:
    claim, section = CLAIMS[id]
    return CheckResult(id, claim, section, verdict, values=values, reason=reason, summary=summary)


def _inconclusive(id: str, reason: str, **values) -> CheckResult:
    claim, section = CLAIMS[id]
    return inconclusive(id, claim, section, reason, **values)


# --------------------------------------------------------------------------------------------------------------
# schedules: where criteria put t_c, in fractional timesteps and log SNR

def timestep_grid(T: int, n: int = 40) -> np.ndarray:
    """About ``n`` timesteps from 1 to T, geometric (the transition spans decades of t)."""
    return np.unique(np.round(np.geomspace(1, T, n)).astype(int))


def log_snr_at(schedule: Schedule, t: float) -> float:
    return float(np.interp(t, np.arange(1, schedule.T + 1), schedule.log_snr()))


def snr_timestep(schedule: Schedule, lam: float) -> float | None:
    """Fractional t with ``SNR(t) lam = 1`` (log SNR interpolated), None outside 1..T."""
    return t_at_log_snr(schedule, -math.log(lam))


def t_at_log_snr(schedule: Schedule, ls: float) -> float | None:
    """Fractional t at which the schedule's log SNR (decreasing) falls to ``ls``, interpolated; None outside."""
    d = schedule.log_snr() - ls
    if d[0] < 0 or d[-1] > 0:
        return None
    i = int(np.argmax(d <= 0))
    return 1.0 if i == 0 else float(i + d[i - 1] / (d[i - 1] - d[i]))


def eq13_timestep(schedule: Schedule, lam: float) -> float | None:
    """Fractional t with ``1 - abar_t = lam`` (eq. 13; interpolated), None when lam is outside the schedule's noise
    range (always for lam >= 1)."""
    g = 1.0 - schedule.alphabar()
    if not g[0] <= lam <= g[-1]:
        return None
    i = int(np.argmax(g >= lam))
    return 1.0 if i == 0 else float(i + (lam - g[i - 1]) / (g[i] - g[i - 1]))


def home_index(run) -> int:
    """The home schedule (module docstring). For Algorithm 2 the last round's validation losses are recomputed from
    the denoiser and the selection rows (never read from the file: they are its final model's, so they recompute
    exactly on one device) and must match the file's, which must have kept the smaller half of them."""
    from hcdiag.diffusion.train import validation_loss

    cfg = run.config
    if cfg.method != "consensus" or not run.rounds:
        return cfg.R // 2
    last = run.rounds[-1]
    active = [int(a) for a in last["active"]]
    xv = run.x[run.val_rows].float()
    got = {r: validation_loss(run.model, xv, Tables(run.schedules[r]), r, draws=cfg.val_draws, seed=cfg.seed + 2)
           for r in active}
    stored = [float(v) for v in last["val_loss"]]
    if any(not math.isclose(got[r], v, rel_tol=1e-4, abs_tol=1e-7) for r, v in zip(active, stored)):
        raise InputError(f"the run file's last-round validation losses {[round(v, 6) for v in stored]} are not what its "
                         f"denoiser gives on its selection rows {[round(got[r], 6) for r in active]}; the record "
                         "cannot be trusted: fix the producer.")
    kept = sorted(int(k) for k in last["kept"])
    if kept != sorted(sorted(active, key=lambda r: (got[r], r))[:len(active) // 2]):
        raise InputError("the run file's last round did not keep the half of its schedules with the smallest "
                         "(recomputed) validation losses, as Algorithm 2 does; fix the producer.")
    return min(kept, key=lambda r: (got[r], r))


def matched_eps(model: Denoiser, home: Tables, r: int, target: Tables):
    """eps-hat under a schedule ``target`` the model may not have trained on: at each t the denoiser reads the
    home timestep whose log SNR is nearest (a ``logsnr`` model reads target's noise level itself)."""
    if model.conditioning == "logsnr" or target.schedule == home.schedule:
        return model_eps(model, target, r) if model.conditioning == "logsnr" else model_eps(model, home, r)
    hl = home.log_snr[1:].cpu().numpy()
    tl = target.log_snr.cpu().numpy()
    order = np.argsort(hl)
    pos = np.clip(np.searchsorted(hl[order], tl), 1, len(hl) - 1)
    lo, hi = order[pos - 1], order[pos]
    nearest = np.where(np.abs(hl[lo] - tl) <= np.abs(hl[hi] - tl), lo, hi) + 1
    mapping = torch.as_tensor(nearest, dtype=torch.long)

    def eps(x, t):
        tt = mapping[t.cpu()].to(t.device)
        rr = torch.full_like(tt, int(r)) if model.conditioning == "schedule" else None
        return model(x.float(), tt, home.log_snr[tt].float(), rr).to(x.dtype)
    return eps


# --------------------------------------------------------------------------------------------------------------
# D1, D2 kernels

def decide_critical(ts, gain, se, *, complete: bool = True, lam: float | None = None,
                    schedule: Schedule | None = None) -> CheckResult:
    """D1 from a measured gain curve (module docstring)."""
    ts, gain, se = np.asarray(ts), np.asarray(gain, dtype=float), np.asarray(se, dtype=float)
    if schedule is not None:  # placed in log SNR (crossing_log_snr), then read as a fractional timestep
        ls_c = crossing_log_snr(ts, gain, schedule.log_snr()[ts - 1])
        t_meas = t_at_log_snr(schedule, ls_c) if ls_c is not None else None
    else:
        ls_c, t_meas = None, crossing(ts, gain, 0.5)
    values = {"timesteps": ts.tolist(), "gain": gain.tolist(), "se": se.tolist(), "t_measured": t_meas,
              "log_snr_measured": ls_c, "gain_first": float(gain[0]), "gain_last": float(gain[-1])}
    if lam is not None and schedule is not None:
        closed = gaussian_gain(lam, Tables(schedule), ts)
        values.update(gaussian_gain=closed.tolist(), max_gap_to_gaussian=float(np.max(np.abs(gain - closed))),
                      t_gaussian=crossing(ts, closed, 0.5), lambda_max=lam, schedule=schedule.spec)
    if not complete:
        return _inconclusive("D1", "the run is partial (training unfinished): resume it to the end before judging "
                             "what it learned", **values)
    if not np.isfinite(gain).all():
        return _inconclusive("D1", "the measured gain is not finite at some timestep", **values)
    if float(np.max(se)) > GAIN_SE_MAX:
        return _inconclusive("D1", f"the gain's standard error reaches {np.max(se):.3g} > {GAIN_SE_MAX}: too few "
                             "held-out rows to place the transition", **values)
    where = f"G(t={int(ts[0])}) = {gain[0]:.3f}, G(t={int(ts[-1])}) = {gain[-1]:.3f}"
    if gain[-1] - 2 * se[-1] > 0.5:  # beyond two standard errors, not a point estimate
        return _result("D1", "fails", f"E[x0|xt] still depends on x_t at t = T ({where}): no critical timestep in "
                       "this schedule", values)
    if gain[0] + 2 * se[0] < 0.5:
        return _result("D1", "fails", f"E[x0|xt] ignores x_t already at the first timestep ({where}): nothing "
                       "becomes independent", values)
    if gain[0] >= GAIN_HIGH and gain[-1] <= GAIN_LOW and t_meas is not None:
        return _result("D1", "holds", f"the gain falls from {gain[0]:.3f} to {gain[-1]:.3f}, crossing 1/2 at t = "
                       f"{t_meas:.1f}", values)
    at = "never crosses 1/2" if t_meas is None else f"crosses 1/2 at t = {t_meas:.1f}"
    return _inconclusive("D1", f"the gain {at} but the transition is incomplete or within two standard errors of "
                         f"1/2 ({where}; needs >= {GAIN_HIGH} and <= {GAIN_LOW})", **values)


def decide_spectral(t_meas: float | None, schedule: Schedule, lam: float, *, complete: bool = True,
                    log_snr_measured: float | None = None) -> CheckResult:
    """D2 from the measured crossing (module docstring); ``log_snr_measured`` (D1's) places it, else ``t_meas``."""
    if not (math.isfinite(lam) and lam > 0):
        return _inconclusive("D2", f"lambda_max = {lam:.3g}: the data have no variance to set a timestep",
                             lambda_max=lam, schedule=schedule.spec)
    t_snr, t_13 = snr_timestep(schedule, lam), eq13_timestep(schedule, lam)
    values = {"lambda_max": lam, "schedule": schedule.spec, "t_measured": t_meas, "t_snr": t_snr, "t_eq13": t_13,
              "vae_s2_threshold": lam, "log_snr_tol": LOG_SNR_TOL}
    if lam >= 1:
        values["eq13_note"] = f"lambda_max = {lam:.4g} >= 1: eq. 13 has no solution (1 - alphabar < 1)"
    if not complete:
        return _inconclusive("D2", "the run is partial (training unfinished)", **values)
    if t_meas is None:
        return _inconclusive("D2", "no measured crossing (D1) to compare with the criteria", **values)
    lm = log_snr_measured if log_snr_measured is not None else log_snr_at(schedule, t_meas)
    d_snr = abs(lm + math.log(lam))
    d_13 = abs(lm - log_snr_at(schedule, t_13)) if t_13 is not None else None
    follows = [name for name, d in (("snr", d_snr), ("eq13", d_13)) if d is not None and d <= LOG_SNR_TOL]
    values.update(log_snr_measured=lm, gap_snr=d_snr, gap_eq13=d_13, follows=follows)
    e13 = "none" if t_13 is None else f"{t_13:.1f}"
    text = f"measured t_c {t_meas:.1f}, SNR lambda_max = 1 at {'none' if t_snr is None else f'{t_snr:.1f}'}, eq. 13 at {e13}"
    if follows:
        return _result("D2", "holds", f"{text}: follows {' and '.join(follows)}", values)
    return _result("D2", "fails", f"{text}: neither criterion within a factor 2 in SNR", values)


# --------------------------------------------------------------------------------------------------------------
# D3, D4 kernels

def decide_diversity(diffs: dict, floor: float, *, complete: bool = True, extra: dict | None = None) -> CheckResult:
    """D3 from paired bootstrap differences ``{control: {"diff", "diff_ci"}}`` (ED(run) - ED(control)) and the
    noise floor."""
    values = {"versus": diffs, "floor": floor, **(extra or {})}
    if not complete:
        return _inconclusive("D3", "the run is partial (training unfinished)", **values)
    if values.get("diverged"):
        return _result("D3", "fails", f"the run's own samples diverge ({values['diverged']})", values)
    if not diffs:
        return _inconclusive("D3", "needs the control runs of the same data to compare with (single, logsnr): "
                             "diversity is only 'improved' against something", **values)
    worse = [k for k, d in diffs.items() if d["diff_ci"][0] > 0]
    better = [k for k, d in diffs.items() if d["diff_ci"][1] < -floor]
    if worse:
        return _result("D3", "fails", f"a control's samples are significantly closer to held-out data: "
                       f"{', '.join(worse)}", values)
    if len(better) == len(diffs):
        return _result("D3", "holds", f"samples closer to held-out data than every control by more than the noise "
                       f"floor ({floor:.3g}; {', '.join(better)})", values)
    if all(-floor <= d["diff_ci"][0] and d["diff_ci"][1] <= floor for d in diffs.values()):
        return _result("D3", "fails", f"no improvement beyond the noise floor ({floor:.3g}) over "
                       f"{', '.join(diffs)}", values)
    return _inconclusive("D3", "the differences to the controls are within their bootstrap intervals; draw more "
                         "samples or held-out rows", **values)


def decide_flexibility(diffs: dict, floor: float, *, complete: bool = True, extra: dict | None = None) -> CheckResult:
    """D4 from paired differences ``{schedule: {"diff", "diff_ci"}}`` (ED(unseen) - ED(home)) and the floor."""
    values = {"unseen": diffs, "floor": floor, **(extra or {})}
    if not complete:
        return _inconclusive("D4", "the run is partial (training unfinished)", **values)
    if not diffs:
        return _inconclusive("D4", "no schedule outside the training family to sample with", **values)
    bad = [k for k, d in diffs.items() if d["diff_ci"][0] > floor]
    if bad:
        return _result("D4", "fails", f"degraded beyond the noise floor ({floor:.3g}) under {', '.join(bad)}", values)
    if all(d["diff_ci"][1] <= floor for d in diffs.values()):
        return _result("D4", "holds", f"no unseen schedule degrades the samples beyond the noise floor "
                       f"({floor:.3g})", values)
    return _inconclusive("D4", "some degradation's bootstrap interval straddles the noise floor; draw more samples",
                         **values)


def schedule_dependence(model: Denoiser, tabs: list, x0: torch.Tensor, *, levels: int = 8,
                        generator: torch.Generator | None = None) -> float | None:
    """How much eps-hat changes when only the schedule changes at matched noise level:
    ``mean_{levels, r<r'} ||eps_r - eps_r'||^2 / mean_{levels, r} ||eps_r||^2`` with ``eps_r = eps-hat(x, t_r, r)``,
    ``t_r`` the timestep of schedule r nearest in log SNR to the level and x one draw at the level (a ``logsnr``
    model reads the level itself, so its dependence is 0 exactly). None for a model without a schedule input
    (``timestep``)."""
    if model.conditioning == "timestep":
        return None
    x0 = torch.as_tensor(x0, dtype=torch.float32)
    lo = max(float(t.log_snr[t.T]) for t in tabs)
    hi = min(float(t.log_snr[1]) for t in tabs)
    num = den = 0.0
    with torch.no_grad():
        for lv in np.linspace(hi, lo, levels + 2)[1:-1]:
            a = 1.0 / (1.0 + math.exp(-lv))
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=generator)
            outs = []
            for r, tab in enumerate(tabs):
                t = int(torch.argmin((tab.log_snr[1:] - lv).abs())) + 1
                tt = torch.full((x.shape[0],), t, dtype=torch.long)
                rr = torch.full_like(tt, r) if model.conditioning == "schedule" else None
                ls = torch.full((x.shape[0],), float(lv)) if model.conditioning == "logsnr" else tab.log_snr[tt].float()
                outs.append(model(x, tt, ls, rr).double())
            for i in range(len(outs)):
                den += float((outs[i] ** 2).sum(1).mean())
                for j in range(i + 1, len(outs)):
                    num += float(((outs[i] - outs[j]) ** 2).sum(1).mean())
    pairs = len(tabs) * (len(tabs) - 1) / 2
    return (num / pairs) / (den / len(tabs)) if den > 0 else None


def selection_confound(run) -> dict | None:
    """Whether Algorithm 2 kept the noisiest schedules (smallest mean alphabar: the smallest losses for any model,
    :mod:`hcdiag.diffusion.train`), per round."""
    if run.config.method != "consensus" or not run.rounds:
        return None
    mean_abar = [float(s.alphabar().mean()) for s in run.schedules]
    rounds = []
    for r in run.rounds:
        active = [int(a) for a in r["active"]]
        kept = sorted(int(k) for k in r["kept"])
        noisiest = sorted(sorted(active, key=lambda i: mean_abar[i])[:len(kept)])
        rounds.append({"kept": kept, "noisiest": noisiest, "kept_noisiest": kept == noisiest})
    return {"mean_alphabar": mean_abar, "rounds": rounds, "all_kept_noisiest": all(r["kept_noisiest"] for r in rounds)}


# --------------------------------------------------------------------------------------------------------------
# the run

def unseen_schedules(run) -> list[Schedule]:
    """The default of the run's own kind and of every other kind, at its T, minus any it trained on."""
    trained = {s for s in run.schedules}
    out = [Schedule(run.config.kind, run.config.T)] + [Schedule(k, run.config.T) for k in KINDS if k != run.config.kind]
    return [s for s in out if s not in trained]


class DiffusionContext:
    """The rows, lambda_max, top direction, home schedule and samples of one run, computed once."""

    def __init__(self, run, *, seed: int = 0, n_samples: int | None = None, progress=None, sampler: str = "ddpm",
                 ddim_steps: int | None = None):

        if sampler not in ("ddpm", "ddim"):
            raise InputError(f"The sampler must be ddpm or ddim. Got {sampler!r}.")
        self.run, self.seed, self.progress = run, int(seed), progress
        self.sampler, self.ddim_steps = sampler, ddim_steps
        x = run.x.double()
        self.x = x
        xc = x - x.mean(0)
        cov = xc.T @ xc / x.shape[0]
        evals, evecs = torch.linalg.eigh(cov)
        self.lam, self.v = float(evals[-1]), evecs[:, -1]
        self.heldout = x[run.test_rows]  # held out from training and from Algorithm 2's selection alike
        self.train = x[run.train_rows]
        m = self.heldout.shape[0] if n_samples is None else min(int(n_samples), self.heldout.shape[0])
        self.n = min(m, self.train.shape[0])
        g = np.random.default_rng(self.seed)
        self.heldout_n = self.heldout[np.sort(g.choice(self.heldout.shape[0], self.n, replace=False))]
        self.train_n = self.train[np.sort(g.choice(self.train.shape[0], self.n, replace=False))]
        self.r = home_index(run)
        self.home = Tables(run.schedules[self.r])
        self._truth = None  # regenerated on first use (D3, D4 with a known mixture), never read from the file
        self._samples: dict = {}
        self._floor = None

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    def samples(self, schedule: Schedule | None = None) -> np.ndarray:
        key = None if schedule is None else schedule.spec
        if key not in self._samples:
            tab = self.home if schedule is None else Tables(schedule)
            self.say(f"sampling {self.n} rows under {tab.schedule.spec}")
            eps = matched_eps(self.run.model, self.home, self.r, tab)
            g = torch.Generator().manual_seed(self.seed + 17)
            self._samples[key] = self._draw(eps, tab, g)
        return self._samples[key]

    def _draw(self, eps, tab: Tables, g: torch.Generator) -> np.ndarray:
        steps = min(self.ddim_steps, tab.T) if self.sampler == "ddim" and self.ddim_steps else None
        return sample(eps, tab, self.n, self.x.shape[1], method=self.sampler, steps=steps, generator=g).numpy()

    def samples_trained(self, i: int) -> np.ndarray:
        """Samples under the run's training schedule ``i``, the denoiser told that schedule (its index for a
        ``schedule`` model; a ``timestep`` model trained on another one reads the nearest log SNR of its own)."""
        key = ("trained", int(i))
        if key not in self._samples:
            tab = Tables(self.run.schedules[i])
            model = self.run.model
            eps = matched_eps(model, self.home, self.r, tab) if model.conditioning == "timestep" else model_eps(
                model, tab, i)
            self.say(f"sampling {self.n} rows under {tab.schedule.spec} (training schedule {i})")
            g = torch.Generator().manual_seed(self.seed + 17)
            self._samples[key] = self._draw(eps, tab, g)
        return self._samples[key]

    def home_diverged(self) -> str | None:
        """Why the home samples count as diverged (:func:`diverged`), else None."""
        return diverged(self.samples(), self.x)

    def floor(self) -> dict:
        if self._floor is None:
            from hcdiag.diffusion.quality import energy_test

            self._floor = energy_test(self.samples(), self.heldout_n.numpy(), self.train_n.numpy(), seed=self.seed)
        return self._floor

    def quality(self, s: np.ndarray) -> dict:
        if self._truth is None:
            from hcdiag.diffusion.data import truth

            self._truth = truth(self.x.float().numpy(), self.run.spec)
        t, why = self._truth
        if t is None:
            return {"truth": None, "why": why}
        from hcdiag.diffusion.quality import gmm_loglik, mode_coverage

        cov = mode_coverage(s, t["means"], t["spread"])
        ll = gmm_loglik(s, t["means"], t["spread"], t["weights"])
        ll_data = gmm_loglik(self.heldout_n.numpy(), t["means"], t["spread"], t["weights"])
        return {"covered": cov["covered"], "K": cov["K"], "high_quality": cov["high_quality"],
                "kl_modes": cov["kl_modes"], "loglik": float(ll.mean()), "loglik_heldout": float(ll_data.mean())}


def _check_control(run, ctl, name: str) -> None:
    """A control of D3: a complete ``single`` or ``logsnr`` run of the same rows and every setting but the method
    (so the same step budget, model, schedule family and split)."""
    if ctl.config.method not in ("single", "logsnr"):
        raise InputError(f"the control {name} is a {ctl.config.method} run; D3's controls are single and logsnr runs.")
    if not ctl.complete:
        raise InputError(f"the control {name} is partial ({ctl.steps} of {ctl.budget} steps); finish it first.")
    if ctl.x.shape != run.x.shape or not torch.equal(ctl.x, run.x):
        raise InputError(f"the control {name} trained on other data; compare runs of the same data and seed (like "
                         "with like).")
    a, b = ({k: v for k, v in c.config.to_dict().items() if k not in ("method", "device", "extra")}
            for c in (run, ctl))
    diff = sorted(k for k in a if a[k] != b[k])
    if diff:
        raise InputError(f"the control {name} differs from the run in {', '.join(diff)}; controls must share every "
                         "setting but the method (the same steps, model, schedules and rows).")


DIVERGE_FACTOR = 1e3


def diverged(s: np.ndarray, x: torch.Tensor) -> str | None:
    """Why samples ``s`` count as diverged (non-finite rows, or values beyond ``DIVERGE_FACTOR`` times the data's
    largest absolute value), else None: a measurement (the sampler blew up), not bad input."""
    bad = int((~np.isfinite(s)).any(1).sum())
    if bad:
        return f"{bad} of {len(s)} sample rows non-finite"
    limit = DIVERGE_FACTOR * (float(x.abs().max()) + 1.0)
    big = int((np.abs(s) > limit).any(1).sum())
    return f"{big} of {len(s)} sample rows beyond {limit:.3g}" if big else None


LEARNED_MARGIN = 0.01  # a denoiser has learned the data when its held-out loss is 1% or more below the data-free one


@torch.no_grad()
def competence(model: Denoiser, tab: Tables, r: int, rows: torch.Tensor, *, draws: int = 4, seed: int = 0) -> dict:
    """Whether ``model`` has learned anything of the data: its mean ``||eps - eps_hat||^2`` on held-out ``rows``
    under schedule ``tab`` (index ``r``) against the *data-free* predictor's on the same (t, eps) draws,
    ``eps_hat = sqrt(1 - abar_t) x_t``: the Bayes-optimal denoiser of data that are all at their mean, 0 (the run's
    rows are centred), which knows nothing of them; it must be beaten by ``LEARNED_MARGIN`` (float rounding makes
    a tie go either way). Any denoiser that learned the data's spread beats it (on digits the
    paper preset's does by 2x); one that does not has learned nothing its reverse process could show, and the
    checks say so instead of reading its output as evidence (a denoiser whose hidden widths are below the data
    dimension cannot even pass x_t through, and loses to it)."""
    dev = next(model.parameters()).device
    x0 = rows.float().to(dev)  # the run's rows are centred (hcdiag.diffusion.data.prepare): the data's mean is 0
    g = torch.Generator().manual_seed(seed)
    m = f = 0.0
    for _ in range(draws):
        t = torch.randint(1, tab.T + 1, (x0.shape[0],), generator=g).to(dev)
        eps = torch.randn(x0.shape, generator=g).to(dev)
        a = tab.abar.to(dev)[t].float()[:, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        rr = torch.full_like(t, r) if model.conditioning == "schedule" else None
        pred = model(xt, t, tab.log_snr.to(dev)[t].float(), rr)
        m += float(((pred - eps) ** 2).sum(1).mean())
        f += float((((1 - a).sqrt() * xt - eps) ** 2).sum(1).mean())
    m, f = m / draws, f / draws
    return {"model_loss": m, "data_free_loss": f, "learned": bool(m < (1 - LEARNED_MARGIN) * f), "rows": int(x0.shape[0]),
            "schedule": tab.schedule.spec}


def _not_learned(comp: dict, who: str = "the denoiser") -> str:
    return (f"{who} has not learned the data: its held-out loss {comp['model_loss']:.4g} per row is not 1% below the "
            f"data-free predictor's {comp['data_free_loss']:.4g} (eps_hat = sqrt(1 - abar) x_t, which knows nothing "
            "of the data), so its reverse process is no evidence for or against the claim (train longer, or give the "
            "denoiser hidden widths at least the data dimension)")


def run_diffusion_checks(run, *, select=None, controls: dict | None = None, seed: int = 0,
                         n_samples: int | None = None, progress=None, sampler: str = "ddpm",
                         ddim_steps: int | None = None,
                         context: "DiffusionContext | None" = None) -> list[CheckResult]:
    """D1-D4 (``select``: a subset of :data:`IDS`) on a loaded :class:`~hcdiag.diffusion.runfile.DiffusionRun`;
    ``controls`` ``{name: DiffusionRun}`` for D3 (same data, rows and family). ``context``: the run's
    :class:`DiffusionContext` when the caller wants its samples afterwards (a report's figures)."""
    ids = list(IDS) if select is None else list(select)
    bad = [i for i in ids if i not in IDS]
    if bad:
        raise InputError(f"unknown diffusion check id(s) {', '.join(bad)}; choose among {', '.join(IDS)}.")
    controls = dict(controls or {})
    for name, ctl in controls.items():
        _check_control(run, ctl, name)
    ctx = context if context is not None else DiffusionContext(run, seed=seed, n_samples=n_samples, progress=progress,
                                                               sampler=sampler, ddim_steps=ddim_steps)
    complete = run.complete
    out: dict[str, CheckResult] = {}
    comp = competence(run.model, ctx.home, ctx.r, ctx.heldout, seed=seed)
    if not comp["learned"]:  # its reverse process is no evidence about t_c or about schedules (D3 compares methods:
        for i in ("D1", "D2", "D4"):  # there a run that learned nothing where its controls did is a result)
            if i in ids:
                out[i] = _inconclusive(i, _not_learned(comp), competence=comp)
    if not comp["learned"] or not ("D1" in ids or "D2" in ids):
        pass
    elif not ctx.lam > 0:
        why = f"the data have no variance (lambda_max = {ctx.lam:.3g}): no direction to measure"
        out["D1"], out["D2"] = _inconclusive("D1", why), _inconclusive("D2", why)
    else:
        ctx.say("measuring the gain of E[x0|xt] along the top direction")
        ts = timestep_grid(run.config.T)
        rows = ctx.heldout[:512]
        g = torch.Generator().manual_seed(seed)
        gain, se = normalized_gain(model_eps(run.model, ctx.home, ctx.r), ctx.home, rows, ctx.v, ts, generator=g,
                                   with_se=True)
        d1 = decide_critical(ts, gain, se, complete=complete, lam=ctx.lam, schedule=ctx.home.schedule)
        d1.values["competence"] = comp
        out["D1"] = d1
        held = d1.verdict == "holds"
        out["D2"] = decide_spectral(d1.values["t_measured"] if held else None, ctx.home.schedule, ctx.lam,
                                    complete=complete, log_snr_measured=d1.values["log_snr_measured"] if held else None)
        if d1.verdict != "holds" and out["D2"].verdict == "inconclusive" and complete:
            out["D2"].reason = out["D2"].summary = f"D1 does not hold ({d1.verdict}), so there is no critical timestep to place"
    few = ctx.n < MIN_HELDOUT
    if "D3" in ids:
        from hcdiag.diffusion.quality import paired_difference

        extra = {"home_schedule": ctx.home.schedule.spec, "n_samples": ctx.n, "sampler": ctx.sampler}
        lost = {}  # controls that learned nothing: beating them is no evidence either
        if run.config.method == "consensus" and not few:
            for name, ctl in controls.items():
                cctx = DiffusionContext(ctl, seed=seed, n_samples=ctx.n)
                ccomp = competence(ctl.model, cctx.home, cctx.r, cctx.heldout, seed=seed)
                if not ccomp["learned"]:
                    lost[name] = ccomp
        if run.config.method != "consensus":
            out["D3"] = _inconclusive("D3", f"the claim is about Algorithm 2's models; this is a {run.config.method} run "
                                      "(check the consensus run against it)", **extra)
        elif few:
            out["D3"] = _inconclusive("D3", f"only {ctx.n} held-out rows (< {MIN_HELDOUT}) to judge samples by", **extra)
        elif lost:
            name = sorted(lost)[0]
            method = controls[name].config.method
            who = f"the {method} control" if name == method else f"the control {name} ({method})"
            out["D3"] = _inconclusive("D3", _not_learned(lost[name], who),
                                      **{**extra, "competence": comp, "controls_not_learned": lost})
        elif ctx.home_diverged():
            out["D3"] = decide_diversity({}, 0.0, complete=complete, extra={**extra, "diverged": ctx.home_diverged()})
        else:
            fl = ctx.floor()
            extra.update(ed=fl["ed"], excess=fl["excess"], excess_ci=fl["excess_ci"], quality=ctx.quality(ctx.samples()),
                         schedule_dependence=schedule_dependence(run.model, [Tables(s) for s in run.schedules],
                                                                 ctx.heldout[:256], generator=torch.Generator().manual_seed(seed)),
                         selection=selection_confound(run))
            diffs, side, common = {}, {}, {}
            mid = run.config.R // 2
            for name, ctl in controls.items():
                cctx = DiffusionContext(ctl, seed=seed, n_samples=ctx.n, progress=progress, sampler=ctx.sampler,
                                        ddim_steps=ctx.ddim_steps)
                cs = cctx.samples()
                why = diverged(cs, ctx.x)
                if why:  # the control's sampler blew up and the run's did not: the run is the closer one
                    diffs[name] = {"method": ctl.config.method, "diff": -math.inf, "diff_ci": [-math.inf, -math.inf],
                                   "control_diverged": why}
                    continue
                pdiff = paired_difference(ctx.samples(), cs, ctx.heldout_n.numpy(), seed=seed)
                diffs[name] = {"method": ctl.config.method, "diff": pdiff["diff"], "diff_ci": pdiff["diff_ci"],
                               "ed_run": pdiff["ed_a"], "ed_control": pdiff["ed_b"]}
                # like with like beside it (reported, not deciding): every model sampled under the family's middle
                # schedule, the one the single-schedule control trained on
                a, b = ctx.samples_trained(mid), cctx.samples_trained(mid)
                if diverged(a, ctx.x) or diverged(b, ctx.x):
                    common[name] = {"diverged": diverged(a, ctx.x) or diverged(b, ctx.x)}
                    continue
                cm = paired_difference(a, b, ctx.heldout_n.numpy(), seed=seed)
                common[name] = {"diff": cm["diff"], "diff_ci": cm["diff_ci"], "ed_run": cm["ed_a"],
                                "ed_control": cm["ed_b"]}
                side[name] = {"method": ctl.config.method, "quality": ctx.quality(cs),
                              "schedule_dependence": schedule_dependence(ctl.model, [Tables(s) for s in ctl.schedules],
                                                                         ctx.heldout[:256],
                                                                         generator=torch.Generator().manual_seed(seed))}
            extra["controls"] = side
            if common:
                extra["at_common_schedule"] = {"schedule": run.schedules[mid].spec, "versus": common}
            extra["competence"] = comp
            out["D3"] = decide_diversity(diffs, fl["floor"], complete=complete, extra=extra)
    if "D4" in ids and "D4" not in out:
        from hcdiag.diffusion.quality import paired_difference

        extra = {"home_schedule": ctx.home.schedule.spec, "method": run.config.method, "n_samples": ctx.n,
                 "sampler": ctx.sampler,
                 "query": "logsnr (the model reads the noise level)" if run.model.conditioning == "logsnr" else
                 "the home timestep of the nearest log SNR"}
        if few:
            out["D4"] = _inconclusive("D4", f"only {ctx.n} held-out rows (< {MIN_HELDOUT}) to judge samples by", **extra)
        elif ctx.home_diverged():
            out["D4"] = _inconclusive("D4", f"the samples under the home schedule diverge ({ctx.home_diverged()}): "
                                      "nothing to compare the unseen schedules with", **extra)
        else:
            fl = ctx.floor()
            diffs = {}
            for s in unseen_schedules(run):
                why = diverged(ctx.samples(s), ctx.x)
                if why:  # a blown-up sampler is the strongest degradation there is: a measurement, not bad input
                    diffs[s.spec] = {"diff": math.inf, "diff_ci": [math.inf, math.inf], "diverged": why,
                                     "terminal_snr": s.terminal_snr}
                    continue
                pdiff = paired_difference(ctx.samples(s), ctx.samples(), ctx.heldout_n.numpy(), seed=seed)
                diffs[s.spec] = {"diff": pdiff["diff"], "diff_ci": pdiff["diff_ci"], "ed_unseen": pdiff["ed_a"],
                                 "ed_home": pdiff["ed_b"], "terminal_snr": s.terminal_snr,
                                 "quality": ctx.quality(ctx.samples(s))}
            d4 = decide_flexibility(diffs, fl["floor"], complete=complete, extra=extra)
            if run.config.method != "consensus":  # measured, reported beside Algorithm 2's, deciding nothing
                d4 = _inconclusive("D4", f"the claim is about Algorithm 2's models; this {run.config.method} run "
                                   f"measures {d4.verdict}: {d4.summary or d4.reason}",
                                   **{**d4.values, "measured_verdict": d4.verdict,
                                      "measured_summary": d4.summary or d4.reason})
            out["D4"] = d4
    return [out[i] for i in IDS if i in ids and i in out]


__all__ = ["CLAIMS", "DiffusionContext", "IDS", "competence", "decide_critical", "diverged", "decide_diversity", "decide_flexibility",
           "decide_spectral", "eq13_timestep", "home_index", "log_snr_at", "matched_eps", "run_diffusion_checks",
           "schedule_dependence", "selection_confound", "snr_timestep", "t_at_log_snr", "timestep_grid",
           "unseen_schedules"]
