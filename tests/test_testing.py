"""``hcdiag.testing.assert_barrier`` and the pytest plugin (``pytest --hcdiag-run RUN``) on hand-built runs."""

pytest_plugins = ["pytester"]

import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from hcdiag.checks.barrier import run_checks  # noqa: E402
from hcdiag.errors import InputError  # noqa: E402
from hcdiag.runfile import save_run  # noqa: E402
from hcdiag.testing import assert_barrier  # noqa: E402
from test_checks import hand_run  # noqa: E402  (the hand-built runs; tests/ is on sys.path)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture
def run_path(seed, tmp_path):
    return save_run(hand_run(seed), tmp_path / "run.pt")


# ---------------------------------------------------------------------------------------------------
# assert_barrier

def test_assert_barrier_lists_every_failing_check_with_its_numbers(run_path):
    results = {r.id: r for r in run_checks(run_path)}
    bad = [cid for cid, r in results.items() if r.verdict != "holds"]
    assert {"T2", "I2"} <= set(bad)  # an exactly collapsed model lies in F_T on this run
    with pytest.raises(AssertionError) as info:
        assert_barrier(run_path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{len(bad)} barrier check(s) did not hold (tau = 0.05):"
    matches = (re.match(r"  (\S+) (fails|inconclusive): ", ln) for ln in lines[1:])
    listed = {m.group(1): m.group(2) for m in matches if m}
    assert listed == {cid: results[cid].verdict for cid in bad}
    t2 = next(ln for ln in lines if ln.startswith("  T2 fails: "))
    numbers = json.loads(t2.split(" | ", 1)[1])  # the scalar values, as JSON
    assert numbers["delta_star"] == 0.25 and numbers["witness_kl"] == 0.0
    assert numbers["eps_T"] == pytest.approx(results["T2"].values["eps_T"])


def test_assert_barrier_returns_the_results_when_all_hold(run_path):
    results = assert_barrier(run_path, require=["N1", "T1", "KL", "AU"])
    assert [r.id for r in results] == ["N1", "T1", "KL", "AU"] and all(r.verdict == "holds" for r in results)
    assert results[1].values["eps_T"] < results[1].values["delta"]


def test_assert_barrier_inconclusive_fails_unless_allowed(seed, tmp_path):
    path = save_run(hand_run(seed, resp=False), tmp_path / "run.pt")  # T4 has no teacher
    with pytest.raises(AssertionError, match=r"^1 barrier check\(s\) did not hold \(tau = 0\.05\):\n  T4 inconclusive: "
                                             r"the run file stores no responsibilities"):
        assert_barrier(path, require="T4,N1")
    allowed = assert_barrier(path, require="T4,N1", allow_inconclusive=True)
    assert [r.verdict for r in allowed] == ["inconclusive", "holds"]


def test_assert_barrier_takes_a_dict_and_a_tolerance(seed):
    from test_checks import with_states

    run = with_states(seed=seed, final=((0.5, 0.3), "data"))  # N2: L/eps = 1.36
    with pytest.raises(AssertionError, match=r"N2 fails: 2 \(region, later snapshot\) pairs leave"):
        assert_barrier(run, require=["N2"])
    assert assert_barrier(run, require=["N2"], tolerance=0.5)[0].verdict == "holds"


def test_assert_barrier_refuses_unknown_ids(run_path):
    with pytest.raises(InputError, match=r"^require: unknown check id\(s\) Z1; valid ids are N1, "):
        assert_barrier(run_path, require=["N1", "Z1"])


# ---------------------------------------------------------------------------------------------------
# the pytest plugin

def test_plugin_gives_one_item_per_check_matching_the_verdicts(pytester, run_path):
    verdicts = {r.id: r.verdict for r in run_checks(run_path)}
    result = pytester.runpytest("--hcdiag-run", str(run_path), "-v", "-p", "no:cacheprovider")
    outcome = {"holds": "passed", "fails": "failed", "inconclusive": "skipped"}
    counts = {o: sum(outcome[v] == o for v in verdicts.values()) for o in ("passed", "failed", "skipped")}
    result.assert_outcomes(**counts)
    for cid, v in verdicts.items():  # each item is named after its check and has its check's outcome
        result.stdout.re_match_lines([rf".*::{re.escape(cid)} {outcome[v].upper()}.*"])
    result.stdout.re_match_lines([r".*T2 fails: an exactly collapsed model \(KL = 0\).*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_plugin_require_collects_only_those_checks(pytester, run_path):
    result = pytester.runpytest("--hcdiag-run", str(run_path), "--hcdiag-require", "N1,KL", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.OK


def test_plugin_bad_run_file_is_a_usage_error_without_traceback(pytester, tmp_path):
    missing = tmp_path / "missing.pt"
    result = pytester.runpytest("--hcdiag-run", str(missing), "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"hcdiag: {missing}: no such file" in err
    assert "Traceback" not in err + result.stdout.str()


def test_plugin_messages_name_its_own_options_never_hcdiags_flags(pytester, run_path, tmp_path):
    """A bad --hcdiag-require names that option; a library error naming one of ``hcdiag``'s own flags (here
    check-barrier's --partial) reaches the plugin's user in the library's words."""
    result = pytester.runpytest("--hcdiag-run", str(run_path), "--hcdiag-require", "N1,Z1", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "hcdiag: --hcdiag-require: unknown check id(s) Z1; valid ids are N1, " in result.stderr.str()
    from hcdiag.runfile import example_run

    partial = save_run(example_run(complete=False), tmp_path / "partial.pt")
    result = pytester.runpytest("--hcdiag-run", str(partial), "-p", "no:cacheprovider")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (f"hcdiag: {partial}: status says the run is not complete (it stopped at stage 'stage1'); wait for training "
            "to finish, or load it with partial=True to check a run still training.") in err
    assert "--partial" not in err and "\u27ea" not in err


def test_plugin_is_inert_without_the_option(pytester):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
