"""The step loop every method runs: the data stream, one optimisation step, a cycle over clusterings, and
the deterministic evaluation on the fixed eval rows.

A run's randomness lives in its *stream state*, a plain dict (so the run file can store it and
``--resume`` continue it bitwise): ``g_idx`` (CPU generator of the batch permutations), ``g_noise`` (the
reparameterisation noise, on the device), ``perm``/``pos`` (the current permutation and position), and the
counters ``step`` and ``epoch``. Every draw happens here, in a fixed order.
"""

from __future__ import annotations

import torch

from hcdiag.losses import LossWeights, reparameterize
from hcdiag.models import encode_decode
from hcdiag.train.objectives import ClusterTerm, vae_terms


class NonFinite(Exception):
    """A non-finite loss at ``where`` (stage, round, epoch, step); the trainer keeps the last good state."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class Loop:
    """The data (``X`` (n, N) on ``device``), its evaluation rows ``eval_x`` (m, N), the loss ``weights``
    and the clusterings' ``centroids`` (R0, K, N) of one run, and the steps that train on them.

    ``batch_size`` rows per step. A *cycle* (HCT's "epoch") is, by ``unit`` (the readings of the paper's
    epoch, :data:`hcdiag.train.config.EPOCH_UNITS`):

    * ``steps`` or ``epochs``: every active clustering gets ``spc`` steps (``epochs``: ``spc`` is a data pass,
      so a cycle costs ``|S_t|`` passes);
    * ``data_pass``: one pass over the data (``steps_per_epoch`` steps) whose steps cycle through the active
      clusterings, the run's step ``s`` on ``active[s mod |S_t|]``: the rotation goes on across cycles, so
      every clustering gets the same number of steps (within one) however ``steps_per_epoch`` divides, and a
      cycle costs one pass whatever ``|S_t|`` is.

    Steps train on one clustering's term at a time (``mode='cycle'``, Algorithm 1) or on every active
    clustering's term in each step (``mode='simultaneous'``, section 4.1: then ``data_pass`` is one pass of
    such steps)."""

    def __init__(self, X: torch.Tensor, eval_x: torch.Tensor, weights: LossWeights, *, batch_size: int, spc: int,
                 mode: str, device: torch.device, unit: str = "steps"):
        self.X, self.eval_x, self.weights = X, eval_x, weights
        self.n = X.shape[0]
        self.batch_size, self.spc, self.mode, self.device, self.unit = batch_size, spc, mode, device, unit
        self.steps_per_epoch = -(-self.n // batch_size)
        self.centroids: torch.Tensor | None = None
        self._cluster: ClusterTerm | None = None

    def steps_per_cycle(self, active: int) -> int:
        """Optimizer steps in one cycle over ``active`` clusterings."""
        if self.unit == "data_pass":
            return self.steps_per_epoch
        return self.spc if self.mode == "simultaneous" else self.spc * active

    def set_centroids(self, centroids: torch.Tensor) -> None:
        """The run's clusterings (R0, K, N), on the device, float32 (the training term's precision)."""
        self.centroids = centroids.to(self.device).float()
        self._cluster = ClusterTerm(self.centroids)

    # -- the stream -------------------------------------------------------------------------------------
    def new_state(self, seed: int) -> dict:
        """A fresh stream: generators seeded from ``seed`` (batches) and ``seed + 1`` (noise)."""
        g_idx = torch.Generator(device="cpu").manual_seed(seed)
        g_noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        return {"g_idx": g_idx, "g_noise": g_noise, "perm": None, "pos": 0, "step": 0, "epoch": 0}

    def batch(self, state: dict) -> torch.Tensor:
        """The next ``batch_size`` rows of the current permutation (a new one when it runs out)."""
        return self.batch_with_index(state)[1]

    def batch_with_index(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row indices, rows)`` of the next batch (:meth:`batch`; a method that keeps per-row data, such as the
        teacher-guided VAE's teacher, reads it at those indices)."""
        perm, pos = state["perm"], state["pos"]
        if perm is None or pos + self.batch_size > len(perm):
            perm = torch.randperm(self.n, generator=state["g_idx"])
            pos = 0
        idx = perm[pos:pos + self.batch_size]
        state["perm"], state["pos"] = perm, pos + self.batch_size
        idx = idx.to(self.device)
        return idx, self.X[idx]

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, model, opt, state: dict, ids: torch.Tensor | None, beta: float, kl_weight: float,
             free_bits: float = 0.0, xb: torch.Tensor | None = None, weights: LossWeights | None = None,
             extra=None, extra_weight: float = 1.0):
        """One step of ``opt`` on the next batch of the stream, or on ``xb`` when given (the aggressive
        baseline chooses its own batches), with the clusterings ``ids`` weighted by ``beta``; ``extra(mu)``, when
        given, is a method's own term on the batch's latent means, added to the loss times ``extra_weight``.
        Returns the detached (loss, recon, kl, cluster) of the batch; ``cluster`` is the extra term when given."""
        xb = self.batch(state) if xb is None else xb
        w = weights or self.weights
        mu, lv = model.encode(xb)
        f = model.decode(reparameterize(mu, lv, state["g_noise"]))
        loss, recon, kl = vae_terms(xb, mu, lv, f, w, kl_weight, free_bits)
        cl = torch.zeros((), device=self.device)
        if ids is not None and beta > 0:
            cl = self._cluster(f, ids)
            loss = loss + beta * w.cluster * cl
        if extra is not None:
            cl = extra(mu)
            loss = loss + extra_weight * cl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return torch.stack([loss.detach(), recon.detach(), kl.detach(), cl.detach()])

    def cycle(self, model, opt, state: dict, active: list[int], beta: float, where: str) -> torch.Tensor:
        """One cycle over the ``active`` clusterings (see the class); the mean of its steps' terms (4,)."""
        ids_all = torch.tensor(active, device=self.device)
        terms = []
        if self.mode == "simultaneous":
            for _ in range(self.steps_per_cycle(len(active))):
                terms.append(self.step(model, opt, state, ids_all, beta, 1.0))
        elif self.unit == "data_pass":  # the rotation goes on from the run's step count (saved: resume is exact)
            for i in range(self.steps_per_epoch):
                j = (state["step"] + i) % len(active)
                terms.append(self.step(model, opt, state, ids_all[j:j + 1], beta, 1.0))
        else:
            for _ in range(self.spc):
                for i in range(len(active)):
                    terms.append(self.step(model, opt, state, ids_all[i:i + 1], beta, 1.0))
        t = torch.stack(terms)  # (steps, 4)
        self.check_finite(t, where, state)
        state["step"] += len(terms)
        return t.mean(0)

    @staticmethod
    def check_finite(t: torch.Tensor, where: str, state: dict) -> None:
        """Raise :class:`NonFinite` naming the first step of ``t`` (steps, 4) whose loss is not finite."""
        finite = torch.isfinite(t[:, 0])
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise NonFinite(f"{where}, step {state['step'] + bad + 1}")

    # -- evaluation (deterministic: xhat = f(mu(x)) on the fixed eval rows) --------------------------------
    def evaluate(self, model) -> dict:
        """KL (nats), active units, MSE and, with clusterings, l_C of every clustering (R0,) on eval_x."""
        from hcdiag.metrics import active_units, clustering_losses, kl_per_dim

        mu, lv, xhat = encode_decode(model, self.eval_x)
        out = {"kl": float(kl_per_dim(mu, lv).sum()), "au": int(active_units(mu).count),
               "mse": float(((self.eval_x - xhat) ** 2).mean())}
        if self.centroids is not None:
            # eq. 8 in float64: these values select the kept clusterings and decide refinement (eps down to
            # 1e-6), where float32's ||x||^2 - 2 x.mu + ||mu||^2 cancels away the answer (the training loop's
            # clustering term, a gradient, stays in float32)
            out["losses"] = clustering_losses(xhat.double(), self.centroids.double()).cpu()
        return out
