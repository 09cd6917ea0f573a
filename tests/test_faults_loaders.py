"""Fault injection on the loaders and the arguments (issue 10, items 7 and 8), as a user meets them.

Every bad input gets exit status 2, one line on stderr that names the file or argument and says what to
do, no traceback and nothing written. A few cases of each class run the real command in a subprocess
(``python -m hcdiag``, ~2-3 s each for the torch import); the others call ``hcdiag.cli.main`` in-process,
the same code once the interpreter has started. The files are generated here, byte for byte.
"""

import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

import hcdiag.clusterings as clusterings
import hcdiag.data as data
import hcdiag.verify as verify_mod
from hcdiag.cli import main
from hcdiag.errors import InputError
from test_data import write_cifar_batch, write_idx

OVERFLOW = (r"values beyond \+-1e\+15 \(rows 3; largest \|x\| = 1e\+300\), which overflow float32 \(max 3\.4e\+38\); "
            r"rescale the data")
COMPLEX = (r"must be real-valued; got dtype complex(64|128)\. Keep the real part \(x\.real\) or store the real and "
           r"imaginary parts")


# --------------------------------------------------------------------------------------------
# running the commands

def snapshot(folder) -> dict:
    """Every file under ``folder`` with its size and modification time (what 'nothing written' compares)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def one_line(code, out, err, match) -> str:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert out == "", out
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("hcdiag "), lines[0]
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


def real(tmp_path, argv, match, *, code=None, timeout=120):
    """``python -m hcdiag ARGV`` in ``tmp_path`` (or ``python -c CODE``): refused in one line, nothing written."""
    before = snapshot(tmp_path)
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "hcdiag", *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "default"})  # warnings would show as extra lines
    line = one_line(proc.returncode, proc.stdout, proc.stderr, match)
    assert snapshot(tmp_path) == before, "a refused command wrote files"
    return line


def inproc(capsys, folder, argv, match):
    """``hcdiag.cli.main(ARGV)``: refused in one line (by the parser or the command), nothing written."""
    before = snapshot(folder)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # the argument parser refuses before any work
        code = exc.code
    captured = capsys.readouterr()
    line = one_line(code, captured.out, captured.err, match)
    assert snapshot(folder) == before, "a refused command wrote files"
    return line


@pytest.fixture
def no_work(monkeypatch):
    """Bad arguments are refused before any data is read or any EM run starts."""
    def forbidden(*a, **kw):
        raise AssertionError("work started before the arguments were validated")

    monkeypatch.setattr(data, "load", forbidden)
    monkeypatch.setattr(clusterings, "fit_clusterings", forbidden)


# --------------------------------------------------------------------------------------------
# files

def _matrix(seed, n=40, d=4):
    return np.random.default_rng(seed).normal(size=(n, d))


def _write(path, x):
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, x=x)
    elif suffix == ".pt":
        torch.save(torch.from_numpy(np.ascontiguousarray(x)), path)
    else:
        np.savetxt(path, x, delimiter=",", fmt="%.17g")
    return path


@pytest.fixture
def huge(tmp_path, seed):
    """The same matrix with one value of 1e300 in row 3, in every format."""
    x = _matrix(seed)
    x[3, 1] = 1e300
    return {s: _write(tmp_path / f"big{s}", x) for s in (".npy", ".npz", ".pt", ".csv")}


def test_1e300_in_a_real_subprocess_says_it_overflows_float32(tmp_path, huge):
    """Was a LinAlgError traceback (spectrum) and 'NaN, pass --drop-nonfinite' (train), which cannot help."""
    real(tmp_path, ["spectrum", "big.npy"], r"^hcdiag spectrum: error: The data \(big\.npy\) holds 1 row\(s\) with "
         + OVERFLOW + r" \(e\.g\. divide it by its largest \|x\|, or standardise each column\)\.$")


@pytest.mark.parametrize("command", ["spectrum", "phase", "diffusion", "clusterings"])
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".csv"])
def test_1e300_is_refused_by_every_command_and_format(tmp_path, capsys, huge, command, suffix):
    inproc(capsys, tmp_path, [command, str(huge[suffix]), "--device", "cpu"],
           rf"The data \(big{re.escape(suffix)}\) holds 1 row\(s\) with " + OVERFLOW)


def test_overflow_is_refused_even_with_drop_nonfinite(tmp_path, capsys, huge):
    inproc(capsys, tmp_path, ["spectrum", str(huge[".npy"]), "--drop-nonfinite"], OVERFLOW)


def test_squares_that_overflow_float32_are_refused(tmp_path, capsys, seed):
    """1e20 fits float32 (max 3.4e38) but its square does not: the bound is |x| <= 1e15 (sums of 1e8 squares)."""
    x = _matrix(seed)
    x[5] = 1e20
    x[9, 0] = -3e16
    np.save(tmp_path / "sq.npy", x.astype(np.float32))
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "sq.npy")],
           r"holds 2 row\(s\) with values beyond \+-1e\+15 \(rows 5, 9; largest \|x\| = 1e\+20\), whose sums of "
           r"squares \(covariances, losses\) overflow float32 \(max 3\.4e\+38\); rescale the data")
    # at the bound itself the data loads, and as float32
    x[5], x[9, 0] = 1e15, -1e15
    np.save(tmp_path / "edge.npy", x)
    ds = data.load(str(tmp_path / "edge.npy"))
    assert ds.x.shape == x.shape and np.isfinite(ds.x).all()


def test_int64_beyond_the_bound_is_refused(tmp_path, capsys, seed):
    x = np.random.default_rng(seed).integers(-5, 5, size=(30, 3))
    x[7, 2] = 2**62
    torch.save(torch.from_numpy(x), tmp_path / "ints.pt")
    inproc(capsys, tmp_path, ["phase", str(tmp_path / "ints.pt")],
           r"The data \(ints\.pt\) holds 1 row\(s\) with values beyond \+-1e\+15 \(rows 7; largest \|x\| = 4\.61e\+18\)")


def test_complex_pt_in_a_real_subprocess(tmp_path, seed):
    """Complex .pt and .npz data were cast to real in silence; complex .npy was refused: now all three are."""
    x = _matrix(seed)
    torch.save(torch.from_numpy(x + 1j * x), tmp_path / "c.pt")
    real(tmp_path, ["spectrum", "c.pt"], r"^hcdiag spectrum: error: The data \(c\.pt\) " + COMPLEX)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_data_is_refused_in_every_format(tmp_path, capsys, seed, suffix, dtype):
    x = _matrix(seed)
    path = _write(tmp_path / f"c{suffix}", (x + 1j * x).astype(dtype))
    inproc(capsys, tmp_path, ["clusterings", str(path), "--r0", "2", "--k", "2"], rf"The data \(c{suffix}\) " + COMPLEX)


def test_complex32_pt_is_refused_without_warnings(tmp_path, capsys, seed):
    with warnings.catch_warnings():  # torch: "ComplexHalf support is experimental"
        warnings.simplefilter("ignore")
        torch.save(torch.from_numpy(_matrix(seed)).to(torch.complex32), tmp_path / "c32.pt")
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "c32.pt")],
           r"The data \(c32\.pt\) must be real-valued; got dtype complex32\.")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_bfloat16_and_float8_pt_are_converted_exactly(tmp_path, capsys, seed, dtype):
    """numpy has no bfloat16 (it was a TypeError traceback): float32 holds every such value exactly."""
    t = torch.from_numpy(_matrix(seed)).to(dtype)
    torch.save(t, tmp_path / "b.pt")
    ds = data.load(str(tmp_path / "b.pt"))
    assert ds.x.dtype == np.float32 and ds.preprocessing["stored_dtype"] == str(dtype).replace("torch.", "")
    np.testing.assert_array_equal(ds.x, t.to(torch.float32).numpy())
    capsys.readouterr()
    assert main(["spectrum", str(tmp_path / "b.pt"), "--format", "json", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    x = t.to(torch.float64).numpy()
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[-1]
    assert abs(json.loads(out.out)["lambda_max"] - lam) <= 1e-5 * lam


@pytest.mark.parametrize("suffix,match", [
    (".npz", r"The \.npz file .*t\.npz is corrupt \(File is not a zip file\); re-create it with np\.savez\.$"),
    (".npy", r"The \.npy file .*t\.npy is truncated: its header claims more data than the file holds; re-create it"),
    (".pt", r"The \.pt file .*t\.pt is not a readable torch file \(.*\); save the data as a tensor"),
])
def test_truncated_files(tmp_path, capsys, seed, suffix, match):
    full = _write(tmp_path / f"full{suffix}", _matrix(seed)).read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(full[:len(full) // 2])
    inproc(capsys, tmp_path, ["diffusion", str(tmp_path / f"t{suffix}")], match)


def test_truncated_npz_in_a_real_subprocess(tmp_path, seed):
    full = _write(tmp_path / "full.npz", _matrix(seed)).read_bytes()
    (tmp_path / "t.npz").write_bytes(full[: 2 * len(full) // 3])
    real(tmp_path, ["phase", "t.npz"], r"^hcdiag phase: error: The \.npz file t\.npz is corrupt \(.*\); re-create it")


def _npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_and_npy_headers_claiming_more_than_they_hold(tmp_path, capsys):
    """Checked against the bytes present before numpy allocates the claimed shape (2^62 doubles here)."""
    with zipfile.ZipFile(tmp_path / "claim.npz", "w") as zf:
        zf.writestr("x.npy", _npy_header((2**31, 2**31)) + b"\0" * 64)
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "claim.npz")],
           r"claim\.npz is corrupt: its array 'x' claims shape \(2147483648, 2147483648\) \(36893488147419103232 "
           r"bytes\) but holds 64; re-create it with np\.savez\.$")
    (tmp_path / "claim.npy").write_bytes(_npy_header((2**40, 4)) + b"\0" * 64)
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "claim.npy")], r"claim\.npy is truncated")


def test_zero_stride_pt_claiming_terabytes_is_refused_before_copying(tmp_path, capsys):
    torch.save(torch.ones(1, 4).expand(10**12, 4), tmp_path / "z.pt")  # 16 bytes of storage
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "z.pt")],
           r"The data \(z\.pt\) claims shape \(1000000000000, 4\) \(1\.49e\+04 GiB as float32\), more than this "
           r"machine's memory \(.* GiB\); store the rows themselves, or fewer\.$")


# ------------------------------------------------------------------------------ unreadable files

def _deny(path):
    """An ``open`` that refuses ``path`` as chmod 000 would for a user other than root."""
    import builtins
    import errno

    real_open = builtins.open

    def denying_open(file, *a, **kw):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *a, **kw)

    return denying_open


UNREADABLE = r"cannot be read \(permission denied\); fix its permissions \(chmod u\+r\) or copy it somewhere readable\.$"


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".csv"])
def test_unreadable_data_file_simulated(tmp_path, capsys, monkeypatch, seed, suffix):
    path = _write(tmp_path / f"x{suffix}", _matrix(seed))
    monkeypatch.setattr(data, "open", _deny(path), raising=False)
    inproc(capsys, tmp_path, ["spectrum", str(path)], rf"^hcdiag spectrum: error: The data file {re.escape(str(path))} "
           + UNREADABLE)


def test_unreadable_idx_and_cifar_files_simulated(tmp_path, capsys, monkeypatch, seed):
    rng = np.random.default_rng(seed)
    img = write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), gz=False)
    monkeypatch.setattr(data, "open", _deny(img), raising=False)
    inproc(capsys, tmp_path, ["spectrum", "mnist", "--data-dir", str(tmp_path)], r"The IDX file .*ubyte " + UNREADABLE)
    batch = tmp_path / "test_batch"
    write_cifar_batch(batch, rng.integers(0, 256, (3, 3072), dtype=np.uint8), [1, 2, 3])
    monkeypatch.setattr(data, "open", _deny(batch), raising=False)
    inproc(capsys, tmp_path, ["spectrum", "cifar10", "--split", "test", "--data-dir", str(tmp_path)],
           r"The CIFAR-10 batch .*test_batch " + UNREADABLE)


def test_unreadable_file_in_a_real_subprocess(tmp_path, seed):
    """chmod 000 does not stop root: the subprocess patches the loader's open, then runs the real command."""
    path = _write(tmp_path / "x.npy", _matrix(seed))
    code = ("import builtins, errno, sys\n"
            "import hcdiag.data\n"
            "from hcdiag.cli import main\n"
            f"PATH = {str(path)!r}\n"
            "real_open = builtins.open\n"
            "def denying_open(file, *a, **kw):\n"
            "    if str(file) == PATH:\n"
            "        raise PermissionError(errno.EACCES, 'Permission denied', PATH)\n"
            "    return real_open(file, *a, **kw)\n"
            "hcdiag.data.open = denying_open\n"
            "sys.exit(main(['clusterings', PATH, '--r0', '2']))\n")
    real(tmp_path, None, r"^hcdiag clusterings: error: The data file .*x\.npy " + UNREADABLE, code=code)


def test_unreadable_file_chmod(tmp_path, capsys, seed):
    path = _write(tmp_path / "x.csv", _matrix(seed))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads (see the simulated tests)")
        inproc(capsys, tmp_path, ["spectrum", str(path)], r"The data file .*x\.csv " + UNREADABLE)
    finally:
        path.chmod(0o644)


def test_fifo_and_directory_are_refused_without_hanging(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.npy")  # opening it for reading would wait for a writer forever
    real(tmp_path, ["spectrum", "pipe.npy"], r"^hcdiag spectrum: error: The data file pipe\.npy is not a regular file "
         r"\(a FIFO, socket or device\); pass a regular file\.$", timeout=60)
    (tmp_path / "d.npz").mkdir()
    inproc(capsys, tmp_path, ["spectrum", str(tmp_path / "d.npz")], r"d\.npz is a directory; pass a regular file\.$")


# ------------------------------------------------------------------------------ IDX and CIFAR

def _idx_bytes(code, shape, payload=b""):
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes() + payload


def test_idx_header_claiming_2_64_bytes_in_a_real_subprocess(tmp_path):
    """(2^31, 2^31, 4) overflowed int64 to 0 bytes, then the reshape failed: the claim is checked in Python ints."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, (2**31, 2**31, 4), b"\0" * 100))
    real(tmp_path, ["spectrum", "mnist", "--data-dir", "."],
         r"^hcdiag spectrum: error: The IDX file train-images-idx3-ubyte is truncated: header shape \(2147483648, "
         r"2147483648, 4\) needs 18446744073709551616 data bytes, found 100; re-download it\.$")


@pytest.mark.parametrize("name,payload,match", [
    ("raw-empty", _idx_bytes(0x08, (2**31, 2**31, 4)), r"needs 18446744073709551616 data bytes, found 0; re-download it"),
    ("gz", gzip.compress(_idx_bytes(0x08, (2**31, 2**31, 4), b"\0" * 1000)),
     r"\.gz is truncated: header shape \(2147483648, 2147483648, 4\) needs 18446744073709551616 data bytes, found 1000"),
    ("dims", _idx_bytes(0x08, (0,) * 255), r"claims 255 dimensions, more than numpy holds; re-download it\.$"),
    ("header", _idx_bytes(0x08, (5, 28, 28))[:10], r"is truncated inside its header \(10 bytes\)"),
    ("float", _idx_bytes(0x0E, (2, 28, 28), np.full((2, 28, 28), 1e300, ">f8").tobytes()),
     r"The IDX file .* holds 2 row\(s\) with values beyond \+-1e\+15 \(rows 0, 1; largest \|x\| = 1e\+300\), which "
     r"overflow float32"),
])
def test_hostile_idx_headers(tmp_path, capsys, name, payload, match):
    folder = tmp_path / name
    folder.mkdir()
    fname = "train-images-idx3-ubyte" + (".gz" if name == "gz" else "")
    (folder / fname).write_bytes(payload)
    inproc(capsys, tmp_path, ["spectrum", "mnist", "--data-dir", str(folder)], match)


def _cifar_folder(tmp_path, batch: dict):
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(tmp_path / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return tmp_path


def test_ragged_cifar_data_in_a_real_subprocess(tmp_path):
    _cifar_folder(tmp_path, {b"data": [[1, 2, 3], [4, 5]], b"labels": [0, 1]})
    real(tmp_path, ["clusterings", "cifar10", "--data-dir", "."],
         r"^hcdiag clusterings: error: The CIFAR-10 batch data_batch_1 holds b'data' that is not a rectangular array "
         r"\(.*inhomogeneous.*\); expected uint8 \(n, 3072\): use the original cifar-10-python files\.$")


def _deep(depth):
    out = [1]
    for _ in range(depth):
        out = [out]
    return out


@pytest.mark.parametrize("batch,match", [
    ({b"data": [[1, [2, 3]], [4, 5]], b"labels": [0, 1]}, r"holds b'data' that is not a rectangular array"),
    ({b"data": _deep(200), b"labels": [0]}, r"holds b'data' that is not a rectangular array"),
    ({b"data": [[[1, 2], [3, 4]]], b"labels": [0]}, r"holds data of shape \(1, 2, 2\) and dtype int64; expected uint8"),
    ({b"data": {"a": 1}, b"labels": [0]}, r"holds data of shape \(\) and dtype object; expected uint8 \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**70, 1]},
     r"holds b'labels' that are not a list of integers \(.*\); re-download it\.$"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1, 2]]},
     r"holds b'labels' that are not a list of integers"),
])
def test_ragged_or_nested_cifar_batches(tmp_path, capsys, batch, match):
    _cifar_folder(tmp_path, batch)
    inproc(capsys, tmp_path, ["spectrum", "cifar10", "--data-dir", str(tmp_path)],
           r"The CIFAR-10 batch .*data_batch_1 " + match)


# ------------------------------------------------------------------------------ em-cache

def test_truncated_em_cache_entry_is_refitted_to_the_direct_fit(tmp_path, seed):
    """A truncated entry was a BadZipFile traceback; it is refitted, equal to a direct fit, and replaced."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-3, 1, (40, 3)), rng.normal(3, 1, (40, 3))]).astype(np.float32)
    kw = dict(seed=seed % 1000, max_iter=50)
    first, hit = clusterings.fit_clusterings_cached(tmp_path, x, 2, 2, **kw)
    assert not hit
    (entry,) = tmp_path.glob("em-*.npz")
    full = entry.read_bytes()
    for cut in (len(full) // 2, 10, 0):
        entry.write_bytes(full[:cut])
        refit, hit = clusterings.fit_clusterings_cached(tmp_path, x, 2, 2, **kw)
        assert not hit
        direct = clusterings.fit_clusterings(x, 2, 2, **kw)
        for name in ("centroids", "weights", "covariances", "loglik", "n_iter", "converged", "seeds"):
            np.testing.assert_array_equal(getattr(refit, name), getattr(direct, name), err_msg=name)
        again, hit = clusterings.fit_clusterings_cached(tmp_path, x, 2, 2, **kw)  # the entry was rewritten whole
        assert hit
        np.testing.assert_array_equal(again.centroids, direct.centroids)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [entry.name]


# ------------------------------------------------------------------------------ arguments

@pytest.fixture
def npy(tmp_path, seed):
    return str(_write(tmp_path / "ok.npy", _matrix(seed)))


def test_audit_tol_in_a_real_subprocess_is_refused_before_any_em_run(tmp_path, npy):
    """--audit-tol -1 was refused only after all R0 EM runs had finished."""
    real(tmp_path, ["clusterings", "ok.npy", "--audit-tol", "-1"],
         r"^hcdiag clusterings: error: argument --audit-tol: must be a finite number >= 0\. Got -1\.$")


def test_huge_T_in_a_real_subprocess(tmp_path, npy):
    real(tmp_path, ["diffusion", "ok.npy", "--T", "100000000000"],
         r"^hcdiag diffusion: error: argument --T: must be an integer in \[2, 10000000\]\. Got 100000000000\.$")


SEED = r"must be an integer in \[0, 4294967295\]\. Got {}\.$"
N_JOBS = r"must be an integer >= 1 or -1 \(all cores\)\. Got {}\.$"


@pytest.mark.parametrize("argv,match", [
    # spectrum
    (["spectrum", "{npy}", "--seed", "-1"], r"argument --seed: " + SEED.format("-1")),
    (["spectrum", "{npy}", "--seed", "1e23"], r"argument --seed: " + SEED.format("1e23")),
    (["spectrum", "{npy}", "--seed", "9" * 23], r"argument --seed: " + SEED.format("9" * 23)),
    (["spectrum", "{npy}", "--top", "0"], r"argument --top: must be an integer >= 1\. Got 0\.$"),
    (["spectrum", "{npy}", "--bootstrap", "1"],
     r"argument --bootstrap: must be an integer in \[2, 100000\] or 0 \(no CI\)\. Got 1\.$"),
    (["spectrum", "{npy}", "--bootstrap", "100000000000"], r"argument --bootstrap: .* Got 100000000000\.$"),
    (["spectrum", "{npy}", "--ci-level", "nan"], r"argument --ci-level: must be a number in \(0, 1\)\. Got nan\.$"),
    (["spectrum", "{npy}", "--ci-level", "1"], r"argument --ci-level: must be a number in \(0, 1\)\. Got 1\.$"),
    (["spectrum", "{npy}", "--ci-level", "abc"], r"argument --ci-level: must be a number in \(0, 1\)\. Got abc\.$"),
    (["spectrum", "{npy}", "--multiples", ","], r"The 'multiples' option must list at least one number\. Got ','\.$"),
    (["spectrum", "{npy}", "--multiples", "inf"], r"The 'multiples' option must hold finite numbers > 0\. Got inf\.$"),
    (["spectrum", "{npy}", "--n-samples", "1"], r"argument --n-samples: must be an integer >= 2\. Got 1\.$"),
    (["spectrum", "{npy}", "--resize", "0"], r"argument --resize: must be an integer >= 1\. Got 0\.$"),
    (["spectrum", "synthetic", "--data-seed", "-1"], r"argument --data-seed: " + SEED.format("-1")),
    (["spectrum", "synthetic", "--data-seed", "1e23"], r"argument --data-seed: " + SEED.format("1e23")),
    (["spectrum", "{npy}", "--format", "xml"], r"argument --format: invalid choice: 'xml'"),
    # phase
    (["phase", "{npy}", "--latent-dim", "0"], r"argument --latent-dim: must be an integer in \[1, 1048576\]\. Got 0\.$"),
    (["phase", "{npy}", "--latent-dim", "100000000000"], r"argument --latent-dim: .* Got 100000000000\.$"),
    (["phase", "{npy}", "--multiples", "nan"], r"The 'multiples' parameter must hold floats > 0 .*Got nan\.$"),
    (["phase", "{npy}", "--multiples", ""], r"The 'multiples' option must list at least one number\. Got ''\.$"),
    # diffusion
    (["diffusion", "{npy}", "--T", "1e11"], r"argument --T: must be an integer in \[2, 10000000\]\. Got 1e11\.$"),
    (["diffusion", "{npy}", "--T", "0"], r"argument --T: must be an integer in \[2, 10000000\]\. Got 0\.$"),
    (["diffusion", "{npy}", "--T", "nan"], r"argument --T: .* Got nan\.$"),
    # clusterings
    (["clusterings", "{npy}", "--n-jobs", "0"], r"argument --n-jobs: " + N_JOBS.format("0")),
    (["clusterings", "{npy}", "--n-jobs", "-2"], r"argument --n-jobs: " + N_JOBS.format("-2")),
    (["clusterings", "{npy}", "--seed", "-1"], r"argument --seed: " + SEED.format("-1")),
    (["clusterings", "{npy}", "--seed", "1e23"], r"argument --seed: " + SEED.format("1e23")),
    (["clusterings", "{npy}", "--r0", "2", "--seed", "4294967295"],
     r"The 'seed' parameter must be an integer in \[0, 2\*\*32 - r0\] \(run r uses seed \+ r < 2\*\*32; r0 = 2\)\. "
     r"Got 4294967295\.$"),
    (["clusterings", "{npy}", "--audit-tol", "-1"], r"argument --audit-tol: must be a finite number >= 0\. Got -1\.$"),
    (["clusterings", "{npy}", "--audit-tol", "nan"], r"argument --audit-tol: must be a finite number >= 0\. Got nan\.$"),
    (["clusterings", "{npy}", "--r0", "1"], r"argument --r0: must be an integer >= 2\. Got 1\.$"),
    (["clusterings", "{npy}", "--r0", "8192", "--uneven-halving"],
     r"The 'r0' parameter must be at most 4096 \(each run is a full EM fit; the paper uses 16\)\. Got 8192\.$"),
    (["clusterings", "{npy}", "--k", "0"], r"argument --k: must be an integer >= 1\. Got 0\.$"),
    (["clusterings", "{npy}", "--max-iter", "0"], r"argument --max-iter: must be an integer >= 1\. Got 0\.$"),
    (["clusterings", "{npy}", "--tol", "inf"], r"argument --tol: must be a finite number >= 0\. Got inf\.$"),
    (["clusterings", "{npy}", "--reg-covar=-1e-6"], r"argument --reg-covar: must be a finite number >= 0\. Got -1e-6\.$"),
    # verify (its data checks come first; these are refused before them)
    (["verify", "--out", ""], r"argument --out: must not be blank\. Got ''\.$"),
    (["verify", "--out", "{tmp}/v", "--seeds", "100000000000"],
     r"--seeds must be an integer in \[1, 1000\] \(each seed repeats the whole grid\)\. Got 100000000000\.$"),
    (["verify", "--out", "{tmp}/v", "--workers", "0"], r"--workers must be an integer >= 1 \(default: one per core, or per "
     r"GPU\)\. Got 0\.$"),
    (["verify", "--out", "{tmp}/v", "--datasets", ","],
     r"--datasets must list at least one of synthetic, fashion-mnist, mnist, cifar10, digits\. Got ','\.$"),
    (["verify", "--out", "{tmp}/v", "--losses", ""],
     r"--losses must list at least one of literal, scaled, mean\. Got ''\.$"),
])
def test_hostile_arguments_are_refused_before_any_work(tmp_path, capsys, no_work, npy, argv, match):
    argv = [a.format(npy=npy, tmp=tmp_path) for a in argv]
    inproc(capsys, tmp_path, argv, rf"^hcdiag {argv[0]}: error: .*" + match)


def test_synthetic_rows_beyond_memory_are_refused_before_allocating(tmp_path, capsys):
    inproc(capsys, tmp_path, ["spectrum", "synthetic", "--n-samples", "100000000000000"],
           r"The synthetic data of 100000000000000 rows x 32 dims needs about .* GiB to generate, more than this "
           r"machine's memory \(.* GiB\); ask for fewer rows \(--n-samples\) or dims\.$")


def test_n_jobs_above_the_number_of_runs_is_capped(tmp_path, seed):
    """joblib refused n_jobs=10^6 with a traceback; more workers than EM runs would only idle."""
    x = _matrix(seed, n=30, d=2)
    capped = clusterings.fit_clusterings(x, 2, 2, seed=seed % 1000, n_jobs=10**6)
    one = clusterings.fit_clusterings(x, 2, 2, seed=seed % 1000, n_jobs=1)
    np.testing.assert_array_equal(capped.centroids, one.centroids)
    with pytest.raises(InputError, match=r"^The 'n_jobs' parameter " + N_JOBS.format("0")):
        clusterings.fit_clusterings(x, 2, 2, n_jobs=0)


@pytest.fixture
def no_runs(monkeypatch):
    def forbidden(*a, **kw):
        raise AssertionError("verify started runs although --out was refused")

    monkeypatch.setattr(verify_mod, "execute", forbidden)


def test_verify_out_under_a_file_in_a_real_subprocess(tmp_path):
    (tmp_path / "afile").write_text("x")
    real(tmp_path, ["verify", "--out", "afile/sub"],
         r"^hcdiag verify: error: --out afile/sub cannot be created: part of its path is a file, not a folder; "
         r"choose another folder\.$")


def test_verify_out_that_cannot_be_created_or_written(tmp_path, capsys, monkeypatch, no_runs):
    with pytest.raises(InputError, match=r"^out_dir must name a folder\. Got ''\.$"):  # the library's own check
        verify_mod.verify("", datasets=["synthetic"])
    inproc(capsys, tmp_path, ["verify", "--out", "/proc/hcdiag-no-such-dir/out"],
           r"^hcdiag verify: error: --out /proc/hcdiag-no-such-dir/out cannot be created \(No such file or directory\); "
           r"choose a writable folder\.$")
    (tmp_path / "ro").mkdir()
    # root passes os.access and chmod: simulate a folder this user may not write
    real_access = os.access

    def access(path, mode, **kw):
        return False if str(path).endswith("ro") else real_access(path, mode, **kw)

    monkeypatch.setattr(verify_mod.os, "access", access)
    inproc(capsys, tmp_path, ["verify", "--out", str(tmp_path / "ro")],
           rf"^hcdiag verify: error: --out {re.escape(str(tmp_path / 'ro'))} is not writable \(permission denied\); "
           r"choose another folder\.$")
