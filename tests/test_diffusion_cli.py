"""``hcdiag train-diffusion`` and ``hcdiag check-diffusion`` end to end, the data they train on
(hcdiag.diffusion.data), resume from the command line, and one line with exit 2 for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hcdiag.cli import main
from hcdiag.data import digits, synthetic
from hcdiag.diffusion.data import lambda_max_of, prepare, truth
from hcdiag.diffusion.runfile import load_diffusion_run, save_diffusion_run
from hcdiag.diffusion.train import train_diffusion
from hcdiag.errors import InputError

FAST = ["--n-samples", "600", "--dim", "2", "--k", "4", "--spread", "0.3", "--separation", "2", "--T", "100",
        "--epochs-per-round", "300", "--widths", "32,32", "--batch-size", "64", "--quiet"]  # enough to beat the
# data-free predictor (checks read nothing from a denoiser that has not learned the data) by 10-15%


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["train-diffusion", "synthetic", *FAST, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    return {m: _train(d, f"{m}.pt", "--method", m) for m in ("consensus", "single", "logsnr")}


def test_prepare_scales_to_the_asked_lambda_max_and_centres(seed):
    ds = synthetic(n=500, dim=5, k=3, seed=seed % 1000)
    for lam in (0.1, 10.0):
        d = prepare(ds, lambda_max=lam)
        assert np.allclose(d.x.mean(0), 0, atol=1e-5)
        top = np.linalg.eigvalsh(np.cov(d.x.astype(np.float64).T, bias=True))[-1]
        assert top == pytest.approx(lam, rel=1e-5) and lambda_max_of(d.x) == pytest.approx(lam, rel=1e-5)
    assert prepare(ds).spec["scale"] == 1.0
    with pytest.raises(InputError, match="target lambda_max must be a finite number > 0"):
        prepare(ds, lambda_max=-1.0)


def test_truth_is_regenerated_and_refused_for_rows_it_does_not_match(seed):
    ds = synthetic(n=300, dim=3, k=4, seed=seed % 1000)
    d = prepare(ds, lambda_max=2.0)
    t, why = truth(d.x, d.spec)
    assert why is None
    s = d.spec["scale"]
    assert np.allclose(t["means"], s * (ds.means - np.asarray(d.spec["center"]))) and t["spread"] == pytest.approx(s * 0.5)
    tampered = d.x.copy()
    tampered[0, 0] += 1.0
    t, why = truth(tampered, d.spec)
    assert t is None and "not the synthetic data its data.spec names" in why
    t, why = truth(prepare(digits()).x, prepare(digits()).spec)
    assert t is None and "no known true distribution" in why


def test_train_writes_a_run_the_checks_read(runs, tmp_path, capsys):
    run = load_diffusion_run(runs["consensus"])
    assert run.complete and run.steps == run.budget == 300 * 4 and run.spec["name"] == "synthetic"
    capsys.readouterr()
    code = main(["check-diffusion", str(runs["consensus"]), "--against", f"{runs['single']},{runs['logsnr']}",
                 "--samples", "100", "--format", "json", "--report", str(tmp_path / "rep")])
    doc = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in doc["checks"]] == ["D1", "D2", "D3", "D4"]
    assert code == (0 if doc["status"] == "holds" else 1)
    d3 = doc["checks"][2]
    assert set(d3["values"]["versus"]) == {str(runs["single"]), str(runs["logsnr"])}
    assert d3["values"]["quality"]["K"] == 4  # the truth regenerated from the run file's data.spec
    assert d3["values"]["controls"][str(runs["logsnr"])]["schedule_dependence"] == 0.0
    assert d3["values"]["controls"][str(runs["single"])]["schedule_dependence"] is None
    common = d3["values"]["at_common_schedule"]  # like with like, reported beside the deciding comparison
    assert common["schedule"] == load_diffusion_run(runs["single"]).schedules[2].spec
    assert set(common["versus"]) == set(d3["values"]["versus"])
    d4 = doc["checks"][3]
    assert len(d4["values"]["unseen"]) == 4  # linear default, scaled_linear, cosine, sigmoid
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["fig_gain.png", "fig_samples.png", "report.html",
                                                                    "report.md", "results.json"]
    assert "# hcdiag check-diffusion report" in (tmp_path / "rep" / "report.md").read_text()


def test_check_text_output_names_the_spectral_criteria_side_by_side(runs, capsys):
    main(["check-diffusion", str(runs["single"]), "--only", "D1,D2"])
    out = capsys.readouterr().out
    assert "spectral criteria, lambda_max = " in out and "VAE collapse for s2 >" in out and "eq. 13" in out


def test_constant_data_are_refused_at_training(tmp_path, capsys):
    np.save(tmp_path / "ones.npy", np.ones((50, 3), dtype=np.float32))
    assert main(["train-diffusion", str(tmp_path / "ones.npy"), "--out", str(tmp_path / "c.pt"), "--quiet"]) == 2
    assert "are constant (lambda_max = 0)" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()


def test_a_control_run_measures_d4_but_decides_nothing_about_algorithm_2(runs, capsys):
    main(["check-diffusion", str(runs["logsnr"]), "--only", "D3,D4", "--samples", "60", "--format", "json"])
    d3, d4 = json.loads(capsys.readouterr().out)["checks"]
    assert d3["verdict"] == d4["verdict"] == "inconclusive"
    assert "this is a logsnr run" in d3["reason"] and d4["values"]["measured_verdict"] in ("holds", "fails",
                                                                                          "inconclusive")


def test_samples_that_blow_up_are_a_verdict_not_bad_input(runs, tmp_path, capsys):
    d = torch.load(runs["consensus"], weights_only=True)
    last = max(k for k in d["model"]["state"] if k.endswith(".weight"))
    d["model"]["state"][last] = d["model"]["state"][last] * 1e30  # finite parameters, exploding samples
    torch.save(d, tmp_path / "big.pt")
    # the stored validation losses are no longer the model's: a tampered file is refused first
    assert main(["check-diffusion", str(tmp_path / "big.pt")]) == 2
    assert "last-round validation losses" in capsys.readouterr().err
    from hcdiag.checks.diffusion import run_diffusion_checks
    from hcdiag.diffusion.model import Tables
    from hcdiag.diffusion.runfile import validate
    from hcdiag.diffusion.train import validation_loss

    run = validate(d)  # the producer's own record of the exploded model (losses recomputed): consistent, so checked
    last_round = d["rounds"][-1]
    xv = run.x[run.val_rows].float()
    vals = [validation_loss(run.model, xv, Tables(run.schedules[int(a)]), int(a), draws=run.config.val_draws,
                            seed=run.config.seed + 2) for a in last_round["active"]]
    last_round["val_loss"] = torch.tensor(vals, dtype=torch.float64)
    order = sorted(range(len(vals)), key=lambda i: (vals[i], int(last_round["active"][i])))
    last_round["kept"] = torch.tensor(sorted(int(last_round["active"][i]) for i in order[:len(vals) // 2]))
    res = {r.id: r for r in run_diffusion_checks(validate(d), select=["D3", "D4"], n_samples=60)}
    assert res["D3"].verdict == "fails" and "diverge" in res["D3"].summary
    # D4 reads the reverse process of a model that has learned nothing (its loss is far above the data-free
    # predictor's): no evidence about schedules; D3 compares methods, and the run's own samples diverging is a result
    assert res["D4"].verdict == "inconclusive" and "has not learned the data" in res["D4"].reason
    assert res["D4"].values["competence"]["model_loss"] > res["D4"].values["competence"]["data_free_loss"]


def test_ddim_sampler_draws_the_samples_of_d4(runs, capsys):
    assert main(["check-diffusion", str(runs["logsnr"]), "--only", "D4", "--sampler", "ddim", "--ddim-steps", "20",
                 "--samples", "60", "--format", "json"]) in (0, 1)
    d4 = json.loads(capsys.readouterr().out)["checks"][0]
    assert d4["values"]["sampler"] == "ddim" and len(d4["values"]["unseen"]) == 4


def test_resume_from_the_command_line_finishes_the_run_bitwise(tmp_path):
    whole = _train(tmp_path, "whole.pt", "--method", "single")
    ds = synthetic(n=600, dim=2, k=4, spread=0.3, separation=2)
    data = prepare(ds)
    cfg = load_diffusion_run(whole).config
    part = tmp_path / "part.pt"

    class Stop(Exception):
        pass

    def stop(p):
        save_diffusion_run(p, part, data)
        raise Stop

    with pytest.raises(Stop):
        train_diffusion(data.x, cfg, checkpoint=stop, checkpoint_steps=7)
    assert not load_diffusion_run(part).complete
    assert main(["train-diffusion", "synthetic", *FAST, "--method", "single", "--out", str(part), "--resume"]) == 0
    a, b = load_diffusion_run(whole), load_diffusion_run(part)
    assert b.complete and all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                                  b.model.state_dict().values()))


@pytest.mark.parametrize("argv,msg", [
    (["train-diffusion", "digits", "--dim", "3", "--out", "{tmp}/a.pt"], "--dim apply to the synthetic data only"),
    (["train-diffusion", "synthetic", "--R", "6", "--out", "{tmp}/a.pt"], "Algorithm 2 needs R = 2^k >= 4"),
    (["train-diffusion", "synthetic", "--out", "{tmp}/no/a.pt"], "the folder"),
    (["train-diffusion", "synthetic", "--out", "{consensus}"], "already exists; pass --resume"),
    (["train-diffusion", "synthetic", *FAST, "--out", "{consensus}", "--resume"], "is a complete run; there is nothing"),
    (["check-diffusion", "{tmp}/none.pt"], "no such file"),
    (["check-diffusion", "{consensus}", "--only", "D9"], "--only must list check ids among D1, D2, D3, D4"),
    (["check-diffusion", "{consensus}", "--ddim-steps", "5"], "--ddim-steps applies to --sampler ddim only"),
    (["check-diffusion", "{consensus}", "--only", "D1", "--require", "D3"], "--require names ['D3']"),
    (["check-diffusion", "{consensus}", "--against", "{other}"], "trained on other data"),
    (["check-diffusion", "{vae}"], "not a diffusion run file"),
    (["check-diffusion", "{consensus}", "--against", "{consensus}"], "is a consensus run; D3's controls are single"),
    (["check-diffusion", "{consensus}", "--against", "{longer}"], "differs from the run in lr; controls must share"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, argv, msg):
    other = _train(tmp_path, "other.pt", "--data-seed", "3", "--method", "single") if "{other}" in argv else None
    longer = _train(tmp_path, "longer.pt", "--method", "single", "--lr", "0.002") if "{longer}" in argv else None
    vae = tmp_path / "vae.pt"
    torch.save({"format": "hcdiag-run"}, vae)
    sub = {"tmp": tmp_path, "consensus": runs["consensus"], "other": other, "vae": vae, "longer": longer}
    argv = [a.format(**sub) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_d3_is_inconclusive_when_a_control_has_not_learned_and_decided_when_only_the_run_has_not(runs, monkeypatch):
    """Beating a control that learned nothing is no evidence (inconclusive, even when the run's own samples
    diverge); a run of Algorithm 2 that learned nothing where its controls did is a result (D3 decides it), while
    D1 reads nothing from it."""
    import hcdiag.checks.diffusion as CD

    real = CD.competence
    ctl = {m: load_diffusion_run(runs[m]) for m in ("single", "logsnr")}  # named by method, as verify names them
    run = load_diffusion_run(runs["consensus"])

    def unlearned(of):
        def fake(model, *a, **k):
            out = real(model, *a, **k)
            return {**out, "learned": False} if model is of else out
        return fake

    monkeypatch.setattr(CD, "competence", unlearned(ctl["single"].model))
    res = {r.id: r for r in CD.run_diffusion_checks(run, select=["D1", "D3"], controls=ctl, n_samples=100)}
    assert res["D3"].verdict == "inconclusive" and "the single control has not learned the data" in res["D3"].reason
    assert res["D1"].values["competence"]["learned"]  # the run itself did learn: D1 measured it
    monkeypatch.setattr(CD.DiffusionContext, "home_diverged", lambda self: "512 of 512 sample rows beyond 1e3")
    res = {r.id: r for r in CD.run_diffusion_checks(run, select=["D3"], controls=ctl, n_samples=100)}
    assert res["D3"].verdict == "inconclusive" and "has not learned" in res["D3"].reason
    monkeypatch.setattr(CD, "competence", unlearned(run.model))
    res = {r.id: r for r in CD.run_diffusion_checks(run, select=["D1", "D3"], controls=ctl, n_samples=100)}
    assert res["D1"].verdict == "inconclusive" and "has not learned the data" in res["D1"].reason
    assert res["D3"].verdict == "fails" and "diverge" in res["D3"].summary  # decided: the controls learned
