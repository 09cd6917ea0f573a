"""Training section 7's diffusion models (issue 14): Algorithm 2 (historical consensus over noise schedules) and
its two controls, on one step budget.

* ``consensus`` (Algorithm 2): R = 2^k schedules of one kind (:func:`hcdiag.diffusion.schedules.family`); the
  denoiser is conditioned on (x_t, t, schedule index). While more than two schedules are active: ``E`` cycles,
  each one step per active schedule (the paper's "for epoch = 1 to E: for beta in S"), then every active schedule's
  validation loss (fixed rows, timesteps and noise) is measured and the half with the smallest loss is kept.
* ``single``: the same denoiser conditioned on t only, trained on one schedule (the family's middle one, index
  R // 2), for the same number of steps as ``consensus`` took.
* ``logsnr``: conditioned on the noise level only (log SNR), trained cycling through all R schedules for the same
  number of steps: a schedule only changes which noise levels are drawn.

A caution the paper does not give: Algorithm 2 ranks schedules by their epsilon-prediction loss, and that loss
is not comparable across schedules. Even a perfect denoiser's loss depends on the schedule (for data N(0, I) the
Bayes loss per dimension is ``mean_t abar_t``: 0.387, 0.309, 0.246, 0.195 for ``family('linear', 4)``), so "keep
the smallest losses" favours the noisiest schedules whatever the model learned. hcdiag runs the rule as written
(``rounds`` record every loss) and the checks report this confound beside the selection.

Each step draws a batch of rows, ``t ~ Uniform{1..T}`` and ``eps ~ N(0, I)`` from the run's own generator and
minimises ``mean ||eps - eps_hat(x_t, .)||^2``. Everything is float32 on the chosen device; draws come from a
CPU generator so that CPU and GPU runs see the same data, timesteps and noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from hcdiag.diffusion.model import Denoiser, Tables, q_sample
from hcdiag.diffusion.schedules import Schedule, family
from hcdiag.errors import InputError

METHODS = ("consensus", "single", "logsnr")
CONDITIONING = {"consensus": "schedule", "single": "timestep", "logsnr": "logsnr"}
MAX_R, MAX_WIDTH = 1024, 65536  # bounds on what a (possibly hostile) config may make a run allocate


def default_widths(d: int) -> tuple[int, int, int]:
    """Three hidden layers of ``max(128, 2 d)``: a denoiser must at least carry x_t (d numbers) through every layer
    (at high noise eps_hat is nearly x_t); 128 on Fashion-MNIST's 196 dimensions could not, and lost to the
    data-free predictor by 2-3x (hcdiag.checks.diffusion.competence). 128 for d <= 64 (digits, the synthetic data)."""
    w = min(MAX_WIDTH, max(128, 2 * int(d)))
    return (w, w, w)


@dataclass(frozen=True)
class DiffusionConfig:
    method: str = "consensus"
    kind: str = "linear"
    R: int = 4
    T: int = 1000
    spread: float = 2.0
    epochs_per_round: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    widths: tuple | None = None  # None: default_widths(d) of the data it trains on (recorded resolved)
    emb_dim: int = 32
    val_rows: int = 512
    test_rows: int = 512
    val_draws: int = 4
    seed: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"The diffusion method must be one of {', '.join(METHODS)}. Got {self.method!r}.")
        if not isinstance(self.R, int) or self.R < 4 or self.R & (self.R - 1):
            raise InputError(f"Algorithm 2 needs R = 2^k >= 4 schedules (with 2 it trains nothing: it stops when two "
                             f"remain). Got R = {self.R!r}.")
        for name in ("epochs_per_round", "batch_size", "val_rows", "test_rows", "val_draws", "emb_dim", "T"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"The '{name}' parameter must be an integer >= 1. Got {v!r}.")
        if self.R > MAX_R or self.emb_dim > MAX_WIDTH or self.T > 100_000:
            raise InputError(f"R <= {MAX_R}, emb_dim <= {MAX_WIDTH} and T <= 100000 bound what a run may allocate. Got "
                             f"R = {self.R}, emb_dim = {self.emb_dim}, T = {self.T}.")
        w = self.widths
        if w is not None and not (isinstance(w, (tuple, list)) and 1 <= len(w) <= 64 and all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WIDTH for v in w)):
            raise InputError(f"The 'widths' parameter must be 1 to 64 integers in 1..{MAX_WIDTH}. Got {w!r}.")
        for name, low in (("lr", 0.0), ("spread", 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
                    (v > low if name == "lr" else v >= low)):
                raise InputError(f"The '{name}' parameter must be a finite number {'>' if name == 'lr' else '>='} "
                                 f"{low:g}. Got {v!r}.")

    def resolved(self, d: int) -> "DiffusionConfig":
        """This config with its widths fixed for d-dimensional data (:func:`default_widths` when None)."""
        return self if self.widths is not None else replace(self, widths=default_widths(d))

    def schedules(self) -> list[Schedule]:
        return family(self.kind, self.R, T=self.T, spread=self.spread)

    def budget(self) -> int:
        """Optimizer steps of Algorithm 2 (and so of each control): E x |S| per round while |S| > 2."""
        steps, s = 0, self.R
        while s > 2:
            steps += self.epochs_per_round * s
            s //= 2
        return steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = None if self.widths is None else list(self.widths)
        return d


def split_rows(n: int, val_rows: int, test_rows: int, seed: int):
    """``(train, val, test)`` row indices: a permutation of ``n`` rows (numpy ``default_rng(seed)``), the first
    ``min(val_rows, n // 4)`` for Algorithm 2's selection, the next ``min(test_rows, n // 4)`` held out from training
    and selection alike (what the checks judge samples by: the selection rows favour the method that chose on them),
    the rest for training. The same for every method of one seed, so runs compare on the same rows."""
    if n < 4:
        raise InputError(f"Diffusion training needs at least 4 rows of data (train, selection and test rows); got {n}.")
    idx = np.random.default_rng(seed).permutation(n)
    v, t = min(val_rows, n // 4), min(test_rows, n // 4)
    return np.sort(idx[v + t:]), np.sort(idx[:v]), np.sort(idx[v:v + t])


class _Draws:
    """The run's draws, from one CPU generator: batch rows, timesteps, noise."""

    def __init__(self, seed: int, n: int, dim: int, batch: int, T: int):
        self.g = torch.Generator().manual_seed(seed)
        self.n, self.dim, self.batch, self.T = n, dim, batch, T

    def next(self):
        rows = torch.randint(0, self.n, (self.batch,), generator=self.g)
        t = torch.randint(1, self.T + 1, (self.batch,), generator=self.g)
        eps = torch.randn(self.batch, self.dim, generator=self.g)
        return rows, t, eps


def _loss(model: Denoiser, x0, t, eps, tab: Tables, r: int):
    xt = q_sample(x0, t, eps, tab)
    rr = torch.full_like(t, r) if model.conditioning == "schedule" else None
    pred = model(xt, t, tab.log_snr[t].float(), rr)
    return ((pred - eps) ** 2).sum(1).mean()


@torch.no_grad()
def validation_loss(model: Denoiser, xv: torch.Tensor, tab: Tables, r: int, *, draws: int, seed: int) -> float:
    """Mean ``||eps - eps_hat||^2`` on the validation rows under schedule ``tab`` (index ``r``), over ``draws``
    fixed (t, eps) draws per row (the same draws for every schedule; the losses of different schedules still differ
    for a perfect model: module docstring)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = torch.randint(1, tab.T + 1, (xv.shape[0],), generator=g).to(xv.device)
        eps = torch.randn(xv.shape, generator=g).to(xv.device)
        total += float(_loss(model, xv, t, eps, tab, r))
    return total / draws


def train_diffusion(x, cfg: DiffusionConfig, progress=None, *, checkpoint=None, checkpoint_steps: int | None = None,
                    resume: dict | None = None) -> dict:
    """Train ``cfg.method`` on the rows ``x`` (n, d); returns ``{"model", "config", "schedules", "rounds",
    "history", "train_rows", "val_rows", "test_rows", "steps", "budget"}`` (``rounds``: per round the active indices, their
    validation losses and the kept ones; ``history``: the mean training loss per round, one entry for a control).

    ``checkpoint(partial)``, when given, is called with the same dict plus ``"resume"`` (the optimizer state, the
    draw generator's state and the position in the algorithm) every ``checkpoint_steps`` optimizer steps (at the
    end of a cycle for ``consensus``) and at the end of each round; :func:`hcdiag.diffusion.runfile.save_diffusion_run`
    writes it as a partial run file. ``resume``, such a ``"resume"`` dict together with the partial run's model
    state under ``"model_state"``, continues the run exactly (bitwise on CPU) where it stopped.
    A non-finite training loss raises :class:`~hcdiag.errors.NumericalError` (the last checkpoint is kept)."""
    from hcdiag.errors import NumericalError

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputError("Diffusion training needs a finite (n, d) data matrix.")
    if checkpoint_steps is not None and (not isinstance(checkpoint_steps, int) or checkpoint_steps < 1):
        raise InputError(f"checkpoint_steps must be an integer >= 1 or None. Got {checkpoint_steps!r}.")
    cfg = cfg.resolved(x.shape[1])
    tr, va, te = split_rows(x.shape[0], cfg.val_rows, cfg.test_rows, cfg.seed)
    dev = torch.device(cfg.device)
    X = torch.as_tensor(x[tr], device=dev)
    XV = torch.as_tensor(x[va], device=dev)
    scheds = cfg.schedules()
    tabs = [Tables(s, dev) for s in scheds]
    torch.manual_seed(cfg.seed)
    cond = CONDITIONING[cfg.method]
    model = Denoiser(x.shape[1], widths=tuple(cfg.widths), emb_dim=cfg.emb_dim, conditioning=cond,
                     n_schedules=cfg.R).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    draws = _Draws(cfg.seed + 1, X.shape[0], x.shape[1], cfg.batch_size, cfg.T)
    budget = cfg.budget()
    # the position in the algorithm: everything a checkpoint needs to continue exactly
    pos = {"active": list(range(cfg.R)) if cfg.method == "consensus" else [], "cycle": 0, "loss_sum": 0.0,
           "loss_count": 0, "steps": 0}
    history: list[float] = []
    rounds: list[dict] = []
    if resume is not None:
        try:
            model.load_state_dict(resume["model_state"])
            opt.load_state_dict(resume["optimizer"])
            draws.g.set_state(resume["generator"])
            pos = {k: resume["position"][k] for k in pos}
            history = [float(h) for h in resume["history"]]
            rounds = [dict(r) for r in resume["rounds"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"the partial run cannot be resumed ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                             "start it again without resuming.") from None
        if list(np.asarray(resume.get("train_rows", tr))) != list(tr):
            raise InputError("the partial run's training rows differ from these data's split; resume with the same "
                             "data and config.")
    last_ckpt = pos["steps"]

    def result() -> dict:
        return {"model": model, "config": cfg, "schedules": scheds, "rounds": [dict(r) for r in rounds],
                "history": list(history), "train_rows": tr, "val_rows": va, "test_rows": te, "steps": pos["steps"],
                "budget": budget}

    def save():
        nonlocal last_ckpt
        last_ckpt = pos["steps"]
        if checkpoint is not None:
            out = result()
            out["resume"] = {"optimizer": opt.state_dict(), "generator": draws.g.get_state(),
                             "position": dict(pos, active=list(pos["active"]))}
            checkpoint(out)

    def step(r: int) -> float:
        rows, t, eps = draws.next()
        loss = _loss(model, X[rows.to(dev)], t.to(dev), eps.to(dev), tabs[r], r)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NumericalError(f"the diffusion training loss became {value} at step {pos['steps'] + 1}; lower the "
                                 "learning rate (lr).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pos["steps"] += 1
        pos["loss_sum"] += value
        pos["loss_count"] += 1
        return value

    def due() -> bool:
        return checkpoint_steps is not None and pos["steps"] - last_ckpt >= checkpoint_steps

    if cfg.method == "consensus":
        while len(pos["active"]) > 2:
            active = pos["active"]
            while pos["cycle"] < cfg.epochs_per_round:
                last = [step(r) for r in active]
                pos["cycle"] += 1
                e = pos["cycle"]
                if progress and e % max(1, cfg.epochs_per_round // 4) == 0:
                    progress(f"diffusion consensus: |S| = {len(active)}, cycle {e}/{cfg.epochs_per_round}, "
                             f"step {pos['steps']}/{budget}, loss {np.mean(last):.4f}")
                if due() and pos["cycle"] < cfg.epochs_per_round:
                    save()
            history.append(pos["loss_sum"] / max(pos["loss_count"], 1))
            val = {r: validation_loss(model, XV, tabs[r], r, draws=cfg.val_draws, seed=cfg.seed + 2) for r in active}
            keep = sorted(sorted(active, key=lambda r: (val[r], r))[:len(active) // 2])
            rounds.append({"active": list(active), "val_loss": [val[r] for r in active], "kept": keep})
            pos.update(active=keep, cycle=0, loss_sum=0.0, loss_count=0)
            if len(keep) > 2:
                save()
    else:
        order = [cfg.R // 2] if cfg.method == "single" else list(range(cfg.R))
        while pos["steps"] < budget:
            step(order[pos["steps"] % len(order)])
            if progress and pos["steps"] % max(1, budget // 8) == 0:
                progress(f"diffusion {cfg.method}: step {pos['steps']}/{budget}, "
                         f"mean loss {pos['loss_sum'] / pos['loss_count']:.4f}")
            if due() and pos["steps"] < budget:
                save()
        history.append(pos["loss_sum"] / pos["loss_count"] if pos["loss_count"] else float("nan"))
    model.eval()
    return result()


__all__ = ["CONDITIONING", "DiffusionConfig", "METHODS", "default_widths", "split_rows", "train_diffusion", "validation_loss"]
