"""hcdiag.claims: one rule per claim. Each rule has a case where it holds, one where it fails and one where its
evidence is missing (inconclusive, never holds), with the deciding numbers checked against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hcdiag import claims
from hcdiag.paper import (COLLAPSE_KL, LINEAR_KL_ATOL, LINEAR_KL_RTOL, PAPER_ABLATION, PAPER_KL_THRESHOLD,
                          PAPER_TABLE1)


def _kls(seed, n, lo, hi):
    return [float(v) for v in np.random.default_rng(seed).uniform(lo, hi, n)]


def test_collapsed_is_one_boundary():
    assert claims.collapsed(COLLAPSE_KL * (1 - 1e-12)) and not claims.collapsed(COLLAPSE_KL)
    assert not claims.collapsed(2.0) and claims.collapsed(0.0)


def test_stat_matches_numpy(seed):
    vals = _kls(seed, 5, 0, 3) + [None, float("nan")]
    st = claims.Stat.of(vals)
    a = np.asarray(vals[:5])
    assert (st.mean, st.n, st.missing) == (pytest.approx(a.mean()), 5, 2)
    assert st.sd == pytest.approx(a.std(ddof=1))
    assert st.text().endswith("(n=5), 2 missing")
    assert claims.Stat.of([]).text() == "-"


@pytest.mark.parametrize("verdicts,want", [(["holds", "holds"], "holds"), (["fails"], "fails"),
                                           (["holds", "fails"], "mixed"), (["holds", "inconclusive"], "inconclusive"),
                                           (["fails", "inconclusive"], "fails"), ([], "inconclusive")])
def test_combine(verdicts, want):
    assert claims.combine(verdicts) == want


def test_vanilla_collapses(seed):
    low, high = _kls(seed, 3, 0, COLLAPSE_KL * 0.99), _kls(seed, 3, 0.02, 1.0)
    r = claims.vanilla_collapses(low, [0, 0, 0], dataset="synthetic")
    assert r.verdict == "holds" and r.values["kl"] == pytest.approx(np.mean(low))
    assert r.values["paper_kl"] == PAPER_TABLE1["synthetic"]["vanilla"][0]
    assert claims.vanilla_collapses(high).verdict == "fails"
    assert claims.vanilla_collapses(low[:1] + high[:1]).verdict == "mixed"
    none = claims.vanilla_collapses([None, None])
    assert none.verdict == "inconclusive" and none.ours == "no final KL measured"


def test_hct_keeps_kl_uses_the_datasets_threshold(seed):
    thr = PAPER_KL_THRESHOLD["synthetic"]
    above, below = [thr + 0.1 + v for v in _kls(seed, 2, 0, 1)], [thr - 0.1 - v for v in _kls(seed, 2, 0, 1)]
    assert claims.hct_keeps_kl("pre", above, dataset="synthetic").verdict == "holds"
    r = claims.hct_keeps_kl("final", below, dataset="synthetic")
    assert r.verdict == "fails" and r.claim == f"HCT (final single-cluster) keeps KL > {thr:g}"
    assert r.id == "table1.hct_final" and r.values["threshold"] == thr
    assert claims.hct_keeps_kl("post", [None], dataset="synthetic").verdict == "inconclusive"


def test_baseline_cell_is_reported_not_decided(seed):
    kl = _kls(seed, 2, 0, 1)
    r = claims.baseline_cell("beta-beta2", kl, dataset="mnist")
    assert r.verdict == "reported" and r.paper == "KL 0.38, AU 5.9"
    assert claims.baseline_cell("anneal", [None]).verdict == "inconclusive"


def test_hct_highest_kl_compares_per_seed_and_never_ranks_collapsed_models(seed):
    base = {"vanilla": {0: 0.3, 1: 0.4}, "beta-beta2": {0: 0.5, 1: 0.2}}
    r = claims.hct_highest_kl({0: 1.0, 1: 0.6}, base)
    assert r.verdict == "holds" and r.values["best_baseline"] == {"0": "beta-beta2", "1": "vanilla"}
    assert r.values["best_baseline_kl"] == pytest.approx(np.mean([0.5, 0.4]))
    assert claims.hct_highest_kl({0: 1.0, 1: 0.35}, base).verdict == "mixed"
    # a collapsed HCT "above" collapsed baselines is noise: fails (the rule verify and the artefacts share)
    tiny = {0: 1e-6}
    r = claims.hct_highest_kl({0: 5e-3}, {"vanilla": tiny})
    assert r.verdict == "fails" and "HCT itself collapsed" in r.ours
    none = claims.hct_highest_kl({0: 1.0}, {"vanilla": {1: 0.1}})  # no baseline at the same seed
    assert none.verdict == "inconclusive"


def test_hct_where_vanilla_collapses():
    assert claims.hct_where_vanilla_collapses({0: 2.0}, {0: 1e-4}).verdict == "holds"
    r = claims.hct_where_vanilla_collapses({0: 2.0}, {0: 0.3})
    assert r.verdict == "fails" and "vanilla did not collapse here" in r.ours
    r = claims.hct_where_vanilla_collapses({0: 1e-5}, {0: 1e-4})
    assert r.verdict == "fails" and "HCT collapsed" in r.ours
    assert claims.hct_where_vanilla_collapses({0: 2.0}, {}).verdict == "inconclusive"
    assert claims.hct_where_vanilla_collapses({0: 2.0, 1: 1e-5}, {0: 1e-4, 1: 1e-4}).verdict == "mixed"


def test_barrier_claim_is_the_checks_own_verdict_over_seeds():
    assert claims.barrier("N1", [("holds", "eps shrinks")]).verdict == "holds"
    r = claims.barrier("T2", [("fails", "a"), ("holds", "b")])
    assert r.verdict == "mixed" and r.ours == "a [1/2 seeds hold]" and r.id == "barrier.T2"
    assert claims.barrier("I2", [("inconclusive", "no path")]).verdict == "inconclusive"
    assert claims.barrier("I3", []).verdict == "inconclusive"


def _linear_rows(seed, lam, multiples, noise=0.0):
    from hcdiag.theory import phase_table

    rng = np.random.default_rng(seed)
    rows = []
    for t in phase_table(lam, multiples, len(lam)):
        dims = np.asarray(t["kl_per_dim"]) + noise * rng.uniform(0, 1, len(lam))
        rows.append({"multiple": t["multiple"], "kl_theory": t["kl"], "au_theory": t["au_burda"],
                     "kl_per_dim_theory": t["kl_per_dim"], "kl_linear": float(dims.sum()), "au_linear": t["au_burda"],
                     "kl_per_dim_linear": sorted(dims.tolist(), reverse=True)})
    return rows


def test_linear_phase_compares_kl_and_active_units_with_the_closed_form(seed):
    lam = [4.0, 2.0, 1.0, 0.5]
    rows = _linear_rows(seed, lam, [0.1, 0.5, 2.0])
    r = claims.linear_phase(rows)
    assert r.verdict == "holds" and [o["verdict"] for o in r.values["rows"]] == ["holds"] * 3
    assert (r.values["atol"], r.values["rtol"]) == (LINEAR_KL_ATOL, LINEAR_KL_RTOL)
    # regression (issue 9, defect 2): a trained KL 150x off the theory used to hold (only collapse was compared)
    off = [dict(row) for row in rows]
    off[1]["kl_linear"] = 150 * off[1]["kl_theory"]
    bad = claims.linear_phase(off)
    assert bad.verdict == "fails" and bad.values["rows"][1]["problems"][0].startswith("KL ")
    assert "off the closed form at m=0.5" in bad.ours
    # the active set: one unit too many
    off = [dict(row) for row in rows]
    off[0]["au_linear"] += 1
    assert claims.linear_phase(off).verdict == "fails"
    # a per-dimension gap beyond the tolerance with the right total
    off = [dict(row) for row in rows]
    d = list(off[0]["kl_per_dim_linear"])
    shift = LINEAR_KL_ATOL + LINEAR_KL_RTOL * d[0] + 0.05
    d[0] += shift
    d[1] -= shift
    off[0]["kl_per_dim_linear"] = d
    assert claims.linear_phase(off).values["rows"][0]["problems"][0].startswith("dimension 1 KL")
    # the tolerance, exactly: just inside holds, just outside fails
    for eps, want in ((0.999, "holds"), (1.001, "fails")):
        near = [dict(rows[0], kl_per_dim_linear=None, kl_per_dim_theory=None)]
        th = near[0]["kl_theory"]
        near[0]["kl_linear"] = th + eps * (LINEAR_KL_ATOL + LINEAR_KL_RTOL * th)
        assert claims.linear_phase(near).verdict == want
    assert claims.linear_phase([{"multiple": 1.0, "kl_theory": 0.0}]).verdict == "inconclusive"
    assert claims.linear_phase([]).verdict == "inconclusive"


def test_mlp_phase_needs_both_sides():
    rows = [{"multiple": 0.5, "kl_mlp": 1.2}, {"multiple": 1.0, "kl_mlp": 0.3}, {"multiple": 2.0, "kl_mlp": 1e-4}]
    r = claims.mlp_phase(rows)
    assert r.verdict == "holds" and r.values["smallest_collapsed_multiple"] == 2.0
    assert [o["verdict"] for o in r.values["rows"]] == ["holds", "reported", "holds"]
    assert claims.mlp_phase([{"multiple": 0.5, "kl_mlp": 1e-3}, {"multiple": 2.0, "kl_mlp": 1e-4}]).verdict == "fails"
    one_side = claims.mlp_phase([{"multiple": 2.0, "kl_mlp": 1e-4}, {"multiple": 5.0, "kl_mlp": 1e-5}])
    assert one_side.verdict == "inconclusive" and "both sides" in one_side.ours


def test_critical_timestep():
    ok = {"linear": {"t_c": 300, "t_snr": 200}, "cosine": {"t_c": 600, "t_snr": 500}}
    assert claims.critical_timestep(ok).verdict == "holds"
    half = {**ok, "cosine": {"t_c": None, "t_c_reason": "lambda_max >= 1", "t_snr": 500}}
    r = claims.critical_timestep(half)
    assert r.verdict == "mixed" and "cosine: t_c = none (lambda_max >= 1)" in r.ours
    assert claims.critical_timestep({"linear": half["cosine"]}).verdict == "fails"
    assert claims.critical_timestep({}).verdict == "inconclusive"


def test_ablation_rule(seed):
    from hcdiag.verify import ABLATIONS

    rng = np.random.default_rng(seed)
    kl = np.sort(rng.uniform(0.02, 3, 3))  # not collapsed

    def verdict(key, pts):
        return claims.ablation(key, pts).verdict

    assert verdict("r0", list(zip([2, 4, 8], kl))) == "holds"
    assert verdict("r0", list(zip([2, 4, 8], kl[::-1]))) == "fails"
    assert verdict("r0", [(32, 1.0), (16, 0.5), (2, 0.1)]) == "holds"  # 32 is beyond 16
    assert verdict("eps", [(1e-3, kl[0]), (1e-4, kl[1])]) == "holds"
    assert verdict("eps", [(1e-3, kl[1]), (1e-4, kl[0])]) == "fails"
    assert verdict("keep_ratio", [(1 / 3, kl[0]), (2 / 3, kl[1])]) == "inconclusive"  # 1/2 not run
    assert verdict("keep_ratio", [(1 / 3, kl[0]), (1 / 2, kl[2]), (2 / 3, kl[1])]) == "holds"
    assert verdict("beta_end", [(1.0, kl[2]), (2.0, kl[0])]) == "fails"
    # the paper's best beta is the RANGE [2, 3]: a best of 2.5 holds, a best of 4 fails
    assert verdict("beta_end", [(1.0, kl[0]), (2.5, kl[2]), (4.0, kl[1])]) == "holds"
    r = claims.ablation("beta_end", [(1.0, kl[0]), (2.5, kl[1]), (4.0, kl[2])])
    assert r.verdict == "fails" and r.ours.endswith("(best tested beta = 4 (paper: [2, 3]))")
    # one measured value has nothing to be best against (the other runs failed): inconclusive, never holds
    one = claims.ablation("keep_ratio", [(0.5, 2.1), (1 / 3, None)])
    assert one.verdict == "inconclusive" and "fewer than two values of keep ratio measured" in one.ours
    assert claims.ablation("r0", [(2, None), (4, None)]).verdict == "inconclusive"
    # every setting collapsed (KL < 0.01): the order that would 'hold' is noise, and the claim fails
    tiny = np.sort(rng.uniform(1e-8, 1e-3, 3))
    r = claims.ablation("r0", list(zip([2, 4, 8], tiny)))
    assert r.verdict == "fails" and f"every tested R0 collapsed (final KL <= {tiny[2]:.3g} < 0.01)" in r.ours
    # ties: the setting changed nothing in training, whatever the paper's best
    for key, vals in ABLATIONS.items():
        k0 = float(rng.uniform(0.5, 3.0))
        r = claims.ablation(key, [(v, k0) for v in vals])
        assert r.verdict == "inconclusive" and "changed nothing in training" in r.ours
        # a single differing value is evidence again: the paper's best value strictly best -> holds
        best = PAPER_ABLATION[key][2]
        best = best[0] if isinstance(best, tuple) else best
        if key == "r0":  # KL non-decreasing in R0 up to 16: a step up at R0 >= 16
            pts = [(v, k0 + (1.0 if v >= best else 0.0)) for v in vals]
        elif key == "eps":  # smaller eps never worse
            pts = [(v, k0 + (1.0 if v <= best else 0.0)) for v in vals]
        else:
            pts = [(v, k0 + (1.0 if v == best else 0.0)) for v in vals]
        assert claims.ablation(key, pts).verdict == "holds", key


def test_table2_hct():
    assert claims.table2_hct([3.0]).verdict == "holds"
    assert claims.table2_hct([1e-3]).verdict == "fails"
    assert claims.table2_hct([None]).verdict == "inconclusive"


def test_row_carries_the_rule_values_and_the_callers():
    r = claims.vanilla_collapses([1e-3], dataset="synthetic").row("synthetic, s2 = 2", runs=["a.pt"], loss="scaled")
    assert r["verdict"] == "holds" and r["item"] == r["claim"] and r["runs"] == ["a.pt"]
    assert r["values"]["loss"] == "scaled" and math.isclose(r["values"]["kl"], 1e-3)


def test_mlp_phase_decides_per_seed_not_on_the_mean():
    # seeds at 0.0 and 0.019 average to 0.0095, which would read as collapsed
    rows = [{"multiple": 0.5, "kl_mlp_seeds": [1.0, 1.2]}, {"multiple": 2.0, "kl_mlp_seeds": [0.0, 0.019]}]
    r = claims.mlp_phase(rows)
    assert r.values["rows"][1]["kl"] == pytest.approx(0.0095) and r.values["rows"][1]["verdict"] == "mixed"
    assert r.verdict == "mixed"
    rows[1]["kl_mlp_seeds"] = [0.02, 0.019]
    assert claims.mlp_phase(rows).verdict == "fails"
    rows[1]["kl_mlp_seeds"] = [None, 0.001]  # a missing seed leaves that multiple (and so that side) undecided
    assert claims.mlp_phase(rows).values["rows"][1]["verdict"] == "inconclusive"
    assert claims.mlp_phase(rows).verdict == "inconclusive"


def test_linear_phase_without_active_units_is_not_decided_by_kl_alone(seed):
    rows = _linear_rows(seed, [4.0, 2.0, 1.0, 0.5], [0.5])
    bare = [dict(rows[0], au_linear=None)]
    r = claims.linear_phase(bare)
    assert r.verdict == "inconclusive" and r.values["rows"][0]["problems"] == ["no active-unit count"]
    bare[0]["kl_linear"] = 10 * bare[0]["kl_theory"] + 1  # a KL off the closed form fails even without units
    assert claims.linear_phase(bare).verdict == "fails"


def test_hct_highest_kl_means_are_over_the_paired_seeds():
    # seed 1 has no baseline: HCT's mean must not include it (2.0 and 0.001 would print 'HCT 1')
    r = claims.hct_highest_kl({0: 2.0, 1: 0.001}, {"vanilla": {0: 0.1}})
    assert r.values["hct_kl"] == 2.0 and r.values["best_baseline_kl"] == 0.1 and r.verdict == "inconclusive"
    assert r.ours.startswith("HCT 2 vs best baseline 0.1 (vanilla)") and "collapsed" not in r.ours
