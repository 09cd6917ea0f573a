# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Section 7 measured: the critical timestep of trained diffusion models on a 2-D mixture and on digits
#
# **The claims (section 7.2 and 7.4).** For the forward process `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`
# the paper puts a critical timestep where the noise variance reaches the data's top eigenvalue,
# `1 - abar_{t_c} = lambda_max` (eq. 13), and predicts that beyond it "the reverse process becomes independent of
# x_t" (7.4 (1)) and that lambda_max determines t_c (7.4 (2)).
#
# **What we measure.** "Independent of x_t" is a statement about the denoiser's posterior mean `E[x_0 | x_t]`
# (Tweedie, from eps-hat). We measure its normalized gain along the top covariance direction v,
# `G(t) = sqrt(abar_t) v^T dE[x_0|x_t]/dx_t v = 1 - sqrt(1 - abar_t) v^T (d eps_hat/dx_t) v` (one backward pass;
# `hcdiag.diffusion.critical`), which is 1 while x_t determines x_0 and 0 once x_t says nothing. For Gaussian
# data of variance lambda along v it is exactly `SNR lambda / (1 + SNR lambda)`: it crosses 1/2 where
# `SNR(t) lambda_max = 1` (abar = 1 / (1 + lambda_max)), not where eq. 13 says; eq. 13 has no solution at all
# for lambda_max >= 1, since `1 - abar < 1`. The checks D1 and D2 (`hcdiag check-diffusion`) decide both.
#
# **This is a reduced demo** (about two minutes on a CPU): small denoisers (Algorithm 2 with R = 4 schedules of the
# DDPM linear family, 2,000 steps on the mixture, 8,000 on digits), one seed. `hcdiag verify --groups diffusion` runs the grid with the
# controls (D3, D4).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hcdiag import plots  # noqa: E402
from hcdiag.checks.diffusion import run_diffusion_checks, snr_timestep, eq13_timestep  # noqa: E402
from hcdiag.data import digits, synthetic  # noqa: E402
from hcdiag.diffusion.data import prepare  # noqa: E402
from hcdiag.diffusion.runfile import run_dict, validate  # noqa: E402
from hcdiag.diffusion.schedules import Schedule  # noqa: E402
from hcdiag.diffusion.train import DiffusionConfig, train_diffusion  # noqa: E402

torch.set_num_threads(1)  # small models: one thread is fastest on a shared CPU
for lam in (0.1, 1.0, 10.0):
    s = Schedule("linear")
    t13 = eq13_timestep(s, lam)
    print(f"lambda_max {lam:>5}: eq. 13 t_c = {'none' if t13 is None else f'{t13:.0f}'}, "
          f"SNR lambda_max = 1 at t = {snr_timestep(s, lam):.0f} (DDPM linear, T = 1000)")

# %% [markdown]
# ## A 2-D mixture of 8 Gaussians
#
# Eight components (std 0.2) whose means are drawn with spread 2, centred; lambda_max is that of the mixture.
# The denoiser is trained by Algorithm 2 and checked as the command line does (D1, D2 on held-out rows).

# %%
def train_and_check(ds, lam=None, steps_per_schedule=500):
    data = prepare(ds, lambda_max=lam)
    cfg = DiffusionConfig(method="consensus", R=4, epochs_per_round=steps_per_schedule, seed=0)
    out = train_diffusion(data.x, cfg)
    run = validate(run_dict(out, data))
    return data, run, {r.id: r for r in run_diffusion_checks(run, select=["D1", "D2"])}


mix_data, mix_run, mix = train_and_check(synthetic(n=3000, dim=2, k=8, spread=0.2, separation=2.0, seed=0))
for r in mix.values():
    print(r.id, r.verdict, "-", r.summary or r.reason)

# %%
fig, axs = plt.subplots(1, 2, figsize=(11, 4))
x = mix_data.x
axs[0].scatter(x[:1500, 0], x[:1500, 1], s=2, color="k")
axs[0].set_title("the 2-D mixture (centred)")
plots.diffusion_gain(mix["D1"].values, mix["D2"].values, ax=axs[1])
fig.tight_layout()

# %% [markdown]
# The measured gain leaves 1 earlier than the Gaussian closed form with lambda_max: within a component the data
# vary by 0.2^2 only, so at low noise E[x_0|x_t] follows the component's own (small) variance and x_t stops
# mattering *within* a component long before it stops mattering *between* components. A mixture has no single
# critical timestep set by lambda_max; where the gain crosses 1/2 depends on its structure, and D2 says whether
# that crossing still lands within a factor 2 in SNR of `SNR lambda_max = 1` (printed above).
#
# ## Digits (8x8, 64 dimensions), rescaled to lambda_max = 0.7 and 10
#
# Rescaling the data moves the critical timestep (D2 across the rescaling). At 0.7 eq. 13 and the SNR criterion
# part (their log SNRs differ by |log(1 - lambda_max)|, more than a factor 2 from lambda_max 0.5 on); at 10 eq. 13
# has no solution, the SNR criterion does.

# %%
ds = digits()
curves = {}
for lam in (0.7, 10.0):
    _, run, res = train_and_check(ds, lam=lam, steps_per_schedule=2000)
    curves[lam] = res["D1"].values
    print(f"lambda_max {lam:g}: D1 {res['D1'].verdict}, D2 {res['D2'].verdict}: {res['D2'].summary or res['D2'].reason}")
fig = plots.diffusion_rescaling(curves, title="digits")

# %% [markdown]
# **Reading.** D1 (a transition from dependence to independence on x_t) is forced by the forward process (the
# terminal SNR of the DDPM schedule is 4e-5), but measuring it needs a denoiser accurate at high noise: when we
# trained the digits denoiser (lambda_max 1) for 2,000 steps instead of 8,000, it kept a gain of 0.28 at t = 1000
# where the truth is 0, and D1 said inconclusive ("transition incomplete") rather than holds. What sets t_c's place is the
# question: on Gaussian data `SNR(t) lambda_max = 1` exactly; on real data the crossing follows the
# data's structure, and eq. 13 (noise variance = lambda_max) is not the criterion whenever lambda_max >= 1, the
# usual case for images scaled to [-1, 1] (digits: lambda_max 0.70 with pixels in [0, 1], 2.8 in
# [-1, 1]). `hcdiag check-diffusion RUN` gives the same verdicts with exit codes for CI.
