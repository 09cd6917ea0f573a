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
# # 4. The simplex witness certificate on digits: the identity, the inverse, the three phases and the view gap
#
# **The claims (the companion notes, seed 000).** A VAE with prior N(0, I) gets a fixed teacher `T(k|x)` (here
# the responsibilities of a GMM fitted on the data) and a fixed *simplex witness* head on its latent mean,
# `W(k|x) = softmax_k(beta_w <v_k, mu(x)>)` with the vertices `v_k` of a centred regular simplex. Nothing of the
# head is trained; the VAE is trained on its loss plus `alpha * mean_x KL(T || W)`.
#
# * The best input-independent student costs exactly the teacher information
#   `I_T = H(mean_x T) - mean_x H(T(.|x))` (W1), so an alignment `L_TS < I_T - margin` on held-out rows proves
#   the latent mean is not constant (the certificate, W3).
# * The witness has a closed-form inverse: the code `z = ((K-1)/(K beta_w)) sum_k l_k v_k` of the centred
#   log-odds `l` reproduces `T` exactly, at latent energy `(K-1)/(2 K beta_w^2) ||l||^2` (W2).
# * Prevention, collapse and rescue: trained with alignment the certificate holds throughout; without it the
#   witness falls to the constant student; restarted from the collapsed checkpoint with alignment it recovers.
# * A teacher that sees another view of x leaves a computable view gap (W4).
#
# **What we do.** Fit the teacher on the 8x8 digits, check the identity and the inverse numerically, train the
# three phases with `hcdiag.train` and decide W3/W4 with `hcdiag.checks.barrier.run_checks`, as `hcdiag verify`
# does for its `witness` group.
#
# **This is a reduced demo** (about a minute on a CPU): the smoke preset with 3 epochs, 1,797 digits, s2 = 2
# lambda_max. Its verdicts describe these small runs only; `hcdiag verify --groups witness` runs the grid.

# %%
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from hcdiag import plots  # noqa: E402
from hcdiag.checks.barrier import run_checks  # noqa: E402
from hcdiag.checks.witness import alignment_loss, teacher_information, view_gap  # noqa: E402
from hcdiag.data import load  # noqa: E402
from hcdiag.runfile import load_run  # noqa: E402
from hcdiag.simplex import code_energy, inverse_code, simplex_vertices, witness  # noqa: E402
from hcdiag.train import Trainer, make_config  # noqa: E402
from hcdiag.train.methods.teacher import TeacherModel, view_targets  # noqa: E402

data = load("digits")
folder = Path(tempfile.mkdtemp(prefix="hcdiag-nb4-"))
common = dict(epochs=3, baseline_snapshots=3, references=(), r0=4, eval_rows=1024, device="cpu")
prevent = folder / "prevent.pt"
Trainer(make_config("smoke", method="teacher", multiple=2.0, teacher_alpha=1.0, **common), data, prevent,
        em_cache=folder / "em").run()
run = load_run(prevent)
rec = run.teacher
T = run.clusterings.resp[rec.clustering].double()
T = T / T.sum(1, keepdim=True)
print(f"{data.x.shape[0]} digits of {data.x.shape[1]} pixels; teacher: clustering {rec.clustering} of {run.r0}, "
      f"K = {T.shape[1]}, chosen by: {rec.rule}")

# %% [markdown]
# ## W1: the best constant student pays exactly I_T
#
# For a constant student `w`, `mean_x KL(T(.|x) || w) = I_T + KL(mean_x T || w)`: the dataset-average teacher is
# the best constant and pays `I_T`; any other constant pays more.

# %%
info = teacher_information(T)
best = alignment_loss(T, T.mean(0))
other = alignment_loss(T, torch.full((T.shape[1],), 1.0 / T.shape[1], dtype=torch.float64))
print(f"I_T = {info:.6f} nats; best constant student {best:.6f}; uniform student {other:.6f} (>= I_T)")
assert abs(best - info) < 1e-10 and other >= info

# %% [markdown]
# ## W2: the closed-form inverse and its energy
#
# The code of each row's teacher reproduces it through the fixed head, and its energy `1/2 ||z||^2` is a lower
# bound on the KL an encoder whose mean is that code must carry: a confident teacher costs latent energy (a GMM's
# responsibilities are nearly one-hot, so their log-odds, floored at 1e-12, are large and so is the energy: the
# alignment loss can be made small, not zero, at a KL the VAE can afford).

# %%
V = simplex_vertices(T.shape[1], run.config.model["latent_dim"])
beta_w = rec.beta_w
z = inverse_code(T, V, beta_w=beta_w)
err = (witness(z, V, beta_w=beta_w) - T.clamp_min(1e-12) / T.clamp_min(1e-12).sum(1, keepdim=True)).abs().max()
energy = code_energy(T, beta_w=beta_w)
print(f"max |W(z) - T| = {float(err):.2e}; energy 1/2||z||^2: mean {float(energy.mean()):.3g} nats, "
      f"formula vs norm {float((energy - 0.5 * (z ** 2).sum(1)).abs().max()):.1e}")

# %% [markdown]
# ## The three phases
#
# Prevention (alignment from scratch), collapse (alpha = 0: the plain VAE with the head watching) and rescue
# (alignment switched on from the collapse run's final snapshot, `init_from`). W3 decides whether every snapshot
# after init is certified; the certificate is one-sided, so a failing W3 reports KL and active units beside it.
# The rescue is judged by its final snapshot (the certificate restored) and the snapshot at which it first came
# back, as verify's `witness.rescue` rule does; W3 ("every snapshot") may fail on a rescue still on its way.

# %%
collapse, rescue = folder / "collapse.pt", folder / "rescue.pt"
Trainer(make_config("smoke", method="teacher", multiple=2.0, teacher_alpha=0.0, **common), data, collapse,
        em_cache=folder / "em").run()
Trainer(make_config("smoke", method="teacher", multiple=2.0, teacher_alpha=1.0, init_from=str(collapse), **common),
        data, rescue, em_cache=folder / "em").run()
series = {}
for phase, path in (("prevent", prevent), ("collapse", collapse), ("rescue", rescue)):
    w3, w4 = run_checks(path, select=["W3", "W4"])
    rows = w3.values.get("rows", [])
    series[phase] = (list(range(1, len(rows) + 1)), [r["G_T"] for r in rows])
    final = rows[-1] if rows else {}
    first = next((i + 1 for i, r in enumerate(rows) if r["certified"]), None)
    print(f"{phase:>8}: W3 {w3.verdict:<12} final G_T {final.get('G_T', float('nan')):+.4f} nats, "
          f"KL {final.get('kl', float('nan')):.3g}, {final.get('au')} active units, first certified snapshot: {first}")
fig = plots.witness_phases(series, margin=0.05, title="simplex witness certificate, digits, s2 = 2 lambda_max")

# %% [markdown]
# ## W4: the view gap of a teacher that sees a shifted digit
#
# If the teacher's targets come from a random view (here the image shifted by up to one pixel), a witness that
# reads only the digit cannot follow the view: its alignment is at least the Jensen gap `G_V`, and the largest
# certificate margin any such witness can reach is `I_T - G_V`. Computed on the held-out evaluation rows.

# %%
held = run.eval.x.double().numpy()[1::2]
shape = run.config.dataset["image_shape"]
for view in ("identity", "pool:2", "shift:1", "noise:1"):
    Tv = torch.as_tensor(view_targets(TeacherModel.of_run(run.clusterings.to_dict(), rec), held, view, 32, 0, shape))
    g = view_gap(Tv)
    print(f"view {view:>8}: I_T {g.I_T:.4f}, view gap G_V {g.gap:.4f}, reachable margin I_T - G_V {g.reachable:.4f} nats")
