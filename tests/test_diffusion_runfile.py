"""Diffusion run files (hcdiag.diffusion.runfile): a round trip that rebuilds the same denoiser, and one line for
every inconsistent or hostile file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hcdiag.diffusion.data import DiffusionData
from hcdiag.diffusion.runfile import FORMAT, load_diffusion_run, run_dict, save_diffusion_run, validate
from hcdiag.diffusion.train import DiffusionConfig, train_diffusion
from hcdiag.errors import InputError

SMALL = dict(widths=(16,), emb_dim=8, batch_size=32, val_rows=64, val_draws=2, T=100)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    out = train_diffusion(x, DiffusionConfig(method="consensus", R=4, epochs_per_round=3, **SMALL))
    return x, out, DiffusionData(x, {"name": "gauss", "center": [0.0, 0.0], "scale": 1.0})


def test_round_trip_rebuilds_the_same_denoiser(trained, tmp_path):
    x, out, data = trained
    p = save_diffusion_run(out, tmp_path / "d.pt", data)
    run = load_diffusion_run(p)
    assert run.config == out["config"] and run.steps == out["steps"] and run.complete
    assert [s.spec for s in run.schedules] == [s.spec for s in out["schedules"]]
    xt, t = torch.randn(5, 2), torch.tensor([1, 10, 50, 99, 100])
    ls, r = torch.zeros(5), torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        assert torch.equal(run.model(xt, t, ls, r), out["model"](xt, t, ls, r))
    assert run.rounds[0]["kept"].tolist() == out["rounds"][0]["kept"]
    assert torch.equal(run.train_rows, torch.as_tensor(out["train_rows"]))
    assert torch.equal(run.x, torch.as_tensor(x)) and run.spec == data.spec and run.resume is None
    assert [f for f in os.listdir(tmp_path) if f != "d.pt"] == []  # no temporary left


def _bad(trained, change):
    x, out, data = trained
    d = run_dict(out, data)
    change(d)
    return d


@pytest.mark.parametrize("change,msg", [
    (lambda d: d.update(format="hcdiag-run"), f"not a diffusion run file (format 'hcdiag-run', expected '{FORMAT}')"),
    (lambda d: d.update(version=9), "version 9 is not one this hcdiag reads"),
    (lambda d: d["config"].update(speed=3), "config has unknown key(s) speed"),
    (lambda d: d["config"].update(R=3), "config: Algorithm 2 needs R = 2^k >= 4"),
    (lambda d: d["schedules"][1].update(beta_end=0.5), "schedules[1] "),
    (lambda d: d["model"]["config"].update(dim=3), "model.config has dim 3"),
    (lambda d: d["model"]["state"].pop("net.0.weight"), "model cannot be rebuilt"),
    (lambda d: d["rounds"][0].update(kept=torch.tensor([7])), "rounds[0].kept holds indices outside 0..3"),
    (lambda d: d.update(val_rows=d["train_rows"][:3].clone()), "train_rows, val_rows and test_rows overlap"),
    (lambda d: (d.update(train_rows=torch.cat([d["train_rows"][8:], d["test_rows"][:8]]).sort().values,
                         test_rows=torch.cat([d["test_rows"][8:], d["train_rows"][:8]]).sort().values)),
     "row split is not the one its config's seed makes"),
    (lambda d: d["model"]["config"].update(conditioning="logsnr"), "model.config.conditioning 'logsnr' is not what"),
    (lambda d: d["model"]["config"].update(widths=[1] * 3), "model.config's widths and emb_dim"),
    (lambda d: d["config"].update(widths=5), "The 'widths' parameter must be 1 to 64 integers"),
    (lambda d: d["config"].update(widths=[10**9]), "The 'widths' parameter must be 1 to 64 integers"),
    (lambda d: d["config"].update(spread="x"), "The 'spread' parameter must be a finite number >= 1"),
    (lambda d: d["config"].update(spread=float("inf")), "The 'spread' parameter must be a finite number >= 1"),
    (lambda d: d["config"].update(R=2**20), "R <= 1024, emb_dim <= 65536"),
    (lambda d: d["rounds"][0].update(kept=torch.tensor([], dtype=torch.int64)), "rounds[0] does not follow Algorithm 2"),
    (lambda d: d["rounds"][0].update(active=torch.tensor([0, 1, 3], dtype=torch.int64), kept=torch.tensor([1]),
                                     val_loss=torch.zeros(3, dtype=torch.float64)), "rounds[0] does not follow"),
    (lambda d: d.update(train_rows=[1, 2]), "train_rows must be a 1-D int64 tensor; got list"),
    (lambda d: d.pop("data"), "run.data is missing"),
    (lambda d: d.update(version=1), "version 1 diffusion run files do not hold the rows"),
    (lambda d: d["data"].update(x=d["data"]["x"].double()), "data.x must be the (n, d) float32 tensor"),
    (lambda d: d["data"]["x"].__setitem__((0, 0), float("nan")), "data.x holds NaN or inf"),
    (lambda d: d["data"].update(n=torch.tensor([1, 2])), "data.n and data.d (tensor"),
    (lambda d: d["data"].update(spec=[1]), "data.spec must be a dict; got list"),
    (lambda d: d.update(config=[1]), "run.config must be a dict; got list"),
    (lambda d: d["config"].update(lr="fast"), "config: The 'lr' parameter must be a finite number > 0. Got 'fast'"),
    (lambda d: d["config"].update(T=[1]), "config: The 'T' parameter must be an integer >= 1. Got [1]"),
    (lambda d: d.update(steps=5), "the run says it is complete but took 5 of its 12 steps"),
    (lambda d: d.update(steps=-1), "steps -1 and budget 12 must be integers"),
    (lambda d: d.update(budget=10**6), "budget 1000000 must be integers"),
    (lambda d: d["status"].update(complete="yes"), "status.complete must be true or false; got 'yes'"),
    (lambda d: d.update(rounds=[]), "a complete consensus run has 1 rounds"),
    (lambda d: d.update(resume={"optimizer": {}}), "a complete run holds no resume state"),
    (lambda d: d["status"].update(complete=False), "a partial run file (status.complete false) must hold its resume"),
    (lambda d: (d["status"].update(complete=False), d.update(resume={"generator": 1})), "resume.optimizer is missing"),
    (lambda d: (d["status"].update(complete=False), d.update(steps=4, rounds=[], resume={
        "optimizer": {}, "generator": torch.Generator().get_state(),
        "position": {"active": [0, 1, 2, 9], "cycle": 1, "loss_sum": 1.0, "loss_count": 4, "steps": 4}})),
     "resume.position is inconsistent"),
    (lambda d: (d["status"].update(complete=False), d.update(steps=4, rounds=[], resume={
        "optimizer": {}, "generator": torch.Generator().get_state(),
        "position": {"active": [0, 1, 2, 3], "cycle": "x", "loss_sum": 1.0, "loss_count": 4, "steps": 4}})),
     "resume.position is inconsistent"),
    (lambda d: (d["status"].update(complete=False), d.update(steps=4, rounds=[], resume={
        "optimizer": {}, "generator": torch.Generator().get_state(),
        "position": {"active": [0, 1, 2, 3], "cycle": 1, "loss_sum": float("nan"), "loss_count": 4, "steps": 4}})),
     "resume.position is inconsistent"),
])
def test_inconsistent_files_get_one_line(trained, tmp_path, change, msg):
    d = _bad(trained, change)
    with pytest.raises(InputError) as e:
        validate(d)
    assert msg in str(e.value) and "\n" not in str(e.value)
    p = tmp_path / "bad.pt"
    torch.save(d, p)
    with pytest.raises(InputError) as e:
        load_diffusion_run(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


def test_hostile_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_diffusion_run(tmp_path / "none.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(InputError, match="is not a torch file"):
        load_diffusion_run(tmp_path / "text.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a diffusion run file"):
        load_diffusion_run(tmp_path / "list.pt")


def test_a_write_that_cannot_happen_leaves_nothing(trained, tmp_path):
    x, out, data = trained
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        save_diffusion_run(out, tmp_path / "file" / "d.pt", data)
    with pytest.raises(InputError, match="refusing to write"):
        save_diffusion_run(out, tmp_path / "d.pt", DiffusionData(data.x[:, :1], data.spec))
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("method", ["consensus", "single", "logsnr"])
def test_an_interrupted_run_resumed_from_its_file_is_bitwise_the_uninterrupted_one(method, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    data = DiffusionData(x, {"name": "gauss"})
    cfg = DiffusionConfig(method=method, R=8, epochs_per_round=3, **SMALL)
    whole = train_diffusion(x, cfg)
    saved = []

    def checkpoint(partial):
        saved.append(save_diffusion_run(partial, tmp_path / f"c{len(saved)}.pt", data))

    class Stop(Exception):
        pass

    def stop_at_third(partial):
        checkpoint(partial)
        if len(saved) == 3:
            raise Stop

    with pytest.raises(Stop):
        train_diffusion(x, cfg, checkpoint=stop_at_third, checkpoint_steps=5)
    part = load_diffusion_run(saved[-1])
    assert not part.complete and 0 < part.steps < part.budget
    done = train_diffusion(x, cfg, resume=part.resume_state(), checkpoint_steps=5)
    assert done["steps"] == whole["steps"] == cfg.budget()
    for (k, a), b in zip(whole["model"].state_dict().items(), done["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert done["history"] == whole["history"] and done["rounds"] == whole["rounds"]
    p = save_diffusion_run(done, tmp_path / "done.pt", data)
    assert load_diffusion_run(p).complete


def test_a_complete_run_cannot_be_resumed(trained, tmp_path):
    x, out, data = trained
    run = load_diffusion_run(save_diffusion_run(out, tmp_path / "d.pt", data))
    with pytest.raises(InputError, match="is complete; there is nothing to resume"):
        run.resume_state()


def test_a_non_finite_loss_stops_training_with_a_numerical_error():
    from hcdiag.errors import NumericalError

    x = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    with pytest.raises(NumericalError, match="the diffusion training loss became"):
        train_diffusion(x, DiffusionConfig(method="single", R=4, epochs_per_round=2, lr=1e30, **SMALL))
