"""The EM-type VAE training of the paper's Table 1 ("Overcoming posterior collapse in variational autoencoders
via EM-type training", ICASSP 2023): the alternating encoder/decoder training read as expectation
maximisation. The paper's text does not give the algorithm's settings; ours, stated:

* E-step (fit the encoder to the current decoder): encoder-only steps of the VAE objective (KL weight 1),
  the first on the current batch, each later one on a random batch of the current permutation (as He et al.
  2019's inner loop), until the E-step has *converged*: the mean loss of a block of ``em_check_every`` steps
  improves on the previous block's by less than ``em_tol`` relative to it (a rise included), or after
  ``em_max_e_steps`` steps (the first block is compared with +inf, so it never stops the E-step).
* M-step (update the decoder with the encoder fixed): ``em_m_steps`` decoder-only steps on the current batch.

One E-step and one M-step per batch, for the whole run: unlike the aggressive baseline (He et al. 2019, its
own method), the alternation never switches off, and the E-step stops on convergence, not on the first rise.
One Adam for the encoder and one for the decoder, for the whole run. Recorded: ``history.inner_steps``, the
mean E-step length per epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hcdiag.train.methods.aggressive import encoder_loop
from hcdiag.train.methods.vae import Vanilla


def e_step(t, model, enc_opt, state: dict, xb: torch.Tensor, weights=None) -> int:
    """Encoder-only steps until the E-step converges (module docstring); returns the steps taken."""
    c = t.cfg
    return encoder_loop(t, model, enc_opt, state, xb, weights, cap=c.em_max_e_steps, every=c.em_check_every,
                        stop=lambda pre, cur: math.isfinite(pre) and pre - cur < c.em_tol * abs(pre))


class EMType(Vanilla):
    """EM-type VAE training (module docstring)."""

    name = "em-type"

    def begin(self, t, model, run, weights):
        if run is not None:  # rows before the first epoch (the init row) have no E-step: NaN there
            t.writer.history_series("inner_steps")
        enc = [p for n, p in model.named_parameters() if n.startswith(("encoder", "enc_"))]
        dec = [p for n, p in model.named_parameters() if not n.startswith(("encoder", "enc_"))]
        return {"enc": torch.optim.Adam(enc, lr=t.cfg.lr), "dec": torch.optim.Adam(dec, lr=t.cfg.lr),
                "weights": weights, "inner": []}

    def ctx_state(self, ctx):
        return {"enc": ctx["enc"].state_dict(), "dec": ctx["dec"].state_dict()}

    def load_ctx(self, ctx, saved):
        ctx["enc"].load_state_dict(saved["enc"])
        ctx["dec"].load_state_dict(saved["dec"])

    def epoch_terms(self, t, model, ctx, state, epoch):
        terms, inner = [], []
        for _ in range(t.loop.steps_per_epoch):
            xb = t.loop.batch(state)
            inner.append(e_step(t, model, ctx["enc"], state, xb, ctx["weights"]))
            for _ in range(t.cfg.em_m_steps):
                terms.append(t.loop.step(model, ctx["dec"], state, None, 0.0, 1.0, xb=xb, weights=ctx["weights"]))
        ctx["inner"] = inner
        return terms

    def after_epoch(self, t, model, ctx, run, epoch):
        if run is not None:
            t.writer.history_series("inner_steps").append(float(np.mean(ctx["inner"])))
