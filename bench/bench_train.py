"""Training-step cost of Historical Consensus against a vanilla step, and the smoke preset's stage times.

Ratios are measured in the same run on the same batch and model (never asserted). Goal (issue 3): an
HCT step at most 1.05x a vanilla step in cycle mode, 1.1x in simultaneous mode with 16 clusterings of
8 centroids. Beside ours, the two slower ways of computing the term (torch.cdist per clustering, a Python
loop over clusterings) for reference.
"""

import time


import numpy as np
import torch

from hcdiag.losses import LossWeights, gaussian_kl, reparameterize
from hcdiag.models import ModelConfig, WIDTH_PRESETS, build_model
from hcdiag.train import Trainer, make_config
from hcdiag.train.objectives import ClusterTerm


def _time(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _amin_term(f, flat, R, K):
    """The previous form of the term: the same fused product, differentiated through amin (its backward
    is a dense (B, R*K) scatter and a second (B, R*K) x (R*K, N) product)."""
    d = torch.addmm(flat.pow(2).sum(1), f, flat.T, alpha=-2.0).view(f.shape[0], R, K).amin(2)
    return (d + f.pow(2).sum(1, keepdim=True)).clamp_min(0).mean(0).sum()


def _step_bench(name, widths, latent, N, B=512, R=16, K=8, reps=60):
    torch.manual_seed(0)
    cfg = ModelConfig(input_dim=N, latent_dim=latent, enc_widths=widths[0], dec_widths=widths[1])
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(B, N)
    cent = torch.randn(R, K, N)
    w = LossWeights.for_convention("literal", 2.0, N)
    g = torch.Generator().manual_seed(0)
    term = ClusterTerm(cent)  # the trainer's term: one product against all centroids

    def base():
        mu, lv = model.encode(x)
        f = model.decode(reparameterize(mu, lv, g))
        return f, (x - f).pow(2).sum(1).mean() * w.recon + gaussian_kl(mu, lv).sum(1).mean()

    def run(term):
        def step():
            f, loss = base()
            if term is not None:
                loss = loss + term(f)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    one, all_ids = torch.tensor([3]), torch.arange(R)
    variants = {
        "vanilla": None,
        "hct cycle (1 clustering, ours)": lambda f: term(f, one),
        f"hct simultaneous ({R}x{K}, ours)": lambda f: term(f, all_ids),
        "simultaneous, autograd through amin": lambda f: _amin_term(f, cent.reshape(-1, cent.shape[-1]), R, K),
        "simultaneous via torch.cdist loop": lambda f: sum(torch.cdist(f, cent[r]).pow(2).amin(1).mean() for r in range(R)),
        "simultaneous via python loop": lambda f: sum(((f[:, None, :] - cent[r][None]) ** 2).sum(-1).amin(1).mean() for r in range(R)),
    }
    # interleave the variants in short blocks and take each one's median block, so that drifts in the
    # machine's load hit every variant alike
    steps = {k: run(v) for k, v in variants.items()}
    for fn in steps.values():
        _time(fn, 5)
    blocks = {k: [] for k in steps}
    for _ in range(max(5, reps // 10)):
        for k, fn in steps.items():
            blocks[k].append(_time(fn, 10))
    times = {k: float(np.median(v)) for k, v in blocks.items()}
    base_t = times["vanilla"]
    print(f"-- step cost, {name} (N={N}, latent={latent}, widths={widths[0]}, batch {B}), {torch.get_num_threads()} threads")
    for k, t in times.items():
        print(f"   {k:<38} {t * 1e3:8.2f} ms   {t / base_t:5.3f}x vanilla")


def _smoke_stages():
    from hcdiag.data import synthetic

    data = synthetic()
    tr = Trainer(make_config("smoke"), data, None)
    t0 = time.perf_counter()
    tr.run()
    total = time.perf_counter() - t0
    print(f"-- smoke preset, whole run incl. references: {total:.1f} s (goal < 90 s on 2 cores)")
    for k, v in tr.timings.items():
        print(f"   {k:<12} {v:7.1f} s")


def main():
    torch.set_num_threads(2)
    _step_bench("paper 5.1.3 MLP", WIDTH_PRESETS["paper"], 8, 196)
    _step_bench("Table 3 MLP", WIDTH_PRESETS["table3"], 48, 196, reps=30)
    _smoke_stages()


if __name__ == "__main__":
    main()
