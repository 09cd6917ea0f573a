"""``hcdiag check-barrier RUN``: every theorem check on a run file, with verdicts for people and for CI."""

from __future__ import annotations

import argparse
import re

from hcdiag.cli.common import add_format_argument

NAME = "check-barrier"
HELP = "run the Lemma 4.3 / Theorem 4.4 / Corollary 4.5 checks on a run file (exit 0 holds, 1 fails, 2 bad input)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run file written by `hcdiag train` (or any producer following docs/runfile.md)")
    p.add_argument("--require", default=None, help="comma list of check ids that decide the exit status (default all)")
    p.add_argument("--only", default=None, help="comma list of check ids to run (default all)")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance tau of region membership (default 0.05)")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md, report.html, results.json and figures here")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="evaluation device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the N3 perturbation probes and MI estimates (default 0)")
    p.add_argument("--partial", action="store_true",
                   help="check a run still training (or stopped by an error): the stages it lacks make their checks "
                        "inconclusive, and everything it has is checked")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the check may take, e.g. 4G or 512M (K, M, G, T: powers of 1024; a plain number is "
                        "bytes); a run file that would need more (its size, the tensors it claims, its models on the "
                        "eval rows) is refused with exit 2 before anything big is allocated (default: half of this "
                        "machine's memory)")
    add_format_argument(p)


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes in ``4G``, ``512M``, ``1.5GiB``, ``1048576`` (K, M, G, T are powers of 1024), > 0.

    >>> parse_size("4G"), parse_size("512M"), parse_size("1024")
    (4294967296, 536870912, 1024)
    """
    from hcdiag.errors import InputError

    found = _SIZE.fullmatch(text)
    size = 0
    if found:
        number, unit = found.groups()
        value = float(number) * 1024 ** ("", "k", "m", "g", "t").index(unit.lower())
        size = int(value) if value < 2**63 else 0  # a 400-digit number is inf as a float
    if size < 1:
        raise InputError(f"{option} must be a memory size > 0 such as 4G or 512M (K, M, G, T: powers of 1024; a plain "
                         f"number is bytes); got {text if len(text) <= 40 else text[:40] + '...'!r}.")
    return size


def write_report(results, run, out_dir, *, run_path, tolerance, require=None, left_out: list | None = None) -> list[str]:
    """Write ``report.md``, ``report.html``, ``results.json`` and PNG figures into ``out_dir``; returns
    the file names. Each file is written to a temporary name and renamed: no half-written files. A history
    figure whose series the run lacks is left out, and ``report.md`` says which and why; pass a list as
    ``left_out`` to receive ``(file name, why)`` of each."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")

    from hcdiag import plots, report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {r.id: r for r in results}
    figs = []
    skipped = left_out if left_out is not None else []
    for caption, fname, draw in (
            ("Loss of every clustering over training, retained and discarded, with the eps_t lines "
             "(paper Figure 2 left).", "fig_clustering_losses.png", plots.clustering_losses_over_training),
            ("KL (nats) and active units over training (paper Figure 3).", "fig_kl_au.png", plots.kl_and_active_units)):
        why = plots.missing_series(run, draw.__name__)
        if why is None:
            figs.append((caption, fname, draw(run)))
        else:
            skipped.append((fname, why))
    i3 = by_id.get("I3")
    if i3 is not None and "param_distance" in i3.values:
        figs.append(("Parameter and function-space distance to the collapsed model, with the vanilla reference "
                     "(paper Figure 2 right).", "fig_distance.png", plots.distance_to_collapsed(i3.values)))
    i2 = by_id.get("I2")
    if i2 is not None and plots.has_path_curves(i2.values):
        figs.append(("Historical loss along straight paths to collapsed models: the collapsed reference, the T2 "
                     "witness, or the best constant in output space (Corollary 4.5).", "fig_paths.png", plots.path_curves(i2.values)))
    images = report.figure_pngs(figs)
    md = report.markdown(results, run_path=run_path, tolerance=tolerance, figures=[(c, n) for c, n, _ in figs],
                         require=require, about=report.run_description(run))
    if skipped:
        note = "\n".join(["## Figures left out", ""] + [f"- `{f}`: {why}" for f, why in skipped])
        md = md.replace("\n## Details\n", f"\n{note}\n\n## Details\n", 1)
    files = {**images, "report.md": md.encode(), "report.html": report.html(md, images).encode(),
             "results.json": json.dumps(report.to_json_doc(results, run_path=run_path, tolerance=tolerance,
                                                           require=require), indent=2).encode()}
    return report.write_files(out, files)


def run(args: argparse.Namespace) -> int:
    import sys

    from hcdiag.checks.barrier import default_ids, parse_ids, run_checks
    from hcdiag.cli.common import emit
    from hcdiag.device import resolve_device
    from hcdiag.errors import InputError
    from hcdiag.report import exit_status, text_table, to_json_doc
    from hcdiag.runfile import load_run

    max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    require = parse_ids(args.require, "--require") if args.require else None
    only = parse_ids(args.only, "--only") if args.only else None
    if require and only and set(require) - set(only):
        raise InputError(f"--require names {sorted(set(require) - set(only))} which --only does not run.")
    if not (0 <= args.tolerance < 10):
        raise InputError(f"--tolerance must be a float in [0, 10). Got {args.tolerance}.")
    if args.report:
        from pathlib import Path

        rp = Path(args.report)
        if rp.exists() and not rp.is_dir():
            raise InputError(f"--report {rp} is a file; give a folder.")
    run_obj = load_run(args.run, partial=args.partial, max_memory=max_memory)
    if args.report:
        try:  # before the checks run: a folder that cannot be made is bad input, not a traceback at the end
            rp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "a parent is a file" if isinstance(exc, (NotADirectoryError, FileExistsError)) else (
                exc.strerror or type(exc).__name__)
            raise InputError(f"--report {rp} cannot be created ({reason}); give a writable folder.") from None
    device = resolve_device(args.device)
    progress = (lambda s: print(s, file=sys.stderr, end="\r", flush=True)) if sys.stderr.isatty() else None
    if require and not only:  # a required check the run's defaults leave out (W3 on a run without a teacher) runs too
        only = default_ids(run_obj) + [r for r in require if r not in default_ids(run_obj)]
    results = run_checks(run_obj, select=only, tolerance=args.tolerance, device=device, seed=args.seed, progress=progress)
    if progress:
        print(" " * 40, file=sys.stderr, end="\r")
    doc = to_json_doc(results, run_path=args.run, tolerance=args.tolerance, require=require)
    text = text_table(results) + f"\n\noverall: {doc['status']} (tau = {args.tolerance:g}"
    text += f", deciding checks: {','.join(require)})" if require else ")"
    if not run_obj.complete:
        st = run_obj.status
        text += (f"\nrun: partial (stopped at stage {st.stage!r}); checks whose stage is missing are "
                 "inconclusive")
    if args.report:
        left_out: list = []
        files = write_report(results, run_obj, args.report, run_path=args.run, tolerance=args.tolerance, require=require,
                             left_out=left_out)
        text += f"\nreport: {args.report}/ ({', '.join(files)})"
        if left_out:
            text += "\nfigures left out: " + "; ".join(f"{f} ({why})" for f, why in left_out)
    emit(args, doc, text)
    return exit_status(results, require)
