"""The typed run records (hcdiag.records): each part converts to and from its version-1 dict unchanged,
validates itself on construction with the one-line messages the run file's validation gives, the run files
written before the records existed load unchanged, and docs/runfile.md lists every record's fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from hcdiag import records
from hcdiag.errors import InputError
from hcdiag.records import (Aggressive, Clusterings, Dims, EvalSet, History, Outputs, Reference, References,
                            Refinement, Round, RunConfig, Stage3, Status, Teacher)
from hcdiag.runfile import Run, example_run, load_run, validate_run

ROOT = Path(__file__).resolve().parents[1]
LEGACY = sorted((ROOT / "tests" / "data").glob("v1_*.pt"))  # written by hcdiag before the records existed


def same(a, b, path=""):
    """Equal dicts/lists/values, tensors equal in dtype, shape and value (NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(map(str, a)), b)
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)), path
    else:
        assert a == b or (a != a and b != b), (path, a, b)


def parts_of(run: dict) -> list[tuple[str, dict, object]]:
    """(name, the file's dict, the record read from it) of every part a Run reads into a record."""
    r = Run(run)
    out = [("config", run["config"], r.config), ("eval", run["eval"], r.eval),
           ("clusterings", run["clusterings"], r.clusterings)]
    if run.get("status") is not None:
        out.append(("status", run["status"], r.status))
    for i, entry in enumerate(run.get("rounds") or []):
        out.append((f"rounds[{i}]", entry, r.rounds[i]))
    for key in ("refinement", "stage3", "history", "aggressive", "references"):
        if run.get(key) is not None:
            out.append((key, run[key], getattr(r, key)))
    for name, o in (run.get("outputs") or {}).items():
        out.append((f"outputs.{name}", o, r.outputs(name)))
    return out


@pytest.mark.parametrize("kw", [{}, {"references": True}, {"outputs": True}, {"references": True, "outputs": True}])
def test_every_part_round_trips_to_the_same_dict(seed, kw):
    run = example_run(seed=seed % 10_000, **kw)
    for name, d, rec in parts_of(run):
        same(d, rec.to_dict(), name)
        again = type(rec).from_dict(*((rec.name,) if isinstance(rec, Reference) else ()), rec.to_dict())
        same(d, again.to_dict(), name)


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.name)
def test_run_files_written_before_the_records_load_unchanged(path):
    """Files of hcdiag's trainer (hct with its three references; aggressive) and an outputs-only example,
    written by the code before the records (commit 43dd595): they load, and every part's record gives back
    the dict in the file."""
    data = torch.load(path, weights_only=True)
    run = load_run(path)
    assert run.complete and run.data.keys() == data.keys()
    for name, d, rec in parts_of(data):
        same(d, rec.to_dict(), name)
    if run.method == "hct":
        assert [r.kept for r in run.rounds][-1] == run.refinement.pair == tuple(data["refinement"]["pair"].tolist())
        assert run.stage3.clustering == run.refinement.pair[0]
        assert {ref.name for ref in run.references} == {"collapsed", "vanilla", "control"}
        van = data["references"]["vanilla"]
        assert run.references.vanilla.order == list(van.get("snapshot_order") or van.get("snapshots") or [])
    if run.method == "aggressive":
        assert run.aggressive.mi.shape[0] >= 1 and run.history.get("inner_steps") is not None


def test_legacy_files_are_there():
    assert {p.name for p in LEGACY} >= {"v1_hct_trainer.pt", "v1_aggressive_trainer.pt", "v1_example_outputs.pt"}


# -- each record validates itself, with the messages validate_run gives ---------------------------------------

def _round(**kw):
    base = dict(round=0, active=[0, 1, 2, 3], kept=[1, 3], losses=torch.tensor([4.0, 1.0, 3.0, 2.0]), eps=2.0,
                snapshot="round0")
    return Round(**{**base, **kw})


def test_round_normalises_ids_and_refuses_a_kept_id_outside_active():
    r = _round(active=torch.tensor([0, 1, 2, 3]), kept=(1, 3))
    assert r.active == (0, 1, 2, 3) and r.kept == (1, 3) and isinstance(r.eps, float)
    with pytest.raises(InputError, match=r"^Round\.kept holds \[2\] which are not in Round\.active; kept must be "
                                         r"a subset of active\.$"):
        _round(active=[0, 1], kept=[2])
    with pytest.raises(InputError, match=r"^Round\.active repeats clustering ids \(\[0, 0\]\); each id may appear "
                                         r"once\.$"):
        _round(active=[0, 0], kept=[0])
    with pytest.raises(InputError, match=r"^Round\.losses holds 1 non-finite value\(s\)"):
        _round(losses=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(InputError, match=r"^Round\.eps must be a float; got '2' \(str\)\.$"):
        _round(eps="2")


def test_round_checks_ids_and_losses_against_the_runs_r0_when_it_has_one():
    dims = Dims()
    dims.agree("R0", 4, "clusterings.centroids")
    with pytest.raises(InputError, match=r"^rounds\[1\]\.active holds clustering id\(s\) \[7\] outside 0\.\.3 "
                                         r"\(R0=4\)\.$"):
        Round(1, [0, 7], [0], torch.zeros(4), 0.0, "round1", where="rounds[1]", dims=dims)
    with pytest.raises(InputError, match=r"^clusterings\.centroids has R0=4 but rounds\[1\]\.losses has R0=3; "):
        Round(1, [0, 1], [1], torch.zeros(3), 0.0, "round1", where="rounds[1]", dims=dims)


def test_the_validator_and_a_record_give_the_same_message():
    run = example_run(seed=0)
    run["rounds"][0]["kept"] = torch.tensor([int(run["rounds"][0]["active"][0]), 99])
    with pytest.raises(InputError) as from_file:
        validate_run(run)
    dims = Dims()
    dims.agree("R0", run["clusterings"]["centroids"].shape[0], "clusterings.centroids")
    with pytest.raises(InputError) as from_record:
        Round.from_dict(run["rounds"][0], "rounds[0]", dims)
    assert str(from_file.value) == str(from_record.value) and "rounds[0].kept" in str(from_file.value)


def test_refinement_stage3_and_status_validate_their_fields():
    ok = Refinement([2, 0], True, 1e-4, 5e-5, 3, torch.zeros(3, 2), "refined", beta=1.0, step=40)
    assert ok.pair == (2, 0) and ok.to_dict()["pair"].dtype == torch.int64 and ok.to_dict()["step"] == 40
    with pytest.raises(InputError, match=r"^Refinement\.pair must hold 2 clustering ids; got \[0, 1, 2\]\.$"):
        Refinement([0, 1, 2], True, 1e-4, 5e-5, 3, torch.zeros(3, 2), "refined")
    with pytest.raises(InputError, match=r"^Refinement\.eps must be a float > 0; got 0\.0\.$"):
        Refinement([0, 1], True, 0.0, 5e-5, 3, torch.zeros(3, 2), "refined")
    with pytest.raises(InputError, match=r"^Refinement\.losses must have shape \[e, 2\]"):
        Refinement([0, 1], True, 1e-4, 5e-5, 3, torch.zeros(3, 3), "refined")
    dims = Dims()
    dims.agree("R0", 4, "clusterings.centroids")
    with pytest.raises(InputError, match=r"^stage3\.clustering is 4, outside 0\.\.3 \(R0=4\)\.$"):
        Stage3(4, 2, ["stage3_0"], where="stage3", dims=dims)
    assert Stage3(1, 2, ["stage3_0"]).to_dict() == {"clustering": 1, "epochs": 2, "snapshots": ["stage3_0"]}
    with pytest.raises(InputError, match=r"^status\.complete must be a bool; got 1 \(int\)\.$"):
        Status.from_dict({"complete": 1})


def test_eval_clusterings_and_outputs_check_their_shapes_and_values():
    x = torch.randn(6, 3)
    with pytest.raises(InputError, match=r"^eval\.eigenvalues must be sorted in descending order"):
        EvalSet(x, x.mean(0), torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match=r"^eval\.x has N=3 but eval\.xbar has N=2; "):
        EvalSet(x, torch.zeros(2), torch.tensor([2.0]))
    assert EvalSet(x, x.mean(0), torch.tensor([2.0, 1.0])).lambda_max == 2.0
    c = torch.randn(2, 4, 3)
    with pytest.raises(InputError, match=r"^clusterings\.resp rows must sum to 1"):
        Clusterings(c, torch.full((2, 4), 0.25), torch.arange(2), torch.zeros(2), "diag", resp=torch.ones(2, 6, 4))
    assert Clusterings(c, torch.full((2, 4), 0.25), torch.arange(2), torch.zeros(2), "diag").r0 == 2
    with pytest.raises(InputError, match=r"^Outputs\.mu has m=6 but Outputs\.xhat has m=5; "):
        Outputs(torch.zeros(6, 2), torch.zeros(6, 2), torch.zeros(5, 3))
    with pytest.raises(InputError, match=r"^history\.stage holds values outside 0\.\.3"):
        History(torch.arange(3), {"stage": torch.tensor([0, 1, 4])})
    with pytest.raises(InputError, match=r"^aggressive\.ended_epoch is 3 but aggressive\.mi holds 2 epoch\(s\)"):
        Aggressive(torch.zeros(2), 3)


def test_config_keeps_unknown_keys_and_references_need_their_parameters():
    cfg = RunConfig.from_dict({"method": "hct", "s2": 2, "hct": {"r0": 4}, "train": {"lr": 0.01}, "mine": [1]})
    assert cfg.s2 == 2.0 and isinstance(cfg.s2, float) and cfg.is_hct and cfg.train == {"lr": 0.01}
    assert cfg.to_dict() == {"method": "hct", "s2": 2.0, "hct": {"r0": 4}, "model": None, "train": {"lr": 0.01},
                             "mine": [1]}
    with pytest.raises(InputError, match=r"^config\.s2 is missing; a run file needs it \(the decoder variance\)"):
        RunConfig.from_dict({"method": "hct"})
    with pytest.raises(InputError, match=r"^config\.loss must be one of literal, scaled, mean; got 'sum'\.$"):
        RunConfig("hct", 1.0, loss="sum")
    rcfg = {"method": "vanilla", "s2": 1.0, "multiple": 10.0}
    with pytest.raises(InputError, match=r"^references\.vanilla\.state is missing; a reference needs its "
                                         r"parameters \(a state_dict of its config\.model\)"):
        Reference("vanilla", rcfg)
    out = Outputs(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 3))
    col = Reference("collapsed", rcfg, outputs=out)  # a collapsed model hcdiag cannot rebuild: outputs suffice
    refs = References(collapsed=col)
    assert refs.get("collapsed") is col and refs.get("vanilla") is None and list(refs) == [col]
    assert References.from_dict(refs.to_dict()).collapsed.outputs.mu.shape == (4, 2)
    with pytest.raises(InputError, match=r"^references\.control must be a Reference named 'control'"):
        References(control=col)


# -- docs/runfile.md describes every record ---------------------------------------------------------------

RECORDS = (Status, RunConfig, EvalSet, Clusterings, Round, Refinement, Stage3, History, Outputs, Reference,
           References, Aggressive, Teacher)


def test_runfile_doc_lists_every_field_of_every_record():
    doc = (ROOT / "docs" / "runfile.md").read_text()
    section = doc[doc.index("## Typed records"):doc.index("## Safety and format")]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| [^|]+ \| `(\w+)` \| (.+) \|$", section, re.M)}
    assert set(rows) == {cls.__name__ for cls in RECORDS} == set(records.__all__) - {"Dims"}
    for cls in RECORDS:
        fields = {f.name for f in dataclasses.fields(cls)}
        listed = set(re.findall(r"`(\w+)`", rows[cls.__name__]))
        assert fields <= listed, (cls.__name__, sorted(fields - listed))
