"""Diffusion training throughput (issue 14): a step of ``hcdiag.diffusion.train`` (draws of rows, timesteps and
noise from the run's CPU generator, the forward process, the schedule tables, the conditioning embedding, the
epsilon loss, Adam) against the same MLP's forward-backward-Adam on an input of the same shape without any of the
diffusion bookkeeping. Printed as a ratio measured in the same run (interleaved, median of blocks), one thread, for
the grid's denoiser (default_widths: 128 per layer up to d = 64) on 32-d (synthetic) and 64-d (digits) rows, batch 256."""

import numpy as np
import torch

from bench.bench_gemm import _median
from hcdiag.diffusion.model import Denoiser, Tables
from hcdiag.diffusion.schedules import family
from hcdiag.diffusion.train import _Draws, _loss, default_widths


def measure(d: int, conditioning: str, B: int = 256) -> dict:
    torch.manual_seed(0)
    X = torch.randn(4000, d)
    tabs = [Tables(s) for s in family("linear", 4)]
    model = Denoiser(d, widths=default_widths(d), conditioning=conditioning, n_schedules=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    draws = _Draws(1, X.shape[0], d, B, 1000)
    r = [0]

    def diffusion_step():
        rows, t, eps = draws.next()
        loss = _loss(model, X[rows], t, eps, tabs[r[0] % 4], r[0] % 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r[0] += 1

    plain = torch.nn.Sequential(*list(model.net))  # the same layers, fed a fixed input of the same shape
    opt2 = torch.optim.Adam(plain.parameters(), lr=1e-3)
    inp, target = torch.randn(B, d + model.emb_dim), torch.randn(B, d)

    def mlp_step():
        loss = ((plain(inp) - target) ** 2).sum(1).mean()
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    a, b = [], []
    for _ in range(3):  # interleaved: both see the same machine load
        a.append(_median(diffusion_step))
        b.append(_median(mlp_step))
    step, base = float(np.median(a)), float(np.median(b))
    return {"d": d, "conditioning": conditioning, "step_ms": step * 1e3, "mlp_ms": base * 1e3, "ratio": step / base,
            "steps_per_s": 1 / step}


def main():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(f"{'rows':<6}{'conditioning':<14}{'diffusion step':>16}{'plain MLP step':>16}{'ratio':>8}{'steps/s':>10}")
        for d in (32, 64):
            for cond in ("schedule", "timestep", "logsnr"):
                m = measure(d, cond)
                print(f"{d:<6}{cond:<14}{m['step_ms']:>13.2f} ms{m['mlp_ms']:>13.2f} ms{m['ratio']:>8.2f}"
                      f"{m['steps_per_s']:>10.0f}")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
