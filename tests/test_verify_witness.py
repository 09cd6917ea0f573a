"""The companion notes' grid in verify (issue 13): prevention, collapse and rescue jobs, the rescue started from
the collapse run's file, their claims decided by hcdiag.claims, and the methods side by side."""

from __future__ import annotations

import json

import pytest

from hcdiag import claims
from hcdiag import verify as V
from hcdiag.checks.barrier import run_checks
from hcdiag.runfile import load_run


def test_the_grid_has_the_three_phases_at_each_multiple_and_the_rescue_starts_from_the_collapse():
    jobs = [j for j in V.build_grid("smoke", ["synthetic"], 2) if j.group == "witness"]
    assert len(jobs) == 2 * len(V.WITNESS["smoke"]["multiples"]) * 4
    for seed in (0, 1):
        for m in V.WITNESS["smoke"]["multiples"]:
            ph = {j.tag: j for j in jobs if j.seed == seed and j.multiple == m}
            assert set(ph) == set(V.WITNESS_PHASES) | {"view"} and all(j.method == "teacher" for j in ph.values())
            alpha = {t: dict(j.overrides)["teacher_alpha"] for t, j in ph.items()}
            a = V.WITNESS["smoke"]["alpha"]
            assert alpha == {"prevent": a, "collapse": 0.0, "rescue": a, "view": a}
            assert dict(ph["view"].overrides)["teacher_view"] == "noise:1" and "teacher_view" not in dict(ph["prevent"].overrides)
            assert ph["rescue"].after == ph["collapse"].name and not ph["prevent"].after and not ph["collapse"].after
    assert [j.group for j in V.build_grid("smoke", ["synthetic"], 1, groups=["witness"])] == ["witness"] * 8
    assert {dict(j.overrides).get("teacher_view") for j in V.build_grid("smoke", ["digits"], 1, groups=["witness"])} == \
        {None, "shift:1"}
    assert "witness (teacher rescue)" in V.plan("smoke", ["synthetic"], 1, groups=["witness"])["text"]
    # the paper-like preset: the same phases with the paper's model and epochs, snapshots every 5 epochs
    paper = V.build_grid("paper", ["fashion-mnist"], 1, groups=["witness"])
    assert len(paper) == 8 and {dict(j.overrides)["baseline_snapshots"] for j in paper} == {20}
    assert {dict(j.overrides).get("teacher_view") for j in paper} == {None, "shift:1"}
    from hcdiag.train import make_config

    cfg = make_config("paper", method="teacher", **dict(paper[0].overrides))
    assert (cfg.epochs, cfg.latent_dim, cfg.k) == (100, 48, 8) and cfg.latent_dim >= cfg.k - 1


def test_a_job_that_starts_from_a_failed_run_fails_with_the_reason_and_the_others_go_on(monkeypatch, tmp_path):
    jobs = V.build_grid("smoke", ["synthetic"], 1, groups=["witness"])
    order = []

    def fake(job, out_dir):
        order.append(job.name)
        if job.tag == "collapse" and job.multiple == 2.0:
            raise RuntimeError("boom")
        return {"job": V.asdict(job), "run": job.name, "checks": "", "trained": True, "seconds": 0.0}

    monkeypatch.setattr(V, "run_job", fake)
    recs = V.execute(jobs, str(tmp_path), workers=1)
    by = {V.Job(**r["job"]).name: r for r in recs}
    rescue2 = next(j for j in jobs if j.tag == "rescue" and j.multiple == 2.0)
    assert rescue2.name not in order  # never started
    assert by[rescue2.name]["error"].endswith(f"it starts from {rescue2.after}, which did not finish")
    for j in jobs:  # every other job ran, each rescue after its collapse
        if j is not rescue2:
            assert j.name in order
        if j.after and j is not rescue2:
            assert order.index(j.after) < order.index(j.name)


def test_a_failed_job_fails_its_whole_chain_and_a_cycle_is_reported(monkeypatch, tmp_path):
    base = dict(dataset="synthetic", method="teacher", multiple=2.0, loss="literal", seed=0, preset="smoke",
                group="witness")
    a = V.Job(**base, tag="a")
    b = V.Job(**base, tag="b", after=a.name)
    c = V.Job(**base, tag="c", after=b.name)
    x = V.Job(**base, tag="x", after=V.Job(**base, tag="y").name)
    y = V.Job(**base, tag="y", after=x.name)

    def fake(job, out_dir):
        if job.tag == "a":
            raise RuntimeError("boom")
        return {"job": V.asdict(job), "run": job.name, "checks": "", "trained": True, "seconds": 0.0}

    monkeypatch.setattr(V, "run_job", fake)
    recs = V.execute([a, b, c, x, y], str(tmp_path), workers=1)
    assert all(r is not None and r.get("error") for r in recs)
    assert recs[2]["error"].endswith(f"it starts from {b.name}, which did not finish")
    assert "a cycle of dependencies" in recs[3]["error"] and "a cycle of dependencies" in recs[4]["error"]


def test_witness_rules_hold_fail_and_are_inconclusive():
    ok = claims.witness_prevention([{"w3": ("holds", "every snapshot certified"), "min_gap": 0.9, "kl": 0.7}])
    bad = claims.witness_prevention([{"w3": ("fails", "2 of 8 not certified"), "min_gap": -0.1, "kl": 0.7}])
    assert (ok.verdict, bad.verdict) == ("holds", "fails")
    assert claims.witness_prevention([{"w3": ("inconclusive", "no teacher"), "kl": None}]).verdict == "inconclusive"
    c = claims.witness_collapse([{"gap": -0.002, "kl": 1e-7, "au": 0, "mi": 0.0, "mse": 1.184}])
    assert c.verdict == "holds" and "KL 1e-07 (collapsed), 0 active units, MI 0, MSE 1.18" in c.ours
    c = claims.witness_collapse([{"gap": 0.097, "kl": 2.1, "au": 2}])
    assert c.verdict == "fails"
    c = claims.witness_collapse([{"gap": -0.02, "kl": 2.1, "au": 2}])
    assert c.verdict == "holds" and "not certified though the VAE is not collapsed" in c.ours
    assert claims.witness_collapse([{"gap": None, "kl": None, "au": None}]).verdict == "inconclusive"
    assert claims.witness_collapse([]).verdict == "inconclusive"
    r = claims.witness_rescue([{"start_gap": 0.097, "gap": 1.0, "first_epoch": 1, "every": 1, "kl": 2.4}], margin=0.05)
    assert r.verdict == "inconclusive" and "nothing to rescue" in r.ours  # the collapse run was certified already
    r = claims.witness_rescue([{"start_gap": None, "gap": 1.0, "first_epoch": 1, "every": 1}], margin=0.05)
    assert r.verdict == "inconclusive"
    r = claims.witness_rescue([{"start_gap": -0.002, "gap": 1.0, "first_epoch": 1, "every": 1, "kl": 0.6}], margin=0.05)
    assert r.verdict == "holds" and "first certified at epoch 1" in r.ours and "from G_T = -0.002" in r.ours
    r = claims.witness_rescue([{"start_gap": -0.002, "gap": 0.04, "first_epoch": None, "every": 1, "kl": 0.6}],
                              margin=0.05)
    assert r.verdict == "fails" and "never certified" in r.ours
    assert claims.witness_rescue([{"gap": None}], margin=0.05).verdict == "inconclusive"
    s = claims.witness_side_by_side({"vanilla": {"kl": 1e-7, "certified": False, "by": "T4", "gap": -0.01},
                                     "teacher-prevent": {"kl": 0.7, "certified": True, "by": "W3", "gap": 1.0}})
    assert s.verdict == "reported" and "vanilla: KL 1e-07 (collapsed), not certified by T4" in s.ours
    assert claims.witness_view([("holds", "view identity"), ("fails", "no room")]).verdict == "mixed"


@pytest.fixture(scope="module")
def witness_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("vw")
    doc = V.verify(out, preset="smoke", datasets=["synthetic"], seeds=1, workers=2, groups=["witness"])
    return out, doc


def test_the_witness_grid_runs_end_to_end_and_its_rows_match_the_checks_on_the_run_files(witness_grid):
    out, doc = witness_grid
    rows = {(r["id"], r["values"]["multiple"], "the view" in r["conditions"]): r for r in doc["claims"]
            if r["id"].startswith("witness.")}
    assert len(rows) == len([r for r in doc["claims"] if r["id"].startswith("witness.")])  # one row per key
    for m in V.WITNESS["smoke"]["multiples"]:
        runs = {t: out / "witness" / "synthetic" / f"teacher-{t}_m{m:g}_literal_s0.pt" for t in V.WITNESS_PHASES}
        w3 = {t: run_checks(load_run(p), select=["W3"])[0] for t, p in runs.items()}
        assert rows[("witness.prevent", m, False)]["verdict"] == w3["prevent"].verdict
        final = {t: next(x["G_T"] for x in w3[t].values["rows"] if x["snapshot"] == "final") for t in runs}
        assert rows[("witness.collapse", m, False)]["verdict"] == ("holds" if final["collapse"] <= 0 else "fails")
        assert rows[("witness.rescue", m, False)]["verdict"] == (
            "inconclusive" if final["collapse"] > 0.05 else "holds" if final["rescue"] > 0.05 else "fails")
        assert ("witness.view", m, False) not in rows  # the phases' teacher sees x itself: no view gap to decide
        # the rescue started from the collapse run's final parameters
        rescue, collapse = load_run(runs["rescue"]), load_run(runs["collapse"])
        assert rescue.config.extra["train"]["init_from"] == str(runs["collapse"])
        import torch

        assert all(torch.equal(v, collapse.snapshot("final")[k]) for k, v in rescue.snapshot("init").items())
    # at 2 lambda_max the plain VAE collapses here: the constant-student regime, and alignment prevents and rescues
    assert rows[("witness.collapse", 2.0, False)]["verdict"] == "holds"
    assert rows[("witness.prevent", 2.0, False)]["verdict"] == "holds"
    assert rows[("witness.rescue", 2.0, False)]["verdict"] == "holds"
    # the viewed teacher: W4's gap is computed and bounds every snapshot; its rows carry the view
    viewed = [r for r in doc["claims"] if r["id"] == "witness.view" and "the view noise:1" in r["conditions"]]
    assert len(viewed) == 2 and all(r["verdict"] in ("holds", "fails", "inconclusive") for r in viewed)
    assert all(r["verdict"] == "holds" for r in viewed)  # noise of sd 1 on clusters 3 apart: the gap leaves room
    w4 = run_checks(out / "witness" / "synthetic" / "teacher-view_m2_literal_s0.pt", select=["W4"])[0]
    assert w4.values["view"] == "noise:1" and w4.values["view_samples"] == 64
    assert all(r["L_TS"] >= r["G_V"] - 1e-9 for r in w4.values["rows"])
    report = (out / "report.md").read_text()
    assert "witness_synthetic_m2.png" in report and (out / "witness_synthetic_m2.png").exists()
    assert json.loads((out / "results.json").read_text())["claims"] == json.loads(json.dumps(doc["claims"], default=str))
