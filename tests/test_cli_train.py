"""`hcdiag train` through the CLI: a tiny run end to end, and one line + exit 2 for each bad input."""

import json
import os

import numpy as np
import pytest

from hcdiag.cli import main

FAST = ["--preset", "smoke", "--r0", "4", "--k", "3", "--epochs-per-round", "1", "--steps-per-clustering", "2",
        "--refine-cap", "2", "--stage3-epochs", "1", "--epochs", "1", "--eval-rows", "100", "--enc-widths", "8",
        "--dec-widths", "8", "--latent-dim", "2", "--em-backend", "sklearn", "--quiet"]


@pytest.fixture
def data_file(tmp_path, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 3, size=(3, 5))[rng.integers(0, 3, 400)] + rng.normal(0, 0.5, size=(400, 5))).astype(np.float32)
    p = tmp_path / "x.npy"
    np.save(p, x)
    return p


def _err(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_tiny_run_end_to_end_json(data_file, tmp_path, capsys):
    out = tmp_path / "run.pt"
    assert main(["train", str(data_file), "--out", str(out), "--format", "json", *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    from hcdiag.runfile import load_run

    run = load_run(out)
    assert doc["method"] == "hct" and run.complete
    assert doc["s2"] == pytest.approx(2.0 * run.lambda_max)
    assert doc["refinement"]["eps_T"] == pytest.approx(run.refinement.eps_T)
    assert [r["kept"] for r in doc["rounds"]] == [list(r.kept) for r in run.rounds]


@pytest.mark.parametrize("argv,msg", [
    (["--r0", "24"], r"24 is not a power of two; use 16 or 32"),
    (["--multiple", "-1"], r"The 'multiple' parameter must be a float > 0. Got -1.0"),
    (["--multiple", "0"], r"The 'multiple' parameter must be a float > 0. Got 0.0"),
    (["--k", "500"], r"The 'k' parameter \(500\) is larger than the number of rows \(400\)"),
    (["--loss", "sum"], r"The 'loss' parameter must be one of literal, scaled, mean. Got 'sum'"),
    (["--heartbeat", "-1"], r"^hcdiag train: error: --heartbeat must be a number of seconds >= 0 \(0: only the "
                            r"summaries in a log file\). Got -1.0.$"),
    (["--heartbeat", "inf"], r"--heartbeat must be a number of seconds >= 0 .*Got inf.$"),
])
def test_bad_parameters(data_file, tmp_path, capsys, argv, msg):
    import re

    line = _err(capsys, "train", data_file, "--out", tmp_path / "r.pt", *FAST, *argv)
    assert re.search(msg, line), line
    assert not (tmp_path / "r.pt").exists()


def test_a_log_file_gets_progress_lines_a_terminal_the_live_line(data_file, tmp_path, capsys):
    fast = [a for a in FAST if a != "--quiet"]
    out = tmp_path / "run.pt"
    assert main(["train", str(data_file), "--out", str(out), *fast, "--heartbeat", "1e-9"]) == 0
    err = capsys.readouterr().err.splitlines()  # pytest's stderr is not a terminal
    beats = [ln for ln in err if ln.startswith(f"  {out}: ")]
    assert any(": stage1 epoch 1 loss " in ln and " KL " in ln for ln in beats)
    assert all(ln.endswith(" so far)") for ln in beats)
    assert any(ln.startswith("round 0: 4 -> 2 clusterings kept") for ln in err)  # the summaries as before
    assert not any("loss nan" in ln for ln in beats)  # the row before training has no loss to show
    # the references train as long as the run: their progress shows too
    assert any(": reference (vanilla) epoch 1/1 loss " in ln for ln in beats)
    assert any(": reference (control) step " in ln for ln in beats)
    # 0: the summaries only; --quiet: nothing
    assert main(["train", str(data_file), "--out", str(tmp_path / "b.pt"), *fast, "--heartbeat", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert not any(" so far)" in ln for ln in err) and any(ln.startswith("round 0:") for ln in err)
    assert main(["train", str(data_file), "--out", str(tmp_path / "c.pt"), *FAST, "--heartbeat", "1e-9"]) == 0
    assert capsys.readouterr().err == ""


def test_nan_dataset(tmp_path, capsys):
    x = np.ones((50, 3), np.float32) * np.arange(50)[:, None]
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    line = _err(capsys, "train", tmp_path / "nan.npy", "--out", tmp_path / "r.pt", *FAST)
    assert "holds 1 row(s) with NaN or inf (rows 7); clean them or pass --drop-nonfinite" in line


def test_unwritable_out(data_file, tmp_path, capsys):
    line = _err(capsys, "train", data_file, "--out", tmp_path / "no" / "such" / "dir" / "r.pt", *FAST)
    assert "the folder" in line and "does not exist; create it first" in line
    line = _err(capsys, "train", data_file, "--out", tmp_path, *FAST)
    assert "is a directory; give a file name" in line
    if os.geteuid() != 0:  # root can write anywhere; the folder check above covers the message path
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert "is not writable" in _err(capsys, "train", data_file, "--out", ro / "r.pt", *FAST)


def test_resume_on_another_config_names_the_keys(data_file, tmp_path, capsys):
    out = tmp_path / "run.pt"
    assert main(["train", str(data_file), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    line = _err(capsys, "train", data_file, "--out", out, "--resume", *FAST, "--lr", "0.01", "--multiple", "3")
    assert "was written with another config (keys differ: multiple, s2, train.lr, train.multiple" in line
    assert out.read_bytes() == before  # nothing lost


def test_em_cache_is_shared_between_runs_and_changes_no_result(data_file, tmp_path, capsys):
    from hcdiag.runfile import load_run

    cache = tmp_path / "em"
    runs = []
    for i, extra in enumerate(([], ["--em-cache", cache], ["--em-cache", cache, "--method", "vanilla"])):
        out = tmp_path / f"r{i}.pt"
        assert main(["train", str(data_file), "--out", str(out), *FAST, *map(str, extra)]) == 0
        runs.append(load_run(out))
    capsys.readouterr()
    assert len(list(cache.glob("em-*.npz"))) == 1
    for run in runs[1:]:
        for key in ("centroids", "weights", "loglik"):
            assert np.array_equal(run.data["clusterings"][key].numpy(), runs[0].data["clusterings"][key].numpy())
    # the same HCT run with and without the cache: the same trained weights
    a, b = runs[0].snapshot("final"), runs[1].snapshot("final")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_em_type_trains_from_the_command_line_and_its_run_passes_the_checks(tmp_path, capsys):
    """`hcdiag train synthetic --method em-type ...`: a valid run file that check-barrier reads (exit 0 or 1)."""
    out = tmp_path / "em.pt"
    assert main(["train", "synthetic", "--n-samples", "600", "--method", "em-type", "--out", str(out), *FAST,
                 "--em-max-e-steps", "4", "--em-check-every", "2", "--em-tol", "0.01"]) == 0
    from hcdiag.runfile import load_run

    run = load_run(out)
    assert run.config.method == "em-type" and run.config.train["em_tol"] == 0.01 and run.complete
    capsys.readouterr()
    assert main(["check-barrier", str(out), "--format", "json"]) in (0, 1)
    doc = json.loads(capsys.readouterr().out)
    assert {c["id"] for c in doc["checks"] if c["verdict"] != "inconclusive"} >= {"KL", "AU", "T3", "T4"}
    assert _err(capsys, "train", "synthetic", "--method", "em-type", "--out", tmp_path / "x.pt", "--em-tol", "-1") \
        .endswith("The 'em_tol' parameter must be a float >= 0. Got -1.0.")


def test_teacher_trains_from_the_command_line_and_its_run_passes_the_checks(tmp_path, capsys):
    """`hcdiag train synthetic --method teacher --teacher-alpha ... --witness-beta ...`: a valid run file."""
    out = tmp_path / "teacher.pt"
    assert main(["train", "synthetic", "--n-samples", "600", "--method", "teacher", "--out", str(out), *FAST,
                 "--teacher-alpha", "2", "--witness-beta", "1.5"]) == 0
    from hcdiag.runfile import load_run

    run = load_run(out)
    assert run.config.method == "teacher" and run.data["teacher"]["alpha"] == 2.0 and run.complete
    capsys.readouterr()
    assert main(["check-barrier", str(out), "--format", "json"]) in (0, 1)
    assert main(["train", "synthetic", "--method", "teacher", "--out", str(tmp_path / "x.pt"), "--witness-beta", "0"]) == 2
    assert "The 'witness_beta' parameter must be a float > 0. Got 0.0." in capsys.readouterr().err
