"""Lemma 4.3, nested feasible regions ``F_T ⊂ F_{T-1} ⊂ ... ⊂ F_0``: checks N1, N2, N3.

The paper's proof is not valid as written (claims.md): ``K_{t+1} ⊂ K_t`` makes the max over
``K_{t+1}`` smaller, so ``F_{t+1}`` is in general LARGER in the directions that only discarded
clusterings constrain. The inclusion is an empirical question; these checks ask it three ways.
"""

from __future__ import annotations

import torch

from hcdiag.checks.base import CheckResult, RunContext, inconclusive

SECTION = "Lemma 4.3"
CLAIM = "The feasible regions are nested: F_T ⊂ F_{T-1} ⊂ ... ⊂ F_0."


def _need_regions(ctx: RunContext, id: str, claim: str):
    regs = ctx.regions()
    if len(regs) < 2:
        return None, inconclusive(id, claim, SECTION, f"the run has {len(regs)} feasible region(s); nesting needs at least 2 "
                                  f"(method {ctx.run.method!r} has no stage-1 rounds and refinement)")
    return regs, None


def check_n1(ctx: RunContext) -> CheckResult:
    """N1: the thresholds shrink, ``eps_{t+1} <= eps_t`` for every t (the proof's own assumption)."""
    claim = "The thresholds shrink: eps_{t+1} <= eps_t for every t (the proof's assumption)."
    regs, bad = _need_regions(ctx, "N1", claim)
    if bad:
        return bad
    eps = [r.eps for r in regs]
    rises = [{"from": regs[i].name, "to": regs[i + 1].name, "eps_from": eps[i], "eps_to": eps[i + 1],
              "ratio": eps[i + 1] / eps[i] if eps[i] > 0 else float("inf")}
             for i in range(len(eps) - 1) if eps[i + 1] > eps[i]]
    values = {"regions": [r.name for r in regs], "eps": eps}
    if rises:
        w = max(rises, key=lambda d: d["ratio"])
        return CheckResult("N1", claim, SECTION, "fails", values, witness=w,
                           summary=f"eps rises from {w['from']} to {w['to']}: {w['eps_from']:.4g} -> {w['eps_to']:.4g} "
                                   f"(x{w['ratio']:.3g})")
    return CheckResult("N1", claim, SECTION, "holds", values,
                       summary=f"eps shrinks over {len(regs)} regions: {eps[0]:.4g} -> {eps[-1]:.4g}")


def check_n2(ctx: RunContext) -> CheckResult:
    """N2: trajectory memory, ``L_{K_t}(Theta_s) <= eps_t (1 + tau)`` for every snapshot s after round t."""
    claim = ("Trajectory memory: every later snapshot stays in every earlier region (Figure 2 left, "
             "'loss on discarded clusterings remains low').")
    regs, bad = _need_regions(ctx, "N2", claim)
    if bad:
        return bad
    order = ctx.order
    curves, worst = {}, None
    for reg in regs:
        if reg.snapshot not in order:
            continue
        later = order[order.index(reg.snapshot) + 1:]
        rows = []
        for s in later:
            inside, ratio = ctx.inside(ctx.losses(s), reg)
            rows.append({"snapshot": s, "ratio": ratio, "inside": inside})
            if worst is None or ratio > worst["ratio"]:
                worst = {"region": reg.name, "snapshot": s, "ratio": ratio, "eps": reg.eps, "ids": list(reg.ids),
                         "L": ratio * reg.eps}
        curves[reg.name] = rows
    values = {"worst_ratio": worst["ratio"] if worst else None, "curves": curves, "tolerance": ctx.tol}
    if worst is None:
        return inconclusive("N2", claim, SECTION, "no snapshot follows any region's formation", **values)
    if worst["ratio"] > 1 + ctx.tol:
        n_out = sum(not r["inside"] for rows in curves.values() for r in rows)
        return CheckResult("N2", claim, SECTION, "fails", values, witness=worst, tolerance=ctx.tol,
                           summary=f"{n_out} (region, later snapshot) pairs leave the region; worst "
                                   f"{worst['snapshot']} in {worst['region']}: L/eps = {worst['ratio']:.3g} > 1 + tau")
    return CheckResult("N2", claim, SECTION, "holds", values, tolerance=ctx.tol,
                       summary=f"every later snapshot stays inside; worst L/eps = {worst['ratio']:.3g} <= 1 + tau")


def _perturb(state: dict, radius: float, gen: torch.Generator) -> dict:
    """Gaussian perturbation of every floating tensor, scaled per tensor by its own spread."""
    out = {}
    for k, v in state.items():
        if not torch.is_floating_point(v):
            out[k] = v
            continue
        scale = float(v.float().std()) if v.numel() > 1 else 0.0
        scale = scale if scale > 0 else max(float(v.abs().mean()), 1e-2)
        out[k] = v + radius * scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return out


def _lerp(a: dict, b: dict, alpha: float) -> dict:
    return {k: (torch.lerp(a[k], b[k], alpha) if torch.is_floating_point(a[k]) else a[k]) for k in a}


def probes(ctx: RunContext, radii=(0.01, 0.03, 0.1, 0.3), draws: int = 3, alphas=(0.25, 0.5, 0.75)):
    """Yield ``(description, losses (R0,))`` for N3's probes: snapshots, their Gaussian perturbations,
    points on straight lines between consecutive snapshots, and the no-history control."""
    order = ctx.order
    for s in order:
        yield {"probe": "snapshot", "snapshot": s}, ctx.losses(s)
    if not ctx.has_parameters:
        return
    gen = torch.Generator().manual_seed(ctx.seed)
    for s in order:
        st = ctx.state(s)
        if st is None:  # this snapshot has outputs only
            continue
        for r in radii:
            for d in range(draws):
                yield {"probe": "perturbation", "snapshot": s, "radius": r, "draw": d}, ctx.losses_of_state(_perturb(st, r, gen))
    for a, b in zip(order, order[1:]):
        sa, sb = ctx.state(a), ctx.state(b)
        if sa is None or sb is None:
            continue
        for al in alphas:
            yield {"probe": "line", "from": a, "to": b, "alpha": al}, ctx.losses_of_state(_lerp(sa, sb, al))
    ctrl = ctx.reference("control")
    out = ctx.reference_outputs("control") if ctrl is not None else None
    if out is not None:  # rebuilt with its own config.model (else the run's), or its stored outputs
        yield {"probe": "control", "pair": ctrl.config.get("pair")}, ctx.losses_of_xhat(out[2])


def _probe_label(w: dict) -> str:
    """A probe in words: 'snapshot round1', 'perturbation of stage3_2 (radius 0.1)', 'line round0 -> round1
    at alpha 0.5', 'control (no history)'."""
    kind = w["probe"]
    if kind == "snapshot":
        return f"snapshot {w['snapshot']}"
    if kind == "perturbation":
        return f"perturbation of {w['snapshot']} (radius {w['radius']:g})"
    if kind == "line":
        return f"line {w['from']} -> {w['to']} at alpha {w['alpha']:g}"
    return "control (trained on the final pair only)" if kind == "control" else str(kind)


def check_n3(ctx: RunContext, **probe_kw) -> CheckResult:
    """N3: falsification search for a witness ``Theta in F_{t+1} \\ F_t``."""
    claim = "Set inclusion F_{t+1} ⊂ F_t: no parameters lie in a later region but outside an earlier one."
    regs, bad = _need_regions(ctx, "N3", claim)
    if bad:
        return bad
    pairs = list(zip(regs, regs[1:]))
    n_probes, witnesses, counts = 0, [], {}
    first = None
    for desc, losses in probes(ctx, **probe_kw):
        n_probes += 1
        for earlier, later in pairs:
            in_later, r_later = ctx.inside(losses, later)
            in_earlier, r_earlier = ctx.inside(losses, earlier)
            if in_later and not in_earlier:
                key = f"{later.name} \\ {earlier.name}"
                counts[key] = counts.get(key, 0) + 1
                w = {**desc, "in": later.name, "not_in": earlier.name, "L_later_over_eps": r_later,
                     "L_earlier_over_eps": r_earlier, "losses": [float(v) for v in losses]}
                witnesses.append(w)
                if first is None or r_earlier > first["L_earlier_over_eps"]:
                    first = w
    values = {"probes": n_probes, "witnesses": len(witnesses), "witness_counts": counts, "tolerance": ctx.tol,
              "parameter_probes": ctx.has_parameters}
    if first is not None:
        return CheckResult("N3", claim, SECTION, "fails", values, witness=first, tolerance=ctx.tol,
                           summary=f"{len(witnesses)} of {n_probes} probes lie in a later region but not an earlier one; "
                                   f"strongest: {_probe_label(first)} in {first['in']}, "
                                   f"L/eps = {first['L_earlier_over_eps']:.3g} for {first['not_in']}")
    if not ctx.has_parameters:
        return inconclusive("N3", claim, SECTION, "no witness among the stored outputs; parameter probes need an "
                            "architecture hcdiag can rebuild (config.model)", **values)
    return CheckResult("N3", claim, SECTION, "holds", values, tolerance=ctx.tol,
                       summary=f"no witness among {n_probes} probes (a search, not a proof)")
