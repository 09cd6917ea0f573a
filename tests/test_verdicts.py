"""Verdicts that must not hold without evidence (issue 9): regressions for the checks' verdict defects.

Each test here failed on commit af9f029 and passes now. The runs are tests/test_checks.py's hand-built ones
(decoder weight 0, so every snapshot reconstructs a known constant and every loss has a closed form).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_checks import (CSTAR, GEOMETRY, ORDER, TWIN, ctx_of, hand_run, lin_state, naive_floor,
                         naive_param_distance, naive_path)

from hcdiag.checks import collapse, exclusion, inertia
from hcdiag.paper import COLLAPSE_KL

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# defect 1: I2 held whenever the path to the collapsed reference left F_T, which a path to a model outside F_T
# always does


def _no_witness_in_architecture(monkeypatch):
    """As for the conv family: the architecture cannot output an arbitrary constant."""
    monkeypatch.setattr(inertia, "witness_state", lambda ctx, state, c: (None, "the architecture cannot express it"))


def test_i2_without_an_expressible_witness_is_decided_by_the_output_space_path(seed, monkeypatch):
    # the refined model reconstructs c* (= the best constant); the collapsed reference reconstructs xbar, far
    # outside F_T. Before: "holds" because that path left F_T. Now: the output-space path to c* never leaves.
    _no_witness_in_architecture(monkeypatch)
    run = hand_run(seed)
    res = inertia.check_i2(ctx_of(run))
    tc, to = res.values["to_collapsed"], res.values["to_constant_output"]
    assert tc["leaves"] is True and tc["end_inside"] is False  # no evidence: its endpoint lies outside F_T
    assert to["end_inside"] is True and to["leaves"] is False
    np.testing.assert_allclose(to["L"], naive_path(CSTAR, CSTAR, GEOMETRY, [0, 1]), rtol=1e-6)
    assert res.values["deciding_paths"] == ["to_constant_output"]
    assert res.verdict == "fails" and res.witness["path"].startswith("to the best constant in output space")
    assert res.values["to_witness_unavailable"] == "the architecture cannot express it"


def test_i2_output_space_path_holds_when_it_crosses_a_barrier(seed, monkeypatch):
    # TWIN: the run sits at (19.5, 0), the best constant is (0.5, 0); the output path crosses (10, 0), L = 100
    _no_witness_in_architecture(monkeypatch)
    base = hand_run(seed, centroids=TWIN)
    run = hand_run(seed, centroids=TWIN, states={s: lin_state((19.5, 0.0), xbar=base["eval"]["xbar"]) for s in ORDER})
    res = inertia.check_i2(ctx_of(run))
    to = res.values["to_constant_output"]
    np.testing.assert_allclose(to["L"], naive_path((19.5, 0.0), (0.5, 0.0), TWIN, [0, 1]), rtol=1e-5)
    assert res.verdict == "holds" and to["leaves"] is True and res.values["deciding_paths"] == ["to_constant_output"]


def test_i2_is_inconclusive_when_every_path_ends_outside_F_T(seed, monkeypatch):
    # a "witness" at a constant far from every centroid: both endpoints lie outside F_T, so both paths must leave
    # F_T and prove nothing (before: "holds")
    import hcdiag.checks.delta as delta

    far = torch.tensor([10.0, -30.0], dtype=torch.float64)
    monkeypatch.setattr(delta, "delta_star_pair", lambda a, b: SimpleNamespace(c=far, value=0.0))
    res = inertia.check_i2(ctx_of(hand_run(seed)))
    assert res.values["to_witness"]["leaves"] and res.values["to_collapsed"]["leaves"]
    assert not res.values["to_witness"]["end_inside"] and not res.values["to_collapsed"]["end_inside"]
    assert res.verdict == "inconclusive" and res.reason.startswith("no collapsed model inside F_T to draw a path to")
    assert "its endpoint lies outside F_T" in res.reason


# ---------------------------------------------------------------------------------------------------------
# defect 6: I3 counted 'final' (bitwise the last stage-3 snapshot) twice


def test_i3_counts_a_repeated_snapshot_once(seed):
    base = hand_run(seed)
    xbar = base["eval"]["xbar"]
    # a rising distance over init .. stage3_1, then 'final' = stage3_1 bitwise (as hcdiag's trainer writes it)
    states = {s: lin_state((xbar + torch.tensor([float(i), 0.0])).tolist(), xbar=xbar) for i, s in enumerate(ORDER)}
    states["final"] = {k: v.clone() for k, v in states["stage3_1"].items()}
    run = hand_run(seed, states=states)
    res = inertia.check_i3(ctx_of(run))
    distinct = ORDER[:-1]
    col = run["references"]["collapsed"]["state"]
    d = [naive_param_distance(run["snapshots"][s], col) for s in distinct]
    assert res.values["snapshots"] == distinct and res.values["repeated_snapshots"] == ["final"]
    np.testing.assert_allclose(res.values["param_distance"], d, rtol=1e-6)
    sp = spearmanr(range(len(d)), d)
    assert res.values["spearman_rho"] == pytest.approx(sp.statistic) and res.values["p_value"] == pytest.approx(sp.pvalue)
    twice = spearmanr(range(len(d) + 1), d + d[-1:])
    assert twice.pvalue != pytest.approx(sp.pvalue)  # the duplicate would have moved p


# ---------------------------------------------------------------------------------------------------------
# defect 7: T2b's floor note used the smaller floor of the pair, and assumed beta = 1 when none was stated


def test_t2b_note_uses_the_larger_floor_of_the_pair(seed):
    run = hand_run(seed)
    res = exclusion.check_t2b(ctx_of(run))
    xb = np.asarray(run["eval"]["xbar"], np.float64)
    per = [naive_floor(xb, [GEOMETRY[c]], beta=4.0, s2=2.0, convention="literal") for c in (0, 1)]
    assert per[0] != pytest.approx(per[1])
    assert res.values["collapsed_floor"] == pytest.approx(max(per), rel=1e-12)
    assert f"collapsed floor {max(per):.3g} (the larger of the pair's" in res.summary


def test_t2b_states_no_floor_when_the_run_gives_no_beta(seed):
    run = hand_run(seed, reached=False)
    del run["config"]["beta"]
    res = exclusion.check_t2b(ctx_of(run))
    assert res.values["beta"] is None and res.values["collapsed_floor"] is None
    assert res.summary.endswith("collapsed floor not computed: the run states no beta (refinement.beta or config.beta)")
    assert res.verdict == "fails"  # decided by the recomputed eps_T = 0.25 >= eps = 1e-4, not by the floor


def test_t2b_reads_a_constant_schedules_start(seed):
    run = hand_run(seed)
    run["config"]["beta"] = {"schedule": "constant", "start": 0.3, "end": 4.0}
    res = exclusion.check_t2b(ctx_of(run))
    floor = naive_floor(run["eval"]["xbar"], [GEOMETRY[0], GEOMETRY[1]], beta=0.3, s2=2.0, convention="literal")
    assert res.values["beta"] == 0.3 and res.values["beta_from"] == "config.beta.start (constant schedule)"
    assert res.values["collapsed_floor"] == pytest.approx(floor, rel=1e-12)


def test_t2b_says_when_it_assumes_the_literal_convention(seed):
    run = hand_run(seed)
    run["config"]["loss"] = None
    res = exclusion.check_t2b(ctx_of(run))
    assert res.values["convention"] == "literal" and res.values["convention_from"].startswith("assumed")
    assert "literal convention assumed" in res.summary


# ---------------------------------------------------------------------------------------------------------
# defect 9: KL exactly 0.01 failed I1 (<=) but held the KL check (>=)


def test_kl_exactly_at_the_threshold_is_not_collapsed_anywhere(seed, monkeypatch):
    import hcdiag.metrics as metrics

    def at_threshold(mu, logvar):
        out = torch.zeros(mu.shape[1], dtype=torch.float64)
        out[0] = COLLAPSE_KL
        return out

    monkeypatch.setattr(metrics, "kl_per_dim", at_threshold)
    run = hand_run(seed)
    ctx = ctx_of(run)
    kl, i1 = collapse.check_kl(ctx), inertia.check_i1(ctx)
    assert kl.values["final"]["kl"] == COLLAPSE_KL and kl.verdict == "holds"
    assert i1.values["min_kl"] == COLLAPSE_KL and i1.verdict == "holds"
    monkeypatch.setattr(metrics, "kl_per_dim", lambda mu, lv: at_threshold(mu, lv) * (1 - 1e-12))
    ctx = ctx_of(run)
    assert collapse.check_kl(ctx).verdict == "fails" and inertia.check_i1(ctx).verdict == "fails"


def test_the_collapse_threshold_is_written_once():
    """One constant: no comparison in hcdiag's code spells the collapse KL (or any threshold) as 0.01; they
    read hcdiag.paper's COLLAPSE_KL / AU_THRESHOLD (found with the syntax tree, so prose may still say 0.01)."""
    import ast
    from pathlib import Path

    offenders = []
    for p in (Path(__file__).resolve().parents[1] / "hcdiag").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value == 0.01:
                        offenders.append(f"{p.name}:{node.lineno}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------
# a reference with its own architecture: no straight parameter path or distance to it (no crash either)


def test_a_reference_of_another_architecture_gets_no_parameter_path_or_distance(seed):
    from test_checks import MLP0

    from hcdiag.checks import regions
    from hcdiag.models import build_model
    from hcdiag.runfile import validate_run

    run = hand_run(seed, references=("collapsed", "control"))
    other = {**MLP0, "enc_widths": [3], "dec_widths": [3]}
    torch.manual_seed(seed)
    for name in ("collapsed", "control"):
        run["references"][name]["config"]["model"] = other
        run["references"][name]["state"] = build_model(other).state_dict()
    validate_run(run)
    ctx = ctx_of(run)
    i3 = inertia.check_i3(ctx)
    assert i3.verdict == "inconclusive" and "no parameter distance to it" in i3.reason
    i2 = inertia.check_i2(ctx)
    assert "to_collapsed" not in i2.values and i2.values["to_collapsed_unavailable"].startswith("the collapsed reference")
    assert i2.values["deciding_paths"] == ["to_witness"] and i2.verdict == "fails"
    # N3's no-history control is evaluated with its own config.model
    from test_checks import evaluate, naive_losses

    (ctrl,) = [losses for desc, losses in regions.probes(ctx) if desc["probe"] == "control"]
    want = naive_losses(evaluate(other, run["references"]["control"]["state"], run["eval"]["x"])[2], GEOMETRY)
    np.testing.assert_allclose(ctrl.numpy(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# T2 can hold only for a region its own refined model did not form: eps_T >= delta* for every model


def test_t2_holds_only_against_a_threshold_below_delta_star(seed, monkeypatch):
    """delta* is a lower bound of L_(K_T) for EVERY model (claims.md), and eps_T is recomputed from the refined
    model, so on a valid run T2 always fails. Its 'holds' branch is reachable only for a threshold that was not
    formed by the run's own model (here patched in): then it holds exactly when delta* > eps (1 + tau)."""
    from test_checks import naive_delta_star_pair

    from hcdiag.checks.base import Region, RunContext

    geometry = [GEOMETRY[0], [[6.0, 0.0], [20.0, 6.0]], GEOMETRY[2], GEOMETRY[3]]  # delta*(C0, C1) = 9
    run = hand_run(seed, centroids=geometry)
    ds = naive_delta_star_pair(geometry[0], geometry[1])
    real = RunContext.final_region
    for eps, want in ((ds / 1.05 * 0.999, "holds"), (ds / 1.05 * 1.001, "fails")):
        monkeypatch.setattr(RunContext, "final_region",
                            lambda self, eps=eps: Region("F_T", real(self).ids, eps, real(self).snapshot))
        res = exclusion.check_t2(ctx_of(run))
        assert res.values["delta_star"] == ds and res.verdict == want, (eps, res.summary)
        assert (res.witness is None) == (want == "holds")


# ---------------------------------------------------------------------------------------------------------
# review findings: evidence that only looks like evidence


@pytest.mark.parametrize("check", ["KL", "I1", "AU"])
def test_a_snapshot_whose_parameters_overflow_is_refused_not_read_as_kl_inf(seed, check):
    """Finite weights of 1e38 in 'final' give mu = inf: KL = inf used to read as 'not collapsed' (KL holds) and
    NaN ratios slipped past I1's comparisons. Every snapshot rebuilt from parameters must give finite outputs."""
    from hcdiag.checks.barrier import run_checks
    from hcdiag.errors import InputError

    run = hand_run(seed)
    run["snapshots"]["final"]["enc_mu.weight"] = torch.full_like(run["snapshots"]["final"]["enc_mu.weight"], 1e38)
    with pytest.raises(InputError, match=r"the encoder mean of snapshot final rebuilt from snapshots\.final holds \d+ "
                                         r"non-finite value\(s\) \(NaN or inf\) of \d+ on eval\.x; the snapshot's "
                                         r"parameters overflow there"):
        run_checks(run, select=[check])


def test_i2_does_not_count_a_collapsed_reference_that_is_not_collapsed(seed, monkeypatch):
    # the 'collapsed' reference reconstructs c* (inside F_T) with an informative encoder (KL > 0.01): a path to
    # it stays in F_T, but it is no collapsed model, so it decides nothing
    _no_witness_in_architecture(monkeypatch)
    run = hand_run(seed, collapsed_c=CSTAR, collapsed_enc="data")
    res = inertia.check_i2(ctx_of(run))
    tc = res.values["to_collapsed"]
    assert tc["end_inside"] and not tc["leaves"] and tc["kl"] > COLLAPSE_KL and tc["collapsed"] is False
    assert "to_collapsed" not in res.values["deciding_paths"]
    assert "its endpoint is not collapsed" in res.summary
    assert res.values["deciding_paths"] == ["to_constant_output"]


@pytest.mark.parametrize("change, match", [
    (lambda run: run["refinement"].update(eps=0.0), r"refinement\.eps must be a float > 0; got 0\.0\."),
    (lambda run: run["config"].update(hct={"eps": 1e-5}),
     r"^refinement\.eps is 1 but config\.hct\.eps is 1e-05; the refinement's target is one number: write the eps "
     r"the refinement trained towards in both\.$"),
])
def test_t2b_target_must_be_one_positive_number(seed, change, match):
    from hcdiag.errors import InputError
    from hcdiag.runfile import validate_run

    run = hand_run(seed)
    change(run)
    with pytest.raises(InputError, match=match):
        validate_run(run)
