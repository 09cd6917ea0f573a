"""``hcdiag spectrum DATA``: top eigenvalues of the data covariance, lambda_max with a bootstrap CI,
and the decoder variances ``s2 = m * lambda_max`` a run would use (paper eq. 4, section 5.4)."""

from __future__ import annotations

from hcdiag.cli.common import (SEED_MAX, add_data_arguments, add_device_argument, add_format_argument, emit,
                               float_arg, int_arg, load_data, parse_float_list)
from hcdiag.formats import format_table

NAME = "spectrum"
#: A percentile CI needs thousands of resamples, not more; each one re-reads the data.
MAX_BOOTSTRAP = 100_000
HELP = "top eigenvalues of the data covariance (1/n), lambda_max with a bootstrap CI, decoder variances"


def add_arguments(p) -> None:
    add_data_arguments(p)
    p.add_argument("--top", type=int_arg(1), default=10, help="how many eigenvalues to report (default 10)")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "lanczos", "streaming"],
                   help="eigensolver (default auto: exact for small d, lanczos in memory, streaming for memmaps)")
    p.add_argument("--bootstrap", type=int_arg(2, MAX_BOOTSTRAP, or_value=0, meaning="no CI"), default=0, help="row resamples for a percentile CI of lambda_max (default 0: none)")
    p.add_argument("--ci-level", type=float_arg(0, 1, open_low=True, open_high=True), default=0.95, help="level of the bootstrap CI (default 0.95)")
    p.add_argument("--seed", type=int_arg(0, SEED_MAX), default=0, help="seed of the start vectors and resamples (default 0)")
    p.add_argument("--multiples", default="0.5,1,2,5,10", help="multiples m of lambda_max for s2 = m * lambda_max "
                   "(default 0.5,1,2,5,10)")
    add_device_argument(p)
    add_format_argument(p)


def run(args) -> int:
    import math
    import warnings

    from hcdiag.errors import InputError
    from hcdiag.spectrum import DecoderVarianceWarning, decoder_variances, spectrum

    multiples = parse_float_list(args.multiples, "multiples")
    bad = [m for m in multiples if not (math.isfinite(m) and m > 0)]
    if bad:
        raise InputError(f"The 'multiples' option must hold finite numbers > 0. Got {bad[0]:g}.")
    ds = load_data(args)
    spec = spectrum(ds.x, top=args.top, method=args.method, device=args.device, bootstrap=args.bootstrap,
                    ci_level=args.ci_level, seed=args.seed)
    rows, note = [], None
    if spec.constant:
        note = ("lambda_max is 0 (constant data), so multiples of it are undefined as decoder variances; "
                "check the data or set s2 directly.")
    else:
        with warnings.catch_warnings():  # reported in the table's inside_ci column instead
            warnings.simplefilter("ignore", DecoderVarianceWarning)
            rows = decoder_variances(spec.lambda_max, multiples, ci=spec.ci)
    payload = dict(spec.to_dict(), dataset=ds.to_dict(), multiples=rows, note=note)
    emit(args, payload, _text(spec, ds, rows, note))
    if note is not None:
        raise InputError(note)
    return 0


def _text(spec, ds, rows, note) -> str:
    lines = [f"covariance spectrum of {ds.name} ({spec.n} rows x {spec.d} features, 1/n normalisation)",
             f"method {spec.method} on {spec.device}: {spec.passes:g} read pass(es), {spec.n_iter} iteration(s), "
             f"{'converged' if spec.converged else 'NOT converged'}",
             f"lambda_max = {spec.lambda_max:.6g}"
             + (f"   {100 * spec.ci_level:g}% CI [{spec.ci[0]:.6g}, {spec.ci[1]:.6g}] from {spec.bootstrap} bootstrap "
                "resamples" if spec.ci is not None else ""),
             f"trace (total variance) = {spec.trace:.6g}"
             + (f"   lambda_max / trace = {spec.lambda_max / spec.trace:.4g}" if spec.trace > 0 else ""),
             ""]
    share = [v / spec.trace if spec.trace > 0 else 0.0 for v in spec.eigenvalues]
    lines.append(format_table(["rank", "eigenvalue", "fraction of trace"],
                              [[i + 1, float(v), float(f)] for i, (v, f) in enumerate(zip(spec.eigenvalues, share))]))
    if rows:
        lines += ["", "decoder variances s2 = m * lambda_max"
                  + (" (inside_ci: s2 inside the CI of lambda_max, the side of eq. 4 is undecided)" if spec.ci else ""),
                  format_table(["multiple", "s2", "inside_ci"],
                               [[r["multiple"], r["s2"], "-" if r["inside_ci"] is None else ("YES" if r["inside_ci"] else "no")]
                                for r in rows])]
    if note:
        lines += ["", note]
    return "\n".join(lines)
