"""pytest plugin: ``pytest --hcdiag-run run.pt`` turns each barrier check into a test item.

Registered through the ``pytest11`` entry point; it does nothing unless ``--hcdiag-run`` is given.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("hcdiag")
    group.addoption("--hcdiag-run", action="append", default=[], metavar="RUN",
                    help="run file(s) whose hcdiag barrier checks become test items")
    group.addoption("--hcdiag-tolerance", type=float, default=0.05, help="relative tolerance tau (default 0.05)")
    group.addoption("--hcdiag-require", default=None, help="comma-separated check ids to collect (default all)")


def pytest_collection_modifyitems(session, config, items):
    runs = config.getoption("--hcdiag-run")
    if not runs:
        return
    from hcdiag.errors import InputError
    from hcdiag.testing import collect_items

    try:
        items.extend(collect_items(session, runs, tolerance=config.getoption("--hcdiag-tolerance"),
                                   require=config.getoption("--hcdiag-require")))
    except InputError as exc:  # a bad run file is a usage error: one line, no traceback
        raise pytest.UsageError(f"hcdiag: {exc}") from None
