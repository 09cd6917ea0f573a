"""The barrier checks (issue 4) on hand-built runs whose answers are known in advance.

Every run here is built by hand: an MLP with no hidden layers (``mu = V x + a``, ``xhat = W mu + b``)
whose decoder weight W is ZERO, so ``xhat(x) = b`` for every row and each clustering loss is the
closed form ``l_C = min_k ||b - mu_k^C||^2`` (eq. 8), independent of the encoder. The encoder is set
separately ("data": ``mu = x - xbar``, KL > 0 and active units; "zero": ``q(z|x) = N(0, I)`` exactly,
KL = 0; "const": ``mu = (1, 0)`` for every x). Each check gets a case where it holds and one where
it fails, and the deciding numbers are recomputed naively (loops over rows, clusterings, centroids).

Default geometry (N = 2, K = 2, R0 = 4), with ``c* = (0.5, 0)`` the midpoint of C0 and C1's close pair:

* C0 {(0, 0), (20, 0)}, C1 {(1, 0), (20, 6)}, C2 {(0.5, 1), (20, 10)}, C3 {(0, -10), (20, -10)}.
* Rounds: round0 keeps {0, 1, 2} (F_0), round1 keeps {0, 1} (F_1), refinement pair {0, 1} (F_T).
* Every snapshot from round0 on reconstructs c*: l = (0.25, 0.25, 1, 100.25), so eps_0 = 1,
  eps_1 = eps_T = 0.25 = delta*(C0, C1) (the T2 lower bound is attained).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hcdiag.checks import exclusion, inertia, regions
from hcdiag.checks.barrier import CHECKS, parse_ids, run_checks
from hcdiag.checks.base import RunContext
from hcdiag.errors import InputError
from hcdiag.models import build_model, encode_decode
from hcdiag.runfile import Run, validate_run

N, K, R0 = 2, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

MLP0 = {"family": "mlp", "input_dim": N, "latent_dim": N, "enc_widths": [], "dec_widths": [], "activation": "relu",
        "image_shape": None, "channels": []}
GEOMETRY = [[[0.0, 0.0], [20.0, 0.0]], [[1.0, 0.0], [20.0, 6.0]], [[0.5, 1.0], [20.0, 10.0]],
            [[0.0, -10.0], [20.0, -10.0]]]
CSTAR = (0.5, 0.0)
ORDER = ["init", "round0", "round1", "refined", "stage3_0", "stage3_1", "final"]
STAGE3 = ["stage3_0", "stage3_1"]


# ---------------------------------------------------------------------------------------------------
# building runs by hand

def lin_state(c, *, enc: str = "data", xbar=None, n: int = N, dim: int = N) -> dict:
    """State of MLP0 (no hidden layers) with decoder weight 0 and bias ``c``: ``xhat = c`` for every x."""
    eye = torch.eye(n, dim)
    if enc == "data":  # mu = x - xbar
        w, a = eye.clone(), -(eye @ torch.as_tensor(xbar, dtype=torch.float32))
    elif enc == "zero":  # q(z|x) = N(0, I) exactly
        w, a = torch.zeros(n, dim), torch.zeros(n)
    elif enc == "const":  # mu = (1, 0, ...) for every x
        w, a = torch.zeros(n, dim), torch.zeros(n)
        a[0] = 1.0
    else:
        raise ValueError(enc)
    return {"enc_mu.weight": w, "enc_mu.bias": a, "enc_logvar.weight": torch.zeros(n, dim),
            "enc_logvar.bias": torch.zeros(n), "dec_out.weight": torch.zeros(dim, n),
            "dec_out.bias": torch.as_tensor(c, dtype=torch.float32).clone()}


def naive_losses(xhat, centroids) -> np.ndarray:
    """eq. 8 by loops: ``l_C = mean_x min_k ||xhat(x) - mu_k^C||^2`` for every clustering, float64 (R,)."""
    xh = np.asarray(xhat, dtype=np.float64)
    ce = np.asarray(centroids, dtype=np.float64)
    out = np.zeros(ce.shape[0])
    for r in range(ce.shape[0]):
        tot = 0.0
        for row in xh:
            tot += min(float(np.sum((row - ce[r, k]) ** 2)) for k in range(ce.shape[1]))
        out[r] = tot / xh.shape[0]
    return out


def naive_kl(mu, logvar) -> float:
    mu, lv = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    tot = 0.0
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            tot += 0.5 * (mu[i, j] ** 2 + math.exp(lv[i, j]) - 1.0 - lv[i, j])
    return tot / mu.shape[0]


def naive_au(mu, threshold=0.01) -> int:
    """Burda et al. active units: unbiased Var_x(mu_j) >= threshold, by loops."""
    mu = np.asarray(mu, np.float64)
    m = mu.shape[0]
    count = 0
    for j in range(mu.shape[1]):
        mean = sum(mu[:, j]) / m
        var = sum((v - mean) ** 2 for v in mu[:, j]) / (m - 1)
        count += var >= threshold
    return count


def evaluate(model_cfg, state, x):
    model = build_model(model_cfg)
    model.load_state_dict(state)
    mu, lv, xh = encode_decode(model, torch.as_tensor(x, dtype=torch.float32))
    return mu.numpy(), lv.numpy(), xh.numpy()


def hand_run(seed: int = 0, *, m: int = 60, centroids=GEOMETRY, model=MLP0, states: dict | None = None,
             kept=((0, 1, 2), (0, 1)), pair=(0, 1), reached: bool = True, references=("collapsed",),
             control_c=(0.5, -0.1), collapsed_c=None, collapsed_enc="zero", resp: bool = True, center=(10.0, 4.0),
             s2: float = 2.0, beta_end: float = 4.0, loss: str = "literal", refine_eps: float | None = None) -> dict:
    """A complete, valid hct run dict with the default geometry (see the module docstring).

    ``states`` maps snapshot names (ORDER) to state dicts (default: init at (10, 10), every later
    snapshot at c* with the "data" encoder). The recorded ``eps_t``, ``eps_T``, round losses and
    ``reached`` are computed here by :func:`naive_losses` from the snapshots, as a trainer would record them
    (hcdiag recomputes them and refuses a file that disagrees). ``reached`` picks the refinement's target:
    ``refine_eps`` (default 1.0, above the default geometry's eps_T = 0.25, when ``reached``; else 1e-4).
    """
    g = torch.Generator().manual_seed(seed)
    cents = torch.tensor(centroids, dtype=torch.float32)
    r0, k, dim = cents.shape
    x = torch.tensor(center, dtype=torch.float32) + torch.randn(m, dim, generator=g)
    xbar = x.mean(0)
    if states is None:
        states = {s: lin_state(CSTAR, xbar=xbar) for s in ORDER}
        states["init"] = lin_state((10.0, 10.0), xbar=xbar)
    losses = {s: naive_losses(evaluate(model, st, x)[2], cents) for s, st in states.items()}
    rounds, active = [], list(range(r0))
    for t, kp in enumerate(kept):
        l = losses[f"round{t}"]
        rounds.append({"round": t, "active": torch.tensor(active), "kept": torch.tensor(list(kp)),
                       "losses": torch.tensor(l, dtype=torch.float32), "eps": float(max(l[list(kp)])),
                       "snapshot": f"round{t}"})
        active = list(kp)
    lT = losses["refined"]
    eps = refine_eps if refine_eps is not None else (1.0 if reached else 1e-4)
    centered = (x - xbar).double()
    eig = torch.linalg.eigvalsh(centered.T @ centered / (m - 1)).flip(0).clamp_min(0).float()
    if resp:
        z = torch.sigmoid(3.0 * (x[:, 0] - xbar[0]))  # the teacher's class follows the first coordinate
        T = torch.stack([z, 1 - z], 1)
        if k > 2:
            T = torch.cat([T, torch.zeros(m, k - 2)], 1)
        resp_t = torch.full((r0, m, k), 1.0 / k)
        resp_t[pair[0]] = T
    run = {
        "format": "hcdiag-run", "version": 1, "status": {"complete": True, "stage": "done", "error": None},
        "config": {"method": "hct", "model": dict(model), "s2": s2, "lambda_max": float(eig[0]), "multiple": 2.0,
                   "loss": loss, "beta": {"schedule": "linear", "start": 1.0, "end": beta_end}, "seed": seed},
        "eval": {"x": x, "xbar": xbar, "eigenvalues": eig, "rows": torch.arange(m)},
        "clusterings": {"centroids": cents, "weights": torch.full((r0, k), 1.0 / k), "seeds": torch.arange(r0),
                        "loglik": -torch.ones(r0), "covariance_type": "diag",
                        **({"resp": resp_t} if resp else {})},
        "rounds": rounds,
        "refinement": {"pair": torch.tensor(list(pair)), "reached": bool(max(lT[list(pair)]) < eps), "eps": eps,
                       "eps_T": float(max(lT[list(pair)])), "epochs": 7,
                       "losses": torch.tensor([[1.0, 1.0], [float(lT[pair[0]]), float(lT[pair[1]])]]),
                       "snapshot": "refined"},
        "stage3": {"clustering": int(pair[0]), "epochs": 4, "snapshots": list(STAGE3)},
        "snapshot_order": list(ORDER),
        "snapshots": states,
    }
    refs = {}
    ref_cfg = {"s2": 10.0 * s2, "multiple": 10.0, "method": "vanilla", "model": dict(model)}
    if "collapsed" in references:
        refs["collapsed"] = {"config": dict(ref_cfg), "metrics": {"kl": 0.0},
                             "state": lin_state(xbar if collapsed_c is None else collapsed_c, enc=collapsed_enc,
                                                xbar=xbar)}
    if "control" in references:
        refs["control"] = {"config": {**ref_cfg, "pair": list(pair)}, "state": lin_state(control_c, xbar=xbar)}
    if refs:
        run["references"] = refs
    validate_run(run)
    return run


def ctx_of(run, **kw) -> RunContext:
    return RunContext(Run(run), **kw)


def strip_seconds(doc):
    """A JSON document without the wall-clock timings (the only non-deterministic values)."""
    if isinstance(doc, dict):
        return {k: strip_seconds(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [strip_seconds(v) for v in doc]
    return doc


def naive_regions(run) -> list[tuple[str, list[int], float, str]]:
    """(name, ids, eps, snapshot) of F_0 ... F_T, read straight from the run dict (Def. 4.2)."""
    out = [(f"F_{r['round']}", [int(i) for i in r["kept"]], float(r["eps"]), r["snapshot"]) for r in run["rounds"]]
    ref = run["refinement"]
    return out + [("F_T", [int(i) for i in ref["pair"]], float(ref["eps_T"]), ref["snapshot"])]


def snapshot_losses(run, name) -> np.ndarray:
    return naive_losses(evaluate(run["config"]["model"], run["snapshots"][name], run["eval"]["x"])[2],
                        run["clusterings"]["centroids"])


def const_losses(c, centroids) -> np.ndarray:
    return naive_losses(np.asarray(c, np.float64)[None, :], centroids)


def by_id(results):
    return {r.id: r for r in results}


def with_states(run_kw=None, seed=0, **changes):
    """hand_run with some snapshots replaced: ``changes[name] = (c, enc)``."""
    base = hand_run(seed, **(run_kw or {}))
    xbar = base["eval"]["xbar"]
    states = dict(base["snapshots"])
    for name, (c, enc) in changes.items():
        states[name] = lin_state(c, enc=enc, xbar=xbar)
    return hand_run(seed, states=states, **(run_kw or {}))


# ---------------------------------------------------------------------------------------------------
# Lemma 4.3: N1, N2, N3

def test_n1_holds_when_eps_shrinks_and_reads_the_recorded_thresholds(seed):
    run = hand_run(seed)
    res = regions.check_n1(ctx_of(run))
    regs = naive_regions(run)
    assert res.verdict == "holds" and res.witness is None
    assert res.values["regions"] == ["F_0", "F_1", "F_T"]
    assert res.values["eps"] == [e for _, _, e, _ in regs]
    # eps_t = max_{C in K_t} l_C at the round's snapshot, by loops
    for name, ids, eps, snap in regs:
        assert eps == pytest.approx(max(snapshot_losses(run, snap)[ids]), rel=1e-6)
    assert all(b <= a for (_, _, a, _), (_, _, b, _) in zip(regs, regs[1:]))


def test_n1_fails_when_eps_rises_with_the_largest_rise_as_witness(seed):
    run = with_states(seed=seed, refined=((0.5, 0.7), "data"))  # eps_T = 0.25 + 0.49 > eps_1 = 0.25
    res = regions.check_n1(ctx_of(run))
    regs = naive_regions(run)
    rises = [(b[2] / a[2], a[0], b[0]) for a, b in zip(regs, regs[1:]) if b[2] > a[2]]
    assert res.verdict == "fails" and rises
    ratio, frm, to = max(rises)
    assert (res.witness["from"], res.witness["to"]) == (frm, to) == ("F_1", "F_T")
    assert res.witness["ratio"] == pytest.approx(ratio, rel=1e-12)
    assert res.witness["eps_to"] == pytest.approx(max(const_losses((0.5, 0.7), GEOMETRY)[[0, 1]]), rel=1e-6)


def naive_n2(run, tol=0.05):
    order = run["snapshot_order"]
    worst, n_out, pairs = None, 0, 0
    for name, ids, eps, snap in naive_regions(run):
        for s in order[order.index(snap) + 1:]:
            ratio = max(snapshot_losses(run, s)[ids]) / eps
            pairs += 1
            n_out += ratio > 1 + tol
            if worst is None or ratio > worst[0]:
                worst = (ratio, name, s)
    return worst, n_out, pairs


def test_n2_holds_when_every_later_snapshot_stays_in_every_earlier_region(seed):
    run = hand_run(seed)
    res = regions.check_n2(ctx_of(run))
    (ratio, _, _), n_out, pairs = naive_n2(run)
    assert res.verdict == "holds" and n_out == 0
    assert res.values["worst_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert sum(len(rows) for rows in res.values["curves"].values()) == pairs == 5 + 4 + 3


def test_n2_fails_when_a_later_snapshot_leaves_an_earlier_region(seed):
    run = with_states(seed=seed, final=((0.5, 0.3), "data"))  # l_0 = l_1 = 0.34 > 0.25 (1 + tau)
    res = regions.check_n2(ctx_of(run))
    (ratio, region, snap), n_out, _ = naive_n2(run)
    assert res.verdict == "fails" and snap == "final" and n_out == 2  # F_1 and F_T, not F_0 (l_2 = 0.49 < 1)
    assert res.witness["snapshot"] == snap and res.witness["region"] == region
    assert res.witness["ratio"] == pytest.approx(ratio, rel=1e-6) == pytest.approx(0.34 / 0.25, rel=1e-6)
    assert res.summary.startswith(f"{n_out} (region, later snapshot) pairs leave")
    # the stated tolerance decides: with tau = 0.5 the same run holds
    assert regions.check_n2(ctx_of(run, tolerance=0.5)).verdict == "holds"


def test_n3_holds_when_inclusion_is_provable_and_counts_every_probe(seed):
    # C2 duplicates C0, so l_2 = l_0 for EVERY model: F_1 ⊂ F_0 is a theorem here, whatever the probes
    geometry = [GEOMETRY[0], GEOMETRY[1], GEOMETRY[0], GEOMETRY[3]]
    run = hand_run(seed, centroids=geometry, references=("collapsed", "control"))
    res = regions.check_n3(ctx_of(run))
    n = len(ORDER)
    assert res.verdict == "holds" and res.values["witnesses"] == 0 and res.witness is None
    # snapshots + 4 radii x 3 draws of each + 3 points on each of the n - 1 segments + the control
    assert res.values["probes"] == n + n * 4 * 3 + (n - 1) * 3 + 1
    assert res.values["parameter_probes"] is True


def test_n3_names_each_kind_of_probe_in_words():
    label = regions._probe_label
    assert label({"probe": "snapshot", "snapshot": "round1"}) == "snapshot round1"
    assert label({"probe": "perturbation", "snapshot": "stage3_2", "radius": 0.1, "draw": 2}) == \
        "perturbation of stage3_2 (radius 0.1)"
    assert label({"probe": "line", "from": "refined", "to": "stage3_0", "alpha": 0.25}) == \
        "line refined -> stage3_0 at alpha 0.25"
    assert label({"probe": "control", "pair": [3, 5]}) == "control (trained on the final pair only)"


def test_n3_fails_with_the_no_history_control_as_witness(seed):
    run = hand_run(seed, references=("collapsed", "control"))  # control at (0.5, -0.1)
    ctx = ctx_of(run)
    res = regions.check_n3(ctx, radii=(), alphas=())  # snapshots and the control only
    ctrl = const_losses((0.5, -0.1), GEOMETRY)
    (_, ids0, eps0, _), (_, ids1, eps1, _) = naive_regions(run)[:2]
    assert max(ctrl[ids1]) <= eps1 * 1.05 and max(ctrl[ids0]) > eps0 * 1.05  # in F_1, not in F_0 (naive)
    assert res.verdict == "fails" and res.values["probes"] == len(ORDER) + 1
    w = res.witness
    assert (w["probe"], w["in"], w["not_in"]) == ("control", "F_1", "F_0")
    assert "strongest: control (trained on the final pair only) in F_1, L/eps = " in res.summary
    np.testing.assert_allclose(w["losses"], ctrl, rtol=1e-6)
    assert w["L_earlier_over_eps"] == pytest.approx(max(ctrl[ids0]) / eps0, rel=1e-6)
    assert w["L_later_over_eps"] == pytest.approx(max(ctrl[ids1]) / eps1, rel=1e-6)
    # the full probe set finds it too
    full = regions.check_n3(ctx_of(run))
    assert full.verdict == "fails" and full.values["witness_counts"].get("F_1 \\ F_0", 0) >= 1


# ---------------------------------------------------------------------------------------------------
# Theorem 4.4: T1, T2, T2b, T3, T4

def naive_delta_t1(xbar, centroids):
    best = None
    xb = np.asarray(xbar, np.float64)
    for c, clustering in enumerate(np.asarray(centroids, np.float64)):
        for k, mu in enumerate(clustering):
            d = float(np.sum((xb - mu) ** 2))
            if best is None or d < best[0]:
                best = (d, c, k)
    return best


def test_t1_holds_when_eps_T_is_below_the_papers_delta(seed):
    run = hand_run(seed)
    res = exclusion.check_t1(ctx_of(run))
    d, c, k = naive_delta_t1(run["eval"]["xbar"], GEOMETRY)
    assert res.verdict == "holds"
    assert res.values["delta"] == pytest.approx(d, rel=1e-12)
    assert (res.values["clustering"], res.values["centroid"]) == (c, k)
    assert res.values["eps_T"] == run["refinement"]["eps_T"] < d


def test_t1_fails_when_a_centroid_sits_next_to_the_data_mean(seed):
    probe = hand_run(seed)
    near = (probe["eval"]["xbar"] + torch.tensor([0.1, 0.0])).tolist()
    geometry = [GEOMETRY[0], GEOMETRY[1], GEOMETRY[2], [GEOMETRY[3][0], near]]
    run = hand_run(seed, centroids=geometry)
    res = exclusion.check_t1(ctx_of(run))
    d, c, k = naive_delta_t1(run["eval"]["xbar"], run["clusterings"]["centroids"])
    assert (c, k) == (3, 1) and d == pytest.approx(0.01, rel=1e-4)
    assert res.verdict == "fails" and res.values["delta"] == pytest.approx(d, rel=1e-12)
    # regression (issue 9, defect 5): the witness is the mean-reconstructing model's OWN historical loss on
    # K_T, max over the pair of delta_C (here C0 and C1, far from xbar), not delta (a minimum over S_0)
    xb = np.asarray(run["eval"]["xbar"], np.float64)
    L = max(min(float(np.sum((xb - np.asarray(mu, np.float64)) ** 2)) for mu in GEOMETRY[c]) for c in (0, 1))
    assert res.witness["historical_loss"] == pytest.approx(L, rel=1e-6) and L > 100 * d
    assert res.witness["eps_T"] == pytest.approx(run["refinement"]["eps_T"]) and res.witness["eps_T"] >= d
    assert res.witness["in_F_T"] is False and "still lies outside F_T" in res.summary
    assert "the mean-reconstructing model is in F_T" not in res.summary


def naive_delta_star_pair(ca, cb) -> float:
    return min(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) / 4 for a in ca for b in cb)


def test_t2_fails_with_an_exactly_collapsed_witness_inside_F_T(seed):
    run = hand_run(seed)
    res = exclusion.check_t2(ctx_of(run))
    ds = naive_delta_star_pair(GEOMETRY[0], GEOMETRY[1])
    assert res.verdict == "fails"
    assert res.values["delta_star"] == ds and res.values["closest_centroids"] == [0, 0]
    assert res.witness["kl"] == 0.0 and res.witness["historical_loss"] == ds  # exact, in the architecture
    assert res.values["witness_built_in"] == "architecture"
    assert res.witness["c"] == [0.5, 0.0]
    # per region: F_T and F_1 ({0, 1}) have delta* of the pair; F_0 ({0, 1, 2}) is the best constant found
    # by brute force on a grid that contains the circumcentre (0.5, 0.375) of the three close centroids
    per = {p["region"]: p for p in res.values["per_region"]}
    assert per["F_T"]["delta_star"] == per["F_1"]["delta_star"] == ds
    grid = np.arange(-2.0, 22.0, 0.125)
    gx, gy = np.meshgrid(grid, grid)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)  # (P, 2)
    cents = np.asarray(GEOMETRY, np.float64)[[0, 1, 2]]  # (3, K, 2)
    hist = np.max(np.min(((pts[:, None, None, :] - cents[None]) ** 2).sum(-1), axis=2), axis=1)  # (P,)
    assert per["F_0"]["delta_star"] == pytest.approx(hist.min(), rel=1e-9)
    pair_lb = max(naive_delta_star_pair(cents[a], cents[b]) for a in range(3) for b in range(a + 1, 3))
    assert per["F_0"]["delta_star"] >= pair_lb


def test_t2_witness_in_the_mlp_architecture_has_kl_zero_and_loss_delta_star(seed):
    """A real MLP (hidden layers, random weights) on random integer centroids: the witness built from the
    refined snapshot has KL exactly 0 and historical loss exactly delta* (half-integer midpoints are exact
    in float32); every snapshot's L_{a,b} is >= delta* (the lower bound of claims.md T2)."""
    rng = np.random.default_rng(seed)
    dim, k = 4, 3
    cents = rng.integers(-6, 7, size=(R0, k, dim)).astype(np.float64)
    model = {"family": "mlp", "input_dim": dim, "latent_dim": 2, "enc_widths": [8], "dec_widths": [8],
             "activation": "tanh", "image_shape": None, "channels": []}
    states = {s: build_model(model, seed=int(rng.integers(1 << 30))).state_dict() for s in ORDER}
    run = hand_run(seed, centroids=cents.tolist(), model=model, states=states, center=(0.0,) * dim, references=())
    res = exclusion.check_t2(ctx_of(run))
    a, b = [int(i) for i in run["refinement"]["pair"]]
    ds = naive_delta_star_pair(cents[a], cents[b])
    assert res.values["delta_star"] == ds
    assert res.verdict == "fails" and res.witness["kl"] == 0.0 and res.witness["historical_loss"] == ds
    assert res.values["witness_kl"] == 0.0 and res.values["witness_historical_loss"] == ds
    assert res.values["witness_built_in"] == "architecture"
    for s in ORDER:
        assert max(snapshot_losses(run, s)[[a, b]]) >= ds * (1 - 1e-6)
    assert run["refinement"]["eps_T"] >= ds * (1 - 1e-6) and res.verdict == "fails"  # it can never hold honestly


def test_t2_uses_the_recomputed_eps_T_and_a_recorded_one_below_delta_star_is_refused(seed):
    """C1 far from C0 (delta* = 9). A run that RECORDS eps_T = 0.25, below what any model can reach (a
    producer's claim, e.g. measured on other rows), used to make T2 hold. Now run_checks refuses the file
    (the refined snapshot gives eps_T = l_1 = 5.5^2 = 30.25), and T2 itself reads the recomputed eps_T."""
    geometry = [GEOMETRY[0], [[6.0, 0.0], [20.0, 6.0]], GEOMETRY[2], GEOMETRY[3]]
    run = hand_run(seed, centroids=geometry)
    eps_T = max(snapshot_losses(run, "refined")[[0, 1]])
    assert eps_T == pytest.approx(30.25, rel=1e-6)
    run["refinement"]["eps_T"] = 0.25
    with pytest.raises(InputError, match=r"^refinement\.eps_T is 0\.25 but the refined snapshot gives 30\.25\d* on "
                                         r"eval\.x \(max\(l_a, l_b\) over refinement\.pair \[0, 1\]; tolerance "):
        run_checks(run, select=["T2"])
    res = exclusion.check_t2(ctx_of(run))
    ds = naive_delta_star_pair(geometry[0], geometry[1])
    assert ds == 9.0 and res.values["delta_star"] == ds
    assert res.values["eps_T"] == pytest.approx(eps_T, rel=1e-9)
    assert res.verdict == "fails" and res.values["witness_historical_loss"] == ds <= eps_T


def test_t2_shared_centroid_drives_delta_star_to_zero(seed):
    geometry = [GEOMETRY[0], [[0.0, 0.0], [20.0, 6.0]], GEOMETRY[2], GEOMETRY[3]]  # C0 and C1 share (0, 0)
    run = hand_run(seed, centroids=geometry)
    res = exclusion.check_t2(ctx_of(run))
    assert res.verdict == "fails" and res.values["delta_star"] == 0.0
    assert res.witness["historical_loss"] == 0.0 and res.witness["kl"] == 0.0
    naive_shared = [(a, k, b, j) for a in range(R0) for b in range(a + 1, R0) for k in range(K) for j in range(K)
                    if np.sqrt(np.sum((np.asarray(geometry[a][k]) - np.asarray(geometry[b][j])) ** 2))
                    <= res.values["shared_tol"]]
    assert [tuple(p[:4]) for p in res.values["shared_centroid_pairs"]] == naive_shared == [(0, 0, 1, 0)]


def naive_floor(xbar, clusterings, *, beta, s2, convention):
    """The refinement floor of a collapsed model: per clustering the closest centroid's pulled loss, then the
    LARGER over the pair (the stop rule max(l_a, l_b) < eps needs both below eps)."""
    pull = 2 * beta * s2 if convention in ("literal", "mean") else beta
    xb = np.asarray(xbar, np.float64)
    return max(min(float(np.sum((xb - np.asarray(mu, np.float64)) ** 2)) / (1 + pull) ** 2 for mu in cl)
               for cl in clusterings)


@pytest.mark.parametrize("convention", ["literal", "scaled"])
def test_t2b_holds_when_eps_was_reached_and_reports_the_collapsed_floor(seed, convention):
    run = hand_run(seed, loss=convention)
    run["refinement"]["eps"] = 1.0  # above eps_T = 0.25: reached, as recomputed from the refined model
    res = exclusion.check_t2b(ctx_of(run))
    floor = naive_floor(run["eval"]["xbar"], [GEOMETRY[0], GEOMETRY[1]], beta=4.0, s2=2.0, convention=convention)
    assert res.verdict == "holds" and res.values["reached"] is True and res.values["epochs"] == 7
    assert res.values["collapsed_floor"] == pytest.approx(floor, rel=1e-12)
    assert res.values["eps_below_collapsed_floor"] is (1.0 < floor)
    assert (res.values["beta"], res.values["s2"], res.values["convention"]) == (4.0, 2.0, convention)


def test_t2b_fails_when_eps_was_not_reached_and_uses_the_recorded_beta(seed):
    run = hand_run(seed, reached=False)
    run["refinement"]["beta"] = 0.5  # the refinement's own beta wins over config.beta.end
    run["refinement"]["eps"] = 0.1  # below eps_T = 0.25
    res = exclusion.check_t2b(ctx_of(run))
    floor = naive_floor(run["eval"]["xbar"], [GEOMETRY[0], GEOMETRY[1]], beta=0.5, s2=2.0, convention="literal")
    assert res.verdict == "fails" and res.witness == {"eps_T": pytest.approx(run["refinement"]["eps_T"]), "epochs": 7}
    assert res.values["collapsed_floor"] == pytest.approx(floor, rel=1e-12)
    assert res.values["eps_below_collapsed_floor"] is (0.1 < floor)
    assert "NOT reached in 7 epochs" in res.summary


def test_t2b_floor_matches_a_constant_trained_on_the_pipelines_literal_loss(seed):
    """Train a CONSTANT reconstruction c (KL = 0 by construction) by full-batch Adam on the literal per-sample
    loss ||x - c||^2 / (2 s2) + beta min_k ||c - mu_k||^2: the trained ||c - mu||^2 is T2b's floor."""
    from hcdiag.checks.delta import t2b_floor

    run = hand_run(seed, m=80)
    x = run["eval"]["x"].double()
    cl = torch.tensor(GEOMETRY[2], dtype=torch.float64)  # C2 = {(0.5, 1), (20, 10)}
    s2, beta = 2.0, 0.05  # pull 2 beta s2 = 0.2: c settles well away from both xbar and the centroid
    c = x.mean(0).clone().requires_grad_(True)
    steps = 600
    opt = torch.optim.Adam([c], lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    for _ in range(steps):
        opt.zero_grad()
        per = ((x - c) ** 2).sum(1) / (2 * s2) + beta * ((c - cl) ** 2).sum(1).min()  # (m,), literal
        per.mean().backward()
        opt.step()
        sched.step()
    l_trained = float(((c.detach() - cl) ** 2).sum(1).min())
    f = t2b_floor(run["eval"]["xbar"], cl, beta=beta, s2=s2, convention="literal")
    # full-batch gradients with a learning rate decayed to 0: no SGD noise, so only Adam's last steps
    # (of size ~ lr/steps) separate c from the exact minimiser; 1e-3 relative is far above that
    assert l_trained == pytest.approx(f.l, rel=1e-3)
    np.testing.assert_allclose(c.detach().numpy(), f.c.numpy(), rtol=0, atol=1e-3)


def test_t2b_floor_is_approached_by_the_real_trainer_when_the_encoder_collapses(seed, tmp_path):
    """hcdiag's own trainer, method 'hct', s2 = 1e4 lambda_max: the KL term dominates, the encoder collapses
    (KL ~ 0) and the decoder settles at a constant. Under the 'scaled' convention the floor is non-trivial,
    ``||xbar - mu||^2 / (1 + beta)^2`` (under 'literal' it would be ~0 at this s2, a vacuous comparison)."""
    from hcdiag.checks.delta import t2b_floor
    from hcdiag.runfile import load_run
    from hcdiag.train import Trainer, make_config

    rng = np.random.default_rng(seed)
    n, d = 300, 4
    means = rng.normal(0, 3.0, size=(2, d))
    x = (means[rng.integers(0, 2, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)
    cfg = make_config(None, seed=seed % (2**31), method="hct", multiple=1e4, loss="scaled", enc_widths=(8,),
                      dec_widths=(8,), latent_dim=2, batch_size=n, r0=2, k=2, steps_per_clustering=25,
                      refine_cap=40, stage3_epochs=1, stage3_snapshots=1, eval_rows=200, references=(), lr=0.01,
                      epochs=1, device="cpu")
    Trainer(cfg, x, tmp_path / "run.pt").run()
    run = load_run(tmp_path / "run.pt")
    ref = run.refinement
    res = exclusion.check_t2b(RunContext(run))
    a = ref.pair[0]
    f = t2b_floor(run.xbar, run.centroids[a].double(), beta=ref.beta, s2=run.s2, convention="scaled")
    assert res.values["collapsed_floor"] == pytest.approx(f.l, rel=1e-12)
    assert res.values["floors"][str(a)]["l"] == pytest.approx(f.l, rel=1e-12)
    model = build_model(run.config.model)
    model.load_state_dict(run.snapshot("refined"))
    mu, lv, xh = encode_decode(model, run.eval_x)
    assert naive_kl(mu.numpy(), lv.numpy()) < 1e-3  # collapsed
    # the constant settles in the basin of the centroid it was pulled to, which need not be the one nearest
    # xbar (that one gives the floor, the minimum over centroids): compare with that basin's own floor.
    # Tolerance 10%, either side: full-batch Adam at lr 0.01 for ~2000 steps; z is still sampled in the
    # training loss while l_a is measured at xhat = f(mu(x)) (f(0) need not be E_z f(z)), and the
    # refinement alternates the pair's two pulls, whose centroids differ slightly: l_a can sit a little
    # above or below the single-clustering floor (measured: +1.6% at seed 0, -0.2% at seed 33).
    c_hat = xh.double().mean(0)
    basin = int(((run.centroids[a].double() - c_hat) ** 2).sum(1).argmin())
    l_a = float(ref.losses[-1][0])
    assert l_a == pytest.approx(float(f.per_centroid[basin]), rel=0.1)
    assert l_a >= 0.9 * f.l  # and no collapsed model gets far below the floor


def test_t3_holds_for_a_reference_that_reconstructs_the_data_mean(seed):
    run = hand_run(seed)  # collapsed reference: q = N(0, I), xhat = xbar
    res = exclusion.check_t3(ctx_of(run))
    xbar = run["eval"]["xbar"]
    dC = [min(float(np.sum((np.asarray(xbar, np.float64) - np.asarray(mu)) ** 2)) for mu in cl) for cl in GEOMETRY]
    assert res.verdict == "holds"
    assert res.values["kl"] == 0.0 and res.values["collapsed"] is True and res.values["below_delta"] == []
    np.testing.assert_allclose(res.values["delta_C"], dC, rtol=1e-12)
    np.testing.assert_allclose(res.values["losses"], const_losses(xbar, GEOMETRY), rtol=1e-6)
    assert res.values["spread"] == pytest.approx(0.0, abs=1e-9)
    x = np.asarray(run["eval"]["x"], np.float64)
    total = sum(float(np.sum((row - x.mean(0)) ** 2)) for row in x) / len(x)
    assert res.values["total_variance"] == pytest.approx(total, rel=1e-5)


def test_t3_fails_when_the_reference_is_not_collapsed(seed):
    run = hand_run(seed, collapsed_enc="data")  # mu = x - xbar: KL = mean ||x - xbar||^2 / 2 > 0.01
    res = exclusion.check_t3(ctx_of(run))
    mu, lv, _ = evaluate(MLP0, run["references"]["collapsed"]["state"], run["eval"]["x"])
    assert res.verdict == "fails" and "not collapsed" in res.summary
    assert res.witness["kl"] == pytest.approx(naive_kl(mu, lv), rel=1e-5) and res.witness["kl"] >= 0.01


def test_t3_fails_when_the_collapsed_reference_sits_on_a_centroid(seed):
    run = hand_run(seed, collapsed_c=(0.0, 0.0))  # on C0's centroid: l_0 = 0 < delta_0
    res = exclusion.check_t3(ctx_of(run))
    xbar = np.asarray(run["eval"]["xbar"], np.float64)
    l = const_losses((0.0, 0.0), GEOMETRY)
    dC = [min(float(np.sum((xbar - np.asarray(mu)) ** 2)) for mu in cl) for cl in GEOMETRY]
    below = [i for i in range(R0) if l[i] < dC[i] * (1 - 0.05)]
    assert res.verdict == "fails" and res.values["kl"] == 0.0
    assert res.values["below_delta"] == below and below[0] == 0
    assert res.witness["clustering"] == 0 and res.witness["l_C"] == 0.0
    assert res.witness["delta_C"] == pytest.approx(dC[0], rel=1e-12)


def naive_teacher_information(T) -> float:
    T = np.asarray(T, np.float64)
    T = T / T.sum(1, keepdims=True)  # T4 renormalises the stored (float32) responsibilities
    mean = T.mean(0)
    h = lambda p: -sum(v * math.log(v) for v in p if v > 0)  # noqa: E731
    return h(mean) - sum(h(row) for row in T) / len(T)


def test_t4_holds_when_the_latent_mean_carries_the_teachers_class(seed):
    run = hand_run(seed)
    res = exclusion.check_t4(ctx_of(run))
    T = run["clusterings"]["resp"][0]
    info = naive_teacher_information(T[1::2])  # the held-out (odd) rows
    assert res.verdict == "holds" and res.values["certified"] is True and res.values["clustering"] == 0
    assert res.values["teacher_information"] == pytest.approx(info, rel=1e-9)
    assert res.values["loss"] < info - 0.05 and res.values["margin"] == 0.05
    assert (res.values["n_fit"], res.values["n_eval"]) == (30, 30)
    # the constant collapsed reference cannot be certified: it pays at least I_T
    col = res.values["collapsed_reference"]
    assert col["certified"] is False and col["loss"] >= info - 1e-9


def test_t4_fails_for_a_constant_encoder_which_pays_at_least_I_T(seed):
    run = with_states(seed=seed, final=(CSTAR, "const"))
    res = exclusion.check_t4(ctx_of(run))
    info = naive_teacher_information(run["clusterings"]["resp"][0][1::2])
    assert res.verdict == "fails" and res.values["certified"] is False
    # any input-independent student pays I_T + KL(mean T || W) >= I_T on the held-out rows
    assert res.values["loss"] >= info - 1e-9
    assert res.witness == {"loss": res.values["loss"], "teacher_information": pytest.approx(info, rel=1e-9),
                           "margin": 0.05}


def test_t4_is_inconclusive_without_responsibilities(seed):
    res = exclusion.check_t4(ctx_of(hand_run(seed, resp=False)))
    assert res.verdict == "inconclusive" and "stores no responsibilities" in res.reason


# ---------------------------------------------------------------------------------------------------
# Corollary 4.5: I1, I2, I3

def test_i1_holds_when_stage3_stays_in_F_T_with_kl_above_threshold(seed):
    run = hand_run(seed)
    res = inertia.check_i1(ctx_of(run))
    ids, eps = [0, 1], run["refinement"]["eps_T"]
    assert res.verdict == "holds" and [r["snapshot"] for r in res.values["rows"]] == STAGE3 + ["final"]
    for row in res.values["rows"]:
        mu, lv, xh = evaluate(MLP0, run["snapshots"][row["snapshot"]], run["eval"]["x"])
        assert row["ratio"] == pytest.approx(max(naive_losses(xh, GEOMETRY)[ids]) / eps, rel=1e-6)
        assert row["kl"] == pytest.approx(naive_kl(mu, lv), rel=1e-5)
        assert row["au"] == naive_au(mu) == 2
    assert res.values["min_kl"] > 0.01


def test_i1_fails_when_stage3_leaves_F_T(seed):
    run = with_states(seed=seed, stage3_1=((0.5, 0.3), "data"))
    res = inertia.check_i1(ctx_of(run))
    ratio = max(const_losses((0.5, 0.3), GEOMETRY)[[0, 1]]) / run["refinement"]["eps_T"]
    assert res.verdict == "fails" and res.witness["snapshot"] == "stage3_1"
    assert res.values["max_ratio"] == pytest.approx(ratio, rel=1e-6) and "leaves F_T" in res.summary


def test_i1_fails_when_kl_collapses_during_stage3(seed):
    run = with_states(seed=seed, final=(CSTAR, "zero"))
    res = inertia.check_i1(ctx_of(run))
    assert res.verdict == "fails" and res.values["min_kl"] == 0.0 and "KL falls to 0 < 0.01" in res.summary


TWIN = [[[0.0, 0.0], [20.0, 0.0]], [[1.0, 0.0], [19.0, 0.0]], [[0.5, 1.0], [19.5, 1.0]], GEOMETRY[3]]


def naive_path(c0, c1, centroids, ids, points=21):
    """L_{K_T} along the straight path between two constant-output models (decoder weight 0 all along)."""
    out = []
    for a in np.linspace(0.0, 1.0, points):
        c = (1 - a) * np.asarray(c0, np.float64) + a * np.asarray(c1, np.float64)
        out.append(max(const_losses(c, centroids)[ids]))
    return np.array(out)


def test_i2_fails_when_the_straight_path_to_the_witness_stays_in_F_T(seed):
    run = hand_run(seed)  # Theta_T reconstructs c* = the witness's own constant
    res = inertia.check_i2(ctx_of(run))
    tw = res.values["to_witness"]
    L = naive_path(CSTAR, CSTAR, GEOMETRY, [0, 1])
    assert res.verdict == "fails" and tw["leaves"] is False and tw["leaves_at"] is None
    np.testing.assert_allclose(tw["L"], L, rtol=1e-6)
    assert res.witness["max_L"] == pytest.approx(L.max(), rel=1e-6)
    assert res.values["to_collapsed"]["leaves"] is True  # the reference at xbar is far outside


def test_i2_holds_when_both_paths_leave_F_T(seed):
    # two equally good midpoints, (0.5, 0) and (19.5, 0); the run sits at the second, the witness is built at
    # the first (closest pair (0, 0) comes first), so the path crosses (10, 0) where L = 100
    base = hand_run(seed, centroids=TWIN)
    states = {s: lin_state((19.5, 0.0), xbar=base["eval"]["xbar"]) for s in ORDER}
    run = hand_run(seed, centroids=TWIN, states=states)
    res = inertia.check_i2(ctx_of(run))
    eps = run["refinement"]["eps_T"]
    L = naive_path((19.5, 0.0), (0.5, 0.0), TWIN, [0, 1])
    alphas = np.linspace(0, 1, 21)
    tw = res.values["to_witness"]
    assert res.verdict == "holds" and tw["leaves"] is True
    np.testing.assert_allclose(tw["L"], L, rtol=1e-5)
    assert tw["leaves_at"] == pytest.approx(alphas[np.argmax(L > eps * 1.05)])
    assert tw["barrier_height"] == pytest.approx(L.max() - max(L[0], L[-1]), rel=1e-5)
    xbar = run["eval"]["xbar"].numpy()
    Lc = naive_path((19.5, 0.0), xbar, TWIN, [0, 1])
    np.testing.assert_allclose(res.values["to_collapsed"]["L"], Lc, rtol=1e-5)
    assert res.values["to_collapsed"]["leaves"] is True


def test_i2_fails_when_the_path_to_the_collapsed_reference_stays_in_F_T(seed):
    base = hand_run(seed, centroids=TWIN)
    states = {s: lin_state((19.5, 0.0), xbar=base["eval"]["xbar"]) for s in ORDER}
    run = hand_run(seed, centroids=TWIN, states=states, collapsed_c=(19.5, 0.05))  # L = 0.2525 < 0.2625
    res = inertia.check_i2(ctx_of(run))
    Lc = naive_path((19.5, 0.0), (19.5, 0.05), TWIN, [0, 1])
    assert res.values["to_witness"]["leaves"] is True and res.values["to_collapsed"]["leaves"] is False
    assert res.verdict == "fails" and res.witness["path"].startswith("to the collapsed reference")
    assert res.witness["max_L"] == pytest.approx(Lc.max(), rel=1e-5)


def naive_param_distance(a: dict, b: dict) -> float:
    tot = 0.0
    for key in a:
        for u, v in zip(a[key].double().reshape(-1).tolist(), b[key].double().reshape(-1).tolist()):
            tot += (u - v) ** 2
    return math.sqrt(tot)


@pytest.mark.parametrize("direction", [1, -1])
def test_i3_follows_the_trend_of_the_distance_to_the_collapsed_model(seed, direction):
    from scipy.stats import spearmanr

    base = hand_run(seed)
    xbar = base["eval"]["xbar"]
    n = len(ORDER)
    shift = {s: (i if direction > 0 else n - i) for i, s in enumerate(ORDER)}
    states = {s: lin_state((xbar + torch.tensor([float(shift[s]), 0.0])).tolist(), xbar=xbar) for s in ORDER}
    run = hand_run(seed, states=states)
    col = run["references"]["collapsed"]["state"]
    run["references"]["vanilla"] = {"config": dict(run["references"]["collapsed"]["config"]), "state": col,
                                    "snapshots": {f"v{i}": lin_state(xbar.tolist(), enc="data", xbar=xbar)
                                                  for i in range(3)}}
    res = inertia.check_i3(ctx_of(run))
    d = [naive_param_distance(run["snapshots"][s], col) for s in ORDER]
    f = [float(shift[s]) ** 2 for s in ORDER]  # mean_x ||xhat_s - xhat_col||^2 for constants xbar + (shift, 0)
    np.testing.assert_allclose(res.values["param_distance"], d, rtol=1e-6)
    np.testing.assert_allclose(res.values["function_distance"], f, rtol=1e-4, atol=1e-4)
    assert res.values["spearman_rho"] == pytest.approx(spearmanr(range(n), d).statistic) == direction
    assert res.verdict == ("holds" if direction > 0 else "fails")
    vd = naive_param_distance(run["references"]["vanilla"]["snapshots"]["v0"], col)
    # the vanilla reference's three snapshots are identical: one point of its curve, not three
    np.testing.assert_allclose(res.values["vanilla_param_distance"], [vd], rtol=1e-6)
    assert res.values["vanilla_snapshots"] == ["v0"]


def test_i3_fails_on_a_positive_but_insignificant_trend(seed):
    """A distance that wanders (rho > 0 but p >= 0.05) does not show that it 'increases'."""
    from scipy.stats import spearmanr

    base = hand_run(seed)
    xbar = base["eval"]["xbar"]
    n = len(ORDER)
    wander = [1.0, 3.0, 0.5, 2.5, 2.0, 4.0, 1.5, 3.5][:n] + [float(i) for i in range(max(0, n - 8))]
    states = {s: lin_state((xbar + torch.tensor([wander[i], 0.0])).tolist(), xbar=xbar) for i, s in enumerate(ORDER)}
    run = hand_run(seed, states=states)
    res = inertia.check_i3(ctx_of(run))
    col = run["references"]["collapsed"]["state"]
    sp = spearmanr(range(n), [naive_param_distance(run["snapshots"][s], col) for s in ORDER])
    assert res.values["p_value"] == pytest.approx(sp.pvalue)
    assert sp.statistic > 0 and sp.pvalue >= 0.05  # the wander above: rho = 0.29, p = 0.53
    assert res.verdict == "fails" and "not significant at 5%" in res.summary


MLP_WIDE = {"family": "mlp", "input_dim": 32, "latent_dim": 6, "enc_widths": [24, 16], "dec_widths": [16, 24],
            "activation": "elu", "image_shape": None, "channels": []}


def test_i3_reports_the_permutation_aligned_distance_of_every_snapshot(seed):
    """Snapshot i is the collapsed reference moved by ``t_i D`` (t_i = 0.001 i) with its units shuffled:
    weight matching undoes the shuffle, so the aligned distance is ``t_i ||D||`` and rises with rho = 1,
    whatever the raw distance (dominated by the shuffle) does; the verdict still follows the raw one."""
    from scipy.stats import spearmanr

    from hcdiag.alignment import aligned_distance, permutation_spec, permute

    g = torch.Generator().manual_seed(seed)
    dim = MLP_WIDE["input_dim"]
    col = build_model(MLP_WIDE, seed=seed).state_dict()
    step = {k: torch.randn(v.shape, generator=g) for k, v in col.items()}
    spec = permutation_spec(MLP_WIDE)
    shuffles = {s: {n: torch.randperm(k, generator=g) for n, k in spec.sizes.items()} for s in ORDER}
    states = {s: permute({k: v + 0.001 * i * step[k] for k, v in col.items()}, shuffles[s], spec)
              for i, s in enumerate(ORDER)}
    run = hand_run(seed, centroids=(3 * torch.randn(R0, K, dim, generator=g)).tolist(), center=[0.0] * dim,
                   model=MLP_WIDE, states=states, references=())
    run["references"] = {"collapsed": {"config": {"s2": 20.0, "multiple": 10.0, "method": "vanilla",
                                                  "model": dict(MLP_WIDE)}, "state": col}}
    validate_run(run)
    res = inertia.check_i3(ctx_of(run))
    v = res.values
    direct = [aligned_distance(col, run["snapshots"][s], MLP_WIDE) for s in ORDER]
    assert v["aligned_param_distance"] == pytest.approx(direct, rel=1e-12)
    norm = naive_param_distance(step, {k: torch.zeros_like(t) for k, t in step.items()})
    np.testing.assert_allclose(v["aligned_param_distance"], [0.001 * i * norm for i in range(len(ORDER))],
                               rtol=1e-5, atol=1e-6)
    raw = [naive_param_distance(run["snapshots"][s], col) for s in ORDER]
    np.testing.assert_allclose(v["param_distance"], raw, rtol=1e-6)
    assert all(a <= r for a, r in zip(v["aligned_param_distance"], v["param_distance"]))
    assert v["aligned_spearman_rho"] == 1.0
    assert v["aligned_p_value"] == pytest.approx(spearmanr(range(len(ORDER)), direct).pvalue)
    moved = [sum(int((p != torch.arange(p.numel())).sum()) for p in shuffles[s].values()) for s in ORDER]
    assert v["alignment"]["moved_units"] == moved  # each shuffle undone: its inverse moves as many units
    assert v["alignment"]["groups"] == spec.sizes and v["alignment"]["converged"] is True
    sp = spearmanr(range(len(ORDER)), raw)  # the verdict rule is the raw distance's, unchanged
    assert res.verdict == ("holds" if sp.statistic > 0 and sp.pvalue < 0.05 else "fails")
    assert (f"permutation-aligned distance {direct[0]:.3g} -> {direct[-1]:.3g}, rho = 1.00 "
            f"({sum(v['alignment']['moved_units'])} unit(s) moved by weight matching)") in res.summary


def test_i3_aligned_distance_equals_the_raw_one_without_hidden_units_to_match(seed):
    """MLP0 (no hidden layer): only the latent dimensions can be matched, and the collapsed reference's
    heads are zero, so no permutation changes the distance."""
    res = inertia.check_i3(ctx_of(hand_run(seed)))
    assert res.values["aligned_param_distance"] == res.values["param_distance"]
    # hand_run's snapshots from round0 on are one state (c*): init and round0 are the distinct points
    assert res.values["snapshots"] == ["init", "round0"] and res.values["repeated_snapshots"] == ORDER[2:]
    assert res.values["alignment"]["moved_units"] == [0, 0]
    assert res.values["alignment"]["groups"] == {"latent": N}


def test_i3_is_inconclusive_for_a_constant_distance_or_no_reference(seed):
    base = hand_run(seed)
    states = {s: lin_state(CSTAR, xbar=base["eval"]["xbar"]) for s in ORDER}
    res = inertia.check_i3(ctx_of(hand_run(seed, states=states)))
    assert res.verdict == "inconclusive" and res.reason == "fewer than 3 snapshots or a constant distance"
    res = inertia.check_i3(ctx_of(hand_run(seed, references=())))
    assert res.verdict == "inconclusive" and res.reason == "the run has no collapsed reference model"


# ---------------------------------------------------------------------------------------------------
# collapse metrics: KL, AU

def test_kl_and_au_hold_for_an_informative_encoder(seed):
    run = hand_run(seed)
    res = by_id(run_checks(run, select=["KL", "AU"]))
    mu, lv, _ = evaluate(MLP0, run["snapshots"]["final"], run["eval"]["x"])
    assert res["KL"].verdict == "holds" and res["KL"].values["final"]["kl"] == pytest.approx(naive_kl(mu, lv), rel=1e-5)
    assert res["AU"].verdict == "holds" and res["AU"].values["final"]["au"] == naive_au(mu) == 2
    assert res["AU"].values["final"]["au_paper_posterior"] == 0  # E[s_j^2] = exp(0) = 1, not < 0.99
    assert [r["snapshot"] for r in res["KL"].values["snapshots"]] == ORDER


def test_kl_and_au_fail_for_a_collapsed_encoder(seed):
    run = with_states(seed=seed, final=(CSTAR, "zero"))
    res = by_id(run_checks(run, select=["KL", "AU"]))
    assert res["KL"].verdict == "fails" and res["KL"].witness == {"snapshot": "final", "kl": 0.0}
    assert res["AU"].verdict == "fails" and res["AU"].witness == {"snapshot": "final", "au": 0}


def test_kl_holds_but_au_fails_for_a_constant_nonzero_mean(seed):
    run = with_states(seed=seed, final=(CSTAR, "const"))  # mu = (1, 0): KL = 0.5 nats, no variance
    res = by_id(run_checks(run, select=["KL", "AU"]))
    mu, lv, _ = evaluate(MLP0, run["snapshots"]["final"], run["eval"]["x"])
    assert res["KL"].verdict == "holds" and res["KL"].values["final"]["kl"] == pytest.approx(naive_kl(mu, lv)) == 0.5
    assert res["AU"].verdict == "fails" and naive_au(mu) == 0


@pytest.mark.parametrize("factor", [0.99, 1.01])
def test_kl_and_au_thresholds_decide_at_their_stated_values(seed, factor):
    """KL >= 0.01 nats: a constant mean (a, 0) has KL = a^2 / 2 exactly. AU (Burda): unbiased
    Var_x(mu_j) >= 0.01: mu = s (x - xbar) with s set from the naive variance of x."""
    base = hand_run(seed)
    x = np.asarray(base["eval"]["x"], np.float64)
    st = lin_state(CSTAR, enc="zero", xbar=base["eval"]["xbar"])
    st["enc_mu.bias"][0] = math.sqrt(2 * 0.01 * factor)  # KL = factor * 0.01 (mu constant, logvar 0)
    st_au = lin_state(CSTAR, enc="data", xbar=base["eval"]["xbar"])
    var = [sum((v - x[:, j].mean()) ** 2 for v in x[:, j]) / (len(x) - 1) for j in range(N)]
    st_au["enc_mu.weight"] = torch.diag(torch.tensor([math.sqrt(0.01 * factor / v) for v in var], dtype=torch.float32))
    st_au["enc_mu.bias"] = -(st_au["enc_mu.weight"] @ base["eval"]["xbar"])
    states = dict(base["snapshots"])
    verdict = "holds" if factor > 1 else "fails"
    states["final"] = st
    kl = by_id(run_checks(hand_run(seed, states=states), select=["KL"]))["KL"]
    assert kl.verdict == verdict and kl.values["final"]["kl"] == pytest.approx(0.01 * factor, rel=1e-5)
    states["final"] = st_au
    run = hand_run(seed, states=states)
    au = by_id(run_checks(run, select=["AU"]))["AU"]
    mu = evaluate(MLP0, st_au, run["eval"]["x"])[0]
    assert au.verdict == verdict and au.values["final"]["au"] == naive_au(mu) == (N if factor > 1 else 0)


# ---------------------------------------------------------------------------------------------------
# preconditions: inconclusive with the reason

def vanilla_run(seed):
    run = hand_run(seed)
    run["config"]["method"] = "vanilla"
    run["rounds"] = run["refinement"] = run["stage3"] = None
    validate_run(run)
    return run


def test_a_vanilla_run_without_rounds_gets_inconclusive_region_checks(seed):
    res = by_id(run_checks(vanilla_run(seed)))
    assert list(res) == list(CHECKS)
    for cid in ("N1", "N2", "N3"):
        assert res[cid].verdict == "inconclusive"
        assert res[cid].reason == ("the run has 0 feasible region(s); nesting needs at least 2 (method 'vanilla' has "
                                   "no stage-1 rounds and refinement)")
    assert res["T1"].reason == "the run has no refinement, so no eps_T"
    assert res["T1"].values["delta"] == pytest.approx(naive_delta_t1(vanilla_run(seed)["eval"]["xbar"], GEOMETRY)[0])
    assert res["T2"].reason == "the run has no refinement, so no F_T"
    assert res["T2b"].reason == "the run has no refinement"
    assert res["I1"].reason == "the run has no refinement and stage 3"
    assert res["I2"].reason == "the run has no refinement, so no F_T"
    for cid in ("T3", "T4", "KL", "AU"):  # these need no rounds
        assert res[cid].verdict != "inconclusive", cid
    # I3 needs no rounds either, but hand_run's snapshots from round0 on are one state: two distinct points
    assert res["I3"].values["snapshots"] == ["init", "round0"]
    assert res["I3"].reason == "fewer than 3 snapshots or a constant distance"
    assert all(r.summary == r.reason for r in res.values() if r.verdict == "inconclusive")


def outputs_only(run):
    """The same run with per-snapshot outputs instead of parameters (no config.model)."""
    out = dict(run)
    out["outputs"] = {}
    for s, st in run["snapshots"].items():
        mu, lv, xh = evaluate(run["config"]["model"], st, run["eval"]["x"])
        out["outputs"][s] = {"mu": torch.from_numpy(mu), "logvar": torch.from_numpy(lv), "xhat": torch.from_numpy(xh)}
    out["snapshots"] = None
    out["config"] = {**run["config"], "model": None}
    validate_run(out)
    return out


def test_an_outputs_only_run_gets_every_check_that_needs_no_parameters(seed):
    run = hand_run(seed)
    full = by_id(run_checks(run))
    outs = by_id(run_checks(outputs_only(run)))
    reasons = {"N3": "parameter probes need an architecture hcdiag can rebuild",
               "I3": "parameter distances need an architecture hcdiag can rebuild"}
    for cid, why in reasons.items():
        assert outs[cid].verdict == "inconclusive" and why in outs[cid].reason, cid
    # the same verdicts and numbers from outputs; T3 (and T4's certificate of the collapsed reference) rebuild
    # the reference from ITS OWN config.model, which the outputs-only run keeps
    for cid in ("N1", "N2", "T1", "T2b", "I1", "T3", "T4", "KL", "AU"):
        assert outs[cid].verdict == full[cid].verdict != "inconclusive", cid
        assert strip_seconds(json.loads(json.dumps(outs[cid].values, default=str))) == \
            strip_seconds(json.loads(json.dumps(full[cid].values, default=str))), cid
    assert outs["T3"].values["evaluated_from"] == "references.collapsed.state"
    # T2 builds its witness in output space: KL 0, historical loss delta*
    t2 = outs["T2"]
    assert t2.verdict == "fails" and t2.values["witness_built_in"] == "output space (outputs only)"
    assert t2.values["witness_kl"] == 0.0 and t2.values["witness_historical_loss"] == full["T2"].values["delta_star"]
    # I2 without parameters: the output-space path to the best constant decides (the refined model sits on it)
    i2 = outs["I2"]
    assert i2.values["deciding_paths"] == ["to_constant_output"] and i2.verdict == "fails"
    assert i2.values["to_witness_unavailable"] == "the run carries no rebuildable architecture (outputs only)"


# ---------------------------------------------------------------------------------------------------
# the registry, determinism, user-visible errors

def test_the_same_file_gives_the_same_numbers_twice(seed, tmp_path):
    from hcdiag.report import to_json_doc
    from hcdiag.runfile import save_run

    path = save_run(hand_run(seed, references=("collapsed", "control")), tmp_path / "run.pt")
    docs = [json.dumps(strip_seconds(to_json_doc(run_checks(path), run_path=path)), sort_keys=True) for _ in range(2)]
    assert docs[0] == docs[1]
    assert [c["id"] for c in json.loads(docs[0])["checks"]] == list(CHECKS)


def test_parse_ids_is_case_insensitive_and_names_unknown_ids():
    assert parse_ids("n1, t2B ,au") == ["N1", "T2b", "AU"]
    assert parse_ids(None) == list(CHECKS)
    with pytest.raises(InputError, match=r"^select: unknown check id\(s\) X9, T7; valid ids are N1, N2, N3, T1"):
        parse_ids("N1,X9,T7")
    with pytest.raises(InputError, match=r"^--only names no check; valid ids are N1"):
        parse_ids(" , ", "--only")


def test_run_checks_refuses_a_bad_tolerance(seed):
    with pytest.raises(InputError, match=r"The 'tolerance' parameter must be a float in \[0, 10\)\. Got -0\.1\."):
        run_checks(hand_run(seed), tolerance=-0.1)


def mixed(run, with_parameters):
    """Outputs for every snapshot, parameters for ``with_parameters`` only (valid: docs/runfile.md)."""
    out = dict(run)
    out["outputs"] = outputs_only(run)["outputs"]
    out["snapshots"] = {k: v for k, v in run["snapshots"].items() if k in with_parameters}
    validate_run(out)
    return out


def test_a_run_with_parameters_for_some_snapshots_only(seed):
    """Regression: N3, T2, I2 and I3 crashed (NoneType / load_state_dict({})) on a valid run whose
    snapshots carry parameters for some names and outputs for all."""
    run = hand_run(seed)
    res = by_id(run_checks(mixed(run, ("final",))))
    full = by_id(run_checks(run))
    n = len(ORDER)
    # every snapshot's outputs, perturbations of the one with parameters, no segment with both ends
    assert res["N3"].values["probes"] == n + 1 * 4 * 3
    assert res["T2"].values["witness_built_in"] == "architecture"  # built on the parameters 'final' has
    assert res["T2"].values["witness_kl"] == 0.0
    assert res["T2"].values["witness_historical_loss"] == full["T2"].values["delta_star"] == 0.25
    # no parameters at the refined snapshot: the output-space path to the best constant decides I2
    assert res["I2"].values["to_witness_unavailable"] == "the refined snapshot 'refined' has outputs but no parameters"
    assert res["I2"].values["deciding_paths"] == ["to_constant_output"] and res["I2"].verdict == "fails"
    assert res["I3"].reason == "fewer than 3 snapshots or a constant distance"
    two = by_id(run_checks(mixed(run, ("refined", "stage3_0", "final")), select=["N3", "I2", "I3"]))
    assert two["N3"].values["probes"] == n + 3 * 4 * 3 + 1 * 3  # one segment: refined -> stage3_0
    assert two["I2"].verdict == full["I2"].verdict == "fails"
    # the three states are one (c*): one point, not three
    assert two["I3"].values["snapshots"] == ["refined"] and two["I3"].values["repeated_snapshots"] == ["stage3_0", "final"]


def test_state_dicts_that_do_not_fit_the_model_are_bad_input(seed):
    run = hand_run(seed)
    run["snapshots"]["final"] = {("encoder." + k): v for k, v in run["snapshots"]["final"].items()}
    # refused by the run file's validation now (issue 9), before any check runs
    with pytest.raises(InputError, match=r"^snapshots\.final has unexpected key 'encoder\.enc_mu\.weight' for "
                                         r"config\.model \(family 'mlp'\); store exactly the state_dict of the model "
                                         r"config\.model describes \(its parameter names and shapes are listed in "
                                         r"docs/runfile\.md, 'Parameter names'\)\.$"):
        run_checks(run, select=["KL"])
    run = hand_run(seed)
    run["snapshots"]["final"]["dec_out.bias"] = torch.zeros(3)
    with pytest.raises(InputError, match=r"^snapshots\.final\.dec_out\.bias has shape \(3,\) but the model of "
                                         r"config\.model \(family 'mlp'\) has \(2,\); config\.model must describe "
                                         r"the model that was trained"):
        run_checks(run, select=["KL"])


def test_t2b_reads_an_absent_loss_convention_as_literal(seed):
    """Regression: config.loss = None (optional in docs/runfile.md) raised an InputError from T2b."""
    run = hand_run(seed)
    run["config"]["loss"] = None
    res = exclusion.check_t2b(ctx_of(run))
    floor = naive_floor(run["eval"]["xbar"], [GEOMETRY[0], GEOMETRY[1]], beta=4.0, s2=2.0, convention="literal")
    assert res.values["convention"] == "literal" and res.values["collapsed_floor"] == pytest.approx(floor, rel=1e-12)
