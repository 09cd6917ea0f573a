"""Covariance spectrum of a data matrix at any scale (paper section 3.2, eq. 4).

The covariance is the paper's ``Sigma = E[(x - <x>)(x - <x>)^T]`` over the given rows, normalised
by ``1/n`` (the maximum-likelihood convention of ``np.cov(x, bias=True)``, NOT ``1/(n-1)``).
Eigenvalues are float64 whatever the input dtype: every product accumulates in float64.

Three methods, one code path on CPU and CUDA (torch does the heavy products, ``device=``):

- ``exact``: two passes (mean, then the centred d x d Gram in float64 chunks), then ``eigh``.
- ``lanczos``: matrix-free block Krylov (block Lanczos with full re-orthogonalisation and
  Rayleigh-Ritz). One read of the data applies ``Sigma`` to a whole block ``V`` of vectors as
  ``X^T (X V) / n - mu (mu^T V)`` (implicit centring); no d x d matrix is ever formed. On
  float32 data in memory the Krylov passes run in float32 (sgemm on the data as given, no
  copy) until the leading vectors are good to ~1e-6, then a float64 pass gives the Rayleigh-Ritz
  values (error quadratic in the vectors': float64 accuracy) and the error bounds; more float64
  passes follow only if those bounds miss ``tol``.
- ``streaming``: one pass over row chunks (a memmap is read once), float64 Gram and sums of the
  rows shifted by a provisional mean, then ``eigh``.

``auto`` picks ``exact`` when d is small or forming the Gram is cheaper than the Krylov products,
``lanczos`` for larger in-memory data, ``streaming`` for memory-mapped data with d <= 4096; the
choice is recorded in :attr:`Spectrum.method`.

>>> import numpy as np
>>> x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
>>> s = spectrum(x, top=2)
>>> [round(float(v), 12) for v in s.eigenvalues], s.trace
([1.0, 0.25], 1.25)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from hcdiag.errors import HcdiagWarning, InputError
from hcdiag.validation import as_data_matrix

METHODS = ("auto", "exact", "lanczos", "streaming")

# auto: d at or below this always uses the exact Gram (its d^3 eigensolve is negligible)
EXACT_MAX_D = 128
# auto: memory-mapped data with d above this goes to lanczos (the d x d Gram would be too big)
STREAMING_MAX_D = 4096
# lambda_max at or below this fraction of E||x||^2 is rounding noise: the data are constant
ZERO_REL = 1e-12

_MiB = 1 << 20
# lanczos on float32 in-memory data: a float32 phase (blocks of top + F32_BLOCK vectors: thin
# sgemm is flop-bound at d ~ 3000, so narrow blocks and a few more passes win) runs until the
# residuals are below F32_RESID * lambda_max; then float64 passes on its top + F64_WIDTH Ritz
# vectors finish (one suffices when the float32 vectors are good to ~1e-6: eigenvalue error
# quadratic in theirs)
F32_BLOCK = 7
F32_RESID = 1e-6
F64_WIDTH = 4
# bytes per row chunk of the thin products on CPU (float32 data read / float64 converted chunk):
# small enough to stay in cache, so both products and the conversion read memory once
F32_CHUNK_BYTES = 4 * _MiB
F64_CHUNK_BYTES = 2 * _MiB
# lanczos keeps a float64 copy of the (shifted) data when it is at most this big (GPU: 40% free)
CACHE_BYTES = 1536 * _MiB


class DecoderVarianceWarning(HcdiagWarning):
    """A decoder variance ``s2 = m * lambda_max`` lies inside the bootstrap CI of lambda_max.

    Then the data cannot tell whether ``s2`` is above or below lambda_max, i.e. on which side of
    the collapse threshold of eq. 4 the run sits.
    """


class SpectrumConvergenceWarning(HcdiagWarning):
    """The Krylov solver stopped at its pass limit before its error bound met ``tol``."""


@dataclass(frozen=True)
class Spectrum:
    """Top eigenvalues of the data covariance (1/n normalisation) and how they were obtained.

    eigenvalues : array of shape (top,), float64, descending (units: data units squared).
    lambda_max : the largest eigenvalue ``eigenvalues[0]``.
    trace : ``tr(Sigma)``, the total variance (sum of the per-feature variances).
    n, d : rows and features used.
    method : the method actually used (``exact`` | ``lanczos`` | ``streaming``).
    ci : bootstrap percentile interval ``(lo, hi)`` of lambda_max at ``ci_level``, or None.
    passes : read passes over the data (spectrum and bootstrap together).
    converged : whether every returned eigenvalue met its tolerance (always True for exact).
    n_iter : Krylov iterations (blocks applied) for lanczos, 1 for the direct methods.
    constant : lambda_max is 0 (constant data: lambda_max <= 1e-12 * E||x||^2).
    """

    eigenvalues: np.ndarray
    lambda_max: float
    trace: float
    n: int
    d: int
    method: str
    ci: tuple[float, float] | None
    ci_level: float
    bootstrap: int
    passes: float | None
    converged: bool
    n_iter: int
    device: str
    constant: bool = False
    error_bound: float | None = field(default=None)

    def to_dict(self) -> dict:
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "lambda_max": float(self.lambda_max),
            "trace": float(self.trace),
            "n": int(self.n),
            "d": int(self.d),
            "method": self.method,
            "ci": None if self.ci is None else [float(self.ci[0]), float(self.ci[1])],
            "ci_level": float(self.ci_level),
            "bootstrap": int(self.bootstrap),
            "passes": None if self.passes is None else float(self.passes),
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
            "device": self.device,
            "constant": bool(self.constant),
            "error_bound": None if self.error_bound is None else float(self.error_bound),
        }


# --------------------------------------------------------------------------------------------
# Reading the data: row chunks as float64 tensors on the device, shifted by a provisional mean
# --------------------------------------------------------------------------------------------

class _Rows:
    """Row chunks of ``x`` (n, d) as float64 tensors ``x[s:e] - c`` on ``device``.

    ``c`` (d,) is the mean of the first rows: subtracting any constant leaves Sigma unchanged and
    removes most of the cancellation in ``E[y y^T] - mu mu^T`` when the data sit far from 0.
    """

    def __init__(self, x: np.ndarray, device, chunk_rows: int, *, memmapped: bool, original=None):
        import torch

        self.x, self.device, self.n, self.d = x, device, int(x.shape[0]), int(x.shape[1])
        self.chunk_rows = max(1, min(int(chunk_rows), self.n))
        self.memmapped = memmapped
        self._base = None  # whole data as a torch tensor (no copy on CPU when possible)
        torch_ok = x.dtype in (np.float32, np.float64)
        if original is not None and getattr(original, "device", None) == device and not memmapped:
            self._base = original.detach()
        elif torch_ok and not memmapped and x.flags.writeable and x.flags.c_contiguous:
            base = torch.from_numpy(x)
            if device.type == "cuda" and x.nbytes > 0.4 * torch.cuda.mem_get_info(device)[0]:
                base = None  # too big for the GPU: stream chunks from host memory
            elif device.type == "cuda":
                base = base.to(device)
            self._base = base
        head = self._raw(0, min(self.n, 1024))
        self.shift = head.to(torch.float64).mean(dim=0)  # (d,)
        self._buf = None
        self._cache = None  # (n, d) float64 copy of x - shift, when it fits the budget
        self._filling = None  # the cache while its first sweep writes it

    def cache(self, budget_bytes: int) -> bool:
        """Keep ``x - shift`` in float64 on the device if it fits ``budget_bytes``: the next full
        sweep of :meth:`chunks` fills it (no extra pass), later sweeps read it and pay for the
        products only, not for reading and converting the data again."""
        import torch

        if self._cache is not None or self._filling is not None:
            return True
        need = 8 * self.n * self.d
        if self.device.type == "cuda":
            budget_bytes = min(budget_bytes, int(0.4 * torch.cuda.mem_get_info(self.device)[0]))
        if self.memmapped or need > budget_bytes:
            return False
        self._filling = torch.empty((self.n, self.d), dtype=torch.float64, device=self.device)
        return True

    def _raw(self, s: int, e: int):
        import torch

        if self._base is not None:
            return self._base[s:e]
        block = np.asarray(self.x[s:e])
        if block.dtype not in (np.float32, np.float64):
            block = block.astype(np.float64)
        return torch.from_numpy(np.array(block, copy=True)).to(self.device)

    def chunks(self, chunk_rows: int | None = None, shift=None):
        """Yield ``(s, e, y)`` with ``y = x[s:e] - shift`` of shape (e - s, d), float64."""
        import torch

        rows = self.chunk_rows if chunk_rows is None else max(1, min(int(chunk_rows), self.n))
        if self._cache is not None:
            delta = None if shift is None else shift - self.shift
            for s in range(0, self.n, rows):
                e = min(self.n, s + rows)
                yield s, e, (self._cache[s:e] if delta is None else self._cache[s:e] - delta)
            return
        fill = self._filling if shift is None else None
        shift = self.shift if shift is None else shift
        if fill is None and (self._buf is None or self._buf.shape[0] < rows):
            self._buf = torch.empty((rows, self.d), dtype=torch.float64, device=self.device)
        for s in range(0, self.n, rows):
            e = min(self.n, s + rows)
            y = fill[s:e] if fill is not None else self._buf[: e - s]
            y.copy_(self._raw(s, e))  # float32 -> float64 exactly (copy_ is the fast cast path)
            y.sub_(shift)
            yield s, e, y
        if fill is not None:
            self._cache, self._filling, self._buf = fill, None, None


def _thin_pass(x, vt, shift, *, chunk_rows: int, sums: bool):
    """One read of ``x`` (n, d) for ``acc = V^T Y^T Y`` with ``Y = x - 1 shift^T``, shape (b, d).

    vt : (b, d) the vectors as rows, in the dtype of the products: float32 runs sgemm on the
        float32 data as given (no copy); float64 converts cache-sized row chunks of ``x`` first.
    sums : also return the column sums of Y (d,) and ``sum Y^2`` (float64; else None). For float32
        products the sums come from the same sgemm (float32 accuracy) and ``sum Y^2`` is None.

    On CPU the chunks are split into a fixed number of contiguous groups, each summed in order
    (the result does not depend on the schedule), and the groups are taken by ``torch`` thread
    count workers that each run single-threaded BLAS on chunks that stay in cache: no worker
    waits for another inside a product, which on shared cores costs more than the products.
    """
    import threading

    import torch

    n, d = x.shape
    dt, dev = vt.dtype, vt.device
    f64 = dt == torch.float64
    shift = shift.to(dt)
    ones = sums and not f64  # float32: an extra row of (Y V)^T set to 1 sums the rows of Y in the same product
    if ones:
        vt = torch.cat([vt, torch.zeros((1, d), dtype=dt, device=dev)])
    c = None if f64 else vt @ shift  # (b,): (Y V)^T = (X V)^T - c 1^T
    if ones:
        c[-1] = -1.0
    starts = list(range(0, n, chunk_rows))
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    n_groups = min(len(starts), 4 * workers if workers > 1 else 1)
    bounds = np.linspace(0, len(starts), n_groups + 1).round().astype(int)
    parts = [None] * n_groups

    def group(k):
        acc = torch.zeros((vt.shape[0], d), dtype=dt, device=dev)
        psum = None if f64 else torch.zeros(vt.shape[0], dtype=dt, device=dev)
        csum = torch.zeros(d, dtype=torch.float64, device=dev) if sums else None
        ss = torch.zeros((), dtype=torch.float64, device=dev) if sums and f64 else None
        buf = torch.empty((chunk_rows, d), dtype=dt, device=dev) if f64 else None
        for s in starts[bounds[k]:bounds[k + 1]]:
            e = min(n, s + chunk_rows)
            if f64:
                y = buf[: e - s]
                y.copy_(x[s:e])  # float32 -> float64 exactly
                y.sub_(shift)
                pt = vt @ y.mT  # (b, r)
                if sums:
                    csum += y.sum(dim=0)
                    flat = y.reshape(-1)
                    ss += flat @ flat
            else:
                y = x[s:e]
                pt = vt @ y.mT
                pt -= c[:, None]
                psum += pt.sum(dim=1)
            acc.addmm_(pt, y)
        if not f64:  # (Y V)^T Y = (Y V)^T X - (1^T Y V)^T shift^T
            acc -= psum[:, None] * shift[None, :]
            if ones:
                acc, csum = acc[:-1], acc[-1].to(torch.float64)
        parts[k] = (acc, csum, ss)

    if workers == 1:
        for k in range(n_groups):
            group(k)
    else:
        threads = torch.get_num_threads()
        todo = iter(range(n_groups))
        lock, errors = threading.Lock(), []

        def work():
            torch.set_num_threads(1)
            try:
                while True:
                    with lock:
                        k = next(todo, None)
                    if k is None:
                        return
                    group(k)
            except BaseException as err:  # re-raised in the calling thread
                errors.append(err)

        pool = [threading.Thread(target=work) for _ in range(workers)]
        try:
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        finally:
            torch.set_num_threads(threads)
        if errors:
            raise errors[0]
    acc = parts[0][0].clone()
    for part in parts[1:]:
        acc += part[0]
    if not sums:
        return acc, None, None
    csum = parts[0][1].clone()
    for part in parts[1:]:
        csum += part[1]
    return acc, csum, sum(p[2] for p in parts[1:]) + parts[0][2] if f64 else None


class _CovOperator:
    """``V -> Sigma_g V`` for a batch of G covariances (bootstrap weights) without forming Sigma.

    With weights ``w`` (n, G) summing to n per column (row counts of a bootstrap resample):
    ``Sigma_g = (1/n) sum_i w_ig y_i y_i^T - mu_g mu_g^T``, ``mu_g = (1/n) sum_i w_ig y_i``.
    One call reads the data once; the first call also accumulates the means (and the sum of
    squares for the trace), so no separate pass is needed for the centring.
    """

    def __init__(self, rows: _Rows, weights=None, chunk_rows: int | None = None):
        self.rows, self.weights, self.chunk_rows = rows, weights, chunk_rows
        self.mu = None  # (d, G) mean of the shifted rows
        self.sumsq = None
        self.passes = 0

    def __call__(self, v):
        import torch

        g, d, b = v.shape  # (G, d, b)
        n = self.rows.n
        # vectors as rows: BLAS runs the thin products V^T Y^T and P^T Y several times faster
        vt = v.mT.reshape(g * b, d)  # (G*b, d)
        first = self.mu is None
        rows = self.rows
        if (self.chunk_rows is not None and self.weights is None and rows._base is not None
                and rows._cache is None and rows._filling is None):  # in-memory data, read once, no copy kept
            acc, s, ss = _thin_pass(rows._base, vt, rows.shift, chunk_rows=self.chunk_rows,
                                    sums=first)
            if first:
                self.mu, self.sumsq = (s[None, :] / n).mT, ss
            return self._finish(acc, v)
        ones = first and self.weights is None  # an extra row of P^T set to 1 sums the rows in the same product
        if ones:
            vt = torch.cat([vt, torch.zeros((1, d), dtype=vt.dtype, device=vt.device)])
        acc = torch.zeros((vt.shape[0], d), dtype=torch.float64, device=v.device)
        if first:
            s = torch.zeros((g, d), dtype=torch.float64, device=v.device)
            ss = torch.zeros((), dtype=torch.float64, device=v.device)
        for s0, e0, y in self.rows.chunks(self.chunk_rows):
            pt = vt @ y.mT  # (G*b[+1], r)
            if self.weights is not None:
                wt = self.weights[s0:e0].mT  # (G, r)
                pt = (pt.view(g, b, -1) * wt[:, None, :]).view(g * b, -1)
                if first:
                    s.addmm_(wt, y)
            elif first:
                pt[-1] = 1.0
                flat = y.reshape(-1)
                ss += flat @ flat
            acc.addmm_(pt, y)  # (X^T (X V))^T: the same chunk serves both products
        if ones:
            s, acc = acc[-1:], acc[:-1]
        if first:
            self.mu, self.sumsq = (s / n).mT, ss  # mu: (d, G)
        return self._finish(acc, v)

    def _finish(self, acc, v):
        g, d, b = v.shape
        n = self.rows.n
        self.passes += 1
        mu = self.mu.mT[:, :, None]  # (G, d, 1)
        av = acc.view(g, b, d).mT / n - mu @ (mu.mT @ v)  # (G, d, b)
        return av.contiguous()


class _Cov32Operator:
    """``V -> Sigma V`` in float32 products on in-memory float32 data ``x`` (n, d), no copy of it.

    The cheap phase of lanczos: sgemm reads half the bytes of a float64 pass and runs at about
    twice the flop rate, but carries rounding errors of order 1e-7 * ||Sigma||, so it only
    serves to find the leading eigenvectors; a float64 pass (:class:`_CovOperator`) then gives
    the eigenvalues (error quadratic in the vectors' error). Centring is implicit, by the shift
    ``c`` of :class:`_Rows`: ``Sigma V = (X - 1 c^T)^T (X - 1 c^T) V / n - (m - c)(m - c)^T V``.
    """

    def __init__(self, rows: _Rows, chunk_rows: int | None = None):
        self.x = rows._base  # (n, d) float32 tensor on the device
        self.n = rows.n
        self.shift = rows.shift  # (d,) float64
        self.dmu = None  # (d,) float32 column mean minus shift
        self.passes = 0
        big = rows.device.type != "cpu"  # GPU: one product over all rows; CPU: cache-sized chunks
        self.chunk_rows = chunk_rows or (self.n if big else max(64, F32_CHUNK_BYTES // (4 * rows.d)))

    def __call__(self, v):
        import torch

        g, d, b = v.shape  # (1, d, b) float64
        vt = v[0].mT.to(torch.float32).contiguous()  # (b, d): vectors as rows, the fast BLAS layout
        first = self.dmu is None
        acc, csum, _ = _thin_pass(self.x, vt, self.shift, chunk_rows=self.chunk_rows, sums=first)
        if first:
            self.dmu = (csum / self.n).to(torch.float32)  # column mean minus shift
        av = acc / self.n - (vt @ self.dmu)[:, None] * self.dmu[None, :]  # (b, d)
        self.passes += 1
        return av.mT[None].to(torch.float64)


# --------------------------------------------------------------------------------------------
# Block Krylov eigensolver (pure numerical kernel)
# --------------------------------------------------------------------------------------------

def _orthonormalize(q, z, rng):
    """Orthonormal basis of ``z`` (G, d, b) orthogonal to ``q`` (G, d, m); CGS2 + QR.

    Columns that are (numerically) inside span(q, z's other columns) are replaced by random
    directions, so the basis always has b columns (requires m + b <= d).
    """
    import torch

    g, d, b = z.shape
    for _ in range(4):
        z0 = z.norm(dim=1)  # (G, b)
        for _ in range(2):
            if q is not None and q.shape[-1]:
                z = z - q @ (q.mT @ z)
        qz, rz = torch.linalg.qr(z)
        if q is not None and q.shape[-1]:
            qz = qz - q @ (q.mT @ qz)
            qz, r2 = torch.linalg.qr(qz)
            rz = r2 @ rz
        diag = rz.diagonal(dim1=-2, dim2=-1).abs()  # (G, b)
        bad = (diag <= 1e-10 * z0) | (z0 == 0) | ~torch.isfinite(diag)
        if not bool(bad.any()):
            return qz
        fresh = torch.from_numpy(rng.standard_normal((g, d, b))).to(z)
        z = torch.where(bad[:, None, :], fresh, qz)
    return qz


@dataclass(frozen=True)
class _KrylovResult:
    values: object  # (G, k) descending
    vectors: object  # (G, d, nr) Ritz vectors of the largest Ritz values
    error: object  # (G, k) error bounds
    converged: object  # (G,) bool
    n_iter: int


def _block_krylov(apply, d: int, batch: int, *, top: int, block: int, tol: float, max_iter: int,
                  rng, device, start=None, max_basis: int | None = None, init=None,
                  resid_tol: float | None = None) -> _KrylovResult:
    """Largest ``top`` eigenvalues of ``batch`` symmetric PSD operators given only ``apply``.

    apply : maps V of shape (G, d, b) to ``A_g V_g`` of shape (G, d, b); one call = one data pass.
    Block Lanczos with full re-orthogonalisation: the basis Q (G, d, m) and W = A Q are kept, so
    the projected matrix ``H = Q^T W`` and every Ritz residual ``W y - theta Q y`` are exact (no
    recurrence drift). The next block is the residual block of the leading Ritz vectors, which
    spans the next block-Krylov direction. Stops when every wanted Ritz value's error bound
    ``min(|r|, |r|^2 / gap)`` (Kato-Temple, gap against the neighbours' inclusion intervals) is
    at most ``tol * theta_1``, when Q spans all of R^d, or after ``max_iter`` applications.

    init : optional (G, d, c) starting basis (e.g. Ritz vectors from a cheaper solve); it replaces
        the random start block and may be wider than ``block``.
    resid_tol : if given, stop instead when every wanted residual ``|A u - theta u|`` is at most
        ``resid_tol * theta_1`` (a vector-accuracy target for the float32 phase, whose operator
        carries rounding errors of order 1e-7 that no eigenvalue bound can go below), or when three
        iterations did not halve the largest such residual (its rounding floor is reached).
    """
    import torch

    if torch.device(device).type != "cpu":
        return _block_krylov_impl(apply, d, batch, top=top, block=block, tol=tol, max_iter=max_iter, rng=rng,
                                  device=device, start=start, max_basis=max_basis, init=init, resid_tol=resid_tol)
    # the small dense steps (QR, eigh, d x m products) run on one thread: on shared cores a parallel
    # region of microseconds can wait a whole scheduler slice for its second thread; the data
    # passes (apply) keep every thread
    threads = torch.get_num_threads()

    def apply_all_threads(v):
        torch.set_num_threads(threads)
        try:
            return apply(v)
        finally:
            torch.set_num_threads(1)

    torch.set_num_threads(1)
    try:
        return _block_krylov_impl(apply_all_threads, d, batch, top=top, block=block, tol=tol, max_iter=max_iter,
                                  rng=rng, device=device, start=start, max_basis=max_basis, init=init,
                                  resid_tol=resid_tol)
    finally:
        torch.set_num_threads(threads)


def _block_krylov_impl(apply, d, batch, *, top, block, tol, max_iter, rng, device, start, max_basis, init,
                       resid_tol) -> _KrylovResult:
    import torch

    b = min(block, d)
    max_basis = d if max_basis is None else max(min(max_basis, d), min(d, b + top + b))
    if init is not None:
        q = _orthonormalize(None, init.to(device=device, dtype=torch.float64), rng)
    else:
        v = torch.from_numpy(rng.standard_normal((batch, d, b))).to(device)
        if start is not None:
            k0 = min(start.shape[-1], b)
            v[:, :, :k0] = start[..., :k0].to(v)
        q = _orthonormalize(None, v, rng)
    w = apply(q)
    h = q.mT @ w
    it, history = 1, []
    while True:
        h = 0.5 * (h + h.mT)
        theta, y = torch.linalg.eigh(h)  # ascending
        theta, y = theta.flip(-1), y.flip(-1)
        m = q.shape[-1]
        k = min(top, m)
        nr = min(m, max(k, b) + 1)
        yr = y[..., :nr]
        qy = q @ yr  # (G, d, nr) Ritz vectors
        r = w @ yr - qy * theta[:, None, :nr]  # residuals A u - theta u
        rn = r.norm(dim=1)  # (G, nr)
        scale = theta[:, :1].abs()  # (G, 1)
        diff = (theta[:, :k, None] - theta[:, None, :nr]).abs() - rn[:, None, :]  # (G, k, nr)
        eye = torch.eye(k, nr, dtype=torch.bool, device=diff.device)
        gap = diff.masked_fill(eye, math.inf).amin(dim=-1) if nr > 1 else torch.full_like(rn[:, :k], math.inf)
        rk = rn[:, :k]
        quad = torch.where(gap > rk, rk * rk / gap.clamp_min(1e-300), rk)
        err = torch.minimum(rk, quad)
        full = m >= d
        if resid_tol is None:
            conv = (err <= tol * scale).all(dim=1) | full
        else:
            conv = (rk <= resid_tol * scale).all(dim=1) | full
            history.append(float((rk / scale).max()))
        # a residual floor (inexact operator): stop when 3 steps did not halve the residual
        stalled = len(history) > 3 and history[-1] > 0.5 * history[-4]
        if bool(conv.all()) or it >= max_iter or stalled:
            break
        b_new = min(b, d - m)
        z = r[..., :b_new]
        if m + b_new > max_basis:  # thick restart: keep the leading Ritz vectors (A Q y = W y, exact)
            keep = max_basis - b_new
            yk = y[..., :keep]
            q, w, h = q @ yk, w @ yk, torch.diag_embed(theta[:, :keep])
        zq = _orthonormalize(q, z, rng)
        wz = apply(zq)
        c = q.mT @ wz  # (G, m, b_new)
        dz = zq.mT @ wz  # (G, b_new, b_new)
        h = torch.cat([torch.cat([h, c], -1), torch.cat([c.mT, dz], -1)], -2)
        q = torch.cat([q, zq], -1)
        w = torch.cat([w, wz], -1)
        it += 1
    return _KrylovResult(theta[:, :k], qy, err, conv, it)


# --------------------------------------------------------------------------------------------
# Direct methods: the d x d Gram in float64
# --------------------------------------------------------------------------------------------

def _gram_covariance(rows: _Rows, *, two_pass: bool, chunk_rows: int):
    """Sigma (d, d) float64 from row chunks: ``(1/n) sum (y - mu)(y - mu)^T``.

    ``two_pass`` (exact): a first pass computes the mean, the second the centred Gram.
    Otherwise (streaming): one pass of Gram and sums of the shifted rows, then
    ``Sigma = G/n - mu mu^T`` (the shift keeps the cancellation small). Returns (Sigma, passes).
    """
    import torch

    n, d, dev = rows.n, rows.d, rows.device
    shift, passes = rows.shift, 0
    if two_pass:
        s = torch.zeros(d, dtype=torch.float64, device=dev)
        for _, _, y in rows.chunks(chunk_rows):
            s += y.sum(dim=0)
        shift, passes = rows.shift + s / n, 1
    g = torch.zeros((d, d), dtype=torch.float64, device=dev)
    s = torch.zeros(d, dtype=torch.float64, device=dev)
    # Gram by row panels of its upper triangle: 2 panels do 3/4 of the flops of y^T y (no syrk in torch)
    edges = [0, d // 2, d] if d >= 256 else [0, d]
    for _, _, y in rows.chunks(chunk_rows, shift=shift):
        for a0, a1 in zip(edges[:-1], edges[1:]):
            g[a0:a1, a0:].addmm_(y[:, a0:a1].mT, y[:, a0:])
        s += y.sum(dim=0)
    g = torch.triu(g) + torch.triu(g, 1).mT
    mu = s / n
    sigma = g / n - torch.outer(mu, mu)
    return 0.5 * (sigma + sigma.mT), passes + 1


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InputError(f"The '{name}' parameter must be an int >= {minimum}. Got {value!r}.")
    return int(value)


def _default_chunk_rows(d: int, device, purpose: str) -> int:
    # big chunks: fewer, fatter BLAS calls (small chunks suffer most when cores are shared)
    if device.type == "cuda":
        return max(1024, (256 * _MiB) // (8 * d))
    return max(1024, (64 * _MiB) // (8 * d))


def _block_size(top: int, d: int) -> int:
    return min(d, max(24, top + 16))  # per-pass cost grows slowly with b: fewer, wider passes


def _choose(method: str, n: int, d: int, top: int, memmapped: bool) -> str:
    if method != "auto":
        return method
    if memmapped:  # one read of the file beats several
        return "streaming" if d <= STREAMING_MAX_D else "lanczos"
    if d <= EXACT_MAX_D:
        return "exact"
    # flop model: Gram 2 n d^2 + eigensolve ~ 10 d^3, against ~10 block products of 4 n d b
    exact_cost = 2.0 * n * d * d + 10.0 * d ** 3
    lanczos_cost = 4.0 * n * d * _block_size(top, d) * 10
    return "exact" if exact_cost <= lanczos_cost else "lanczos"


def spectrum(x, *, top: int = 10, method: str = "auto", device="auto", bootstrap: int = 0,
             ci_level: float = 0.95, seed: int = 0, chunk_rows: int | None = None,
             tol: float = 1e-12) -> Spectrum:
    """Top eigenvalues of the data covariance ``Sigma = (1/n) sum (x - xbar)(x - xbar)^T``.

    x : array of shape (n, N) (numpy, np.memmap, or torch tensor); any real dtype, accumulated in
        float64. Rows with NaN/inf are refused (see :func:`hcdiag.validation.as_data_matrix`).
    top : how many eigenvalues to return (capped at N).
    method : ``auto`` | ``exact`` | ``lanczos`` | ``streaming`` (see the module docstring).
    device : ``auto`` | ``cpu`` | ``cuda``; the same code runs on both.
    bootstrap : B > 0 resamples rows with replacement B times (seeded) and gives the percentile
        interval of lambda_max at ``ci_level``.
    chunk_rows : rows per chunk read (default: sized to the cache / GPU).
    tol : lanczos stops when every returned eigenvalue's error bound is <= ``tol * lambda_max``.

    Returns a :class:`Spectrum`. Rounding-level negative eigenvalues are reported as 0; when
    lambda_max <= 1e-12 * E||x||^2 the data count as constant (``constant=True``, all eigenvalues
    and the trace 0).
    """
    import torch

    from hcdiag.device import resolve_device

    top = _check_int(top, "top", 1)
    if method not in METHODS:
        raise InputError(f"The 'method' parameter must be one of {', '.join(METHODS)}. Got {method!r}.")
    bootstrap = _check_int(bootstrap, "bootstrap", 0)
    if not (isinstance(ci_level, (int, float)) and 0.0 < float(ci_level) < 1.0):
        raise InputError(f"The 'ci_level' parameter must be a float in (0, 1). Got {ci_level!r}.")
    if bootstrap == 1:
        raise InputError("The 'bootstrap' parameter must be 0 (no CI) or at least 2 resamples. Got 1.")
    if chunk_rows is not None:
        chunk_rows = _check_int(chunk_rows, "chunk_rows", 1)
    if not (isinstance(tol, (int, float)) and 0.0 < float(tol) < 1.0):
        raise InputError(f"The 'tol' parameter must be a float in (0, 1). Got {tol!r}.")
    seed = _check_int(seed, "seed", 0)
    dev = resolve_device(device)

    original = x if isinstance(x, torch.Tensor) else None
    memmapped = isinstance(x, np.memmap)
    x, _ = as_data_matrix(x, name="data")
    memmapped = memmapped or isinstance(x, np.memmap)
    if original is not None and (original.ndim != 2 or not original.dtype.is_floating_point):
        original = None
    n, d = x.shape
    top = min(top, d)
    chosen = _choose(method, n, d, top, memmapped)
    krylov_rows = chunk_rows or _default_chunk_rows(d, dev, "krylov")
    gram_rows = chunk_rows or _default_chunk_rows(d, dev, "gram")
    rows = _Rows(x, dev, krylov_rows, memmapped=memmapped, original=original)
    rng = np.random.default_rng([seed, 0])

    def run_lanczos(max_iter):
        b = _block_size(top, d)
        init, p32, it32 = None, 0, 0
        b32 = min(d, top + F32_BLOCK)
        if rows._base is not None and rows._base.dtype == torch.float32 and d > 2 * b32:
            # float32 phase: the leading vectors from sgemm passes over the data as given (no copy)
            op32 = _Cov32Operator(rows, chunk_rows)
            res32 = _block_krylov(op32, d, 1, top=top, block=b32, tol=tol, max_iter=max(1, max_iter // 2),
                                  rng=rng, device=dev, resid_tol=F32_RESID,
                                  max_basis=max(3 * b32 + top, min(40 * b32, (256 * _MiB) // (16 * d))))
            init, p32, it32 = res32.vectors[..., :top + F64_WIDTH], op32.passes, res32.n_iter
            max_iter = max(1, max_iter - p32)
        op = _CovOperator(rows, chunk_rows=None if init is None or dev.type != "cpu"
                          else chunk_rows or max(64, F64_CHUNK_BYTES // (8 * d)))
        if init is None:
            rows.cache(CACHE_BYTES)
            apply = op
        else:  # the float64 check usually suffices: cache the data only once a second pass is needed

            def apply(v):
                if op.passes == 1:  # from now on: fill / read the float64 copy in big chunks
                    rows.cache(CACHE_BYTES)
                    op.chunk_rows = None
                return op(v)
        res = _block_krylov(apply, d, 1, top=top, block=b, tol=tol, max_iter=max_iter, rng=rng, device=dev,
                            max_basis=max(3 * b + top, min(40 * b, (256 * _MiB) // (16 * d))), init=init)
        vals = res.values[0].cpu().numpy()
        trace = float(op.sumsq / n - (op.mu[:, 0] ** 2).sum())
        return vals, res.vectors[:, :, :top], trace, op.passes + p32, bool(res.converged[0]), \
            res.n_iter + it32, float(res.error[0].max())

    passes, err_bound = 0.0, None
    if chosen == "lanczos":
        budget = 300
        if method == "auto":  # never pay more than about one exact solve before falling back to it
            budget = max(10, int(math.ceil((2.0 * n * d * d + 10.0 * d ** 3) / (4.0 * n * d * _block_size(top, d)))))
        vals, vecs, trace, p, converged, n_iter, err_bound = run_lanczos(budget)
        passes += p
        if not converged and method == "auto":
            chosen = "exact"
        elif not converged:
            warnings.warn(SpectrumConvergenceWarning(
                f"lanczos stopped after {n_iter} iterations with error bound {err_bound:.3g} * lambda_max "
                f"above tol={tol:g}; raise tol or use method='exact'."), stacklevel=2)
    if chosen in ("exact", "streaming"):
        sigma, p = _gram_covariance(rows, two_pass=chosen == "exact", chunk_rows=gram_rows)
        passes += p
        evals = torch.linalg.eigvalsh(sigma)
        if bootstrap:  # leading eigenvectors to warm-start the resamples: a few cheap dense Krylov steps
            res = _block_krylov(lambda v: sigma @ v, d, 1, top=4, block=min(d, 8), tol=1e-8, max_iter=50,
                                rng=rng, device=dev)
            vecs = res.vectors
        vals = evals.flip(-1)[:top].cpu().numpy()
        trace = float(torch.trace(sigma))
        converged, n_iter, err_bound = True, 1, None
        del sigma

    # constant data: lambda_max at rounding level of the data's mean squared norm E||x||^2
    scale = max(trace, 0.0) + float((rows.shift.double() ** 2).sum())
    vals = np.sort(np.clip(np.asarray(vals, dtype=np.float64), 0.0, None))[::-1].copy()  # rounding negatives
    constant = bool(vals[0] <= ZERO_REL * scale)
    if constant:
        vals[:], trace = 0.0, 0.0
    trace = max(trace, 0.0)
    lam = float(vals[0])

    ci = None
    if bootstrap and not constant:
        boot, p = _bootstrap_lambda_max(rows, vecs, bootstrap, seed=seed, tol=max(tol, 1e-10))
        passes += p
        lo, hi = np.percentile(boot, [50.0 * (1.0 - ci_level), 50.0 * (1.0 + ci_level)])
        ci = (float(lo), float(hi))
    elif bootstrap:
        ci = (0.0, 0.0)
    return Spectrum(eigenvalues=vals, lambda_max=lam, trace=float(trace), n=int(n), d=int(d), method=chosen,
                    ci=ci, ci_level=float(ci_level), bootstrap=bootstrap, passes=float(passes),
                    converged=bool(converged), n_iter=int(n_iter), device=str(dev), constant=constant,
                    error_bound=err_bound)


def _bootstrap_lambda_max(rows: _Rows, start, replicates: int, *, seed: int, tol: float):
    """lambda_max of ``replicates`` row resamples (with replacement), batched so one read of the
    data serves a whole group of resamples. Warm-started from the full data's leading
    eigenvectors ``start`` (1, d, k). Returns (values (B,), passes)."""
    import torch

    n, d, dev = rows.n, rows.d, rows.device
    rng = np.random.default_rng([seed, 1])
    b = min(d, 4)
    basis = min(d, 12 * b)
    group = int(max(1, min(replicates, (128 * _MiB) // (8 * (2 * d * basis + n)))))
    out, passes = [], 0
    for g0 in range(0, replicates, group):
        g = min(group, replicates - g0)
        counts = np.stack([np.bincount(rng.integers(0, n, size=n), minlength=n) for _ in range(g)], axis=1)
        weights = torch.from_numpy(counts.astype(np.float64)).to(dev)  # (n, G)
        op = _CovOperator(rows, weights)
        res = _block_krylov(op, d, g, top=1, block=b, tol=tol, max_iter=60, rng=rng, device=dev,
                            start=start.expand(g, -1, -1), max_basis=basis)
        out.append(res.values[:, 0].cpu().numpy())
        passes += op.passes
    return np.concatenate(out), passes


def lambda_max(x, **kw) -> float:
    """The largest eigenvalue of the data covariance (1/n normalisation); ``kw`` as :func:`spectrum`.

    >>> lambda_max([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]], top=1)
    1.0
    """
    kw.setdefault("top", 1)
    return spectrum(x, **kw).lambda_max


def decoder_variances(lambda_max, multiples, ci=None) -> list[dict]:
    """Decoder variances ``s2 = m * lambda_max`` for each multiple m (paper 5.4: s2 = 2, 5, 10 lambda_max).

    ci : optional ``(lo, hi)`` bootstrap interval of lambda_max. A row whose s2 lies inside it
    gets ``inside_ci=True`` and a :class:`DecoderVarianceWarning` (the data do not tell on which
    side of lambda_max, the collapse threshold of eq. 4, that s2 lies); without a CI it is None.

    >>> decoder_variances(2.0, [0.5, 2])
    [{'multiple': 0.5, 's2': 1.0, 'inside_ci': None}, {'multiple': 2.0, 's2': 4.0, 'inside_ci': None}]
    """
    try:
        lam = float(lambda_max)
    except (TypeError, ValueError):
        raise InputError(f"The 'lambda_max' parameter must be a float >= 0. Got {lambda_max!r}.") from None
    if not math.isfinite(lam) or lam < 0:
        raise InputError(f"The 'lambda_max' parameter must be a finite float >= 0. Got {lambda_max!r}.")
    if lam == 0.0:
        raise InputError("lambda_max is 0 (constant data), so multiples of it are undefined as decoder variances; "
                         "check the data or set s2 directly.")
    if np.isscalar(multiples):
        multiples = [multiples]
    ms = []
    for m in multiples:
        try:
            mf = float(m)
        except (TypeError, ValueError):
            mf = float("nan")
        if not (math.isfinite(mf) and mf > 0):
            raise InputError(f"The 'multiples' parameter must hold floats > 0. Got {m!r}.")
        ms.append(mf)
    if ci is not None:
        lo, hi = (float(c) for c in ci)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise InputError(f"The 'ci' parameter must be a finite interval (lo, hi) with lo <= hi. Got {ci!r}.")
    rows = []
    for m in ms:
        s2 = m * lam
        inside = None if ci is None else bool(lo <= s2 <= hi)
        if inside:
            warnings.warn(DecoderVarianceWarning(
                f"s2 = {m:g} * lambda_max = {s2:.6g} lies inside the CI [{lo:.6g}, {hi:.6g}] of lambda_max: the data "
                "cannot tell whether s2 is above or below lambda_max; pick a multiple farther from 1."), stacklevel=2)
        rows.append({"multiple": m, "s2": s2, "inside_ci": inside})
    return rows
