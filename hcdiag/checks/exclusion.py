"""Theorem 4.4, exclusion of collapsed solutions: checks T1, T2, T2b, T3, T4 (claims.md).

The paper assumes a collapsed model reconstructs the data mean; under the pipeline's own loss a
constant reconstruction can sit between (or on) centroids. T2 builds that collapsed model in the
run's own architecture and evaluates it: it is the witness against "F_T excludes collapsed solutions".
"""

from __future__ import annotations

import math

import torch

from hcdiag.checks.base import CheckResult, RunContext, inconclusive
from hcdiag.checks.delta import delta_star, delta_star_pair, delta_t1, shared_centroid_pairs, t2b_floor
from hcdiag.claims import collapsed
from hcdiag.metrics import kl_total
from hcdiag.paper import COLLAPSE_KL
from hcdiag.records import Refinement, RunConfig

SECTION = "Theorem 4.4"


def check_t1(ctx: RunContext) -> CheckResult:
    """T1, the paper's delta: ``delta = min_C min_k ||xbar - mu_k^C||^2`` over S_0, and eps_T < delta?"""
    claim = ("There is delta > 0 with l_C(Theta_collapse) >= delta for every clustering; if eps_T < delta, the "
             "collapsed model (reconstructing the data mean) lies outside F_T.")
    t1 = delta_t1(ctx.xbar, ctx.centroids)
    values = {"delta": t1.value, "clustering": t1.clustering, "centroid": t1.centroid,
              "delta_per_clustering": t1.per_clustering.tolist()}
    reg = ctx.final_region()
    if reg is None:
        return inconclusive("T1", claim, SECTION, "the run has no refinement, so no eps_T", **values)
    # the mean-reconstructing model's own historical loss on K_T: L_(K_T)(xbar) = max_{C in K_T} delta_C (Def. 4.1),
    # which is >= delta (a minimum over all of S_0); it decides whether THAT model lies in F_T
    L_mean = float(t1.per_clustering[list(reg.ids)].max())
    inside = L_mean <= reg.eps * (1 + ctx.tol)
    values.update(eps_T=reg.eps, mean_model_historical_loss=L_mean, mean_model_in_F_T=inside, tolerance=ctx.tol)
    if reg.eps < t1.value:
        return CheckResult("T1", claim, SECTION, "holds", values, tolerance=ctx.tol,
                           summary=f"eps_T = {reg.eps:.4g} < delta = {t1.value:.4g} (clustering {t1.clustering})")
    where = "lies in F_T" if inside else (f"still lies outside F_T (L/eps_T = {L_mean / reg.eps:.3g})"
                                          if reg.eps > 0 else "lies outside F_T")
    return CheckResult("T1", claim, SECTION, "fails", values, tolerance=ctx.tol,
                       witness={"constant": "xbar", "delta": t1.value, "delta_clustering": t1.clustering,
                                "historical_loss": L_mean, "eps_T": reg.eps, "in_F_T": inside},
                       summary=f"eps_T = {reg.eps:.4g} >= delta = {t1.value:.4g} (clustering {t1.clustering}): the "
                               f"theorem's condition fails; the mean-reconstructing model has L_(K_T) = max over K_T of "
                               f"delta_C = {L_mean:.4g} and {where}")


def witness_state(ctx: RunContext, base_state: dict, c: torch.Tensor):
    """The exactly collapsed model of T2 in the run's architecture, built from ``base_state``:
    returns ``(state or None, reason)``."""
    if not ctx.has_parameters:
        return None, "the run carries no rebuildable architecture (outputs only)"
    model = ctx.model(base_state)
    return model.collapsed_state(c.float())


def base_state(ctx: RunContext, name: str) -> dict:
    """The parameters of snapshot ``name``, else of the latest snapshot that has parameters (the witness
    zeroes every weight that reaches the output, so any state of the architecture serves as its base)."""
    st = ctx.state(name)
    if st is None:
        st = next(ctx.state(s) for s in reversed(ctx.order) if ctx.state(s) is not None)
    return st


def check_t2(ctx: RunContext, *, shared_tol: float | None = None) -> CheckResult:
    """T2: delta*(K_T), the historical loss of the best constant, a lower bound for EVERY model; the
    collapsed witness built in the architecture; fails when delta* <= eps_T (1 + tau)."""
    claim = "F_T excludes collapsed solutions (q(z|x) = p(z))."
    reg = ctx.final_region()
    if reg is None:
        return inconclusive("T2", claim, SECTION, "the run has no refinement, so no F_T")
    a, b = reg.ids
    ds = delta_star_pair(ctx.centroids[a], ctx.centroids[b])
    c = ds.c.to(torch.float64)
    # evaluate the witness: in the architecture where it can be built, else in output space
    sd, why = witness_state(ctx, base_state(ctx, reg.snapshot), c) if ctx.has_parameters else (None, "outputs only")
    if sd is not None:
        mu, lv, xhat = ctx.outputs_of_state(sd)
        w_kl = kl_total(mu, lv)
        w_losses = ctx.losses_of_xhat(xhat)
        built = "architecture"
    else:
        w_kl = 0.0
        w_losses = ctx.losses_of_xhat(c.float().expand(ctx.x.shape[0], -1).to(ctx.device))
        built = f"output space ({why})"
    w_L = ctx.historical(w_losses, reg.ids)
    scale = float(ctx.run.eigenvalues.sum()) if ctx.run.eigenvalues.numel() else 1.0
    tol = shared_tol if shared_tol is not None else 1e-3 * math.sqrt(max(scale, 1e-12))
    shared = shared_centroid_pairs(ctx.centroids, tol)
    per_region = []
    for r in ctx.regions():
        d = delta_star(ctx.centroids[list(r.ids)], seed=ctx.seed)
        per_region.append({"region": r.name, "ids": list(r.ids), "eps": r.eps, "delta_star": d.value,
                           "lower": d.lower, "upper": d.upper, "exact": d.exact,
                           "collapsed_inside": d.value <= r.eps * (1 + ctx.tol)})
    values = {"delta_star": ds.value, "eps_T": reg.eps, "pair": [a, b], "closest_centroids": list(ds.choice),
              "witness_kl": w_kl, "witness_historical_loss": w_L, "witness_built_in": built,
              "per_region": per_region, "shared_centroid_pairs": [tuple(p) for p in shared], "shared_tol": tol,
              "tolerance": ctx.tol}
    witness = {"kind": "constant reconstruction at the midpoint of the closest centroid pair", "kl": w_kl,
               "historical_loss": w_L, "c": c.tolist(), "clusterings": [a, b], "centroids": list(ds.choice),
               "built_in": built}
    if ds.value <= reg.eps * (1 + ctx.tol):
        return CheckResult("T2", claim, SECTION, "fails", values, witness=witness, tolerance=ctx.tol,
                           summary=f"an exactly collapsed model (KL = {w_kl:.3g}) has L_(K_T) = {w_L:.4g} <= eps_T = "
                                   f"{reg.eps:.4g} (1 + tau): F_T contains it (delta* = {ds.value:.4g})")
    return CheckResult("T2", claim, SECTION, "holds", values, tolerance=ctx.tol,
                       summary=f"delta* = {ds.value:.4g} > eps_T (1 + tau) = {reg.eps * (1 + ctx.tol):.4g}: "
                               "no constant reconstruction lies in F_T")


def _refinement_beta(ctx: RunContext, ref: Refinement, cfg: RunConfig) -> tuple[float | None, str]:
    """The clustering weight beta during refinement and where it comes from: ``refinement.beta`` (hcdiag's
    trainer records it), else ``config.beta`` (a constant schedule stays at ``start``; ``linear`` and ``warmup``
    end at ``end``); None when the run states neither (then no value is assumed)."""
    if ref.beta is not None:
        return ref.beta, "refinement.beta"
    b = cfg.beta or {}
    if b.get("start") is None and b.get("end") is None:
        return None, "the run states no beta (refinement.beta or config.beta)"
    schedule = ctx.setting("config.beta.schedule", "linear", "config.beta.schedule is absent; a linear schedule "
                           "(ending at config.beta.end) is assumed")
    key = "start" if schedule == "constant" else "end"
    if b.get(key) is None:
        return None, f"the run states no beta for refinement (config.beta.{key} is absent)"
    return float(b[key]), f"config.beta.{key} ({schedule} schedule)"


def check_t2b(ctx: RunContext) -> CheckResult:
    """T2b: whether the refinement threshold was reached (``max(l_a, l_b) < eps`` at the refined model,
    recomputed on eval.x), after how many epochs, and beside it the floor a collapsed model reaches under the
    pipeline's own loss: the larger of the pair's floors, since the stop rule needs both below eps."""
    claim = "Refinement trains until max(l_a, l_b) < eps (section 4.2.2; eps = 1e-5 in the text, 1e-4 in Table 3)."
    ref = ctx.run.refinement
    reg = ctx.final_region()
    if ref is None or reg is None:
        return inconclusive("T2b", claim, "section 4.2.2", "the run has no refinement")
    cfg = ctx.run.config
    s2 = cfg.s2
    eps, eps_T = ref.eps, ctx.refinement_eps_T
    reached = bool(ctx.refinement_reached)  # recomputed from the refined model, never the file's flag
    values = {"eps": eps, "eps_T": eps_T, "reached": reached, "epochs": ref.epochs, "s2": s2}
    beta, beta_from = _refinement_beta(ctx, ref, cfg)
    conv_from = "config.loss" if cfg.loss else "assumed: config.loss is absent, so the literal convention"
    conv = ctx.setting("config.loss", "literal", "config.loss is absent; the collapsed floor assumes the literal "
                       "convention (claims.md)")
    values.update(beta=beta, beta_from=beta_from, convention=conv, convention_from=conv_from)
    if beta is None:
        values.update(collapsed_floor=None, floors=None, eps_below_collapsed_floor=None)
        note = f"; collapsed floor not computed: {beta_from}"
    else:
        floors = {}
        for cid in reg.ids:
            f = t2b_floor(ctx.xbar, ctx.centroids[cid].double(), beta=beta, s2=s2, convention=conv)
            floors[str(cid)] = {"l": f.l, "centroid": f.centroid, "pull": f.pull}
        floor = max(v["l"] for v in floors.values())  # max(l_a, l_b) < eps needs BOTH floors below eps
        values.update(collapsed_floor=floor, floors=floors, eps_below_collapsed_floor=eps < floor)
        note = (f"; collapsed floor {floor:.3g} (the larger of the pair's, beta {beta:g} from {beta_from}, "
                f"{conv} convention{'' if conv_from == 'config.loss' else ' assumed'}): "
                + ("eps is below it, so no collapsed model can meet eps" if eps < floor
                   else "a collapsed model could meet eps"))
    if reached:
        return CheckResult("T2b", claim, "section 4.2.2", "holds", values,
                           summary=f"eps = {eps:g} reached after {values['epochs']} epochs (eps_T = {eps_T:.3g}){note}")
    return CheckResult("T2b", claim, "section 4.2.2", "fails", values,
                       witness={"eps_T": eps_T, "epochs": values["epochs"]},
                       summary=f"eps = {eps:g} NOT reached in {values['epochs']} epochs (eps_T = {eps_T:.3g}){note}")


def check_t3(ctx: RunContext) -> CheckResult:
    """T3: the constructed collapsed model (paper 5.3: vanilla at s2 = 10 lambda_max): is it collapsed,
    how spread are its reconstructions, and is ``l_C >= delta_C`` for every clustering?

    The reference is evaluated on eval.x from its parameters when they rebuild (``references.collapsed.state``
    with its own ``config.model``, else the run's), else from its stored ``references.collapsed.outputs``."""
    claim = ("The constructed collapsed solution (vanilla VAE at s2 = 10 lambda_max) is collapsed and has "
             "l_C >= delta_C for every clustering.")
    ref = ctx.reference("collapsed")
    if ref is None:
        return inconclusive("T3", claim, "section 5.3", "the run has no collapsed reference model")
    out = ctx.reference_outputs("collapsed")
    if out is None:
        return inconclusive("T3", claim, "section 5.3", "the collapsed reference can be neither rebuilt (no state "
                            "with a config.model) nor read (no references.collapsed.outputs)")
    source = ("references.collapsed.state" if ref.state is not None
              and ctx.reference_model_config("collapsed")[0] is not None else "references.collapsed.outputs")
    mu, lv, xhat = out
    kl = kl_total(mu, lv)
    spread = float(((xhat - xhat.mean(0)) ** 2).sum(1).mean())
    total_var = float(((ctx.x - ctx.x.mean(0)) ** 2).sum(1).mean())
    losses = ctx.losses_of_xhat(xhat)
    t1 = delta_t1(ctx.xbar, ctx.centroids)
    dC = t1.per_clustering.double()
    below = [int(i) for i in torch.nonzero(losses < dC * (1 - ctx.tol)).flatten()]
    values = {"kl": kl, "collapsed": collapsed(kl), "spread": spread, "total_variance": total_var,
              "spread_ratio": spread / total_var if total_var > 0 else float("nan"),
              "losses": losses.tolist(), "delta_C": dC.tolist(), "below_delta": below,
              "multiple": ref.config.get("multiple"), "tolerance": ctx.tol, "evaluated_from": source}
    if not collapsed(kl):
        return CheckResult("T3", claim, "section 5.3", "fails", values, witness={"kl": kl},
                           summary=f"the 'collapsed' reference is not collapsed: KL = {kl:.3g} >= {COLLAPSE_KL:g}")
    if below:
        i = below[0]
        return CheckResult("T3", claim, "section 5.3", "fails", values,
                           witness={"clustering": i, "l_C": float(losses[i]), "delta_C": float(dC[i])},
                           summary=f"l_C < delta_C for {len(below)} clustering(s), e.g. {i}: {float(losses[i]):.4g} < {float(dC[i]):.4g}")
    return CheckResult("T3", claim, "section 5.3", "holds", values, tolerance=ctx.tol,
                       summary=f"KL = {kl:.2g} < {COLLAPSE_KL:g}, spread/total variance = {values['spread_ratio']:.2g}, "
                               "l_C >= delta_C (1 - tau) for every clustering")


def check_t4(ctx: RunContext, *, margin: float = 0.05, snapshot: str = "final") -> CheckResult:
    """T4: the witness certificate of the companion notes: a softmax witness on mu(x) alone beats the
    best constant student (which pays exactly I_T) by more than ``margin`` nats on held-out rows."""
    from hcdiag.checks.witness import certify_nonconstant

    claim = "The final encoder mean is not constant in x (certificate: alignment loss < I_T - margin)."
    resp = ctx.run.clusterings.resp
    if resp is None:
        return inconclusive("T4", claim, "companion notes (seed 000)", "the run file stores no responsibilities "
                            "(clusterings.resp) for the teacher")
    names = ctx.order
    if not names:
        return inconclusive("T4", claim, "companion notes (seed 000)", "the run stores no snapshot or outputs yet")
    snap = snapshot if snapshot in names else names[-1]
    if snap != snapshot:
        ctx.note_default(f"snapshots.{snapshot}", snap, f"no snapshot is named {snapshot!r}: T4 certifies the "
                         "last one in training order")
    st3 = ctx.run.stage3
    ref = ctx.run.refinement
    cid = st3.clustering if st3 is not None else (ref.pair[0] if ref is not None else 0)
    if st3 is None:
        ctx.note_default("stage3.clustering", cid, "stage3 is absent: the teacher is the clustering of "
                         + ("refinement.pair[0]" if ref is not None else "id 0 (no refinement either)"))
    T = resp[cid].double()
    T = T / T.sum(1, keepdim=True)  # rows validated to sum to 1 within RESP_ROW_TOL: remove float32 rounding
    m = T.shape[0]
    fit, ev = torch.arange(0, m, 2), torch.arange(1, m, 2)  # fixed split: even rows fit, odd rows evaluate

    def cert(mu):
        return certify_nonconstant(mu[fit].double().cpu(), T[fit], mu[ev].double().cpu(), T[ev], margin=margin)

    c = cert(ctx.outputs(snap)[0])
    values = {"snapshot": snap, "clustering": cid, **c.to_dict()}
    col_out = ctx.reference_outputs("collapsed")
    if col_out is not None:  # RunContext refuses rebuilt outputs that are not finite
        values["collapsed_reference"] = cert(col_out[0]).to_dict()
    if c.certified:
        return CheckResult("T4", claim, "companion notes (seed 000)", "holds", values,
                           summary=f"certified: alignment loss {c.loss:.4g} < I_T - margin = "
                                   f"{c.teacher_information - margin:.4g} nats")
    return CheckResult("T4", claim, "companion notes (seed 000)", "fails", values,
                       witness={"loss": c.loss, "teacher_information": c.teacher_information, "margin": margin},
                       summary=f"not certified: alignment loss {c.loss:.4g} >= I_T - margin = "
                               f"{c.teacher_information - margin:.4g} nats")
