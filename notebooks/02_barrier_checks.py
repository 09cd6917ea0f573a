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
# # 2. The historical barrier on one run, figure by figure
#
# **The claims (paper section 4).** Historical Consensus Training shrinks a set of GMM clusterings round
# by round. Each round defines a feasible region `F_t = {Theta : max_C l_C(Theta) <= eps_t}`:
#
# * Lemma 4.3: the thresholds shrink (N1), later models stay inside earlier regions (N2: the paper's
#   Figure 2 left, "loss on discarded clusterings remains low") and no model of `F_{t+1}` lies outside
#   `F_t` (N3);
# * Theorem 4.4: the final region `F_T` excludes every collapsed model (T1-T4);
# * Corollary 4.5: stage 3 (training on one clustering) stays in `F_T` and none of its snapshots collapses
#   (KL < 0.01) (I1), paths to collapsed models inside `F_T` leave it (I2) and the distance to the
#   constructed collapsed model grows (I3: the paper's Figure 2 right).
#
# **What we do.** Train one HCT run, run every barrier check on its run file with
# `hcdiag.checks.barrier.run_checks`, and draw each figure with `hcdiag.plots`.
#
# **This is a reduced demo** (well under a minute on a CPU): 4000 synthetic samples and the smoke preset
# with fewer clusterings (R0 = 4), epochs and refinement steps and no no-history control (the `make_config`
# overrides below). Its verdicts
# describe this small run only; `hcdiag verify` and `verification/figure2.py` run the real settings.

# %%
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from hcdiag import plots  # noqa: E402
from hcdiag.checks.barrier import run_checks  # noqa: E402
from hcdiag.data import load  # noqa: E402
from hcdiag.runfile import load_run  # noqa: E402
from hcdiag.train import Trainer, make_config  # noqa: E402

# reduced demo: 4 clusterings (one round), short rounds and refinement, two references (collapsed, vanilla)
cfg = make_config("smoke", method="hct", multiple=2.0, r0=4, epochs=2, epochs_per_round=2, steps_per_clustering=2,
                  refine_cap=10, stage3_epochs=6, stage3_snapshots=3, eval_rows=1024,
                  references=("collapsed", "vanilla"), device="cpu")
data = load("synthetic", n_samples=4000)
path = Path(tempfile.mkdtemp(prefix="hcdiag-nb2-")) / "hct.pt"
Trainer(cfg, data, path).run()
run = load_run(path)
results = {r.id: r for r in run_checks(run)}
print(f"run file {path}: method {run.method}, s2 = {run.s2:.4g} (= 2 lambda_max), R0 = {run.r0}, K = {run.k}")

# %% [markdown]
# ## Figure 2 (left): the loss of every clustering over training
#
# Red: the final pair kept to the end; thin lines: clusterings discarded in earlier rounds (they are never
# trained on again); dotted lines: each round's `eps_t`. The paper's claim is that the discarded ones stay
# low. Check N2 tests it precisely: every later snapshot must stay inside every earlier region.

# %%
fig = plots.clustering_losses_over_training(run)
fig

# %%
for cid in ("N1", "N2", "N3"):
    r = results[cid]
    print(f"{cid} [{r.verdict}] {r.claim}\n    {r.summary or r.reason}")

# %% [markdown]
# ## Figure 2 (right): distance to the constructed collapsed model
#
# The collapsed model is a vanilla VAE trained at `s2 = 10 lambda_max` from the same initialisation (paper
# 5.3). The paper claims the distance from HCT's snapshots to it grows over training (check I3: Spearman
# rank correlation of distance with snapshot order > 0). The grey squares are a vanilla run at the same
# `s2`: if its distance grows too, a growing distance alone does not single out HCT.

# %%
fig = plots.distance_to_collapsed(results["I3"].values) if "param_distance" in results["I3"].values else None
fig

# %%
r = results["I3"]
print(f"I3 [{r.verdict}] {r.summary or r.reason}")

# %% [markdown]
# ## Straight paths to collapsed models (Corollary 4.5)
#
# Along the segment from the refined model to a collapsed one, the historical loss of the final pair must
# rise above `eps_T`: the path leaves `F_T`. Only a path whose endpoint lies INSIDE `F_T` is evidence (a path
# to a model outside `F_T` must leave it): the T2 witness, or, where the architecture cannot express it, the
# straight path in output space to the best constant. With no such path, I2 is inconclusive.

# %%
i2 = results["I2"].values
fig = plots.path_curves(i2) if plots.has_path_curves(i2) else None
fig

# %% [markdown]
# ## KL and active units over training (paper Figure 3)

# %%
fig = plots.kl_and_active_units(run)
fig

# %% [markdown]
# ## Every verdict
#
# One line per check, as `hcdiag check-barrier` prints it. `inconclusive` means the check could not decide
# on this run (the reason is given), not that it passed.

# %%
for cid, r in results.items():
    print(f"{cid:4s} {r.verdict:12s} {(r.summary or r.reason or '')[:110]}")
counts = {v: sum(r.verdict == v for r in results.values()) for v in ("holds", "fails", "inconclusive")}
print(f"\nOn this reduced run: {counts['holds']} checks hold, {counts['fails']} fail, "
      f"{counts['inconclusive']} are inconclusive.")
