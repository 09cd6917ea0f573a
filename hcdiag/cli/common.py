"""Arguments and output shared by the sub-commands (no heavy imports here)."""

from __future__ import annotations

import argparse
import json
import sys

from hcdiag.formats import to_jsonable


def add_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """DATA and the loader options understood by ``hcdiag.data.load``."""
    p.add_argument("data", metavar="DATA",
                   help="synthetic, fashion-mnist, mnist, cifar10, digits, or a path to .npy/.npz/.pt/.csv")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    p.add_argument("--resize", type=int, default=None, help="image side after resizing (fashion-mnist: 14 default, 28 keeps full size)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="dataset split (default train)")
    p.add_argument("--n-samples", type=int, default=None, help="use only the first N rows (synthetic: generate N)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset (default 0)")
    p.add_argument("--drop-nonfinite", action="store_true", help="drop rows holding NaN or inf instead of refusing them")


def load_data(args: argparse.Namespace):
    from hcdiag.data import load

    return load(
        args.data,
        data_dir=args.data_dir,
        resize=args.resize,
        split=args.split,
        n_samples=args.n_samples,
        seed=args.data_seed,
        drop_nonfinite=args.drop_nonfinite,
    )


def emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    """Print ``payload`` as JSON or ``text`` as is, per ``--format``."""
    if getattr(args, "format", "text") == "json":
        json.dump(to_jsonable(payload), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def parse_float_list(text: str, name: str) -> list[float]:
    from hcdiag.errors import InputError

    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"The '{name}' option must be a comma-separated list of numbers. Got {text!r}.") from None
    if not vals:
        raise InputError(f"The '{name}' option must list at least one number. Got {text!r}.")
    return vals
