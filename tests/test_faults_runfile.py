"""Hostile run files against the real ``hcdiag check-barrier`` (issue 10, item 6: "nothing crashes").

Each file is generated here and checked by the command a user runs (``python -m hcdiag check-barrier`` in a
subprocess) under an address-space cap of 2 GiB and a timeout: a size claim the validator does not bound
before allocating fails the test (MemoryError, a traceback, exit 1) instead of taking the machine, and a
read that blocks fails it by the timeout. Every refusal is exit status 2 and one line on stderr that names
what is wrong (with the run-file key) and what to do.
"""

from __future__ import annotations

import copy
import io
import os
import pickletools
import re
import resource
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hcdiag import runfile
from hcdiag.cli import main
from hcdiag.models import MODEL_FAMILIES, ModelConfig
from hcdiag.runfile import example_run, save_run

CAP = 2 * 1024**3  # bytes of address space the command may map: torch needs about 1.5 GiB of it to start
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ERR = "hcdiag check-barrier: error: "


def _cap_memory():  # runs in the child before it execs
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def check_barrier(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m hcdiag check-barrier ARGV`` with memory capped at :data:`CAP`."""
    return subprocess.run([sys.executable, "-m", "hcdiag", "check-barrier", *map(str, argv)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, preexec_fn=_cap_memory)


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a refused command (exit 2, no traceback), without its prefix."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(ERR), lines[0]
    return lines[0][len(ERR):]


def refused_here(capsys, *argv) -> str:
    """The same refusal through ``hcdiag.cli.main`` in this process: for the variants whose failure cannot take
    the machine or hang (the subprocess costs about 3 s of torch import each)."""
    code = main(["check-barrier", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert err.startswith(ERR), err
    return err[len(ERR):].rstrip("\n")


def valid_run(**kw) -> dict:
    return example_run(R0=4, K=3, N=5, m=20, n=2, **kw)


def write(run: dict, path: Path) -> Path:
    """``torch.save`` without validation (``save_run`` would refuse, or compact, the hostile parts)."""
    torch.save(run, path)
    return path


def rewrite_member(path: Path, out: Path, edit, *, compress=lambda name: zipfile.ZIP_STORED) -> Path:
    """A copy of the torch zip file ``path`` with each member's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)), compress_type=compress(info.filename))
    return out


def state_claiming(model: dict) -> dict:
    """A state_dict with the parameter shapes of ``model`` whose tensors are zero-stride views of one float:
    a few bytes in the file, whatever the shapes claim."""
    cfg = ModelConfig.from_dict(model)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MODEL_FAMILIES[cfg.family](cfg).state_dict().items()}
    return {k: torch.zeros(1).expand(shape) for k, shape in shapes.items()}


# ---- what the file holds --------------------------------------------------------------------------------


def test_an_int_key_in_a_state_dict(tmp_path):
    run = valid_run()
    run["snapshots"]["final"][3] = torch.zeros(2)
    msg = refusal(check_barrier(write(run, tmp_path / "run.pt")))
    assert re.search(r"run.pt: snapshots.final has unexpected key 3 for config.model \(family 'linear'\); store "
                     r"exactly the state_dict of the model config.model describes", msg), msg


def test_an_int_key_in_config_model_is_read_like_any_other_key(tmp_path, capsys):
    run = valid_run()
    run["config"]["model"][3] = 1  # an extra key hcdiag does not read: it used to crash sorting the keys
    assert main(["check-barrier", str(write(run, tmp_path / "run.pt")), "--only", "N1"]) in (0, 1)
    out = capsys.readouterr()
    assert "overall:" in out.out and out.err == ""


def nested_lists_pickle(depth: int) -> bytes:
    """Pickle opcodes pushing ``depth`` empty lists and appending each into the one below: [[[...]]]."""
    return b"]" * depth + b"a" * (depth - 1)


def test_lists_nested_100000_deep(tmp_path):
    run = valid_run()
    run["config"]["deep"] = "PLACEHOLDER"
    path = write(run, tmp_path / "base.pt")
    marker = b"X\x0b\x00\x00\x00PLACEHOLDER"  # BINUNICODE of the placeholder string
    deep = rewrite_member(path, tmp_path / "run.pt", lambda name, data: data.replace(marker, nested_lists_pickle(100_000))
                          if name.endswith("data.pkl") else data)
    msg = refusal(check_barrier(deep))
    assert re.search(r"run.pt: config.deep\[0\]\[0\]\[0\].*\.\.\. nests deeper than 64 levels of dicts, lists and tuples; "
                     r"a run file nests a few .*: this is not a run file hcdiag reads; write the run with "
                     r"hcdiag.runfile.save_run", msg), msg


def deep_tuple_key_pickle(base: bytes, depth: int) -> bytes:
    """``base`` (a pickle whose top-level object is a dict) with one more item whose key is a tuple nested
    ``depth`` deep: hashing it recurses in C without a depth check."""
    assert base.endswith(b"u.")  # SETITEMS, STOP
    return base[:-1] + b"K\x01" + b"\x85" * depth + b"K\x02s."  # BININT1 1, TUPLE1 * depth, BININT1 2, SETITEM


def test_a_tuple_key_nested_a_million_deep_is_refused_before_it_crashes_python(tmp_path):
    path = save_run(valid_run(), tmp_path / "base.pt")
    deep = rewrite_member(path, tmp_path / "run.pt", lambda name, data: deep_tuple_key_pickle(data, 1_000_000)
                          if name.endswith("data.pkl") else data)
    msg = refusal(check_barrier(deep))  # unpickled, this ended in a segmentation fault (exit -11)
    assert re.search(r"run.pt: nests tuples deeper than 64 levels; a run file nests dicts, lists and tuples only a few "
                     r"levels deep .*write the run with hcdiag.runfile.save_run", msg), msg


def test_a_tuple_key_nested_deep_in_the_legacy_format(tmp_path):
    """torch's pre-zip format (``_use_new_zipfile_serialization=False``) is a sequence of pickles: the same bound."""
    buf = io.BytesIO()
    torch.save(valid_run(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    stream = io.BytesIO(raw)
    for _ in range(3):  # magic number, protocol version, system info
        list(pickletools.genops(stream))
    start = stream.tell()
    list(pickletools.genops(stream))  # the run itself
    end = stream.tell()
    path = tmp_path / "run.pt"
    path.write_bytes(raw[:start] + deep_tuple_key_pickle(raw[start:end], 1_000_000) + raw[end:])
    msg = refusal(check_barrier(path))
    assert re.search(r"run.pt: nests tuples deeper than 64 levels", msg), msg


def test_a_recursion_error_in_torch_load_is_one_line(tmp_path, monkeypatch, capsys):
    path = save_run(valid_run(), tmp_path / "run.pt")

    def recursing(*a, **kw):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(runfile.torch, "load", recursing)
    assert main(["check-barrier", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"run.pt: nests too deeply to be read \(RecursionError in torch.load\); a run file nests dicts and "
                     r"lists only a few levels deep: write the run with hcdiag.runfile.save_run", err), err


# ---- size claims: refused before anything is allocated ---------------------------------------------------


@pytest.mark.parametrize("make, path, claims, holds, here", [
    (lambda: torch.empty(1).expand(10**12), ("snapshots", "final", "enc_mu.bias"), 10**12, 1, False),
    (lambda: torch.zeros(2 * 10**6).as_strided((10**6, 10**6), (1, 1)), ("eval", "x"), 10**12, 2 * 10**6, True),
], ids=["expand", "as_strided"])
def test_a_zero_stride_tensor_claiming_1e12_elements(tmp_path, capsys, make, path, claims, holds, here):
    run = valid_run()
    node = run
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = make()
    file = write(run, tmp_path / "run.pt")
    msg = refused_here(capsys, file) if here else refusal(check_barrier(file))
    key = re.escape(".".join(path))
    assert re.search(rf"run.pt: {key} claims {claims} elements but its storage holds {holds}; a run file's "
                     r"tensors hold every value they claim .*: store a compact copy \(t.contiguous\(\).clone\(\)", msg), msg


@pytest.mark.parametrize("width", [10**12, 10**9])
def test_layer_widths_near_1e12_and_1e9_with_states_that_claim_them(tmp_path, width):
    run = valid_run(method="vanilla")
    model = {"family": "mlp", "input_dim": 5, "latent_dim": 2, "enc_widths": [width], "dec_widths": [width],
             "activation": "relu"}
    run["config"]["model"] = model
    run["snapshots"] = {name: state_claiming(model) for name in run["snapshots"]}
    msg = refusal(check_barrier(write(run, tmp_path / "run.pt")))
    assert re.search(rf"run.pt: snapshots.init.encoder.0.weight claims {5 * width} elements but its storage holds 1; ",
                     msg), msg


def wide_run(width: int, m: int = 20, *, collapsed: bool = False) -> dict:
    """A vanilla run (N = 1, n = 1) with an MLP of hidden width ``width`` and REAL parameters (zeros), stored
    once and shared by every snapshot (and the collapsed reference): a file of about 7 * width floats."""
    run = example_run(R0=4, K=3, N=1, m=m, n=1, method="vanilla")
    model = {"family": "mlp", "input_dim": 1, "latent_dim": 1, "enc_widths": [width], "dec_widths": [width],
             "activation": "relu"}
    state = {k: torch.zeros(v.shape) for k, v in state_claiming(model).items()}
    run["config"]["model"] = model
    run["snapshots"] = {name: state for name in run["snapshots"]}
    if collapsed:
        run["references"] = {"collapsed": {"config": {"s2": 1.0, "multiple": 10.0, "method": "vanilla"}, "state": state}}
    return run


def test_an_evaluation_that_needs_more_than_max_memory(tmp_path):
    """250,000 units, 4096 eval rows at a time: 15 GiB of activations from a 7 MiB file."""
    path = write(wide_run(250_000, m=4096), tmp_path / "run.pt")
    msg = refusal(check_barrier(path, "--max-memory", "1G"))
    assert re.search(r"run.pt: checking this run needs about 15.\d GiB, more than the memory bound \(--max-memory\) of "
                     r"1 GiB; the largest part is config.model: its model's activations on 4096 eval rows at a time "
                     r"\(1000004 numbers per row\): 15.\d GiB. Raise --max-memory if this machine has the memory "
                     r"\(e.g. --max-memory 16G\); if those sizes are wrong, fix the producer", msg), msg


def test_a_claim_beyond_any_machine_is_refused_by_the_default_bound(tmp_path):
    """400,000 units and a collapsed reference: I3's weight matching would form a 400,000 x 400,000 similarity
    matrix (2.3 TiB) from an 11 MiB file; the default bound (half of this machine's memory) refuses it."""
    path = write(wide_run(400_000, collapsed=True), tmp_path / "run.pt")
    msg = refusal(check_barrier(path))
    assert re.search(r"run.pt: checking this run needs about 2.3\d TiB, more than the memory bound \(--max-memory\) of "
                     r".*; the largest part is config.model: I3's weight matching \(a 400000 x 400000 similarity matrix, 2 "
                     r"aligned snapshots\): 2.3\d TiB", msg), msg


@pytest.mark.parametrize("make, kind", [
    (lambda: torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (10**12,), check_invariants=False), "sparse"),
    (lambda: torch.empty(10**12, device="meta"), "meta"),
], ids=["sparse", "meta"])
def test_tensors_without_their_values(tmp_path, capsys, make, kind):
    run = valid_run()
    run["history"]["kl"] = make()
    msg = refused_here(capsys, write(run, tmp_path / "run.pt"))
    assert re.search(rf"run.pt: history.kl is a {kind} tensor of shape \(1000000000000,\); a run file holds dense CPU "
                     r"tensors with their values: store it as one", msg), msg


# ---- the file itself ----------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "run.pt"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would wait forever
    msg = refusal(check_barrier(fifo, timeout=60))
    assert re.search(r"run.pt: is a named pipe \(FIFO\), not a regular file; hcdiag reads a run file only from a "
                     r"regular file .*: save it to a file first and pass that file.", msg), msg


def test_a_device_is_refused_without_reading_it():
    msg = refusal(check_barrier("/dev/zero", timeout=60))  # endless zeros
    assert re.search(r"^/dev/zero: is a character device, not a regular file", msg), msg


def test_a_socket_is_refused(tmp_path, capsys):
    sock_path = tmp_path / "run.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        msg = refused_here(capsys, sock_path)
    assert re.search(r"run.sock: is a socket, not a regular file", msg), msg


def data_offset(path: Path, name: str) -> int:
    """Where the bytes of the stored zip member ``name`` start in ``path``."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = path.read_bytes()
    at = info.header_offset
    name_len, extra_len = int.from_bytes(raw[at + 26:at + 28], "little"), int.from_bytes(raw[at + 28:at + 30], "little")
    return at + 30 + name_len + extra_len


def test_a_bit_flipped_in_a_tensor_is_refused(tmp_path, seed):
    path = save_run(valid_run(), tmp_path / "run.pt")
    with zipfile.ZipFile(path) as zf:
        member = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 64)
    raw = bytearray(path.read_bytes())
    at = data_offset(path, member.filename) + seed % member.file_size
    raw[at] ^= 1 << (seed % 8)
    path.write_bytes(bytes(raw))
    msg = refusal(check_barrier(path))
    assert re.search(rf"run.pt: is corrupt: its member {re.escape(member.filename)} does not match its CRC-32 checksum "
                     r"\(bits changed on disk or in a copy\); copy the file again from a good source or re-run the "
                     r"training.", msg), msg


def test_a_compressed_member_is_refused_before_it_is_expanded(tmp_path, capsys):
    path = save_run(valid_run(), tmp_path / "base.pt")
    bomb = rewrite_member(path, tmp_path / "run.pt", lambda name, data: data,
                          compress=lambda name: zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED)
    msg = refused_here(capsys, bomb)
    assert re.search(r"run.pt: its member .*/data/\d+ is compressed \(zip method 8\), which torch.save never does and "
                     r"which may expand to any size; write the run with torch.save / hcdiag.runfile.save_run", msg), msg


# ---- --max-memory -------------------------------------------------------------------------------------


def bad_size(value: str) -> str:
    return (f"--max-memory must be a memory size > 0 such as 4G or 512M (K, M, G, T: powers of 1024; a plain "
            f"number is bytes); got {value!r}.")


def test_a_bad_max_memory_value(tmp_path):
    path = save_run(valid_run(), tmp_path / "run.pt")
    assert refusal(check_barrier(path, "--max-memory", "lots")) == bad_size("lots")


@pytest.mark.parametrize("value", ["0", "-5", "1e9", "4X", "", "0.1", "4GB!"])
def test_bad_max_memory_values_in_process(tmp_path, capsys, value):
    path = tmp_path / "never-read.pt"  # refused before the run file is looked at
    assert refused_here(capsys, path, f"--max-memory={value}") == bad_size(value)


@pytest.mark.parametrize("value, size", [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("64k", 65536),
                                         ("1048576", 2**20), ("2 TB", 2 * 2**40)])
def test_max_memory_sizes(value, size):
    from hcdiag.cli.check_barrier import parse_size

    assert parse_size(value) == size


def test_a_file_larger_than_max_memory(tmp_path, capsys):
    path = save_run(valid_run(), tmp_path / "run.pt")
    msg = refused_here(capsys, path, "--max-memory", "4K")
    assert re.search(r"run.pt: is \d+(\.\d+)? KiB, more than the memory bound \(--max-memory\) of 4 KiB, and loading it "
                     r"takes about its size in memory; raise --max-memory if this machine has the memory \(e.g. "
                     r"--max-memory 1M\), or check it on a larger machine.", msg), msg


def test_max_memory_values_that_suffice(tmp_path, capsys):
    path = save_run(valid_run(), tmp_path / "run.pt")
    assert main(["check-barrier", str(path), "--max-memory", "64M", "--only", "N1"]) in (0, 1)
    assert capsys.readouterr().err == ""


def test_a_valid_run_whose_evaluation_needs_more_than_max_memory(tmp_path, capsys):
    """64 clusterings of 8 centroids on 2000 eval rows: eq. 8's float64 distances take 16 MiB, the file 0.1 MiB."""
    path = save_run(example_run(R0=64, K=8, N=1, m=2000, n=1, method="vanilla", history=False), tmp_path / "run.pt")
    assert path.stat().st_size < 2**20
    msg = refused_here(capsys, path, "--max-memory", "8M")
    assert re.search(r"run.pt: checking this run needs about 1\d.\d MiB, more than the memory bound \(--max-memory\) "
                     r"of 8 MiB; the largest part is eq. 8's distances of 2000 eval rows to 64 x 8 centroids: 15.6 MiB. "
                     r"Raise --max-memory if this machine has the memory \(e.g. --max-memory 1\dM\)", msg), msg
    assert main(["check-barrier", str(path), "--max-memory", "32M", "--only", "N1"]) in (0, 1)


def test_a_million_listed_layers_are_refused_before_the_model_is_built(tmp_path, capsys):
    """Building the model of a config.model listing 10^6 widths (2 MB in the file) takes minutes and gigabytes,
    even on the meta device; its state_dicts cannot hold 2 tensors per layer, so it is refused first."""
    run = valid_run(method="vanilla")
    run["config"]["model"] = {"family": "mlp", "input_dim": 5, "latent_dim": 2, "enc_widths": [3] * 10**6,
                              "dec_widths": [3], "activation": "relu"}
    msg = refused_here(capsys, write(run, tmp_path / "run.pt"))
    assert re.search(r"run.pt: snapshots.init holds 5 tensors but config.model lists 1000001 hidden layers of 2 tensors "
                     r"each \(weight, bias\); config.model must describe the model that was trained", msg), msg
