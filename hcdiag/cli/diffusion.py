"""``hcdiag diffusion``: critical timestep 1 - alphabar_t = lambda_max (paper eq. 13) and the SNR timestep."""

from __future__ import annotations

import argparse

from hcdiag.cli.common import add_data_arguments, add_device_argument, add_format_argument, emit, int_arg, load_data
from hcdiag.formats import format_table

NAME = "diffusion"
HELP = "diffusion critical timestep 1 - alphabar_t = lambda_max (paper eq. 13) and the SNR timestep"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--schedule", default="all", choices=["linear", "cosine", "all"],
                   help="noise schedule: linear (DDPM 1e-4..0.02), cosine (Nichol & Dhariwal), all (default)")
    from hcdiag.theory import MAX_T

    p.add_argument("--T", dest="T", type=int_arg(2, MAX_T), default=1000, help="number of diffusion steps (default 1000)")
    add_device_argument(p)
    add_format_argument(p)


def run(args: argparse.Namespace) -> int:
    from hcdiag.errors import InputError
    from hcdiag.spectrum import spectrum
    from hcdiag.theory import SCHEDULES, critical_timestep

    schedules = list(SCHEDULES) if args.schedule == "all" else [args.schedule]
    critical_timestep(0.5, schedules[0], args.T)  # validates T before reading any data

    ds = load_data(args)
    spec = spectrum(ds.x, top=1, device=args.device)
    if spec.constant or spec.lambda_max <= 0:
        raise InputError(f"The data {ds.name} has lambda_max = 0 (constant rows); no timestep is defined.")
    results = [critical_timestep(spec.lambda_max, s, args.T) for s in schedules]
    payload = {"dataset": ds.name, "n": spec.n, "N": spec.d, "lambda_max": spec.lambda_max, "T": args.T,
               "vae_s2_threshold": spec.lambda_max,
               "schedules": [r.to_dict() for r in results]}

    def _t(v, frac):
        return "none" if v is None else f"{v} ({frac:.2f})"

    table = format_table(
        ["schedule", "1-abar_1", "1-abar_T", "t_c (interp.)", "t_snr (interp.)"],
        [[r.schedule, f"{r.noise_range[0]:.6g}", f"{r.noise_range[1]:.6g}", _t(r.t_c, r.t_c_frac), _t(r.t_snr, r.t_snr_frac)]
         for r in results])
    notes = []
    for r in results:
        if r.t_c_reason:
            notes.append(f"{r.schedule}: no t_c: {r.t_c_reason}")
        if r.t_snr_reason:
            notes.append(f"{r.schedule}: no SNR timestep: {r.t_snr_reason}")
    text = (f"{ds.name}: n = {spec.n}, N = {spec.d}, lambda_max = {spec.lambda_max:.6g}, T = {args.T}\n"
            f"the VAE's criterion on the same data: collapse for s2 > lambda_max = {spec.lambda_max:.6g} "
            "(hcdiag phase); measured t_c of a trained model: hcdiag check-diffusion\n"
            "t_c: first t with 1 - alphabar_t >= lambda_max (eq. 13); "
            "t_snr: first t with alphabar_t * lambda_max <= 1 - alphabar_t\n\n" + table
            + ("\n\n" + "\n".join(notes) if notes else ""))
    emit(args, payload, text)
    return 0
