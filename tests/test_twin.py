"""A baseline under `literal` and under `scaled` is one training (hcdiag.train.twin): the run relabelled from the
other convention's run is, tensor by tensor, the run trained from scratch; anything else is trained."""

import numpy as np
import pytest
import torch

from hcdiag.train import Trainer, make_config
from hcdiag.train.twin import relabel, shareable, twin_loss

TINY = dict(enc_widths=(16,), dec_widths=(16,), latent_dim=3, batch_size=200, epochs=3, r0=4, k=3,
            em_backend="sklearn", eval_rows=200, references=("collapsed",), baseline_snapshots=2)
METHODS = {"vanilla": {}, "beta": {"kl_weight": 2.0}, "anneal": {"anneal_epochs": 2},
           "aggressive": {"aggressive_max_inner": 4, "aggressive_check_every": 2},
           "em-type": {"em_max_e_steps": 4, "em_check_every": 2}, "teacher": {}}


def _data(seed, n=600, d=6, k=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, size=(k, d))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)


def _same(a, b, where="run"):
    """Deep equality: tensors bitwise (NaN equal to NaN), everything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_relabelled_run_is_the_run_trained_from_scratch(method, seed, tmp_path, one_thread):
    from hcdiag.runfile import load_run

    x = _data(seed)
    src_loss = ("literal", "scaled")[seed % 2]  # either direction
    cfg = {c: make_config(None, seed=seed, method=method, loss=c, **{**TINY, **METHODS[method]})
           for c in ("literal", "scaled")}
    Trainer(cfg[src_loss], x, tmp_path / "src.pt").run()
    dst = twin_loss(src_loss)
    Trainer(cfg[dst], x, tmp_path / "trained.pt").run()
    got = relabel(Trainer(cfg[dst], x, tmp_path / "relabelled.pt"), tmp_path / "src.pt", tmp_path / "relabelled.pt")
    assert got is not None and got["config"]["loss"] == dst
    a, b = load_run(tmp_path / "trained.pt").data, load_run(tmp_path / "relabelled.pt").data
    a.pop("timings"), b.pop("timings")
    _same(a, b)
    # and the two conventions' runs differ in what names the convention, nothing else of the config
    s = load_run(tmp_path / "src.pt").data["config"]
    assert s["loss"] == src_loss and s["train"]["loss"] == src_loss and \
           s["fingerprint"]["settings"] != b["config"]["fingerprint"]["settings"]


def test_what_is_not_the_same_training_is_not_relabelled(seed, tmp_path, one_thread):
    from hcdiag.runfile import load_run

    x = _data(seed)
    base = dict(seed=seed, method="vanilla", **TINY)
    Trainer(make_config(None, loss="scaled", **base), x, tmp_path / "src.pt").run()

    def try_(out, **kw):
        cfg = make_config(None, **{**base, "loss": "literal", **kw})
        return relabel(Trainer(cfg, x, out), tmp_path / "src.pt", out)

    assert try_(tmp_path / "a.pt", epochs=4) is None  # another setting
    assert try_(tmp_path / "b.pt", seed=seed + 1) is None  # another seed
    assert relabel(Trainer(make_config(None, **{**base, "loss": "literal"}), x[:500], tmp_path / "c.pt"),
                   tmp_path / "src.pt", tmp_path / "c.pt") is None  # other data
    assert relabel(Trainer(make_config(None, **{**base, "loss": "literal"}), x, tmp_path / "d.pt"),
                   tmp_path / "missing.pt", tmp_path / "d.pt") is None  # no twin
    assert relabel(Trainer(make_config(None, **{**base, "loss": "scaled"}), x, tmp_path / "e.pt"),
                   tmp_path / "src.pt", tmp_path / "e.pt") is None  # the same convention is not a twin
    assert relabel(Trainer(make_config(None, **{**base, "loss": "mean"}), x, tmp_path / "f.pt"),
                   tmp_path / "src.pt", tmp_path / "f.pt") is None  # mean is another objective
    (tmp_path / "junk.pt").write_bytes(b"not a run file")
    assert try_(tmp_path / "g.pt") is not None and (tmp_path / "g.pt").is_file()  # the control: same settings
    assert relabel(Trainer(make_config(None, **{**base, "loss": "literal"}), x, tmp_path / "h.pt"),
                   tmp_path / "junk.pt", tmp_path / "h.pt") is None  # unreadable
    assert not any((tmp_path / f"{n}.pt").exists() for n in "abcdefh")  # nothing written when refused
    # a partial twin (killed during training) is not relabelled
    data = load_run(tmp_path / "src.pt").data
    data["status"] = {"complete": False, "stage": "baseline", "error": None}
    torch.save(data, tmp_path / "partial.pt")
    assert relabel(Trainer(make_config(None, **{**base, "loss": "literal"}), x, tmp_path / "i.pt"),
                   tmp_path / "partial.pt", tmp_path / "i.pt") is None


def test_only_methods_without_a_clustering_term_are_shareable():
    assert shareable("vanilla", "literal") and shareable("em-type", "scaled") and shareable("teacher", "literal")
    assert not shareable("hct", "literal") and not shareable("hct", "scaled")
    assert not shareable("vanilla", "mean")


def test_relabel_never_replaces_an_existing_file_or_writes_a_locked_one(seed, tmp_path, one_thread):
    """A run begun at ``out`` is the trainer's to resume or refuse; a locked ``out`` is another writer's."""
    from hcdiag.atomic import OutputLock

    x = _data(seed)
    base = dict(seed=seed, method="vanilla", **TINY)
    Trainer(make_config(None, loss="scaled", **base), x, tmp_path / "src.pt").run()
    lit = make_config(None, loss="literal", **base)
    (tmp_path / "begun.pt").write_bytes(b"a partial run of other settings")
    assert relabel(Trainer(lit, x, tmp_path / "begun.pt"), tmp_path / "src.pt", tmp_path / "begun.pt") is None
    assert (tmp_path / "begun.pt").read_bytes() == b"a partial run of other settings"
    lock = OutputLock(tmp_path / "busy.pt", owner="train").acquire()
    try:
        assert relabel(Trainer(lit, x, tmp_path / "busy.pt"), tmp_path / "src.pt", tmp_path / "busy.pt") is None
        assert not (tmp_path / "busy.pt").exists()
    finally:
        lock.release()
    assert relabel(Trainer(lit, x, tmp_path / "busy.pt"), tmp_path / "src.pt", tmp_path / "busy.pt") is not None
