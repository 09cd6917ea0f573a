"""Section 7 in verify (issue 14): the diffusion group's jobs, its claims decided by hcdiag.claims from the checks
D1-D4 (each rule where it holds, fails and is inconclusive), and a tiny grid end to end."""

from __future__ import annotations

import json
import math

import pytest

from hcdiag import claims
from hcdiag import verify as V


def test_the_grid_rescales_algorithm_2_and_trains_the_controls_at_one_lambda_max():
    jobs = [j for j in V.build_grid("smoke", ["synthetic"], 1) if j.group == "diffusion"]
    d = V.DIFFUSION["smoke"]
    assert sorted({j.multiple for j in jobs if j.method == "consensus"}) == d["lambdas"]
    assert sorted(j.method for j in jobs if j.multiple == d["controls_at"]) == ["consensus", "logsnr", "single"]
    assert len(jobs) == len(d["lambdas"]) + 2 and len({j.name for j in jobs}) == len(jobs)
    assert jobs[0].name.startswith("diffusion/synthetic/consensus_lam")
    assert [j.group for j in V.build_grid("smoke", ["digits"], 1, groups=["diffusion"])] == ["diffusion"] * len(jobs)
    assert "diffusion (consensus)" in V.plan("smoke", ["synthetic"], 1, groups=["diffusion"])["text"]


def _pt(lam, t_snr_factor=1.0, follows=("snr",), t=100.0, eq13=None):
    return {"lambda_max": lam, "log_snr_measured": -math.log(lam) + math.log(t_snr_factor), "t_measured": t,
            "t_snr": t, "t_eq13": eq13, "follows": list(follows)}


def test_rescaling_rule():
    held = claims.diffusion_rescaling([_pt(0.1), _pt(1.0), _pt(10.0)])
    assert held.verdict == "holds" and held.values["slope"] == pytest.approx(-1.0)
    flat = claims.diffusion_rescaling([{**_pt(lam), "log_snr_measured": 0.3} for lam in (0.1, 1.0, 10.0)])
    assert flat.verdict == "fails" and flat.values["slope"] == pytest.approx(0.0, abs=1e-12)
    few = claims.diffusion_rescaling([_pt(0.1), {**_pt(10.0), "log_snr_measured": None}])
    assert few.verdict == "inconclusive" and "1 crossing(s)" in few.ours
    narrow = claims.diffusion_rescaling([_pt(1.0), _pt(2.0)])
    assert narrow.verdict == "inconclusive" and "spanning a factor 10" in narrow.ours


def test_eq13_and_critical_rules():
    assert claims.diffusion_eq13([_pt(0.1, follows=("snr", "eq13"), eq13=90.0)]).verdict == "holds"
    r = claims.diffusion_eq13([_pt(0.1, follows=("snr", "eq13"), eq13=90.0), _pt(10.0)])
    assert r.verdict == "mixed" and "no solution" in r.ours
    assert claims.diffusion_eq13([_pt(10.0)]).verdict == "fails"
    assert claims.diffusion_eq13([]).verdict == "inconclusive"
    assert claims.diffusion_critical({0.1: ("holds", 50.0), 1.0: ("holds", 120.0)}).verdict == "holds"
    assert claims.diffusion_critical({0.1: ("holds", 50.0), 1.0: ("fails", None)}).verdict == "mixed"
    assert claims.diffusion_critical({1.0: ("inconclusive", None)}).verdict == "inconclusive"


def test_barrier_and_flexibility_rows_carry_the_checks_verdicts_and_the_cautions():
    b = claims.diffusion_barrier("fails", "a control is closer", {"schedule_dependence": 0.01,
                                                                 "selection": {"all_kept_noisiest": True}})
    assert b.verdict == "fails" and "Bayes denoiser's is 0" in b.ours and "noisiest" in b.ours
    f = claims.diffusion_flexibility("holds", "no degradation", ("fails", "degraded"))
    assert f.verdict == "holds" and "the logSNR control: fails" in f.ours


@pytest.fixture
def tiny_diffusion(monkeypatch):
    g = dict(methods=[], multiples=[2.0], losses=["scaled"], phase_multiples=[2.0], phase_epochs=1,
             n_samples={"synthetic": 600}, ablations=False, overrides={}, diffusion=True)
    monkeypatch.setitem(V.GRIDS, "smoke", g)
    monkeypatch.setitem(V.DIFFUSION, "smoke", dict(lambdas=[0.1, 10.0], controls_at=10.0, n_samples={"synthetic": 600},
                                                   train=dict(kind="linear", R=4, epochs_per_round=150, T=100,
                                                              widths=(64, 64), batch_size=64)))


def test_a_tiny_diffusion_grid_end_to_end(tiny_diffusion, tmp_path, one_thread, capsys):
    doc = V.verify(tmp_path, preset="smoke", datasets=["synthetic"], groups=["diffusion"], workers=1,
                   heartbeat=1e-9)
    beats = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("  diffusion/synthetic/")]
    assert any(": diffusion consensus: |S| = " in ln for ln in beats)  # the trainer's progress, run by run
    assert any("single_lam10_s0.pt: diffusion single: step " in ln for ln in beats)
    rows = {r["id"]: r for r in doc["claims"] if r["id"].startswith("diffusion.")}
    assert set(rows) == {"diffusion.critical", "diffusion.rescaling", "diffusion.eq13", "diffusion.barrier",
                         "diffusion.flexibility"}
    assert rows["diffusion.barrier"]["conditions"] == "synthetic, diffusion at lambda_max 10, seed 0"
    # D3 was decided from the three runs at controls_at, its numbers from the run files
    assert set(rows["diffusion.barrier"]["values"]["versus"]) == {"single", "logsnr"}
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == 4 and (tmp_path / "diffusion_synthetic.png").exists()
    for r in res["runs"]:
        assert json.loads(open(r["checks"]).read())["checks"][0]["id"] == "D1"
    again = V.verify(tmp_path, preset="smoke", datasets=["synthetic"], groups=["diffusion"], workers=1)
    assert [r["verdict"] for r in again["claims"]] == [r["verdict"] for r in doc["claims"]]  # finished runs kept
    # checks written by an older version of the checks are decided again; the runs are not retrained
    one = next(r["checks"] for r in res["runs"])
    stamp = json.loads(open(one).read())
    assert stamp["checks_version"] == V.DIFFUSION_CHECKS_VERSION
    stamp["checks_version"] = 0
    stamp["checks"] = []
    open(one, "w").write(json.dumps(stamp))
    job = V.Job(**next(r["job"] for r in res["runs"] if r["checks"] == one))
    rec = V.run_job(job, str(tmp_path))
    assert not rec["trained"] and rec["measured"] and json.loads(open(one).read())["checks"][0]["id"] == "D1"
    assert not V.run_job(job, str(tmp_path))["measured"]  # this version, this code: reused
    # the right version from other code: measured again
    stamp = json.loads(open(one).read())
    open(one, "w").write(json.dumps({**stamp, "checks_code": "another-hcdiag"}))
    assert V.run_job(job, str(tmp_path))["measured"]
    assert json.loads(open(one).read())["checks_code"] == V.code_fingerprint()
