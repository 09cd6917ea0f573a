"""The system under test: Historical Consensus Training and baselines, on tiny data."""

import re

import numpy as np
import pytest
import torch

from hcdiag.errors import InputError, NumericalError
from hcdiag.models import build_model, encode_decode
from hcdiag.train import Trainer, make_config
from hcdiag.train.loop import Loop
from hcdiag.train.objectives import ClusterTerm
from hcdiag.train.writer import RunWriter
from hcdiag.train.methods import aggressive
from hcdiag.train.methods.hct import keep_best, n_keep, n_rounds

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

    cfg = make_config(None, method=method, seed=seed, kl_weight=0.5, aggressive_max_inner=2,
                      **{**TINY, "references": ("collapsed",)})
    Trainer(cfg, _data(seed), tmp_path / "b.pt").run()
    run = load_run(tmp_path / "b.pt").data
    assert run["config"]["method"] == method and run["rounds"] == [] and run["refinement"] is None
    assert run["snapshot_order"][0] == "init" and run["snapshot_order"][-1] == "final"
    assert set(run["references"]) == {"collapsed"}


# -- aggressive baseline (He et al. 2019, text.py / image.py) ---------------------------------------------

AGG = {**TINY, "method": "aggressive", "references": (), "batch_size": 200}  # 600 rows: 3 decoder steps/epoch


def _agg_setup(seed, **kw):
    tr = Trainer(make_config(None, seed=seed, **{**AGG, **kw}), _data(seed), None)
    tr.setup()
    model = tr.new_model()
    enc = [p for n, p in model.named_parameters() if n.startswith(("encoder", "enc_"))]
    return tr, model, torch.optim.Adam(enc, lr=1e-3), tr.loop.new_state(seed)


def _he_inner_count(losses, cap, every):
    """He et al.'s inner loop transcribed (``while sub_iter < 100`` read as ``cap`` steps; their 1e4 sentinel
    read as +inf): how many encoder steps it takes on this loss sequence."""
    sub_iter, pre, cur = 1, float("inf"), 0.0
    while sub_iter <= cap:
        cur += losses[sub_iter - 1]
        if sub_iter % every == 0:
            cur = cur / every
            if pre - cur < 0:
                return sub_iter
            pre, cur = cur, 0.0
        sub_iter += 1
    return cap


def _scripted_inner(tr, model, opt, state, losses, monkeypatch, loop_fn=None):
    """Run an encoder loop (default the aggressive inner loop) with ``Loop.step`` replaced by a script of
    losses; return the count, the (optimizer, batch) of every step and the current batch the loop started from."""
    calls = []

    def fake_step(self, model_, opt_, state_, ids, beta, kl_weight, free_bits=0.0, xb=None, weights=None):
        calls.append((opt_, xb))
        return torch.tensor([losses[len(calls) - 1], 0.0, 0.0, 0.0])

    monkeypatch.setattr(Loop, "step", fake_step)
    xb = tr.loop.batch(state)
    return (loop_fn or aggressive.inner_loop)(tr, model, opt, state, xb), calls, xb


@pytest.mark.parametrize("losses,cap,every,expected", [
    ([10.0 - 0.01 * i for i in range(100)], 100, 15, 100),  # keeps decreasing: the cap
    ([10.0 - 0.01 * i for i in range(30)] + [20.0] * 70, 100, 15, 45),  # block 31..45 rose: stop at its end
    ([10.0 - 0.01 * i for i in range(15)] + [9.0] * 14 + [100.0] + [1.0] * 70, 100, 15, 30),  # mean of 16..30 rose
    ([5.0] * 100, 100, 15, 100),  # equal block means do not stop it (their `pre - cur < 0`)
    ([1e6] * 15 + [1.0] * 85, 100, 15, 100),  # the first block only sets the reference, however large
    ([3.0, 2.0, 4.0, 1.0, 0.5, 0.25, 5.0, 6.0, 0.1, 0.1], 10, 2, 8),  # blocks 2.5, 2.5, 0.375, 5.5: rose at 8
    ([1.0, 2.0, 3.0, 4.0, 5.0], 5, 15, 5),  # no check before the cap
])
def test_aggressive_inner_loop_stops_at_cap_or_first_rising_block(seed, monkeypatch, losses, cap, every, expected):
    tr, model, opt, state = _agg_setup(seed, aggressive_max_inner=cap, aggressive_check_every=every)
    assert _he_inner_count(losses, cap, every) == expected  # the hand count agrees with He et al.'s loop
    n, calls, xb = _scripted_inner(tr, model, opt, state, losses, monkeypatch)
    assert n == expected and len(calls) == expected
    assert all(o is opt for o, _ in calls)


def test_aggressive_inner_loop_matches_he_et_al_on_random_losses(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        cap, every = int(rng.integers(1, 60)), int(rng.integers(1, 20))
        losses = (np.cumsum(rng.normal(-0.05, 1.0, cap)) + 100).tolist()
        tr, model, opt, state = _agg_setup(seed, aggressive_max_inner=cap, aggressive_check_every=every)
        n, _, _ = _scripted_inner(tr, model, opt, state, losses, monkeypatch)
        assert n == _he_inner_count(losses, cap, every)


def test_aggressive_inner_batches_are_current_then_random_slots_of_the_permutation(seed, monkeypatch):
    tr, model, opt, state = _agg_setup(seed, batch_size=64, aggressive_max_inner=40, aggressive_check_every=15)
    losses = [10.0 - 0.01 * i for i in range(40)]
    n, calls, xb = _scripted_inner(tr, model, opt, state, losses, monkeypatch)
    assert n == 40 and calls[0][1] is xb  # the first encoder step uses the batch the decoder step will use
    replay = torch.Generator().manual_seed(seed)  # the run's index generator, replayed
    assert torch.equal(torch.randperm(tr.n, generator=replay), state["perm"])  # the permutation _batch drew
    slots = tr.n // 64
    for _, b in calls[1:]:  # each later batch: a full slot of the current permutation, drawn with g_idx
        j = int(torch.randint(slots, (1,), generator=replay))
        assert torch.equal(b, tr.loop.X[state["perm"][j * 64:(j + 1) * 64]])
    assert len({float(b.sum()) for _, b in calls[1:]}) > 1


def _param_spy(monkeypatch):
    """Wrap Loop.step: per call, the names of the parameters its optimizer owns and of those that changed."""
    _Joint = aggressive.Joint
    log, real = [], Loop.step

    def spy(self, model, opt, state, *a, **k):
        names = {id(p): n for n, p in model.named_parameters()}
        opts = opt.optimizers if isinstance(opt, _Joint) else (opt,)
        owned = {names[id(p)] for o in opts for g in o.param_groups for p in g["params"]}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = real(self, model, opt, state, *a, **k)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        log.append({"opt": opt, "owned": owned, "changed": changed, "joint": isinstance(opt, _Joint)})
        return out

    monkeypatch.setattr(Loop, "step", spy)
    return log


def _scripted_mi(monkeypatch, values):
    import hcdiag.metrics as metrics_mod

    calls = []

    def fake(mu, logvar, **kw):
        calls.append(1)
        return values[len(calls) - 1]

    monkeypatch.setattr(metrics_mod, "mutual_information", fake)
    return calls


def test_aggressive_steps_move_only_their_network_and_keep_both_adams(seed, monkeypatch):
    _scripted_mi(monkeypatch, [0.5, 0.1])  # aggressive in epochs 1 and 2, plain VAE in epoch 3
    log = _param_spy(monkeypatch)
    cfg = make_config(None, seed=seed, **{**AGG, "epochs": 3, "aggressive_max_inner": 6, "aggressive_check_every": 3})
    run = Trainer(cfg, _data(seed), None).run()
    model = build_model(run["config"]["model"])
    names = [n for n, _ in model.named_parameters()]
    enc = {n for n in names if n.startswith(("encoder", "enc_"))}
    dec = set(names) - enc
    assert enc and dec
    steps = 3  # ceil(600 / 200) decoder steps per epoch
    is_enc = [c["owned"] == enc for c in log]
    is_dec = [c["owned"] == dec for c in log]
    joint = [c["joint"] for c in log]
    assert all(e or d or j for e, d, j in zip(is_enc, is_dec, joint))
    for c in log:  # nothing outside the stepped optimizer moves
        assert c["changed"] <= c["owned"]
    assert set().union(*(c["changed"] for c in log if c["owned"] == enc)) == enc
    assert set().union(*(c["changed"] for c in log if c["owned"] == dec and not c["joint"])) == dec
    assert set().union(*(c["changed"] for c in log if c["joint"])) == enc | dec
    # order: (inner encoder steps, one decoder step) per batch while aggressive, then joint steps only
    dec_pos = [i for i, d in enumerate(is_dec) if d]
    assert len(dec_pos) == 2 * steps and sum(joint) == steps and all(joint[dec_pos[-1] + 1:])
    n_enc = sum(is_enc)
    h = run["history"]["inner_steps"]
    assert torch.isnan(h[0]) and h[3] == 0.0
    assert n_enc == pytest.approx(float(h[1] + h[2]) * steps)
    assert all(is_enc[i - 1] for i in dec_pos)  # every decoder step follows at least one encoder step
    # the same two Adams run the whole time: the joint optimizer holds them, their step counts add up
    enc_opt = next(c["opt"] for c, e in zip(log, is_enc) if e)
    dec_opt = next(c["opt"] for c, d in zip(log, is_dec) if d)
    assert all(c["opt"].optimizers == (enc_opt, dec_opt) for c in log if c["joint"])
    assert all(int(s["step"]) == n_enc + steps for s in enc_opt.state.values())
    assert all(int(s["step"]) == 3 * steps for s in dec_opt.state.values())


@pytest.mark.parametrize("mi,ended", [
    ([0.2, 0.5, 0.4, 0.9, 1.0], 3),  # fell at epoch 3; the later rise does not turn it back on
    ([-0.1, 0.5, 0.6, 0.7, 0.8], 1),  # the first epoch is compared with 0 (their pre_mi = 0)
    ([0.3, 0.3, 0.2, 0.9, 1.0], 3),  # equal MI is not a fall
    ([0.1, 0.2, 0.3, 0.4, 0.5], None),  # never fell: aggressive for the whole run
])
def test_aggressive_mode_ends_when_mi_falls_and_never_returns(seed, monkeypatch, tmp_path, mi, ended):
    from hcdiag.runfile import load_run

    calls = _scripted_mi(monkeypatch, mi)
    inner_calls = []
    real_inner = aggressive.inner_loop
    monkeypatch.setattr(aggressive, "inner_loop", lambda t, *a: inner_calls.append(t.cfg) or real_inner(t, *a))
    cfg = make_config(None, seed=seed, **{**AGG, "epochs": 5, "aggressive_max_inner": 4, "aggressive_check_every": 2})
    Trainer(cfg, _data(seed), tmp_path / "a.pt").run()
    run = load_run(tmp_path / "a.pt").data  # validated: the new keys are part of the schema
    n_agg = ended or 5
    assert run["aggressive"]["ended_epoch"] == ended
    assert run["aggressive"]["mi"].tolist() == mi[:n_agg] and len(calls) == n_agg  # MI only while aggressive
    inner = run["history"]["inner_steps"]
    assert inner.shape == run["history"]["step"].shape and torch.isnan(inner[0])
    assert inner[1:n_agg + 1].tolist() == [4.0] * n_agg  # cap 4, checks at 2 (vs +inf) and 4: always 4 steps
    assert inner[n_agg + 1:].tolist() == [0.0] * (5 - n_agg)
    assert len(inner_calls) == 3 * n_agg  # one inner loop per decoder step of an aggressive epoch


def test_aggressive_runs_are_deterministic_and_resume_reproduces_them(seed, tmp_path, monkeypatch):
    """Two runs with one seed give the same weights and record; the second is killed right after the
    baseline is saved (references pending) and resumed, which must keep the aggressive record."""
    cfg = make_config(None, seed=seed, **{**AGG, "epochs": 3, "aggressive_max_inner": 8, "aggressive_check_every": 3})
    x = _data(seed)
    a = Trainer(cfg, x, tmp_path / "a.pt").run()
    real = RunWriter.save

    def dying_save(self, *args, **kw):
        real(self, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, x, tmp_path / "b.pt").run()
    monkeypatch.setattr(RunWriter, "save", real)
    b = Trainer(cfg, x, tmp_path / "b.pt").run(resume=True)
    assert b["status"]["complete"] and a["snapshot_order"] == b["snapshot_order"]
    for name in a["snapshot_order"]:
        for k, v in a["snapshots"][name].items():
            assert torch.equal(v, b["snapshots"][name][k]), (name, k)
    torch.testing.assert_close(a["history"]["inner_steps"], b["history"]["inner_steps"], rtol=0, atol=0, equal_nan=True)
    assert a["aggressive"]["ended_epoch"] == b["aggressive"]["ended_epoch"]
    assert torch.equal(a["aggressive"]["mi"], b["aggressive"]["mi"])


def test_run_file_checks_the_aggressive_record():
    from hcdiag.runfile import example_run, validate_run

    run = example_run(method="aggressive")
    h = len(run["history"]["step"])
    run["history"]["inner_steps"] = torch.tensor([float("nan")] + [7.5] * (h - 1), dtype=torch.float64)
    run["aggressive"] = {"ended_epoch": 3, "mi": torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64)}
    validate_run(run)  # consistent: accepted
    run["aggressive"]["ended_epoch"] = None  # aggressive the whole run
    validate_run(run)
    bad = [({"ended_epoch": 2, "mi": run["aggressive"]["mi"]},
            "aggressive.ended_epoch is 2 but aggressive.mi holds 3 epoch(s); MI is estimated at the end of every "
            "aggressive epoch, the last one included: fix the producer."),
           ({"ended_epoch": 0, "mi": torch.zeros(0)}, "aggressive.ended_epoch must be an int >= 1; got 0."),
           ({"ended_epoch": 1}, "aggressive.mi is missing; a run file needs it"),
           ({"mi": [0.1]}, "aggressive.mi must be a tensor; got list"),
           ({"mi": torch.zeros(2, 2)}, "aggressive.mi must be a 1-D tensor; got shape (2, 2)")]
    for record, msg in bad:
        run["aggressive"] = record
        with pytest.raises(InputError, match=re.escape(msg)):
            validate_run(run)
    run["aggressive"] = {"ended_epoch": None, "mi": torch.zeros(1)}
    run["history"]["inner_steps"] = torch.zeros(h + 1)
    with pytest.raises(InputError, match=re.escape(f"history.step has h={h} but history.inner_steps has h={h + 1}")):
        validate_run(run)


@pytest.mark.parametrize("field,value", [("aggressive_max_inner", 0), ("aggressive_max_inner", -5),
                                         ("aggressive_check_every", 0), ("aggressive_check_every", -1)])
def test_aggressive_config_errors(field, value, tmp_path, capsys, seed):
    from hcdiag.cli import main

    msg = f"The '{field}' parameter must be an integer >= 1. Got {value}."
    with pytest.raises(InputError, match=re.escape(msg)):
        make_config("smoke", method="aggressive", **{field: value})
    np.save(tmp_path / "x.npy", _data(seed))
    flag = "--" + field.replace("_", "-")
    code = main(["train", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r.pt"), "--method", "aggressive",
                 flag, str(value), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r.pt").exists()


def test_aggressive_cli_flags_reach_the_run(tmp_path, capsys, seed):
    from hcdiag.cli import main
    from hcdiag.runfile import load_run

    np.save(tmp_path / "x.npy", _data(seed))
    argv = ["train", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r.pt"), "--method", "aggressive", "--quiet",
            "--aggressive-max-inner", "3", "--aggressive-check-every", "2", "--epochs", "2", "--batch-size", "300",
            "--enc-widths", "8", "--dec-widths", "8", "--latent-dim", "2", "--r0", "4", "--k", "3",
            "--em-backend", "sklearn", "--eval-rows", "100", "--references", "none"]
    assert main(argv) == 0
    run = load_run(tmp_path / "r.pt").data
    assert run["config"]["train"]["aggressive_max_inner"] == 3 and run["config"]["train"]["aggressive_check_every"] == 2
    # cap 3 with a check at step 2 (against +inf, so it never stops there): 3 encoder steps in every epoch trained
    # aggressively; the schedule ends after an epoch whose MI did not rise (He et al.), which for some data is the
    # first (aggressive.ended_epoch), and then the epoch has no inner steps
    ended = run["aggressive"]["ended_epoch"] or 2
    assert run["history"]["inner_steps"][1:].tolist() == [3.0 if e <= ended else 0.0 for e in (1, 2)]


def test_simultaneous_step_sums_every_active_clustering(seed):
    """One simultaneous step's clustering term equals the naive sum over active clusterings of eq. 8."""
    from hcdiag.metrics import clustering_losses

    x = _data(seed)
    tr = Trainer(make_config(None, seed=seed, mode="simultaneous", **TINY), x, None)
    tr.setup()
    tr.loop.set_centroids(torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(seed)))
    model = tr.new_model()
    state = tr.loop.new_state(seed)
    # replay the same batch and noise to get f, then compare the term with a naive loop
    st2 = tr.loop.new_state(seed)
    xb = tr.loop.batch(st2)
    with torch.no_grad():
        mu, lv = model.encode(xb)
        from hcdiag.losses import reparameterize

        f = model.decode(reparameterize(mu, lv, st2["g_noise"]))
    cents = tr.loop.centroids
    naive = sum(_naive_losses(f.numpy().astype(np.float64), cents[[i]].numpy().astype(np.float64))[0]
                for i in (0, 2, 3))
    terms = tr.loop.step(model, torch.optim.SGD(model.parameters(), lr=0.0), state, torch.tensor([0, 2, 3]), 1.0, 1.0)
    assert float(terms[3]) == pytest.approx(naive, rel=1e-5)
    assert float(clustering_losses(f, cents[[0, 2, 3]]).sum()) == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("ids", [[1], [0, 2, 3]])
def test_cluster_term_gradient_is_that_of_the_min(seed, ids):
    """The term's gradient (closed form from the chosen centroids) equals autograd through a naive
    min over squared distances, in float64, for one clustering (cycle) and several (simultaneous)."""
    g = torch.Generator().manual_seed(seed)
    cents = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    f = torch.randn(33, 7, generator=g, dtype=torch.float64, requires_grad=True)
    f_ref = f.detach().clone().requires_grad_(True)
    ours = ClusterTerm(cents)(f, torch.tensor(ids))
    (grad,) = torch.autograd.grad(3.0 * ours, f)
    naive = sum(((f_ref[:, None, :] - cents[i][None]) ** 2).sum(-1).min(1).values.mean() for i in ids)
    (grad_ref,) = torch.autograd.grad(3.0 * naive, f_ref)
    assert float(ours.detach()) == pytest.approx(float(naive.detach()), rel=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_resume_after_kill_gives_the_same_final_run_bitwise(tmp_path, seed, monkeypatch):
    x = _data(seed)
    cfg = make_config(None, seed=seed, deterministic=True, **{**TINY, "r0": 8})
    full = Trainer(cfg, x, tmp_path / "full.pt").run()

    calls = {"n": 0}
    real = RunWriter.save

    def dying_save(self, *a, **k):  # the process dies right after the second save (round 1 written)
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, x, tmp_path / "part.pt").run()
    monkeypatch.setattr(RunWriter, "save", real)
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
    from hcdiag.train import objectives as train_mod
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
    assert [n_keep(n, 0.5) for n in (16, 8, 4, 3)] == [8, 4, 2, 2]
    assert n_rounds(16, 0.5) == 3 and n_rounds(32, 0.5) == 4 and n_rounds(24, 0.5) == 4
    assert n_keep(9, 1 / 3) == 3 and n_keep(6, 2 / 3) == 4


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="24 is not a power of two; use 16 or 32"):
        make_config("smoke", r0=24)
    with pytest.raises(InputError, match=r"The 'multiple' parameter must be a float > 0. Got -1"):
        make_config("smoke", multiple=-1.0)
    with pytest.raises(InputError, match=r"The 'k' parameter \(50\) is larger than the number of rows \(20\)"):
        Trainer(make_config(None, k=50, **{k: v for k, v in TINY.items() if k != "k"}), np.ones((20, 3), np.float32) + np.arange(20)[:, None], None)
    with pytest.raises(InputError, match="The 'preset' parameter must be one of smoke, paper"):
        make_config("huge")


def test_eval_losses_are_exact_at_tiny_eps_far_from_the_origin(seed):
    """Regression (issue 9, defect 8): the l_C that select clusterings and decide refinement were float32
    through ||x||^2 - 2 x.mu + ||mu||^2, +220% off at l ~ 1e-6. A model whose reconstruction is a constant c at
    a known distance d from a centroid far from the origin must give l_C = d^2 (oracle: float64 difference)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(0, 1.0, size=(300, 6)) + 60.0).astype(np.float32)  # ||x||^2 ~ 2e4
    tr = Trainer(make_config(None, seed=seed, **{**TINY, "arch": "linear"}), x, None)
    tr.setup()
    cent = torch.as_tensor(rng.normal(60.0, 1.0, size=(2, 3, 6)), dtype=torch.float32)
    tr.loop.set_centroids(cent)
    model = tr.new_model()
    step = torch.zeros(6, dtype=torch.float32)
    step[int(rng.integers(0, 6))] = 1e-3  # a float32-exact offset of c from centroid (0, 0)
    c = cent[0, 0] + step
    sd = model.state_dict()
    sd["dec_out.weight"].zero_()
    sd["dec_out.bias"].copy_(c)
    model.load_state_dict(sd)
    got = tr.loop.evaluate(model)["losses"]
    want = _naive_losses(np.tile(c.numpy().astype(np.float64), (len(tr.eval_x), 1)), cent.numpy().astype(np.float64))
    assert want[0] == pytest.approx(float(((c.double() - cent[0, 0].double()) ** 2).sum()), rel=1e-12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_the_method_registry_is_the_papers_list_and_the_clis_choices():
    from hcdiag.paper import METHODS as PAPER
    from hcdiag.train import METHODS

    assert tuple(METHODS) == PAPER
    assert all(m.name == name for name, m in METHODS.items())
    assert [name for name, m in METHODS.items() if m.pipeline] == ["hct"]


def test_keep_best_is_the_naive_selection(seed):
    """Section 4.2.1 step 3 on hand-made losses: the n_keep smallest of the active ones, ties by id, and eps_t
    their largest loss; discarded clusterings never compete."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        r0 = int(rng.integers(3, 20))
        losses = torch.tensor(rng.choice([0.5, 1.0, 2.0, 3.0], size=r0) + rng.integers(0, 2, r0) * 0.25)
        active = sorted(rng.choice(r0, size=int(rng.integers(3, r0 + 1)), replace=False).tolist())
        ratio = float(rng.choice([1 / 3, 0.5, 2 / 3]))
        kept, eps = keep_best(losses, active, ratio)
        want = n_keep(len(active), ratio)
        naive = sorted(sorted(active, key=lambda i: (float(losses[i]), i))[:want])
        assert kept == naive and eps == max(float(losses[i]) for i in naive)
        assert set(kept) <= set(active) and len(kept) == want


def test_each_baselines_objective_against_a_naive_loop(seed):
    """vae_terms with each baseline's KL weight and free bits equals a naive per-sample loop."""
    import math as _m

    from hcdiag.losses import LossWeights
    from hcdiag.train import METHODS
    from hcdiag.train.objectives import vae_terms

    g = torch.Generator().manual_seed(seed)
    B, N, n = 9, 5, 3
    xb, f = torch.randn(B, N, generator=g, dtype=torch.float64), torch.randn(B, N, generator=g, dtype=torch.float64)
    mu, lv = torch.randn(B, n, generator=g, dtype=torch.float64), 0.3 * torch.randn(B, n, generator=g, dtype=torch.float64)
    w = LossWeights.for_convention("literal", 1.7, N)
    cfg = make_config(None, kl_weight=2.5, anneal_epochs=4, free_bits=0.4)
    for name in ("vanilla", "beta", "anneal", "freebits"):
        m = METHODS[name]
        for epoch in (0, 2, 7):
            klw, fb = m.kl_weight(cfg, epoch), m.free_bits(cfg)
            want_klw = {"beta": 2.5, "anneal": min(1.0, (epoch + 1) / 4)}.get(name, 1.0)
            assert klw == want_klw and fb == (0.4 if name == "freebits" else 0.0)
            recon = sum(sum((float(xb[i, j]) - float(f[i, j])) ** 2 for j in range(N)) for i in range(B)) / B * w.recon
            kld = [[0.5 * (float(mu[i, j]) ** 2 + _m.exp(float(lv[i, j])) - 1 - float(lv[i, j])) for j in range(n)]
                   for i in range(B)]
            kl = sum(map(sum, kld)) / B
            kl_obj = sum(max(fb, sum(kld[i][j] for i in range(B)) / B) for j in range(n)) if fb > 0 else kl
            loss, r, k = vae_terms(xb, mu, lv, f, w, klw, fb)
            assert float(r) == pytest.approx(recon, rel=1e-12) and float(k) == pytest.approx(kl, rel=1e-12)
            assert float(loss) == pytest.approx(recon + klw * kl_obj, rel=1e-12)


# -- EM-type training (ICASSP 2023) ---------------------------------------------------------------------------

def _em_count(losses, cap, every, tol):
    """The E-step's stopping rule transcribed: blocks of ``every`` losses, stop when a block's mean improves on
    the previous block's by less than ``tol`` of it (the first block sets the reference), or at ``cap``."""
    pre = None
    for end in range(every, cap + 1, every):
        cur = sum(losses[end - every:end]) / every
        if pre is not None and pre - cur < tol * abs(pre):
            return end
        pre = cur
    return cap


def test_em_type_e_step_stops_on_convergence_or_at_its_cap(seed, monkeypatch):
    from hcdiag.train.methods import em_type

    rng = np.random.default_rng(seed)
    cases = [([10.0 - 0.5 * i for i in range(20)], 20, 5, 1e-3, 20),  # keeps improving: the cap
             ([10.0] * 5 + [9.999] * 5 + [1.0] * 10, 20, 5, 1e-3, 10),  # improved by 1e-4 < 1e-3: converged at 10
             ([10.0] * 5 + [11.0] * 15, 20, 5, 1e-3, 10),  # a rise is no improvement: stop
             ([1.0] * 3, 3, 5, 0.5, 3)]  # no check before the cap
    for _ in range(5):
        cap, every = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        ls = (np.cumsum(rng.normal(-0.05, 1.0, cap)) + 100).tolist()
        cases.append((ls, cap, every, float(rng.choice([0.0, 1e-3, 0.05])), _em_count(ls, cap, every, 1e-3)))
    for losses, cap, every, tol, want in cases:
        want = _em_count(losses, cap, every, tol)
        tr, model, opt, state = _agg_setup(seed, method="em-type", em_max_e_steps=cap, em_check_every=every,
                                           em_tol=tol)
        n, calls, xb = _scripted_inner(tr, model, opt, state, losses, monkeypatch, em_type.e_step)
        assert n == want == len(calls)
        assert calls[0][1] is xb and all(o is opt for o, _ in calls)
        monkeypatch.undo()


def test_em_type_alternates_e_and_m_steps_for_the_whole_run(seed, monkeypatch, tmp_path):
    """Per batch: encoder-only E-step steps, then em_m_steps decoder-only steps, in every epoch (no switch-off);
    the run file records the E-step lengths and loads; nothing outside the stepped network moves."""
    from hcdiag.runfile import load_run

    log = _param_spy(monkeypatch)
    cfg = make_config(None, seed=seed, **{**AGG, "method": "em-type", "epochs": 2, "em_max_e_steps": 4,
                                          "em_check_every": 2, "em_m_steps": 2})
    Trainer(cfg, _data(seed), tmp_path / "em.pt").run()
    run = load_run(tmp_path / "em.pt")
    model = build_model(run.config.model)
    enc = {n for n, _ in model.named_parameters() if n.startswith(("encoder", "enc_"))}
    dec = {n for n, _ in model.named_parameters()} - enc
    kinds = ["E" if c["owned"] == enc else "M" if c["owned"] == dec else "?" for c in log]
    assert "?" not in kinds and all(c["changed"] <= c["owned"] for c in log)
    runs = "".join(kinds).replace("MM", "|").split("|")[:-1]  # each batch: E-steps then two M-steps
    assert len(runs) == 2 * 3 and all(r and set(r) == {"E"} and len(r) <= 4 for r in runs)
    inner = run.history.get("inner_steps")
    assert torch.isnan(inner[0])
    np.testing.assert_allclose(inner[1:].numpy(), [np.mean([len(r) for r in runs[:3]]), np.mean([len(r) for r in runs[3:]])])
    assert run.config.method == "em-type" and run.snapshot_names[0] == "init" and run.complete


def test_resume_of_a_file_that_predates_a_setting_at_its_default(seed, tmp_path, monkeypatch):
    """A run file written before a setting existed (its config.train lacks it) resumes when the setting is at
    its default, and is refused naming the setting otherwise."""
    import hcdiag.clusterings as cl
    from hcdiag.runfile import load_run, save_run
    from hcdiag.train.writer import RunWriter

    x = _data(seed)
    cfg = make_config(None, seed=seed, deterministic=True, **{**TINY, "r0": 8, "references": ()})
    real = RunWriter.save
    monkeypatch.setattr(RunWriter, "save", lambda self, *a, **k: (real(self, *a, **k), (_ for _ in ()).throw(KeyboardInterrupt))[0])
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, x, tmp_path / "old.pt").run()
    monkeypatch.setattr(RunWriter, "save", real)
    old = load_run(tmp_path / "old.pt", partial=True).data
    new_keys = ("em_max_e_steps", "em_check_every", "em_tol", "em_m_steps")
    for k in new_keys:  # as an hcdiag before these settings wrote it
        del old["config"]["train"][k]
    old["config"]["fingerprint"]["settings"] = cl.fingerprint(
        settings={k: v for k, v in old["config"]["train"].items() if k != "device"})
    save_run(old, tmp_path / "old.pt")
    full = Trainer(cfg, x, tmp_path / "full.pt").run()
    resumed = Trainer(cfg, x, tmp_path / "old.pt").run(resume=True)
    assert all(k in resumed["config"]["train"] for k in new_keys)
    for name in full["snapshot_order"]:
        for k, v in full["snapshots"][name].items():
            assert torch.equal(v, resumed["snapshots"][name][k]), (name, k)
    save_run(old, tmp_path / "old2.pt")
    other = make_config(None, seed=seed, deterministic=True, **{**TINY, "r0": 8, "references": (), "em_tol": 0.5})
    with pytest.raises(InputError, match=r"resume: .*old2\.pt was written with another config \(keys differ: "
                                         r"train\.em_tol\)"):
        Trainer(other, x, tmp_path / "old2.pt").run(resume=True)


# -- the readings of HCT's epoch (hcdiag.train.config.EPOCH_UNITS) --------------------------------------------

def _recording_loop(monkeypatch, n, batch_size, spc, mode, unit):
    """A Loop whose steps record the clustering ids they train on (no model is trained)."""
    loop = Loop(torch.zeros(n, 2), torch.zeros(4, 2), None, batch_size=batch_size, spc=spc, mode=mode,
                device=torch.device("cpu"), unit=unit)
    seen = []

    def step(model, opt, state, ids, beta, kl_weight, **kw):
        seen.append(ids.tolist())
        return torch.zeros(4)

    monkeypatch.setattr(loop, "step", step)
    return loop, seen


@pytest.mark.parametrize("active", [[3, 1, 2], [0, 5], [7]])
def test_data_pass_epoch_is_one_pass_cycling_through_the_active_clusterings(monkeypatch, seed, active):
    n, bs = 10 + seed % 50, 1 + seed % 7
    loop, seen = _recording_loop(monkeypatch, n, bs, 99, "cycle", "data_pass")
    state = {"step": 0}
    loop.cycle(None, None, state, active, 1.0, "test")
    passes = -(-n // bs)  # one pass over the data, whatever |S_t| is
    assert seen == [[active[i % len(active)]] for i in range(passes)] and state["step"] == passes
    assert loop.steps_per_cycle(len(active)) == passes


@pytest.mark.parametrize("unit,mode", [("steps", "cycle"), ("epochs", "cycle"), ("steps", "simultaneous"),
                                       ("data_pass", "simultaneous")])
def test_the_other_readings_keep_their_step_counts(monkeypatch, unit, mode):
    active, spc = [2, 0, 1], 4
    loop, seen = _recording_loop(monkeypatch, 30, 7, spc, mode, unit)
    loop.cycle(None, None, {"step": 0}, active, 1.0, "test")
    if mode == "simultaneous":
        want = [active] * (5 if unit == "data_pass" else spc)  # ceil(30 / 7) = 5 steps in a data pass
    else:
        want = [[c] for _ in range(spc) for c in active]  # every clustering spc steps, interleaved
    assert seen == want and loop.steps_per_cycle(len(active)) == len(want)


def test_data_pass_rounds_cost_one_pass_per_epoch_and_the_run_records_its_reading(seed, tmp_path):
    from hcdiag.runfile import load_run

    x = _data(seed, n=300)
    cfg = make_config(None, seed=seed % 10_000, **{**TINY, "r0": 8, "references": ()}, epoch_unit="data_pass")
    Trainer(cfg, x, tmp_path / "run.pt").run()
    run = load_run(tmp_path / "run.pt")
    h = run.history
    steps, stage = h.step.tolist(), h.get("stage").tolist()
    per_epoch = -(-300 // TINY["batch_size"])
    stage1 = [b - a for a, b, s in zip(steps, steps[1:], stage[1:]) if s == 1]
    assert stage1 == [per_epoch] * (n_rounds(8, 0.5) * TINY["epochs_per_round"])  # over 8 and 4 clusterings alike
    assert run.config.hct["epoch_unit"] == "data_pass" and run.config.hct["steps_per_clustering"] is None
    assert run.config.hct["steps_per_epoch"] == per_epoch and run.config.train["epoch_unit"] == "data_pass"


# -- shared references (hcdiag.train.refcache) -----------------------------------------------------------------

def _refs(run) -> dict:
    out = {}
    for ref in run.references:
        out[ref.name] = dict(ref.state)
        for sname, sd in (ref.snapshots or {}).items():
            out[f"{ref.name}/{sname}"] = dict(sd)
    return out


def test_shared_references_are_bitwise_the_ones_each_run_trains(seed, tmp_path):
    from hcdiag.runfile import load_run

    x = _data(seed, n=300)
    kw = dict(TINY, references=("collapsed", "vanilla", "control"))
    own = Trainer(make_config(None, seed=seed % 10_000, **kw), x, tmp_path / "own.pt").run()
    cache = tmp_path / "refs"
    first = Trainer(make_config(None, seed=seed % 10_000, **kw), x, tmp_path / "a.pt", ref_cache=cache)
    first.run()
    files = sorted(p.name for p in cache.glob("ref-*.pt"))
    assert [f.split("-")[1] for f in files] == ["collapsed", "vanilla"]  # the control depends on the run: never shared
    second = Trainer(make_config(None, seed=seed % 10_000, **kw), x, tmp_path / "b.pt", ref_cache=cache)
    second.run()
    assert sorted(p.name for p in cache.glob("ref-*.pt")) == files  # read, not trained again
    want = _refs(load_run(tmp_path / "own.pt"))
    for name in ("a.pt", "b.pt"):
        run = load_run(tmp_path / name)
        got = _refs(run)
        assert got.keys() == want.keys()
        for k in want:
            for p in want[k]:
                assert torch.equal(got[k][p], want[k][p]), (name, k, p)
        for ref in run.references:  # metrics are measured on this run's own evaluation rows
            assert ref.metrics == own["references"][ref.name]["metrics"]


def test_a_shared_reference_of_another_key_or_a_corrupt_file_is_retrained(seed, tmp_path):
    x = _data(seed, n=300)
    kw = dict(TINY, references=("collapsed",), method="vanilla")
    cache = tmp_path / "refs"
    Trainer(make_config(None, seed=1, **kw), x, None, ref_cache=cache).run()
    [path] = cache.glob("ref-collapsed-*.pt")  # seed 1's
    Trainer(make_config(None, seed=2, **kw), x, None, ref_cache=cache).run()  # another seed: another key
    assert len(list(cache.glob("ref-collapsed-*.pt"))) == 2
    path.write_bytes(path.read_bytes()[:100])  # truncated
    own = Trainer(make_config(None, seed=1, **kw), x, None).run()
    again = Trainer(make_config(None, seed=1, **kw), x, None, ref_cache=cache).run()
    assert all(torch.equal(again["references"]["collapsed"]["state"][k], v)
               for k, v in own["references"]["collapsed"]["state"].items())
    got = torch.load(path, weights_only=True)  # the truncated file was replaced by the retrained reference
    assert got["format"] == "hcdiag-reference" and all(torch.equal(got["state"][k], v)
                                                       for k, v in own["references"]["collapsed"]["state"].items())


def test_data_pass_rotation_goes_on_across_cycles_so_every_clustering_trains_alike(monkeypatch, seed):
    """18 rows at batch 4 make 5 steps per pass: restarting at the first clustering every pass would give
    clusterings 0 and 1 twice the steps of the others (and none to some when a pass has fewer steps than
    clusterings); the rotation from the run's step count gives each the same number, within one."""
    active = [4, 0, 3, 1, 2, 6, 5][: 2 + seed % 6]
    loop, seen = _recording_loop(monkeypatch, 18, 4, 99, "cycle", "data_pass")
    state = {"step": seed % 11}  # the run's steps so far (an earlier round or stage)
    for _ in range(7):
        loop.cycle(None, None, state, active, 1.0, "test")
    counts = [sum(ids == [c] for ids in seen) for c in active]
    assert sum(counts) == 7 * 5 and max(counts) - min(counts) <= 1
    first = (seed % 11) % len(active)
    assert seen[:len(active)] == [[active[(first + i) % len(active)]] for i in range(len(active))]


def test_data_pass_warns_when_rounds_are_too_short_to_train_every_clustering(seed):
    from hcdiag.errors import HcdiagWarning

    cfg = make_config(None, seed=seed % 10_000, **{**TINY, "r0": 16, "batch_size": 300, "epochs_per_round": 3,
                                                   "references": ()}, epoch_unit="data_pass")
    with pytest.warns(HcdiagWarning, match=r"^With epoch_unit data_pass a round trains epochs_per_round x steps per "
                                           r"epoch = 3 x 2 steps \(600 rows, batch 300\), fewer than the R0 = 16 "
                                           r"clusterings: some get no step of their own"):
        run = Trainer(cfg, _data(seed, n=600), None).run()
    assert len(run["rounds"]) == 3 and run["status"]["complete"]  # it trains: every l_C is still measured


def test_a_run_file_that_predates_steps_per_epoch_resumes(seed, tmp_path):
    """config.hct.steps_per_epoch (derived from config.train) is absent from files written before it
    existed; --resume of such a partial run must not call it another config."""
    import torch as _torch

    x = _data(seed, n=300)
    cfg = make_config(None, seed=seed % 10_000, **{**TINY, "references": ()})
    full = Trainer(cfg, x, tmp_path / "full.pt").run()
    stopped = dict(full)
    Trainer(cfg, x, tmp_path / "part.pt").run()
    part = _torch.load(tmp_path / "part.pt", weights_only=True)
    del part["config"]["hct"]["steps_per_epoch"]
    _torch.save(part, tmp_path / "part.pt")
    again = Trainer(cfg, x, tmp_path / "part.pt").run(resume=True)  # complete: returned as it is, not refused
    assert again["config"]["train"] == stopped["config"]["train"]


def test_a_reference_cache_that_cannot_be_written_costs_this_run_nothing(seed, tmp_path, monkeypatch):
    from hcdiag.train import refcache

    def full_disk(*a, **kw):  # torch.save on a full disk raises RuntimeError, not OSError
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(refcache, "_write", full_disk)
    x = _data(seed, n=300)
    kw = dict(TINY, references=("collapsed",), method="vanilla")
    own = Trainer(make_config(None, seed=1, **kw), x, None).run()
    got = Trainer(make_config(None, seed=1, **kw), x, None, ref_cache=tmp_path / "refs").run()
    assert all(torch.equal(got["references"]["collapsed"]["state"][k], v)
               for k, v in own["references"]["collapsed"]["state"].items())
    assert not list((tmp_path / "refs").glob("ref-*.pt"))
