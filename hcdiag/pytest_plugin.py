"""pytest plugin: ``pytest --hcdiag-run run.pt`` turns each barrier check into a test item, and
``--hcdiag-data DATA --hcdiag-s2-multiple M`` / ``--hcdiag-clusterings FILE --hcdiag-eps EPS`` turn the
theorems' preconditions into test items before any training (:mod:`hcdiag.testing`).

Registered through the ``pytest11`` entry point; it does nothing unless one of these options is given.
A bad option or input stops the session with one line (a usage error), before any test runs.
"""

from __future__ import annotations

import re

import pytest

# the library's parameter names -> the options that set them (library errors name parameters, not flags)
_FLAGS = {"s2": "--hcdiag-s2", "multiple": "--hcdiag-s2-multiple", "latent_dim": "--hcdiag-latent-dim",
          "margin": "--hcdiag-margin", "bootstrap": "--hcdiag-bootstrap", "eps": "--hcdiag-eps",
          "subset": "--hcdiag-subset", "tolerance": "--hcdiag-tolerance", "r0": "--hcdiag-r0", "k": "--hcdiag-k",
          "seed": "--hcdiag-seed", "clusterings": "--hcdiag-clusterings", "data": "--hcdiag-data"}


def pytest_addoption(parser):
    group = parser.getgroup("hcdiag")
    group.addoption("--hcdiag-run", action="append", default=[], metavar="RUN",
                    help="run file(s) whose hcdiag barrier checks become test items")
    group.addoption("--hcdiag-tolerance", type=float, default=0.05, help="relative tolerance tau (default 0.05)")
    group.addoption("--hcdiag-require", default=None, help="comma-separated check ids to collect (default all)")
    # preconditions before any training (the values are parsed in the hook, so a bad one is one line)
    group.addoption("--hcdiag-data", default=None, metavar="DATA",
                    help="data set (a name or a .npy/.npz/.pt/.csv path) for the phase-transition precondition, or "
                         "to fit clusterings for --hcdiag-eps")
    group.addoption("--hcdiag-s2", action="append", default=[], metavar="S2",
                    help="decoder variance whose phase-transition precondition (s2 < lambda_max) becomes an item")
    group.addoption("--hcdiag-s2-multiple", action="append", default=[], metavar="M",
                    help="the same for s2 = M * lambda_max")
    group.addoption("--hcdiag-latent-dim", default="8", metavar="N", help="latent dimension (default 8)")
    group.addoption("--hcdiag-margin", default="0.1", help="s2 <= (1 - margin) lambda_max (default 0.1)")
    group.addoption("--hcdiag-bootstrap", default="0", metavar="B",
                    help="row resamples for a CI of lambda_max; s2 inside it fails as undecidable (default 0: none)")
    group.addoption("--hcdiag-clusterings", action="append", default=[], metavar="FILE",
                    help=".npz holding 'centroids' (R, K, N) (or a .npy) whose Theorem 4.4 precondition becomes "
                         "an item")
    group.addoption("--hcdiag-eps", default=None, metavar="EPS",
                    help="refinement threshold: the precondition is delta*(S) > eps (1 + tau)")
    group.addoption("--hcdiag-subset", default=None, metavar="IDS",
                    help="comma-separated clusterings forming S (default every pair)")
    group.addoption("--hcdiag-r0", default="16", help="EM runs fitted to --hcdiag-data when no --hcdiag-clusterings "
                                                      "is given (default 16)")
    group.addoption("--hcdiag-k", default="8", help="components per clustering (default 8)")
    group.addoption("--hcdiag-seed", default="0", help="seed of the bootstrap and of the EM runs (default 0)")


def _number(config, flag: str, kind=float):
    text = config.getoption(flag)
    try:
        return kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise pytest.UsageError(f"hcdiag: {flag} must be {what}. Got {text!r}.") from None


def _numbers(config, flag: str) -> list[float]:
    out = []
    for text in config.getoption(flag):
        try:
            out.append(float(text))
        except ValueError:
            raise pytest.UsageError(f"hcdiag: {flag} must be a number. Got {text!r}.") from None
    return out


def _precondition_items(session, config) -> list:
    data, eps_text = config.getoption("--hcdiag-data"), config.getoption("--hcdiag-eps")
    s2, multiples = _numbers(config, "--hcdiag-s2"), _numbers(config, "--hcdiag-s2-multiple")
    files = config.getoption("--hcdiag-clusterings")
    if (s2 or multiples) and data is None:
        raise pytest.UsageError("hcdiag: --hcdiag-s2 and --hcdiag-s2-multiple need --hcdiag-data DATA.")
    if files and eps_text is None:
        raise pytest.UsageError("hcdiag: --hcdiag-clusterings needs --hcdiag-eps EPS (the refinement threshold).")
    if eps_text is not None and not files and data is None:
        raise pytest.UsageError("hcdiag: --hcdiag-eps needs --hcdiag-clusterings FILE, or --hcdiag-data DATA to fit "
                                "clusterings (--hcdiag-r0, --hcdiag-k).")
    if data is not None and not (s2 or multiples or eps_text is not None):
        raise pytest.UsageError("hcdiag: --hcdiag-data needs --hcdiag-s2 or --hcdiag-s2-multiple (phase-transition "
                                "precondition) or --hcdiag-eps (Theorem 4.4 precondition).")
    if not (s2 or multiples or eps_text is not None):
        return []
    from hcdiag.testing import collect_precondition_items

    subset = config.getoption("--hcdiag-subset")
    if subset is not None:
        try:
            subset = [int(i) for i in subset.split(",")]
        except ValueError:
            raise pytest.UsageError(f"hcdiag: --hcdiag-subset must be comma-separated integers. Got {subset!r}.") \
                from None
    return collect_precondition_items(
        session, data=data, s2=s2, multiples=multiples, latent_dim=_number(config, "--hcdiag-latent-dim", int),
        margin=_number(config, "--hcdiag-margin"), bootstrap=_number(config, "--hcdiag-bootstrap", int),
        seed=_number(config, "--hcdiag-seed", int), clusterings=files,
        eps=None if eps_text is None else _number(config, "--hcdiag-eps"), subset=subset,
        tolerance=config.getoption("--hcdiag-tolerance"), r0=_number(config, "--hcdiag-r0", int),
        k=_number(config, "--hcdiag-k", int))


def _flags(message: str) -> str:
    """A library message with its parameter names replaced by the options that set them."""
    def sub(m):
        flag = _FLAGS.get(m.group(1))
        return f"The {flag} option" if flag else m.group(0)

    return re.sub(r"The '(\w+)' (?:parameter|argument)", sub, message)


def pytest_collection_modifyitems(session, config, items):
    runs = config.getoption("--hcdiag-run")
    from hcdiag.errors import InputError

    try:
        if runs:
            from hcdiag.checks.barrier import parse_ids
            from hcdiag.testing import collect_items

            require = config.getoption("--hcdiag-require")
            require = parse_ids(require, "--hcdiag-require") if require else None  # the message names our option
            items.extend(collect_items(session, runs, tolerance=config.getoption("--hcdiag-tolerance"),
                                       require=require))
        items.extend(_precondition_items(session, config))
    except InputError as exc:  # a bad run file or option is a usage error: one line, no traceback
        # str(): the library's words (parameter names, never hcdiag's own command-line flags), and _flags turns
        # the parameters these options set into the options
        raise pytest.UsageError(f"hcdiag: {_flags(str(exc))}") from None
