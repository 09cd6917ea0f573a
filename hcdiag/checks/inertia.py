"""Corollary 4.5, historical inertia: checks I1, I2, I3 (claims.md)."""

from __future__ import annotations

import numpy as np

from hcdiag.checks.base import CheckResult, RunContext, inconclusive
from hcdiag.checks.exclusion import witness_state
from hcdiag.checks.regions import _lerp
from hcdiag.models import parameter_distance

SECTION = "Corollary 4.5"


def check_i1(ctx: RunContext) -> CheckResult:
    """I1: along stage 3, ``max L_{K_T} / eps_T`` and KL; holds if the model stays in F_T and KL > 0.01."""
    from hcdiag.metrics import active_units, kl_total

    claim = "Trained afterwards on a single clustering, the model stays in F_T and does not collapse."
    reg, st3 = ctx.final_region(), ctx.run.stage3
    if reg is None or not st3:
        return inconclusive("I1", claim, SECTION, "the run has no refinement and stage 3")
    names = [s for s in list(st3.get("snapshots", [])) + ["final"] if s in ctx.order]
    rows = []
    for s in names:
        mu, lv, _ = ctx.outputs(s)
        inside, ratio = ctx.inside(ctx.losses(s), reg)
        rows.append({"snapshot": s, "ratio": ratio, "inside": inside, "kl": kl_total(mu, lv),
                     "au": int(active_units(mu).count)})
    if not rows:
        return inconclusive("I1", claim, SECTION, "no stage-3 snapshot is stored")
    worst = max(rows, key=lambda r: r["ratio"])
    min_kl = min(r["kl"] for r in rows)
    values = {"rows": rows, "max_ratio": worst["ratio"], "min_kl": min_kl, "eps_T": reg.eps, "tolerance": ctx.tol}
    problems = []
    if worst["ratio"] > 1 + ctx.tol:
        problems.append(f"{worst['snapshot']} leaves F_T (L/eps_T = {worst['ratio']:.3g})")
    if min_kl <= 0.01:
        problems.append(f"KL falls to {min_kl:.3g} <= 0.01")
    if problems:
        return CheckResult("I1", claim, SECTION, "fails", values, witness=worst, tolerance=ctx.tol,
                           summary="; ".join(problems))
    return CheckResult("I1", claim, SECTION, "holds", values, tolerance=ctx.tol,
                       summary=f"stays in F_T (max L/eps_T = {worst['ratio']:.3g}) with KL >= {min_kl:.3g}")


def _path(ctx: RunContext, a: dict, b: dict, ids, points: int) -> dict:
    alphas = np.linspace(0.0, 1.0, points)
    L = [ctx.historical(ctx.losses_of_state(_lerp(a, b, float(al))), ids) for al in alphas]
    return {"alpha": alphas.tolist(), "L": L}


def _summarize_path(curve: dict, eps: float, tol: float) -> dict:
    L = curve["L"]
    out_at = [al for al, l in zip(curve["alpha"], L) if l > eps * (1 + tol)]
    return {**curve, "leaves_at": out_at[0] if out_at else None, "leaves": bool(out_at),
            "barrier_height": max(L) - max(L[0], L[-1]), "max_L": max(L)}


def check_i2(ctx: RunContext, *, points: int = 21) -> CheckResult:
    """I2: the straight path from Theta_T to the collapsed reference and to the T2 witness (which lies in
    F_T); fails when the path to an exactly collapsed model never leaves F_T."""
    from hcdiag.checks.delta import delta_star_pair

    claim = ("Gradient descent cannot reach a collapsed solution without passing through regions where "
             "L_(S_T) > eps_T.")
    reg = ctx.final_region()
    if reg is None:
        return inconclusive("I2", claim, SECTION, "the run has no refinement, so no F_T")
    if not ctx.has_parameters:
        return inconclusive("I2", claim, SECTION, "parameter paths need an architecture hcdiag can rebuild")
    start = ctx.state(reg.snapshot)
    if start is None:
        return inconclusive("I2", claim, SECTION, f"the refined snapshot {reg.snapshot!r} has outputs but no parameters")
    values = {"eps_T": reg.eps, "points": points, "tolerance": ctx.tol}
    col = (ctx.run.references or {}).get("collapsed")
    if col is not None:
        values["to_collapsed"] = _summarize_path(_path(ctx, start, col["state"], reg.ids, points), reg.eps, ctx.tol)
    ds = delta_star_pair(ctx.centroids[reg.ids[0]], ctx.centroids[reg.ids[1]])
    wsd, why = witness_state(ctx, start, ds.c.double())
    if wsd is not None:
        values["to_witness"] = _summarize_path(_path(ctx, start, wsd, reg.ids, points), reg.eps, ctx.tol)
    else:
        values["to_witness_unavailable"] = why
    tw, tc = values.get("to_witness"), values.get("to_collapsed")
    if tw is not None and not tw["leaves"]:
        return CheckResult("I2", claim, SECTION, "fails", values,
                           witness={"path": "to the T2 witness (KL = 0)", "max_L": tw["max_L"], "eps_T": reg.eps},
                           tolerance=ctx.tol,
                           summary=f"the straight path to an exactly collapsed model stays in F_T "
                                   f"(max L = {tw['max_L']:.4g} <= eps_T (1 + tau) = {reg.eps * (1 + ctx.tol):.4g})")
    parts = []
    if tw is not None:
        parts.append(f"path to the T2 witness leaves F_T at alpha = {tw['leaves_at']:.2f}")
    if tc is not None:
        parts.append(f"path to the collapsed reference {'leaves F_T at alpha = %.2f' % tc['leaves_at'] if tc['leaves'] else 'stays in F_T'}"
                     f" (barrier height {tc['barrier_height']:.3g})")
    if not parts:
        return inconclusive("I2", claim, SECTION, f"no collapsed model to draw a path to ({why})", **values)
    verdict = "holds" if (tw is None or tw["leaves"]) and (tc is None or tc["leaves"]) else "fails"
    return CheckResult("I2", claim, SECTION, verdict, values, tolerance=ctx.tol, summary="; ".join(parts),
                       witness=None if verdict == "holds" else {"path": "to the collapsed reference", "max_L": tc["max_L"]})


def _spearman(values: list[float]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    if len(values) < 3 or np.allclose(values, values[0]):
        return float("nan"), float("nan")
    r = spearmanr(np.arange(len(values)), values)
    return float(r.statistic), float(r.pvalue)


def _aligned_distances(ctx: RunContext, ref: dict, states: list[dict]) -> dict:
    """I3's permutation-aligned distances: each snapshot's hidden units (and latent dimensions) permuted
    onto the collapsed reference's by weight matching (:mod:`hcdiag.alignment`), so that a distance that
    only reflects relabelled units is not read as movement. Extra evidence: the verdict does not use it."""
    from hcdiag.alignment import permutation_spec, weight_matching

    wms = [weight_matching(ref, st, ctx.model_cfg, device=ctx.device) for st in states]
    d = [w.distance for w in wms]
    rho, p = _spearman(d)
    return {"aligned_param_distance": d, "aligned_spearman_rho": rho, "aligned_p_value": p,
            "alignment": {"method": "weight matching (Ainsworth et al. 2023), snapshot onto the collapsed reference",
                          "groups": permutation_spec(ctx.model_cfg).sizes, "moved_units": [w.moved for w in wms],
                          "passes": [w.n_iter for w in wms], "converged": all(w.converged for w in wms)}}


def check_i3(ctx: RunContext) -> CheckResult:
    """I3: parameter and function-space distance to the collapsed model over training, with the vanilla
    reference's distance beside it (paper 5.3, Figure 2 right), and the permutation-aligned parameter
    distance (claims.md: hidden units matched by weight matching) as extra evidence."""
    claim = "The distance to the collapsed solution increases as training progresses (Figure 2 right)."
    col = (ctx.run.references or {}).get("collapsed")
    if col is None:
        return inconclusive("I3", claim, "section 5.3", "the run has no collapsed reference model")
    if not ctx.has_parameters:
        return inconclusive("I3", claim, "section 5.3", "parameter distances need an architecture hcdiag can rebuild")
    _, _, xc = ctx.outputs_of_state(col["state"])
    names = [s for s in ctx.order if ctx.state(s) is not None]  # snapshots with outputs only have no distance
    param = [parameter_distance(col["state"], ctx.state(s)) for s in names]
    func = [float(((ctx.outputs(s)[2] - xc) ** 2).sum(1).mean()) for s in names]
    rho, p = _spearman(param)
    rho_f, p_f = _spearman(func)
    values = {"snapshots": names, "param_distance": param, "function_distance": func, "spearman_rho": rho,
              "p_value": p, "function_spearman_rho": rho_f, "function_p_value": p_f,
              **_aligned_distances(ctx, col["state"], [ctx.state(s) for s in names])}
    van = (ctx.run.references or {}).get("vanilla")
    if van is not None and van.get("snapshots"):
        vn = list(van.get("snapshot_order") or van["snapshots"].keys())
        vdist = [parameter_distance(col["state"], van["snapshots"][s]) for s in vn]
        vfunc = [float(((ctx.outputs_of_state(van["snapshots"][s])[2] - xc) ** 2).sum(1).mean()) for s in vn]
        values.update(vanilla_snapshots=vn, vanilla_param_distance=vdist, vanilla_function_distance=vfunc,
                      vanilla_spearman_rho=_spearman(vdist)[0])
    ref_note = (f"; beside it, the vanilla reference's distance has rho = {values['vanilla_spearman_rho']:.2f}"
                if "vanilla_spearman_rho" in values else "; no vanilla reference to compare with")
    ad, moved = values["aligned_param_distance"], sum(values["alignment"]["moved_units"])
    aligned_note = (f"; permutation-aligned distance {ad[0]:.3g} -> {ad[-1]:.3g}, rho = "
                    f"{values['aligned_spearman_rho']:.2f} ({moved} unit(s) moved by weight matching)" if ad else "")
    if not np.isfinite(rho):
        return inconclusive("I3", claim, "section 5.3", "fewer than 3 snapshots or a constant distance", **values)
    # "increases" needs a trend that is positive AND distinguishable from no trend (Spearman test, 5%)
    verdict = "holds" if rho > 0 and p < 0.05 else "fails"
    why = "" if verdict == "holds" else (" (no increase)" if rho <= 0 else " (not significant at 5%)")
    return CheckResult("I3", claim, "section 5.3", verdict, values,
                       witness=None if verdict == "holds" else {"spearman_rho": rho, "p_value": p},
                       summary=f"parameter distance {param[0]:.3g} -> {param[-1]:.3g}, Spearman rho = {rho:.2f}, "
                               f"p = {p:.2g}{why} (function space rho = {rho_f:.2f}){aligned_note}{ref_note}")
