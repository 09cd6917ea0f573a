"""hcdiag verify: the grid, the executors (local pool and submitit's local executor), the claims table."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hcdiag import claims
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
    # like for like (issue 9): every baseline runs under every convention HCT runs under
    main = [j for j in jobs if j.group == "main"]
    for lab in {j.label for j in main} - {"hct-warmup"}:
        assert sorted({j.loss for j in main if j.label == lab}) == ["literal", "mean", "scaled"], lab
    # the beta warm-up from 0 (claims.md), in both presets' grids, under the first convention
    for preset in ("smoke", "paper"):
        warm = [j for j in V.build_grid(preset, ["synthetic"], 1) if j.label == "hct-warmup"]
        assert warm and {j.loss for j in warm} == {"literal"}
        assert all(dict(j.overrides)["beta_schedule"] == "warmup" for j in warm)
    assert sorted({j.multiple for j in jobs if j.group == "phase"}) == V.GRIDS["smoke"]["phase_multiples"]
    paper = V.build_grid("paper", ["synthetic"], 1)
    abl = [j for j in paper if j.group == "ablation"]
    assert {j.tag for j in abl} >= {"r016", "eps1e-05", "beta_end3", "keep_ratio0.5"}
    with pytest.raises(InputError, match="The 'preset' parameter must be one of smoke, paper. Got 'huge'"):
        V.build_grid("huge", ["synthetic"], 1)


def test_submitit_local_executor_runs_the_jobs_and_skips_finished_ones(tiny_grid, tmp_path):
    pytest.importorskip("submitit")
    jobs = [j for j in V.build_grid("smoke", ["synthetic"], 1) if j.group == "phase"]
    recs = V.execute(jobs, str(tmp_path), executor="submitit", slurm={"cluster": "local", "timeout_min": 5},
                     heartbeat=1e-9)
    assert [r["trained"] for r in recs] == [True, True]
    # each job's progress lines go to its own log: submitit's stderr file
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*.err"))
    for j in jobs:
        assert f"  {j.name}: baseline epoch 1 loss " in logs
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
    # every job of the seed shares one stage-0 fit (same data, same EM settings)
    assert len(list((tmp_path / "em-cache").glob("em-*.npz"))) == 1
    # regression: the closed form and linear VAE ran at the preset's latent dimension (8), not the grid's (2)
    assert res["phase"]["synthetic"]["latent_dim"] == TINY["latent_dim"]
    van = next(r for r in doc["claims"] if r["claim"].startswith("Vanilla VAE collapses"))
    run = load_run(tmp_path / "main/synthetic/vanilla_m2_scaled_s0.pt")
    m = build_model(run.config.model)
    m.load_state_dict(run.snapshot("final"))
    mu, lv, _ = encode_decode(m, run.eval_x)
    kl = kl_total(mu, lv)
    assert van["ours"].startswith(f"KL {kl:.3g}")
    assert van["verdict"] == ("holds" if kl < 0.01 else "fails")
    checks = {r["values"].get("check") for r in doc["claims"]}
    assert {"N1", "N2", "N3", "T1", "T2", "T2b", "T3", "T4", "I1", "I2", "I3"} <= checks
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html


@pytest.mark.parametrize("argv,msg", [
    (["--datasets", "imagenet"], "--datasets: unknown dataset(s) imagenet; choose among synthetic"),
    (["--seeds", "0"], "--seeds must be an integer >= 1. Got 0."),
    (["--losses", "sum"], "--losses: unknown convention(s) sum; choose among literal, scaled, mean."),
    (["--groups", "main,tables"], "--groups: unknown group(s) tables; choose among main, phase, ablation, witness, diffusion."),
    (["--groups", ","], "--groups: unknown group(s) (none given); choose among main, phase, ablation, witness, diffusion."),
    (["--methods", "hct,gan"], "--methods: unknown method(s) gan in the smoke grid; choose among hct, hct-warmup, "
                               "vanilla."),
    (["--multiples", "3"], "--multiples: the smoke grid's main jobs are at 2 x lambda_max; got 3."),
    (["--multiples", "two"], "--multiples must be a comma list of numbers (multiples of lambda_max). Got 'two'."),
    (["--heartbeat", "-5"], "--heartbeat must be a number of seconds >= 0 (0: no progress lines while a run trains). "
                            "Got -5.0."),
    (["--heartbeat", "nan"], "--heartbeat must be a number of seconds >= 0"),
    (["--plan", "--methods", "gan"], "--methods: unknown method(s) gan in the smoke grid"),
    (["--groups", "phase", "--methods", "hct"], "--methods and --multiples choose among the main jobs, and the grid "
                                                "has none (--groups phase): add main to the groups."),
])
def test_verify_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, msg):
    code = main(["verify", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0]
    assert not (tmp_path / "o").exists()  # nothing written for bad input


@pytest.mark.parametrize("groups", [["main"], ["phase"]])
def test_groups_run_only_those_parts_of_the_grid(tiny_grid, tmp_path, groups):
    doc = V.verify(tmp_path, preset="smoke", datasets=["synthetic"], seeds=1, workers=1, groups=groups)
    assert doc["meta"]["groups"] == groups
    ran = {p.parts[-3] for p in tmp_path.glob("*/synthetic/*.pt")}
    assert ran == set(groups)
    everything = V.build_grid("smoke", ["synthetic"], 1)
    assert doc["meta"]["n_runs"] == sum(j.group in groups for j in everything)
    assert (tmp_path / "report.md").exists()


def test_methods_and_multiples_keep_only_those_main_jobs():
    everything = V.build_grid("paper", ["synthetic"], 1)
    some = V.build_grid("paper", ["synthetic"], 1, methods=["hct", "beta-beta2"], multiples=[2.0])
    main_jobs = [j for j in some if j.group == "main"]
    want = [j for j in everything if j.group == "main" and j.multiple == 2.0
            and j.label in ("hct", "beta-beta2")]
    assert main_jobs == want and {j.label for j in main_jobs} == {"hct", "beta-beta2"}  # hct is HCT alone
    assert [j for j in some if j.group != "main"] == [j for j in everything if j.group != "main"]
    with pytest.raises(InputError, match=r"^methods: unknown method\(s\) gan in the paper grid; choose among "):
        V.build_grid("paper", ["synthetic"], 1, methods=["gan"])


def test_plan_prints_every_job_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import hcdiag.plan as P

    units = {"vanilla": 1e-3, "hct": 2e-3, "eval": 1e-2, "mi": 0.0, "em": 0.5, "params": 10}
    monkeypatch.setattr(P, "unit_costs", lambda data, preset, **kw: dict(units))  # no timing in a test
    assert main(["verify", "--plan", "--workers", "2"]) == 0  # no --out: nothing is written
    out = capsys.readouterr().out
    jobs = V.build_grid("smoke", ["synthetic"], 1)
    assert all(j.name in out for j in jobs) and f"{len(jobs)} jobs:" in out and "with 2 worker(s)" in out
    twins = [j for j in jobs if j.twin]  # vanilla under scaled: relabelled from literal, no training of its own
    assert twins and all(f"{j.name:<64} 0 s (relabelled from {j.twin}: the same training)" in out for j in twins)
    assert not (tmp_path / "o").exists()
    assert main(["verify", "--plan", "--out", str(tmp_path / "o"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["jobs"] == len(jobs) and len(doc["plan"]["per_job"]) == len(jobs)


def test_progress_lines_estimate_the_time_to_the_end(tiny_grid, tmp_path, capsys):
    lines = []
    V.verify(tmp_path, preset="smoke", datasets=["synthetic"], seeds=1, workers=1, groups=["phase"],
             progress=lines.append)
    done = [ln for ln in lines if ln.startswith("[")]
    assert done and all("to the end)" in ln for ln in done[:-1]) and "to the end" not in done[-1]
    assert capsys.readouterr().err == ""  # no heartbeat asked: nothing while the runs train


def test_heartbeat_writes_each_running_runs_progress_at_most_that_often():
    import io

    from hcdiag.train.progress import Heartbeat

    now = [100.0]
    out = io.StringIO()
    hb = Heartbeat("main/x/hct_m2_scaled_s0.pt", 60, stream=out, clock=lambda: now[0])
    hb.update("stage1 epoch 1 loss 3 KL 0.1 AU 0")
    assert out.getvalue() == ""  # not a minute yet
    now[0] = 161.0
    hb.update("stage1 epoch 2 loss 2.5 KL 0.05 AU 0")
    hb("stage1 epoch 3 loss 2.4 KL 0.04 AU 0")  # the same second: throttled (callable for the diffusion trainer)
    hb.summary("round 1: 16 -> 8 clusterings kept")  # no summaries
    now[0] = 100.0 + 3 * 3600
    hb("stage2 epoch 9 loss 2 KL 0.01 AU 0")
    assert out.getvalue().splitlines() == [
        "  main/x/hct_m2_scaled_s0.pt: stage1 epoch 2 loss 2.5 KL 0.05 AU 0 (61 s so far)",
        "  main/x/hct_m2_scaled_s0.pt: stage2 epoch 9 loss 2 KL 0.01 AU 0 (3.0 h so far)"]
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="every must be > 0 seconds"):
            Heartbeat("x", bad)


def test_the_heartbeat_option_reaches_the_runs_and_bad_values_are_refused_before_any_work(tiny_grid, tmp_path,
                                                                                           capsys):
    argv = ["verify", "--workers", "1", "--groups", "phase"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--heartbeat", "1e-9"]) == 0
    err = capsys.readouterr().err
    assert "  phase/synthetic/vanilla_m0.5_scaled_s0.pt: baseline epoch 1 loss " in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--heartbeat", "0"]) == 0
    assert " so far)" not in capsys.readouterr().err
    for bad in (-1.0, float("nan"), float("inf"), "often"):
        with pytest.raises(InputError, match=r"^heartbeat must be a number of seconds >= 0 \(0: no progress lines "
                                             r"while a run trains\)\. Got "):
            V.verify(tmp_path / "c", preset="smoke", groups=["phase"], workers=1, heartbeat=bad)
        with pytest.raises(InputError, match=r"^heartbeat must be"):
            V.execute(V.build_grid("smoke", ["synthetic"], 1, groups=["phase"]), str(tmp_path / "c"), heartbeat=bad)
    assert not (tmp_path / "c").exists()  # refused before any folder or run


@pytest.mark.parametrize("workers", [1, 2])
def test_verify_heartbeat_shows_every_run_while_it_trains(tiny_grid, tmp_path, capfd, workers):
    jobs = V.build_grid("smoke", ["synthetic"], 1, groups=["phase"])
    V.execute(jobs, str(tmp_path), workers=workers, heartbeat=1e-9)
    err = capfd.readouterr().err  # the workers' stderr (file descriptor 2), not only this process's
    for j in jobs:
        lines = [ln for ln in err.splitlines() if ln.startswith(f"  {j.name}: ")]
        assert any(f"  {j.name}: baseline epoch 1 loss " in ln and " KL " in ln for ln in lines)
        assert lines and all(ln.endswith(" so far)") for ln in lines)


def test_progress_estimates_from_runs_trained_here_not_from_finished_ones(monkeypatch, tmp_path):
    jobs = V.build_grid("smoke", ["synthetic"], 1, groups=["phase"])[:3]

    def fake(job, out_dir):  # the first was finished by an earlier verify: it takes no time here
        first = job.name == jobs[0].name
        return {"job": V.asdict(job), "run": job.name, "checks": "", "trained": not first, "seconds": 0.0}

    monkeypatch.setattr(V, "run_job", fake)
    lines = []
    V.execute(jobs, str(tmp_path), workers=1, progress=lines.append)
    assert "to the end" not in lines[0] and "to the end)" in lines[1] and "to the end" not in lines[2]
    # the jobs left are relabelled from their twins' run files (seconds each): no estimate from the pace of
    # trained runs (it said "about 3.6 h to the end" with 6 s left)
    main = V.build_grid("smoke", ["synthetic"], 1, groups=["main"], methods=["vanilla"], multiples=[2.0],
                        losses=["literal", "scaled"])
    assert [bool(j.twin) for j in main] == [False, True]
    lines = []
    V.execute(main, str(tmp_path), workers=1, progress=lines.append)
    assert len(lines) == 2 and not any("to the end" in ln for ln in lines)


def test_cached_checks_are_reused_only_when_this_code_wrote_them(tiny_grid, tmp_path, monkeypatch):
    import shutil

    job = V.build_grid("smoke", ["synthetic"], 1, groups=["phase"])[0]
    rec = V.run_job(job, str(tmp_path))
    path = Path(rec["checks"])
    doc = json.loads(path.read_text())
    assert rec["trained"] and doc["checks_code"] == V.code_fingerprint()
    kl = next(c for c in doc["checks"] if c["id"] == "KL")["values"]["final"]["kl"]
    stamp = path.stat().st_mtime_ns
    kept = V.run_job(job, str(tmp_path))
    assert not kept["trained"] and not kept["measured"] and path.stat().st_mtime_ns == stamp  # reused as it is
    assert V._how(kept) == "no (finished before)"

    def forged(code):  # a document with a made-up KL, stamped by `code`
        bad = json.loads(json.dumps(doc))
        next(c for c in bad["checks"] if c["id"] == "KL")["values"]["final"]["kl"] = 999.0
        bad["checks_code"] = code
        path.write_text(json.dumps(bad))

    for spoil in (lambda: forged(None), lambda: forged("0123456789abcdef0000"),  # no stamp, another hcdiag's
                  lambda: path.write_bytes(b"\xff{not json")):  # garbage
        spoil()
        again = V.run_job(job, str(tmp_path))
        assert not again["trained"] and again["measured"]  # the run is kept; its checks measured again from it
        assert V._how(again) == "no (finished before; its checks measured again)"
        new = json.loads(path.read_text())
        assert next(c for c in new["checks"] if c["id"] == "KL")["values"]["final"]["kl"] == kl
        assert new["checks_code"] == V.code_fingerprint()

    # the run file replaced (here: only its time changed) is another run: its checks are measured again
    run_file = Path(rec["run"])
    st = run_file.stat()
    os.utime(run_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert V.run_job(job, str(tmp_path))["measured"] and not V.run_job(job, str(tmp_path))["measured"]
    assert json.loads(path.read_text())["run_file"] == [st.st_size, st.st_mtime_ns + 10**9]
    # the files changed under this process: what it computes is stamped by nothing and never reused
    monkeypatch.setattr(V, "_SOURCE_AT_IMPORT", "not-this-source")
    assert V.code_fingerprint() is None
    again = V.run_job(job, str(tmp_path))
    assert again["measured"] and json.loads(path.read_text())["checks_code"] is None
    assert V.run_job(job, str(tmp_path))["measured"]  # and again: nothing is trusted
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))  # no temporary left


def test_the_report_says_which_finished_runs_had_their_checks_measured_again(tiny_grid, tmp_path):
    V.verify(tmp_path, preset="smoke", groups=["phase"], workers=1)
    V.verify(tmp_path, preset="smoke", groups=["phase"], workers=1)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["trained"], r["measured"]) for r in runs] == [(False, False)] * 2
    spoilt = Path(runs[0]["checks"])
    spoilt.write_text("{}")
    V.verify(tmp_path, preset="smoke", groups=["phase"], workers=1)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["trained"], r["measured"]) for r in runs] == [(False, True), (False, False)]
    md = (tmp_path / "report.md").read_text()
    name = Path(runs[0]["run"]).relative_to(tmp_path)
    assert f"| `{name}` | no (finished before; its checks measured again) |" in md
    assert f"| `{Path(runs[1]['run']).relative_to(tmp_path)}` | no (finished before) |" in md


def test_the_code_stamp_is_the_package_source(tmp_path, monkeypatch):
    import shutil

    root = Path(V.__file__).resolve().parent
    copy = tmp_path / "pkg" / "hcdiag"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(V, "__file__", str(copy / "verify.py"))
    here = V._source_hash()
    assert here == V._SOURCE_AT_IMPORT  # the same files, the same stamp
    (copy / "checks" / ".#barrier.py").symlink_to(copy / "nowhere")  # an editor's lock link: not source
    (copy / ".hidden.py").write_text("x = 1\n")
    assert V._source_hash() == here
    (copy / "checks" / "barrier.py").write_text((copy / "checks" / "barrier.py").read_text() + "\n# edited\n")
    assert V._source_hash() != here  # one changed line, another stamp
    empty = tmp_path / "zipped" / "hcdiag"
    empty.mkdir(parents=True)
    monkeypatch.setattr(V, "__file__", str(empty / "verify.py"))
    assert V._source_hash() is None and V.code_fingerprint() is None  # no source: nothing cached is reused
    assert not V._cached_checks(tmp_path / "any.checks.json", tmp_path / "any.pt")


def test_a_twin_whose_source_failed_counts_as_training_in_the_estimate(monkeypatch, tmp_path):
    main = V.build_grid("smoke", ["synthetic"], 2, groups=["main"], methods=["vanilla"], multiples=[2.0],
                        losses=["literal", "scaled"])
    lit0, sc0, lit1, sc1 = main
    assert (sc0.twin, sc1.twin) == (lit0.name, lit1.name) and not lit0.twin and not lit1.twin

    def fake(job, out_dir):
        if job.name == lit0.name:
            raise RuntimeError("killed")
        return {"job": V.asdict(job), "run": job.name, "checks": "", "trained": True, "seconds": 0.0}

    monkeypatch.setattr(V, "run_job", fake)
    lines = []
    V.execute(main, str(tmp_path), workers=1, progress=lines.append)
    by = {ln.split(" ")[1]: ln for ln in lines}
    assert [ln.split(" ")[1] for ln in lines] == [lit0.name, lit1.name, sc0.name, sc1.name]
    assert "to the end" not in by[lit0.name]  # a failure is no pace: nothing trained yet
    # left after seed 1's source: seed 0's twin, which trains (its source failed), and seed 1's, which relabels
    assert "to the end)" in by[lit1.name]
    assert "to the end" not in by[sc0.name]  # only a relabelling left


def test_verify_without_out_runs_only_a_plan(capsys):
    assert main(["verify"]) == 2
    assert capsys.readouterr().err.strip() == ("hcdiag verify: error: --out is required (the folder of the runs and "
                                               "the report); only --plan runs without it.")


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


# ---------------------------------------------------------------------------------------------------------
# the paper preset's grid, end to end at a tiny scale

# sizes only: everything structural (methods, multiples, conventions, ablations, R0 = 16, K = 8, EM backend,
# epoch_unit='data_pass', eps, beta schedule, references) stays the paper preset's and the paper grid's
PAPER_TINY = dict(enc_widths=(8,), dec_widths=(8,), latent_dim=2, batch_size=128, epochs=1, epochs_per_round=1,
                  refine_cap=2, stage3_epochs=1, eval_rows=200)


@pytest.fixture
def paper_tiny_grid(monkeypatch):
    real = V.GRIDS["paper"]
    g = {**real, "phase_multiples": [0.5, 2.0], "phase_epochs": 1, "n_samples": {"synthetic": 600},
         "overrides": dict(PAPER_TINY)}
    monkeypatch.setitem(V.GRIDS, "paper", g)
    return real, g


def _final_kl(path) -> float:
    """Independent recomputation: the model rebuilt from the run file, KL (nats) of its final snapshot."""
    from hcdiag.metrics import kl_total
    from hcdiag.models import build_model, encode_decode
    from hcdiag.runfile import load_run

    run = load_run(path)
    m = build_model(run.config.model)
    m.load_state_dict(run.snapshot("final"))
    mu, lv, _ = encode_decode(m, run.eval_x.float())
    return kl_total(mu, lv)


def test_ablation_jobs_take_the_grid_overrides_but_keep_their_own_value(monkeypatch):
    # regression: ablation jobs used to drop the grid's overrides (a tiny grid trained them at full size); the
    # overrides here set every ablated setting itself, so the ablation's own value must win each time
    ov = dict(PAPER_TINY, r0=4, eps=1e-2, beta_end=5.0, keep_ratio=0.5)
    monkeypatch.setitem(V.GRIDS, "paper", {**V.GRIDS["paper"], "overrides": ov})
    abl = [j for j in V.build_grid("paper", ["synthetic"], 1) if j.group == "ablation"]
    want = [(k, v) for k, vs in V.ABLATIONS.items() for v in vs]
    assert [j.tag for j in abl] == [f"{k}{v:g}" for k, v in want]
    for j, (key, value) in zip(abl, want):
        got = dict(j.overrides)
        assert got[key] == value
        assert {k: v for k, v in got.items() if k not in (key, "references", "uneven")} == \
               {k: v for k, v in ov.items() if k != key}
        # R0 not a power of two and keep ratios other than 1/2 need uneven halving
        assert got.get("uneven", False) == (key == "keep_ratio" or (key == "r0" and value & (value - 1) != 0))
        assert got["references"] == ()


def test_paper_grid_runs_end_to_end_at_tiny_scale(paper_tiny_grid, tmp_path, monkeypatch, one_thread):
    from hcdiag import artefacts
    from hcdiag.data import load
    from hcdiag.runfile import load_run
    from hcdiag.theory import linear_vae_optimum
    from hcdiag.train import PRESETS

    real, g = paper_tiny_grid
    # the tiny grid is the paper grid in everything but its sizes
    assert {k: v for k, v in g.items() if k not in ("phase_multiples", "phase_epochs", "n_samples", "overrides")} == \
           {k: v for k, v in real.items() if k not in ("phase_multiples", "phase_epochs", "n_samples", "overrides")}
    assert set(g["phase_multiples"]) <= set(real["phase_multiples"]) and g["ablations"] is True
    assert not set(PAPER_TINY) & (set(V.ABLATIONS) | {"epoch_unit", "r0", "k", "em_backend", "eps", "mode"})
    # the witness group needs latent_dim >= K - 1 (the simplex head), which the tiny latent (2) is not: it has its
    # own end-to-end test (test_verify_witness.py)
    groups = ["main", "phase", "ablation"]
    jobs = V.build_grid("paper", ["synthetic"], 1, groups=groups)
    labels = {(j.method, j.tag) for j in jobs if j.group == "main"}
    assert labels == set(real["methods"])
    assert {j.loss for j in jobs if j.method == "hct" and j.group == "main"} == {"literal", "scaled", "mean"}
    assert len([j for j in jobs if j.group == "ablation"]) == sum(map(len, V.ABLATIONS.values()))

    doc = V.verify(tmp_path, preset="paper", datasets=["synthetic"], seeds=1, workers=1, groups=groups)
    assert doc["meta"]["n_runs"] == len(jobs)

    # every job's run file is complete, trained with the tiny sizes and the paper preset's structure
    for j in jobs:
        run = load_run(tmp_path / j.name)
        assert run.complete and (tmp_path / j.name).with_suffix(".checks.json").exists(), j.name
        t = run.config.train
        assert t["epoch_unit"] == "data_pass" and t["latent_dim"] == PAPER_TINY["latent_dim"], j.name
        assert t["epochs"] == (g["phase_epochs"] if j.group == "phase" else PAPER_TINY["epochs"]), j.name
        if j.group == "ablation":
            key = next(k for k in V.ABLATIONS if j.tag.startswith(k))
            assert t[key] == pytest.approx(dict(j.overrides)[key]), j.name  # the ablated value survived
            assert run.r0 == t["r0"]
            if key != "r0":
                assert t["r0"] == PRESETS["paper"]["r0"]
        if j.method == "hct" and run.r0 > 2:
            kept = [len(r["kept"]) for r in run.data["rounds"]]
            n = run.r0
            for k in kept:  # the rounds follow the keep ratio (uneven halving for 1/3 and 2/3)
                assert k == max(2, min(n - 1, round(n * t["keep_ratio"])))
                n = k
            assert kept[-1] == 2

    # the claims table: one ablation row per ablated setting, its numbers the final KL of the run files
    kls = {j.name: _final_kl(tmp_path / j.name) for j in jobs if j.group == "ablation"}
    for key, vals in V.ABLATIONS.items():
        (row,) = [r for r in doc["claims"] if r["claim"] == f"Ablation: {V.PAPER_ABLATION[key][1]}"]
        assert row["verdict"] in ("holds", "fails", "inconclusive")
        assert row["conditions"] == "synthetic, preset paper"
        names = [j.name for j in jobs if j.group == "ablation" and j.tag.startswith(key)]
        printed = [p.split(": ") for p in row["ours"].split(" (")[0].split(", ")]
        assert [float(v) for v, _ in printed] == pytest.approx(vals, rel=1e-5)
        for (_, k), name in zip(printed, names):
            assert float(k) == pytest.approx(kls[name], rel=5e-3, abs=1e-12)  # printed with 3 digits
        assert row["verdict"] == claims._ablation_verdict(key, [(v, kls[n]) for v, n in zip(vals, names)])[0]

    # the report, its figures and the phase diagram at the latent dimension the phase runs were trained with
    for f in ("report.md", "report.html", "results.json", "phase_synthetic.png", "table1_synthetic_m2.png",
              "table1_synthetic_m5.png", *(f"memory_synthetic_{c}_m{m:g}.png" for c in real["losses"]
                                           for m in real["multiples"])):
        assert (tmp_path / f).exists(), f
    res = json.loads((tmp_path / "results.json").read_text())
    ph = res["phase"]["synthetic"]
    assert ph["latent_dim"] == PAPER_TINY["latent_dim"]
    x = load("synthetic", n_samples=600).x.astype(np.float64)
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    for r in ph["rows"]:
        assert r["kl_theory"] == pytest.approx(linear_vae_optimum(lam, r["s2"], PAPER_TINY["latent_dim"]).kl,
                                               rel=1e-6, abs=1e-9)

    # Figure 4 from the same folder: nothing retrained, the same numbers
    stamps = {n: (tmp_path / n).stat().st_mtime_ns for n in kls}

    def no_training(*a, **k):
        raise AssertionError("figure4 retrained a run that verify had written")

    monkeypatch.setattr("hcdiag.train.Trainer.run", no_training)
    fig4 = artefacts.figure4("paper", ["synthetic"], 1, tmp_path, workers=1)
    assert fig4.meta["trained"] == [] and not fig4.meta["reduced"]
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in kls} == stamps
    pts = [r for r in fig4.rows if r["verdict"] == "reported"]
    assert sorted(str(Path(r["runs"][0]).relative_to(tmp_path)) for r in pts) == sorted(kls)
    for r in pts:
        assert r["values"]["kl"] == pytest.approx(kls[str(Path(r["runs"][0]).relative_to(tmp_path))], rel=1e-6, abs=1e-9)
    ablation_claims = {r["claim"][len("Ablation: "):]: r["verdict"] for r in doc["claims"]
                       if r["claim"].startswith("Ablation: ")}
    for r in fig4.rows:
        if r["verdict"] != "reported":
            assert r["verdict"] == ablation_claims[r["paper"]]
    saved = artefacts.save_figures(fig4, tmp_path / "fig4")
    assert sorted(Path(p).name for p in saved) == sorted(f"figure4_{k}.png" for k in V.ABLATIONS)


def test_a_failed_run_is_reported_and_the_grid_goes_on(tiny_grid, tmp_path, capsys, monkeypatch):
    from hcdiag.errors import NumericalError

    real = V.run_job

    def flaky(job, out_dir, **kw):
        if job.group == "main" and job.method == "vanilla":
            raise NumericalError("non-finite loss in stage1 (vanilla), epoch 1; lower --lr")
        return real(job, out_dir, **kw)

    monkeypatch.setattr(V, "run_job", flaky)
    code = main(["verify", "--out", str(tmp_path), "--workers", "1", "--strict"])
    out, err = capsys.readouterr()
    assert code == 1  # --strict: a failed run is a failure even if every claim held
    assert "[2/4] main/synthetic/vanilla_m2_scaled_s0.pt (FAILED: non-finite loss in stage1 (vanilla)" in err
    assert "1 run(s) FAILED" in out and "main/synthetic/vanilla_m2_scaled_s0.pt: non-finite loss" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["failed"] == [{"run": "main/synthetic/vanilla_m2_scaled_s0.pt",
                              "error": "non-finite loss in stage1 (vanilla), epoch 1; lower --lr"}]
    assert res["n_runs"] == 3 and all("vanilla_m2" not in r["run"] for r in res["runs"] if "main/" in r["run"])
    md = (tmp_path / "report.md").read_text()
    assert "## Failed runs" in md and "- `main/synthetic/vanilla_m2_scaled_s0.pt`: non-finite loss" in md
    # retried on the next call; the finished runs are not retrained
    monkeypatch.setattr(V, "run_job", real)
    again = V.execute(V.build_grid("smoke", ["synthetic"], 1), str(tmp_path), workers=1)
    assert [r["trained"] for r in again] == [False, True, False, False]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_pool_workers_stop_when_verify_dies(tmp_path):
    """A killed verify must not leave workers training on as orphans (they would keep writing run files)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from hcdiag.verify import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init_worker, initargs=(None, ctx.Value('i', 0))) as p:\n"
        "        print(p.submit(os.getpid).result(), flush=True)\n"
        "        p.submit(time.sleep, 120)\n"
        "        time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(worker, 0)  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        try:  # a zombie counts as gone: reap it if it is ours (it is not: it was the parent's child)
            if open(f"/proc/{worker}/stat").read().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the pool worker outlived its killed parent by 20 s")


# ---------------------------------------------------------------------------------------------------------
# the claims table on hand-made records: like for like, seeds paired, the warm-up in its own block


def _rec(method, loss, seed, kl, tag="", barrier="holds"):
    snaps = [{"snapshot": s, "kl": kl, "au": 1} for s in ("init", "round0", "refined", "final")]
    checks = [{"id": "KL", "verdict": "holds", "summary": "", "values": {"snapshots": snaps}}]
    checks += [{"id": c, "verdict": barrier, "summary": f"{c} said so", "values": {}} for c in V.BARRIER_IDS]
    job = {"dataset": "synthetic", "method": method, "tag": tag, "multiple": 2.0, "loss": loss, "seed": seed,
           "group": "main"}
    return {"job": job, "run": f"{method}{tag}_{loss}_s{seed}.pt", "doc": {"checks": checks}}


def test_main_claim_rows_compare_like_with_like_and_pair_seeds():
    recs = [_rec("hct", "literal", 0, 1.5), _rec("hct", "literal", 1, 0.001),
            _rec("vanilla", "literal", 0, 0.001), _rec("vanilla", "literal", 1, 0.5),
            _rec("hct", "mean", 0, 3.0), _rec("hct", "literal", 0, 3.0, tag="warmup"),
            _rec("hct", "literal", 1, 2.0, tag="warmup")]
    rows = V.main_claim_rows(recs, "smoke")

    def one(id_, **v):
        (r,) = [r for r in rows if r["id"] == id_ and all(r["values"].get(k) == x for k, x in v.items())]
        return r

    # literal: seed 0 HCT 1.5 vs vanilla 0.001 holds, seed 1 HCT 0.001 collapsed fails -> mixed, paired by seed
    f5 = one("figure5", method="hct", loss="literal")
    assert f5["values"]["per_seed"] == ["holds", "fails"] and f5["verdict"] == "mixed"
    hi = one("table1.highest", method="hct", loss="literal")
    assert hi["values"]["per_seed"] == ["holds", "fails"] and hi["values"]["best_baseline"] == {"0": "vanilla",
                                                                                               "1": "vanilla"}
    # mean: HCT has no baseline of its own convention, so nothing is compared across conventions
    for id_ in ("figure5", "table1.highest"):
        r = one(id_, method="hct", loss="mean")
        assert r["verdict"] == "inconclusive" and "literal" not in " ".join(r["runs"]), id_
    # the warm-up: its own block under literal, compared with literal's vanilla at the same seed
    w = one("figure5", method="hct-warmup")
    assert w["conditions"].endswith("loss literal, beta warm-up from 0") and w["values"]["per_seed"] == ["holds", "fails"]
    # the barrier claims are the checks' own verdicts, combined over seeds
    assert one("barrier.T2", method="hct", loss="literal")["ours"] == "T2 said so [2/2 seeds hold]"
    # vanilla's claim: seed 0 collapsed, seed 1 not -> mixed, with each seed's own verdict
    van = one("table1.vanilla", loss="literal")
    assert van["values"]["per_seed"] == ["holds", "fails"] and van["verdict"] == "mixed"
    assert van["values"]["label"] == "vanilla VAE [literal]"


# -- readings of HCT's epoch under verify ---------------------------------------------------------------------

def test_readings_add_hct_jobs_under_each_other_reading():
    base = V.build_grid("smoke", ["synthetic"], 1)
    jobs = V.build_grid("smoke", ["synthetic"], 1, readings=["steps", "data_pass", "epochs"])
    extra = jobs[len(base):]
    assert jobs[:len(base)] == base  # the preset's reading (smoke: steps) adds nothing
    hct = [j for j in base if j.group == "main" and j.label == "hct"]
    assert [(j.tag, dict(j.overrides)["epoch_unit"]) for j in extra] == \
        [(f"reading-{u}", u) for u in ("data_pass", "epochs") for _ in hct]
    assert all(j.label.startswith("hct-reading-") and j.name.endswith(".pt") for j in extra)
    with pytest.raises(InputError, match=r"^readings: unknown reading\(s\) pass; choose among steps, epochs, data_pass\.$"):
        V.build_grid("smoke", ["synthetic"], 1, readings=["pass"])


def _row(method, verdict, cid="table1.hct", stage="final", ours="KL 0.1"):
    return {"id": cid, "claim": "HCT keeps KL", "item": "HCT (final)", "section": "5.2", "paper": "KL > 2.5",
            "ours": ours, "verdict": verdict, "conditions": "synthetic", "runs": [f"{method}.pt"],
            "values": {"dataset": "synthetic", "multiple": 2.0, "loss": "scaled", "stage": stage, "method": method}}


def test_reading_changes_reports_only_claims_whose_verdict_differs():
    rows = [_row("hct", "fails"), _row("hct-reading-data_pass", "holds", ours="KL 3.1"),
            _row("hct", "holds", stage="pre"), _row("hct-reading-data_pass", "holds", stage="pre"),
            _row("vanilla", "holds"), _row("hct-reading-epochs", "fails")]
    out = V.reading_changes(rows)
    assert [(r["id"], r["values"]["stage"], r["verdict"]) for r in out] == [("reading.table1.hct", "final", "reported")]
    assert out[0]["values"]["verdicts"] == {"preset": "fails", "data_pass": "holds"}
    assert out[0]["ours"] == "preset's reading: fails (KL 0.1); data_pass: holds (KL 3.1)"
    assert out[0]["runs"] == ["hct.pt", "hct-reading-data_pass.pt"]


def test_verify_decides_the_claims_under_each_reading(tiny_grid, tmp_path):
    doc = V.verify(tmp_path, preset="smoke", datasets=["synthetic"], seeds=1, workers=1, groups=["main"],
                   methods=["hct", "vanilla"], readings=["data_pass"])
    rows = doc["claims"]
    runs = {p.name for p in tmp_path.glob("main/synthetic/*.pt")}
    assert {n for n in runs if "reading-data_pass" in n} and doc["meta"]["epoch_unit"] == "steps and data_pass"
    mine = [r for r in rows if r["values"].get("method") == "hct-reading-data_pass"]
    assert mine and all("HCT's epoch read as data_pass" in r["conditions"] for r in mine)
    want = V.reading_changes([r for r in rows if not r["id"].startswith("reading.")])
    assert [r for r in rows if r["id"].startswith("reading.")] == want  # reported exactly where verdicts differ


def test_readings_on_the_command_line(tmp_path, capsys, monkeypatch):
    import hcdiag.plan as P

    monkeypatch.setattr(P, "unit_costs", lambda data, preset, **kw: {"vanilla": 1e-3, "hct": 1e-3, "eval": 1e-2,
                                                                      "mi": 0.0, "em": 0.1, "params": 1})
    assert main(["verify", "--plan", "--readings", "data_pass"]) == 0
    assert "main/synthetic/hct-reading-data_pass_m2_literal_s0.pt" in capsys.readouterr().out
    assert main(["verify", "--plan", "--readings", "pass"]) == 2
    assert capsys.readouterr().err.strip() == ("hcdiag verify: error: --readings: unknown reading(s) pass; choose "
                                               "among steps, epochs, data_pass.")


def test_baselines_under_the_second_of_literal_and_scaled_are_relabelled_from_the_first():
    jobs = V.build_grid("paper", ["synthetic"], 1, groups=["main"])
    names = {j.name for j in jobs}
    for j in jobs:
        if j.method != "hct" and j.loss == "scaled":
            assert j.twin == replace(j, loss="literal").name and j.twin in names, j.name
        else:  # HCT's clustering term depends on the convention; 'mean' is another objective; literal comes first
            assert j.twin == "", j.name
    flipped = V.build_grid("paper", ["synthetic"], 1, groups=["main"], losses=["scaled", "literal"])
    assert {j.name: j.twin for j in flipped if j.twin} == {
        j.name: replace(j, loss="scaled").name for j in flipped if j.method != "hct" and j.loss == "literal"}
    assert not any(j.twin for j in V.build_grid("paper", ["synthetic"], 1, groups=["main"], losses=["scaled"]))
    # a job copied into another group or multiple (Table 2, the phase figures) names its own copy's twin
    j = next(j for j in jobs if j.twin)
    for moved in (replace(j, group="table2"), replace(j, multiple=5.0)):
        assert moved.twin == replace(moved, loss="literal", relabel_from="").name != j.twin


@pytest.mark.parametrize("workers", [1, 2])
def test_a_relabelled_twin_waits_for_its_source_and_trains_itself_when_the_source_fails(
        tiny_grid, tmp_path, monkeypatch, workers, one_thread):
    from hcdiag.runfile import load_run

    monkeypatch.setitem(V.GRIDS["smoke"], "losses", ["literal", "scaled"])
    jobs = V.build_grid("smoke", ["synthetic"], 1, groups=["main"])
    twin = next(j for j in jobs if j.twin)
    assert twin.method == "vanilla" and twin.loss == "scaled"
    jobs = [twin] + [j for j in jobs if j is not twin]  # listed first, it must still wait for its source
    recs = V.execute(jobs, str(tmp_path), workers=workers)
    assert not any(r.get("error") for r in recs)
    by = {r["run"]: r for r in recs}
    got = by[str(tmp_path / twin.name)]
    assert got["shared_from"] == twin.twin and got["trained"] is False
    assert all(r["trained"] for r in recs if r is not got)
    run = load_run(tmp_path / twin.name)
    assert run.complete and run.config.loss == "scaled"
    assert json.loads(Path(got["checks"]).read_text())["run"].endswith(twin.name)
    # the source failed: the twin trains itself (the grid goes on)
    out2 = tmp_path / "again"
    real = V.run_job

    def source_fails(job, out_dir):
        if job.name == twin.twin:
            raise RuntimeError("killed")
        return real(job, out_dir)

    monkeypatch.setattr(V, "run_job", source_fails)
    recs = V.execute(jobs, str(out2), workers=1)
    by = {r["job"]["tag"] + r["job"]["method"] + r["job"]["loss"]: r for r in recs}
    assert by["vanillaliteral"]["error"] and by["vanillascaled"]["trained"] is True
    assert by["vanillascaled"]["shared_from"] is None
