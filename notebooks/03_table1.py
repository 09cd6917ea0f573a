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
# # 3. Table 1, the paper's numbers beside ours
#
# **The claim (paper 5.2, 5.4, Table 1).** Under the violating condition `s2 = 2 lambda_max`, the vanilla
# VAE "collapses completely (KL < 0.01)", while Historical Consensus Training keeps KL above 2.0 (MNIST,
# Fashion-MNIST; 2.5 synthetic, 3.5 CIFAR-10) before refinement, after it, and after the final
# single-cluster stage, and has the highest KL of all methods. Note that Table 1 itself lists a vanilla KL of
# 0.32 on synthetic data, not < 0.01: the text and the table disagree, so we show both.
#
# **What we do.** `hcdiag.artefacts.table1` runs the main jobs of `hcdiag verify`'s grid (same run names and
# numbers), reads the barrier checks cached beside each run file, and puts the paper's KL and active units
# beside ours, with a verdict per cell.
#
# **This is a reduced demo** (well under a minute on a CPU): 4000 synthetic samples, one loss convention
# (`literal`), and the smoke preset with fewer clusterings and epochs (the overrides below). Its numbers
# are far from the paper's training budget; `python verification/table1.py --preset paper` runs the real one.

# %%
import tempfile

import matplotlib

matplotlib.use("Agg")
from hcdiag import artefacts  # noqa: E402

REDUCED = dict(r0=8, epochs=2, epochs_per_round=2, steps_per_clustering=4, refine_cap=10, stage3_epochs=6,
               stage3_snapshots=3, eval_rows=1024, references=())
out_dir = tempfile.mkdtemp(prefix="hcdiag-nb3-")
result = artefacts.table1("smoke", ["synthetic"], 1, out_dir, losses=["literal"], overrides=REDUCED,
                          n_samples=4000, device="cpu")

# %% [markdown]
# ## Side by side
#
# `paper` holds Table 1's cell and the text's threshold; `ours` the mean (and spread over seeds, here one
# seed) of KL in nats and of active units (Burda et al.'s definition: `Var_x(mu_j) >= 0.01`).

# %%
print(result.to_markdown())

# %% [markdown]
# ## The figure
#
# Our KL (red) beside the paper's (grey) for each method and HCT stage; the dashed line is the text's
# threshold for HCT, the dotted line the collapse threshold 0.01.

# %%
fig = result.plot(dataset="synthetic", multiple=2.0)
fig

# %% [markdown]
# ## Verdict
#
# Computed from the rows: which of the paper's claims hold on this reduced run.

# %%
for r in result.rows:
    if r["verdict"] != "reported":
        print(f"{r['verdict']:8s} {r['item']}: ours {r['ours']} (paper: {r['paper']})")
print(result.verdict_line())

# %% [markdown]
# ## At the paper's scale: Fashion-MNIST
#
# The reduced demo above says nothing about the paper's own numbers. The paper preset did run on
# Fashion-MNIST (60,000 x 196, Table 3's model, s2 = 2 lambda_max, `scaled` and `literal`, one seed; hours of
# CPU), and the checks of each run are committed in `docs/results/paper-fashion-mnist/checks`.
# `artefacts.table1_from_checks` decides the same Table 1 rows from those documents alone, by the same rules,
# without the run files and without training (a run without a checks document would be named and left out).

# %%
from pathlib import Path  # noqa: E402

import hcdiag  # noqa: E402

committed = Path(hcdiag.__file__).resolve().parents[1] / "docs" / "results" / "paper-fashion-mnist" / "checks"
if committed.is_dir():
    paper_scale = artefacts.table1_from_checks(
        committed, "paper", ["fashion-mnist"], losses=["scaled", "literal"], multiples=[2.0],
        methods=["hct", "hct-warmup", "vanilla", "beta-beta2", "anneal", "aggressive", "em-type"])
    for r in paper_scale.rows:
        print(f"{r['verdict']:12s} {r['item']} ({r['values']['loss']}): ours {r['ours']} (paper: {r['paper']})")
    print(paper_scale.verdict_line())
    if paper_scale.meta["missing"]:
        print("left out, no checks document:", ", ".join(paper_scale.meta["missing"]))
    cells = [r for r in paper_scale.rows if r["values"].get("kl") is not None]
    print(f"{sum(r['values']['kl'] < 0.01 for r in cells)} of {len(cells)} cells collapsed (KL < 0.01 nats)")
else:  # hcdiag installed without its repository's docs
    paper_scale = None
    print(f"{committed} is not here: clone the repository to read the committed paper-scale checks.")

# %% [markdown]
# The counts above come from the rows. When HCT's cells collapse like the baselines', the paper's
# Fashion-MNIST row is not reproduced on our pipeline (the README discusses why: at s2 = 2 lambda_max the
# paper's own theory predicts collapse for every method). The figure puts our KL beside Table 1's.

# %%
if paper_scale is not None:
    fig = paper_scale.plot(dataset="fashion-mnist", multiple=2.0)
    fig
