"""Corollary 4.5, historical inertia: checks I1, I2, I3 (claims.md)."""

from __future__ import annotations

import numpy as np
import torch

from hcdiag.checks import delta
from hcdiag.checks.base import CheckResult, RunContext, inconclusive
from hcdiag.checks.exclusion import witness_state
from hcdiag.checks.regions import _lerp
from hcdiag.claims import collapsed
from hcdiag.metrics import active_units, kl_total
from hcdiag.models import parameter_distance
from hcdiag.paper import COLLAPSE_KL, I2_PATHS

SECTION = "Corollary 4.5"


def check_i1(ctx: RunContext) -> CheckResult:
    """I1: along stage 3, ``max L_{K_T} / eps_T`` and KL; holds if the model stays in F_T and no snapshot is
    collapsed (:func:`hcdiag.claims.collapsed`: KL < 0.01)."""
    claim = "Trained afterwards on a single clustering, the model stays in F_T and does not collapse."
    reg, st3 = ctx.final_region(), ctx.run.stage3
    if reg is None or st3 is None:
        return inconclusive("I1", claim, SECTION, "the run has no refinement and stage 3")
    names = [s for s in list(st3.snapshots) + ["final"] if s in ctx.order]
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
    if collapsed(min_kl):
        problems.append(f"KL falls to {min_kl:.3g} < {COLLAPSE_KL:g}")
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
            "barrier_height": max(L) - max(L[0], L[-1]), "max_L": max(L),
            "end_inside": L[-1] <= eps * (1 + tol), "end_ratio": L[-1] / eps if eps > 0 else float("inf")}


def _output_path(ctx: RunContext, xhat0, c, ids, points: int) -> dict:
    """The straight path in OUTPUT space from the refined model's reconstructions to the constant ``c``:
    ``xhat(alpha) = (1 - alpha) xhat_T(x) + alpha c`` (the historical loss depends on the model only
    through xhat, so this is the function-space counterpart of a parameter path)."""
    alphas = np.linspace(0.0, 1.0, points)
    c = c.to(device=xhat0.device, dtype=xhat0.dtype)
    L = [ctx.historical(ctx.losses_of_xhat(torch.lerp(xhat0, c.expand_as(xhat0), float(al))), ids) for al in alphas]
    return {"alpha": alphas.tolist(), "L": L}




def check_i2(ctx: RunContext, *, points: int = 21) -> CheckResult:
    """I2: straight paths from Theta_T to collapsed models: to the T2 witness, to the collapsed reference and,
    where the architecture cannot express the witness, the output-space path to the best constant.

    Only a path whose endpoint lies INSIDE F_T is evidence (claims.md): a path to a model outside F_T must
    leave F_T and proves nothing. I2 fails when such a path never leaves F_T, holds when every such path
    leaves it, and is inconclusive (the curves are still drawn) when no collapsed model inside F_T has a path."""
    claim = ("Gradient descent cannot reach a collapsed solution without passing through regions where "
             "L_(S_T) > eps_T.")
    reg = ctx.final_region()
    if reg is None:
        return inconclusive("I2", claim, SECTION, "the run has no refinement, so no F_T")
    values = {"eps_T": reg.eps, "points": points, "tolerance": ctx.tol}
    start = ctx.state(reg.snapshot)
    ds = delta.delta_star_pair(ctx.centroids[reg.ids[0]], ctx.centroids[reg.ids[1]])
    why_not = "the run carries no rebuildable architecture (outputs only)"
    if start is not None:
        col = ctx.reference("collapsed")
        if col is not None and ctx.same_architecture("collapsed"):
            values["to_collapsed"] = _summarize_path(_path(ctx, start, col.state, reg.ids, points), reg.eps, ctx.tol)
            # the reference is only a collapsed model if its KL says so (T3 checks the same)
            kl = kl_total(*ctx.reference_outputs("collapsed")[:2])
            values["to_collapsed"].update(kl=kl, collapsed=collapsed(kl))
        elif col is not None:
            values["to_collapsed_unavailable"] = ("the collapsed reference has no parameters of the run's architecture "
                                                  "(another config.model, or outputs only)")
        wsd, why_not = witness_state(ctx, start, ds.c.double())
        if wsd is not None:
            values["to_witness"] = _summarize_path(_path(ctx, start, wsd, reg.ids, points), reg.eps, ctx.tol)
    elif ctx.has_parameters:
        why_not = f"the refined snapshot {reg.snapshot!r} has outputs but no parameters"
    if "to_witness" not in values:
        values["to_witness_unavailable"] = why_not
        if reg.snapshot in ctx.order:
            values["to_constant_output"] = _summarize_path(
                _output_path(ctx, ctx.outputs(reg.snapshot)[2], ds.c, reg.ids, points), reg.eps, ctx.tol)
    paths = {k: values[k] for k in I2_PATHS if k in values}
    if not paths:
        return inconclusive("I2", claim, SECTION, f"no path to a collapsed model can be drawn ({why_not})", **values)
    deciding = {k: v for k, v in paths.items() if v["end_inside"] and v.get("collapsed", True)}
    values["deciding_paths"] = list(deciding)
    described = "; ".join(
        f"path to {I2_PATHS[k]} " + (f"leaves F_T at alpha = {v['leaves_at']:.2f}" if v["leaves"] else "stays in F_T")
        + ("" if v["end_inside"] else f" (its endpoint lies outside F_T, L/eps_T = {v['end_ratio']:.3g}: no evidence)")
        + ("" if v.get("collapsed", True) else f" (its endpoint is not collapsed, KL = {v['kl']:.3g}: no evidence)")
        for k, v in paths.items())
    if not deciding:
        return inconclusive("I2", claim, SECTION, "no collapsed model inside F_T to draw a path to: " + described
                            + (f"; the T2 witness: {why_not}" if "to_witness" not in paths else ""), **values)
    stay = [k for k, v in deciding.items() if not v["leaves"]]
    if stay:
        k = stay[0]
        return CheckResult("I2", claim, SECTION, "fails", values, tolerance=ctx.tol,
                           witness={"path": f"to {I2_PATHS[k]}", "max_L": deciding[k]["max_L"], "eps_T": reg.eps},
                           summary=f"the straight path to {I2_PATHS[k]} stays in F_T (max L = {deciding[k]['max_L']:.4g} "
                                   f"<= eps_T (1 + tau) = {reg.eps * (1 + ctx.tol):.4g}); {described}")
    return CheckResult("I2", claim, SECTION, "holds", values, tolerance=ctx.tol, summary=described)


def _spearman(values: list[float]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    if len(values) < 3 or np.allclose(values, values[0]):
        return float("nan"), float("nan")
    r = spearmanr(np.arange(len(values)), values)
    return float(r.statistic), float(r.pvalue)


def _distinct(state_of, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` without the snapshots whose parameters equal the previous kept snapshot's bitwise, and the
    names dropped."""
    kept, dropped, prev = [], [], None
    for s in names:
        st = state_of(s)
        if prev is not None and st.keys() == prev.keys() and all(torch.equal(st[k], prev[k]) for k in st):
            dropped.append(s)
            continue
        kept.append(s)
        prev = st
    return kept, dropped


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
    col = ctx.reference("collapsed")
    if col is None:
        return inconclusive("I3", claim, "section 5.3", "the run has no collapsed reference model")
    if not ctx.has_parameters:
        return inconclusive("I3", claim, "section 5.3", "parameter distances need an architecture hcdiag can rebuild")
    if not ctx.same_architecture("collapsed"):
        return inconclusive("I3", claim, "section 5.3", "the collapsed reference has no parameters of the run's "
                            "architecture (another config.model, or outputs only): no parameter distance to it")
    _, _, xc = ctx.reference_outputs("collapsed")
    # snapshots with outputs only have no distance; a snapshot identical to the one before it (hcdiag's 'final'
    # is the last stage-3 snapshot) is one point, not two: counted twice it would move Spearman's p
    names, repeated = _distinct(ctx.state, [s for s in ctx.order if ctx.state(s) is not None])
    param = [parameter_distance(col.state, ctx.state(s)) for s in names]
    func = [float(((ctx.outputs(s)[2] - xc) ** 2).sum(1).mean()) for s in names]
    rho, p = _spearman(param)
    rho_f, p_f = _spearman(func)
    values = {"snapshots": names, "repeated_snapshots": repeated, "param_distance": param, "function_distance": func,
              "spearman_rho": rho,
              "p_value": p, "function_spearman_rho": rho_f, "function_p_value": p_f,
              **_aligned_distances(ctx, col.state, [ctx.state(s) for s in names])}
    van = ctx.reference("vanilla")
    if van is not None and van.snapshots and ctx.reference_model_config("vanilla")[0] == ctx.model_cfg:
        vn, _ = _distinct(van.snapshots.get, van.order)
        vdist = [parameter_distance(col.state, van.snapshots[s]) for s in vn]
        vfunc = [float(((ctx.outputs_of_state(van.snapshots[s])[2] - xc) ** 2).sum(1).mean()) for s in vn]
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
