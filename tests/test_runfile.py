"""The run file contract: schema validation, safe loading, atomic saving (hcdiag/runfile.py)."""

import builtins
import copy
import errno
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcdiag import runfile
from hcdiag.errors import InputError
from hcdiag.runfile import (FORMAT, SUPPORTED_VERSIONS, VERSION, example_run, is_complete, load_run,
                            save_run, validate_run)


def make_run(R0=4, K=3, N=5, m=20, n=2, **kw):
    """A valid minimal run dict (thin alias of the library's example_run)."""
    return example_run(R0=R0, K=K, N=N, m=m, n=n, **kw)


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def load_error(tmp_path, run, *, partial=False, name="run.pt"):
    """Write ``run`` with plain torch.save (no validation) and return load_run's one-line error."""
    path = tmp_path / name
    torch.save(run, path)
    with pytest.raises(InputError) as excinfo:
        load_run(path, partial=partial)
    text = one_line(excinfo)
    assert text.startswith(f"{path}: ")
    return text


def walk(obj, where=""):
    """(path, leaf) pairs of a nested run structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{where}[{i}]")
    else:
        yield where, obj


def bits(t):
    return t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


# ---- the factory and the schema ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {}, {"R0": 8}, {"R0": 16, "K": 5}, {"snapshots": False, "outputs": True},
    {"outputs": True}, {"references": True}, {"method": "vanilla"}, {"history": False},
    {"R0": 2}, {"dtype": torch.float64},
])
def test_example_runs_are_valid_and_complete(kw, seed):
    run = make_run(seed=seed, **kw)
    validate_run(run)
    assert is_complete(run)


def test_example_rounds_follow_the_halving_rule(seed):
    run = make_run(R0=16, seed=seed)
    sizes = [len(r["active"]) for r in run["rounds"]]
    assert sizes == [16, 8, 4]
    for r in run["rounds"]:
        losses = r["losses"]
        active = r["active"].tolist()
        # kept = the half of the active set with the smallest l_C (Algorithm 1)
        naive = sorted(sorted(active, key=lambda c: float(losses[c]))[: len(active) // 2])
        assert r["kept"].tolist() == naive
        assert r["eps"] == pytest.approx(max(float(losses[c]) for c in naive))
    assert run["refinement"]["pair"].tolist() == run["rounds"][-1]["kept"].tolist()
    assert run["snapshot_order"] == ["init", "round0", "round1", "round2", "refined", "stage3_0", "stage3_1", "final"]


def test_partial_run_needs_partial(tmp_path, seed):
    run = make_run(seed=seed, complete=False)
    validate_run(run, partial=True)
    assert not is_complete(run)
    save_run(run, tmp_path / "run.pt")
    with pytest.raises(InputError, match=r"status says the run is not complete \(it stopped at stage 'stage1'\); "
                                         r"wait for training to finish, or load it with partial=True") as e:
        load_run(tmp_path / "run.pt")
    one_line(e)
    r = load_run(tmp_path / "run.pt", partial=True)
    assert r.complete is False and r.refinement is None and r.stage3 is None


def test_status_error_is_reported_on_one_line(tmp_path, seed):
    run = make_run(seed=seed, complete=False)
    run["status"]["error"] = "Traceback (most recent call last):\n  File \"train.py\", line 3\nRuntimeError: CUDA out of memory\n"
    text = load_error(tmp_path, run)
    assert "(it stopped at stage 'stage1' with the error: RuntimeError: CUDA out of memory); wait for" in text
    run["status"]["error"] = "diverged: loss is NaN\nat step 12"
    assert "with the error: diverged: loss is NaN); wait for" in load_error(tmp_path, run)


@pytest.mark.parametrize("key", ["rounds", "refinement", "stage3"])
def test_complete_hct_run_needs_every_stage(tmp_path, key, seed):
    run = make_run(seed=seed)
    del run[key]
    assert re.search(rf"{key} is missing; a complete hct run records .*; load it with partial=True",
                     load_error(tmp_path, run))
    # partial relaxes only these
    validate_run(run, partial=True)


def test_absent_status_reads_as_complete(tmp_path, seed):
    run = make_run(seed=seed)
    del run["status"]
    save_run(run, tmp_path / "run.pt")
    r = load_run(tmp_path / "run.pt")
    assert r.complete and r.status.complete


# ---- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"outputs": True, "references": True, "R0": 8}])
def test_round_trip_preserves_every_tensor_bitwise(tmp_path, kw, seed):
    run = make_run(seed=seed, **kw)
    run["history"]["loss"][0] = float("nan")  # history may record a diverged step: kept bit for bit
    path = save_run(run, tmp_path / "run.pt")
    assert path == tmp_path / "run.pt"
    back = load_run(path).data
    a, b = list(walk(run)), list(walk(back))
    assert [k for k, _ in a] == [k for k, _ in b]
    for (key, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), key
            assert bits(x) == bits(y), key
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), key
        else:
            assert type(x) is type(y) and x == y, key


def test_plain_weights_only_load_reads_a_saved_run(tmp_path, seed):
    run = make_run(seed=seed, outputs=True, references=True)
    save_run(run, tmp_path / "run.pt")
    raw = torch.load(tmp_path / "run.pt", weights_only=True, map_location="cpu")
    assert raw["format"] == FORMAT and raw["version"] == VERSION
    assert torch.equal(raw["clusterings"]["centroids"], run["clusterings"]["centroids"])


def test_save_writes_views_compactly_and_converts_numpy(tmp_path, seed):
    rng = np.random.default_rng(seed)
    big = torch.randn(20000, 5)
    run = make_run(seed=seed)
    run["eval"]["x"] = big[:20]  # a view: torch.save alone would write all 20000 rows
    run["eval"]["xbar"] = big.mean(0)
    run["config"]["versions"] = {"torch": torch.__version__, "numpy": np.__version__}  # TorchVersion: a str subclass
    run["config"]["seed"] = np.int64(seed)
    run["clusterings"]["loglik"] = rng.normal(size=4)  # numpy array -> tensor
    save_run(run, tmp_path / "run.pt")
    assert (tmp_path / "run.pt").stat().st_size < big.numel() * 4 / 4
    r = load_run(tmp_path / "run.pt")
    assert torch.equal(r.eval_x, big[:20])
    assert type(r.config.versions["torch"]) is str and r.config.versions["torch"] == str(torch.__version__)
    assert type(r.config.seed) is int and r.config.seed == seed
    assert np.array_equal(r.clusterings.loglik.numpy(), run["clusterings"]["loglik"])
    # the caller's dict is not modified
    assert isinstance(run["clusterings"]["loglik"], np.ndarray) and run["eval"]["x"]._base is big


def test_saved_file_mode_follows_umask(tmp_path, seed):
    mask = os.umask(0o022)
    try:
        save_run(make_run(seed=seed), tmp_path / "run.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "run.pt").stat().st_mode & 0o777 == 0o644


# ---- the Run view ------------------------------------------------------------------------------


def test_run_view_matches_the_dict(tmp_path, seed):
    run = make_run(R0=8, K=4, N=6, m=30, n=3, seed=seed, outputs=True)
    r = load_run(save_run(run, tmp_path / "run.pt"))
    assert (r.r0, r.k, r.N, r.m, r.latent_dim) == (8, 4, 6, 30, 3)
    assert r.path == tmp_path / "run.pt" and r.version == 1 and r.method == "hct"
    assert torch.equal(r.eval_x, run["eval"]["x"]) and torch.equal(r.xbar, run["eval"]["xbar"])
    assert torch.equal(r.centroids, run["clusterings"]["centroids"])
    # lambda_max: the config's, else the top eigenvalue; the data's covariance spectrum as oracle
    x = run["eval"]["x"].double().numpy()
    assert r.eigenvalues[0].item() == pytest.approx(np.linalg.eigvalsh(np.cov(x.T))[-1], rel=1e-5)
    assert r.lambda_max == run["config"]["lambda_max"] and r.s2 == run["config"]["s2"]
    assert r.snapshot_names == run["snapshot_order"]
    assert r.has_parameters and r.has_outputs
    for name in r.snapshot_names:
        assert r.snapshot(name) is r.data["snapshots"][name]
        assert torch.equal(r.outputs(name).xhat, run["outputs"][name]["xhat"])
    assert r.outputs("nope") is None
    assert len(r.rounds) == 2 and r.refinement.snapshot == "refined" and r.stage3.epochs == 4
    assert r.history.get("losses").shape == (2 * len(r.snapshot_names), 8) and r.references is None
    with pytest.raises(AttributeError, match="read-only"):
        r.path = "x"


def test_outputs_only_run(tmp_path, seed):
    run = make_run(seed=seed, snapshots=False, outputs=True, n=3)
    del run["snapshot_order"]  # default order: the outputs' keys
    r = load_run(save_run(run, tmp_path / "run.pt"))
    assert not r.has_parameters and r.has_outputs and r.latent_dim == 3
    assert r.snapshot_names == list(run["outputs"])
    with pytest.raises(InputError, match=r"run.pt: has no parameters for snapshot 'final' \(snapshots with "
                                         r"parameters: none\); pick one of those, or use outputs\('final'\)"):
        r.snapshot("final")


# ---- reading errors ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope.pt: no such file; check the path") as e:
        load_run(tmp_path / "nope.pt")
    one_line(e)


def test_directory(tmp_path, seed):
    with pytest.raises(InputError, match=r": is a directory, not a run file; pass the run file itself"):
        load_run(tmp_path)
    save_run(make_run(seed=seed), tmp_path / "run.pt")
    with pytest.raises(InputError, match=r"is a directory, not a run file \(it holds .*run.pt\)"):
        load_run(tmp_path)


def test_unreadable_file_chmod(tmp_path, seed):
    path = save_run(make_run(seed=seed), tmp_path / "run.pt")
    path.chmod(0)
    try:
        try:
            open(path, "rb").close()
            pytest.skip("running as root: chmod 000 does not stop reads (see the monkeypatched test)")
        except PermissionError:
            pass
        with pytest.raises(InputError, match=r"run.pt: cannot be read \(permission denied\); fix its permissions"):
            load_run(path)
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch, seed):
    path = save_run(make_run(seed=seed), tmp_path / "run.pt")
    real_open = builtins.open

    def denying_open(file, *a, **kw):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(runfile, "open", denying_open, raising=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: cannot be read \(permission denied\); "
                                         r"fix its permissions \(chmod u\+r\)") as e:
        load_run(path)
    one_line(e)


def test_empty_file(tmp_path):
    (tmp_path / "run.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"run.pt: is empty \(0 bytes\), not a run file"):
        load_run(tmp_path / "run.pt")


def test_text_file_is_not_a_torch_file(tmp_path):
    (tmp_path / "run.pt").write_text("step,loss\n0,1.5\n")
    with pytest.raises(InputError, match=r"run.pt: is not a torch file \(torch.load failed: .*\); "
                                         r"pass a run file written by torch.save") as e:
        load_run(tmp_path / "run.pt")
    one_line(e)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.9])
def test_truncated_file(tmp_path, fraction, seed):
    full = save_run(make_run(seed=seed), tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(full[: int(len(full) * fraction)])
    with pytest.raises(InputError, match=r"cut.pt: is truncated or corrupt \(.*\); the torch file is incomplete: "
                                         r"copy it again or re-run the training") as e:
        load_run(tmp_path / "cut.pt")
    one_line(e)


class NotAllowlisted:
    """A class the weights_only unpickler must refuse."""

    def __init__(self):
        self.x = 1


class RunsCode:
    """Unpickling this would run a shell command (creating a marker file) if anything unpickled it."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_custom_class_is_refused(tmp_path, seed):
    run = make_run(seed=seed)
    run["config"]["extra"] = NotAllowlisted()
    text = load_error(tmp_path, run)
    assert re.search(r"holds pickled objects a run file may not contain \(it asked for the global "
                     r"\S*NotAllowlisted, which is not allowlisted\); nothing from it was run", text)


def test_unsafe_reduce_is_refused_and_nothing_runs(tmp_path, seed):
    marker = tmp_path / "pwned"
    evil = RunsCode()
    evil.marker = str(marker)
    run = make_run(seed=seed)
    run["config"]["extra"] = evil
    text = load_error(tmp_path, run)
    assert re.search(r"it asked for the global (posix|nt|os)\.system, which is not allowlisted", text)
    assert not marker.exists()


def test_ordered_dict_is_fine(tmp_path, seed):
    from collections import OrderedDict

    run = make_run(seed=seed)
    run["snapshots"] = OrderedDict((k, OrderedDict(v)) for k, v in run["snapshots"].items())
    torch.save(run, tmp_path / "run.pt")
    assert load_run(tmp_path / "run.pt").snapshot_names == run["snapshot_order"]


def test_not_a_dict(tmp_path):
    text = load_error(tmp_path, [torch.ones(3)])
    assert "is a torch file holding a list, not an hcdiag run file" in text


def test_state_dict_is_not_a_run(tmp_path):
    text = load_error(tmp_path, {"weight": torch.ones(2, 2)})
    assert "has no 'format' key, so it is not an hcdiag run file (a bare state_dict or checkpoint?)" in text


def test_wrong_format(tmp_path, seed):
    run = make_run(seed=seed)
    run["format"] = "other-run"
    assert "format is 'other-run', not 'hcdiag-run', so it is not an hcdiag run file" in load_error(tmp_path, run)


@pytest.mark.parametrize("version", [2, 0, 17])
def test_unsupported_version(tmp_path, version, seed):
    run = make_run(seed=seed)
    run["version"] = version
    text = load_error(tmp_path, run)
    assert version not in SUPPORTED_VERSIONS
    assert f"version {version} is not supported; this hcdiag reads version(s) 1: upgrade hcdiag" in text


def test_version_must_be_an_int(tmp_path, seed):
    run = make_run(seed=seed)
    run["version"] = "1"
    assert "version must be an int; got '1' (str)" in load_error(tmp_path, run)


def _delete(run, path):
    parts = re.findall(r"[^.\[\]]+", path)
    node = run
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    del node[parts[-1]]


@pytest.mark.parametrize("path", [
    "version", "config", "eval", "clusterings", "config.method", "config.s2", "eval.x", "eval.xbar",
    "eval.eigenvalues", "clusterings.centroids", "clusterings.weights", "clusterings.seeds",
    "clusterings.loglik", "clusterings.covariance_type", "rounds[0].losses", "rounds[0].kept",
    "rounds[0].snapshot", "refinement.eps_T", "refinement.pair", "stage3.clustering", "history.step",
    "config.model.latent_dim", "outputs.final.xhat", "references.collapsed.config.s2", "status.complete",
])
def test_missing_key_is_named_with_its_full_path(tmp_path, path, seed):
    run = make_run(seed=seed, outputs=True, references=True)
    _delete(run, path)
    text = load_error(tmp_path, run)
    assert re.search(rf": {re.escape(path)} is missing; ", text), text


def test_no_snapshots_and_no_outputs(tmp_path, seed):
    run = make_run(seed=seed)
    del run["snapshots"]
    assert "snapshots and outputs are both missing" in load_error(tmp_path, run)


def test_snapshots_without_a_model_cannot_be_rebuilt(tmp_path, seed):
    run = make_run(seed=seed)
    run["config"]["model"] = None
    assert ("snapshots are given but config.model is missing, so hcdiag cannot rebuild the model; "
            "add config.model or store outputs per snapshot") in load_error(tmp_path, run)
    run["outputs"] = make_run(seed=seed, outputs=True)["outputs"]
    validate_run(run)  # outputs make the parameter-free checks possible


def _resize_last(t, n):
    return t[..., :n].clone() if n <= t.shape[-1] else torch.cat([t, t[..., : n - t.shape[-1]]], dim=-1)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["clusterings"].__setitem__("centroids", r["clusterings"]["centroids"][..., :31]),
     "eval.x has N=32 but clusterings.centroids has N=31"),
    (lambda r: r["eval"].__setitem__("xbar", torch.zeros(30)), "eval.x has N=32 but eval.xbar has N=30"),
    (lambda r: r["clusterings"].__setitem__("weights", torch.ones(5, 3) / 3),
     "clusterings.centroids has R0=4 but clusterings.weights has R0=5"),
    (lambda r: r["clusterings"].__setitem__("seeds", torch.arange(3)),
     "clusterings.centroids has R0=4 but clusterings.seeds has R0=3"),
    (lambda r: r["clusterings"].__setitem__("weights", torch.ones(4, 2) / 2),
     "clusterings.centroids has K=3 but clusterings.weights has K=2"),
    (lambda r: r["rounds"][0].__setitem__("losses", torch.ones(5)),
     "clusterings.centroids has R0=4 but rounds[0].losses has R0=5"),
    (lambda r: r["history"].__setitem__("losses", r["history"]["losses"][:, :3]),
     "clusterings.centroids has R0=4 but history.losses has R0=3"),
    (lambda r: r["history"].__setitem__("kl", r["history"]["kl"][:-1]), "history.step has h=12 but history.kl has h=11"),
    (lambda r: r["outputs"]["final"].__setitem__("xhat", torch.zeros(20, 33)),
     "eval.x has N=32 but outputs.final.xhat has N=33"),
    (lambda r: r["outputs"]["init"].__setitem__("mu", torch.zeros(19, 2)),
     "eval.x has m=20 but outputs.init.mu has m=19"),
    (lambda r: r["outputs"]["init"].__setitem__("logvar", torch.zeros(20, 3)),
     "config.model.latent_dim has n=2 but outputs.init.logvar has n=3"),
    (lambda r: r["config"]["model"].__setitem__("input_dim", 31), "eval.x has N=32 but config.model.input_dim has N=31"),
    (lambda r: r["config"]["dataset"].__setitem__("image_shape", [1, 4, 7]),
     "eval.x has N=32 but config.dataset.image_shape has N=28"),
    (lambda r: r["clusterings"].__setitem__("resp", torch.ones(4, 21, 3) / 3),
     "eval.x has m=20 but clusterings.resp has m=21"),
    (lambda r: r["config"]["hct"].__setitem__("r0", 8), "clusterings.centroids has R0=4 but config.hct.r0 has R0=8"),
])
def test_shapes_that_disagree_name_both(tmp_path, mutate, message, seed):
    run = make_run(N=32, seed=seed, outputs=True)
    mutate(run)
    text = load_error(tmp_path, run)
    assert message in text and "both must describe the same run" in text, text


@pytest.mark.parametrize("where", ["eval.x", "eval.xbar", "eval.eigenvalues", "clusterings.centroids",
                                   "clusterings.weights", "rounds[0].losses", "outputs.final.xhat",
                                   "outputs.init.mu"])
def test_nonfinite_values_are_counted(tmp_path, where, seed):
    rng = np.random.default_rng(seed)
    run = make_run(seed=seed, outputs=True)
    parts = re.findall(r"[^.\[\]]+", where)
    node = run
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    t = node[parts[-1]].clone()
    flat = t.view(-1)
    count = int(rng.integers(1, flat.numel() + 1))
    idx = rng.choice(flat.numel(), size=count, replace=False)
    flat[torch.from_numpy(idx)] = torch.from_numpy(rng.choice([np.nan, np.inf, -np.inf], size=count)).to(t.dtype)
    node[parts[-1]] = t
    naive = sum(1 for v in t.view(-1).tolist() if not math.isfinite(v))
    assert naive == count
    text = load_error(tmp_path, run)
    assert f"{where} holds {count} non-finite value(s) (NaN or inf) of {t.numel()}; " in text, text


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["rounds"][0].__setitem__("kept", torch.tensor([0, 9])),
     r"rounds\[0\].kept holds clustering id\(s\) \[9\] outside 0..3 \(R0=4\)"),
    (lambda r: r["rounds"][0].__setitem__("kept", torch.tensor([r["rounds"][0]["active"][0].item()] * 2)),
     r"rounds\[0\].kept repeats clustering ids"),
    (lambda r: r["rounds"][0].__setitem__("active", r["rounds"][0]["kept"][:1].clone()),
     r"rounds\[0\].kept holds \[\d\] which are not in rounds\[0\].active; kept must be a subset of active"),
    (lambda r: r["rounds"][0].__setitem__("snapshot", "round7"),
     r"rounds\[0\].snapshot names snapshot 'round7', which is neither in snapshots nor in outputs"),
    (lambda r: r["rounds"][0].__setitem__("active", r["rounds"][0]["active"].float()),
     r"rounds\[0\].active must be an integer tensor \(int64\); got dtype torch.float32"),
    (lambda r: r["stage3"]["snapshots"].append("stage3_9"), r"stage3.snapshots\[2\] names snapshot 'stage3_9'"),
    (lambda r: r["stage3"].__setitem__("clustering", 4), r"stage3.clustering is 4, outside 0..3 \(R0=4\)"),
    (lambda r: r["refinement"].__setitem__("pair", torch.tensor([0])), r"refinement.pair must hold 2 clustering ids"),
    (lambda r: r["refinement"].__setitem__("losses", torch.ones(3)), r"refinement.losses must be a 2-D tensor"),
    (lambda r: r["refinement"].__setitem__("reached", 1), r"refinement.reached must be a bool; got 1 \(int\)"),
    (lambda r: r["snapshot_order"].pop(), r"snapshot_order lacks \['final'\], which are in snapshots/outputs"),
    (lambda r: r["snapshot_order"].append("ghost"), r"snapshot_order\[6\] names snapshot 'ghost'"),
    (lambda r: r["eval"].__setitem__("eigenvalues", r["eval"]["eigenvalues"].flip(0)),
     r"eval.eigenvalues must be sorted in descending order"),
    (lambda r: r["eval"]["eigenvalues"].__setitem__(-1, -1e-9), r"eval.eigenvalues holds 1 negative value\(s\)"),
    (lambda r: r["config"].__setitem__("s2", -1.0), r"config.s2 must be a float > 0; got -1.0"),
    (lambda r: r["config"].__setitem__("multiple", "2"), r"config.multiple must be a float; got '2' \(str\)"),
    (lambda r: r["config"].__setitem__("loss", "sum"), r"config.loss must be one of literal, scaled, mean; got 'sum'"),
    (lambda r: r["config"]["model"].__setitem__("family", "rnn"), r"config.model.family must be one of mlp, conv, linear"),
    (lambda r: r["config"]["model"].update(family="conv", image_shape=None),
     r"config.model.image_shape is missing; a conv model needs \[C, H, W\]"),
    (lambda r: r["history"].__setitem__("stage", r["history"]["stage"] + 4), r"history.stage holds values outside 0..3"),
    (lambda r: r["snapshots"]["init"].__setitem__("decoder.weight", [1.0]),
     r"snapshots.init.decoder.weight must be a tensor \(a state_dict holds tensors\); got list"),
    (lambda r: r["rounds"].append(dict(r["rounds"][0])), r"rounds\[1\].round is 0 after round 0; rounds must be in training order"),
])
def test_semantic_errors(tmp_path, mutate, message, seed):
    run = make_run(seed=seed)
    mutate(run)
    text = load_error(tmp_path, run)
    assert re.search(message, text), text


# ---- plain types (what weights_only=True can load) ------------------------------------------------


def test_validate_refuses_non_plain_values_by_path(seed):
    run = make_run(seed=seed)
    run["config"]["dataset"]["mean"] = np.zeros(3)
    with pytest.raises(InputError, match=r"^config.dataset.mean is a numpy.ndarray; convert it to a tensor or a plain "
                                         r"Python value \(a run file holds only tensors, .* so it loads with "
                                         r"weights_only=True\)") as e:
        validate_run(run)
    one_line(e)


def test_validate_refuses_odd_keys(seed):
    run = make_run(seed=seed)
    run["config"]["extra"] = {(1, 2): 3}
    with pytest.raises(InputError, match=r"config.extra has a key of type tuple \(\(1, 2\)\); dict keys in a run file "
                                         r"must be str or int"):
        validate_run(run)


def test_validate_run_needs_a_dict():
    with pytest.raises(InputError, match=r"the run must be a dict with format='hcdiag-run'; got list"):
        validate_run([])


# ---- atomic saving ---------------------------------------------------------------------------------


def _temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_an_invalid_run(tmp_path, seed):
    run = make_run(seed=seed)
    del run["clusterings"]["centroids"]
    with pytest.raises(InputError, match=r"^refusing to write .*run.pt: clusterings.centroids is missing; ") as e:
        save_run(run, tmp_path / "run.pt")
    one_line(e)
    assert not (tmp_path / "run.pt").exists() and not _temp_files(tmp_path)


def test_save_is_atomic_when_the_writer_crashes(tmp_path, monkeypatch, seed):
    path = save_run(make_run(seed=seed), tmp_path / "run.pt")
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_run(make_run(seed=seed + 1), path)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []

    def disk_full(obj, f, *a, **kw):
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(InputError, match=r"run.pt: could not write the run file \(No space left on device\); "
                                         r"the previous file \(if any\) is untouched") as e:
        save_run(make_run(seed=seed + 1), path)
    one_line(e)
    assert path.read_bytes() == before and _temp_files(tmp_path) == []
    monkeypatch.setattr(torch, "save", real_save)
    load_run(path)  # still the old, valid file


def test_save_into_an_unwritable_folder_simulated(tmp_path, monkeypatch, seed):
    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}: cannot write the run file there "
                                         r"\(permission denied\); choose a writable folder") as e:
        save_run(make_run(seed=seed), tmp_path / "run.pt")
    one_line(e)


def test_save_into_an_unwritable_folder_chmod(tmp_path, seed):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod 555 does not stop writes (see the simulated test)")
        with pytest.raises(InputError, match=r"ro: cannot write the run file there \(permission denied\)"):
            save_run(make_run(seed=seed), folder / "run.pt")
    finally:
        folder.chmod(0o755)


def test_save_under_a_file_or_onto_a_directory(tmp_path, seed):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match=r"afile: is a file, not a folder, so .*run.pt cannot be written there"):
        save_run(make_run(seed=seed), tmp_path / "afile" / "sub" / "run.pt")
    with pytest.raises(InputError, match=r": is a directory; pass a file name for the run file"):
        save_run(make_run(seed=seed), tmp_path)


def test_save_creates_missing_folders(tmp_path, seed):
    path = save_run(make_run(seed=seed), tmp_path / "a" / "b" / "run.pt")
    assert load_run(path).r0 == 4


def test_example_run_refuses_a_bad_r0():
    with pytest.raises(InputError, match=r"The 'R0' parameter must be a power of two >= 2 for method='hct'. Got 6."):
        example_run(R0=6)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 4), K=st.integers(1, 4), N=st.integers(1, 6), m=st.integers(2, 12), n=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1), outputs=st.booleans())
def test_any_example_run_round_trips(k, K, N, m, n, seed, outputs):
    run = example_run(R0=2**k, K=K, N=N, m=m, n=n, seed=seed, outputs=outputs)
    with tempfile.TemporaryDirectory() as d:
        r = load_run(save_run(run, Path(d) / "run.pt"))
        assert (r.r0, r.k, r.N, r.m, r.latent_dim) == (2**k, K, N, m, n)
        assert len(r.rounds) == max(k - 1, 0)
        a = copy.deepcopy(run)
        for (key, x), (_, y) in zip(walk(a), walk(r.data)):
            if isinstance(x, torch.Tensor):
                assert bits(x) == bits(y), key


# ---- the documented parameter names (docs/runfile.md) -------------------------------------------


def _doc_tables() -> dict[str, tuple[dict, list[tuple[str, tuple]]]]:
    """``{family: (config, [(name, shape), ...])}`` of the example tables in docs/runfile.md, 'Parameter names'."""
    import json

    text = (Path(__file__).resolve().parents[1] / "docs" / "runfile.md").read_text()
    out = {}
    for fam, body in re.findall(r"#### `(\w+)` example\n(.*?)(?=\n#|\n## )", text, flags=re.S):
        cfg = json.loads(re.search(r"Config: `(\{.*\})`", body).group(1))
        rows = [(name, tuple(int(v) for v in re.findall(r"\d+", shape)))
                for name, shape in re.findall(r"^\| `([\w.]+)` \| `(\([\d, ]*\))` \|$", body, flags=re.M)]
        out[fam] = (cfg, rows)
    return out


def test_the_documented_parameter_names_are_the_real_ones():
    """The names a producer of its own must use are written by hand in the docs: they must be the real ones."""
    from hcdiag.models import build_model

    tables = _doc_tables()
    assert sorted(tables) == ["conv", "linear", "mlp"]
    for fam, (cfg, rows) in tables.items():
        assert cfg["family"] == fam and rows
        real = [(k, tuple(v.shape)) for k, v in build_model(cfg).state_dict().items()]
        assert rows == real, fam
