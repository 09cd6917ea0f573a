"""Property: ``hcdiag check-barrier`` on any corruption of a valid run file exits 0, 1 or 2, never with a
traceback (an exit-2 refusal is one line on stderr) and never hangs (issue 10).

Corruptions (hypothesis): random key deletions and random shape changes on the run dict before it is saved,
then truncation at a random offset, random bit flips in the file, or random bit flips inside one zip member
with its checksum made right again (so they reach torch.load and the validator instead of the CRC check).
Most examples run ``hcdiag.cli.main`` in this process (torch's import is paid once); a few run the real
command in a subprocess with a timeout. Reproducible: hypothesis is seeded from the ``seed`` fixture
(``HCDIAG_TEST_SEED`` replays a run).
"""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from hcdiag.cli import main
from hcdiag.runfile import example_run, save_run

EXAMPLE_TIMEOUT_S = 30  # one check of a 20-row run takes about 0.2 s; a corruption that hangs it fails here
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the code under test can swallow it."""


def paths(obj, prefix=()):
    """Every ``(path, value)`` below the run dict: dict keys and list positions, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        yield prefix + (key,), value
        yield from paths(value, prefix + (key,))


def parent_of(run, path):
    node = run
    for key in path[:-1]:
        node = node[key]
    return node


def reshaped(t: torch.Tensor, how: int, dim: int) -> torch.Tensor:
    """``t`` with another shape: one row more or less along ``dim``, an extra axis, flattened, transposed,
    emptied, or a scalar."""
    if t.ndim == 0:
        return t.reshape(1, 1)
    dim %= t.ndim
    if how == 0 and t.shape[dim] > 0:
        return t.narrow(dim, 0, t.shape[dim] - 1).clone()
    if how == 1:
        return torch.cat([t, t.narrow(dim, 0, min(1, t.shape[dim]))], dim)
    if how == 2:
        return t.unsqueeze(0).clone()
    if how == 3:
        return t.reshape(-1).clone()
    if how == 4 and t.ndim >= 2:
        return t.transpose(0, -1).contiguous()
    if how == 5:
        return t.narrow(dim, 0, 0).clone()
    return t.reshape(-1)[:1].reshape(()).clone() if t.numel() else t.reshape(1, 1, 0)


# one edit of the dict: ("delete", i) removes the i-th key or list item (mod their count); ("reshape", i, how, dim)
# changes the shape of the i-th tensor
edits = st.one_of(st.tuples(st.just("delete"), st.integers(0, 10**6)),
                  st.tuples(st.just("reshape"), st.integers(0, 10**6), st.integers(0, 6), st.integers(0, 3)))
# then at most one change of the bytes
byte_faults = st.one_of(
    st.none(),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1,
                                        max_size=8)),
    st.tuples(st.just("member"), st.integers(0, 10**6),
              st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8)))
corruptions = st.tuples(st.lists(edits, max_size=3), byte_faults).filter(lambda c: c[0] or c[1] is not None)


def apply_edits(run: dict, edit_list) -> dict:
    run = copy.deepcopy(run)
    for edit in edit_list:
        if edit[0] == "delete":
            found = [p for p, _ in paths(run)]
            if found:
                path = found[edit[1] % len(found)]
                del parent_of(run, path)[path[-1]]
        else:
            found = [p for p, v in paths(run) if isinstance(v, torch.Tensor)]
            if found:
                path = found[edit[1] % len(found)]
                node = parent_of(run, path)
                node[path[-1]] = reshaped(node[path[-1]], edit[2], edit[3])
    return run


def flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for where, bit in flips:
        if out:
            out[int(where * len(out))] ^= 1 << bit
    return bytes(out)


def corrupt_file(run: dict, corruption, path: Path) -> Path:
    edit_list, fault = corruption
    buf = io.BytesIO()
    torch.save(apply_edits(run, edit_list), buf)  # not save_run: it would refuse (or repair) the edits
    data = buf.getvalue()
    if fault is not None and fault[0] == "truncate":
        data = data[:int(fault[1] * len(data))]
    elif fault is not None and fault[0] == "flip":
        data = flip(data, fault[1])
    elif fault is not None:  # inside one member, its CRC-32 made right again: only torch and the validator can see it
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
            infos = zin.infolist()
            chosen = infos[fault[1] % len(infos)].filename
            for info in infos:
                member = zin.read(info.filename)
                zout.writestr(info.filename, flip(member, fault[2]) if info.filename == chosen else member)
        data = out.getvalue()
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def valid():
    """A valid run with parameters, outputs, history and references: every part of the schema is there to corrupt."""
    return example_run(R0=4, K=3, N=5, m=20, n=2, outputs=True, references=True)


def check_in_process(capsys, path: Path) -> None:
    def alarm(signum, frame):
        raise Hung(f"check-barrier ran longer than {EXAMPLE_TIMEOUT_S} s")

    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_TIMEOUT_S)
    try:
        code = main(["check-barrier", str(path)])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    assert code in (0, 1, 2), code
    assert "Traceback" not in out.err
    if code == 2:
        assert out.err.count("\n") == 1 and out.err.startswith("hcdiag check-barrier: error: "), out.err
    else:
        assert "overall:" in out.out


def run_property(seed, valid, tmp_path, capsys, max_examples):
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @hypothesis_seed(seed)
    @given(corruptions)
    def corrupted_runs_give_0_1_or_2(corruption):
        check_in_process(capsys, corrupt_file(valid, corruption, tmp_path / "run.pt"))

    corrupted_runs_give_0_1_or_2()


def test_corrupted_run_files_exit_0_1_or_2_in_process(seed, valid, tmp_path, capsys):
    run_property(seed, valid, tmp_path, capsys, max_examples=200)


def member_spans(data: bytes) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of the stored bytes of every member of a zip file."""
    spans = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            at = info.header_offset
            start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
            spans.append((info.filename, start, start + info.compress_size))
    return [sp for sp in spans if sp[2] > sp[1]]


def test_truncated_files_and_flipped_bits_in_the_data_are_always_refused(seed, valid, tmp_path, capsys):
    """Stronger than 0, 1 or 2: a file cut anywhere, or with bits flipped in any member's bytes (a tensor's
    values, the pickle), is never used: exit 2 with one line. Flipped data used to be read as if it were right."""
    buf = io.BytesIO()
    torch.save(valid, buf)
    data = buf.getvalue()
    spans = member_spans(data)

    @settings(max_examples=60, deadline=None, database=None)
    @hypothesis_seed(seed)
    @given(st.one_of(st.tuples(st.just("truncate"), st.integers(0, len(data) - 1)),
                     st.tuples(st.just("flip"), st.integers(0, len(spans) - 1),
                               st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1,
                                        max_size=4))))
    def refused(fault):
        if fault[0] == "truncate":
            corrupted = data[:fault[1]]
        else:
            name, start, end = spans[fault[1]]
            corrupted = data[:start] + flip(data[start:end], fault[2]) + data[end:]
            assume(corrupted != data)  # the same bit flipped twice
        path = tmp_path / "run.pt"
        path.write_bytes(corrupted)
        capsys.readouterr()
        assert main(["check-barrier", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        if fault[0] == "flip":
            assert f"is corrupt: its member {name} does not match its CRC-32 checksum" in err, err

    refused()


@pytest.mark.slow
def test_corrupted_run_files_exit_0_1_or_2_many(seed, valid, tmp_path, capsys):
    run_property(seed, valid, tmp_path, capsys, max_examples=2000)


def test_corrupted_run_files_through_the_real_command(seed, valid, tmp_path):
    """Five corruptions through ``python -m hcdiag check-barrier``, each with a timeout; not shrunk (each
    try costs a torch import: the in-process test above shrinks the same corruptions)."""
    @settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @hypothesis_seed(seed)
    @given(corruptions)
    def through_the_command(corruption):
        path = corrupt_file(valid, corruption, tmp_path / "run.pt")
        proc = subprocess.run([sys.executable, "-m", "hcdiag", "check-barrier", str(path)], capture_output=True,
                              text=True, env=ENV, timeout=120)
        assert proc.returncode in (0, 1, 2) and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
        if proc.returncode == 2:
            assert len(proc.stderr.splitlines()) == 1, proc.stderr

    through_the_command()
