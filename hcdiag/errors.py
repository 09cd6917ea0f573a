"""Error and warning types shared by every module, and the markers that keep flag names out of the library.

``InputError`` is for anything a user can fix (bad file, bad argument, bad data): its message is
one line saying what is wrong and what to do. The CLI prints it as ``hcdiag: error: ...`` and exits
with status 2, never with a traceback.

A message that would name a command-line flag names it with :func:`flag` instead, which marks both of its
forms: ``flag("--out", "out")``. ``str(exc)`` (and the warning a library user sees) shows the library form
(``out /x/run.pt already exists; pass resume=True ...``); the command line prints :func:`cli_text` of it, the
flag form (``--out /x/run.pt already exists; pass --resume ...``). Only the CLI layer knows its flags: a
library module never imports ``hcdiag.cli`` and never writes a flag name outside :func:`flag`.

A library message that embeds another error's message keeps that message's markers by embedding
:func:`marked` of it (``f"refusing to write {p}: {marked(exc)}"``), so both forms of it stay right.
"""

from __future__ import annotations

import re

_OPEN, _SEP, _CLOSE = "\u27ea", "|", "\u27eb"  # ⟪cli|library⟫
_MARK = re.compile(f"{_OPEN}([^{_OPEN}{_CLOSE}|]*)\\{_SEP}([^{_OPEN}{_CLOSE}]*){_CLOSE}")


def flag(cli: str, param: str) -> str:
    """A flag named in a message: ``cli`` on the command line (``--out``), ``param`` for a library caller
    (``out``, ``resume=True``); see :func:`render`."""
    for part in (cli, param):
        if any(c in part for c in (_OPEN, _CLOSE)) or _SEP in cli:
            raise ValueError(f"flag(): {part!r} holds a marker character")
    return f"{_OPEN}{cli}{_SEP}{param}{_CLOSE}"


def render(text: str, cli: bool) -> str:
    """``text`` with each :func:`flag` marker replaced by its command-line form (``cli=True``) or its
    library form; text without markers is returned unchanged."""
    if _OPEN not in text:
        return text
    return _MARK.sub(lambda m: m.group(1 if cli else 2), text)


def marked(exc: BaseException) -> str:
    """The message of ``exc`` with its markers kept, to embed in another hcdiag message; ``str(exc)`` for
    an exception that is not hcdiag's own."""
    if isinstance(exc, (HcdiagError, HcdiagWarning)):
        return Exception.__str__(exc)
    return str(exc)


def cli_text(exc: BaseException | str) -> str:
    """The message of an hcdiag error or warning (or a marked string) as the command line prints it: every
    flag in its command-line form. ``str(exc)`` for an exception that is not hcdiag's own."""
    return render(exc if isinstance(exc, str) else marked(exc), cli=True)


class _Marked:
    """``str()`` and ``format()`` show the library form of the message's :func:`flag` markers."""

    def __str__(self) -> str:
        return render(Exception.__str__(self), cli=False)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class HcdiagError(_Marked, Exception):
    """Base class of hcdiag's own errors."""


class InputError(HcdiagError, ValueError):
    """Bad input a user can fix; the message is one line (what is wrong, what to do)."""


class NumericalError(HcdiagError, RuntimeError):
    """A computation produced non-finite values; the message names where and what to change.

    The input was fine but the run failed: the CLI prints the one-line message and exits with status 1
    (``hcdiag train``: after keeping what was trained so far as a partial run file)."""


class HcdiagWarning(_Marked, UserWarning):
    """Base class of hcdiag's warnings (e.g. a decoder variance inside lambda_max's CI)."""
