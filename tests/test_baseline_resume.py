"""Baselines save checkpoints during training (not only at the end): a run killed after any epoch's save and
resumed is bitwise the uninterrupted run, for every baseline (each keeps other state: Adam moments, the
aggressive baseline's MI record and switch, the EM-type E-step's two optimizers)."""

import re

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


def _edited_partial(tmp_path, monkeypatch, seed, method="vanilla", saves=2):
    """A partial run killed after ``saves`` checkpoints, its config and data, and the file as a dict."""
    cfg = make_config(None, seed=seed, method=method, **{**TINY, **METHODS[method]})
    x = _data(seed)
    _killed_after(saves, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run())
    return cfg, x, torch.load(tmp_path / "p.pt", weights_only=False)


def _refused(tmp_path, cfg, x, data, pattern):
    torch.save(data, tmp_path / "p.pt")
    before = (tmp_path / "p.pt").read_bytes()
    with pytest.raises(InputError, match=pattern) as err:
        Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run(resume=True)
    assert "\n" not in str(err.value)
    assert (tmp_path / "p.pt").read_bytes() == before  # nothing lost


@pytest.mark.parametrize("epoch", [0, 5, 99, -1, "2", 2.0, True, None, 1, 3])
def test_a_checkpoint_at_an_impossible_position_is_refused_in_one_line(epoch, seed, tmp_path, monkeypatch, one_thread):
    """The position must be the epoch the stream and the history were saved at (2 here): an edited epoch, in
    range or not, would train a run whose history repeats or skips epochs."""
    cfg, x, data = _edited_partial(tmp_path, monkeypatch, seed)
    data["resume"]["position"]["epoch"] = epoch
    _refused(tmp_path, cfg, x, data, r"^resume: .*p\.pt holds a checkpoint that cannot be this run's \(after epoch "
                                     + re.escape(repr(epoch)) + r" of 5, stream at epoch 2, 3 history rows, optimizer "
                                     r"state saved\): a damaged or edited file; train it again with overwrite=True\.$")


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["resume"].update(optimizer=None), r"optimizer state missing\): a damaged"),
    (lambda d: d["resume"].update(history_rows=2), r"2 history rows"),
    (lambda d: d["resume"].update(optimizer={}), r"whose training state cannot be restored \(KeyError: 'opt'\)"),
    (lambda d: d["resume"]["position"].update(stage="stage2"),
     r"holds a checkpoint of stage 'stage2', which the vanilla method does not have"),
    (lambda d: d["resume"].pop("position"), r"holds a checkpoint without a readable position"),
    (lambda d: d["resume"].update(position="baseline"), r"holds a checkpoint without a readable position"),
])
def test_an_edited_checkpoint_is_refused_in_one_line(edit, pattern, seed, tmp_path, monkeypatch, one_thread):
    cfg, x, data = _edited_partial(tmp_path, monkeypatch, seed)
    edit(data)
    _refused(tmp_path, cfg, x, data, r"^resume: .*p\.pt .*" + pattern)


@pytest.mark.parametrize("method, edit", [
    ("aggressive", lambda d: d["resume"]["optimizer"].pop("on")),
    ("aggressive", lambda d: d["resume"]["optimizer"].update(mis="abc")),
    ("em-type", lambda d: d["resume"]["optimizer"].update(dec=d["resume"]["optimizer"]["enc"])),
])
def test_an_edited_method_state_is_refused_in_one_line(method, edit, seed, tmp_path, monkeypatch, one_thread):
    cfg, x, data = _edited_partial(tmp_path, monkeypatch, seed, method=method)
    edit(data)
    _refused(tmp_path, cfg, x, data, r"^resume: .*p\.pt holds a checkpoint whose training state cannot be restored "
                                     r"\(\w+: .*\); a damaged or edited file: train it again with overwrite=True\.$")


def test_resumed_runs_add_up_their_training_time(seed, tmp_path, monkeypatch, one_thread):
    """timings.baseline of a run killed and resumed is the time of both calls (it was the last call's only)."""
    import time as _time

    from hcdiag.train.methods import vae

    cfg = make_config(None, seed=seed, method="vanilla", **TINY)
    x = _data(seed)
    real = vae.Vanilla.epoch_terms

    def slow(self, *a, **k):  # every epoch takes >= 0.2 s, so the two calls' shares are measurable
        _time.sleep(0.2)
        return real(self, *a, **k)

    monkeypatch.setattr(vae.Vanilla, "epoch_terms", slow)
    _killed_after(3, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run())
    from hcdiag.runfile import load_run

    part = load_run(tmp_path / "p.pt", partial=True).data
    assert part["timings"]["baseline"] >= 3 * 0.2 and "stage0_em" in part["timings"]
    run = Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run(resume=True)
    assert run["timings"]["baseline"] >= 5 * 0.2  # 3 epochs before the kill, 2 after
    assert run["timings"]["stage0_em"] == part["timings"]["stage0_em"]  # fitted once, before the kill


def test_an_older_hcdiag_refuses_to_resume_a_new_checkpoint(seed, tmp_path, monkeypatch, one_thread):
    """Before per-epoch checkpoints a baseline resumed by training from scratch onto the saved rows; such an
    hcdiag writes no config.resume_format, so a new file differs from its config and it refuses (the config check
    names the key). Here the older hcdiag is simulated by a config without the key."""
    from hcdiag.train.trainer import Trainer as T

    cfg, x, data = _edited_partial(tmp_path, monkeypatch, seed)
    assert data["config"]["resume_format"] == 2
    torch.save(data, tmp_path / "p.pt")
    real = T.config_dict

    def old_config(self):
        c = real(self)
        c.pop("resume_format")
        return c

    monkeypatch.setattr(T, "config_dict", old_config)
    with pytest.raises(InputError, match=r"written with another config \(keys differ: resume_format\)"):
        T(cfg, x, tmp_path / "p.pt").run(resume=True)
    monkeypatch.setattr(T, "config_dict", real)
    # and a file without the key (as an older hcdiag wrote them) is resumed by this one, to the uninterrupted run
    data["config"].pop("resume_format")
    torch.save(data, tmp_path / "p.pt")
    resumed = T(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run(resume=True)
    full = T(cfg, x, tmp_path / "full.pt", checkpoint_seconds=0).run()
    assert resumed["config"]["resume_format"] == 2
    _assert_same_run(full, resumed)


@pytest.mark.parametrize("method", ["vanilla", "hct"])
def test_a_checkpoint_of_another_device_is_refused_in_one_line(method, seed, tmp_path, monkeypatch, one_thread):
    """Its noise generator's saved state is of that device's kind (a CUDA Philox state does not load into a CPU
    generator): resuming a GPU checkpoint here would raise from torch, not continue."""
    kw = {**TINY, **METHODS.get(method, {})}
    if method == "hct":
        kw.update(references=(), epochs_per_round=1, steps_per_clustering=2, refine_cap=2, stage3_epochs=1)
    cfg = make_config(None, seed=seed, method=method, **kw)
    x = _data(seed)
    _killed_after(1, monkeypatch, lambda: Trainer(cfg, x, tmp_path / "p.pt", checkpoint_seconds=0).run())
    data = torch.load(tmp_path / "p.pt", weights_only=False)
    data["config"]["device"] = "cuda:0"
    _refused(tmp_path, cfg, x, data, r"^resume: .*p\.pt was trained on cuda, and its saved random streams belong to "
                                     r"that device; resume it there \(device='cuda'\) or train it again here with "
                                     r"overwrite=True\.$")
