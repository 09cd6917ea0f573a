"""Baselines save checkpoints during training (not only at the end): a run killed after any epoch's save and
resumed is bitwise the uninterrupted run, for every baseline (each keeps other state: Adam moments, the
aggressive baseline's MI record and switch, the EM-type E-step's two optimizers)."""

import numpy as np
import pytest
import torch

from hcdiag.errors import InputError
from hcdiag.train import Trainer, make_config
from hcdiag.train.writer import RunWriter

TINY = dict(enc_widths=(16,), dec_widths=(16,), latent_dim=3, batch_size=200, epochs=5, r0=4, k=3,
            em_backend="sklearn", eval_rows=200, references=("collapsed",), baseline_snapshots=2)
METHODS = {
    "vanilla": {},
    "beta": {"kl_weight": 2.0},
    "anneal": {"anneal_epochs": 3},
    "freebits": {"free_bits": 0.2},
    "aggressive": {"aggressive_max_inner": 6, "aggressive_check_every": 2},
    "em-type": {"em_max_e_steps": 6, "em_check_every": 2},
    "teacher": {},
}


def _data(seed, n=600, d=6, k=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, size=(k, d))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)


def _killed_after(n_saves: int, monkeypatch, fn):
    """Run ``fn`` with RunWriter.save raising KeyboardInterrupt right after its ``n_saves``-th save; returns the
    positions of the saves made."""
    real, seen = RunWriter.save, []

    def dying_save(self, model, opt, state, position, complete=False):
        real(self, model, opt, state, position, complete)
        seen.append(dict(position))
        if len(seen) == n_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "save", dying_save)
    try:
        with pytest.raises(KeyboardInterrupt):
            fn()
    finally:
        monkeypatch.setattr(RunWriter, "save", real)
    return seen


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["snapshot_order"] == b["snapshot_order"]
    for name in a["snapshot_order"]:
        for k, v in a["snapshots"][name].items():
            assert torch.equal(v, b["snapshots"][name][k]), (name, k)
    assert set(a["history"]) == set(b["history"])
    for k, v in a["history"].items():
        torch.testing.assert_close(v, b["history"][k], rtol=0, atol=0, equal_nan=True, msg=k)
    for name, ref in a["references"].items():
        for k, v in ref["state"].items():
            assert torch.equal(v, b["references"][name]["state"][k]), (name, k)
    assert a.get("aggressive") is None or (
        a["aggressive"]["ended_epoch"] == b["aggressive"]["ended_epoch"]
        and torch.equal(a["aggressive"]["mi"], b["aggressive"]["mi"]))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_baseline_killed_after_an_epoch_resumes_bitwise(method, seed, tmp_path, monkeypatch, one_thread):
    kill_at = 1 + seed % 3  # the save after epoch 1, 2 or 3 of 5
    cfg = make_config(None, seed=seed, method=method, **{**TINY, **METHODS[method]})
    x = _data(seed)
    full = Trainer(cfg, x, tmp_path / "full.pt", checkpoint_seconds=0).run()
    seen = _killed_after(kill_at, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "part.pt", checkpoint_seconds=0).run())
    assert seen == [{"stage": "baseline", "epoch": e} for e in range(1, kill_at + 1)]
    from hcdiag.runfile import load_run

    part = load_run(tmp_path / "part.pt", partial=True)
    assert not part.complete and part.data["status"]["stage"] == "baseline"
    assert len(part.data["history"]["step"]) == kill_at + 1  # the init row and one per epoch trained
    resumed = Trainer(cfg, x, tmp_path / "part.pt", checkpoint_seconds=0).run(resume=True)
    assert resumed["status"]["complete"]
    _assert_same_run(full, resumed)


def test_checkpoints_are_spaced_by_checkpoint_seconds(seed, tmp_path, monkeypatch, one_thread):
    """With a long interval a run saves only when it ends (the references' position); with 0, after every
    epoch but the last (the end's save follows it at once)."""
    cfg = make_config(None, seed=seed, method="vanilla", **TINY)
    x = _data(seed)
    for every, want in ((1e9, []), (0, [1, 2, 3, 4])):
        real, seen = RunWriter.save, []

        def spy(self, model, opt, state, position, complete=False):
            seen.append(dict(position))
            real(self, model, opt, state, position, complete)

        monkeypatch.setattr(RunWriter, "save", spy)
        Trainer(cfg, x, tmp_path / f"r{every}.pt", checkpoint_seconds=every).run()
        monkeypatch.setattr(RunWriter, "save", real)
        assert [p["epoch"] for p in seen if p["stage"] == "baseline"] == want
        assert seen[-1]["stage"] == "references"


def test_a_killed_em_type_run_keeps_its_epochs_and_the_inner_steps_series(seed, tmp_path, monkeypatch, one_thread):
    """What the partial file holds is what was trained: the history's rows (inner steps included) up to the save,
    the snapshots taken so far, and both optimizers' moments."""
    cfg = make_config(None, seed=seed, method="em-type", **{**TINY, **METHODS["em-type"]})
    x = _data(seed)
    _killed_after(3, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run())
    from hcdiag.runfile import load_run

    data = load_run(tmp_path / "p.pt", partial=True).data
    assert data["history"]["epoch"].tolist() == [0, 1, 2, 3]
    inner = data["history"]["inner_steps"]
    assert torch.isnan(inner[0]) and bool((inner[1:] >= 2).all() and (inner[1:] <= 6).all())
    assert data["snapshot_order"] == ["init", "epoch2"]  # marks at round(2.5) = 2 and 5 of 5 (5 is final)
    saved = data["resume"]["optimizer"]
    assert set(saved) == {"enc", "dec"} and saved["enc"]["state"] and saved["dec"]["state"]


@pytest.mark.parametrize("epoch", [0, 5, 99, -1, "2", True, None])
def test_a_checkpoint_at_an_impossible_epoch_is_refused_in_one_line(epoch, seed, tmp_path, monkeypatch, one_thread):
    cfg = make_config(None, seed=seed, method="vanilla", **TINY)
    x = _data(seed)
    _killed_after(1, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run())
    data = torch.load(tmp_path / "p.pt", weights_only=False)
    data["resume"]["position"]["epoch"] = epoch
    torch.save(data, tmp_path / "p.pt")
    before = (tmp_path / "p.pt").read_bytes()
    with pytest.raises(InputError, match=r"^resume: .*p\.pt holds a checkpoint after epoch .*, outside this run's "
                                         r"epochs 1\.\.4 \(a damaged or edited file\); train it again with "
                                         r"overwrite=True\.$"):
        Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run(resume=True)
    assert (tmp_path / "p.pt").read_bytes() == before  # nothing lost
