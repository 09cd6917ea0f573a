"""Diffusion run files (hcdiag.diffusion.runfile): a round trip that rebuilds the same denoiser, and one line for
every inconsistent or hostile file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hcdiag.diffusion.runfile import FORMAT, load_diffusion_run, run_dict, save_diffusion_run, validate
from hcdiag.diffusion.train import DiffusionConfig, train_diffusion
from hcdiag.errors import InputError

SMALL = dict(widths=(16,), emb_dim=8, batch_size=32, val_rows=64, val_draws=2, T=100)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    out = train_diffusion(x, DiffusionConfig(method="consensus", R=4, epochs_per_round=3, **SMALL))
    return x, out, {"name": "gauss", "n": 300, "d": 2, "lambda_max": 1.0}


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
    (lambda d: d.update(val_rows=d["train_rows"][:3].clone()), "train_rows and val_rows overlap"),
    (lambda d: d.update(train_rows=[1, 2]), "train_rows must be a 1-D int64 tensor; got list"),
    (lambda d: d.pop("data"), "run.data is missing"),
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
        save_diffusion_run(out, tmp_path / "d.pt", {**data, "d": 5})
    assert sorted(os.listdir(tmp_path)) == ["file"]
