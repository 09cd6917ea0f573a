"""Verify, don't trust (issue 9): run files from other trainers are checked against their own models.

hcdiag.checks.evidence recomputes what a run file stores but hcdiag can recompute (outputs beside
parameters, round losses and thresholds, eps_T, reached), refuses a file that contradicts itself, and
the checks use the recomputed numbers. hcdiag.runfile refuses state_dicts that do not fit config.model.
The oracles are loops over rows and centroids (test_checks.naive_losses) and the stated tolerances
written out here again.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from hcdiag.checks.barrier import CHECKS, run_checks
from hcdiag.checks.base import RunContext
from hcdiag.checks.evidence import verify
from hcdiag.cli import main
from hcdiag.errors import InputError
from hcdiag.models import build_model
from hcdiag.runfile import Run, example_run, load_run, save_run, validate_run
from test_checks import (MLP0, ORDER, by_id, evaluate, hand_run, naive_losses, outputs_only, snapshot_losses,
                         strip_seconds)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

PREFIX = "hcdiag check-barrier: error: "
MLP_RELU = {"family": "mlp", "input_dim": 2, "latent_dim": 2, "enc_widths": [8], "dec_widths": [8],
            "activation": "relu", "image_shape": None, "channels": []}


def naive_tol(stored: float, recomputed: float, S: float) -> float:
    """The loss rule of docs/runfile.md, written out again."""
    return 1e-3 * max(abs(stored), abs(recomputed)) + 1e-4 * math.sqrt(max(stored, recomputed, 0) * S) + 1e-5 * S


def naive_scale(x) -> float:
    x = np.asarray(x, np.float64)
    return sum(float(np.sum(row ** 2)) for row in x) / len(x)


def cli_error(tmp_path, run, capsys, *extra) -> str:
    """``hcdiag check-barrier`` on ``run`` written with plain torch.save: exit 2, one line, no traceback."""
    p = tmp_path / "bad.pt"
    torch.save(run, p)
    code = main(["check-barrier", str(p), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0][len(PREFIX):]


def relu_run(seed, **kw):
    """hand_run with a ReLU MLP (one hidden layer each side, random init) on data centred at 0, so the hidden
    pre-activations are O(1) and gelu and relu disagree there."""
    rng = np.random.default_rng(seed)
    states = {s: build_model(MLP_RELU, seed=int(rng.integers(1 << 30))).state_dict() for s in ORDER}
    return hand_run(seed, model=MLP_RELU, states=states, center=(0.0, 0.0), references=(), **kw)


def with_outputs(run, model=None):
    """Store every snapshot's outputs on eval.x as ``model`` (default: the run's config.model) computes them."""
    run["outputs"] = {}
    for s, st in run["snapshots"].items():
        mu, lv, xh = evaluate(model or run["config"]["model"], st, run["eval"]["x"])
        run["outputs"][s] = {"mu": torch.from_numpy(mu), "logvar": torch.from_numpy(lv), "xhat": torch.from_numpy(xh)}
    return run


# ---------------------------------------------------------------------------------------------------
# 1. outputs stored beside parameters must be the parameters' outputs

def test_a_wrong_activation_beside_stored_outputs_is_refused(seed, tmp_path, capsys):
    """Regression: gelu in config.model on ReLU snapshots was rebuilt silently, and the outputs the producer
    stored beside them (the right ones) were ignored."""
    run = with_outputs(relu_run(seed))
    run_checks(run, select=["KL"])  # consistent: accepted
    run["config"]["model"] = {**MLP_RELU, "activation": "gelu"}
    validate_run(run)  # the schema is fine; the evidence is not
    first = ORDER[0]  # the first snapshot in training order with both
    stored = run["outputs"][first]["mu"].double()
    rebuilt = torch.from_numpy(evaluate(run["config"]["model"], run["snapshots"][first], run["eval"]["x"])[0]).double()
    d = float((rebuilt - stored).abs().max())
    tol = 1e-3 * max(1.0, float(stored.abs().max()))
    assert d > tol
    msg = (f"outputs.{first}.mu does not match snapshot {first} rebuilt with config.model (family 'mlp', activation "
           f"'gelu'): largest difference {d:.3g} > tolerance {tol:.3g} = 1e-3 * max(1, max|stored|); config.model must "
           "describe the model that made these outputs (family, widths, activation), and outputs must be computed on "
           "eval.x with xhat = f(mu(x)) (docs/runfile.md, 'Numbers hcdiag recomputes').")
    with pytest.raises(InputError, match=f"^{re.escape(msg)}$"):
        run_checks(run, select=["KL"])
    assert cli_error(tmp_path, run, capsys) == f"{tmp_path / 'bad.pt'}: {msg}"


@pytest.mark.parametrize("factor,refused", [(0.5, False), (2.0, True)])
def test_outputs_tolerance_is_one_thousandth_of_the_largest_stored_value(seed, factor, refused):
    run = with_outputs(relu_run(seed))
    xh = run["outputs"]["final"]["xhat"]
    tol = 1e-3 * max(1.0, float(xh.abs().max()))
    bumped = xh.clone()
    bumped[0, 0] += factor * tol
    run["outputs"]["final"]["xhat"] = bumped
    if refused:
        with pytest.raises(InputError, match=r"^outputs\.final\.xhat does not match snapshot final rebuilt with "
                                             r"config\.model \(family 'mlp', activation 'relu'\): largest difference "):
            run_checks(run, select=["KL"])
    else:
        run_checks(run, select=["KL"])


def test_the_collapsed_references_outputs_must_match_its_state(seed):
    run = hand_run(seed)
    col = run["references"]["collapsed"]
    mu, lv, xh = evaluate(MLP0, col["state"], run["eval"]["x"])
    col["outputs"] = {"mu": torch.from_numpy(mu), "logvar": torch.from_numpy(lv), "xhat": torch.from_numpy(xh) + 1.0}
    with pytest.raises(InputError, match=r"^references\.collapsed\.outputs\.xhat does not match references\.collapsed"
                                         r"\.state rebuilt with references\.collapsed\.config\.model \(family 'mlp', "
                                         r"activation 'relu'\): largest difference 1 > tolerance "):
        run_checks(run, select=["T3"])


# ---------------------------------------------------------------------------------------------------
# 2. stored thresholds are recomputed, compared, and replaced

def test_a_made_up_round_threshold_is_refused_with_both_numbers(seed, tmp_path, capsys):
    run = hand_run(seed)
    eps0 = float(max(snapshot_losses(run, "round0")[[0, 1, 2]]))  # Def. 4.2 at the round's snapshot, by loops
    S = naive_scale(run["eval"]["x"])
    run["rounds"][0]["eps"] = 123.0
    msg = (f"rounds[0].eps is 123 but the round0 snapshot gives {eps0:.6g} on eval.x (the max of l_C over "
           f"rounds[0].kept; tolerance {naive_tol(123.0, eps0, S):.3g}); hcdiag recomputes this number from the run's "
           "own snapshot and refuses a file that contradicts it: compute it with eq. 8 on eval.x at that snapshot "
           "(docs/runfile.md, 'Numbers hcdiag recomputes').")
    with pytest.raises(InputError, match=f"^{re.escape(msg)}$"):
        run_checks(run)
    assert cli_error(tmp_path, run, capsys) == f"{tmp_path / 'bad.pt'}: {msg}"


def test_a_round_loss_measured_elsewhere_is_refused(seed):
    run = hand_run(seed)
    l = snapshot_losses(run, "round1")
    run["rounds"][1]["losses"] = torch.tensor(l * 1.5, dtype=torch.float32)  # e.g. measured on other rows
    with pytest.raises(InputError, match=r"^rounds\[1\]\.losses\[0\] is \S+ but the round1 snapshot gives \S+ on "
                                         r"eval\.x \(l_C of clustering 0, eq\. 8; tolerance "):
        run_checks(run)


def test_a_made_up_eps_T_is_refused(seed):
    run = hand_run(seed)
    eps_T = float(max(snapshot_losses(run, "refined")[[0, 1]]))
    S = naive_scale(run["eval"]["x"])
    run["refinement"]["eps_T"] = 5.0
    with pytest.raises(InputError, match=re.escape(
            f"refinement.eps_T is 5 but the refined snapshot gives {eps_T:.6g} on eval.x (max(l_a, l_b) over "
            f"refinement.pair [0, 1]; tolerance {naive_tol(5.0, eps_T, S):.3g}); hcdiag recomputes")):
        run_checks(run)


def test_reached_is_refused_only_when_the_recomputed_eps_T_contradicts_it(seed):
    run = hand_run(seed)  # eps_T = 0.25, target 1.0, reached
    eps_T = float(max(snapshot_losses(run, "refined")[[0, 1]]))
    S = naive_scale(run["eval"]["x"])
    run["refinement"]["eps"] = 1e-4
    tol = naive_tol(eps_T, 1e-4, S)
    with pytest.raises(InputError, match=re.escape(
            f"refinement.reached is True but the refined snapshot gives eps_T = {eps_T:.6g} >= refinement.eps = "
            f"0.0001 on eval.x (tolerance {tol:.3g}); hcdiag recomputes")):
        run_checks(run)
    # within the tolerance the flag is the producer's float32 noise: accepted, and the checks use eps_T < eps
    run["refinement"]["eps"] = eps_T - 0.5 * naive_tol(eps_T, eps_T, S)
    ctx = RunContext(Run(run))
    verify(ctx)
    assert ctx.refinement_reached is False and ctx.refinement_eps_T == pytest.approx(eps_T, rel=1e-9)


@pytest.mark.parametrize("factor,refused", [(0.9, False), (1.1, True)])
def test_the_loss_tolerance_decides_at_its_stated_value(seed, factor, refused):
    run = hand_run(seed)
    eps1 = float(max(snapshot_losses(run, "round1")[[0, 1]]))
    S = naive_scale(run["eval"]["x"])
    # stored = recomputed + factor * tol(stored, recomputed): solve for stored (the tolerance moves with it)
    lo, hi = eps1, eps1 + 10 * naive_tol(eps1, eps1, S)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - eps1 < factor * naive_tol(mid, eps1, S) else (lo, mid)
    run["rounds"][1]["eps"] = lo
    if refused:
        with pytest.raises(InputError, match=r"^rounds\[1\]\.eps is "):
            run_checks(run, select=["N1"])
    else:
        res = by_id(run_checks(run, select=["N1"]))["N1"]
        # the check reads the RECOMPUTED threshold, not the stored one
        assert res.values["eps"][1] == pytest.approx(eps1, rel=1e-9) and res.values["eps"][1] != lo


def test_the_regions_carry_the_recomputed_thresholds(seed):
    run = hand_run(seed)
    S = naive_scale(run["eval"]["x"])
    for r in run["rounds"]:  # stored within tolerance but not equal
        r["eps"] = float(r["eps"]) + 0.5 * naive_tol(float(r["eps"]), float(r["eps"]), S)
    ctx = RunContext(Run(run))
    verify(ctx)
    naive = [max(snapshot_losses(run, "round0")[[0, 1, 2]]), max(snapshot_losses(run, "round1")[[0, 1]]),
             max(snapshot_losses(run, "refined")[[0, 1]])]
    assert [r.name for r in ctx.regions()] == ["F_0", "F_1", "F_T"]
    np.testing.assert_allclose([r.eps for r in ctx.regions()], naive, rtol=1e-9)
    assert ctx.final_region().eps == ctx.refinement_eps_T
    for r, entry in zip(ctx.evidence.rounds, run["rounds"]):
        np.testing.assert_allclose(r.losses.numpy(), snapshot_losses(run, entry["snapshot"]), rtol=1e-9)


def test_float32_losses_of_models_on_a_centroid_need_the_loss_floor(seed):
    """Why the loss rule's floor is 1e-5 S and not 1e-7 S: hcdiag's own trainer computes eq. 8 in float32 by
    ``||xhat||^2 - 2 xhat.mu + ||mu||^2``. On a model that sits on a centroid each row's distance is a clamped
    rounding error, and the stored loss is up to ~1e-6 S where the float64 value is ~0 (N = 784, pixel scale
    10). Over 200 such draws some exceed a 1e-7 S floor (about a third do: the chance that none does is
    ~1e-30), and the rule accepts every one."""
    from hcdiag.checks.evidence import loss_tolerance
    from hcdiag.metrics import clustering_losses

    g = torch.Generator().manual_seed(seed)
    N, m, n = 784, 64, 2
    refused_at_1e7, worst = 0, 0.0
    for _ in range(200):
        x = 10 * torch.rand(m, N, generator=g)
        cents = 10 * torch.rand(1, 2, N, generator=g)
        # a linear model on centroid 0: xhat = c + W2 W1 x, the ripple W2 W1 x ~ 1e-5 per row
        xhat = (x @ (torch.randn(n, N, generator=g) / N).T) @ (1e-5 * torch.randn(N, n, generator=g)).T + cents[0, 0]
        S = naive_scale(x)
        stored = float(clustering_losses(xhat, cents)[0])  # float32, as a trainer stores it
        recomputed = float(clustering_losses(xhat.double(), cents.double())[0])
        gap = abs(stored - recomputed)
        tol_1e7 = 1e-3 * max(stored, recomputed) + 1e-4 * math.sqrt(max(stored, recomputed) * S) + 1e-7 * S
        refused_at_1e7 += gap > tol_1e7
        worst = max(worst, gap / loss_tolerance(stored, recomputed, S))
        assert loss_tolerance(stored, recomputed, S) == pytest.approx(naive_tol(stored, recomputed, S), rel=1e-12)
    assert refused_at_1e7 >= 1 and worst <= 1.0


def test_a_trainer_like_file_of_a_model_on_a_centroid_is_accepted(seed):
    """End to end: a run whose refined model sits on a centroid, eps_T stored as a float32 trainer computes it."""
    from hcdiag.metrics import clustering_losses

    g = torch.Generator().manual_seed(seed)
    N, m, R0, K, n = 784, 256, 2, 2, 2
    x = 10 * torch.rand(m, N, generator=g)
    cents = 10 * torch.rand(R0, K, N, generator=g)
    model = {"family": "linear", "input_dim": N, "latent_dim": n, "enc_widths": [], "dec_widths": [],
             "activation": "relu", "image_shape": None, "channels": []}

    def on_centroid(name):  # xhat = centroid 0 of clustering 0, plus a ~1e-5 ripple per row
        return {"enc_logvar": torch.zeros(n), "enc_mu.weight": torch.randn(n, N, generator=g) / N,
                "enc_mu.bias": torch.zeros(n), "dec_out.weight": 1e-5 * torch.randn(N, n, generator=g),
                "dec_out.bias": cents[0, 0].clone()}

    run = example_run(R0=R0, K=K, N=N, m=m, n=n, seed=seed % 1000, model=model, state_fn=on_centroid, history=False)
    run["eval"]["x"], run["eval"]["xbar"], run["clusterings"]["centroids"] = x, x.mean(0), cents
    mdl = build_model(model)
    mdl.load_state_dict(run["snapshots"]["refined"])
    with torch.no_grad():
        xhat = mdl.decode(mdl.encode(x)[0])
    l32 = clustering_losses(xhat, cents).double()  # what a float32 trainer stores
    a, b = [int(i) for i in run["refinement"]["pair"]]
    run["refinement"]["eps_T"] = float(max(l32[a], l32[b]))
    run["refinement"]["reached"] = run["refinement"]["eps_T"] < run["refinement"]["eps"]
    ev = verify(RunContext(Run(run)))
    assert ev.refinement.eps_T == pytest.approx(float(max(clustering_losses(xhat.double(), cents.double())[[a, b]])),
                                                rel=1e-9, abs=1e-9 * naive_scale(x))


def test_a_partial_run_verifies_the_rounds_it_has(seed):
    run = example_run(seed=seed % 1000, complete=False)
    verify(RunContext(Run(run, partial=True)))
    run["rounds"][0]["eps"] = float(run["rounds"][0]["eps"]) + 100.0
    with pytest.raises(InputError, match=r"^rounds\[0\]\.eps is "):
        verify(RunContext(Run(run, partial=True)))


@pytest.mark.parametrize("kw", [{}, {"outputs": True}, {"snapshots": False, "outputs": True}, {"R0": 8},
                                {"dtype": torch.float64}, {"references": True, "outputs": True}])
def test_example_runs_store_what_their_own_models_give(seed, kw):
    run = example_run(seed=seed % 10_000, **kw)
    ctx = RunContext(Run(run))
    ev = verify(ctx)
    for r, entry in zip(ev.rounds, run["rounds"]):
        assert float(entry["eps"]) == pytest.approx(r.eps, rel=1e-6, abs=1e-9)
    assert run["refinement"]["eps_T"] == pytest.approx(ev.refinement.eps_T, rel=1e-6)
    assert run["refinement"]["reached"] is ev.refinement.reached


def test_hcdiags_own_trainer_writes_files_that_verify(seed, tmp_path):
    from test_train import TINY, _data

    from hcdiag.train import Trainer, make_config

    Trainer(make_config(None, seed=seed % 10_000, **TINY), _data(seed), tmp_path / "run.pt").run()
    run = load_run(tmp_path / "run.pt")
    ev = verify(RunContext(run))
    assert len(ev.rounds) == 1 and ev.refinement is not None
    S = naive_scale(run.eval_x)
    for r, entry in zip(ev.rounds, run.rounds):
        assert abs(entry.eps - r.eps) <= naive_tol(entry.eps, r.eps, S)
    assert abs(run.refinement.eps_T - ev.refinement.eps_T) <= naive_tol(run.refinement.eps_T, ev.refinement.eps_T, S)


# ---------------------------------------------------------------------------------------------------
# 3. state_dicts must fit config.model; the documented names are the real ones

@pytest.mark.parametrize("mutate,message", [
    (lambda st: st.__setitem__("dec_out.scale", torch.ones(2)),
     "snapshots.final has unexpected key 'dec_out.scale' for config.model (family 'mlp'); store exactly the "
     "state_dict of the model config.model describes (its parameter names and shapes are listed in "
     "docs/runfile.md, 'Parameter names')."),
    (lambda st: st.pop("enc_mu.weight"),
     "snapshots.final lacks key 'enc_mu.weight', which the model of config.model (family 'mlp') has; store its full "
     "state_dict (parameter names and shapes: docs/runfile.md, 'Parameter names')."),
    (lambda st: st.__setitem__("dec_out.weight", torch.zeros(2, 3)),
     "snapshots.final.dec_out.weight has shape (2, 3) but the model of config.model (family 'mlp') has (2, 2); "
     "config.model must describe the model that was trained (widths, latent_dim, input_dim, channels)."),
    (lambda st: st.__setitem__("num_batches_tracked", torch.tensor(3)),
     "snapshots.final has unexpected key 'num_batches_tracked' for config.model (family 'mlp')"),
    (lambda st: st.__setitem__("enc_mu.bias", torch.tensor([1, 2])),
     "snapshots.final.enc_mu.bias must be a floating-point tensor; got dtype torch.int64."),
    (lambda st: st["enc_mu.bias"].__setitem__(0, float("nan")),
     "snapshots.final.enc_mu.bias holds 1 non-finite value(s) (NaN or inf) of 2; the checks need finite values"),
])
def test_save_and_load_refuse_a_state_dict_that_does_not_fit(seed, tmp_path, mutate, message):
    run = hand_run(seed)
    mutate(run["snapshots"]["final"])
    with pytest.raises(InputError, match=f"^refusing to write {re.escape(str(tmp_path / 'run.pt'))}: "
                                         f"{re.escape(message)}"):
        save_run(run, tmp_path / "run.pt")
    assert not (tmp_path / "run.pt").exists()
    torch.save(run, tmp_path / "raw.pt")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'raw.pt'))}: {re.escape(message)}"):
        load_run(tmp_path / "raw.pt")


def test_an_unknown_activation_is_refused_at_validation(seed):
    run = hand_run(seed)
    run["config"]["model"]["activation"] = "swish"
    with pytest.raises(InputError, match=r"^config\.model\.activation must be one of relu, elu, tanh, gelu, "
                                         r"leaky_relu; got 'swish'\.$"):
        validate_run(run)


def test_validation_of_a_huge_model_allocates_nothing(seed):
    """Widths of 10^5 would need 40 GB of float32 parameters: the expected shapes come from the meta device."""
    run = hand_run(seed)
    run["config"]["model"] = {**MLP0, "enc_widths": [100_000, 100_000], "dec_widths": [100_000]}
    with pytest.raises(InputError, match=r"^snapshots\.init lacks key 'encoder\.0\.weight', which the model of "
                                         r"config\.model \(family 'mlp'\) has; "):
        validate_run(run)


def test_references_are_checked_against_their_own_model_or_the_runs(seed, tmp_path):
    run = hand_run(seed, references=("collapsed", "control"))
    ctrl = run["references"]["control"]
    ctrl["state"]["dec_out.extra"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"^refusing to write .*: references\.control\.state has unexpected key "
                                         r"'dec_out\.extra' for references\.control\.config\.model \(family 'mlp'\)"):
        save_run(run, tmp_path / "run.pt")
    del ctrl["state"]["dec_out.extra"]
    del ctrl["config"]["model"]  # falls back to the run's config.model
    ctrl["state"]["dec_out.bias"] = torch.zeros(3)
    with pytest.raises(InputError, match=r"^references\.control\.state\.dec_out\.bias has shape \(3,\) but the model "
                                         r"of config\.model \(family 'mlp'\) has \(2,\)"):
        validate_run(run)
    ctrl["state"]["dec_out.bias"] = torch.zeros(2)
    validate_run(run)


# ---------------------------------------------------------------------------------------------------
# 7. T3 from the collapsed reference's outputs; references without parameters

def test_t3_reads_an_outputs_only_collapsed_reference(seed):
    """Regression: T3 was inconclusive for producers hcdiag cannot rebuild, though it needs only outputs."""
    run = hand_run(seed)
    full = by_id(run_checks(run, select=["T3", "T4"]))
    out = outputs_only(run)
    col = out["references"]["collapsed"]
    mu, lv, xh = evaluate(MLP0, col["state"], run["eval"]["x"])
    out["references"] = {"collapsed": {"config": {k: v for k, v in col["config"].items() if k != "model"},
                                       "outputs": {"mu": torch.from_numpy(mu), "logvar": torch.from_numpy(lv),
                                                   "xhat": torch.from_numpy(xh)}}}
    validate_run(out)
    res = by_id(run_checks(out, select=["T3", "T4"]))
    assert res["T3"].verdict == full["T3"].verdict == "holds"
    assert res["T3"].values["evaluated_from"] == "references.collapsed.outputs"
    drop = lambda v: {k: x for k, x in strip_seconds(v).items() if k != "evaluated_from"}  # noqa: E731
    assert drop(res["T3"].values) == drop(full["T3"].values)
    assert res["T4"].values["collapsed_reference"] == full["T4"].values["collapsed_reference"]


def test_a_reference_needs_parameters_or_outputs(seed):
    run = hand_run(seed, references=("collapsed", "control"))
    del run["references"]["control"]["state"]
    with pytest.raises(InputError, match=r"^references\.control\.state is missing; a reference needs its parameters "
                                         r"\(a state_dict of its config\.model\); see docs/runfile\.md\.$"):
        validate_run(run)
    run = hand_run(seed)
    col = run["references"]["collapsed"]
    mu, lv, xh = evaluate(MLP0, col.pop("state"), run["eval"]["x"])
    col["outputs"] = {"mu": torch.from_numpy(mu), "logvar": torch.from_numpy(lv), "xhat": torch.from_numpy(xh)}
    # outputs only, beside snapshots hcdiag can rebuild: accepted; the parameter-space checks say what they lack
    validate_run(run)
    res = {r.id: r for r in run_checks(run, select=["T3", "I2", "I3"])}
    assert res["T3"].values["evaluated_from"] == "references.collapsed.outputs"
    assert res["I3"].verdict == "inconclusive" and "no parameter distance to it" in res["I3"].reason
    assert res["I2"].values["to_collapsed_unavailable"].startswith("the collapsed reference has no parameters")
    del col["outputs"]
    with pytest.raises(InputError, match=r"^references\.collapsed\.state is missing; a reference needs its parameters "
                                         r"\(a state_dict\) or, for a model hcdiag cannot rebuild, its outputs on eval\.x"):
        validate_run(run)


def test_the_vanilla_references_snapshots_are_validated(seed):
    run = hand_run(seed, references=("collapsed",))
    st = run["references"]["collapsed"]["state"]
    run["references"]["vanilla"] = {"config": dict(run["references"]["collapsed"]["config"]), "state": st,
                                    "snapshots": {"v0": dict(st), "v1": {"w": torch.zeros(1)}},
                                    "snapshot_order": ["v0", "v1"]}
    with pytest.raises(InputError, match=r"^references\.vanilla\.snapshots\.v1 has unexpected key 'w' for "):
        validate_run(run)
    run["references"]["vanilla"]["snapshots"]["v1"] = dict(st)
    run["references"]["vanilla"]["snapshot_order"] = ["v1"]
    with pytest.raises(InputError, match=r"^references\.vanilla\.snapshot_order must list every name of "
                                         r"references\.vanilla\.snapshots once, in training order; got \['v1'\] for "
                                         r"\['v0', 'v1'\]\.$"):
        validate_run(run)


# ---------------------------------------------------------------------------------------------------
# 8. defaults of absent fields are reported per check

def test_each_check_reports_the_defaults_it_used(seed):
    run = hand_run(seed)
    res = run_checks(run)
    assert [r.id for r in res] == list(CHECKS)
    assert all(r.values["defaults"] == [] for r in res)  # hand_run states everything
    del run["snapshot_order"]
    run["config"]["model"] = {k: v for k, v in MLP0.items() if k != "activation"}
    run["stage3"] = None
    run["status"] = {"complete": False, "stage": "stage3", "error": None}
    res = by_id(run_checks(Run(run, partial=True), select=["N2", "T4", "KL"]))
    order = {"key": "snapshot_order", "default": "the snapshots keys, then the outputs keys",
             "why": "snapshot_order is absent, so training order is read from the keys"}
    act = {"key": "config.model.activation", "default": "relu",
           "why": "config.model.activation is absent; hcdiag builds the mlp model with its default"}
    teacher = {"key": "stage3.clustering", "default": 0,
               "why": "stage3 is absent: the teacher is the clustering of refinement.pair[0]"}
    assert order in res["N2"].values["defaults"] and act in res["N2"].values["defaults"]
    assert teacher in res["T4"].values["defaults"] and act in res["KL"].values["defaults"]
    assert teacher not in res["N2"].values["defaults"]


def test_setting_returns_the_field_or_records_its_default(seed):
    run = hand_run(seed)
    run["config"]["loss"] = None
    ctx = RunContext(Run(run))
    assert ctx.setting("config.s2", 1.0) == run["config"]["s2"]
    assert ctx.setting("config.loss", "literal", "config.loss is absent, so the literal convention") == "literal"
    assert ctx.setting("refinement.beta", 4.0) == 4.0
    assert ctx.take_defaults() == [
        {"key": "config.loss", "default": "literal", "why": "config.loss is absent, so the literal convention"},
        {"key": "refinement.beta", "default": 4.0, "why": "refinement.beta is absent from the run file"}]
    assert ctx.take_defaults() == []


# ---------------------------------------------------------------------------------------------------
# 9. T4's messages name the run file's keys

def test_responsibilities_that_are_not_distributions_are_refused_by_key(seed):
    run = hand_run(seed)
    run["clusterings"]["resp"][0, 5] *= 0.5
    with pytest.raises(InputError, match=r"^clusterings\.resp rows must sum to 1 \(within 0\.0001\); 1 of 240 do not "
                                         r"\(first: clustering 0, eval row 5, sum 0\.5\): store each clustering's "
                                         r"posterior P\(k \| x\) on eval\.x, normalised over its K components\.$"):
        run_checks(run, select=["T4"])
    run = hand_run(seed)
    run["clusterings"]["resp"][1, 2] = torch.tensor([1.5, -0.5])
    with pytest.raises(InputError, match=r"^clusterings\.resp holds 1 negative value\(s\); responsibilities are "
                                         r"probabilities \(>= 0, each row summing to 1\): store the GMM's posterior "
                                         r"P\(k \| x\) on eval\.x\.$"):
        run_checks(run, select=["T4"])


def test_t4_names_the_snapshot_whose_encoder_mean_overflows(seed):
    run = hand_run(seed)
    st = run["snapshots"]["final"]
    st["enc_mu.weight"] = torch.full_like(st["enc_mu.weight"], 1e38)  # finite, but mu = 1e38 x overflows
    run["snapshots"]["final"] = st
    m = run["eval"]["x"].shape[0]
    with pytest.raises(InputError, match=rf"^the encoder mean of snapshot final rebuilt from snapshots\.final holds "
                                         rf"{2 * m} non-finite value\(s\) \(NaN or inf\) of {2 * m} on eval\.x; the "
                                         r"snapshot's parameters overflow there \(a diverged run\?\): store the last "
                                         r"finite snapshot, or finite outputs\.final\.$"):
        run_checks(run, select=["T4"])
