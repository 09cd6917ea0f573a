"""The teacher-guided VAE (hcdiag.train.methods.teacher): its objective, its teacher rule, and a trained run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hcdiag.checks.witness import teacher_information
from hcdiag.errors import InputError
from hcdiag.simplex import simplex_vertices
from hcdiag.train import Trainer, make_config
from hcdiag.train.methods.teacher import RULE, alignment, choose_teacher, teacher_rows

TINY = dict(enc_widths=(16,), dec_widths=(16,), latent_dim=3, batch_size=64, epochs=2, r0=4, k=3,
            em_backend="sklearn", eval_rows=150, references=())


def _data(seed, n=300, d=6, k=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, size=(k, d))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)


def test_alignment_is_the_mean_kl_from_the_teacher_to_the_witness(seed):
    g = torch.Generator().manual_seed(seed)
    K, n, m, beta = 4, 5, 30, 1.7
    T = torch.rand(m, K, generator=g, dtype=torch.float64)
    T[0, 1] = 0.0  # a zero responsibility contributes 0 log 0 = 0
    T = T / T.sum(1, keepdim=True)
    mu = torch.randn(m, n, generator=g, dtype=torch.float64)
    V = simplex_vertices(K, n)
    naive = 0.0
    for i in range(m):  # naive loop: KL(T_i || softmax(beta <v_k, mu_i>))
        logits = [beta * float(V[k] @ mu[i]) for k in range(K)]
        lse = math.log(sum(math.exp(v) for v in logits))
        naive += sum(float(T[i, k]) * (math.log(float(T[i, k])) - (logits[k] - lse)) for k in range(K) if T[i, k] > 0)
    assert abs(float(alignment(T, mu, V, beta)) - naive / m) < 1e-12


def test_the_teacher_is_the_clustering_with_the_largest_information(seed):
    g = torch.Generator().manual_seed(seed)
    resp = torch.rand(5, 40, 3, generator=g) ** 3
    resp = resp / resp.sum(2, keepdim=True)
    resp[3] = resp[1]  # a tie with an earlier id: the lowest id wins
    resp[:, 1::2] = resp[:, 1::2].flip(-1)  # the held-out (odd) rows must not change the choice
    cid, infos = choose_teacher(resp)
    naive = [teacher_information(resp[r, 0::2].double()) for r in range(5)]  # the fit split: even rows
    assert infos == pytest.approx(naive, abs=1e-6) and cid == int(np.argmax(naive)) and cid != 3
    held = resp.clone()
    held[:, 1::2] = torch.softmax(torch.randn(5, 20, 3, generator=g), -1)
    assert choose_teacher(held) == (cid, infos)
    assert "largest teacher information" in RULE and "even evaluation rows" in RULE


def test_teacher_rows_are_that_clusterings_responsibilities(seed):
    from hcdiag.clusterings import fit_clusterings

    x = _data(seed)
    cs = fit_clusterings(x, 4, 3, covariance="diag", backend="sklearn", seed=seed % 1000)
    d = {"centroids": cs.centroids, "weights": cs.weights, "covariances": cs.covariances, "seeds": cs.seeds,
         "loglik": cs.loglik, "covariance_type": cs.covariance_type}
    full = cs.responsibilities(x)  # (R, n, K)
    for cid in range(4):
        np.testing.assert_allclose(teacher_rows(d, x, cid), full[cid], rtol=1e-9, atol=1e-12)


def test_alpha_zero_trains_the_plain_vae_bitwise(seed):
    x = _data(seed)
    van = Trainer(make_config(None, seed=seed % 10_000, method="vanilla", **TINY), x, None).run()
    tea = Trainer(make_config(None, seed=seed % 10_000, method="teacher", teacher_alpha=0.0, **TINY), x, None).run()
    for name in van["snapshots"]:
        for k, v in van["snapshots"][name].items():
            assert torch.equal(v, tea["snapshots"][name][k]), (name, k)
    assert torch.isfinite(tea["history"]["cluster"][1:]).all()  # L_TS is recorded even when it is not trained


def test_a_teacher_run_records_its_teacher_and_loads(seed, tmp_path):
    from hcdiag.runfile import load_run

    x = _data(seed)
    Trainer(make_config(None, seed=seed % 10_000, method="teacher", teacher_alpha=3.0, witness_beta=2.0,
                        **{**TINY, "references": ("collapsed",)}), x, tmp_path / "run.pt").run()
    run = load_run(tmp_path / "run.pt")
    rec = run.data["teacher"]
    cid, infos = choose_teacher(run.clusterings.resp)
    assert rec["clustering"] == cid and rec["I_T"] == pytest.approx(infos) and rec["rule"] == RULE
    assert (rec["alpha"], rec["beta_w"]) == (3.0, 2.0) and rec["vertices"].shape == (TINY["k"], TINY["latent_dim"])
    assert run.method == "teacher" and run.complete and run.references.collapsed is not None


def test_a_latent_space_too_small_for_the_simplex_is_refused(seed):
    with pytest.raises(InputError, match=r"^A regular simplex of K = 5 unit vectors needs a latent dimension >= "
                                         r"K - 1 = 4; got 3"):
        Trainer(make_config(None, seed=seed % 10_000, method="teacher", **{**TINY, "k": 5}), _data(seed), None).run()


def test_a_run_can_start_from_another_runs_snapshot_to_rescue_it(seed, tmp_path):
    """The rescue experiment's start: init_from a (collapsed) run's snapshot; the main model's init snapshot is
    that snapshot bitwise, and the references start fresh."""
    x = _data(seed)
    src = tmp_path / "vanilla.pt"
    Trainer(make_config(None, seed=seed % 10_000, method="vanilla", **TINY), x, src).run()
    from hcdiag.runfile import load_run

    src_run = load_run(src)
    name = "epoch1" if src_run.has_state("epoch1") else "final"  # a snapshot before the end, where there is one
    start = src_run.snapshot(name)
    kw = dict(method="teacher", teacher_alpha=2.0, init_from=str(src), init_snapshot=name,
              **{**TINY, "references": ("collapsed",)})
    run = Trainer(make_config(None, seed=seed % 10_000, **kw), x, None).run()
    assert all(torch.equal(run["snapshots"]["init"][k], v) for k, v in start.items())
    fresh = Trainer(make_config(None, seed=seed % 10_000, **{**kw, "init_from": None}), x, None).run()
    assert all(torch.equal(run["references"]["collapsed"]["state"][k], v)
               for k, v in fresh["references"]["collapsed"]["state"].items())
    assert run["config"]["train"]["init_from"] == str(src)


def test_init_from_refuses_another_architecture_or_a_missing_snapshot(seed, tmp_path):
    x = _data(seed)
    src = tmp_path / "src.pt"
    Trainer(make_config(None, seed=seed % 10_000, method="vanilla", **TINY), x, src).run()
    wide = make_config(None, seed=1, method="teacher", init_from=str(src), **{**TINY, "enc_widths": (32,)})
    with pytest.raises(InputError, match=r"^init_from .*src\.pt: its model .* is not this run's"):
        Trainer(wide, x, None).run()
    gone = make_config(None, seed=1, method="teacher", init_from=str(src), init_snapshot="round9", **TINY)
    with pytest.raises(InputError, match=r"^init_from .*src\.pt has no parameters for snapshot 'round9' \(it has: "
                                         r"init, .*final\); pick one with init_snapshot\.$"):
        Trainer(gone, x, None).run()
