"""Dataset loaders against naive oracles: IDX pooling loops, CIFAR grayscale formula, file formats."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hcdiag.data import (DEFAULT_FASHION_DIR, Dataset, area_pool, cifar10, digits, fashion_mnist, from_path, load,
                         mnist, read_idx, synthetic)
from hcdiag.errors import InputError

# --------------------------------------------------------------------------------------------
# fixture writers (the real formats, byte for byte)

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path, arr, *, gz):
    """IDX: 0x00 0x00, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    arr = np.asarray(arr)
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    payload = bytes([0, 0, _IDX_CODES[big.dtype], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + big.tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(payload)
    return path


def write_idx_dataset(folder, rng, *, n_train=7, n_test=3, side=28, gz=True):
    """Train/test images and labels in MNIST layout; returns the raw arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", img, gz=gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", lab, gz=gz)
        raw[stem] = (img, lab)
    return raw


def naive_pool(images, size):
    """Mean of each f x f block, pixel by pixel, / 255."""
    n, side, _ = images.shape
    f = side // size
    out = np.zeros((n, size, size))
    for i in range(n):
        for r in range(size):
            for c in range(size):
                total = 0.0
                for a in range(f):
                    for b in range(f):
                        total += float(images[i, r * f + a, c * f + b])
                out[i, r, c] = total / (f * f) / 255.0
    return out.reshape(n, -1)


def write_cifar_batch(path, data_u8, labels, protocol=2):
    """A CIFAR-10 python batch: dict with bytes keys, numpy uint8 (n, 3072) inside."""
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in labels],
             b"data": data_u8, b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)


def write_cifar_dataset(folder, rng, n_per_batch=3):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n_per_batch)
        write_cifar_batch(folder / name, d, lab)
        raw[name] = (d, lab)
    return raw


def naive_cifar(data_u8, size):
    """0.299 R + 0.587 G + 0.114 B per pixel (channel-major rows), then f x f block means, / 255."""
    n = data_u8.shape[0]
    f = 32 // size
    out = np.zeros((n, size, size))
    for i in range(n):
        for r in range(size):
            for c in range(size):
                total = 0.0
                for a in range(f):
                    for b in range(f):
                        p = (r * f + a) * 32 + (c * f + b)
                        total += (0.299 * data_u8[i, p] + 0.587 * data_u8[i, 1024 + p]
                                  + 0.114 * data_u8[i, 2048 + p])
                out[i, r, c] = total / (f * f) / 255.0
    return out.reshape(n, -1)


# --------------------------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, seed, dtype, gz):
    rng = np.random.default_rng(seed)
    arr = (rng.normal(size=(4, 3, 5)) * 50).astype(np.dtype(dtype).newbyteorder("="))
    got = read_idx(write_idx(tmp_path / "a.idx", arr, gz=gz))
    assert got.shape == arr.shape and got.dtype.isnative
    assert np.array_equal(got, arr)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("resize", [None, 14, 7, 4, 28])
def test_mnist_matches_naive_pooling(tmp_path, seed, gz, resize):
    rng = np.random.default_rng(seed)
    raw = write_idx_dataset(tmp_path, rng, gz=gz)
    size = 14 if resize is None else resize
    for split, parts in (("train", ["train"]), ("test", ["t10k"]), ("all", ["train", "t10k"])):
        ds = load("MNIST", data_dir=tmp_path, split=split, resize=resize)
        img = np.concatenate([raw[p][0] for p in parts])
        assert ds.x.dtype == np.float32 and ds.x.shape == (img.shape[0], size * size)
        assert ds.image_shape == (size, size) and ds.split == split and ds.name == "mnist"
        np.testing.assert_allclose(ds.x, naive_pool(img, size), rtol=0, atol=1e-6)
        assert ds.labels.dtype == np.int64
        assert np.array_equal(ds.labels, np.concatenate([raw[p][1] for p in parts]))


def test_fashion_from_folder_and_alias(tmp_path, seed):
    rng = np.random.default_rng(seed)
    raw = write_idx_dataset(tmp_path, rng, n_train=5, n_test=4)
    ds = fashion_mnist(tmp_path)
    np.testing.assert_allclose(ds.x, naive_pool(raw["train"][0], 14), atol=1e-6)
    ds2 = load("fashion_mnist", data_dir=tmp_path, split="test", resize=28)
    np.testing.assert_allclose(ds2.x, raw["t10k"][0].reshape(4, -1) / 255.0, atol=1e-7)
    assert ds2.preprocessing["pooling"] == "none" and ds.preprocessing["pooling"] == "2x2 area mean"


def test_labels_optional(tmp_path, seed):
    write_idx_dataset(tmp_path, np.random.default_rng(seed))
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    ds = mnist(tmp_path)
    assert ds.labels is None and ds.preprocessing["label_files"] == [None]


def test_n_samples_keeps_first_rows(tmp_path, seed):
    raw = write_idx_dataset(tmp_path, np.random.default_rng(seed))
    ds = load("mnist", data_dir=tmp_path, n_samples=4)
    np.testing.assert_allclose(ds.x, naive_pool(raw["train"][0][:4], 14), atol=1e-6)
    assert np.array_equal(ds.labels, raw["train"][1][:4]) and ds.preprocessing["first_n"] == 4
    with pytest.raises(InputError, match=r"'n_samples' parameter asks for 8 rows but mnist \(train\) has 7; use at most 7"):
        load("mnist", data_dir=tmp_path, n_samples=8)
    with pytest.raises(InputError, match=r"'n_samples' parameter must be an integer >= 2. Got 1"):
        load("mnist", data_dir=tmp_path, n_samples=1)


def test_bad_resize_lists_valid_sizes(tmp_path, seed):
    write_idx_dataset(tmp_path, np.random.default_rng(seed))
    with pytest.raises(InputError, match=r"'resize' parameter for mnist must divide 28 \(area pooling\): "
                                         r"one of 1, 2, 4, 7, 14, 28. Got 10"):
        mnist(tmp_path, resize=10)


def test_truncated_and_corrupt_idx(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = write_idx(tmp_path / "good", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), gz=False).read_bytes()
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(InputError, match=r"IDX file .*short is truncated: header shape \(3, 28, 28\) needs 2352 "
                                         r"data bytes, found 2347; re-download it"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(good + b"\0")
    with pytest.raises(InputError, match=r"is longer than its header says"):
        read_idx(tmp_path / "long")
    (tmp_path / "head").write_bytes(good[:9])
    with pytest.raises(InputError, match=r"is truncated inside its header \(9 bytes\)"):
        read_idx(tmp_path / "head")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(InputError, match=r"IDX file .*bad.gz is a corrupt gzip file \(.*\); re-download it"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(InputError, match=r"is not an IDX file \(bad magic number 68656c6c\)"):
        read_idx(tmp_path / "text")
    # a corrupt file inside a dataset folder gives the same one line through load()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train-images-idx3-ubyte").write_bytes(good[:-5])
    with pytest.raises(InputError, match=r"^The IDX file .*train-images-idx3-ubyte is truncated[^\n]*$"):
        load("mnist", data_dir=tmp_path / "d")


def test_missing_idx_dataset_names_files_and_howto(tmp_path):
    with pytest.raises(InputError, match=r"^Fashion-MNIST not found: looked for " + str(tmp_path)
                       + r"/train-images-idx3-ubyte.gz, " + str(tmp_path) + r"/t10k-images-idx3-ubyte.gz \(or the "
                       r"same without .gz\); apt-get install dataset-fashion-mnist, or pass data_dir=FOLDER[^\n]*$"):
        fashion_mnist(tmp_path, split="all")
    with pytest.raises(InputError, match=r"The mnist dataset needs data_dir: pass data_dir=FOLDER"):
        load("mnist")
    with pytest.raises(InputError, match=r"MNIST not found: looked for .*nowhere/train-images-idx3-ubyte.gz"):
        mnist(tmp_path / "nowhere")


def test_default_fashion_dir_is_debian_package():
    assert DEFAULT_FASHION_DIR == "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------------------------
# CIFAR-10

@pytest.mark.parametrize("sub", [False, True])
@pytest.mark.parametrize("resize", [None, 16, 32])
def test_cifar_matches_naive_formula(tmp_path, seed, sub, resize):
    rng = np.random.default_rng(seed)
    raw = write_cifar_dataset(tmp_path / "cifar-10-batches-py" if sub else tmp_path, rng)
    size = 8 if resize is None else resize
    train = [f"data_batch_{i}" for i in range(1, 6)]
    for split, names in (("train", train), ("test", ["test_batch"]), ("all", train + ["test_batch"])):
        ds = load("cifar10", data_dir=tmp_path, split=split, resize=resize)
        d = np.concatenate([raw[b][0] for b in names])
        assert ds.x.shape == (d.shape[0], size * size) and ds.x.dtype == np.float32
        np.testing.assert_allclose(ds.x, naive_cifar(d, size), rtol=0, atol=1e-6)
        assert np.array_equal(ds.labels, np.concatenate([raw[b][1] for b in names]))
        assert ds.preprocessing["grayscale"]["weights_rgb"] == [0.299, 0.587, 0.114]


def test_cifar_reads_numpy_scalars_and_newer_protocols(tmp_path, seed):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    lab = np.arange(4, dtype=np.int64)
    batch = {b"data": d, b"labels": [lab[i] for i in range(4)]}  # numpy int64 scalars, not ints
    for protocol in (0, 2, 4, 5):
        with open(tmp_path / "test_batch", "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        ds = cifar10(tmp_path, split="test")
        np.testing.assert_allclose(ds.x, naive_cifar(d, 8), atol=1e-6)
        assert ds.labels.tolist() == [0, 1, 2, 3]


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickle_refused_and_not_run(tmp_path, seed):
    marker = tmp_path / "pwned"
    d = np.random.default_rng(seed).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    # the eval payload really runs under plain pickle.load: the file appears
    payload = pickle.dumps({b"data": d, b"labels": [0, 1], b"x": _EvalPayload(marker)}, protocol=2)
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(InputError, match=r"^The CIFAR-10 batch .*test_batch asks for the builtins.eval global, which "
                                         r"a data batch never needs; refused \(nothing in it was run\)[^\n]*$"):
        load("cifar10", data_dir=tmp_path, split="test")
    assert not marker.exists()
    # __reduce__ with os.system: pickled under the module that defines it (posix on Linux)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": d, b"labels": [0, 1], b"x": _SystemPayload(marker)}, fh, protocol=2)
    with pytest.raises(InputError, match=rf"asks for the {os.system.__module__}.system global"):
        cifar10(tmp_path, split="test")
    assert not marker.exists()
    # hand-written protocol-0 pickle naming os.system directly
    (tmp_path / "test_batch").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(InputError, match=r"asks for the os.system global"):
        cifar10(tmp_path, split="test")
    assert not marker.exists()


def test_bad_cifar_batches(tmp_path, seed):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    path = tmp_path / "test_batch"
    write_cifar_batch(path, d, [1, 2, 3])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"^The CIFAR-10 batch .*test_batch is (truncated or )?corrupt \(.*\); "
                                         r"re-download it.$"):
        cifar10(tmp_path, split="test")
    with open(path, "wb") as fh:
        pickle.dump({b"pixels": d}, fh, protocol=2)
    with pytest.raises(InputError, match=r"lacks b'data' or b'labels' \(keys: b'pixels'\)"):
        cifar10(tmp_path, split="test")
    write_cifar_batch(path, d[:, :3000], [1, 2, 3])
    with pytest.raises(InputError, match=r"holds data of shape \(3, 3000\) and dtype uint8; expected uint8 \(n, 3072\)"):
        cifar10(tmp_path, split="test")
    write_cifar_batch(path, d, [1, 2])
    with pytest.raises(InputError, match=r"holds 2 labels for 3 images"):
        cifar10(tmp_path, split="test")
    with open(path, "wb") as fh:
        pickle.dump([1, 2], fh, protocol=2)
    with pytest.raises(InputError, match=r"holds a list, not a dict with b'data' and b'labels'"):
        cifar10(tmp_path, split="test")
    write_cifar_batch(path, d, [1, 2, 3])
    with pytest.raises(InputError, match=r"'resize' parameter for cifar10 must divide 32 \(area pooling\): one of "
                                         r"1, 2, 4, 8, 16, 32. Got 5"):
        cifar10(tmp_path, split="test", resize=5)


def test_missing_cifar_names_files(tmp_path):
    with pytest.raises(InputError, match=r"^CIFAR-10 not found: looked for " + str(tmp_path) + r"/test_batch \(also under "
                       + str(tmp_path) + r"/cifar-10-batches-py\); download cifar-10-python.tar.gz from [^\n]*$"):
        cifar10(tmp_path, split="test")
    with pytest.raises(InputError, match=r"The cifar10 dataset needs data_dir: download"):
        load("cifar-10")


# --------------------------------------------------------------------------------------------
# synthetic GMM and digits

def test_synthetic_deterministic_per_seed(seed):
    a, b = synthetic(n=500, seed=seed), synthetic(n=500, seed=seed)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.labels, b.labels) and np.array_equal(a.means, b.means)
    c = synthetic(n=500, seed=seed + 1)
    assert not np.array_equal(a.means, c.means)
    via_load = load("synthetic", n_samples=500, seed=seed)
    assert np.array_equal(via_load.x, a.x)


def test_synthetic_statistics_match_stored_means(seed):
    n, dim, k, spread = 20_000, 32, 8, 0.5
    ds = synthetic(n=n, dim=dim, k=k, spread=spread, seed=seed)
    assert ds.x.shape == (n, dim) and ds.x.dtype == np.float32 and ds.means.shape == (k, dim)
    assert ds.labels.min() >= 0 and ds.labels.max() < k and ds.image_shape is None
    counts = np.bincount(ds.labels, minlength=k)
    # equal weights: each count is Binomial(n, 1/k), std sqrt(n p (1-p)) ~ 47; 6 sigma over 8 counts
    assert np.all(np.abs(counts - n / k) < 6 * np.sqrt(n * (1 / k) * (1 - 1 / k)))
    for j in range(k):
        xj = ds.x[ds.labels == j].astype(np.float64)
        # sample mean of n_j points has std spread / sqrt(n_j) per coordinate (~0.01); 6 sigma over 256 coords
        assert np.all(np.abs(xj.mean(0) - ds.means[j]) < 6 * spread / np.sqrt(len(xj)))
        # pooled within-component variance: relative std sqrt(2 / (n_j dim)) ~ 0.005; 6 sigma
        var = ((xj - ds.means[j]) ** 2).mean()
        assert abs(var / spread ** 2 - 1) < 6 * np.sqrt(2 / (len(xj) * dim))
    # means ~ N(0, 1): 256 draws, std of the sample std ~ 1/sqrt(512) ~ 0.044; 6 sigma
    assert abs(ds.means.std() - 1.0) < 6 / np.sqrt(2 * k * dim)


def test_synthetic_options_and_defaults(seed):
    ds = load("synthetic", n_samples=300, dim=5, k=3, spread=0.1, separation=4.0, seed=seed)
    assert ds.x.shape == (300, 5) and ds.means.shape == (3, 5)
    assert ds.preprocessing["spread"] == 0.1 and ds.preprocessing["separation"] == 4.0
    full = synthetic(seed=seed)
    assert full.x.shape == (50_000, 32) and full.means.shape == (8, 32)
    assert full.preprocessing["component_cov"] == "0.25 * I"
    with pytest.raises(InputError, match=r"The 'spread' parameter must be a float > 0. Got -1"):
        synthetic(n=10, spread=-1)
    with pytest.raises(InputError, match=r"The 'k' parameter must be an integer >= 1. Got 0"):
        synthetic(n=10, k=0)
    with pytest.raises(InputError, match=r"The 'n' parameter must be an integer >= 2. Got 1"):
        synthetic(n=1)


def test_digits_scaled():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = digits()
    assert ds.x.shape == (1797, 64) and ds.image_shape == (8, 8)
    np.testing.assert_allclose(ds.x, ref.data / 16.0, atol=1e-7)
    assert np.array_equal(ds.labels, ref.target) and ds.x.min() >= 0 and ds.x.max() <= 1
    half = load("digits", resize=4)
    np.testing.assert_allclose(half.x, naive_pool(ref.images * (255 / 16), 4), atol=1e-6)


# --------------------------------------------------------------------------------------------
# files

def test_npy_is_memory_mapped(tmp_path, seed):
    x = np.random.default_rng(seed).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ds = from_path(tmp_path / "x.npy")
    assert isinstance(ds.x, np.memmap) and not ds.x.flags.writeable
    assert np.array_equal(ds.x, x) and ds.name == "x.npy" and ds.split == "file"
    assert ds.to_dict()["memory_mapped"] is True
    head = load(str(tmp_path / "x.npy"), n_samples=10)
    assert isinstance(head.x, np.memmap) and np.array_equal(head.x, x[:10])


def test_npz_pt_csv(tmp_path, seed):
    import torch

    x = np.random.default_rng(seed).normal(size=(20, 4))
    np.savez(tmp_path / "one.npz", anything=x)
    np.savez(tmp_path / "keyed.npz", labels=np.arange(20), X=x)
    np.savez(tmp_path / "many.npz", a=x, b=x)
    torch.save(torch.from_numpy(x), tmp_path / "t.pt")
    torch.save({"data": torch.from_numpy(x), "y": torch.arange(20)}, tmp_path / "d.pt")
    np.savetxt(tmp_path / "h.csv", x, delimiter=",", header="a,b,c,d", comments="")
    np.savetxt(tmp_path / "p.csv", x, delimiter=",")
    for name in ("one.npz", "keyed.npz", "t.pt", "d.pt", "h.csv", "p.csv"):
        ds = load(str(tmp_path / name))
        assert ds.x.dtype == np.float32 and ds.x.shape == (20, 4), name
        np.testing.assert_allclose(ds.x, x, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match=r"many.npz holds several arrays \(a, b\) and none is named x, X or data"):
        load(str(tmp_path / "many.npz"))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"The .npz file .*obj.npz cannot be read without pickle"):
        from_path(tmp_path / "obj.npz")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(InputError, match=r"The CSV file .*bad.csv is not numeric \(.*\); keep only numbers"):
        from_path(tmp_path / "bad.csv")
    torch.save([torch.ones(3)], tmp_path / "list.pt")
    with pytest.raises(InputError, match=r"list.pt holds a list, not a tensor; save the data as a tensor"):
        from_path(tmp_path / "list.pt")


def test_unsafe_pt_refused_and_not_run(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"x": _SystemPayload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=rf"^The .pt file .*evil.pt is refused by torch.load\(weights_only=True\) "
                                         rf"\(it asks for the {os.system.__module__}.system global\)[^\n]*$"):
        load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"junk.pt (is refused|is not a readable)"):
        from_path(tmp_path / "junk.pt")


def test_nonfinite_rows_refused_or_dropped(tmp_path, seed):
    x = np.random.default_rng(seed).normal(size=(30, 3)).astype(np.float32)
    x[[4, 17], 1] = np.nan
    x[9, 0] = np.inf
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(InputError, match=r"holds 3 row\(s\) with NaN or inf \(rows 4, 9, 17\); clean them or pass "
                                         r"drop_nonfinite=True"):
        load(str(tmp_path / "nan.npy"))
    ds = load(str(tmp_path / "nan.npy"), drop_nonfinite=True)
    assert np.array_equal(ds.x, np.delete(x, [4, 9, 17], axis=0))
    assert ds.preprocessing["dropped_nonfinite"] == {"count": 3, "rows": [4, 9, 17], "rows_truncated": False}
    # n_samples first, then validation: rows past the first 9 are never looked at
    assert load(str(tmp_path / "nan.npy"), n_samples=9, drop_nonfinite=True).n == 8


@pytest.mark.parametrize("arr,msg", [
    (np.ones(5), r"The data \(bad.npy\) must be a 2-D array of shape \(n, N\); got 1-D"),
    (np.ones((1, 3)), r"The data \(bad.npy\) has 1 row\(s\); at least 2 are needed"),
    (np.array([["a", "b"], ["c", "d"]]), r"The data \(bad.npy\) must be numeric; got dtype <U1"),
])
def test_bad_arrays(tmp_path, arr, msg):
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(InputError, match=msg):
        load(str(tmp_path / "bad.npy"))


def test_object_npy_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[{"a": 1}, 2]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"The .npy file .*o.npy cannot be memory-mapped \(.*\); save a numeric array"):
        from_path(tmp_path / "o.npy")


def test_load_dispatch_messages(tmp_path, seed):
    with pytest.raises(InputError, match=r"Unknown dataset 'imagenet': use one of synthetic, fashion-mnist, mnist, "
                                         r"cifar10, digits, or a path to an existing .npy/.npz/.pt/.csv file"):
        load("imagenet")
    (tmp_path / "x.txt").write_text("1,2\n3,4\n")
    with pytest.raises(InputError, match=r"x.txt has suffix '.txt'; accepted suffixes: .npy, .npz, .pt, .csv"):
        load(str(tmp_path / "x.txt"))
    with pytest.raises(InputError, match=r"The data file .*missing.npy does not exist; check the path"):
        load(str(tmp_path / "missing.npy"))
    with pytest.raises(InputError, match=r"The option\(s\) width are not understood by the digits loader; it accepts: "
                                         r"none"):
        load("digits", width=3)
    with pytest.raises(InputError, match=r"The option\(s\) dims are not understood by the synthetic loader; it "
                                         r"accepts: dim, k, spread, separation"):
        load("synthetic", dims=3)
    with pytest.raises(InputError, match=r"'resize' option applies to image datasets only, not to synthetic. Got 14"):
        load("synthetic", resize=14)
    with pytest.raises(InputError, match=r"The synthetic data has no test split; use split 'train' or 'all'"):
        load("synthetic", split="test")
    with pytest.raises(InputError, match=r"The 'split' parameter must be train, test or all. Got 'val'"):
        load("synthetic", split="val")
    np.save(tmp_path / "y.npy", np.ones((3, 2), np.float32))
    with pytest.raises(InputError, match=r"'resize' option applies to image datasets only, not to the file"):
        load(str(tmp_path / "y.npy"), resize=4)
    with pytest.raises(InputError, match=r"The option\(s\) k do not apply to a data file; drop them"):
        load(str(tmp_path / "y.npy"), k=4)
    assert load("DIGITS", split="all").n == 1797


def test_to_dict_is_json_and_has_no_arrays(tmp_path, seed):
    ds = synthetic(n=100, seed=seed)
    meta = json.loads(json.dumps(ds.to_dict()))
    assert meta["n"] == 100 and meta["d"] == 32 and meta["name"] == "synthetic" and meta["has_means"] is True
    assert meta["source"] == "generated" and meta["split"] == "all" and meta["n_classes"] <= 8
    assert isinstance(ds, Dataset) and ds.n == 100 and ds.d == 32


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.just(12), st.just(12))), st.sampled_from([1, 2, 3, 4, 6, 12]))
def test_area_pool_matches_naive_and_keeps_mean(images, size):
    pooled = area_pool(images, size, scale=1.0 / 255.0)
    np.testing.assert_allclose(pooled, naive_pool(images, size), atol=1e-6)
    # block means of equal-sized blocks average to the image mean
    np.testing.assert_allclose(pooled.mean(1), images.reshape(len(images), -1).mean(1) / 255.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package dataset-fashion-mnist)

@pytest.mark.fashion
def test_real_fashion_mnist(fashion_dir):
    raw = read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    assert raw.shape == (60000, 28, 28) and raw.dtype == np.uint8
    ds = fashion_mnist(fashion_dir)
    assert ds.x.shape == (60000, 196) and ds.x.dtype == np.float32 and ds.image_shape == (14, 14)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and ds.labels.shape == (60000,)
    # manual 2x2 means of the raw pixels / 255 for the first images
    manual = raw[:20].astype(np.float64).reshape(20, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(20, -1) / 255.0
    np.testing.assert_allclose(ds.x[:20], manual, atol=1e-6)
    np.testing.assert_allclose(ds.x[:3], naive_pool(raw[:3], 14), atol=1e-6)
    assert np.array_equal(np.bincount(ds.labels), np.full(10, 6000))
    full = load("fashion-mnist", data_dir=fashion_dir, resize=28, n_samples=1000)
    assert full.x.shape == (1000, 784)
    np.testing.assert_allclose(full.x, raw[:1000].reshape(1000, -1) / 255.0, atol=1e-7)
    test = load("fashion-mnist", data_dir=fashion_dir, split="test")
    assert test.x.shape == (10000, 196) and test.labels.shape == (10000,)

