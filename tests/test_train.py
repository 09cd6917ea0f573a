"""The system under test: Historical Consensus Training and baselines, on tiny data."""

import numpy as np
import pytest
import torch

from hcdiag.errors import InputError, NumericalError
from hcdiag.models import build_model, encode_decode
from hcdiag.train import Trainer, _n_keep, _n_rounds, make_config

TINY = dict(enc_widths=(16,), dec_widths=(16,), latent_dim=3, batch_size=64, epochs=2, r0=4, k=3,
            em_backend="sklearn", epochs_per_round=2, steps_per_clustering=3, refine_cap=3, stage3_epochs=2,
            stage3_snapshots=2, eval_rows=200, references=("collapsed", "vanilla", "control"))


def _data(seed, n=600, d=6, k=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, size=(k, d))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)


def _naive_losses(xhat, centroids):
    R, K, _ = centroids.shape
    out = np.zeros(R)
    for r in range(R):
        out[r] = np.mean([min(np.sum((xh - centroids[r, k]) ** 2) for k in range(K)) for xh in xhat])
    return out


def test_hct_run_records_what_the_checks_need(seed, tmp_path):
    from hcdiag.runfile import load_run

    x = _data(seed)
    out = tmp_path / "run.pt"
    run = Trainer(make_config(None, seed=seed, **TINY), x, out).run()
    loaded = load_run(out)  # validated, weights_only
    assert loaded.data["status"]["complete"] is True and "resume" not in loaded.data
    cent = run["clusterings"]["centroids"].numpy().astype(np.float64)
    assert len(run["rounds"]) == 1  # 4 -> 2
    r = run["rounds"][0]
    # the recorded loss of EVERY clustering equals an independent evaluation of the round's snapshot (eq. 8)
    model = build_model(run["config"]["model"])
    model.load_state_dict(run["snapshots"][r["snapshot"]])
    _, _, xhat = encode_decode(model, run["eval"]["x"])
    np.testing.assert_allclose(r["losses"].numpy(), _naive_losses(xhat.numpy().astype(np.float64), cent), rtol=1e-4)
    # kept = the half of the active set with the smallest losses, ties by id; eps_t = their max
    naive_kept = sorted(sorted(range(4), key=lambda i: (float(r["losses"][i]), i))[:2])
    assert r["kept"].tolist() == naive_kept
    assert r["eps"] == pytest.approx(max(float(r["losses"][i]) for i in naive_kept))
    ref = run["refinement"]
    assert ref["pair"].tolist() == naive_kept and ref["epochs"] <= TINY["refine_cap"]
    model.load_state_dict(run["snapshots"]["refined"])
    _, _, xhat = encode_decode(model, run["eval"]["x"])
    l = _naive_losses(xhat.numpy().astype(np.float64), cent)
    assert ref["eps_T"] == pytest.approx(max(l[naive_kept]), rel=1e-4)
    assert ref["reached"] == (ref["eps_T"] < TINY.get("eps", 1e-4))
    assert run["stage3"]["clustering"] == naive_kept[0]
    order = run["snapshot_order"]
    assert order[0] == "init" and order[-1] == "final" and "round0" in order and "refined" in order
    assert set(run["references"]) == {"collapsed", "vanilla", "control"}
    assert run["references"]["collapsed"]["config"]["multiple"] == 10.0
    h = run["history"]
    assert h["losses"].shape == (len(h["step"]), 4) and torch.all(h["step"][1:] >= h["step"][:-1])
    np.testing.assert_allclose(run["eval"]["xbar"].numpy(), x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["vanilla", "beta", "anneal", "freebits", "aggressive"])
def test_baselines_write_valid_runs(method, tmp_path, seed):
    from hcdiag.runfile import load_run

    cfg = make_config(None, method=method, seed=seed, kl_weight=0.5, aggressive_inner=2,
                      **{**TINY, "references": ("collapsed",)})
    Trainer(cfg, _data(seed), tmp_path / "b.pt").run()
    run = load_run(tmp_path / "b.pt").data
    assert run["config"]["method"] == method and run["rounds"] == [] and run["refinement"] is None
    assert run["snapshot_order"][0] == "init" and run["snapshot_order"][-1] == "final"
    assert set(run["references"]) == {"collapsed"}


def test_simultaneous_step_sums_every_active_clustering(seed):
    """One simultaneous step's clustering term equals the naive sum over active clusterings of eq. 8."""
    from hcdiag.metrics import clustering_losses

    x = _data(seed)
    tr = Trainer(make_config(None, seed=seed, mode="simultaneous", **TINY), x, None)
    tr._setup()
    tr.centroids = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(seed))
    model = tr._new_model()
    g_idx, g_noise = tr._new_generators(seed)
    state = {"g_idx": g_idx, "g_noise": g_noise, "perm": None, "pos": 0, "step": 0, "epoch": 0}
    # replay the same batch and noise to get f, then compare the term with a naive loop
    g_i2, g_n2 = tr._new_generators(seed)
    st2 = {"g_idx": g_i2, "g_noise": g_n2, "perm": None, "pos": 0, "step": 0, "epoch": 0}
    xb = tr._batch(st2)
    with torch.no_grad():
        mu, lv = model.encode(xb)
        from hcdiag.losses import reparameterize

        f = model.decode(reparameterize(mu, lv, st2["g_noise"]))
    naive = sum(_naive_losses(f.numpy().astype(np.float64), tr.centroids[[i]].numpy().astype(np.float64))[0]
                for i in (0, 2, 3))
    terms = tr._step(model, torch.optim.SGD(model.parameters(), lr=0.0), state, torch.tensor([0, 2, 3]), 1.0, 1.0)
    assert float(terms[3]) == pytest.approx(naive, rel=1e-5)
    assert float(clustering_losses(f, tr.centroids[[0, 2, 3]]).sum()) == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("ids", [[1], [0, 2, 3]])
def test_cluster_term_gradient_is_that_of_the_min(seed, ids):
    """The term's gradient (closed form from the chosen centroids) equals autograd through a naive
    min over squared distances, in float64, for one clustering (cycle) and several (simultaneous)."""
    g = torch.Generator().manual_seed(seed)
    tr = Trainer.__new__(Trainer)
    tr.centroids, tr._centroid_cache = torch.randn(4, 5, 7, generator=g, dtype=torch.float64), {}
    f = torch.randn(33, 7, generator=g, dtype=torch.float64, requires_grad=True)
    f_ref = f.detach().clone().requires_grad_(True)
    ours = tr._cluster_term(f, torch.tensor(ids))
    (grad,) = torch.autograd.grad(3.0 * ours, f)
    naive = sum(((f_ref[:, None, :] - tr.centroids[i][None]) ** 2).sum(-1).min(1).values.mean() for i in ids)
    (grad_ref,) = torch.autograd.grad(3.0 * naive, f_ref)
    assert float(ours.detach()) == pytest.approx(float(naive.detach()), rel=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_resume_after_kill_gives_the_same_final_run_bitwise(tmp_path, seed, monkeypatch):
    x = _data(seed)
    cfg = make_config(None, seed=seed, deterministic=True, **{**TINY, "r0": 8})
    full = Trainer(cfg, x, tmp_path / "full.pt").run()

    calls = {"n": 0}
    real = Trainer._save

    def dying_save(self, *a, **k):  # the process dies right after the second save (round 1 written)
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, x, tmp_path / "part.pt").run()
    monkeypatch.setattr(Trainer, "_save", real)
    from hcdiag.runfile import load_run

    part = load_run(tmp_path / "part.pt", partial=True).data
    assert part["status"]["complete"] is False and len(part["rounds"]) == 2
    resumed = Trainer(cfg, x, tmp_path / "part.pt").run(resume=True)
    for name in full["snapshot_order"]:
        for k, v in full["snapshots"][name].items():
            assert torch.equal(v, resumed["snapshots"][name][k]), (name, k)
    assert torch.equal(full["history"]["losses"], resumed["history"]["losses"])
    for name in full["references"]:
        for k, v in full["references"][name]["state"].items():
            assert torch.equal(v, resumed["references"][name]["state"][k])


def test_resume_with_another_config_names_the_keys(tmp_path, seed):
    x = _data(seed)
    cfg = make_config(None, seed=seed, **{**TINY, "references": ()})
    Trainer(cfg, x, tmp_path / "r.pt").run()
    other = make_config(None, seed=seed, **{**TINY, "references": (), "lr": 1e-2, "k": 2})
    with pytest.raises(InputError, match=r"written with another config \(keys differ: .*train\.k.*train\.lr"):
        Trainer(other, x, tmp_path / "r.pt").run(resume=True)


def test_nonfinite_loss_stops_with_stage_round_step_and_keeps_last_good_state(tmp_path, seed, monkeypatch):
    from hcdiag import train as train_mod
    from hcdiag.runfile import load_run

    x = _data(seed)
    cfg = make_config(None, seed=seed, **{**TINY, "r0": 8})
    real = train_mod.gaussian_kl
    count = {"n": 0}

    def poisoned(mu, lv):
        count["n"] += 1
        out = real(mu, lv)
        return out * float("nan") if count["n"] > 2 * 3 * 8 + 5 else out  # dies in round 1

    monkeypatch.setattr(train_mod, "gaussian_kl", poisoned)
    with pytest.raises(NumericalError, match=r"non-finite loss in stage 1, round 1, epoch 1, step \d+; the last good state is kept"):
        Trainer(cfg, x, tmp_path / "nan.pt").run()
    kept = load_run(tmp_path / "nan.pt", partial=True).data
    assert len(kept["rounds"]) == 1 and "non-finite loss" in kept["status"]["error"]
    for sd in kept["snapshots"].values():
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_halving_arithmetic():
    assert [_n_keep(n, 0.5) for n in (16, 8, 4, 3)] == [8, 4, 2, 2]
    assert _n_rounds(16, 0.5) == 3 and _n_rounds(32, 0.5) == 4 and _n_rounds(24, 0.5) == 4
    assert _n_keep(9, 1 / 3) == 3 and _n_keep(6, 2 / 3) == 4


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="24 is not a power of two; use 16 or 32"):
        make_config("smoke", r0=24)
    with pytest.raises(InputError, match=r"The 'multiple' parameter must be a float > 0. Got -1"):
        make_config("smoke", multiple=-1.0)
    with pytest.raises(InputError, match=r"The 'k' parameter \(50\) is larger than the number of rows \(20\)"):
        Trainer(make_config(None, k=50, **{k: v for k, v in TINY.items() if k != "k"}), np.ones((20, 3), np.float32) + np.arange(20)[:, None], None)
    with pytest.raises(InputError, match="The 'preset' parameter must be one of smoke, paper"):
        make_config("huge")
