"""hcdiag verify: the grid, the executors (local pool and submitit's local executor), the claims table."""

import json

import pytest

from hcdiag import verify as V
from hcdiag.cli import main
from hcdiag.errors import InputError

TINY = dict(enc_widths=(8,), dec_widths=(8,), latent_dim=2, batch_size=128, epochs=1, r0=4, k=3,
            epochs_per_round=1, steps_per_clustering=2, refine_cap=2, stage3_epochs=1, eval_rows=200,
            em_backend="sklearn")


@pytest.fixture
def tiny_grid(monkeypatch):
    g = dict(methods=[("hct", ""), ("vanilla", "")], multiples=[2.0], losses=["scaled"], phase_multiples=[0.5, 2.0],
             phase_epochs=1, n_samples={"synthetic": 1500}, ablations=False, overrides=dict(TINY))
    monkeypatch.setitem(V.GRIDS, "smoke", g)
    return g


def test_smoke_grid_covers_methods_conventions_and_phase():
    jobs = V.build_grid("smoke", ["synthetic"], 2)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    hct = [j for j in jobs if j.method == "hct"]
    assert sorted({j.loss for j in hct}) == ["literal", "mean", "scaled"] and {j.seed for j in hct} == {0, 1}
    assert sorted({j.multiple for j in jobs if j.group == "phase"}) == V.GRIDS["smoke"]["phase_multiples"]
    paper = V.build_grid("paper", ["synthetic"], 1)
    abl = [j for j in paper if j.group == "ablation"]
    assert {j.tag for j in abl} >= {"r016", "eps1e-05", "beta_end3", "keep_ratio0.5"}
    with pytest.raises(InputError, match="The 'preset' parameter must be one of smoke, paper. Got 'huge'"):
        V.build_grid("huge", ["synthetic"], 1)


def test_submitit_local_executor_runs_the_jobs_and_skips_finished_ones(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    jobs = [j for j in V.build_grid("smoke", ["synthetic"], 1) if j.group == "phase"]
    recs = V.execute(jobs, str(tmp_path), executor="submitit", slurm={"cluster": "local", "timeout_min": 5})
    assert [r["trained"] for r in recs] == [True, True]
    from hcdiag.runfile import load_run

    for r in recs:
        assert load_run(r["run"]).complete
        assert json.loads(open(r["checks"]).read())["schema"] == "hcdiag.check-barrier/1"
    again = V.execute(jobs, str(tmp_path), executor="local", workers=1)
    assert [r["trained"] for r in again] == [False, False]  # an interrupted verify resumes: nothing retrained


def test_verify_report_numbers_come_from_the_run_files(tiny_grid, tmp_path):
    from hcdiag.metrics import kl_total
    from hcdiag.models import build_model, encode_decode
    from hcdiag.runfile import load_run

    doc = V.verify(tmp_path, preset="smoke", datasets=["synthetic"], seeds=1, workers=1)
    for f in ("report.md", "report.html", "results.json", "phase_synthetic.png"):
        assert (tmp_path / f).exists(), f
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["schema"] == "hcdiag.verify/1" and len(res["inconsistencies"]) >= 10
    van = next(r for r in doc["claims"] if r["claim"].startswith("Vanilla VAE collapses"))
    run = load_run(tmp_path / "main/synthetic/vanilla_m2_scaled_s0.pt")
    m = build_model(run.config["model"])
    m.load_state_dict(run.snapshot("final"))
    mu, lv, _ = encode_decode(m, run.eval_x)
    kl = kl_total(mu, lv)
    assert van["ours"].startswith(f"KL {kl:.3g}")
    assert van["verdict"] == ("holds" if kl < 0.01 else "fails")
    checks = {r.get("check") for r in doc["claims"]}
    assert {"N1", "N2", "N3", "T1", "T2", "T2b", "T3", "T4", "I1", "I2", "I3"} <= checks
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html


@pytest.mark.parametrize("argv,msg", [
    (["--datasets", "imagenet"], "--datasets: unknown dataset(s) imagenet; choose among synthetic"),
    (["--seeds", "0"], "--seeds must be an integer >= 1. Got 0."),
    (["--losses", "sum"], "--losses: unknown convention(s) sum; choose among literal, scaled, mean."),
])
def test_verify_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, msg):
    code = main(["verify", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0]


def test_verify_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["verify", "--out", str(f)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_strict_exits_1_when_a_claim_fails(tiny_grid, tmp_path, capsys):
    assert main(["verify", "--out", str(tmp_path), "--workers", "1", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    failing = any(r["verdict"] in ("fails", "mixed") for r in doc["claims"])
    assert main(["verify", "--out", str(tmp_path), "--workers", "1", "--strict"]) == (1 if failing else 0)
    assert failing  # a tiny run at 2 lambda_max cannot keep KL > 2.5: some claim fails
