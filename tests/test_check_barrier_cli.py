"""``hcdiag check-barrier RUN``: the table, the JSON document, exit statuses, bad input, the report folder.

The runs are the hand-built ones of ``test_checks.py`` (known verdicts: N1 holds, T2 fails, ...).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from hcdiag.checks.barrier import CHECKS, run_checks
from hcdiag.cli import main
from hcdiag.runfile import save_run
from test_checks import R0, hand_run, strip_seconds  # the hand-built runs (tests/ is on sys.path)

PREFIX = "hcdiag check-barrier: error: "


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def with_history(run: dict) -> dict:
    """Add a small training history (the report's Figure 2 left and Figure 3 read it)."""
    h, r0 = 8, run["clusterings"]["centroids"].shape[0]
    g = torch.Generator().manual_seed(0)
    run["history"] = {"step": torch.arange(h) * 10, "epoch": torch.arange(h, dtype=torch.float32),
                      "stage": torch.tensor([1, 1, 1, 2, 2, 3, 3, 3]), "loss": torch.rand(h, generator=g),
                      "recon": torch.rand(h, generator=g), "kl": torch.rand(h, generator=g) + 0.5,
                      "cluster": torch.rand(h, generator=g), "au": torch.full((h,), 2.0),
                      "losses": torch.rand(h, r0, generator=g) + 0.1}
    return run


@pytest.fixture
def run_path(seed, tmp_path):
    return save_run(with_history(hand_run(seed)), tmp_path / "run.pt")


def cli(capsys, *argv):
    code = main(["check-barrier", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(capsys, *argv) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert "Traceback" not in err
    return lines[0][len(PREFIX):]


# ---------------------------------------------------------------------------------------------------
# output

def test_text_table_lists_every_check_with_its_verdict(run_path, capsys):
    code, out, err = cli(capsys, run_path)
    expected = {r.id: r.verdict for r in run_checks(run_path)}
    assert code == 1  # T2 and I2 fail on this run (an exactly collapsed model lies in F_T)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(\S+)\s+(holds|FAILS|inconclusive)\s", out, re.M)}
    assert list(rows) == list(CHECKS)
    assert {k: v.lower() for k, v in rows.items()} == {k: ("fails" if v == "fails" else v) for k, v in expected.items()}
    assert "overall: fails (tau = 0.05)" in out


def test_json_document_has_schema_and_one_object_per_check(run_path, capsys):
    code, out, err = cli(capsys, run_path, "--format", "json")
    doc = json.loads(out)
    direct = run_checks(run_path)
    assert code == 1 and doc["schema"] == "hcdiag.check-barrier/1" and doc["status"] == "fails"
    assert doc["tolerance"] == 0.05 and doc["run"] == str(run_path) and doc["require"] == list(CHECKS)
    assert [c["id"] for c in doc["checks"]] == list(CHECKS)
    for c, r in zip(doc["checks"], direct):
        assert {"id", "claim", "verdict", "values", "witness"} <= set(c)
        assert c["verdict"] == r.verdict and c["claim"] == r.claim
        assert isinstance(c["values"], dict) and (c["witness"] is None) == (r.witness is None)
    t2 = next(c for c in doc["checks"] if c["id"] == "T2")
    assert t2["values"]["delta_star"] == 0.25 and t2["witness"]["kl"] == 0.0  # numbers survive the JSON


@pytest.mark.parametrize("require,code", [("N1", 0), ("n1,T1,KL", 0), ("T2", 1), ("N1,T2", 1)])
def test_exit_status_follows_the_required_checks(run_path, capsys, require, code):
    got, out, _ = cli(capsys, run_path, "--require", require, "--format", "json")
    doc = json.loads(out)
    assert got == code and doc["status"] == ("holds" if code == 0 else "fails")
    assert doc["require"] == [c.strip().upper() for c in require.split(",")]


def test_an_inconclusive_required_check_gives_exit_1(seed, tmp_path, capsys):
    path = save_run(hand_run(seed, resp=False), tmp_path / "run.pt")  # T4 has no teacher
    code, out, _ = cli(capsys, path, "--only", "T4,N1", "--require", "T4", "--format", "json")
    doc = json.loads(out)
    assert code == 1 and doc["status"] == "inconclusive" and [c["id"] for c in doc["checks"]] == ["T4", "N1"]
    assert cli(capsys, path, "--only", "T4,N1", "--require", "N1")[0] == 0


def test_tolerance_is_passed_to_the_checks(seed, tmp_path, capsys):
    from test_checks import with_states

    path = save_run(with_states(seed=seed, final=((0.5, 0.3), "data")), tmp_path / "run.pt")  # L/eps = 1.36
    assert cli(capsys, path, "--only", "N2", "--require", "N2")[0] == 1
    code, out, _ = cli(capsys, path, "--only", "N2", "--require", "N2", "--tolerance", "0.5", "--format", "json")
    assert code == 0 and json.loads(out)["tolerance"] == 0.5


# ---------------------------------------------------------------------------------------------------
# bad input: exit 2, ONE line on stderr

def test_missing_file(tmp_path, capsys):
    msg = one_error_line(capsys, tmp_path / "nope.pt")
    assert msg == (f"{tmp_path / 'nope.pt'}: no such file; check the path (a run file is written by the trainer, "
                   "e.g. run.pt).")


def test_a_directory(run_path, capsys):
    msg = one_error_line(capsys, run_path.parent)
    assert msg.startswith(f"{run_path.parent}: is a directory, not a run file (it holds {run_path})")


def test_not_a_torch_file(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("these are notes, not a run\n")
    assert re.match(rf"{re.escape(str(p))}: is not a torch file \(torch\.load failed: ", one_error_line(capsys, p))


def test_truncated_file(run_path, tmp_path, capsys):
    data = run_path.read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: len(data) // 2])
    assert one_error_line(capsys, p).startswith(f"{p}: is truncated or corrupt (")


class _Payload:
    """Unpickling this would create a folder: the unsafe-pickle test checks that nothing runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_unsafe_pickle_names_the_global_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "created_by_the_payload"
    p = tmp_path / "evil.pt"
    torch.save({"format": "hcdiag-run", "version": 1, "payload": _Payload(str(marker))}, p)
    msg = one_error_line(capsys, p)
    assert re.match(rf"{re.escape(str(p))}: holds pickled objects a run file may not contain \(it asked for the "
                    r"global \w+\.mkdir, which is not allowlisted\); nothing from it was run", msg)
    assert not marker.exists()


def saved(tmp_path, run, name="bad.pt"):
    p = tmp_path / name
    torch.save(run, p)  # torch.save, not save_run: save_run refuses to write an invalid run
    return p


def test_wrong_format(seed, tmp_path, capsys):
    run = hand_run(seed)
    run["format"] = "someone-elses-checkpoint"
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p) == (f"{p}: format is 'someone-elses-checkpoint', not 'hcdiag-run', so it is "
                                         "not an hcdiag run file; see docs/runfile.md.")


def test_unsupported_version(seed, tmp_path, capsys):
    run = hand_run(seed)
    run["version"] = 99
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p).startswith(f"{p}: version 99 is not supported; this hcdiag reads version(s) 1")


def test_missing_key_is_named(seed, tmp_path, capsys):
    run = hand_run(seed)
    del run["clusterings"]["centroids"]
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p) == (f"{p}: clusterings.centroids is missing; a run file needs it ([R0, K, N]); "
                                         "see docs/runfile.md.")


def test_shapes_that_disagree_name_both_keys(seed, tmp_path, capsys):
    run = hand_run(seed)
    run["eval"]["xbar"] = torch.zeros(3)
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p) == (f"{p}: eval.x has N=2 but eval.xbar has N=3; both must describe the same "
                                         "run: fix the producer.")


def test_non_finite_values_give_the_key_and_the_count(seed, tmp_path, capsys):
    run = hand_run(seed)
    run["clusterings"]["centroids"][1, 0, 0] = float("nan")
    run["clusterings"]["centroids"][2, 1, 1] = float("inf")
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p).startswith(f"{p}: clusterings.centroids holds 2 non-finite value(s) (NaN or inf) "
                                                f"of {R0 * 2 * 2};")


def test_unknown_require_id(run_path, capsys):
    assert one_error_line(capsys, run_path, "--require", "N1,Q7") == (
        f"--require: unknown check id(s) Q7; valid ids are {', '.join(CHECKS)}, W3, W4.")


def test_require_outside_only(run_path, capsys):
    assert one_error_line(capsys, run_path, "--only", "N1", "--require", "T2") == (
        "--require names ['T2'] which --only does not run.")


def test_bad_tolerance(run_path, capsys):
    assert one_error_line(capsys, run_path, "--tolerance", "-1") == "--tolerance must be a float in [0, 10). Got -1.0."


def test_an_existing_file_as_report_folder(run_path, tmp_path, capsys):
    f = tmp_path / "report.txt"
    f.write_text("x")
    assert one_error_line(capsys, run_path, "--report", f) == f"--report {f} is a file; give a folder."


# ---------------------------------------------------------------------------------------------------
# the report folder

def test_report_folder_holds_markdown_html_json_and_figures(run_path, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, _ = cli(capsys, run_path, "--report", out_dir)
    files = sorted(p.name for p in out_dir.iterdir())
    figs = ["fig_clustering_losses.png", "fig_distance.png", "fig_kl_au.png", "fig_paths.png"]
    assert code == 1 and files == sorted(figs + ["report.html", "report.md", "results.json"])
    assert f"report: {out_dir}/" in out
    for f in figs:
        assert (out_dir / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out_dir / "report.md").read_text()
    for cid in CHECKS:
        assert f"| {cid} |" in md and f"### {cid}: " in md
    for f in figs:
        assert f"]({f})" in md
    html = (out_dir / "report.html").read_text()
    srcs = re.findall(r"""src\s*=\s*["']?([^"' >]+)""", html)
    assert len(srcs) == len(figs) and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "<link" not in html and "http://" not in html and "https://" not in html
    doc = json.loads((out_dir / "results.json").read_text())
    code2, out2, _ = cli(capsys, run_path, "--format", "json")
    assert strip_seconds(doc) == strip_seconds(json.loads(out2))
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_report_folder_under_a_file(run_path, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert one_error_line(capsys, run_path, "--only", "N1", "--report", f / "sub") == (
        f"--report {f / 'sub'} cannot be created (a parent is a file); give a writable folder.")


def test_snapshots_that_do_not_fit_config_model(seed, tmp_path, capsys):
    """save_run used to write such a file and check-barrier refused it later; now save_run refuses it
    (issue 9), and a file written around save_run is refused when it is read, naming the key."""
    from hcdiag.errors import InputError
    from hcdiag.runfile import example_run

    model = {"family": "linear", "input_dim": 5, "latent_dim": 2, "enc_widths": [], "dec_widths": [],
             "activation": "relu", "image_shape": None, "channels": []}
    other_names = lambda name: {"encoder.weight": torch.zeros(2, 5), "decoder.bias": torch.zeros(5)}  # noqa: E731
    run = example_run(seed=seed % 1000, model=model, state_fn=other_names)
    why = ("snapshots.init has unexpected key 'encoder.weight' for config.model (family 'linear'); store exactly the "
           "state_dict of the model config.model describes (its parameter names and shapes are listed in "
           "docs/runfile.md, 'Parameter names').")
    with pytest.raises(InputError, match=f"^refusing to write .*run.pt: {re.escape(why)}$"):
        save_run(run, tmp_path / "run.pt")
    p = saved(tmp_path, run)
    assert one_error_line(capsys, p) == f"{p}: {why}"


def test_partial_runs_are_checked_with_partial(seed, tmp_path, capsys):
    """Regression: the message advertised --partial, which check-barrier did not have."""
    from hcdiag.runfile import example_run

    p = save_run(example_run(seed=seed % 1000, complete=False), tmp_path / "run.pt")
    assert one_error_line(capsys, p) == (
        f"{p}: status says the run is not complete (it stopped at stage 'stage1'); wait for training to finish, or "
        "load it with partial=True (on the command line: hcdiag check-barrier --partial) to check a run still "
        "training.")
    code, out, err = cli(capsys, p, "--partial", "--format", "json")
    doc = json.loads(out)
    res = {c["id"]: c for c in doc["checks"]}
    assert code == 1 and err == "" and doc["status"] == "inconclusive"
    for cid, why in (("N1", "the run has 1 feasible region(s); nesting needs at least 2"),
                     ("T1", "the run has no refinement, so no eps_T"), ("T2b", "the run has no refinement"),
                     ("I1", "the run has no refinement and stage 3")):
        assert res[cid]["verdict"] == "inconclusive" and res[cid]["reason"].startswith(why), cid
    assert res["KL"]["verdict"] in ("holds", "fails")  # the snapshots it has are checked
    code, out, _ = cli(capsys, p, "--partial")
    assert "run: partial (stopped at stage 'stage1'); checks whose stage is missing are inconclusive" in out


@pytest.mark.parametrize("absent,left_out,why", [
    (("losses",), ["fig_clustering_losses.png"], "history.losses is absent"),
    (("kl",), ["fig_kl_au.png"], "history.kl is absent"),
    (("kl", "losses", "au", "stage"), ["fig_clustering_losses.png", "fig_kl_au.png"], None),
    (("au", "stage"), [], None),  # Figure 3 draws KL alone
])
def test_a_report_without_some_history_series_leaves_their_figures_out(seed, tmp_path, capsys, absent, left_out, why):
    """Regression: --report crashed with a traceback and exit 1 when history lacked losses or kl."""
    run = with_history(hand_run(seed))
    for key in absent:
        del run["history"][key]
    p = save_run(run, tmp_path / "run.pt")
    out_dir = tmp_path / "report"
    code, out, err = cli(capsys, p, "--report", out_dir)
    assert code == 1 and "Traceback" not in err  # T2 fails on this run, as with every series present
    figs = {"fig_clustering_losses.png", "fig_kl_au.png", "fig_distance.png", "fig_paths.png"}
    files = {q.name for q in out_dir.iterdir()}
    assert files == (figs - set(left_out)) | {"report.md", "report.html", "results.json"}
    md = (out_dir / "report.md").read_text()
    for f in left_out:
        reason = why or {"fig_clustering_losses.png": "history.losses is absent", "fig_kl_au.png": "history.kl is absent"}[f]
        assert f"- `{f}`: {reason}" in md and f"]({f})" not in md
        assert f"{f} ({reason})" in out
    assert ("## Figures left out" in md) == bool(left_out)


def test_report_overall_follows_the_required_checks(run_path, tmp_path, capsys):
    """Regression: report.md said 'Overall: fails' (all checks) while --require N1 exited 0."""
    out_dir = tmp_path / "rep"
    code, _, _ = cli(capsys, run_path, "--require", "N1", "--report", out_dir)
    md = (out_dir / "report.md").read_text()
    assert code == 0 and "Overall: **holds** (deciding checks: N1)" in md
    assert json.loads((out_dir / "results.json").read_text())["status"] == "holds"
    assert "| T2 | Theorem 4.4 | fails |" in md  # every check is still reported
