"""Collapse metrics at every snapshot: KL (total and per dimension), active units (Burda et al. 2015 as
primary, the paper's two variants labelled), mutual information and reconstruction MSE."""

from __future__ import annotations

from hcdiag.checks.base import CheckResult, RunContext, inconclusive
from hcdiag.claims import collapsed
from hcdiag.metrics import collapse_metrics
from hcdiag.paper import AU_THRESHOLD, COLLAPSE_KL


def snapshot_metrics(ctx: RunContext) -> list[dict]:
    rows = []
    for s in ctx.order:
        mu, lv, xhat = ctx.outputs(s)
        m = collapse_metrics(ctx.x, mu, lv, xhat, seed=ctx.seed)
        rows.append({"snapshot": s, "kl": m.kl, "kl_per_dim": m.kl_per_dim.tolist(), "au": int(m.au.count),
                     "au_paper_posterior": int(m.au_paper_posterior.count),
                     "au_paper_variance": int(m.au_paper_variance.count), "mi": m.mi, "mse": m.mse,
                     "collapsed": bool(m.collapsed)})
    return rows


def _final(ctx: RunContext, id: str, claim: str):
    if not ctx.order:
        return None, inconclusive(id, claim, "section 5.1.4", "the run stores no snapshot or outputs")
    return ctx.cached("snapshot_metrics", lambda: snapshot_metrics(ctx)), None


def check_kl(ctx: RunContext) -> CheckResult:
    claim = f"The method achieves non-collapsed representations: final KL(q(z|x) || p(z)) >= {COLLAPSE_KL:g} nats."
    rows, bad = _final(ctx, "KL", claim)
    if bad:
        return bad
    f = rows[-1]
    values = {"final": f, "snapshots": rows}
    verdict = "fails" if collapsed(f["kl"]) else "holds"
    return CheckResult("KL", claim, "sections 5.1.4, 5.4", verdict, values,
                       witness=None if verdict == "holds" else {"snapshot": f["snapshot"], "kl": f["kl"]},
                       summary=f"final KL = {f['kl']:.4g} nats (MI {f['mi']:.3g}, MSE {f['mse']:.4g})"
                               + ("" if verdict == "holds" else f": collapsed (KL < {COLLAPSE_KL:g})"))


def check_au(ctx: RunContext) -> CheckResult:
    claim = f"At least one latent dimension stays active (Burda et al. 2015: Var_x(mu_j) >= {AU_THRESHOLD:g})."
    rows, bad = _final(ctx, "AU", claim)
    if bad:
        return bad
    f = rows[-1]
    values = {"final": {k: f[k] for k in ("au", "au_paper_posterior", "au_paper_variance")},
              "definitions": {"au": f"Burda et al. 2015 / He et al. 2019 calc_au: unbiased Var_x(mu_j) >= {AU_THRESHOLD:g}",
                              "au_paper_posterior": "paper 5.1.4: E_x[s_j^2(x)] < 0.99",
                              "au_paper_variance": "paper 5.2 / Table 3: Var_x(mu_j) > 0.005"},
              "snapshots": [{k: r[k] for k in ("snapshot", "au", "au_paper_posterior", "au_paper_variance")} for r in rows]}
    verdict = "holds" if f["au"] >= 1 else "fails"
    return CheckResult("AU", claim, "sections 5.1.4, 5.2", verdict, values,
                       witness=None if verdict == "holds" else {"snapshot": f["snapshot"], "au": f["au"]},
                       summary=f"final active units: {f['au']} (Burda), {f['au_paper_posterior']} (paper 5.1.4), "
                               f"{f['au_paper_variance']} (paper Table 3)")
