"""``hcdiag verify``: the paper's tables and figures run end to end, with verdicts (the main job)."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import add_format_argument, nonempty_arg
from hcdiag.paper import LOSS_CONVENTIONS

NAME = "verify"
HELP = "run the paper's experiments (grid of runs + barrier checks) and write the claims report"
#: Seeds per configuration at most: each seed repeats the whole grid (the paper reports 3 to 5).
MAX_SEEDS = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="smoke", choices=["smoke", "paper"], help="grid and training preset (default smoke)")
    p.add_argument("--datasets", default="synthetic", help="comma list: synthetic, fashion-mnist, mnist, cifar10, digits")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    p.add_argument("--losses", default=None, help="comma list of loss conventions (default literal,scaled,mean)")
    p.add_argument("--groups", default=None,
                   help="comma list of the grid's parts to run: main, phase, ablation, witness, diffusion (default: all the preset has)")
    p.add_argument("--methods", default=None,
                   help="comma list: only these methods' main jobs (hct, vanilla, beta, anneal, aggressive, em-type, "
                        "or a label with its tag: hct-warmup, beta-beta2); the phase and ablation groups are kept")
    p.add_argument("--multiples", default=None,
                   help="comma list: only the main jobs at these multiples of lambda_max (the preset's: smoke 2; paper 2,5)")
    p.add_argument("--readings", default=None,
                   help="comma list of readings of HCT's epoch (steps, epochs, data_pass) to run HCT's main jobs under "
                        "besides the preset's; claims whose verdict changes between them are reported")
    p.add_argument("--plan", action="store_true",
                   help="print the grid's jobs and an estimate of their time on this machine (measured unit costs), "
                        "then stop: nothing is trained or written")
    p.add_argument("--executor", default="local", choices=["local", "submitit"], help="local process pool or a SLURM job array")
    p.add_argument("--workers", type=int, default=None, help="local workers (default: one per core, or per GPU)")
    p.add_argument("--data-dir", default=None, help="folder of MNIST / CIFAR-10 files")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--heartbeat", type=float, default=300, metavar="SECONDS",
                   help="each running run writes a line of its progress (stage, epoch, loss, KL, time so far) to "
                        "stderr at most every SECONDS (default 300; 0: only a line as each run ends)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a claim fails or a run failed")
    p.add_argument("--out", type=nonempty_arg, default=None, help="output folder (runs, report.md, report.html, results.json, figures); required unless --plan")
    add_format_argument(p)


def run(args: argparse.Namespace) -> int:
    import sys

    from hcdiag.cli.common import emit
    from hcdiag.errors import InputError
    from hcdiag.verify import DATASETS, claims_text, verify

    def names(option: str, text: str | None, allowed) -> list[str] | None:
        if text is None:
            return None
        given = [t.strip() for t in text.split(",") if t.strip()]
        if not given:
            raise InputError(f"--{option} must list at least one of {', '.join(allowed)}. Got {text!r}.")
        return given

    datasets = names("datasets", args.datasets, DATASETS)
    losses = names("losses", args.losses, LOSS_CONVENTIONS)
    if losses:
        bad = [l for l in losses if l not in LOSS_CONVENTIONS]
        if bad:
            raise InputError(f"--losses: unknown convention(s) {', '.join(bad)}; choose among literal, scaled, mean.")
    groups = [x.strip() for x in args.groups.split(",") if x.strip()] if args.groups is not None else None
    if args.seeds < 1:
        raise InputError(f"--seeds must be an integer >= 1. Got {args.seeds}.")
    if args.seeds > MAX_SEEDS:
        raise InputError(f"--seeds must be an integer in [1, {MAX_SEEDS}] (each seed repeats the whole grid). "
                         f"Got {args.seeds}.")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be an integer >= 1 (default: one per core, or per GPU). Got {args.workers}.")
    methods = names("methods", args.methods, ())
    multiples = None
    if args.multiples is not None:
        try:
            multiples = [float(m) for m in names("multiples", args.multiples, ("2",))]
        except ValueError:
            raise InputError(f"--multiples must be a comma list of numbers (multiples of lambda_max). "
                             f"Got {args.multiples!r}.") from None
    readings = names("readings", args.readings, ("steps", "epochs", "data_pass"))
    if args.plan:
        from hcdiag.verify import plan

        p = plan(args.preset, datasets, args.seeds, data_dir=args.data_dir, losses=losses, groups=groups,
                 methods=methods, multiples=multiples, readings=readings, workers=args.workers)
        emit(args, {"plan": p["plan"], "units": p["units"], "workers": p["workers"]}, p["text"])
        return 0
    if args.out is None:
        raise InputError("--out is required (the folder of the runs and the report); only --plan runs without it.")
    doc = verify(args.out, preset=args.preset, datasets=datasets, seeds=args.seeds, executor=args.executor,
                 device=args.device, workers=args.workers, data_dir=args.data_dir, losses=losses, groups=groups,
                 methods=methods, multiples=multiples, readings=readings,
                 progress=lambda s: print(s, file=sys.stderr, flush=True), heartbeat=args.heartbeat)
    rows = doc["claims"]
    table = claims_text(rows)
    text = (f"{table}\n\n{sum(r['verdict'] == 'holds' for r in rows)} hold, {sum(r['verdict'] == 'fails' for r in rows)} fail, "
            f"{sum(r['verdict'] == 'mixed' for r in rows)} mixed, {sum(r['verdict'] == 'inconclusive' for r in rows)} inconclusive"
            f" ({doc['meta']['n_runs']} runs, {doc['meta']['seconds']:.0f} s)\nreport: {args.out}/report.md, "
            f"{args.out}/report.html, {args.out}/results.json")
    failed = doc["meta"].get("failed", [])
    if failed:
        text += (f"\n{len(failed)} run(s) FAILED (listed in the report; run again to retry): "
                 + "; ".join(f"{f['run']}: {f['error']}" for f in failed))
    emit(args, doc, text)
    if args.strict and (failed or any(r["verdict"] in ("fails", "mixed") for r in rows)):
        return 1
    return 0
