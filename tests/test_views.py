"""The teacher's views (hcdiag.views), the view gap kernel and check W4 (issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hcdiag.checks.barrier import run_checks
from hcdiag.checks.witness import view_certificate, view_gap
from hcdiag.cli import main
from hcdiag.errors import InputError
from hcdiag.runfile import load_run
from hcdiag.train import Trainer, make_config
from hcdiag.views import parse_view

from teacher_helpers import TINY, clusters as _data  # noqa: I001 (tests/ is on sys.path)


def _random_views(seed, M=5, m=40, K=4):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(M, m, K, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=-1)


def _H(p):
    return -sum(float(v) * np.log(float(v)) for v in p if v > 0)


def test_view_gap_matches_a_naive_loop_and_splits_the_teacher_information(seed):
    T = _random_views(seed)
    M, m, K = T.shape
    g = view_gap(T)
    pairs = T.reshape(-1, K)
    naive_info = _H(pairs.mean(0)) - np.mean([_H(r) for r in pairs])
    naive_gap = np.mean([_H(T[:, i].mean(0)) - np.mean([_H(T[j, i]) for j in range(M)]) for i in range(m)])
    assert abs(g.I_T - naive_info) < 1e-10 and abs(g.gap - naive_gap) < 1e-10
    assert abs(g.I_T - (g.gap + g.reachable)) < 1e-10  # I_T = G_V + the averaged teacher's information


def test_no_student_that_reads_only_x_aligns_below_the_gap_and_the_view_average_attains_it(seed):
    T = _random_views(seed)
    g = view_gap(T)
    rng = torch.Generator().manual_seed(seed + 1)
    for _ in range(20):  # random students, one distribution per row
        W = torch.softmax(4 * torch.randn(T.shape[1:], generator=rng, dtype=torch.float64), dim=-1)
        vg, loss = view_certificate(T, W)
        naive = float(sum((T[j] * (T[j].log() - W.log())).sum() for j in range(T.shape[0]))) / (T.shape[0] * T.shape[1])
        assert abs(loss - naive) < 1e-10 and loss >= g.gap - 1e-12
    _, best = view_certificate(T, T.mean(0))
    assert abs(best - g.gap) < 1e-10
    _, cheat = view_certificate(T, T)  # a student that sees each view: the premise is broken, so it beats the gap
    assert cheat < 1e-12 < g.gap


def test_a_deterministic_view_has_no_gap():
    T = _random_views(0, M=1)
    g = view_gap(T)
    assert g.gap == 0.0 and abs(g.reachable - g.I_T) < 1e-12


def test_view_kernels_refuse_bad_shapes():
    T = _random_views(0)
    with pytest.raises(InputError, match=r"The 'T_views' argument must be a 3-D array of shape \(M, m, K\)"):
        view_gap(T[0])
    with pytest.raises(InputError, match=r"The 'W' argument must have shape \(40, 4\) or \(5, 40, 4\)"):
        view_certificate(T, T[0, :10])


def test_the_views_against_naive_loops(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(7, 36))
    assert np.array_equal(parse_view("identity").samples(x, 5, seed)[0], x)
    assert len(parse_view("identity").samples(x, 5, seed)) == 1 and len(parse_view("pool:2").samples(x, 5, 0, (6, 6))) == 1
    pooled = parse_view("pool:3").apply(x, rng, (6, 6)).reshape(7, 6, 6)
    img = x.reshape(7, 6, 6)
    for r in range(7):
        for i in range(6):
            for j in range(6):
                bi, bj = 3 * (i // 3), 3 * (j // 3)
                assert abs(pooled[r, i, j] - img[r, bi:bi + 3, bj:bj + 3].mean()) < 1e-12
    noisy = parse_view("noise:0.5").samples(x, 3, seed)
    g = np.random.default_rng(seed)
    for s in noisy:
        assert np.allclose(s, x + 0.5 * g.standard_normal(x.shape))
    shifted = parse_view("shift:2").samples(x, 2, seed, (6, 6))
    g = np.random.default_rng(seed)
    for s in shifted:
        offs = g.integers(-2, 3, size=(7, 2))
        for r in range(7):
            dy, dx = offs[r]
            for i in range(6):
                for j in range(6):  # the edge pixel repeats beyond the border
                    assert s.reshape(7, 6, 6)[r, i, j] == img[r, min(max(i + dy, 0), 5), min(max(j + dx, 0), 5)]


@pytest.mark.parametrize("spec,msg", [
    ("blur:2", "unknown view 'blur:2'"), ("noise", "unknown view 'noise'"), ("noise:-1", "needs sigma > 0"),
    ("shift:1.5", "needs an integer >= 1"), ("pool:1", "needs an integer >= 2"), ("noise:x", "has no number"),
    ("shift:inf", "needs a finite number"), ("pool:nan", "needs a finite number"), ("pool:1e400", "needs a finite number"),
])
def test_bad_view_specs_get_one_line(spec, msg):
    with pytest.raises(InputError, match=msg) as e:
        parse_view(spec)
    assert "\n" not in str(e.value)


def test_image_views_need_images():
    with pytest.raises(InputError, match="needs images and this data has no image shape"):
        parse_view("shift:1").apply(np.zeros((2, 6)), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"image sides \(8 x 8\) to be multiples of 3"):
        parse_view("pool:3", (8, 8))
    with pytest.raises(InputError, match=r"shifts by at least the image side \(8 x 8\)"):
        parse_view("shift:1000000000").apply(np.zeros((2, 64)), np.random.default_rng(0), (8, 8))


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    out = {}
    for view in ("identity", "noise:1", "noise:1000"):
        out[view] = d / f"{view.replace(':', '')}.pt"
        Trainer(make_config(None, seed=3, method="teacher", teacher_alpha=20.0, witness_beta=3.0, teacher_view=view,
                            **TINY), _data(3), out[view]).run()
    return out


def test_w4_holds_with_a_mild_view_and_matches_the_kernel(noisy_runs):
    run = load_run(noisy_runs["noise:1"])
    assert run.teacher.view == "noise:1" and run.teacher.view_samples == 4
    w3, w4 = run_checks(run, select=["W3", "W4"])
    assert w4.verdict == "holds", w4.summary
    assert w4.values["reachable"] - w4.values["sampling_bias"] > 0.05 and w4.values["sampling_bias"] == \
        pytest.approx(np.log1p(2 / 64))
    assert all(r["L_TS"] >= r["G_V"] for r in w4.values["rows"])
    assert [r["G_T"] for r in w3.values["rows"]] == [r["G_T"] for r in w4.values["rows"]]  # one kernel, one row set


def test_w4_is_inconclusive_for_a_deterministic_view(noisy_runs):
    run = load_run(noisy_runs["identity"])
    assert run.teacher.view == "identity" and run.teacher.view_samples == 1
    [w4] = run_checks(run, select=["W4"])
    assert w4.verdict == "inconclusive" and "its view gap is 0 exactly, so there is no gap to bound" in w4.reason


def test_w4_fails_when_the_view_leaves_no_room_for_the_certificate(noisy_runs):
    run = load_run(noisy_runs["noise:1000"])
    assert run.teacher.view == "noise:1000" and run.teacher.view_samples == 4
    w3, w4 = run_checks(run, select=["W3", "W4"])
    # noise 1000 x the clusters' spread: the teacher's label is nearly independent of x
    assert w4.verdict == "fails" and "leaves no room for the certificate" in w4.summary
    assert w4.values["reachable"] <= 0.05 and abs(w4.values["I_T"] - w4.values["G_V"] - w4.values["reachable"]) < 1e-9
    assert w3.verdict == "fails"  # and so the certificate is not reached
    assert all(r["L_TS"] >= r["G_V"] - 1e-9 for r in w4.values["rows"])


def test_w4_is_inconclusive_without_a_teacher_or_its_clustering_parameters(noisy_runs, tmp_path):
    from hcdiag.runfile import Run, example_run, save_run

    [res] = run_checks(Run(example_run(seed=0)), select=["W4"])
    assert res.verdict == "inconclusive" and res.reason.startswith("the run has no teacher-guided VAE record")
    d = torch.load(noisy_runs["noise:1000"], weights_only=False)
    del d["clusterings"]["covariances"]
    path = save_run(d, tmp_path / "nocov.pt")
    w3, w4 = run_checks(path, select=["W3", "W4"])
    for res in (w3, w4):
        assert res.verdict == "inconclusive" and "stores no clustering covariances" in res.reason


def test_a_teacher_file_with_an_unknown_view_is_refused_in_one_line(noisy_runs, tmp_path, capsys):
    d = torch.load(noisy_runs["identity"], weights_only=False)
    d["teacher"]["view"] = "blur:3"
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    assert main(["check-barrier", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "teacher.view 'blur:3' is not a view hcdiag knows" in err


def test_image_views_train_on_digits_and_the_cli_accepts_method_witness(tmp_path, capsys):
    out = tmp_path / "w.pt"
    rc = main(["train", "digits", "--method", "witness", "--teacher-view", "shift:1", "--teacher-view-samples", "2",
               "--epochs", "1", "--r0", "2", "--k", "3", "--latent-dim", "4", "--eval-rows", "100",
               "--n-samples", "300", "--out", str(out), "--format", "json"])
    assert rc == 0, capsys.readouterr().err
    run = load_run(out)
    assert run.method == "teacher" and run.teacher.view == "shift:1" and run.teacher.view_samples == 2
    [w4] = run_checks(run, select=["W4"])
    assert w4.verdict in ("holds", "fails", "inconclusive") and w4.values["view_samples"] == 64
    assert json.loads(json.dumps(w4.values, default=float))["view"] == "shift:1"
    capsys.readouterr()
    assert main(["train", "digits", "--method", "witness", "--teacher-view", "blur", "--out",
                 str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown view 'blur'" in err and "\n" not in err and not (tmp_path / "x.pt").exists()


def test_pca_projection_matches_the_covariance_eigenvectors(seed):
    from hcdiag.train.methods.teacher import pca_projection

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 7)) @ rng.normal(size=(7, 7))
    p = pca_projection(x, 3)
    cov = np.cov(x, rowvar=False)
    w = np.sort(np.linalg.eigvalsh(cov))[::-1]
    C = p["components"]
    assert np.allclose(C @ C.T, np.eye(3), atol=1e-10)  # orthonormal
    assert np.allclose(np.diag(C @ cov @ C.T), w[:3], rtol=1e-9)  # the top three variances, in order
    assert np.allclose(p["mean"], x.mean(0)) and (C[np.arange(3), np.abs(C).argmax(1)] > 0).all()


def test_a_pca_teacher_is_recorded_and_the_checks_recompute_it_from_the_record(tmp_path, seed):
    from scipy.stats import multivariate_normal

    from hcdiag.checks.teacher import held_out_targets
    from hcdiag.checks.base import RunContext

    path = tmp_path / "pca.pt"
    cfg = make_config(None, seed=seed % 1000, method="teacher", teacher_alpha=20.0, witness_beta=3.0,
                      teacher_features="pca:2", **{**TINY, "covariance": "full"})
    Trainer(cfg, _data(seed % 1000), path).run()
    run = load_run(path)
    rec = run.teacher
    assert rec.features == "pca:2" and rec.projection["components"].shape == (2, 6)
    assert rec.clustering == int(np.argmax(rec.I_T)) and rec.gmm["centroids"].shape == (1, 3, 2)
    # naive: project the held-out rows with the stored projection and evaluate the stored mixture's posterior
    x = run.eval.x.double().numpy()[1::2]
    F = (x - rec.projection["mean"].numpy()) @ rec.projection["components"].numpy().T
    g = rec.gmm
    dens = np.stack([g["weights"][0, k].item() * multivariate_normal(g["centroids"][0, k].numpy(),
                                                                    g["covariances"][0, k].numpy()).pdf(F)
                     for k in range(3)], axis=1)
    naive = dens / dens.sum(1, keepdims=True)
    T, view = held_out_targets(RunContext(run))
    assert view == "identity" and T.shape == (1, x.shape[0], 3)
    np.testing.assert_allclose(T[0].numpy(), naive, atol=1e-6)
    [w3] = run_checks(run, select=["W3"])
    assert w3.verdict in ("holds", "fails") and w3.values["rows"]


def test_bad_teacher_features_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"must be input or pca:<d>"):
        make_config(None, method="teacher", teacher_features="pca")
    with pytest.raises(InputError, match=r"asks for 9 principal components of data with N = 6"):
        Trainer(make_config(None, method="teacher", teacher_features="pca:9", **TINY), _data(0), tmp_path / "x.pt").run()
    assert not (tmp_path / "x.pt").exists()


def test_a_mixture_without_pca_features_is_refused(noisy_runs):
    from hcdiag.records import Teacher

    d = dict(torch.load(noisy_runs["identity"], weights_only=False)["teacher"])
    d["gmm"] = [1, 2]
    with pytest.raises(InputError, match=r"teacher has gmm but its features are input: only a pca:<d> teacher has them"):
        Teacher.from_dict(d)


def test_a_pca_teacher_record_with_a_wrong_projection_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "pca.pt"
    Trainer(make_config(None, seed=1, method="teacher", teacher_features="pca:2", **TINY), _data(1), path).run()
    d = torch.load(path, weights_only=False)
    d["teacher"]["projection"]["components"] = d["teacher"]["projection"]["components"][:1]
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    assert main(["check-barrier", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "teacher.projection.components has shape (1, 6); pca:2 over N = 6 needs (2, 6)" in err
