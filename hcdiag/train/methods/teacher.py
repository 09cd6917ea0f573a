"""The teacher-guided VAE of the companion notes (seed 000; issue 13): a VAE whose latent mean is read by a
fixed simplex witness head and pulled towards a fixed teacher.

Definitions (the notes' abstracts leave them open; fixed here and recorded in the run file's ``teacher``):

* Teacher ``T(k|x)``: the responsibilities of one of the run's R0 stage-0 GMM fits (the same EM as HCT's stage
  0, on the data the VAE sees). Rule (the notes' per-seed teacher search): the fit with the largest teacher
  information ``I_T = H(mean_x T) - mean_x H(T(.|x))`` on the even evaluation rows, the fit split (ties: the
  lowest id); W3 and W4 certify on the odd rows, which the search never saw.
* The teacher's features (``teacher_features``): ``input``, the stage-0 fits on x; or ``pca:<d>``, as the notes
  do: R0 EM fits (the run's K, covariance, backend and seeds) on the top-d principal components of the training
  rows, searched by the same rule; the projection (mean, components) and the chosen mixture are recorded in the
  run file's ``teacher`` (``projection``, ``gmm``) so that the checks recompute ``T`` from them.
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
from hcdiag.errors import InputError
from hcdiag.train.methods.vae import Vanilla

RULE = "largest teacher information I_T on the even evaluation rows, the fit split (ties: lowest id)"
VIEW_SEED = 7919  # the training view samples' seed offset from the run's seed (the checks draw their own)


def choose_teacher(resp: torch.Tensor) -> tuple[int, list[float]]:
    """The teacher's clustering id by :data:`RULE` from the responsibilities ``resp`` (R0, m, K) on the
    evaluation rows (the even rows are used), and every clustering's I_T there (nats)."""
    fit = resp[:, 0::2].double()
    infos = [teacher_information(fit[r] / fit[r].sum(1, keepdim=True)) for r in range(fit.shape[0])]
    return int(np.argmax(infos)), infos


class TeacherModel:
    """A fixed teacher: mixture ``cid`` of the clusterings-like dict ``gmm`` on the features of x (x itself, or
    ``(x - mean) @ components.T`` for a PCA teacher)."""

    def __init__(self, gmm: dict, cid: int, mean=None, components=None):
        self.gmm, self.cid = gmm, int(cid)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.components = None if components is None else np.asarray(components, dtype=np.float64)

    def features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x if self.mean is None else (x - self.mean) @ self.components.T

    def targets(self, x: np.ndarray) -> np.ndarray:
        """``T(k|x)`` (n, K) on the rows ``x`` (n, N)."""
        return teacher_rows(self.gmm, self.features(x), self.cid)

    @classmethod
    def of_run(cls, run_clusterings: dict, rec) -> TeacherModel:
        """The teacher of a run file: its ``teacher`` record (:class:`hcdiag.records.Teacher`) and, for an
        ``input`` teacher, the file's ``clusterings`` dict."""
        if parse_features(rec.features or "input") is not None:  # the record validated gmm and projection
            return cls(rec.gmm, 0, rec.projection["mean"].numpy(), rec.projection["components"].numpy())
        return cls(run_clusterings, rec.clustering)


def pca_projection(x: np.ndarray, d: int) -> dict:
    """``{"mean": (N,), "components": (d, N)}``: the top-d principal directions of the rows ``x`` (float64
    eigendecomposition of their covariance), each direction's sign fixed so that its largest entry is positive."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    xc = x - mean
    w, v = np.linalg.eigh(xc.T @ xc / max(1, x.shape[0] - 1))
    comps = v[:, np.argsort(w)[::-1][:d]].T
    comps *= np.sign(comps[np.arange(d), np.abs(comps).argmax(1)])[:, None]
    return {"mean": mean, "components": comps}


def view_targets(teacher: TeacherModel, x: np.ndarray, view, samples: int, seed: int, image_shape=None) -> np.ndarray:
    """``T(k|view_j(x))`` (M, n, K) of the ``teacher`` on ``samples`` sampled views of the rows ``x`` (one for a
    deterministic view), from ``seed``."""
    from hcdiag.views import parse_view

    v = parse_view(view, image_shape)
    return np.stack([teacher.targets(xv) for xv in v.samples(x, samples, seed, image_shape)])


def parse_features(spec: str, N: int | None = None) -> int | None:
    """None for ``input``, d for ``pca:<d>`` (1 <= d, and d <= N when N is given); refuses anything else."""
    s = str(spec).strip()
    if s == "input":
        return None
    kind, _, arg = s.partition(":")
    if kind != "pca" or not arg.isdigit() or int(arg) < 1:
        raise InputError(f"The 'teacher_features' parameter must be input or pca:<d> (d an integer >= 1). Got {s!r}.")
    if N is not None and int(arg) > N:
        raise InputError(f"The 'teacher_features' parameter {s!r} asks for {arg} principal components of data with "
                         f"N = {N} dimensions; choose d <= {N}.")
    return int(arg)


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
        d = parse_features(c.teacher_features, t.N)
        extra = {}
        if d is None:
            cl = Clusterings.from_dict(run["clusterings"])
            cid, infos = choose_teacher(cl.resp)
            teacher = TeacherModel(run["clusterings"], cid)
        else:
            cid, infos, teacher, extra = self._pca_teacher(t, d)
        shape = getattr(t.dataset, "image_shape", None)
        T = view_targets(teacher, t.x_np, c.teacher_view, c.teacher_view_samples, c.seed + VIEW_SEED, shape)
        V = simplex_vertices(T.shape[-1], c.latent_dim, dtype=torch.float32).to(t.device)
        ctx.update(T=torch.as_tensor(T, dtype=torch.float32, device=t.device), V=V)
        t.writer.set_extra("teacher", {"clustering": cid, "rule": RULE, "I_T": [float(v) for v in infos],
                                       "alpha": float(c.teacher_alpha), "beta_w": float(c.witness_beta),
                                       "vertices": V.detach().cpu().clone(), "view": c.teacher_view,
                                       "view_samples": int(T.shape[0]), "features": c.teacher_features, **extra})
        t.progress.summary(f"teacher: {'clustering' if d is None else f'PCA-{d} fit'} {cid} (I_T = {infos[cid]:.4f} "
                           f"nats on the fit rows, the largest of {len(infos)}), view {c.teacher_view}, alpha "
                           f"{c.teacher_alpha:g}, witness beta {c.witness_beta:g}")
        return ctx

    @staticmethod
    def _pca_teacher(t, d: int):
        """The notes' teacher search on PCA features: R0 EM fits on the top-d components (through the EM cache
        when the run has one), the one with the largest I_T on the even evaluation rows."""
        from hcdiag.clusterings import fit_clusterings, fit_clusterings_cached

        c = t.cfg
        proj = pca_projection(t.x_np, d)
        model = TeacherModel({}, 0, proj["mean"], proj["components"])
        F = np.ascontiguousarray(model.features(t.x_np), dtype=np.float32)
        em = dict(covariance=c.covariance, backend=c.em_backend, init=c.em_init, seed=c.seed, device=t.device,
                  uneven=c.uneven or c.keep_ratio != 0.5)
        cs = (fit_clusterings_cached(t.em_cache, F, c.r0, c.k, **em)[0] if t.em_cache is not None
              else fit_clusterings(F, c.r0, c.k, **em))
        resp = torch.as_tensor(cs.responsibilities(model.features(t.x_np[t.eval_idx])))
        cid, infos = choose_teacher(resp)

        def one(a):
            return None if a is None else torch.as_tensor(np.asarray(a[cid:cid + 1]), dtype=torch.float64)

        gmm = {"centroids": one(cs.centroids), "weights": one(cs.weights), "seeds": torch.as_tensor(cs.seeds[cid:cid + 1]),
               "loglik": one(cs.loglik), "covariance_type": cs.covariance_type}
        if cs.covariances is not None:
            gmm["covariances"] = one(cs.covariances)
        projection = {"mean": torch.as_tensor(proj["mean"]), "components": torch.as_tensor(proj["components"])}
        return cid, infos, TeacherModel(gmm, 0, proj["mean"], proj["components"]), {"projection": projection, "gmm": gmm}

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


__all__ = ["RULE", "Teacher", "TeacherModel", "alignment", "choose_teacher", "parse_features", "pca_projection",
           "teacher_rows", "view_targets"]
