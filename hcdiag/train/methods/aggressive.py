"""He et al. 2019's aggressive inference-network training ("Lagging inference networks and posterior
collapse in VAEs", their text.py / image.py): one Adam for the encoder and one for the decoder for the whole
run. While aggressive mode is on, each training batch gets the encoder inner loop (:func:`inner_loop`) and
then ONE decoder-only step on that batch; at the end of every such epoch the mutual information on the eval
rows is estimated, and aggressive mode ends for good once it drops below the previous epoch's (starting
from 0, as their ``pre_mi = 0``). Afterwards both optimizers step together, keeping their Adam moments.
Recorded in the run: ``history.inner_steps`` (encoder steps per decoder step, mean per epoch) and
``aggressive`` (``ended_epoch``, ``mi``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hcdiag.models import encode_decode
from hcdiag import records
from hcdiag.train.methods.vae import Vanilla


class Joint:
    """Several optimizers zeroed and stepped as one: the encoder and decoder Adam after aggressive mode."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def random_batch(t, state: dict) -> torch.Tensor:
    """A uniformly drawn full batch slot of the current permutation, drawn with the run's index generator
    (so runs are reproducible): the later batches of an encoder inner loop."""
    loop, bs = t.loop, t.cfg.batch_size
    j = int(torch.randint(max(1, loop.n // bs), (1,), generator=state["g_idx"]))  # full batches, as Loop.batch serves
    return loop.X[state["perm"][j * bs:(j + 1) * bs].to(loop.device)]


def inner_loop(t, model, enc_opt, state: dict, xb: torch.Tensor, weights=None) -> int:
    """He et al. 2019's inner loop before one decoder step; returns the number of encoder steps taken.

    Encoder-only steps of the full VAE loss (KL weight 1): the first on the current batch ``xb``, each later
    one on a random batch (a uniformly drawn batch slot of the current permutation, drawn with the run's
    index generator, so runs are reproducible). After every ``aggressive_check_every`` steps the mean loss of
    that block is compared with the previous block's (the first with +inf, their ``burn_pre_loss = 1e4``
    sentinel) and the loop stops if it rose (``burn_pre_loss - burn_cur_loss < 0``); it stops in any case
    after ``aggressive_max_inner`` steps. All batches have ``batch_size`` rows, so the mean of per-batch mean
    losses is their per-example mean."""
    c = t.cfg
    return encoder_loop(t, model, enc_opt, state, xb, weights, cap=c.aggressive_max_inner,
                        every=c.aggressive_check_every, stop=lambda pre, cur: pre - cur < 0)


def encoder_loop(t, model, enc_opt, state: dict, xb: torch.Tensor, weights, *, cap: int, every: int, stop) -> int:
    """Encoder-only steps of the VAE objective (KL weight 1): the first on ``xb``, each later one on a
    :func:`random_batch`; after every ``every`` steps the block's mean loss ``cur`` is compared with the
    previous block's ``pre`` (+inf for the first) and the loop ends when ``stop(pre, cur)``; at most ``cap``
    steps. Returns the number of steps taken."""
    pre, block = math.inf, []
    for i in range(1, cap + 1):
        if i > 1:
            xb = random_batch(t, state)
        block.append(t.loop.step(model, enc_opt, state, None, 0.0, 1.0, xb=xb, weights=weights)[0])
        if i % every == 0:
            cur = float(torch.stack(block).mean())
            if stop(pre, cur):
                return i
            pre, block = cur, []
    return cap


class Aggressive(Vanilla):
    """The aggressive baseline (module docstring); KL weight 1, no free bits."""

    name = "aggressive"

    def begin(self, t, model, run, weights):
        if run is not None:  # rows before the first epoch (the init row) have no inner loop: NaN there
            t.writer.history_series("inner_steps")
        enc = [p for n, p in model.named_parameters() if n.startswith(("encoder", "enc_"))]
        dec = [p for n, p in model.named_parameters() if not n.startswith(("encoder", "enc_"))]
        enc_opt, dec_opt = torch.optim.Adam(enc, lr=t.cfg.lr), torch.optim.Adam(dec, lr=t.cfg.lr)
        return {"enc": enc_opt, "dec": dec_opt, "opt": Joint(enc_opt, dec_opt), "weights": weights, "on": True,
                "last_mi": 0.0, "mis": [], "ended": None, "inner": []}

    def epoch_terms(self, t, model, ctx, state, epoch):
        if not ctx["on"]:
            ctx["inner"] = []
            return super().epoch_terms(t, model, ctx, state, epoch)
        terms, inner = [], []
        for _ in range(t.loop.steps_per_epoch):
            xb = t.loop.batch(state)
            inner.append(inner_loop(t, model, ctx["enc"], state, xb, ctx["weights"]))
            terms.append(t.loop.step(model, ctx["dec"], state, None, 0.0, 1.0, xb=xb, weights=ctx["weights"]))
        ctx["inner"] = inner
        return terms

    def after_epoch(self, t, model, ctx, run, epoch):
        if run is not None:
            t.writer.history_series("inner_steps").append(float(np.mean(ctx["inner"])) if ctx["inner"] else 0.0)
        if not ctx["on"]:
            return
        from hcdiag.metrics import mutual_information

        mu, lv, _ = encode_decode(model, t.loop.eval_x)
        mi = float(mutual_information(mu, lv, seed=t.cfg.seed))
        ctx["mis"].append(mi)
        if mi - ctx["last_mi"] < 0:  # He et al.: `if cur_mi - pre_mi < 0: aggressive_flag = False`
            ctx["on"], ctx["ended"] = False, epoch + 1
            t.progress.summary(f"aggressive: MI fell from {ctx['last_mi']:.4f} to {mi:.4f} nats after epoch "
                               f"{epoch + 1}; encoder inner loop off, encoder and decoder step together")
        ctx["last_mi"] = mi

    def ctx_state(self, ctx):
        return {"enc": ctx["enc"].state_dict(), "dec": ctx["dec"].state_dict(), "on": bool(ctx["on"]),
                "last_mi": float(ctx["last_mi"]), "mis": [float(m) for m in ctx["mis"]], "ended": ctx["ended"]}

    def load_ctx(self, ctx, saved):
        ctx["enc"].load_state_dict(saved["enc"])
        ctx["dec"].load_state_dict(saved["dec"])
        ctx.update(on=bool(saved["on"]), last_mi=float(saved["last_mi"]), mis=[float(m) for m in saved["mis"]],
                   ended=None if saved["ended"] is None else int(saved["ended"]))

    def finish(self, t, ctx, run):
        if run is not None:
            t.writer.set_aggressive(records.Aggressive(torch.tensor(ctx["mis"], dtype=torch.float64), ctx["ended"]))
