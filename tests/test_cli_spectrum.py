"""``hcdiag spectrum`` through hcdiag.cli.main: values against numpy, one-line errors with status 2."""

import importlib.util
import json

import numpy as np
import pytest

from hcdiag.cli import main


def reference(x):
    return np.linalg.eigvalsh(np.cov(np.asarray(x, dtype=np.float64), rowvar=False, bias=True))[::-1]


def structured(seed, n=1200, d=40):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, d)) * np.array([[4.0], [2.0], [1.0], [0.5]])
    return (rng.standard_normal((n, 4)) @ w + 0.5 * rng.standard_normal((n, d)) + 2.0).astype(np.float32)


def run_json(capsys, argv):
    capsys.readouterr()  # drop what fixtures printed (the seed)
    rc = main(argv + ["--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return json.loads(out)


@pytest.mark.parametrize("method", ["auto", "exact", "lanczos", "streaming"])
def test_json_values_match_numpy(tmp_path, capsys, seed, method):
    x = structured(seed)
    path = tmp_path / "x.npy"
    np.save(path, x)
    ref = reference(x)
    out = run_json(capsys, ["spectrum", str(path), "--top", "5", "--method", method, "--multiples", "0.5,2"])
    assert out["method"] == ("streaming" if method == "auto" else method)  # a .npy is memory-mapped
    assert out["lambda_max"] == pytest.approx(ref[0], rel=1e-10)
    np.testing.assert_allclose(out["eigenvalues"], ref[:5], rtol=0, atol=1e-10 * ref[0])
    assert out["trace"] == pytest.approx(np.var(x.astype(np.float64), axis=0).sum(), rel=1e-10)
    assert (out["n"], out["d"]) == x.shape
    assert out["dataset"]["name"] == "x.npy" and out["dataset"]["n"] == x.shape[0]
    assert out["ci"] is None
    assert [r["multiple"] for r in out["multiples"]] == [0.5, 2.0]
    assert [r["s2"] for r in out["multiples"]] == pytest.approx([0.5 * ref[0], 2 * ref[0]], rel=1e-10)
    assert all(r["inside_ci"] is None for r in out["multiples"])


def test_bootstrap_ci_and_inside_flags(tmp_path, capsys, seed):
    x = structured(seed, n=800, d=10)
    path = tmp_path / "x.npy"
    np.save(path, x)
    out = run_json(capsys, ["spectrum", str(path), "--bootstrap", "40", "--seed", str(seed % 1000),
                            "--multiples", "0.5,1,2,5,10"])
    lo, hi = out["ci"]
    assert lo < out["lambda_max"] < hi and out["bootstrap"] == 40 and out["ci_level"] == 0.95
    for r in out["multiples"]:
        assert r["inside_ci"] == (lo <= r["s2"] <= hi)
    assert [r["inside_ci"] for r in out["multiples"] if r["multiple"] == 1.0] == [True]


def test_text_output(tmp_path, capsys, seed):
    x = structured(seed, n=300, d=6)
    path = tmp_path / "x.npy"
    np.save(path, x)
    capsys.readouterr()
    assert main(["spectrum", str(path), "--top", "3", "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    ref = reference(x)
    assert "covariance spectrum of x.npy (300 rows x 6 features, 1/n normalisation)" in out
    assert f"lambda_max = {ref[0]:.6g}" in out
    assert "95% CI [" in out and "from 20 bootstrap resamples" in out
    assert "rank  eigenvalue  fraction of trace" in out
    assert "decoder variances s2 = m * lambda_max" in out


def one_error_line(capsys, argv):
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # refused by the argument parser, before any work
        rc = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, captured.err
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((10, 3))
    x[3, 1], x[7, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", x)
    line = one_error_line(capsys, ["spectrum", str(tmp_path / "nan.npy")])
    assert "holds 2 row(s) with NaN or inf (rows 3, 7)" in line and "--drop-nonfinite" in line
    np.save(tmp_path / "flat.npy", np.arange(5.0))
    assert "must be a 2-D array of shape (n, N); got 1-D" in one_error_line(capsys, ["spectrum", str(tmp_path / "flat.npy")])
    (tmp_path / "bad.csv").write_text("1,2,3\n4,abc,6\n")
    assert "is not numeric" in one_error_line(capsys, ["spectrum", str(tmp_path / "bad.csv")])
    np.save(tmp_path / "one.npy", np.ones((1, 3)))
    assert "has 1 row(s); at least 2 are needed" in one_error_line(capsys, ["spectrum", str(tmp_path / "one.npy")])
    np.save(tmp_path / "ok.npy", np.eye(3))
    assert "The 'multiples' option must hold finite numbers > 0. Got -2." in one_error_line(
        capsys, ["spectrum", str(tmp_path / "ok.npy"), "--multiples", "1,-2"])
    assert "argument --bootstrap: must be an integer in [2, 100000] or 0 (no CI). Got 1." in one_error_line(
        capsys, ["spectrum", str(tmp_path / "ok.npy"), "--bootstrap", "1"])


def test_constant_data_prints_spectrum_and_says_so(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.full((20, 4), 7.0, dtype=np.float32))
    rc = main(["spectrum", str(tmp_path / "c.npy"), "--format", "json"])
    captured = capsys.readouterr()
    assert rc == 2
    out = json.loads(captured.out)
    assert out["lambda_max"] == 0.0 and out["constant"] is True and out["multiples"] == []
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "lambda_max is 0 (constant data), so multiples of it are undefined" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("hcdiag.data") is None, reason="hcdiag.data not built yet")
def test_synthetic_dataset(capsys):
    from hcdiag.data import load

    ds = load("synthetic", n_samples=1500, seed=3)
    ref = reference(ds.x)
    out = run_json(capsys, ["spectrum", "synthetic", "--n-samples", "1500", "--data-seed", "3", "--top", "4"])
    assert out["lambda_max"] == pytest.approx(ref[0], rel=1e-10)
    np.testing.assert_allclose(out["eigenvalues"], ref[:4], rtol=0, atol=1e-10 * ref[0])
    assert out["dataset"]["name"] == "synthetic"
