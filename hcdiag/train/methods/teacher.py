"""The teacher-guided VAE of the companion notes (seed 000; issue 13): a VAE whose latent mean is read by a
fixed simplex witness head and pulled towards a fixed teacher.

Definitions (the notes' abstracts leave them open; fixed here and recorded in the run file's ``teacher``):

* Teacher ``T(k|x)``: the responsibilities of one of the run's R0 stage-0 GMM fits (the same EM as HCT's stage
  0, on the data the VAE sees). Rule (the notes' per-seed teacher search): the fit with the largest teacher
  information ``I_T = H(mean_x T) - mean_x H(T(.|x))`` on the even evaluation rows, the fit split (ties: the
  lowest id); W3 and W4 certify on the odd rows, which the search never saw.
* The teacher's view (``teacher_view``, :mod:`hcdiag.views`): the teacher's targets are its responsibilities on
  a view of x (``identity``: x itself; ``noise:<sigma>``, ``shift:<p>``: random; ``pool:<k>``), while the
  encoder reads x. A random view is sampled ``teacher_view_samples`` times per row once, before training, and
  the step's targets are sample ``step mod M`` (deterministic and resumable).
* Witness ``W(k|x) = softmax_k(witness_beta <v_k, mu(x)>)`` with the K vertices of a centred regular simplex in
  the latent space (:mod:`hcdiag.simplex`; needs ``latent_dim >= K - 1``). Nothing of the head is trained.
* Objective: the VAE loss of the run's convention (KL weight 1) plus ``teacher_alpha x mean_batch KL(T(.|x) ||
  W(.|x))`` (the alignment loss L_TS, nats). ``teacher_alpha = 0`` is the plain VAE with the head watching.

Training is the baselines' epoch loop (:func:`hcdiag.train.methods.vae.train_vae`): ``epochs`` data epochs,
snapshots ``init``, evenly spaced epochs and ``final``; ``history.cluster`` holds the batch-mean L_TS.
"""

from __future__ import annotations

import numpy as np
import torch

from hcdiag.checks.witness import teacher_information
from hcdiag.train.methods.vae import Vanilla

RULE = "largest teacher information I_T on the even evaluation rows, the fit split (ties: lowest id)"
VIEW_SEED = 7919  # the training view samples' seed offset from the run's seed (the checks draw their own)


def choose_teacher(resp: torch.Tensor) -> tuple[int, list[float]]:
    """The teacher's clustering id by :data:`RULE` from the responsibilities ``resp`` (R0, m, K) on the
    evaluation rows (the even rows are used), and every clustering's I_T there (nats)."""
    fit = resp[:, 0::2].double()
    infos = [teacher_information(fit[r] / fit[r].sum(1, keepdim=True)) for r in range(fit.shape[0])]
    return int(np.argmax(infos)), infos


def view_targets(clusterings: dict, x: np.ndarray, cid: int, view, samples: int, seed: int,
                 image_shape=None) -> np.ndarray:
    """``T(k|view_j(x))`` (M, n, K) of clustering ``cid`` on ``samples`` sampled views of the rows ``x`` (one for
    a deterministic view), from ``seed``."""
    from hcdiag.views import parse_view

    v = parse_view(view, image_shape)
    return np.stack([teacher_rows(clusterings, xv, cid) for xv in v.samples(x, samples, seed, image_shape)])


def teacher_rows(clusterings: dict, x: np.ndarray, cid: int) -> np.ndarray:
    """``T(k|x)`` (n, K) of clustering ``cid`` (the run file's ``clusterings`` part) on the rows ``x`` (n, N)."""
    from hcdiag.clusterings import ClusteringSet

    def one(key):
        v = clusterings.get(key)
        return None if v is None else np.asarray(v[cid:cid + 1], dtype=np.float64)

    cs = ClusteringSet(centroids=one("centroids"), weights=one("weights"), covariances=one("covariances"),
                       covariance_type=clusterings["covariance_type"], seeds=np.asarray(clusterings["seeds"][cid:cid + 1]),
                       loglik=one("loglik"), n_iter=np.zeros(1), converged=np.ones(1, dtype=bool), backend="", init="")
    return cs.responsibilities(x)[0]


def alignment(T: torch.Tensor, mu: torch.Tensor, V: torch.Tensor, beta_w: float) -> torch.Tensor:
    """``mean_rows KL(T || softmax(beta_w mu V^T))`` in nats (a differentiable scalar); ``0 log 0 = 0``."""
    log_w = torch.log_softmax(beta_w * (mu @ V.T), dim=1)
    return (T * (torch.log(T.clamp_min(1e-30)) - log_w)).sum(1).mean()


class Teacher(Vanilla):
    """The teacher-guided VAE (module docstring)."""

    name = "teacher"

    def begin(self, t, model, run, weights):
        from hcdiag.records import Clusterings
        from hcdiag.simplex import simplex_vertices

        ctx = super().begin(t, model, run, weights)
        c = t.cfg
        cl = Clusterings.from_dict(run["clusterings"])
        cid, infos = choose_teacher(cl.resp)
        shape = getattr(t.dataset, "image_shape", None)
        T = view_targets(run["clusterings"], t.x_np, cid, c.teacher_view, c.teacher_view_samples,
                         c.seed + VIEW_SEED, shape)
        V = simplex_vertices(T.shape[-1], c.latent_dim, dtype=torch.float32).to(t.device)
        ctx.update(T=torch.as_tensor(T, dtype=torch.float32, device=t.device), V=V)
        t.writer.set_extra("teacher", {"clustering": cid, "rule": RULE, "I_T": [float(v) for v in infos],
                                       "alpha": float(c.teacher_alpha), "beta_w": float(c.witness_beta),
                                       "vertices": V.detach().cpu().clone(), "view": c.teacher_view,
                                       "view_samples": int(T.shape[0])})
        t.progress.summary(f"teacher: clustering {cid} (I_T = {infos[cid]:.4f} nats on the fit rows, the largest of "
                           f"{len(infos)}), view {c.teacher_view}, alpha {c.teacher_alpha:g}, witness beta "
                           f"{c.witness_beta:g}")
        return ctx

    def epoch_terms(self, t, model, ctx, state, epoch):
        c = t.cfg
        terms = []
        for i in range(t.loop.steps_per_epoch):
            j = (state["step"] + i) % ctx["T"].shape[0]  # the run's step i of this epoch reads view sample j
            idx, xb = t.loop.batch_with_index(state)
            Tb = ctx["T"][j, idx]
            terms.append(t.loop.step(model, ctx["opt"], state, None, 0.0, 1.0, xb=xb, weights=ctx["weights"],
                                     extra=lambda mu, Tb=Tb: alignment(Tb, mu, ctx["V"], c.witness_beta),
                                     extra_weight=c.teacher_alpha))
        return terms


__all__ = ["RULE", "Teacher", "alignment", "choose_teacher", "teacher_rows", "view_targets"]
