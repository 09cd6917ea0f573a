"""Figures of a run and its checks. Each function takes ``ax=`` (or makes its own) and returns the
figure; callers save. Import matplotlib lazily and use a non-interactive backend when headless."""

from __future__ import annotations

import numpy as np

from hcdiag.paper import COLLAPSE_KL, I2_PATHS, PAPER_KL_THRESHOLD


def axes(ax=None, figsize=(6.4, 4.0)):
    """``(figure, ax)``: the given axes and its figure, or a new headless figure when ``ax`` is None."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


# the history series (docs/runfile.md) each figure of a run needs besides history.step; every one is optional
# in a run file, so a figure whose series are absent is left out of a report, never a crash
HISTORY_FIGURES = {"clustering_losses_over_training": ("losses",), "kl_and_active_units": ("kl",)}


def missing_series(run, figure: str) -> str | None:
    """Why the history figure ``figure`` (a key of ``HISTORY_FIGURES``) cannot be drawn from ``run``, or None."""
    h = run.history
    if h is None:
        return "the run file has no history"
    if not len(h):
        return "history holds no rows"
    absent = [f"history.{k}" for k in HISTORY_FIGURES[figure] if h.get(k) is None]
    return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} absent" if absent else None


def clustering_losses_over_training(run, ax=None):
    """Paper Figure 2 (left): l_C of every clustering over training, retained vs discarded, eps_t lines."""
    fig, ax = axes(ax)
    h = run.history
    steps = np.asarray(h.step)
    L = np.asarray(h.get("losses"))  # (h, R0)
    ref = run.refinement
    final = set(ref.pair) if ref is not None else set()
    discarded_at = {}
    for r in run.rounds or []:
        for i in set(r.active) - set(r.kept):
            discarded_at[i] = r.round
    for i in range(L.shape[1]):
        kw = dict(lw=1.6, color="C3", zorder=3) if i in final else dict(lw=0.8, alpha=0.6, color=f"C{discarded_at.get(i, 0) % 3}")
        ax.plot(steps, L[:, i], **kw)
    for r in run.rounds or []:
        ax.axhline(r.eps, ls=":", lw=0.8, color="k")
    if ref is not None:
        ax.axhline(ref.eps_T, ls="--", lw=1.0, color="C3", label=f"eps_T = {ref.eps_T:.3g}")
        ax.axhline(ref.eps, ls="-.", lw=1.0, color="gray", label=f"target eps = {ref.eps:g}")
    ax.plot([], [], color="C3", lw=1.6, label="final pair (retained)")
    ax.plot([], [], color="C0", lw=0.8, label="discarded (colour = round)")
    ax.plot([], [], color="k", ls=":", label="eps_t of each round")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("clustering loss l_C (squared data units, eval rows)")
    ax.set_title("Loss of every clustering over training (paper Fig. 2 left)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def distance_to_collapsed(i3_values: dict, ax=None):
    """Paper Figure 2 (right): parameter and function-space distance to the collapsed model, with the
    permutation-aligned distance and the vanilla reference beside it."""
    fig, ax = axes(ax)
    v = i3_values
    x = np.arange(len(v["param_distance"]))
    ax.plot(x, v["param_distance"], "o-", color="C0", label="HCT: ||Theta_s - Theta_collapse||")
    if v.get("aligned_param_distance"):
        moved = sum(v.get("alignment", {}).get("moved_units", []))
        ax.plot(x, v["aligned_param_distance"], "x--", color="C2",
                label=f"HCT, hidden units permutation-aligned ({moved} moved)")
    if v.get("vanilla_param_distance"):
        xv = np.linspace(0, len(x) - 1, len(v["vanilla_param_distance"]))
        ax.plot(xv, v["vanilla_param_distance"], "s--", color="C7", label="vanilla reference (same s2)")
    ax.set_xticks(x)
    ax.set_xticklabels(v["snapshots"], rotation=60, fontsize=7)
    ax.set_ylabel("parameter distance (L2)")
    ax2 = ax.twinx()
    ax2.plot(x, v["function_distance"], "^:", color="C1", label="HCT: mean ||xhat_s - xhat_collapse||^2")
    ax2.set_ylabel("function-space distance (squared data units)")
    ax.set_title(f"Distance to the collapsed model (Spearman rho = {v['spearman_rho']:.2f})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def has_path_curves(i2_values: dict) -> bool:
    """Whether check I2's values hold a path to draw with :func:`path_curves`."""
    return any(k in i2_values for k in I2_PATHS)


def path_curves(i2_values: dict, ax=None):
    """I2: historical loss L_(K_T) along straight paths from Theta_T to the collapsed models."""
    fig, ax = axes(ax)
    eps = i2_values["eps_T"]
    for (key, what), c in zip(I2_PATHS.items(), ("C3", "C0", "C2")):
        if key in i2_values:
            v = i2_values[key]
            end = "" if "end_inside" not in v else (" [endpoint in F_T]" if v["end_inside"] else " [endpoint outside F_T]")
            ax.plot(v["alpha"], v["L"], "o-", ms=3, color=c, label=f"to {what}{end}")
    ax.axhline(eps, ls="--", color="k", lw=1, label=f"eps_T = {eps:.3g}")
    ax.axhline(eps * (1 + i2_values.get("tolerance", 0.05)), ls=":", color="k", lw=1, label="eps_T (1 + tau)")
    ax.set_yscale("log")
    ax.set_xlabel("alpha (0 = refined model, 1 = collapsed model)")
    ax.set_ylabel("historical loss L_(K_T) (squared data units)")
    ax.set_title("Straight paths to collapsed models (Corollary 4.5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def kl_and_active_units(run, ax=None):
    """Paper Figure 3: KL and active units (Burda) over training, stages shaded (``history.au`` and
    ``history.stage`` are drawn when present)."""
    fig, ax = axes(ax)
    h = run.history
    steps = np.asarray(h.step)
    ax.plot(steps, np.asarray(h.get("kl")), color="C0", label="KL (nats, eval rows)")
    ax.axhline(COLLAPSE_KL, ls=":", color="C0", lw=0.8, label=f"collapse threshold {COLLAPSE_KL:g}")
    stage = np.asarray(h.get("stage")) if h.get("stage") is not None else np.zeros(len(steps), dtype=int)
    for s, col in ((2, "C2"), (3, "C4")):
        if (stage == s).any():
            ax.axvspan(steps[stage == s].min(), steps[stage == s].max(), color=col, alpha=0.1,
                       label={2: "refinement", 3: "stage 3"}[s])
    ax.set_xlabel("training step")
    ax.set_ylabel("KL(q(z|x) || p(z)) (nats)")
    handles, labels = ax.get_legend_handles_labels()
    if h.get("au") is not None:
        ax2 = ax.twinx()
        ax2.step(steps, np.asarray(h.get("au")), where="post", color="C1", label="active units (Burda)")
        ax2.set_ylabel("active units")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7)
    ax.set_title("KL and active units over training (paper Fig. 3)" if h.get("au") is not None
                 else "KL over training (paper Fig. 3; history.au is absent)")
    fig.tight_layout()
    return fig

def phase_diagram(ds: str, ph: dict, ax=None):
    """Phase diagram of a dataset: KL (and active units, right axis) of vanilla VAEs against s2 / lambda_max;
    closed form beside the trained linear and MLP VAEs. ``ph`` is ``hcdiag.verify.phase_diagram(...)[ds]``."""
    import matplotlib.ticker

    fig, ax = axes(ax)
    rows = ph["rows"]
    m = [r["multiple"] for r in rows]
    ax.plot(m, [r["kl_theory"] for r in rows], "-", color="k", label="linear VAE, closed form")
    ax.plot(m, [r["kl_linear"] for r in rows], "o", color="C0", label="linear VAE, trained (Adam)")
    if any(r.get("kl_mlp") is not None for r in rows):
        ax.plot([r["multiple"] for r in rows if r.get("kl_mlp") is not None], [r.get("kl_mlp") for r in rows if r.get("kl_mlp") is not None],
                "s--", color="C1", label="MLP VAE (vanilla), trained")
    ax.axvline(1.0, ls=":", color="gray", label="s2 = lambda_max")
    ax.set_xscale("log")
    ax.set_xticks(m)
    ax.set_xticklabels([f"{v:g}" for v in m])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("s2 / lambda_max (multiple m)")
    ax.set_ylabel("KL(q(z|x) || p(z)) (nats)")
    ax.set_title(f"Phase diagram, {ds} (lambda_max = {ph['lambda_max']:.3g}, latent {ph['latent_dim']})")
    ax2 = ax.twinx()
    ax2.plot(m, [r.get("au_theory") for r in rows], ":", color="C2", label="active units, closed form")
    if any(r.get("au_mlp") is not None for r in rows):
        ax2.plot([r["multiple"] for r in rows if r.get("au_mlp") is not None], [r.get("au_mlp") for r in rows if r.get("au_mlp") is not None],
                 "^:", color="C3", label="active units, MLP")
    ax2.set_ylabel("active units (Burda)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.tight_layout()
    return fig


def table1_bars(rows: list[dict], dataset: str, multiple: float, ax=None):
    """Table 1 side by side: our KL (nats; mean and sd over seeds) per method and stage beside the paper's, from
    the Table 1 rows of :func:`hcdiag.verify.main_claim_rows` (``values``: ``label``, ``kl``, ``kl_sd``,
    ``paper_kl``); the text's HCT threshold and the collapse threshold marked."""
    rows = [r for r in rows if r["id"].startswith("table1.") and r["values"].get("dataset") == dataset
            and r["values"].get("multiple") == multiple and r["values"].get("kl") is not None]
    fig, ax = axes(ax, (max(6.4, 0.7 * len(rows)), 4.0))
    x = np.arange(len(rows))
    ours = [r["values"]["kl"] for r in rows]
    paper = [r["values"].get("paper_kl") for r in rows]  # None: a method Table 1 does not report (no bar)
    # collapsed runs (KL ~ 1e-8) vanish on a linear axis beside the paper's 2.5: a log axis shows them, with a
    # floor for an exact 0 (the paper's own 0.00 included)
    floor = min([v for v in ours + paper if v is not None and v > 0] + [COLLAPSE_KL]) / 10
    ax.bar(x - 0.2, [max(v, floor) for v in ours], 0.4, yerr=[r["values"].get("kl_sd") or 0 for r in rows],
           color="C3", label="ours")
    have = [i for i, v in enumerate(paper) if v is not None]
    if have:
        ax.bar(x[have] + 0.2, [max(paper[i], floor) for i in have], 0.4, color="C7", label="paper Table 1")
    for i in (i for i, v in enumerate(paper) if v is None):
        ax.text(x[i] + 0.2, floor, "not in\nTable 1", fontsize=6, ha="center", va="bottom", rotation=90, color="C7")
    ax.set_yscale("log")
    thr = PAPER_KL_THRESHOLD.get(dataset, 2.0)
    ax.axhline(thr, ls="--", color="k", lw=1, label=f"paper's text: HCT KL > {thr:g}")
    ax.axhline(COLLAPSE_KL, ls=":", color="C0", lw=1, label=f"collapse threshold {COLLAPSE_KL:g}")
    ax.set_xticks(x)
    ax.set_xticklabels([r["values"]["label"] for r in rows], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("KL(q(z|x) || p(z)) (nats, eval rows)")
    ax.set_title(f"Table 1, {dataset}, s2 = {multiple:g} lambda_max")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def witness_phases(series: dict, *, margin: float, title: str, ax=None):
    """The companion notes' three phases on one time axis: the certificate's margin G_T = I_T - L_TS (nats,
    held-out rows) at every snapshot of the run trained with alignment (prevent), without (collapse) and of the
    rescue, which starts from the collapse run's last snapshot and so is drawn after it. ``series``: phase ->
    ``(epochs, G_T)`` (the rescue's epochs counted from its own start); the margin and the constant student's
    0 marked."""
    fig, ax = axes(ax)
    style = {"prevent": ("C2", "-", "prevent (alignment from scratch)"), "collapse": ("C3", "-", "collapse (alpha = 0)"),
             "rescue": ("C0", "--", "rescue (alignment from the collapsed run)"),
             "view": ("C1", ":", "prevent, the teacher seeing a random view")}
    offset = max(series["collapse"][0]) if series.get("collapse") and len(series["collapse"][0]) else 0
    for phase, (color, ls, lab) in style.items():
        if phase in series and len(series[phase][0]):
            ep, gap = series[phase]
            ep = np.asarray(ep, dtype=float) + (offset if phase == "rescue" else 0)
            ax.plot(ep, gap, ls, marker="o", ms=3, color=color, label=lab)
    ax.axhline(margin, ls=":", color="k", lw=1, label=f"margin {margin:g}: certified above")
    ax.axhline(0.0, ls="-", color="0.6", lw=0.8, label="0: the best constant student")
    ax.set_xlabel("epoch (rescue drawn after the collapse run it starts from)")
    ax.set_ylabel("G_T = I_T - L_TS (nats, held-out rows)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def diffusion_gain(d1_values: dict, d2_values: dict | None = None, ax=None):
    """D1's normalized gain G(t) of E[x0|xt] along the top direction (with +-2 standard errors), the Gaussian closed
    form SNR lambda / (1 + SNR lambda), and where each criterion puts t_c (eq. 13, SNR lambda = 1, measured)."""
    fig, ax = axes(ax)
    ts = np.asarray(d1_values["timesteps"], dtype=float)
    g, se = np.asarray(d1_values["gain"]), np.asarray(d1_values["se"])
    ax.fill_between(ts, g - 2 * se, g + 2 * se, color="C0", alpha=0.2, lw=0)
    ax.plot(ts, g, "o-", ms=3, color="C0", label="measured (trained denoiser)")
    if "gaussian_gain" in d1_values:
        ax.plot(ts, d1_values["gaussian_gain"], "--", color="k", lw=1,
                label=f"Gaussian closed form, lambda_max = {d1_values['lambda_max']:.3g}")
    ax.axhline(0.5, color="0.6", lw=0.8)
    marks = [("t_measured", "C0", "measured t_c")]
    if d2_values:
        marks += [("t_snr", "C2", "SNR lambda_max = 1"), ("t_eq13", "C3", "eq. 13: 1 - abar = lambda_max")]
    for key, color, label in marks:
        t = (d2_values or {}).get(key, d1_values.get(key)) if key != "t_measured" else d1_values.get(key)
        if t is not None:
            ax.axvline(t, color=color, ls=":", lw=1.2, label=f"{label} ({t:.0f})")
    ax.set_xscale("log")
    ax.set_ylim(-0.1, 1.1)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("gain of E[x0 | xt] along v")
    ax.set_title(d1_values.get("schedule", ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def diffusion_samples(heldout: np.ndarray, sets: dict, *, title: str = "", max_points: int = 500):
    """Held-out rows beside each set of samples ``{label: (n, d)}`` in one row of panels: the first two coordinates
    when d = 2, else the top two principal directions of the held-out rows."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    h = np.asarray(heldout, dtype=float)
    mean = h.mean(0)
    if h.shape[1] == 2:
        proj, axis_names = np.eye(2), ("x1", "x2")
    else:
        _, _, vt = np.linalg.svd(h - mean, full_matrices=False)
        proj, axis_names = vt[:2].T, ("PC 1", "PC 2")
    panels = [("held-out data", h)] + list(sets.items())
    fig, axs = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), sharex=True, sharey=True, squeeze=False)
    for ax, (label, pts) in zip(axs[0], panels):
        p = (np.asarray(pts, dtype=float)[:max_points] - mean) @ proj
        ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, color="k" if label == "held-out data" else "C0")
        ax.set_title(label, fontsize=7)
        ax.set_xlabel(axis_names[0], fontsize=7)
    axs[0][0].set_ylabel(axis_names[1], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def diffusion_rescaling(series: dict, *, title: str = "", ax=None):
    """D1's gain curves ``{lambda_max: D1 values}`` on one axis, each beside its Gaussian closed form, with the
    measured crossing marked (check D2 across a rescaling of the data)."""
    fig, ax = axes(ax)
    for i, (lam, v) in enumerate(sorted(series.items())):
        c = f"C{i}"
        ts = np.asarray(v["timesteps"], dtype=float)
        ax.plot(ts, v["gain"], "o-", ms=2.5, color=c, label=f"lambda_max {lam:g}")
        if "gaussian_gain" in v:
            ax.plot(ts, v["gaussian_gain"], "--", lw=0.8, color=c)
        if v.get("t_measured") is not None:
            ax.axvline(v["t_measured"], color=c, ls=":", lw=1)
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.1, 1.1)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("gain of E[x0 | xt] along v")
    ax.set_title(f"{title}: measured (solid) and Gaussian closed form (dashed)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
