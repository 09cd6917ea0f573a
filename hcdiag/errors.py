"""Error and warning types shared by every module.

``InputError`` is for anything a user can fix (bad file, bad argument, bad data): its message is
one line saying what is wrong and what to do. The CLI prints it as ``hcdiag: error: ...`` and exits
with status 2, never with a traceback.
"""


class HcdiagError(Exception):
    """Base class of hcdiag's own errors."""


class InputError(HcdiagError, ValueError):
    """Bad input a user can fix; the message is one line (what is wrong, what to do)."""


class NumericalError(HcdiagError, RuntimeError):
    """A computation produced non-finite values; the message names where and what to change.

    The input was fine but the run failed: the CLI prints the one-line message and exits with status 1
    (``hcdiag train``: after keeping what was trained so far as a partial run file)."""


class HcdiagWarning(UserWarning):
    """Base class of hcdiag's warnings (e.g. a decoder variance inside lambda_max's CI)."""
