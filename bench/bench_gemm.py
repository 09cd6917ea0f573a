"""The paper preset's training step (Table 3's MLP on Fashion-MNIST's 196 inputs, batch 512) as a fraction of
this machine's fp32 GEMM rate for the same shapes (issue 12; 73% with 2 threads when the issue was filed).

Each Linear layer of the step costs three matrix products of fixed shapes: the forward ``(B, in) x (in, out)``,
the input gradient ``(B, out) x (out, in)`` and the weight gradient ``(out, B) x (B, in)``. Their time alone,
measured here with ``torch.mm`` on the same shapes and threads, is what a step could cost if nothing but its
GEMMs ran; the fraction is that time over the real step's (an HCT step: the VAE terms, the clustering term
of one clustering of 8 centroids, Adam). Both are measured in the same run, interleaved, median of blocks.
"""

import time

import numpy as np
import torch

from hcdiag.losses import LossWeights
from hcdiag.models import WIDTH_PRESETS, ModelConfig, build_model
from hcdiag.train.loop import Loop


def _median(fn, reps=20, blocks=5) -> float:
    fn()
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t) / reps)
    return float(np.median(out))


def _linear_shapes(model) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def measure(threads: int, N: int = 196, B: int = 512) -> dict:
    torch.set_num_threads(threads)
    enc, dec = WIDTH_PRESETS["table3"]
    model = build_model(ModelConfig(input_dim=N, latent_dim=48, enc_widths=enc, dec_widths=dec), seed=0)
    X = torch.randn(4 * B, N)
    loop = Loop(X, X[:B], LossWeights.for_convention("literal", 2.0, N), batch_size=B, spc=1, mode="cycle",
                device=torch.device("cpu"))
    loop.set_centroids(torch.randn(16, 8, N))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = loop.new_state(0)
    one = torch.tensor([0])
    step = _median(lambda: loop.step(model, opt, state, one, 1.0, 1.0))
    mats = []
    for i, o in _linear_shapes(model):
        mats.append((torch.randn(B, i), torch.randn(i, o)))  # forward
        mats.append((torch.randn(B, o), torch.randn(o, i)))  # input gradient
        mats.append((torch.randn(o, B), torch.randn(B, i)))  # weight gradient
    gemm = _median(lambda: [torch.mm(a, b) for a, b in mats])
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in mats)
    return {"threads": threads, "step": step, "gemm": gemm, "fraction": gemm / step, "gflops": flops / gemm / 1e9}


def main():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            r = measure(threads)
            print(f"-- Table 3 HCT step, batch 512, {threads} thread(s): {r['step'] * 1e3:.1f} ms; its GEMMs alone "
                  f"{r['gemm'] * 1e3:.1f} ms ({r['gflops']:.1f} GFLOP/s): the step runs at {r['fraction']:.0%} of "
                  "the GEMM rate (goal: >= 73% with 2 threads)")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
