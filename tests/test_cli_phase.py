"""``hcdiag phase`` and ``hcdiag diffusion`` against hcdiag.theory on numpy's spectrum of a .npy file."""

import json
import re

import numpy as np
import pytest

from hcdiag.cli import main
from hcdiag.theory import alphabar, critical_timestep, linear_vae_optimum

MULTIPLES = [0.25, 0.5, 1, 2, 5, 10]


@pytest.fixture
def npy(tmp_path, seed):
    """A .npy data file (400, 12) float64 with spread-out variances; returns (path, eigenvalues desc)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 12)) * np.geomspace(0.05, 0.8, 12) @ np.linalg.qr(rng.normal(size=(12, 12)))[0]
    path = tmp_path / "data.npy"
    np.save(path, x)
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]
    return path, lam


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_phase_json_matches_theory(npy, capsys):
    path, lam = npy
    out = _json(capsys, ["phase", str(path), "--multiples", "0.25,0.5,1,2,5,10", "--latent-dim", "8",
                         "--format", "json", "--device", "cpu"])
    assert out["dataset"] == "data.npy" and out["latent_dim"] == 8
    assert out["lambda_max"] == pytest.approx(lam[0], rel=1e-10)
    assert [r["multiple"] for r in out["rows"]] == MULTIPLES
    assert np.allclose(out["eigenvalues"], lam[:8], rtol=1e-10)
    for row in out["rows"]:
        opt = linear_vae_optimum(lam, row["multiple"] * lam[0], 8)  # full numpy spectrum as the oracle
        assert row["s2"] == pytest.approx(row["multiple"] * lam[0], rel=1e-10)
        # Counted on the command's own eigenvalues: at m = 1, s2 = lambda_1 exactly, and numpy's
        # lambda_1 may differ from it in the last bit.
        assert row["active"] == int((np.asarray(out["eigenvalues"]) > row["s2"]).sum())
        assert row["kl"] == pytest.approx(opt.kl, rel=1e-8, abs=1e-12)
        assert row["neg_elbo"] == pytest.approx(opt.neg_elbo, rel=1e-8, abs=1e-8)
        assert row["au_burda"] == opt.au_burda
    assert all(r["kl"] == 0 for r in out["rows"] if r["multiple"] >= 1)


def test_phase_latent_dim_above_data_dim(npy, capsys):
    path, lam = npy
    out = _json(capsys, ["phase", str(path), "--multiples", "0.1", "--latent-dim", "20", "--format", "json",
                         "--device", "cpu"])
    opt = linear_vae_optimum(lam, 0.1 * lam[0], 20)
    assert out["rows"][0]["kl"] == pytest.approx(opt.kl, rel=1e-8)
    assert len(out["rows"][0]["kl_per_dim"]) == 20


def test_phase_text_is_a_table(npy, capsys):
    path, lam = npy
    assert main(["phase", str(path), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("m "))
    assert "KL (nats)" in lines[head] and set(lines[head + 1].replace(" ", "")) == {"-"}
    body = lines[head + 2:]
    assert [float(ln.split()[0]) for ln in body] == MULTIPLES
    assert f"lambda_max = {lam[0]:.6g}" in "\n".join(lines)


@pytest.mark.parametrize("bad, match", [
    ("0,-1", r"'multiples' parameter must hold floats > 0 .*Got 0\.0\."),
    ("1,-1", r"'multiples' parameter must hold floats > 0 .*Got -1\.0\."),
    ("a,b", r"'multiples' option must be a comma-separated list of numbers\. Got 'a,b'\."),
    (",", r"'multiples' option must list at least one number"),
])
def test_phase_bad_multiples_exit_2_one_line(npy, capsys, bad, match):
    path, _ = npy
    assert main(["phase", str(path), "--multiples", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hcdiag phase: error: ")
    assert re.search(match, err[0])


def test_phase_bad_latent_dim_and_constant_data(tmp_path, npy, capsys):
    path, _ = npy
    with pytest.raises(SystemExit) as exc:  # refused by the argument parser, before the data is read
        main(["phase", str(path), "--latent-dim", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err == ["hcdiag phase: error: argument --latent-dim: must be an integer in [1, 1048576]. Got 0."]
    const = tmp_path / "const.npy"
    np.save(const, np.ones((10, 3)))
    assert main(["phase", str(const), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lambda_max = 0 (constant rows)" in err[0]


def test_diffusion_json_matches_theory(npy, capsys):
    path, lam = npy
    out = _json(capsys, ["diffusion", str(path), "--format", "json", "--device", "cpu"])
    assert out["lambda_max"] == pytest.approx(lam[0], rel=1e-10) and out["T"] == 1000
    assert [s["schedule"] for s in out["schedules"]] == ["linear", "cosine"]
    for s in out["schedules"]:
        ref = critical_timestep(lam[0], s["schedule"], 1000)
        g = 1 - alphabar(s["schedule"], 1000)
        assert s["t_c"] == ref.t_c and s["t_snr"] == ref.t_snr
        assert g[s["t_c"] - 1] >= lam[0] > g[s["t_c"] - 2]  # lambda_max < 1 here: t_c exists (eq. 13)


def test_diffusion_reports_missing_t_c_with_reason(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    path = tmp_path / "big.npy"
    np.save(path, rng.normal(size=(300, 5)) * 3.0)                # lambda_max ~ 9 >= 1
    out = _json(capsys, ["diffusion", str(path), "--schedule", "cosine", "--T", "500", "--format", "json",
                         "--device", "cpu"])
    (s,) = out["schedules"]
    assert s["t_c"] is None and ">= 1 but the noise variance" in s["t_c_reason"]
    a = alphabar("cosine", 500)
    assert a[s["t_snr"] - 1] * out["lambda_max"] <= 1 - a[s["t_snr"] - 1]
    assert main(["diffusion", str(path), "--schedule", "cosine", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "cosine: no t_c: lambda_max = " in text
    # the VAE's spectral criterion printed beside the diffusion timesteps, for the same data
    assert f"collapse for s2 > lambda_max = {out['lambda_max']:.6g}" in text and out["vae_s2_threshold"] == out["lambda_max"]


def test_diffusion_bad_arguments_exit_2(npy, capsys):
    path, _ = npy
    with pytest.raises(SystemExit) as exc:  # refused by the argument parser, before the data is read
        main(["diffusion", str(path), "--T", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err == ["hcdiag diffusion: error: argument --T: must be an integer in [2, 10000000]. Got 1."]
    with pytest.raises(SystemExit) as exc:
        main(["diffusion", str(path), "--schedule", "quadratic"])
    assert exc.value.code == 2
    assert "invalid choice: 'quadratic'" in capsys.readouterr().err
