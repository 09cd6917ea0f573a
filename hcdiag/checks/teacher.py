"""W3 and W4: the teacher-guided VAE's simplex-witness certificate along training and its view gap (companion
notes, seed 000; issue 13).

The run's own head (``teacher.vertices``, ``teacher.beta_w``) reads each snapshot's latent mean on the held-out
evaluation rows (the odd rows, as T4; the teacher search used the even rows), and the certificate's kernel
(:func:`hcdiag.checks.witness.certificate_gap`, shared with T4) gives ``G_T = I_T - L_TS`` against the run's
teacher. With the ``identity`` view the teacher is the file's ``clusterings.resp`` of ``teacher.clustering``;
with another view (``teacher.view``, :mod:`hcdiag.views`), or a teacher on PCA features (``teacher.projection``,
``teacher.gmm``), it is recomputed from the teacher's parameters on ``samples`` views of each held-out row drawn
here (one for a deterministic view), and the pairs (row, view) are the certificate's rows: the
best constant student still pays exactly their I_T.

W3 holds when every snapshot after ``init`` is certified (``G_T > margin``). The certificate is one-sided: a
snapshot that is not certified is not thereby collapsed (the notes' own vanilla MNIST VAE has KL 19.26 and a
negative margin), so a failing verdict reports KL and active units beside the gap.

W4 (the view gap, :func:`hcdiag.checks.witness.view_gap`): no student that reads only x aligns below
``G_V = mean_x [H(Tbar(x)) - mean_j H(T_j(x))]`` on the sampled views, so the largest margin any such student can
reach is ``I_T - G_V``. For a deterministic view (``identity``, ``pool``) the gap is 0 exactly and W4 is
inconclusive (there is no view gap to bound). For a random view W4 holds when the view leaves the certificate
reachable (``I_T - G_V > margin``, conservatively: see below) and fails when it leaves no room (no witness that
reads x can be certified against this teacher, however it is trained). Every snapshot's alignment is also
compared with the bound; a witness computed from ``mu(x)`` cannot break it (``mean_j KL(T_j || W) = G_V +
KL(Tbar || W)``), so a broken bound means the numbers are inconsistent and W4 fails saying so.
The bound is exact on the sampled views; as an estimate of the view distribution's gap, M samples per row
underestimate it: the plug-in entropy of the mean of M draws is biased low by at most ``log(1 + (K - 1) / M)``
nats (Paninski 2003, for one-hot draws; soft draws, conditional means of one-hot ones, less by concavity), so
the sampled reachable margin is optimistic by at most that much: W4 says the view leaves room only when
``I_T - G_V - log(1 + (K - 1) / M) > margin``, that it leaves none when ``I_T - G_V <= margin``, and is
inconclusive in between.
"""

from __future__ import annotations

import math

import torch

from hcdiag.checks.base import CheckResult, RunContext, inconclusive
from hcdiag.checks.witness import certificate_gap, view_certificate
from hcdiag.errors import InputError
from hcdiag.metrics import active_units, kl_total

SECTION = "companion notes (seed 000)"
CLAIM = ("Trained with alignment, the teacher-guided VAE's fixed simplex witness certifies its latent mean "
         "non-constant at every snapshot after init (G_T = I_T - L_TS > margin on held-out rows).")
CLAIM_W4 = ("No witness that reads only x aligns below the view gap G_V on held-out rows, and the teacher's view "
            "leaves the certificate reachable (I_T - G_V > margin).")
VIEW_SAMPLES = 64  # views drawn per held-out row by the checks (a random view)
VIEW_SEED = 104729  # the checks' own view samples (the training drew others)


def held_out_targets(ctx: RunContext, *, samples: int = VIEW_SAMPLES):
    """``(T (M, m_h, K) float64 on the odd evaluation rows, view spec)`` for the run's teacher, or ``(None,
    reason)`` when the file cannot give them; computed once per context."""
    def compute():
        rec = ctx.run.teacher
        view = rec.view
        if view is None:
            ctx.note_default("teacher.view", "identity", "teacher.view is absent (a file written before views)")
            view = "identity"
        held = torch.arange(1, ctx.run.eval.x.shape[0], 2)
        from hcdiag.train.methods.teacher import parse_features

        pca = parse_features(rec.features or "input") is not None
        if view == "identity" and not pca:
            resp = ctx.run.clusterings.resp
            if resp is None:
                return None, "the run file stores no responsibilities (clusterings.resp) for the teacher"
            T = resp[rec.clustering].double()
            T = T / T.sum(1, keepdim=True)  # rows validated to sum to 1 within RESP_ROW_TOL: remove float32 rounding
            return T[held].unsqueeze(0), view
        from hcdiag.train.methods.teacher import TeacherModel, view_targets

        cl = ctx.run.clusterings.to_dict()
        if not pca and cl.get("covariances") is None:
            return None, (f"the teacher's view is {view} and the run file stores no clustering covariances "
                          "(clusterings.covariances) to compute its targets on the views")
        if pca and rec.gmm.get("covariances") is None:
            return None, f"the {rec.features} teacher's mixture stores no covariances (teacher.gmm.covariances)"
        shape = ((ctx.run.config.dataset or {}).get("image_shape") if ctx.run.config is not None else None)
        x = ctx.run.eval.x.double().cpu().numpy()[held.numpy()]
        try:
            T = view_targets(TeacherModel.of_run(cl, rec), x, view, samples, ctx.seed + VIEW_SEED, shape)
        except InputError as exc:
            return None, f"the teacher's targets on the view {view} cannot be computed: {str(exc)}"
        return torch.as_tensor(T, dtype=torch.float64), view

    return ctx.cached("teacher-held-out-targets", compute)


def _rows(ctx: RunContext, T: torch.Tensor, names: list[str]):
    """Per snapshot: the head's W on the held-out rows and the kernel's numbers (cached: W3 and W4 share them)."""
    def compute():
        rec = ctx.run.teacher
        held = torch.arange(1, ctx.run.eval.x.shape[0], 2)
        V = rec.vertices.double()
        out = []
        for s in names:
            mu, lv, _ = ctx.outputs(s)
            W = torch.softmax(rec.beta_w * (mu.double().cpu()[held] @ V.T), dim=1)
            if T.shape[0] == 1:
                info, loss, gap = certificate_gap(T[0], W)
                vg_gap, reach = 0.0, info
            else:
                vg, loss = view_certificate(T, W)
                info, gap, vg_gap, reach = vg.I_T, vg.I_T - loss, vg.gap, vg.reachable
            out.append({"snapshot": s, "I_T": info, "L_TS": loss, "G_T": gap, "G_V": vg_gap, "reachable": reach,
                        "kl": kl_total(mu, lv), "au": int(active_units(mu).count)})
        return out

    return ctx.cached("teacher-rows", compute)


def _setup(ctx: RunContext, cid: str, claim: str):
    rec = ctx.run.teacher
    if rec is None:
        return None, inconclusive(cid, claim, SECTION, "the run has no teacher-guided VAE record (teacher), so no "
                                  "witness head to certify with")
    T, view = held_out_targets(ctx)
    if T is None:
        return None, inconclusive(cid, claim, SECTION, view)
    names = [s for s in ctx.order if s != "init"]
    if not names:
        return None, inconclusive(cid, claim, SECTION, "the run stores no snapshot after init")
    return (rec, T, view, names), None


def check_w3(ctx: RunContext, *, margin: float = 0.05) -> CheckResult:
    got, res = _setup(ctx, "W3", CLAIM)
    if res is not None:
        return res
    rec, T, view, names = got
    rows = [{**r, "certified": r["G_T"] > margin} for r in _rows(ctx, T, names)]
    values = {"rows": rows, "margin": margin, "clustering": rec.clustering, "beta_w": rec.beta_w, "alpha": rec.alpha,
              "view": view, "view_samples": int(T.shape[0]), "held_out_rows": int(T.shape[1]),
              "min_gap": min(r["G_T"] for r in rows)}
    bad = [r for r in rows if not r["certified"]]
    if bad:
        r = bad[0]
        return CheckResult("W3", CLAIM, SECTION, "fails", values,
                           witness={"snapshot": r["snapshot"], "G_T": r["G_T"]},
                           summary=f"{len(bad)} of {len(rows)} snapshots not certified, first {r['snapshot']}: "
                                   f"G_T = {r['G_T']:.4g} <= margin {margin:g} (I_T {r['I_T']:.4g}, L_TS "
                                   f"{r['L_TS']:.4g}); not certified is not collapsed: KL there {r['kl']:.3g}, "
                                   f"{r['au']} active units")
    return CheckResult("W3", CLAIM, SECTION, "holds", values,
                       summary=f"every snapshot after init certified: G_T >= {values['min_gap']:.4g} > margin "
                               f"{margin:g} on {values['held_out_rows']} held-out rows")


def check_w4(ctx: RunContext, *, margin: float = 0.05, tol: float = 1e-9) -> CheckResult:
    got, res = _setup(ctx, "W4", CLAIM_W4)
    if res is not None:
        return res
    rec, T, view, names = got
    from hcdiag.views import parse_view

    if parse_view(view).deterministic:
        return inconclusive("W4", CLAIM_W4, SECTION, f"the teacher's view is {view}, a function of x: its view gap is "
                            "0 exactly, so there is no gap to bound (W3 decides the certificate)", view=view)
    rows = [{**r, "bound_holds": r["L_TS"] >= r["G_V"] - tol} for r in _rows(ctx, T, names)]
    reach = rows[0]["reachable"]
    values = {"rows": rows, "margin": margin, "view": view, "view_samples": int(T.shape[0]),
              "held_out_rows": int(T.shape[1]), "I_T": rows[0]["I_T"], "G_V": rows[0]["G_V"], "reachable": reach}
    M, K = int(T.shape[0]), int(T.shape[2])
    bias = math.log1p((K - 1) / M)
    values["sampling_bias"] = bias
    broken = [r for r in rows if not r["bound_holds"]]
    if broken:
        r = broken[0]
        return CheckResult("W4", CLAIM_W4, SECTION, "fails", values,
                           witness={"snapshot": r["snapshot"], "L_TS": r["L_TS"], "G_V": r["G_V"]},
                           summary=f"the bound is broken at {r['snapshot']}: L_TS {r['L_TS']:.6g} < G_V {r['G_V']:.6g} "
                                   f"under view {view}, which a witness that reads only x cannot do")
    if reach <= margin:
        return CheckResult("W4", CLAIM_W4, SECTION, "fails", values,
                           witness={"I_T": rows[0]["I_T"], "G_V": rows[0]["G_V"]},
                           summary=f"the view {view} leaves no room for the certificate: I_T {rows[0]['I_T']:.4g} - "
                                   f"G_V {rows[0]['G_V']:.4g} = {reach:.4g} <= margin {margin:g}, so no witness that "
                                   "reads x can be certified against this teacher, however it is trained")
    if reach - bias <= margin:
        return inconclusive("W4", CLAIM_W4, SECTION,
                            f"the view {view} may leave no room for the certificate: I_T - G_V = {reach:.4g} on "
                            f"{M} view samples per row, optimistic by up to log(1 + (K - 1) / M) = {bias:.3g}, so the "
                            f"margin {margin:g} may not be reachable; more samples would tell", **values)
    best = min(r["L_TS"] - r["G_V"] for r in rows)
    return CheckResult("W4", CLAIM_W4, SECTION, "holds", values,
                       summary=f"view {view}: every snapshot aligns at or above the gap G_V = {rows[0]['G_V']:.4g} "
                               f"(closest: {best:.4g} above), and I_T - G_V = {reach:.4g} > margin {margin:g} leaves the "
                               f"certificate reachable ({int(T.shape[0])} view sample(s) of {int(T.shape[1])} held-out rows)")
