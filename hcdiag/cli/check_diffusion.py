"""``hcdiag check-diffusion RUN``: section 7.4's predictions D1-D4 on a diffusion run file, with verdicts for
people and for CI (exit 0 holds, 1 fails or inconclusive, 2 bad input)."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import add_format_argument, int_arg, nonempty_arg

NAME = "check-diffusion"
HELP = ("run the section 7.4 checks D1-D4 on a diffusion run file written by `hcdiag train-diffusion` (exit 0 "
        "holds, 1 fails or inconclusive, 2 bad input)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", type=nonempty_arg, help="diffusion run file")
    p.add_argument("--against", default=None, metavar="RUNS",
                   help="comma list of control run files of the same data (single, logsnr) for D3's comparison")
    p.add_argument("--only", default=None, help="comma list of check ids to run (default D1,D2,D3,D4)")
    p.add_argument("--require", default=None, help="comma list of check ids that decide the exit status (default all)")
    p.add_argument("--samples", type=int_arg(2), default=None,
                   help="samples per schedule (default: as many as the run's held-out rows)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="sampler of D3/D4: ddpm (ancestral, every timestep; default) or ddim (deterministic)")
    p.add_argument("--ddim-steps", type=int_arg(1), default=None, help="DDIM timesteps (default: all T)")
    p.add_argument("--seed", type=int_arg(0, 2**31 - 1), default=0, help="seed of the samples and bootstraps")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md, report.html, results.json and figures here")
    p.add_argument("--threads", type=int_arg(1), default=1, help="CPU threads of torch (default 1)")
    add_format_argument(p)


def _ids(text: str, option: str) -> list[str]:
    from hcdiag.checks.diffusion import IDS
    from hcdiag.errors import InputError

    ids = [t.strip().upper() for t in text.split(",") if t.strip()]
    bad = [i for i in ids if i not in IDS]
    if bad or not ids:
        raise InputError(f"{option} must list check ids among {', '.join(IDS)}; got {text!r}.")
    return ids


def write_report(results, run, ctx_samples: dict, out_dir, *, run_path) -> list[str]:
    """report.md, report.html, results.json and figures, all or nothing (:func:`hcdiag.report.write_files`)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    from hcdiag import plots, report

    by_id = {r.id: r for r in results}
    figs = []
    if "D1" in by_id and "gain" in by_id["D1"].values:
        figs.append(("D1/D2: gain of E[x0|xt] along the top covariance direction against the Gaussian closed form, "
                     "with where eq. 13, SNR lambda_max = 1 and the measurement put t_c.", "fig_gain.png",
                     plots.diffusion_gain(by_id["D1"].values, by_id.get("D2").values if "D2" in by_id else None)))
    if ctx_samples.get("sets"):
        figs.append(("Samples (ancestral DDPM) under the home schedule and unseen ones, beside held-out rows.",
                     "fig_samples.png", plots.diffusion_samples(ctx_samples["heldout"], ctx_samples["sets"],
                                                                title=f"{run.config.method} ({run.config.kind})")))
    images = report.figure_pngs(figs)
    about = (f"diffusion `{run.config.method}`, {run.config.kind} family, R = {run.config.R}, T = {run.config.T}, "
             f"{run.steps} steps, data {run.spec.get('name')} ({run.x.shape[0]} x {run.x.shape[1]})")
    md = report.markdown(results, run_path=run_path, figures=[(c, n) for c, n, _ in figs], about=about,
                         title="hcdiag check-diffusion report", tolerance=None)
    files = {**images, "report.md": md.encode(), "report.html": report.html(md, images).encode(),
             "results.json": json.dumps(report.to_json_doc(results, run_path=run_path, tolerance=None),
                                        indent=2).encode()}
    return report.write_files(out_dir, files)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from hcdiag.checks.diffusion import DiffusionContext, run_diffusion_checks
    from hcdiag.cli.common import emit
    from hcdiag.diffusion.runfile import load_diffusion_run
    from hcdiag.errors import InputError
    from hcdiag.report import exit_status, text_table, to_json_doc

    torch.set_num_threads(args.threads)
    only = _ids(args.only, "--only") if args.only else None
    require = _ids(args.require, "--require") if args.require else None
    if require and only and set(require) - set(only):
        raise InputError(f"--require names {sorted(set(require) - set(only))} which --only does not run.")
    rp = Path(args.report) if args.report else None
    if rp is not None and rp.exists() and not rp.is_dir():
        raise InputError(f"--report {rp} is a file; give a folder.")
    run_obj = load_diffusion_run(args.run)
    controls = {}
    for path in [p.strip() for p in (args.against or "").split(",") if p.strip()]:
        controls[path] = load_diffusion_run(path)
    if rp is not None:
        try:
            rp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--report {rp} cannot be created ({exc.strerror or type(exc).__name__}); give a "
                             "writable folder.") from None
    progress = (lambda s: print(f"hcdiag {NAME}: {s}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    if args.ddim_steps is not None and args.sampler != "ddim":
        raise InputError("--ddim-steps applies to --sampler ddim only; drop it or pass --sampler ddim.")
    ctx = DiffusionContext(run_obj, seed=args.seed, n_samples=args.samples, progress=progress, sampler=args.sampler,
                           ddim_steps=args.ddim_steps)
    results = run_diffusion_checks(run_obj, select=only, controls=controls, seed=args.seed, n_samples=args.samples,
                                   progress=progress, context=ctx)
    doc = to_json_doc(results, run_path=args.run, require=require, tolerance=None)  # no region tolerance here
    text = text_table(results) + f"\n\noverall: {doc['status']}"
    text += f" (deciding checks: {','.join(require)})" if require else ""
    if not run_obj.complete:
        text += f"\nrun: partial ({run_obj.steps} of {run_obj.budget} steps); its checks are inconclusive"
    d2 = next((r for r in results if r.id == "D2"), None)
    if d2 is not None:
        v = d2.values
        fmt = lambda t: "none" if t is None else f"{t:.1f}"  # noqa: E731
        text += (f"\nspectral criteria, lambda_max = {v['lambda_max']:.4g}: VAE collapse for s2 > {v['lambda_max']:.4g};"
                 f" diffusion t_c by eq. 13 {fmt(v['t_eq13'])}, by SNR lambda_max = 1 {fmt(v['t_snr'])}, measured "
                 f"{fmt(v['t_measured'])} ({v['schedule']})")
    if rp is not None:
        sets = {}
        if any(r.id in ("D3", "D4") and "floor" in r.values for r in results):  # the samples the checks drew
            sets = {f"home {ctx.home.schedule.spec}": ctx.samples()}
            d4 = next((r for r in results if r.id == "D4"), None)
            if d4 is not None and "unseen" in d4.values:
                from hcdiag.checks.diffusion import unseen_schedules

                for s in unseen_schedules(run_obj):
                    sets[f"unseen {s.spec}"] = ctx.samples(s)
            samples = {"heldout": ctx.heldout_n.numpy(), "sets": sets}
        else:
            samples = {}
        files = write_report(results, run_obj, samples, rp, run_path=args.run)
        text += f"\nreport: {rp}/ ({', '.join(files)})"
    emit(args, doc, text)
    return exit_status(results, require)
