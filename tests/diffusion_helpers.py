"""Shared by the diffusion tests: a one-schedule denoiser trained on 1-D Gaussian data N(0, lam) (about 8 s on
one CPU thread), whose posterior mean has a closed form."""

from __future__ import annotations

import numpy as np

from hcdiag.diffusion.model import Tables
from hcdiag.diffusion.train import DiffusionConfig, train_diffusion


def trained_on_gaussian(seed: int, lam: float = 4.0):
    """``(x (4000, 1), out of train_diffusion, Tables of the schedule it trained on)``."""
    x = np.random.default_rng(seed).normal(0, np.sqrt(lam), size=(4000, 1))
    cfg = DiffusionConfig(method="single", R=4, epochs_per_round=600, batch_size=512, widths=(64, 64), lr=2e-3,
                          seed=seed % 1000)
    out = train_diffusion(x, cfg)
    return x, out, Tables(out["schedules"][cfg.R // 2])
