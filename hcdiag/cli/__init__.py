"""The ``hcdiag`` command line: one module per sub-command under ``hcdiag.cli``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and imports heavy libraries (torch, scipy) inside ``run`` only, so ``hcdiag --help`` stays fast.
Errors a user can fix (``InputError``) become one line on stderr and exit status 2; a run that failed on
good input (``NumericalError``: a non-finite loss) one line and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Registry of sub-commands: name -> module path. Order is the order of ``--help``.
COMMANDS = {
    "spectrum": "hcdiag.cli.spectrum",
    "phase": "hcdiag.cli.phase",
    "diffusion": "hcdiag.cli.diffusion",
    "clusterings": "hcdiag.cli.clusterings",
    "train": "hcdiag.cli.train",
    "check-barrier": "hcdiag.cli.check_barrier",
    "train-diffusion": "hcdiag.cli.train_diffusion",
    "check-diffusion": "hcdiag.cli.check_diffusion",
    "verify": "hcdiag.cli.verify",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    from hcdiag import __version__

    parser = _Parser(prog="hcdiag", description="Falsifiable checks of Historical Consensus Training.")
    parser.add_argument("--version", action="version", version=f"hcdiag {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, modpath in COMMANDS.items():
        try:
            mod = importlib.import_module(modpath)
        except ModuleNotFoundError as exc:
            if available_only and exc.name == modpath:
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hcdiag.errors import InputError, NumericalError, cli_text

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (InputError, NumericalError) as exc:
        text = cli_text(exc).strip()  # the library's message, its flags as this command line spells them
        msg = text.splitlines()[0] if text else type(exc).__name__
        print(f"hcdiag {args.command}: error: {msg}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1
    except KeyboardInterrupt:
        print(f"hcdiag {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
