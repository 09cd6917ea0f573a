"""One rule per claim (issue 9): on ONE set of runs, ``hcdiag verify``, the artefacts, the notebooks and
``hcdiag check-barrier`` give the same verdict for the same claim.

The runs are a tiny grid (HCT and vanilla at 2 lambda_max, literal loss, two phase multiples) written once by
verify; everything else reads the same run files (nothing is retrained: a retraining would fail the test).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from hcdiag import artefacts
from hcdiag import verify as V
from hcdiag.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(enc_widths=(8,), dec_widths=(8,), latent_dim=2, batch_size=128, epochs=1, r0=4, k=3,
            epochs_per_round=1, steps_per_clustering=2, refine_cap=2, stage3_epochs=2, stage3_snapshots=2,
            eval_rows=200, em_backend="sklearn")
GRID = dict(methods=[("hct", ""), ("vanilla", "")], multiples=[2.0], losses=["literal"], phase_multiples=[0.5, 2.0],
            phase_epochs=1, n_samples={"synthetic": 1500}, ablations=False, overrides=dict(TINY))


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(V.GRIDS, "smoke", GRID)
    out = tmp_path_factory.mktemp("one-verdict")
    doc = V.verify(out, preset="smoke", datasets=["synthetic"], seeds=1, workers=1)

    def no_training(*a, **k):
        raise AssertionError("a run verify had written was trained again")

    mp.setattr("hcdiag.train.Trainer.run", no_training)
    yield out, doc
    mp.undo()


def _row(doc_rows, id_, **values):
    found = [r for r in doc_rows if r["id"] == id_ and all(r["values"].get(k) == v for k, v in values.items())]
    assert len(found) == 1, (id_, values, len(found))
    return found[0]


def _run_notebook(name: str, namespace_patches, monkeypatch) -> dict:
    import jupytext

    for patch in namespace_patches:
        monkeypatch.setattr(*patch)
    ns: dict = {}
    for cell in jupytext.read(ROOT / "notebooks" / name).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, name, "exec"), ns)  # noqa: S102  (our own notebook)
    return ns


def test_verify_and_check_barrier_agree_on_every_barrier_check(grid_runs, capsys):
    out, doc = grid_runs
    for method in ("hct",):
        path = out / "main/synthetic/hct_m2_literal_s0.pt"
        assert main(["check-barrier", str(path), "--format", "json"]) in (0, 1)
        cb = {c["id"]: c["verdict"] for c in json.loads(capsys.readouterr().out)["checks"]}
        for cid in V.BARRIER_IDS:
            assert _row(doc["claims"], f"barrier.{cid}", method=method, loss="literal")["verdict"] == cb[cid], cid
    # the vanilla claim and check-barrier's KL check on the same run decide "collapsed" by one rule
    assert main(["check-barrier", str(out / "main/synthetic/vanilla_m2_literal_s0.pt"), "--only", "KL",
                 "--format", "json"]) in (0, 1)
    kl = json.loads(capsys.readouterr().out)["checks"][0]
    van = _row(doc["claims"], "table1.vanilla", method="vanilla", loss="literal")
    assert van["values"]["kl"] == pytest.approx(kl["values"]["final"]["kl"], rel=1e-9)
    assert (van["verdict"] == "holds") == (kl["verdict"] == "fails")


def test_the_artefacts_agree_with_verify(grid_runs):
    out, doc = grid_runs
    t1 = artefacts.table1("smoke", ["synthetic"], 1, out, workers=1)
    for r in t1.rows:
        v = r["values"]
        keys = {k: v[k] for k in ("method", "stage", "loss") if k in v}
        assert r["verdict"] == _row(doc["claims"], r["id"], **keys)["verdict"], r["id"]
    assert {r["id"] for r in t1.rows} >= {"table1.vanilla", "table1.hct_pre", "table1.hct_post", "table1.hct_final",
                                         "table1.highest"}
    f5 = artefacts.figure5("smoke", ["synthetic"], 1, out, multiples=(2.0,), workers=1)
    (row,) = f5.rows
    assert row["verdict"] == _row(doc["claims"], "figure5", method="hct", loss="literal")["verdict"]
    f2 = artefacts.figure2("smoke", ["synthetic"], 1, out)
    for r in f2.rows:
        if r["values"]["check"] in V.BARRIER_IDS:
            assert r["verdict"] == _row(doc["claims"], f"barrier.{r['values']['check']}", method="hct")["verdict"]
    ph = artefacts.phase("smoke", ["synthetic"], 1, out, workers=1)  # verify's phase settings: same numbers
    for pid in ("phase.P1", "phase.P2"):
        assert _row(ph.rows, pid)["verdict"] == _row(doc["claims"], pid)["verdict"], pid
    ours = next(r for r in ph.rows if r["id"] == "phase.P1")["values"]["rows"]
    assert ours == next(r for r in doc["claims"] if r["id"] == "phase.P1")["values"]["rows"]


def test_the_notebooks_agree_with_verify(grid_runs, monkeypatch, tmp_path):
    out, doc = grid_runs
    # notebook 3 (Table 1): its artefact call, pointed at verify's folder
    ns = _run_notebook("03_table1.py", [(tempfile, "mkdtemp", lambda prefix="": str(out))], monkeypatch)
    rows = [r for r in ns["result"].rows]
    assert rows
    for r in rows:
        v = r["values"]
        keys = {k: v[k] for k in ("method", "stage", "loss") if k in v}
        assert r["verdict"] == _row(doc["claims"], r["id"], **keys)["verdict"], r["id"]
    # notebook 2 (the barrier checks of one run): verify's HCT run file in place of its own training
    nb2 = tmp_path / "nb2"
    nb2.mkdir()
    shutil.copy(out / "main/synthetic/hct_m2_literal_s0.pt", nb2 / "hct.pt")
    ns = _run_notebook("02_barrier_checks.py", [(tempfile, "mkdtemp", lambda prefix="": str(nb2)),
                                                ("hcdiag.train.Trainer.run", lambda self, resume=False: None)],
                       monkeypatch)
    for cid in V.BARRIER_IDS:
        assert ns["results"][cid].verdict == _row(doc["claims"], f"barrier.{cid}", method="hct")["verdict"], cid
    # notebook 1 (phase): the MLP runs are verify's; P2 is decided on them by the same rule
    ns = _run_notebook("01_phase_transition.py", [(tempfile, "mkdtemp", lambda prefix="": str(out))], monkeypatch)
    assert _row(ns["result"].rows, "phase.P2")["verdict"] == _row(doc["claims"], "phase.P2")["verdict"]


def test_library_code_never_imports_the_cli():
    import ast

    for p in (ROOT / "hcdiag").rglob("*.py"):
        if "cli" in p.relative_to(ROOT / "hcdiag").parts or p.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hcdiag.cli"):
                pytest.fail(f"{p.relative_to(ROOT)} imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("hcdiag.cli") for a in node.names):
                pytest.fail(f"{p.relative_to(ROOT)} imports hcdiag.cli")
