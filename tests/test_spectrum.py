"""hcdiag.spectrum against numpy's float64 eigvalsh of the float64 covariance (1/n)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcdiag.errors import InputError
from hcdiag.spectrum import (DecoderVarianceWarning, Spectrum, decoder_variances, lambda_max, spectrum)

METHODS = ["exact", "lanczos", "streaming", "auto"]


def low_rank_plus_noise(rng, n, d, rank=8, noise=0.3, offset=1.0, dtype=np.float32):
    """Rows x = U W + noise + offset: a few strong directions over isotropic noise, (n, d)."""
    u = rng.standard_normal((n, rank))
    w = rng.standard_normal((rank, d)) * np.linspace(3.0, 0.8, rank)[:, None] / np.sqrt(d) * 4
    return (u @ w + noise * rng.standard_normal((n, d)) + offset).astype(dtype)


def reference(x):
    """Descending eigenvalues of np.cov(x, bias=True) in float64 (the oracle)."""
    return np.linalg.eigvalsh(np.atleast_2d(np.cov(np.asarray(x, dtype=np.float64), rowvar=False, bias=True)))[::-1]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_numpy(method, seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 1500, 160)
    ref = reference(x)
    s = spectrum(x, top=6, method=method, chunk_rows=400, seed=seed)
    assert isinstance(s, Spectrum)
    assert s.method == ("exact" if method == "auto" else method)  # d = 160 in memory: auto's flop model
    assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0]
    np.testing.assert_allclose(s.eigenvalues, ref[:6], rtol=0, atol=1e-10 * ref[0])
    assert s.converged
    assert s.eigenvalues.dtype == np.float64 and s.eigenvalues.shape == (6,)
    assert abs(s.trace - np.var(x.astype(np.float64), axis=0).sum()) <= 1e-10 * s.trace
    assert (s.n, s.d) == x.shape


def test_lanczos_large_offset_and_wide_data(seed):
    """Data far from 0 (cancellation in E[xx^T] - mu mu^T) and d > n (rank-deficient)."""
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 200, 350, rank=5, offset=300.0)
    ref = reference(x)
    for method in ("lanczos", "streaming", "exact"):
        s = spectrum(x, top=5, method=method, seed=seed)  # the 5 signal directions (noise bulk: slow, tiny gaps)
        assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0], method
        np.testing.assert_allclose(s.eigenvalues, ref[:5], rtol=0, atol=1e-9 * ref[0])
    assert abs(s.trace - np.var(x.astype(np.float64), axis=0).sum()) <= 1e-9 * s.trace


def test_lanczos_top_k_order_and_values(seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 2000, 300, rank=12)
    ref = reference(x)
    s = spectrum(x, top=20, method="lanczos", seed=seed)
    assert np.all(np.diff(s.eigenvalues) <= 0)
    np.testing.assert_allclose(s.eigenvalues, ref[:20], rtol=0, atol=1e-10 * ref[0])
    assert s.passes == s.n_iter  # one read of the data per block product


def test_streaming_reads_a_memmap_once(tmp_path, seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 2500, 150)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ref = reference(x)
    s = spectrum(mm, top=5, chunk_rows=333)  # chunks smaller than the file
    assert s.method == "streaming" and s.passes == 1.0
    assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0]
    np.testing.assert_allclose(s.eigenvalues, ref[:5], rtol=0, atol=1e-10 * ref[0])
    s2 = spectrum(mm, top=3, method="lanczos", chunk_rows=333, seed=seed)  # lanczos over the memmap too
    assert abs(s2.lambda_max - ref[0]) <= 1e-10 * ref[0]


def test_auto_records_its_choice(seed):
    rng = np.random.default_rng(seed)
    assert spectrum(low_rank_plus_noise(rng, 200, 20), top=2).method == "exact"
    assert spectrum(low_rank_plus_noise(rng, 400, 600), top=2).method == "lanczos"


def test_torch_tensor_and_integer_input(seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 500, 40)
    ref = reference(x)
    s = spectrum(torch.from_numpy(x), top=3, method="lanczos", device="cpu")
    assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0]
    xi = rng.integers(0, 255, size=(300, 12)).astype(np.uint8)
    assert abs(lambda_max(xi) - reference(xi)[0]) <= 1e-10 * reference(xi)[0]


def test_top_is_capped_at_d_and_lambda_max_helper():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    s = spectrum(x, top=10)
    np.testing.assert_allclose(s.eigenvalues, [1.0, 0.25], atol=1e-15)
    assert lambda_max(x, method="lanczos") == pytest.approx(1.0, abs=1e-14)
    d = s.to_dict()
    assert d["eigenvalues"] == pytest.approx([1.0, 0.25]) and d["method"] == "exact" and d["ci"] is None


def test_constant_data_is_flagged_and_decoder_variances_refuse(seed):
    x = np.full((50, 7), 3.25, dtype=np.float32)
    for method in ("exact", "lanczos", "streaming"):
        s = spectrum(x, top=3, method=method, bootstrap=5, seed=seed)
        assert s.constant and s.lambda_max == 0.0 and s.trace == 0.0
        assert np.all(s.eigenvalues == 0.0)
    with pytest.raises(InputError, match=r"lambda_max is 0 \(constant data\), so multiples of it are undefined"):
        decoder_variances(s.lambda_max, [1, 2])


def test_bootstrap_ci_contains_full_value_and_is_reproducible(seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 4000, 30, rank=3)
    s = spectrum(x, top=2, bootstrap=60, seed=seed)
    lo, hi = s.ci
    assert lo < s.lambda_max < hi  # large sample: the percentile interval brackets the estimate
    # sampling spread of lambda_max: ~ lambda_max * sqrt(2/n); the CI must be of that order (loose: MC)
    width = hi - lo
    assert 0.2 * s.lambda_max * np.sqrt(2 / 4000) < width < 10 * s.lambda_max * np.sqrt(2 / 4000)
    assert spectrum(x, top=2, bootstrap=60, seed=seed).ci == s.ci
    assert spectrum(x, top=2, bootstrap=60, seed=seed + 1).ci != s.ci
    # the same resamples give the same CI whichever method solved them
    assert np.allclose(spectrum(x, top=2, bootstrap=60, seed=seed, method="lanczos").ci, s.ci, rtol=1e-9)


def test_bootstrap_replicates_match_naive_resampling(seed):
    """The batched, weighted resamples equal eigvalsh of the explicitly resampled rows."""
    from hcdiag.spectrum import _bootstrap_lambda_max, _Rows

    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 300, 25, rank=3)
    rows = _Rows(x, torch.device("cpu"), 64, memmapped=False)
    vals, _ = _bootstrap_lambda_max(rows, torch.zeros((1, 25, 0), dtype=torch.float64), 7, seed=seed, tol=1e-12)
    draw = np.random.default_rng([seed, 1])
    naive = [reference(x[draw.integers(0, 300, size=300)])[0] for _ in range(7)]
    np.testing.assert_allclose(vals, naive, rtol=1e-10)


def test_decoder_variances_warn_exactly_inside_ci():
    ci = (0.9, 1.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = decoder_variances(1.0, [0.5, 0.9, 1.0, 1.2, 1.21, 2.0], ci=ci)
    assert [r["s2"] for r in rows] == pytest.approx([0.5, 0.9, 1.0, 1.2, 1.21, 2.0])
    assert [r["inside_ci"] for r in rows] == [False, True, True, True, False, False]
    dv = [w for w in caught if issubclass(w.category, DecoderVarianceWarning)]
    assert len(dv) == 3
    assert "lies inside the CI [0.9, 1.2] of lambda_max" in str(dv[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecoderVarianceWarning)
        rows = decoder_variances(2.0, [2, 5])  # no CI: undecided, no warning
    assert [r["inside_ci"] for r in rows] == [None, None]


def test_decoder_variances_refuse_bad_multiples():
    with pytest.raises(InputError, match=r"The 'multiples' parameter must hold floats > 0\. Got -1"):
        decoder_variances(1.0, [1, -1])
    with pytest.raises(InputError, match=r"The 'multiples' parameter must hold floats > 0\. Got 0"):
        decoder_variances(1.0, 0)
    with pytest.raises(InputError, match=r"The 'lambda_max' parameter must be a finite float >= 0\. Got nan"):
        decoder_variances(float("nan"), [1])
    with pytest.raises(InputError, match=r"The 'ci' parameter must be a finite interval"):
        decoder_variances(1.0, [1], ci=(2.0, 1.0))


def test_bad_input_messages():
    with pytest.raises(InputError, match=r"The 'top' parameter must be an int >= 1\. Got 0\."):
        spectrum(np.ones((3, 2)), top=0)
    with pytest.raises(InputError, match=r"The 'method' parameter must be one of auto, exact, lanczos, streaming\. Got 'svd'\."):
        spectrum(np.ones((3, 2)), method="svd")
    with pytest.raises(InputError, match=r"The 'bootstrap' parameter must be 0 \(no CI\) or at least 2 resamples\. Got 1\."):
        spectrum(np.ones((3, 2)), bootstrap=1)
    with pytest.raises(InputError, match=r"The 'ci_level' parameter must be a float in \(0, 1\)\. Got 1\.5\."):
        spectrum(np.ones((3, 2)), ci_level=1.5)
    with pytest.raises(InputError, match=r"The 'tol' parameter must be a float in \(0, 1\)\. Got 0\."):
        spectrum(np.ones((3, 2)), tol=0)
    x = np.ones((6, 3))
    x[2, 1] = np.nan
    with pytest.raises(InputError, match=r"The data holds 1 row\(s\) with NaN or inf \(rows 2\)"):
        spectrum(x)
    with pytest.raises(InputError, match=r"The data must be a 2-D array of shape \(n, N\); got 1-D"):
        spectrum(np.arange(4.0))
    with pytest.raises(InputError, match=r"The data has 1 row\(s\); at least 2 are needed"):
        spectrum(np.ones((1, 4)))
    with pytest.raises(InputError, match=r"The data must be numeric; got dtype <U1"):
        spectrum(np.array([["a", "b"], ["c", "d"]]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 40), d=st.integers(1, 12), scale=st.floats(1e-3, 1e3), offset=st.floats(-50, 50),
       method=st.sampled_from(["exact", "lanczos", "streaming"]), s=st.integers(0, 2**31 - 1))
def test_property_sorted_nonnegative_below_trace(n, d, scale, offset, method, s):
    x = np.random.default_rng(s).standard_normal((n, d)) * scale + offset
    sp = spectrum(x, top=d, method=method, chunk_rows=7)
    ev = sp.eigenvalues
    assert np.all(np.diff(ev) <= 0) and np.all(ev >= 0)
    assert ev.sum() <= sp.trace * (1 + 1e-9) + 1e-300
    assert sp.lambda_max <= sp.trace * (1 + 1e-12) + 1e-300
    ref = reference(x)
    np.testing.assert_allclose(ev, np.clip(ref[: len(ev)], 0, None), rtol=0, atol=1e-9 * max(ref[0], 1e-300))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["exact", "lanczos", "streaming"])
def test_cuda_matches_numpy(method, seed):
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 3000, 400)
    ref = reference(x)
    s = spectrum(x, top=5, method=method, device="cuda", bootstrap=20, seed=seed)
    assert s.device.startswith("cuda")
    assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0]
    np.testing.assert_allclose(s.eigenvalues, ref[:5], rtol=0, atol=1e-10 * ref[0])
    cpu = spectrum(x, top=5, method=method, device="cpu", bootstrap=20, seed=seed)
    np.testing.assert_allclose(s.ci, cpu.ci, rtol=1e-8)


def test_block_krylov_kernel_with_restarts_and_batches(seed):
    """The kernel alone on dense PSD matrices, a basis cap small enough to force thick restarts."""
    from hcdiag.spectrum import _block_krylov

    rng = np.random.default_rng(seed)
    d, batch = 120, 3
    spectra = np.geomspace(10.0, 0.01, d)
    mats = []
    for _ in range(batch):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        mats.append((q * spectra) @ q.T)
    a = torch.from_numpy(np.stack(mats))  # (G, d, d)
    res = _block_krylov(lambda v: a @ v, d, batch, top=4, block=4, tol=1e-12, max_iter=200,
                        rng=np.random.default_rng(seed), device=torch.device("cpu"), max_basis=16)
    assert bool(res.converged.all())
    for g in range(batch):
        ref = np.linalg.eigvalsh(mats[g])[::-1][:4]
        np.testing.assert_allclose(res.values[g].numpy(), ref, rtol=0, atol=1e-10 * ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thin_pass_matches_numpy_and_is_deterministic(dtype, seed):
    """One read for V^T Y^T Y (Y = x - shift), chunked and split over worker threads, against numpy float64."""
    from hcdiag.spectrum import _thin_pass

    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 777, 37, rank=4, offset=2.0)
    shift = torch.from_numpy(x[:20].astype(np.float64).mean(axis=0))
    v = rng.standard_normal((5, 37))
    threads = torch.get_num_threads()
    acc, csum, ss = _thin_pass(torch.from_numpy(x), torch.from_numpy(v).to(dtype), shift, chunk_rows=50, sums=True)
    assert torch.get_num_threads() == threads
    vq = torch.from_numpy(v).to(dtype).double().numpy()  # the vectors as the products saw them
    y = x.astype(np.float64) - shift.numpy()
    ref = vq @ y.T @ y
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    assert np.abs(acc.double().numpy() - ref).max() <= rtol * np.abs(ref).max()
    if dtype == torch.float64:
        np.testing.assert_allclose(csum.numpy(), y.sum(axis=0), rtol=0, atol=1e-12 * np.abs(y).sum())
        assert abs(float(ss) - (y * y).sum()) <= 1e-12 * (y * y).sum()
    else:  # float32: the sums ride along in the sgemm (a row of ones)
        np.testing.assert_allclose(csum.numpy(), y.sum(axis=0), rtol=0, atol=1e-5 * np.abs(y).sum(axis=0).max())
        assert ss is None
    again, _, _ = _thin_pass(torch.from_numpy(x), torch.from_numpy(v).to(dtype), shift, chunk_rows=50, sums=False)
    assert torch.equal(acc, again)  # fixed groups summed in order: independent of the thread schedule


def test_float32_data_meets_float64_accuracy_in_few_passes(seed):
    """float32 data: float32 Krylov passes for the vectors, a float64 pass for the values (1e-10 of lambda_max)."""
    rng = np.random.default_rng(seed)
    x = low_rank_plus_noise(rng, 6000, 400, rank=10, offset=0.5)
    ref = reference(x)
    threads = torch.get_num_threads()
    for top in (1, 10):
        s = spectrum(x, top=top, method="lanczos", seed=seed)
        assert s.converged and s.passes == s.n_iter <= 10
        assert abs(s.lambda_max - ref[0]) <= 1e-10 * ref[0]
        np.testing.assert_allclose(s.eigenvalues, ref[:top], rtol=0, atol=1e-10 * ref[0])
        assert abs(s.trace - np.var(x.astype(np.float64), axis=0).sum()) <= 1e-10 * s.trace
    assert torch.get_num_threads() == threads
