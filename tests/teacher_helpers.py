"""Shared by the teacher-guided VAE's tests (test_w3, test_views): a tiny configuration and well-separated
Gaussian clusters, on which alignment trains the certificate in seconds."""

from __future__ import annotations

import numpy as np

TINY = dict(enc_widths=(16,), dec_widths=(16,), latent_dim=3, batch_size=64, epochs=4, r0=4, k=3,
            em_backend="sklearn", eval_rows=200, references=(), baseline_snapshots=2)


def clusters(seed, n=400, d=6, k=3, spread=3.0):
    """n rows in d dimensions around k random means (N(0, spread^2) each), noise 0.3."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, spread, size=(k, d))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)
