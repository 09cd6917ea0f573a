"""Arguments and output shared by the sub-commands (no heavy imports here)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from hcdiag.formats import to_jsonable


#: Seeds are integers in [0, SEED_MAX]: numpy's legacy generators and scikit-learn's random_state take no more.
SEED_MAX = 2**32 - 1


def _given(text: str) -> str:
    return text if text and text == text.strip() else repr(text)


def int_arg(minimum: int, maximum: int | None = None, *, or_value: int | None = None, meaning: str = ""):
    """An argparse ``type``: an integer in [minimum, maximum] (or ``or_value``, which means ``meaning``).

    A bad value stops the command while parsing, before any data is read, with one line naming the
    allowed values and what was given: ``argument --n-jobs: must be an integer >= 1 or -1 (all cores). Got 0.``

    >>> int_arg(2, 10)("7")
    7
    """
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if or_value is not None:
        allowed += f" or {or_value}" + (f" ({meaning})" if meaning else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (value != or_value and (value < minimum or (maximum is not None and value > maximum))):
            raise argparse.ArgumentTypeError(f"must be {allowed}. Got {_given(text)}.")
        return value

    return parse


def float_arg(minimum: float, maximum: float | None = None, *, open_low: bool = False, open_high: bool = False):
    """An argparse ``type``: a finite number in the given range (``open_*`` excludes that end); else one line."""
    if maximum is None:
        allowed = f"a finite number {'>' if open_low else '>='} {minimum:g}"
    else:
        allowed = f"a number in {'(' if open_low else '['}{minimum:g}, {maximum:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > minimum if open_low else value >= minimum)
        if maximum is not None:
            ok = ok and (value < maximum if open_high else value <= maximum)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {allowed}. Got {_given(text)}.")
        return value

    return parse


def nonempty_arg(text: str) -> str:
    """An argparse ``type`` for paths: refuse a blank one (the empty path is the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be blank. Got {text!r}.")
    return text


def add_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """DATA and the loader options understood by ``hcdiag.data.load``."""
    p.add_argument("data", metavar="DATA",
                   help="synthetic, fashion-mnist, mnist, cifar10, digits, or a path to .npy/.npz/.pt/.csv")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    p.add_argument("--resize", type=int_arg(1), default=None,
                   help="image side after resizing (fashion-mnist: 14 default, 28 keeps full size)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="dataset split (default train)")
    p.add_argument("--n-samples", type=int_arg(2), default=None, help="use only the first N rows (synthetic: generate N)")
    p.add_argument("--data-seed", type=int_arg(0, SEED_MAX), default=0, help="seed of the synthetic dataset (default 0)")
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
