"""``hcdiag clusterings``: the printed audit agrees with the library, and bad input is one line, exit 2."""

import json

import numpy as np
import pytest

from hcdiag.cli import main
from hcdiag.clusterings import audit, fit_clusterings

NAME = "clusterings"


def two_blobs(rng, n=300, dim=3):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[: n // 2] += 6.0
    return x


def run_cli(capsys, argv):
    capsys.readouterr()  # drop what fixtures printed (the seed)
    try:
        code = main(argv)
    except SystemExit as exc:  # refused by the argument parser, before any work
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_matches_library(tmp_path, capsys, seed):
    x = two_blobs(np.random.default_rng(seed))
    path = tmp_path / "x.npy"
    np.save(path, x)
    code, out, _ = run_cli(capsys, [NAME, str(path), "--r0", "4", "--k", "3", "--backend", "torch", "--device", "cpu",
                                    "--init", "random", "--seed", "5", "--format", "json", "--quiet"])
    assert code == 0
    got = json.loads(out)
    cs = fit_clusterings(x, 4, 3, backend="torch", device="cpu", init="random", seed=5)
    au = audit(cs, x)
    assert got["seeds"] == [5, 6, 7, 8]
    np.testing.assert_allclose(got["loglik"], cs.loglik, rtol=1e-12)
    np.testing.assert_allclose(got["audit"]["ari"], au.ari, atol=1e-12)
    np.testing.assert_allclose(got["audit"]["centroid_dist"], au.centroid_dist, rtol=1e-9, atol=1e-9)
    assert got["audit"]["duplicate_groups"] == au.duplicate_groups
    assert got["data"] == {"name": got["data"]["name"], "n": 300, "dim": 3}
    assert got["clusterings"]["covariance_type"] == "diag" and got["clusterings"]["r0"] == 4


def test_text_output_lists_runs_groups_and_identical_warning(tmp_path, capsys, seed):
    x = two_blobs(np.random.default_rng(seed))
    path = tmp_path / "x.npy"
    np.save(path, x)
    code, out, err = run_cli(capsys, [NAME, str(path), "--r0", "2", "--k", "2", "--covariance", "full",
                                      "--backend", "torch", "--device", "cpu"])
    assert code == 0
    cs = fit_clusterings(x, 2, 2, covariance="full", backend="torch", device="cpu")
    assert f"{cs.loglik[0]:.4g}" in out and "adjusted Rand index" in out
    # two well-separated blobs with K=2: both runs find them, so the audit must flag it
    assert "duplicate groups (all matched centroids within tol=" in out and "[0, 1]" in out
    assert "warning: All 2 clusterings are (nearly) identical" in out and "reduces to standard training" in out
    assert "EM iteration 1" in err


def _one_line_error(capsys, argv, match):
    code, out, err = run_cli(capsys, argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("hcdiag clusterings: error: ")
    assert match in lines[0], lines[0]


def test_r0_24_names_16_and_32(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, two_blobs(np.random.default_rng(0)))
    _one_line_error(capsys, [NAME, str(path), "--r0", "24", "--k", "2"],
                    "24 is not a power of two; use 16 or 32, or pass --uneven-halving")


def test_r0_below_two(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, two_blobs(np.random.default_rng(0)))
    _one_line_error(capsys, [NAME, str(path), "--r0", "1", "--k", "2"], "argument --r0: must be an integer >= 2. Got 1.")


def test_k_larger_than_rows_names_both(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, two_blobs(np.random.default_rng(0))[:5])
    _one_line_error(capsys, [NAME, str(path), "--r0", "2", "--k", "8"], "K=8 components but the data has only 5 rows")


def test_nan_data(tmp_path, capsys):
    x = two_blobs(np.random.default_rng(0))
    x[7, 2] = np.nan
    path = tmp_path / "x.npy"
    np.save(path, x)
    _one_line_error(capsys, [NAME, str(path), "--r0", "2", "--k", "2"], "1 row(s) with NaN or inf (rows 7)")


def test_uneven_halving_accepts_3(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, two_blobs(np.random.default_rng(0), n=100))
    code, out, _ = run_cli(capsys, [NAME, str(path), "--r0", "3", "--k", "2", "--uneven-halving", "--quiet",
                                    "--backend", "torch", "--device", "cpu", "--format", "json"])
    assert code == 0 and json.loads(out)["seeds"] == [0, 1, 2]



@pytest.mark.parametrize("argv", [["--covariance", "tied"], ["--backend", "jax"]])
def test_bad_choices_exit_2(tmp_path, capsys, argv):
    path = tmp_path / "x.npy"
    np.save(path, two_blobs(np.random.default_rng(0)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([NAME, str(path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0]
