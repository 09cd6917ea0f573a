"""``hcdiag phase``: the linear VAE's closed-form phase table (KL, active dims) against s2 = m * lambda_max."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import (add_data_arguments, add_device_argument, add_format_argument, emit,
                               int_arg, load_data, parse_float_list)
from hcdiag.formats import format_table

NAME = "phase"
HELP = "closed-form linear-VAE phase table: KL and active dims at s2 = m * lambda_max (paper 3.2, 5.7)"

DEFAULT_MULTIPLES = "0.25,0.5,1,2,5,10"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--multiples", default=DEFAULT_MULTIPLES,
                   help=f"comma-separated decoder-variance multiples m, s2 = m * lambda_max (default {DEFAULT_MULTIPLES})")
    from hcdiag.theory import MAX_LATENT_DIM

    p.add_argument("--latent-dim", type=int_arg(1, MAX_LATENT_DIM), default=8,
                   help="latent dimension n (default 8, paper 5.1.3)")
    add_device_argument(p)
    add_format_argument(p)


def run(args: argparse.Namespace) -> int:
    from hcdiag.errors import InputError
    from hcdiag.spectrum import spectrum
    from hcdiag.theory import critical_multiple, phase_table

    # Validate the cheap arguments before reading any data.
    multiples = parse_float_list(args.multiples, "multiples")
    phase_table([1.0], multiples, args.latent_dim)

    ds = load_data(args)
    spec = spectrum(ds.x, top=min(args.latent_dim, ds.d), device=args.device)
    if spec.constant or spec.lambda_max <= 0:
        raise InputError(f"The data {ds.name} has lambda_max = 0 (constant rows), so s2 = m * lambda_max is 0; "
                         "check the data.")
    rows = phase_table(spec.eigenvalues, multiples, args.latent_dim, trace=spec.trace, N=spec.d,
                       lambda_max=spec.lambda_max)
    m_c = critical_multiple(spec.eigenvalues, lambda_max=spec.lambda_max)
    payload = {
        "dataset": ds.name,
        "n": spec.n,
        "N": spec.d,
        "lambda_max": spec.lambda_max,
        "trace": spec.trace,
        "eigenvalues": spec.eigenvalues,
        "latent_dim": args.latent_dim,
        "critical_multiple": m_c,
        "rows": rows,
    }
    table = format_table(
        ["m", "s2", "active", "active dims", "KL (nats)", "-ELBO (nats)", "AU (Burda)"],
        [[r["multiple"], r["s2"], r["active"], ",".join(str(i) for i in r["active_dims"]) or "-", r["kl"],
          r["neg_elbo"], r["au_burda"]] for r in rows])
    top = ", ".join(f"{v:.4g}" for v in spec.eigenvalues)
    text = (f"{ds.name}: n = {spec.n}, N = {spec.d}, lambda_max = {spec.lambda_max:.6g}, tr Sigma = {spec.trace:.6g}\n"
            f"top {spec.eigenvalues.size} eigenvalues: {top}\n"
            f"linear VAE, latent dim {args.latent_dim}: dim i active iff lambda_i > s2; "
            f"KL = 0 from m = {m_c:.4g} on\n\n{table}")
    emit(args, payload, text)
    return 0
