"""W3 (hcdiag.checks.teacher): the teacher-guided VAE's certificate along training, from a run file."""

from __future__ import annotations

import json

import pytest
import torch

from hcdiag.checks.barrier import CHECKS, default_ids, run_checks
from hcdiag.checks.witness import alignment_loss, teacher_information
from hcdiag.cli import main
from hcdiag.runfile import Run, load_run
from hcdiag.train import Trainer, make_config

from teacher_helpers import TINY, clusters as _data  # noqa: I001 (tests/ is on sys.path)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("w3") / "teacher.pt"
    Trainer(make_config(None, seed=3, method="teacher", teacher_alpha=20.0, witness_beta=3.0, **TINY), _data(3),
            path).run()
    return path


def _naive_rows(run: Run):
    """(snapshot, I_T, L_TS) on the odd eval rows, with the head and teacher read straight from the file."""
    d = run.data
    cid, beta, V = d["teacher"]["clustering"], d["teacher"]["beta_w"], d["teacher"]["vertices"].double()
    T = d["clusterings"]["resp"][cid].double()
    T = (T / T.sum(1, keepdim=True))[1::2]
    from hcdiag.models import build_model, encode_decode

    out = []
    for name in run.snapshot_names[1:]:
        model = build_model(d["config"]["model"])
        model.load_state_dict(d["snapshots"][name])
        mu = encode_decode(model, d["eval"]["x"])[0].double()[1::2]
        W = torch.softmax(beta * mu @ V.T, dim=1)
        out.append((name, teacher_information(T), alignment_loss(T, W)))
    return out


def test_w3_holds_when_alignment_trains_the_certificate_and_matches_a_naive_recomputation(teacher_run):
    run = load_run(teacher_run)
    [res] = run_checks(run, select=["W3"])
    naive = _naive_rows(run)
    got = [(r["snapshot"], r["I_T"], r["L_TS"]) for r in res.values["rows"]]
    assert [g[0] for g in got] == [n[0] for n in naive] and "init" not in [g[0] for g in got]
    for (s, i, l), (_, ni, nl) in zip(got, naive):
        assert abs(i - ni) < 1e-9 and abs(l - nl) < 1e-5, s
    gaps = [i - l for _, i, l in naive]
    assert res.verdict == ("holds" if min(gaps) > 0.05 else "fails")
    assert res.verdict == "holds", res.summary  # alpha 20 on well-separated clusters: the head reads them


def test_w3_fails_without_alignment_and_says_not_certified_is_not_collapsed(seed, tmp_path):
    path = tmp_path / "plain.pt"
    Trainer(make_config(None, seed=seed % 1000, method="teacher", teacher_alpha=0.0, witness_beta=0.01, **TINY),
            _data(seed), path).run()
    [res] = run_checks(path, select=["W3"])
    # beta_w = 0.01: the head's softmax is near uniform whatever mu is, so it cannot beat the constant student
    assert res.verdict == "fails" and res.witness["G_T"] <= 0.05
    assert "not certified is not collapsed: KL there" in res.summary


def test_w3_is_inconclusive_without_a_teacher_and_runs_by_default_only_on_teacher_runs(teacher_run, tmp_path):
    from hcdiag.runfile import example_run

    hct = Run(example_run(seed=0))
    [res] = run_checks(hct, select=["W3"])
    assert res.verdict == "inconclusive" and res.reason.startswith("the run has no teacher-guided VAE record")
    assert default_ids(hct) == list(CHECKS) and default_ids(load_run(teacher_run)) == list(CHECKS) + ["W3", "W4"]
    assert [r.id for r in run_checks(hct)] == list(CHECKS)


def test_check_barrier_require_w3(teacher_run, tmp_path, capsys):
    from hcdiag.runfile import example_run, save_run

    assert main(["check-barrier", str(teacher_run), "--require", "W3", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "holds" and "W3" in [c["id"] for c in doc["checks"]]
    hct = save_run(example_run(seed=0), tmp_path / "hct.pt")
    assert main(["check-barrier", str(hct), "--require", "W3", "--format", "json"]) == 1  # inconclusive there
    doc = json.loads(capsys.readouterr().out)
    assert [c["verdict"] for c in doc["checks"] if c["id"] == "W3"] == ["inconclusive"]
