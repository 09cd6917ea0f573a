"""Fault injection on ``hcdiag train`` and the files it writes (issue 10, "nothing lost, nothing crashes").

The real commands run as a user runs them (``python -m hcdiag ...`` in a subprocess), with faults injected
from outside: the input data as ``--out``, an existing file, a non-finite loss, changed data on
``--resume``, a second trainer on the same ``--out``, a full disk (a 1 MiB tmpfs where the test may mount
one; always a writer failing with ENOSPC and torch's own RuntimeError), kill -9 in the middle of a save.
Variants that need a monkeypatch run the same CLI in-process (``hcdiag.cli.main``). Every refusal is one
line on stderr and leaves every file as it was: checked by hash and by listing the folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hcdiag.cli import main
from hcdiag.errors import HcdiagWarning, InputError, NumericalError
from hcdiag.runfile import example_run, load_run, save_run

FAST = ["--preset", "smoke", "--r0", "4", "--k", "3", "--epochs-per-round", "1", "--steps-per-clustering", "2",
        "--refine-cap", "2", "--stage3-epochs", "1", "--epochs", "1", "--eval-rows", "100", "--enc-widths", "8",
        "--dec-widths", "8", "--latent-dim", "2", "--em-backend", "sklearn", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ERR = "hcdiag train: error: "

pytestmark = pytest.mark.usefixtures("one_thread")


def hcdiag(*argv, script: str | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m hcdiag ARGV``; with ``script``, that Python code runs first (the injected fault)."""
    if script is None:
        cmd = [sys.executable, "-m", "hcdiag", *map(str, argv)]
    else:
        cmd = [sys.executable, "-c", f"{script}\nimport sys\nfrom hcdiag.cli import main\nsys.exit(main(sys.argv[1:]))",
               *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def one_line(proc: subprocess.CompletedProcess, code: int, prefix: str = ERR) -> str:
    """The single stderr line of a command that exited with ``code``, without its prefix."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def cli_line(capsys, code: int, *argv) -> str:
    """The same through ``hcdiag.cli.main`` in this process (for the monkeypatched faults)."""
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    return lines[0].split(": error: ", 1)[-1]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder) -> dict[str, str]:
    """Every file in ``folder`` (hidden ones too: locks, temporaries) with its hash."""
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".lock")))


def make_data(seed, n=400):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 3, size=(3, 5))[rng.integers(0, 3, n)] + rng.normal(0, 0.5, size=(n, 5))).astype(np.float32)


@pytest.fixture
def data_file(tmp_path, seed):
    p = tmp_path / "x.npy"
    np.save(p, make_data(seed))
    return p


# ---------------------------------------------------------------------------------------------------
# 1. --out never destroys a file: the input data always refused, any other file only with --overwrite


def test_out_that_is_the_input_data_is_refused_even_with_overwrite(data_file, tmp_path, capsys):
    before = listing(tmp_path)
    line = one_line(hcdiag("train", data_file, "--out", data_file, "--overwrite", *FAST), 2)
    assert line == (f"--out {data_file} is the data file this run reads ({data_file.resolve()}); writing the run "
                    "there would destroy the data: choose another --out.")
    os.link(data_file, tmp_path / "hard.npy")  # the same inode under another name
    line = one_line(hcdiag("train", data_file, "--out", tmp_path / "hard.npy", "--resume", *FAST), 2)
    assert line.startswith(f"--out {tmp_path / 'hard.npy'} is the data file this run reads")
    (tmp_path / "link.npy").symlink_to(data_file)
    assert "is the data file this run reads" in cli_line(capsys, 2, "train", tmp_path / "link.npy", "--out", data_file,
                                                         "--overwrite", *FAST)
    os.unlink(tmp_path / "hard.npy")
    os.unlink(tmp_path / "link.npy")
    assert listing(tmp_path) == before  # the data's bytes, and nothing written beside them (no lock left)


def test_a_file_in_the_data_folder_is_refused(tmp_path, seed):
    from hcdiag.data import Dataset
    from hcdiag.train import Trainer, make_config

    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 images")
    ds = Dataset(x=make_data(seed), name="mnist", split="train", image_shape=None, preprocessing={}, source=str(folder))
    out = folder / "train-images-idx3-ubyte"
    with pytest.raises(InputError, match=rf"^out {re.escape(str(out))} is a file in the data folder "
                                         rf"{re.escape(str(folder))} that this run reads; write the run file outside "
                                         r"it \(another out\)\.$"):
        Trainer(make_config(None, seed=seed, references=()), ds, out).run(overwrite=True)
    assert out.read_bytes() == b"\x00\x00\x08\x03 images" and temporaries(folder) == []


def test_existing_out_is_refused_unless_overwrite(data_file, tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    before = listing(tmp_path)
    line = one_line(hcdiag("train", data_file, "--out", other, *FAST), 2)
    assert line == (f"--out {other} already exists; pass --resume to continue it, --overwrite to replace it, or "
                    "choose another --out.")
    assert listing(tmp_path) == before
    done = hcdiag("train", data_file, "--out", other, "--overwrite", *FAST, "--references", "none")
    assert done.returncode == 0, done.stderr
    assert load_run(other).complete and temporaries(tmp_path) == []
    # a finished run of another config is refused the same way
    run_bytes = sha(other)
    line = cli_line(capsys, 2, "train", data_file, "--out", other, *FAST, "--seed", "7")
    assert line.startswith(f"--out {other} already exists; pass --resume") and sha(other) == run_bytes
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# 2. a non-finite loss: exit 1, where it happened, the partial run kept


def test_nonfinite_loss_before_the_first_save_keeps_a_partial_run(data_file, tmp_path, capsys):
    out = tmp_path / "run.pt"
    proc = hcdiag("train", data_file, "--out", out, *FAST, "--lr", "1e30")
    line = one_line(proc, 1)
    assert re.fullmatch(rf"non-finite loss in stage 1, round 0, epoch 1, step \d+; the last good state \(the stage-0 "
                        rf"clusterings and the initial model; --resume starts over from them\) is kept in "
                        rf"{re.escape(str(out))} as a partial run \(hcdiag check-barrier --partial "
                        rf"{re.escape(str(out))}\)\. Lower --lr or change --multiple/--loss\.", line), line
    run = load_run(out, partial=True)
    # the run file keeps the library's words: the trainer's parameters where the command line names its flags
    assert not run.complete and run.status.stage == "stage1"
    assert run.status.error == (line.replace("--resume starts", "resume=True starts")
                                .replace("(hcdiag check-barrier --partial", "(load_run(partial=True) reads")
                                .replace("Lower --lr or change --multiple/--loss.", "Lower lr or change multiple/loss."))
    assert "--" not in run.status.error
    assert "init" in run.snapshot_names and run.data["clusterings"]["centroids"].shape[:2] == (4, 3)
    assert temporaries(tmp_path) == []
    code = main(["check-barrier", "--partial", str(out), "--format", "json"])
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err and "error" not in err, (code, err)
    # --resume starts over from the kept clusterings: the same stop, no row twice (in-process: one thread, as there)
    assert cli_line(capsys, 1, "train", data_file, "--out", out, *FAST, "--lr", "1e30", "--resume") == line
    again = load_run(out, partial=True)
    assert again.history.step.tolist() == run.history.step.tolist()
    assert torch.equal(again.data["clusterings"]["centroids"], run.data["clusterings"]["centroids"])


@pytest.mark.parametrize("flag,value", [("--kl-weight", "nan"), ("--free-bits", "nan"), ("--beta-end", "inf"),
                                        ("--collapsed-multiple", "nan")])
def test_nonfinite_settings_are_refused(data_file, tmp_path, capsys, flag, value):
    name = flag[2:].replace("-", "_")
    line = cli_line(capsys, 2, "train", data_file, "--out", tmp_path / "r.pt", *FAST, flag, value)
    assert re.search(rf"The '{name}' parameter must be (a finite number|a float > 0)\. Got {value}\.", line), line
    assert not (tmp_path / "r.pt").exists() and temporaries(tmp_path) == []


def test_nonfinite_loss_messages_without_a_file(tmp_path, seed, monkeypatch):
    from hcdiag.train import Trainer, make_config

    cfg = make_config(None, seed=seed, r0=4, k=3, enc_widths=(8,), dec_widths=(8,), latent_dim=2, lr=1e30,
                      em_backend="sklearn", references=(), eval_rows=100)
    with pytest.raises(NumericalError, match=r"^non-finite loss in stage 1, round 0, epoch 1, step \d+; nothing was "
                                             r"written \(no run file\)\. Lower lr or change multiple/loss\.$"):
        Trainer(cfg, make_data(seed), None).run()

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run.pt"
    with pytest.raises(NumericalError, match=r"step \d+; the partial run could not be written either \(.*run.pt: could "
                                             r"not write the run file \(No space left on device\); .*\)\. Lower lr"):
        Trainer(cfg, make_data(seed), out).run()
    assert not out.exists() and temporaries(tmp_path) == []


def test_history_has_no_row_twice_after_a_nonfinite_stop_and_resume(data_file, tmp_path, capsys, monkeypatch):
    """Issue 10 item 9: the rows recorded between the last save and a non-finite stop were recorded again
    on --resume. Stage 1 (4 clusterings x 2 steps) then stage 2's first epoch (4 steps) run; the loss is
    poisoned in stage 2's second epoch only, as a transient fault would be."""
    from hcdiag.train import objectives as train_mod

    args = ["train", str(data_file), *FAST, "--deterministic", "--references", "none"]
    assert main([*args, "--out", str(tmp_path / "full.pt")]) == 0
    real, calls = train_mod.gaussian_kl, {"n": 0}

    def poisoned(mu, lv):
        calls["n"] += 1
        return real(mu, lv) * (float("nan") if 8 + 4 < calls["n"] <= 8 + 8 else 1.0)

    monkeypatch.setattr(train_mod, "gaussian_kl", poisoned)
    capsys.readouterr()
    line = cli_line(capsys, 1, *args, "--out", tmp_path / "run.pt")
    assert line.startswith("non-finite loss in stage 2 (refinement), epoch 2, step 13; the last good state is kept in")
    monkeypatch.setattr(train_mod, "gaussian_kl", real)
    stopped = torch.load(tmp_path / "run.pt", weights_only=True)
    assert len(stopped["history"]["step"]) == stopped["resume"].pop("history_rows") + 1  # the row after the save
    torch.save(stopped, tmp_path / "older.pt")  # as written before history_rows existed: rows up to the saved step
    full = load_run(tmp_path / "full.pt").history.to_dict()
    for name in ("run.pt", "older.pt"):
        assert main([*args, "--out", str(tmp_path / name), "--resume"]) == 0
        resumed = load_run(tmp_path / name).history.to_dict()
        assert resumed["step"].tolist() == full["step"].tolist()  # one row per step, none twice
        assert sorted(resumed) == sorted(full)
        for key in full:
            torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# 3. --resume refuses other data and other settings


DIE_AFTER_FIRST_SAVE = """
import os
from hcdiag.train.writer import RunWriter
_real = RunWriter.save
def _dying(self, *a, **k):  # kill -9 right after the first save: no clean-up runs
    _real(self, *a, **k)
    os._exit(137)
RunWriter.save = _dying
"""


def test_resume_refuses_changed_data_and_continues_the_same_data_bitwise(data_file, tmp_path, capsys):
    out, full = tmp_path / "run.pt", tmp_path / "full.pt"
    args = [*FAST, "--deterministic", "--references", "none"]
    killed = hcdiag("train", data_file, "--out", out, *args, script=DIE_AFTER_FIRST_SAVE)
    assert killed.returncode == 137 and not load_run(out, partial=True).complete
    partial = sha(out)
    x = np.load(data_file)
    changed = {"negated": -x, "permuted": x[np.random.default_rng(1).permutation(len(x))]}
    for i, (what, y) in enumerate(changed.items()):
        np.save(tmp_path / f"{what}.npy", y)
        # the same path as the original data (the config's dataset.source agrees): only the fingerprint differs
        os.replace(data_file, tmp_path / "orig.npy")
        np.save(data_file, y)
        if i == 0:
            line = one_line(hcdiag("train", data_file, "--out", out, "--resume", *args), 2)
        else:
            line = cli_line(capsys, 2, "train", data_file, "--out", out, "--resume", *args)
        assert re.fullmatch(rf"--resume: {re.escape(str(out))} was trained on other data \(same shape 400 x 5, other "
                            r"values: \d+ of its 100 evaluation rows differ\); resume with the data it was trained on, "
                            r"or start a new run with another --out \(or --overwrite\)\.", line), (what, line)
        os.replace(tmp_path / "orig.npy", data_file)
        assert sha(out) == partial
    resumed = hcdiag("train", data_file, "--out", out, "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert main(["train", str(data_file), "--out", str(full), *args]) == 0  # uninterrupted (one thread, as there)
    a, b = load_run(full), load_run(out)
    assert b.complete and temporaries(tmp_path) == []
    assert a.data["config"]["fingerprint"] == b.data["config"]["fingerprint"]
    for name in a.snapshot_names:
        sa, sb = a.snapshot(name), b.snapshot(name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert torch.equal(a.history.get("losses"), b.history.get("losses"))


def _partial_run(tmp_path, data_file, monkeypatch, capsys) -> Path:
    """``hcdiag train`` of ``data_file`` interrupted right after its first save (in-process)."""
    from hcdiag.train.writer import RunWriter

    out, real = tmp_path / "run.pt", RunWriter.save

    def dying(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "save", dying)
    assert main(["train", str(data_file), "--out", str(out), *FAST, "--references", "none"]) == 130
    assert capsys.readouterr().err == "hcdiag train: interrupted\n"
    monkeypatch.setattr(RunWriter, "save", real)
    assert not load_run(out, partial=True).complete and temporaries(tmp_path) == []
    return out


def test_resume_names_what_changed_in_the_data(data_file, tmp_path, capsys, monkeypatch):
    out = _partial_run(tmp_path, data_file, monkeypatch, capsys)
    before, x = sha(out), np.load(data_file)
    rows = load_run(out, partial=True).data["eval"]["rows"].numpy()
    y = x.copy()
    y[int(np.setdiff1d(np.arange(len(x)), rows)[0])] += 1.0  # a row the evaluation subset does not hold
    for changed, what in [(y, r"same shape 400 x 5 and evaluation rows, other values elsewhere"),
                          (x[:300], r"it had 400 rows x 5 columns, this data 300 x 5")]:
        np.save(data_file, changed)
        line = cli_line(capsys, 2, "train", data_file, "--out", out, "--resume", *FAST, "--references", "none")
        assert re.fullmatch(rf"--resume: {re.escape(str(out))} was trained on other data \({what}\); resume with the "
                            r"data it was trained on, or start a new run with another --out \(or --overwrite\)\.", line)
        assert sha(out) == before


def test_resume_refuses_a_setting_that_differs_below_the_config_rounding(data_file, tmp_path, capsys, monkeypatch):
    out = _partial_run(tmp_path, data_file, monkeypatch, capsys)
    before = sha(out)
    lr = repr(3e-3 * (1 + 1e-14))  # the smoke preset's lr, changed in its 15th digit
    line = cli_line(capsys, 2, "train", data_file, "--out", out, "--resume", *FAST, "--references", "none", "--lr", lr)
    assert line == (f"--resume: {out} was written with another config (keys differ: train.lr); use the same flags or "
                    "another --out.")
    assert sha(out) == before


def test_run_files_without_a_fingerprint_resume_with_a_warning_only_on_the_same_data(data_file, tmp_path, capsys,
                                                                                     monkeypatch):
    """The decision for run files written before fingerprints: resumed, with a one-line warning, when their
    stored evaluation rows and data mean are this data's; refused otherwise."""
    out = _partial_run(tmp_path, data_file, monkeypatch, capsys)
    old = torch.load(out, weights_only=True)
    del old["config"]["fingerprint"]
    torch.save(old, out)
    before, x = sha(out), np.load(data_file)
    np.save(data_file, -x)
    line = cli_line(capsys, 2, "train", data_file, "--out", out, "--resume", *FAST, "--references", "none")
    assert line.startswith(f"--resume: {out} was trained on other data (same shape 400 x 5, other values: 100 of its "
                           "100 evaluation rows differ)")
    assert sha(out) == before
    np.save(data_file, x)
    # other evaluation rows (another seed): nothing to compare, the config check names the setting
    line = cli_line(capsys, 2, "train", data_file, "--out", out, "--resume", *FAST, "--references", "none", "--seed", 5)
    assert re.fullmatch(r"--resume: .* was written with another config \(keys differ: seed, train\.seed\); use the "
                        r"same flags or another --out\.", line), line
    assert main(["train", str(data_file), "--out", str(out), "--resume", *FAST, "--references", "none"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"hcdiag train: warning: --resume: {out} has no data fingerprint (written by an earlier hcdiag); its 100 "
        "evaluation rows and data mean match this data, so it is resumed."]
    run = load_run(out)
    assert run.complete and set(run.data["config"]["fingerprint"]) == {"data", "settings"}
    # the Python API warns the same (a HcdiagWarning)
    from hcdiag.data import load
    from hcdiag.train import Trainer, make_config

    torch.save(old, out)
    cfg = make_config("smoke", r0=4, k=3, epochs_per_round=1, steps_per_clustering=2, refine_cap=2, stage3_epochs=1,
                      epochs=1, eval_rows=100, enc_widths=(8,), dec_widths=(8,), latent_dim=2, em_backend="sklearn",
                      references=())
    with pytest.warns(HcdiagWarning, match=rf"^resume: {re.escape(str(out))} has no data fingerprint"):
        assert Trainer(cfg, load(str(data_file)), out).run(resume=True)["status"]["complete"]


# ---------------------------------------------------------------------------------------------------
# 4. two trainers on one --out


def test_a_second_trainer_of_the_same_out_is_refused(data_file, tmp_path):
    from hcdiag.atomic import OutputLock

    out = tmp_path / "run.pt"
    lock = tmp_path / ".run.pt.lock"
    first = subprocess.Popen([sys.executable, "-m", "hcdiag", "train", str(data_file), "--out", str(out), *FAST,
                              "--stage3-epochs", "1000000"], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        hang = time.monotonic() + 600  # a guard against waiting forever for a lock that never comes, not a timing
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < hang, "the first trainer took no lock"
            time.sleep(0.05)
        assert lock.read_text() == f"hcdiag train pid {first.pid}\n"
        line = one_line(hcdiag("train", data_file, "--out", out, "--overwrite", *FAST), 2)
        assert line == (f"--out {out} is being written by another hcdiag train (pid {first.pid}); wait for it to "
                        "finish or choose another --out.")
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # a dead holder's lock blocks nobody, and is removed by the next holder
    with OutputLock(out) as held:
        assert lock.read_text() == f"hcdiag train pid {os.getpid()}\n" and held.path == lock
    assert not lock.exists()


def test_a_lock_file_that_cannot_be_made_is_one_line(data_file, tmp_path, capsys):
    (tmp_path / ".run.pt.lock").mkdir()
    line = cli_line(capsys, 2, "train", data_file, "--out", tmp_path / "run.pt", *FAST)
    assert re.fullmatch(rf"--out {re.escape(str(tmp_path / 'run.pt'))}: cannot create its lock file "
                        rf"{re.escape(str(tmp_path / '.run.pt.lock'))} \(Is a directory\); choose a writable folder\.",
                        line), line


# ---------------------------------------------------------------------------------------------------
# 5. a full disk, and kill -9 in the middle of a save


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (where this test may mount one), else skip."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_a_full_disk_on_a_tmpfs(data_file, tiny_disk, seed):
    out = tiny_disk / "run.pt"
    save_run(example_run(seed=seed % 1000), out)  # the old run: must survive
    _fill(tiny_disk, 16 * 1024)
    before = listing(tiny_disk)
    line = one_line(hcdiag("train", data_file, "--out", out, "--overwrite", *FAST), 2)
    assert re.fullmatch(rf"{re.escape(str(out))}: could not write the run file \(No space left on device\); the "
                        r"previous file \(if any\) is untouched: free space or choose another folder\. Training stopped "
                        r"before stage 'stage2'; once there is room, run the same command again \(nothing of this run "
                        r"was saved yet\)\.", line), line
    assert listing(tiny_disk) == before  # the old run intact, no temporary, no lock
    report = tiny_disk / "report"
    proc = hcdiag("check-barrier", out, "--only", "N1", "--report", report)
    line = one_line(proc, 2, "hcdiag check-barrier: error: ")
    assert line == (f"{report}: could not write the report (No space left on device); the previous report files (if "
                    "any) are untouched: free space or choose another folder.")
    assert listing(tiny_disk) == before and list(report.iterdir()) == []
    load_run(out)


def _dev_full(folder, name):
    """hcdiag.atomic.temporary whose writes fail as on a full disk: the temporary exists, /dev/full takes
    the bytes, so torch.save itself fails and raises its own RuntimeError."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return os.open("/dev/full", os.O_WRONLY), Path(tmp)


@pytest.mark.parametrize("fail", ["oserror", "torch-runtimeerror"])
@pytest.mark.parametrize("at", [1, 2, 4])  # the first save, a later one, the final save (saves: 3 stages + final)
def test_a_failing_writer_is_one_line_and_keeps_the_old_file(data_file, tmp_path, capsys, monkeypatch, fail, at):
    from hcdiag import atomic

    if fail == "torch-runtimeerror" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "run.pt"
    real_save, real_temp, calls = torch.save, atomic.temporary, {"n": 0}

    def writer(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    def temporary(folder, name):
        calls["n"] += 1
        return _dev_full(folder, name) if calls["n"] == at else real_temp(folder, name)

    if fail == "oserror":
        monkeypatch.setattr(torch, "save", writer)
    else:
        monkeypatch.setattr(atomic, "temporary", temporary)
    args = ["train", data_file, "--out", out, *FAST, "--references", "none"]
    if at == 1:  # an old file of the user's, replaced only with --overwrite: it must survive
        out.write_bytes(b"the previous file")
        args.append("--overwrite")
    line = cli_line(capsys, 2, *args)
    head = rf"^{re.escape(str(out))}: could not write the run file \(No space left on device\); the previous file"
    tail = {1: r"Training stopped before stage 'stage2'; once there is room, run the same command again \(nothing of "
               r"this run was saved yet\)\.$",
            2: r"Training stopped before stage 'stage3'; once there is room, run the same command with --resume to "
               r"continue from the last save\.$",
            4: r"Training finished but was not saved; once there is room, run the same command with --resume to "
               r"continue from the last save\.$"}[at]
    assert re.search(head, line) and re.search(tail, line), line
    assert temporaries(tmp_path) == []
    if at == 1:
        assert out.read_bytes() == b"the previous file"
    else:
        assert not load_run(out, partial=True).complete  # the last good save


def test_save_run_names_a_torch_write_failure_without_an_oserror(tmp_path, seed, monkeypatch):
    path = save_run(example_run(seed=seed % 1000), tmp_path / "run.pt")
    before = sha(path)

    def torch_fails(obj, f, *a, **k):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_fails)
    with pytest.raises(InputError, match=r"run.pt: could not write the run file \(torch.save failed: \[enforce fail "
                                         r"at inline_container.cc:672\] . PytorchStreamWriter failed writing file "
                                         r"data/0: file write failed\); the previous file \(if any\) is untouched") as e:
        save_run(example_run(seed=seed % 1000 + 1), path)
    assert "\n" not in str(e.value) and sha(path) == before and temporaries(tmp_path) == []


def test_report_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from hcdiag import atomic, report

    assert report.write_files(tmp_path, {"report.md": b"old md", "fig.png": b"old png"}) == ["fig.png", "report.md"]
    before = listing(tmp_path)
    real, calls = atomic.temporary, {"n": 0}

    def second_fails(folder, name):
        calls["n"] += 1
        return _dev_full(folder, name) if calls["n"] == 2 else real(folder, name)

    monkeypatch.setattr(atomic, "temporary", second_fails)
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}: could not write the report \(No space left "
                                         r"on device\); the previous report files \(if any\) are untouched: free space "
                                         r"or choose another folder\.$"):
        report.write_files(tmp_path, {"report.md": b"new md", "fig.png": b"new png"})
    assert listing(tmp_path) == before  # neither file replaced: the first one's temporary was not renamed


KILLED_IN_SAVE = """
import sys, time, torch
from hcdiag.runfile import example_run, save_run
def _stuck(obj, f, *a, **k):  # writes part of the file, then hangs until killed
    f.write(b"PK\\x03\\x04 half a run file")
    f.flush()
    open(sys.argv[2], "w").close()
    time.sleep(600)
torch.save = _stuck
save_run(example_run(), sys.argv[1])
"""


def test_temporaries_of_a_writer_killed_mid_save_are_removed_by_the_next_write(tmp_path, seed):
    out, ready = tmp_path / "run.pt", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_IN_SAVE, str(out), str(ready)], env=ENV)
    try:
        hang = time.monotonic() + 600  # a guard against waiting forever, not a timing
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < hang, "the writer never reached torch.save"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    stale = [p.name for p in tmp_path.glob(".run.pt.*.tmp")]
    assert len(stale) == 1 and not out.exists()
    # look-alikes that are not hcdiag's temporaries of run.pt, and one a live writer holds: all are kept
    keep = [".run.pt.tmp", "run.pt.abcdefgh.tmp", ".other.pt.abcdefgh.tmp", ".run.pt.abc.tmp", ".run.pt.abcdefgh.tmp.x",
            ".run.pt.ABCDEFGH.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not ours")
    live = tmp_path / ".run.pt.zzzzzzzz.tmp"
    live.write_bytes(b"being written")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        save_run(example_run(seed=seed % 1000), out)
    load_run(out)
    left = {p.name for p in tmp_path.iterdir()}
    assert stale[0] not in left and live.name in left and set(keep) <= left
    assert all((tmp_path / n).read_bytes() == b"not ours" for n in keep)


def test_report_removes_only_its_own_stale_temporaries(tmp_path):
    from hcdiag import report

    ours = [".report.md.k3j9_x0a.tmp", ".fig_memory.png.abcdefgh.tmp", ".results.json.tmp"]  # the last: old naming
    kept = [".notes.txt.abcdefgh.tmp", ".other.png.tmp", "report.md.abcdefgh.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_bytes(b"x")
    report.write_files(tmp_path, {"report.md": b"md", "results.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["report.md", "results.json"])
