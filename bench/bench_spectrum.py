"""Benchmark of hcdiag.spectrum: accuracy against numpy float64 and cost in units measured in the same run.

Units: one read pass (a sweep converting the float32 data to float64, what every method does at
least once) and one float64 ``X^T X`` (numpy matmul of the centred float64 data, which is also the
oracle's covariance). Goals: ``auto`` at or below 0.55x (d=784) and 0.15x (d=3072) of one X^T X
within 10 passes; top-10 no slower than the better of exact and lanczos. Prints, never asserts.
Timings on a shared 2-core machine are noisy: read ratios, not seconds, and rerun when in doubt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np


def structured(n, d, rank=20, seed=0):
    """Low rank plus noise, float32 (n, d): eigenvalues ~ 16*[3..0.5]^2 over a noise floor 0.09."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, rank), dtype=np.float32)
    w = (rng.standard_normal((rank, d), dtype=np.float32) * np.linspace(3, 0.5, rank, dtype=np.float32)[:, None]
         * np.float32(4 / np.sqrt(d)))
    x = u @ w
    x += np.float32(0.3) * rng.standard_normal((n, d), dtype=np.float32)
    x += np.float32(0.5)
    return x


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def oracle(x):
    """(descending eigenvalues of the float64 covariance, seconds of its float64 X^T X)."""
    x64 = x.astype(np.float64)
    x64 -= x64.mean(axis=0)
    t0 = time.perf_counter()
    gram = x64.T @ x64
    t = time.perf_counter() - t0
    del x64
    return np.linalg.eigvalsh(gram / x.shape[0])[::-1], t


def read_pass(x):
    import torch

    from hcdiag.spectrum import _Rows, _default_chunk_rows

    rows = _Rows(x, torch.device("cpu"), _default_chunk_rows(x.shape[1], torch.device("cpu"), "krylov"),
                 memmapped=False)
    t = time.perf_counter()
    for _ in rows.chunks():
        pass
    return time.perf_counter() - t


def report(name, s, t, ref, t_pass, t_gram, top):
    rel = abs(s.lambda_max - ref[0]) / ref[0]
    topk = np.abs(s.eigenvalues[:top] - ref[:top]).max() / ref[0]
    print(f"  {name:<22} {s.method:<9} {t:7.2f} s  = {t / t_pass:6.1f} read passes = {t / t_gram:5.3f} X^T X   "
          f"passes {s.passes:4.0f}  rel.err lambda_max {rel:.1e}  top-{top} {topk:.1e}", flush=True)


def dense_case(n, d, goal, exact_rows=None):
    from hcdiag.spectrum import spectrum

    print(f"\n{n} x {d} float32, low rank + noise", flush=True)
    x = structured(n, d)
    ref, t_gram = oracle(x)
    t_pass = read_pass(x)
    print(f"  one read pass {t_pass:.3f} s; one float64 X^T X {t_gram:.2f} s (= {t_gram / t_pass:.0f} read passes)")
    t_eig = 0.0
    if exact_rows:
        import torch

        a = torch.from_numpy(np.cov(x[:2000].astype(np.float64), rowvar=False))
        t_eig = min(timed(lambda: torch.linalg.eigvalsh(a))[1] for _ in range(2))  # min: less noise to subtract
        print(f"  eigvalsh of one {d} x {d} matrix: {t_eig:.2f} s (exact = Gram, scaled from {exact_rows} rows, + this)")
    res = {}
    for top in (1, 10):
        for method in ("auto", "lanczos", "exact"):
            if method == "exact" and exact_rows:  # the Gram is linear in n: time a row block and scale it
                s, t = timed(lambda: spectrum(x[:exact_rows], top=top, method="exact"))
                t = (t - t_eig) * n / exact_rows + t_eig
                ref_sub = np.linalg.eigvalsh(np.cov(x[:exact_rows].astype(np.float64), rowvar=False, bias=True))[::-1]
                report(f"exact top={top} (~{n // exact_rows}x {exact_rows} rows)", s, t, ref_sub, t_pass, t_gram, top)
            else:
                # median of 3 warm runs: the first call also pays page faults and thread start-up
                runs = [timed(lambda: spectrum(x, top=top, method=method)) for _ in range(3)]
                s, t = runs[-1][0], float(np.median([r[1] for r in runs]))
                report(f"{method} top={top}", s, t, ref, t_pass, t_gram, top)
            res[(method, top)] = (t, s)
    t_auto, s_auto = res[("auto", 1)]
    print(f"  GOAL auto lambda_max <= {goal}x X^T X within 10 passes: {t_auto / t_gram:.3f}x, "
          f"{s_auto.passes:.0f} passes -> {'met' if t_auto / t_gram <= goal and s_auto.passes <= 10 else 'NOT met'}")
    best = min(res[("exact", 10)][0], res[("lanczos", 10)][0])
    print(f"  GOAL top-10 auto ({res[('auto', 10)][1].method}) no slower than best of exact/lanczos: "
          f"{res[('auto', 10)][0] / best:.2f}x the best -> {'met' if res[('auto', 10)][0] <= 1.1 * best else 'NOT met'}"
          " (10% timing noise allowed)")
    return x, t_pass


_WIDE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from hcdiag.spectrum import spectrum

    def status(key):  # kB -> bytes; VmHWM is this process's own peak (ru_maxrss inherits the parent's)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    x = np.load(sys.argv[1])
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    base = status("VmRSS")
    t = time.perf_counter()
    s = spectrum(x, top=5, method="lanczos")
    t = time.perf_counter() - t
    print(repr((s.lambda_max, [float(v) for v in s.eigenvalues], s.passes, t, base, status("VmHWM"))))
""")


def wide_case(n=2500, d=20_000):
    print(f"\nlanczos at {n} x {d} float32 (low rank + noise), in a subprocess for its peak memory", flush=True)
    x = structured(n, d, rank=10, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wide.npy")
        np.save(path, x)
        out = subprocess.run([sys.executable, "-c", _WIDE, path], capture_output=True, text=True)
    if out.returncode:
        print("  FAILED:", out.stderr.strip().splitlines()[-1])
        return
    lam, top, passes, t, base, peak = eval(out.stdout.strip().splitlines()[-1])
    # oracle: the nonzero spectrum of Xc^T Xc / n is that of the n x n Gram Xc Xc^T / n
    xc = x.astype(np.float64)
    xc -= xc.mean(axis=0)
    ref = np.linalg.eigvalsh(xc @ xc.T / n)[::-1]
    dd = 8 * d * d
    print(f"  {t:.2f} s, {passes:.0f} passes, rel.err lambda_max {abs(lam - ref[0]) / ref[0]:.1e}, "
          f"top-5 {np.abs(np.array(top) - ref[:5]).max() / ref[0]:.1e}")
    print(f"  peak memory above the loaded data: {(peak - base) / 2**20:.0f} MiB (float64 copy of the data "
          f"{8 * n * d / 2**20:.0f} MiB); one d x d float64 would be {dd / 2**20:.0f} MiB -> "
          f"{'no d x d allocated' if peak - base < dd else 'a d x d MAY have been allocated'}")


def streaming_case(x, t_pass):
    from hcdiag.spectrum import spectrum

    n, d = x.shape
    print(f"\nstreaming over a memory-mapped {n} x {d} .npy ({x.nbytes / 2**20:.0f} MiB), chunks of 4096 rows", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x)
        mm = np.load(path, mmap_mode="r")
        s, t = timed(lambda: spectrum(mm, top=10, chunk_rows=4096))
        ref = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False, bias=True))[::-1]
    print(f"  {s.method}: {t:.2f} s for {s.passes:.0f} pass = {t / t_pass:.1f}x one in-memory read pass "
          f"({x.nbytes / 2**20 / t:.0f} MiB/s), rel.err lambda_max {abs(s.lambda_max - ref[0]) / ref[0]:.1e}")


def main():
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; timings on shared cores are noisy")
    x784, t_pass = dense_case(60_000, 784, 0.55)
    streaming_case(x784, t_pass)
    del x784
    dense_case(50_000, 3072, 0.15, exact_rows=10_000)
    wide_case()


if __name__ == "__main__":
    main()
