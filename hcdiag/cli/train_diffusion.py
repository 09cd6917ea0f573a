"""``hcdiag train-diffusion DATA``: train section 7's diffusion model (Algorithm 2 or a control) and write its run
file, atomically, at every checkpoint (resumable)."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import (add_data_arguments, add_device_argument, add_format_argument, emit, float_arg,
                               int_arg, nonempty_arg)
from hcdiag.cli.train import _int_list

NAME = "train-diffusion"
HELP = ("train a diffusion model: Algorithm 2 (historical consensus over noise schedules) or a control, and write "
        "a run file (section 7)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--dim", type=int_arg(1), default=None, help="synthetic only: dimension (default 32)")
    p.add_argument("--k", type=int_arg(1), default=None, help="synthetic only: mixture components (default 8)")
    p.add_argument("--spread", type=float_arg(0, open_low=True), default=None,
                   help="synthetic only: component std (default 0.5)")
    p.add_argument("--separation", type=float_arg(0), default=None,
                   help="synthetic only: std of the component means (default 1)")
    p.add_argument("--lambda-max", type=float_arg(0, open_low=True), default=None,
                   help="rescale the centred data so that lambda_max is this (check D2); default: unscaled")
    p.add_argument("--method", default="consensus", choices=["consensus", "single", "logsnr"],
                   help="consensus (Algorithm 2, conditioned on the schedule index), single (one schedule, the "
                        "family's middle one), logsnr (conditioned on the noise level, all schedules); default "
                        "consensus. The controls train for Algorithm 2's step budget")
    p.add_argument("--kind", default="linear", choices=["linear", "scaled_linear", "cosine", "sigmoid"],
                   help="schedule family (default linear: DDPM 1e-4..0.02 and its variants)")
    p.add_argument("--R", dest="R", type=int_arg(4), default=4, help="schedules R = 2^k >= 4 (default 4)")
    p.add_argument("--T", dest="T", type=int_arg(2, 100_000), default=1000, help="diffusion steps (default 1000)")
    p.add_argument("--spread-schedules", dest="schedule_spread", type=float_arg(1, open_low=True), default=2.0,
                   help="how far the family's schedules differ (default 2)")
    p.add_argument("--epochs-per-round", type=int_arg(1), default=200,
                   help="Algorithm 2's E: cycles (one step per active schedule) per round (default 200)")
    p.add_argument("--batch-size", type=int_arg(1), default=256, help="batch size (default 256)")
    p.add_argument("--lr", type=float_arg(0, open_low=True), default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--widths", type=_int_list, default=None,
                   help="hidden widths (default: three layers of max(128, 2 d) for d-dimensional data)")
    p.add_argument("--seed", type=int_arg(0, 2**31 - 1), default=0, help="seed of the model and the draws (default 0)")
    p.add_argument("--out", required=True, type=nonempty_arg, help="run file to write (atomically, at checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue a partial --out of the same data and settings")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--checkpoint-steps", type=int_arg(1), default=500,
                   help="write the partial run every this many optimizer steps (default 500)")
    p.add_argument("--threads", type=int_arg(1), default=1,
                   help="CPU threads of torch (default 1: the denoiser is small, and with other work on the machine "
                        "more threads were measured 3-50x slower per step, never faster)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_device_argument(p)
    add_format_argument(p)


def _options(args) -> dict:
    opts = {k: getattr(args, k) for k in ("dim", "k", "spread", "separation") if getattr(args, k) is not None}
    if opts and args.data.strip().lower() != "synthetic":
        from hcdiag.errors import InputError

        raise InputError(f"--{'/--'.join(sorted(opts))} apply to the synthetic data only, not to {args.data}; drop them.")
    return opts


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from hcdiag.atomic import OutputBusy, OutputLock
    from hcdiag.data import load
    from hcdiag.device import resolve_device
    from hcdiag.diffusion.data import prepare
    from hcdiag.diffusion.runfile import load_diffusion_run, save_diffusion_run
    from hcdiag.diffusion.train import DiffusionConfig, train_diffusion
    from hcdiag.errors import InputError
    from hcdiag.train.guard import check_writable

    out = Path(args.out)
    check_writable(out)
    device = resolve_device(args.device)
    if device.type == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    cfg = DiffusionConfig(method=args.method, kind=args.kind, R=args.R, T=args.T, spread=args.schedule_spread,
                          epochs_per_round=args.epochs_per_round, batch_size=args.batch_size, lr=args.lr,
                          widths=tuple(args.widths) if args.widths else None, seed=args.seed, device=str(device))
    ds = load(args.data, data_dir=args.data_dir, resize=args.resize, split=args.split, n_samples=args.n_samples,
              seed=args.data_seed, drop_nonfinite=args.drop_nonfinite, **_options(args))
    if out.exists() and ds.source and Path(ds.source).is_file() and os.path.samefile(out, ds.source):
        raise InputError(f"--out {out} is the data file this run reads; choose another --out.")
    data = prepare(ds, lambda_max=args.lambda_max)
    cfg = cfg.resolved(data.x.shape[1])  # the widths this run trains with (and --resume compares)
    lock = OutputLock(out, owner="train-diffusion")
    try:
        lock.acquire()
    except OutputBusy as busy:
        raise InputError(f"--out {out} is being written by another hcdiag (pid {busy.pid}); wait or choose another "
                         "--out.") from None
    try:
        resume = None
        if out.exists():
            if not (args.resume or args.overwrite):
                raise InputError(f"--out {out} already exists; pass --resume to continue it, --overwrite to replace it, "
                                 "or choose another --out.")
            if args.resume:
                prev = load_diffusion_run(out)
                if prev.complete:
                    raise InputError(f"--out {out} is a complete run; there is nothing to resume (pass --overwrite "
                                     "to train it again).")
                mine = {**cfg.to_dict(), "device": None}
                theirs = {**prev.config.to_dict(), "device": None}
                diff = sorted(k for k in mine if mine[k] != theirs[k])
                if diff:
                    raise InputError(f"--resume: {out} was trained with other settings ({', '.join(diff)}); resume with "
                                     "the same settings or choose another --out.")
                if prev.x.shape != data.x.shape or not np.array_equal(prev.x.numpy(), data.x):
                    raise InputError(f"--resume: {out} was trained on other data rows; resume with the data it was "
                                     "trained on.")
                resume = prev.resume_state()
        say = (lambda s: None) if args.quiet else (lambda s: print(f"hcdiag {NAME}: {s}", file=sys.stderr, flush=True))
        if resume is not None:
            say(f"resuming {out} at step {resume['position']['steps']} of {cfg.budget()}")
        t0 = time.perf_counter()
        result = train_diffusion(data.x, cfg, progress=say, resume=resume,
                                 checkpoint=lambda part: save_diffusion_run(part, out, data),
                                 checkpoint_steps=args.checkpoint_steps)
        save_diffusion_run(result, out, data)
        seconds = time.perf_counter() - t0
    finally:
        lock.release()
    from hcdiag.diffusion.data import lambda_max_of

    lam = lambda_max_of(data.x)
    payload = {"out": str(out), "method": cfg.method, "kind": cfg.kind, "R": cfg.R, "steps": result["steps"],
               "seconds": seconds, "lambda_max": lam, "n": int(data.x.shape[0]), "d": int(data.x.shape[1]),
               "rounds": [{"active": r["active"], "val_loss": r["val_loss"], "kept": r["kept"]}
                          for r in result["rounds"]],
               "history": result["history"]}
    lines = [f"wrote {out}: diffusion {cfg.method} ({cfg.kind} family, R = {cfg.R}, T = {cfg.T}) on {ds.name} "
             f"(n = {data.x.shape[0]}, d = {data.x.shape[1]}, lambda_max = {lam:.4g}), {result['steps']} steps in "
             f"{seconds:.1f} s"]
    for i, r in enumerate(result["rounds"]):
        losses = ", ".join(f"{a}: {v:.4f}" for a, v in zip(r["active"], r["val_loss"]))
        lines.append(f"round {i + 1}: validation loss {losses}; kept {r['kept']}")
    emit(args, payload, "\n".join(lines))
    return 0
