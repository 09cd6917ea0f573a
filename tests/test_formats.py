"""hcdiag.formats: the durations progress lines and plans print (one rule for both)."""

import pytest

from hcdiag.formats import duration
from hcdiag.plan import duration as plan_duration


@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (42.4, "42 s"), (89.4, "89 s"),  # seconds below a minute and a half
    (90, "2 min"), (719, "12 min"), (5399, "90 min"),  # minutes below an hour and a half
    (5400, "1.5 h"), (12240, "3.4 h"), (98 * 3600, "98.0 h"),
])
def test_duration_picks_the_unit_that_reads_best(seconds, text):
    assert duration(seconds) == text
    assert plan_duration(seconds / 3600) == text  # the plan's hours, the same text
