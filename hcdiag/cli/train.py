"""``hcdiag train``: run Historical Consensus Training or a baseline and write the run file."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import add_data_arguments, add_device_argument, add_format_argument, emit
from hcdiag.paper import METHODS

NAME = "train"
HELP = "train Historical Consensus (hct) or a baseline VAE and write a run file"

# flag -> (TrainConfig field, type, help); every preset value can be overridden by a flag
_OVERRIDES = [
    ("--loss", "loss", str, "loss convention: literal | scaled | mean (claims.md)"),
    ("--r0", "r0", int, "number of EM clusterings (a power of two)"),
    ("--k", "k", int, "GMM components per clustering"),
    ("--covariance", "covariance", str, "EM covariance: diag | full"),
    ("--em-backend", "em_backend", str, "EM backend: sklearn | torch"),
    ("--em-init", "em_init", str, "EM init: kmeans | random"),
    ("--mode", "mode", str, "cycle (Algorithm 1: one clustering per step) | simultaneous (section 4.1)"),
    ("--epoch-unit", "epoch_unit", str, "HCT's epoch: steps (Algorithm 1: steps-per-clustering steps per clustering) | "
     "epochs (a data pass per clustering) | data_pass (one data pass cycling through the clusterings; the "
     "paper preset's: the reading that fits the paper's 2-3x vanilla cost)"),
    ("--steps-per-clustering", "steps_per_clustering", int, "steps per clustering per cycle (epoch-unit steps)"),
    ("--epochs-per-round", "epochs_per_round", int, "cycles per stage-1 round (the paper's E)"),
    ("--keep-ratio", "keep_ratio", float, "fraction of clusterings kept each round (paper 1/2)"),
    ("--eps", "eps", float, "refinement threshold (paper 1e-5 in 4.2.2, 1e-4 in Table 3)"),
    ("--refine-cap", "refine_cap", int, "refinement epoch cap"),
    ("--stage3-epochs", "stage3_epochs", int, "stage-3 epochs on one clustering"),
    ("--beta-schedule", "beta_schedule", str, "clustering weight: constant | linear (paper 1 -> 4) | warmup (0 -> end)"),
    ("--beta-start", "beta_start", float, "clustering weight at the start"),
    ("--beta-end", "beta_end", float, "clustering weight at the end"),
    ("--kl-weight", "kl_weight", float, "KL weight of the beta-VAE baseline (any value >= 0)"),
    ("--anneal-epochs", "anneal_epochs", int, "KL annealing length (epochs)"),
    ("--free-bits", "free_bits", float, "free bits per latent dimension (nats)"),
    ("--teacher-alpha", "teacher_alpha", float, "teacher-guided VAE: weight of the alignment loss KL(T || W) (>= 0; "
     "0: the plain VAE with the witness watching)"),
    ("--witness-beta", "witness_beta", float, "teacher-guided VAE: inverse temperature of the simplex witness (> 0)"),
    ("--teacher-view", "teacher_view", str, "teacher-guided VAE: what the teacher sees of x: identity | noise:SIGMA | "
     "shift:PIXELS | pool:K (images); the encoder reads x (the notes' view gap, check W4)"),
    ("--teacher-features", "teacher_features", str, "teacher-guided VAE: the teacher's GMM on x (input) or, as the "
     "notes do, on its top-D principal components (pca:D), searched among R0 EM fits"),
    ("--teacher-view-samples", "teacher_view_samples", int, "teacher-guided VAE: samples of a random view per row "
     "(default 4)"),
    ("--init-from", "init_from", str, "start the main model from a snapshot of this run file (same architecture), e.g. "
     "a collapsed run to rescue; the references start fresh"),
    ("--init-snapshot", "init_snapshot", str, "the snapshot --init-from starts from (default final)"),
    ("--aggressive-max-inner", "aggressive_max_inner", int,
     "aggressive: most encoder steps before each decoder step (He et al. 2019: 100)"),
    ("--aggressive-check-every", "aggressive_check_every", int,
     "aggressive: stop the encoder loop when the mean loss of a block of this many steps rises (He et al.: 15)"),
    ("--em-max-e-steps", "em_max_e_steps", int, "em-type: most encoder steps of an E-step (default 20)"),
    ("--em-check-every", "em_check_every", int, "em-type: E-step convergence checked every this many steps (5)"),
    ("--em-tol", "em_tol", float, "em-type: the E-step stops when a block's mean loss improves by less than this "
     "fraction of the previous block's (1e-3)"),
    ("--em-m-steps", "em_m_steps", int, "em-type: decoder steps of an M-step (default 1)"),
    ("--epochs", "epochs", int, "data epochs of baselines and references"),
    ("--lr", "lr", float, "Adam learning rate"),
    ("--batch-size", "batch_size", int, "batch size"),
    ("--latent-dim", "latent_dim", int, "latent dimension n (paper 8 in 5.1.3, 48 in Table 3)"),
    ("--arch", "arch", str, "model family: mlp | conv | linear"),
    ("--eval-rows", "eval_rows", int, "rows of the fixed evaluation subset"),
    ("--collapsed-multiple", "collapsed_multiple", float, "s2 multiple of the constructed collapsed model (paper 10)"),
]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    # the registry's names (hcdiag.train.METHODS, kept equal to hcdiag.paper.METHODS by a test): the leaf
    # module keeps `hcdiag --help` from importing torch
    # 'witness' is the name for the teacher-guided VAE (method 'teacher' in the run file)
    p.add_argument("--method", default="hct", choices=list(METHODS) + ["witness"])
    p.add_argument("--multiple", type=float, default=2.0, help="decoder variance s2 = MULTIPLE * lambda_max (default 2)")
    p.add_argument("--preset", default="smoke", choices=["smoke", "paper"], help="settings preset (default smoke)")
    p.add_argument("--out", required=True, help="run file to write (atomically, at every round and stage)")
    p.add_argument("--resume", action="store_true",
                   help="continue a partial run file written with the same data and config")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (never the data file itself); without it an existing --out is refused")
    p.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch (default 0)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resume on CPU)")
    p.add_argument("--uneven-halving", action="store_true", help="allow an R0 that is not a power of two")
    p.add_argument("--enc-widths", type=_int_list, default=None, help="encoder widths, e.g. 256,128")
    p.add_argument("--dec-widths", type=_int_list, default=None, help="decoder widths, e.g. 128,256")
    p.add_argument("--references", default=None,
                   help="references to train: comma list of collapsed,vanilla,control, or 'none'")
    p.add_argument("--quiet", action="store_true", help="no per-round summaries on stderr")
    p.add_argument("--heartbeat", type=float, default=300, metavar="SECONDS",
                   help="when stderr is not a terminal (a log file), a line of progress (stage, epoch, loss, KL, time "
                        "so far) at most every SECONDS (default 300; 0: only the summaries)")
    p.add_argument("--em-cache", default=None, metavar="DIR",
                   help="share stage-0 EM fits between runs through this folder (same data and settings: "
                        "fitted once; changes no result)")
    for flag, _field, typ, hlp in _OVERRIDES:
        p.add_argument(flag, type=typ, default=None, help=hlp)
    add_device_argument(p)
    add_format_argument(p)


def _one_line_warnings(show):
    """``warnings.showwarning`` printing hcdiag's own warnings as one line on stderr, others as usual."""
    import sys

    from hcdiag.errors import HcdiagWarning, cli_text

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HcdiagWarning):
            print(f"hcdiag {NAME}: warning: {cli_text(message)}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def run(args: argparse.Namespace) -> int:
    import math
    import sys
    import warnings

    from hcdiag.cli.common import load_data
    from hcdiag.errors import InputError
    from hcdiag.train import Progress, Trainer, make_config
    from hcdiag.train.progress import Heartbeat
    from hcdiag.runfile import Run

    if not (args.heartbeat >= 0 and math.isfinite(args.heartbeat)):
        raise InputError(f"--heartbeat must be a number of seconds >= 0 (0: only the summaries in a log file). "
                         f"Got {args.heartbeat}.")

    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _t, _h in _OVERRIDES}
    overrides.update(method="teacher" if args.method == "witness" else args.method, multiple=args.multiple, seed=args.seed, device=args.device,
                     deterministic=args.deterministic or None, uneven=args.uneven_halving or None,
                     enc_widths=args.enc_widths, dec_widths=args.dec_widths)
    if args.references is not None:
        refs = () if args.references.strip().lower() == "none" else tuple(
            r.strip() for r in args.references.split(",") if r.strip())
        overrides["references"] = refs
    cfg = make_config(args.preset, **overrides)
    data = load_data(args)
    # a terminal shows a live line; a log file gets a whole line now and then instead (nothing with --quiet)
    logged = args.heartbeat and not args.quiet and not sys.stderr.isatty()
    progress = Heartbeat(str(args.out), args.heartbeat, summaries=True) if logged else Progress(summaries=not args.quiet)
    trainer = Trainer(cfg, data, args.out, progress=progress, em_cache=args.em_cache)
    with warnings.catch_warnings():  # a NumericalError (non-finite loss) is exit status 1, see hcdiag.cli
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        run_dict = trainer.run(resume=args.resume, overwrite=args.overwrite)
    run = Run(run_dict)  # its records (hcdiag.records)
    h, ref = run.history, run.refinement
    final = {"kl": float(h.get("kl")[-1]), "au": int(h.get("au")[-1])}
    payload = {"out": args.out, "method": cfg.method, "multiple": cfg.multiple, "s2": run.s2,
               "lambda_max": run.lambda_max, "final": final, "timings": run_dict.get("timings", {}),
               "rounds": [{"round": r.round, "kept": list(r.kept), "eps": r.eps} for r in run.rounds or ()],
               "refinement": ({"pair": list(ref.pair), "reached": ref.reached, "eps": ref.eps, "eps_T": ref.eps_T,
                               "epochs": ref.epochs} if ref is not None else None),
               "references": {r.name: r.metrics for r in (run.references or ())}}
    lines = [f"wrote {args.out}: {cfg.method} at s2 = {cfg.multiple:g} x lambda_max = {payload['s2']:.4g}",
             f"final: KL = {final['kl']:.4f} nats, active units (Burda) = {final['au']}"]
    if payload["refinement"]:
        r = payload["refinement"]
        lines.append(f"refinement: eps_T = {r['eps_T']:.4g} ({'reached' if r['reached'] else 'NOT reached'} eps = {r['eps']:g} "
                     f"after {r['epochs']} epochs)")
    for k, v in payload["references"].items():
        lines.append(f"reference {k}: KL = {v['kl']:.4f}, AU = {v['au']}")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in payload["timings"].items()))
    emit(args, payload, "\n".join(lines))
    return 0
