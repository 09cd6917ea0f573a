"""Assertions for researchers' own CI, and the items of the pytest plugin.

After training, :func:`assert_barrier` runs the barrier checks on a run file. Before any training,
two assertions test the theorems' preconditions on a config and a data set:

* :func:`assert_phase_precondition`: the decoder variance ``s2`` lies below lambda_max of the data by a
  stated margin (the phase transition, paper 3.2; claims.md "Phase transition"), with the KL and active
  dimensions the linear VAE's closed form would reach.
* :func:`assert_exclusion_precondition`: ``delta*(S) > eps (1 + tau)`` for a set S of clusterings, so that
  no collapsed (constant-output) model fits inside ``F_T = {L_S <= eps}`` (Theorem 4.4; claims.md T2).

Each raises ``AssertionError`` with one paragraph of numbers when the precondition fails (and
:class:`hcdiag.errors.InputError` for bad arguments) and returns a named result when it holds;
:func:`phase_precondition` and :func:`exclusion_precondition` return the same result without raising.

>>> from hcdiag.testing import assert_barrier            # doctest: +SKIP
>>> assert_barrier("run.pt", require=["N1", "T4"])      # doctest: +SKIP
>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(2000, 4)) * [3.0, 1.0, 1.0, 1.0]
>>> assert_phase_precondition(x, multiple=0.5, latent_dim=2).n_active
1
>>> cents = np.array([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 2.0], [4.0, -2.0]]])  # (R, K, N)
>>> assert_exclusion_precondition(cents, eps=1e-4).delta_star
1.0
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from hcdiag.checks.barrier import parse_ids, run_checks
from hcdiag.errors import InputError


def _fmt_values(values: dict) -> str:
    from hcdiag.formats import to_jsonable

    scal = {k: v for k, v in to_jsonable(values).items() if isinstance(v, (int, float, str, bool)) or v is None}
    return json.dumps(scal)


def assert_barrier(run, *, require=None, tolerance: float = 0.05, device="cpu", allow_inconclusive: bool = False):
    """Run the checks in ``require`` (default all) on ``run`` (a path, dict or ``Run``) and raise
    ``AssertionError`` listing every check that fails (or is inconclusive, unless allowed), with its
    numbers. Returns the results when all hold."""
    ids = parse_ids(require, "require") if require is not None else None
    results = run_checks(run, select=ids, tolerance=tolerance, device=device)
    bad = [r for r in results if r.verdict == "fails" or (r.verdict == "inconclusive" and not allow_inconclusive)]
    if bad:
        lines = [f"{len(bad)} barrier check(s) did not hold (tau = {tolerance:g}):"]
        for r in bad:
            lines.append(f"  {r.id} {r.verdict}: {r.summary or r.reason} | {_fmt_values(r.values)}")
        raise AssertionError("\n".join(lines))
    return results


class BarrierItem(pytest.Item):
    """One check of one run file as a test item: pass (holds), fail (fails), skip (inconclusive)."""

    def __init__(self, *, result, run_path, **kw):
        super().__init__(**kw)
        self.result = result
        self.run_path = run_path

    def runtest(self):
        r = self.result
        if r.verdict == "inconclusive":
            pytest.skip(f"{r.id} inconclusive: {r.reason}")
        if r.verdict == "fails":
            raise AssertionError(f"{r.id} fails: {r.summary} | {_fmt_values(r.values)}")

    def reportinfo(self):
        return self.run_path, None, f"hcdiag {self.result.id}: {self.result.claim}"

    def repr_failure(self, excinfo, style=None):
        return str(excinfo.value)


class RunFileCollector(pytest.Collector):
    def __init__(self, *, run_path, tolerance, require, **kw):
        super().__init__(**kw)
        self.run_path, self.tolerance, self.require = run_path, tolerance, require

    def collect(self):
        ids = parse_ids(self.require, "require") if self.require else None
        for r in run_checks(self.run_path, select=ids, tolerance=self.tolerance):
            yield BarrierItem.from_parent(self, name=r.id, result=r, run_path=self.run_path)


def collect_items(session, runs, *, tolerance=0.05, require=None) -> list:
    """The items of ``pytest --hcdiag-run RUN``: one per check per run file."""
    items = []
    for path in runs:
        col = RunFileCollector.from_parent(session, name=f"hcdiag[{path}]", run_path=path, tolerance=tolerance,
                                           require=require)
        items.extend(col.collect())
    return items


# ---------------------------------------------------------------------------------------------------
# preconditions before any training: the phase transition and Theorem 4.4's exclusion

def _g(v: float) -> str:
    return f"{v:.4g}"


def _finite(value, name: str, *, low: float, high: float | None = None, open_low: bool = False) -> float:
    """``value`` as a float in [low, high) (``(low, ...`` with ``open_low``), else InputError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v) and (v > low if open_low else v >= low) and (high is None or v < high)
    if isinstance(value, bool) or not ok:
        span = f"{'>' if open_low else '>='} {low:g}" if high is None else \
            f"in {'(' if open_low else '['}{low:g}, {high:g})"
        raise InputError(f"The '{name}' parameter must be a finite float {span}. Got {value!r}.")
    return v


def _matrix(data, load_options):
    """(x, label): a data matrix from an array, a tensor, a ``Dataset`` or a name/path for ``hcdiag.data.load``."""
    import os

    from hcdiag.data import Dataset, load

    if load_options is not None and not isinstance(load_options, dict):
        raise InputError(f"The 'load_options' parameter must be a dict of options for hcdiag.data.load. "
                         f"Got {load_options!r}.")
    if isinstance(data, (str, os.PathLike)):
        ds = load(data, **(load_options or {}))
        return ds.x, ds.name
    if load_options:
        raise InputError("The 'load_options' parameter applies only to a dataset name or path, not to an array; "
                         "drop it.")
    if isinstance(data, Dataset):
        return data.x, data.name
    if data is None:
        raise InputError("The 'data' parameter is required: an array of shape (n, N), a Dataset, or a dataset name "
                         "or path that hcdiag.data.load understands.")
    return data, "the array"


@dataclass(frozen=True)
class PhasePrecondition:
    """Whether the decoder variance ``s2`` lies below lambda_max of the data (the phase transition).

    ``outcome`` is ``holds``, ``collapses`` (``s2 >= lambda_max``: the linear VAE's KL is 0),
    ``within-margin`` (below lambda_max but above ``s2_max = (1 - margin) lambda_max``),
    ``collapsed-kl`` (the closed-form KL is below ``hcdiag.paper.COLLAPSE_KL``) or ``undecidable`` (``s2``
    lies inside the bootstrap CI of lambda_max). ``multiple = s2 / lambda_max``; ``kl`` (nats), ``n_active``
    and ``active_dims`` (0-based, into the descending spectrum) are the linear VAE's optimum at ``s2``
    (:func:`hcdiag.theory.linear_vae_optimum`); ``ci`` the bootstrap interval of lambda_max or None;
    ``n``, ``N`` the rows and dimension of the data; ``message`` the paragraph an assertion shows.
    """

    holds: bool
    outcome: str
    message: str
    s2: float
    multiple: float
    lambda_max: float
    ci: tuple[float, float] | None
    ci_level: float
    bootstrap: int
    margin: float
    s2_max: float
    latent_dim: int
    kl: float
    n_active: int
    active_dims: tuple[int, ...]
    n: int
    N: int
    data: str

    def to_dict(self) -> dict:
        return asdict(self)


def phase_precondition(data, *, latent_dim: int, s2: float | None = None, multiple: float | None = None,
                       margin: float = 0.1, bootstrap: int = 0, ci_level: float = 0.95, seed: int = 0,
                       device="cpu", load_options: dict | None = None) -> PhasePrecondition:
    """Evaluate the phase-transition precondition (see :func:`assert_phase_precondition`) without raising
    on a failure. ``data`` may also be a :class:`hcdiag.spectrum.Spectrum` already computed (with its CI, if
    any; ``bootstrap`` must then be 0), holding at least the top ``min(latent_dim, N)`` eigenvalues."""
    from hcdiag.spectrum import Spectrum, spectrum

    s2, multiple, margin = _phase_args(s2, multiple, margin, latent_dim)
    if isinstance(data, Spectrum):
        if bootstrap:
            raise InputError("The 'bootstrap' parameter must be 0 when a Spectrum is given: its CI is the one it "
                             "was computed with. Compute the spectrum with bootstrap=B instead.")
        spec, label = data, "the spectrum's data"
        if spec.eigenvalues.size < min(latent_dim, spec.d):
            raise InputError(f"The spectrum holds the top {spec.eigenvalues.size} eigenvalue(s) but latent_dim="
                             f"{latent_dim} needs {min(latent_dim, spec.d)}; compute it with top >= latent_dim.")
    else:
        x, label = _matrix(data, load_options)
        spec = spectrum(x, top=latent_dim, bootstrap=bootstrap, ci_level=ci_level, seed=seed, device=device)
    return _phase_verdict(spec, label, s2=s2, multiple=multiple, margin=margin, latent_dim=latent_dim)


def _phase_args(s2, multiple, margin, latent_dim):
    """Validated ``(s2, multiple, margin)`` (one of the first two None); checks ``latent_dim`` too."""
    from hcdiag.theory import linear_vae_optimum

    if (s2 is None) == (multiple is None):
        raise InputError("Pass exactly one of the 's2' parameter (a decoder variance) and the 'multiple' parameter "
                         f"(s2 = multiple * lambda_max). Got s2={s2!r}, multiple={multiple!r}.")
    s2 = None if s2 is None else _finite(s2, "s2", low=0.0, open_low=True)
    multiple = None if multiple is None else _finite(multiple, "multiple", low=0.0, open_low=True)
    linear_vae_optimum([1.0], 1.0, latent_dim)  # validates latent_dim before any data is read
    return s2, multiple, _finite(margin, "margin", low=0.0, high=1.0)


def _phase_verdict(spec, label: str, *, s2, multiple, margin, latent_dim) -> PhasePrecondition:
    from hcdiag.paper import COLLAPSE_KL
    from hcdiag.theory import linear_vae_optimum

    if spec.constant or spec.lambda_max <= 0:
        raise InputError(f"lambda_max of {label} is 0 (constant rows), so s2 cannot be compared with it; check the "
                         "data.")
    lam = float(spec.lambda_max)
    s2 = s2 if s2 is not None else multiple * lam
    opt = linear_vae_optimum(spec.eigenvalues, s2, latent_dim, trace=spec.trace, N=spec.d)
    s2_max = (1.0 - margin) * lam
    ci = None if spec.ci is None else (float(spec.ci[0]), float(spec.ci[1]))

    where = f"s2 = {_g(s2)} = {s2 / lam:.3g} lambda_max"
    est = (f"lambda_max = {_g(lam)}"
           + (f", {100 * spec.ci_level:g}% CI [{_g(ci[0])}, {_g(ci[1])}] from {spec.bootstrap} bootstrap resamples"
              if ci else "")
           + f"; {label}, n = {spec.n} rows, N = {spec.d}")
    vae = (f"the linear VAE with latent dimension {opt.latent_dim} would reach KL = {_g(opt.kl)} nats with "
           f"{opt.n_active} of {opt.latent_dim} latent dimensions active")
    choose = f"choose s2 <= {_g(s2_max)} (multiple <= {1 - margin:.3g}, margin {margin:g})"
    if ci is not None and ci[0] <= s2 <= ci[1]:
        outcome = "undecidable"
        text = (f"phase-transition precondition undecidable at this sample size: {where} lies inside the "
                f"bootstrap CI of lambda_max ({est}), so the data cannot tell whether s2 is below lambda_max, the "
                f"collapse threshold; at the point estimate {vae}; choose s2 < {_g(min(ci[0], s2_max))} (below the "
                f"CI and the margin {margin:g}), or use more rows.")
    elif s2 >= lam:
        outcome = "collapses"
        text = (f"phase-transition precondition fails: the linear VAE would collapse: KL = {_g(opt.kl)} nats with "
                f"{opt.n_active} of {opt.latent_dim} latent dimensions active at {where} ({est}), since s2 >= "
                f"lambda_max (paper 3.2); {choose}.")
    elif s2 > s2_max:
        outcome = "within-margin"
        text = (f"phase-transition precondition fails: {where} is below lambda_max ({est}) but not by the margin "
                f"{margin:g}: it must be <= (1 - margin) lambda_max = {_g(s2_max)}; {vae}; {choose}.")
    elif opt.kl < COLLAPSE_KL:
        outcome = "collapsed-kl"
        safe = lam * math.exp(-2.0 * COLLAPSE_KL)  # KL >= 0.5 log(lambda_max / s2) >= COLLAPSE_KL below it
        text = (f"phase-transition precondition fails: at {where} ({est}) {vae}, below {COLLAPSE_KL:g}, the "
                f"paper's collapse threshold (hcdiag.paper.COLLAPSE_KL); s2 <= lambda_max exp(-2 * {COLLAPSE_KL:g}) "
                f"= {_g(safe)} always reaches it.")
    else:
        outcome = "holds"
        text = (f"phase-transition precondition holds: {where} <= (1 - margin) lambda_max = {_g(s2_max)} "
                f"(margin {margin:g}; {est}); {vae}.")
    return PhasePrecondition(holds=outcome == "holds", outcome=outcome, message=text, s2=float(s2),
                             multiple=float(s2 / lam), lambda_max=lam, ci=ci, ci_level=float(spec.ci_level),
                             bootstrap=int(spec.bootstrap), margin=margin, s2_max=s2_max, latent_dim=opt.latent_dim,
                             kl=opt.kl, n_active=opt.n_active,
                             active_dims=tuple(int(i) for i in np.flatnonzero(opt.active)), n=int(spec.n),
                             N=int(spec.d), data=label)


def assert_phase_precondition(data, *, latent_dim: int, s2: float | None = None, multiple: float | None = None,
                              margin: float = 0.1, bootstrap: int = 0, ci_level: float = 0.95, seed: int = 0,
                              device="cpu", load_options: dict | None = None) -> PhasePrecondition:
    """Assert that a VAE with decoder variance ``s2`` on ``data`` sits below the phase transition.

    The linear VAE collapses (KL = 0) for ``s2 >= lambda_max`` (paper 3.2; claims.md "Phase transition"),
    so the assertion holds when ``s2 <= (1 - margin) lambda_max`` (and ``s2 < lambda_max`` at margin 0)
    and the closed-form KL at ``s2`` is at least ``hcdiag.paper.COLLAPSE_KL`` (0.01 nats: below it the
    optimum itself counts as collapsed; a margin >= 0.02 always suffices).

    Parameters
    ----------
    data : array of shape (n, N), a :class:`hcdiag.data.Dataset`, or a dataset name or path that
        :func:`hcdiag.data.load` understands (``load_options`` are passed to it, e.g. ``n_samples``).
    latent_dim : int >= 1, the latent dimension n.
    s2, multiple : exactly one: the decoder variance (squared data units), or ``s2 = multiple * lambda_max``.
    margin : float in [0, 1), the relative distance below lambda_max that s2 must keep.
    bootstrap : 0 (no CI) or B >= 2 row resamples for a percentile CI of lambda_max at ``ci_level``
        (:func:`hcdiag.spectrum.spectrum`, seeded by ``seed``). When ``s2`` lies inside the CI, the data
        cannot tell on which side of lambda_max it is: the assertion FAILS as "undecidable at this sample
        size", whatever the margin says; choose an s2 below the CI or use more rows.

    Raises ``AssertionError`` with lambda_max (and its CI), ``s2 / lambda_max``, the linear VAE's KL and
    active dimensions and the largest s2 that passes; returns a :class:`PhasePrecondition` when it holds.
    """
    res = phase_precondition(data, latent_dim=latent_dim, s2=s2, multiple=multiple, margin=margin,
                             bootstrap=bootstrap, ci_level=ci_level, seed=seed, device=device,
                             load_options=load_options)
    if not res.holds:
        raise AssertionError(res.message)
    return res


@dataclass(frozen=True)
class ExclusionPrecondition:
    """Whether ``delta*(S) > eps (1 + tau)``: no constant-output model fits inside ``F_T = {L_S <= eps}``.

    ``outcome`` is ``holds``, ``fails`` or ``undecided`` (``delta*`` only bracketed, ``lower <= delta* <=
    upper``, with ``threshold = eps (1 + tau)`` inside the bracket). ``subset`` is S (with ``every_pair``,
    the pair of smallest delta* among all ``R (R - 1) / 2``; ``pairwise`` (R, R) then holds every pair's
    delta*, NaN on the diagonal). ``delta_star`` is the historical loss ``L_S(c)`` of the constant ``c``
    (N,) that attains it (the upper end when not ``exact``); ``choice[s]`` the centroid of clustering
    ``subset[s]`` nearest to c; ``method`` as :class:`hcdiag.checks.delta.DeltaStar`. ``closest_pair`` =
    ``(a, k, b, j)`` and ``closest_distance`` (data units) the two nearest centroids of different
    clusterings of S; ``shared`` the centroid pairs within ``shared_tol`` (data units) of each other.
    Squared data units throughout, except the distances.
    """

    holds: bool
    outcome: str
    message: str
    delta_star: float
    lower: float
    upper: float
    exact: bool
    method: str
    eps: float
    tolerance: float
    threshold: float
    subset: tuple[int, ...]
    every_pair: bool
    n_clusterings: int
    c: np.ndarray
    choice: tuple[int, ...]
    closest_pair: tuple[int, int, int, int]
    closest_distance: float
    shared: tuple
    shared_tol: float
    pairwise: np.ndarray | None = None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["c"] = self.c.tolist()
        d["pairwise"] = None if self.pairwise is None else self.pairwise.tolist()
        d["shared"] = [p.to_dict() for p in self.shared]
        return d


def _read_centroids(path):
    """Centroids (R, K, N) from a ``.npz`` holding ``centroids`` (e.g. an EM-cache file) or a ``.npy``."""
    import zipfile
    from pathlib import Path

    p = Path(path).expanduser()
    howto = "pass a .npz holding 'centroids' of shape (R, K, N) (np.savez(path, centroids=...)) or a .npy of that array"
    if not p.is_file():
        raise InputError(f"{p}: no such file; {howto}.")
    if p.suffix.lower() not in (".npz", ".npy"):
        raise InputError(f"{p}: not a .npz or .npy file; {howto}.")
    try:
        if p.suffix.lower() == ".npy":
            return np.load(p, allow_pickle=False)
        with np.load(p, allow_pickle=False) as z:
            if "centroids" not in z.files:
                raise InputError(f"{p}: holds no array 'centroids' (it has {', '.join(z.files) or 'none'}); {howto}.")
            return np.array(z["centroids"])
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p}: unreadable ({' '.join(str(exc).split())[:160]}); {howto}.") from None


def _centroid_set(clusterings, data, r0, k, seed, fit_options, load_options) -> torch.Tensor:
    import os

    from hcdiag.checks.delta import _centroids
    from hcdiag.clusterings import ClusteringSet, fit_clusterings

    if (clusterings is None) == (data is None):
        raise InputError("Pass either the 'clusterings' argument (centroids of shape (R, K, N), a ClusteringSet or "
                         "a .npz/.npy file) or the 'data' parameter with 'r0' and 'k' to fit them; got "
                         f"{'both' if data is not None else 'neither'}.")
    if data is not None:
        if r0 is None or k is None:
            raise InputError("The 'r0' and 'k' parameters are required to fit clusterings to 'data' "
                             f"(R0 EM runs of K components). Got r0={r0!r}, k={k!r}.")
        if fit_options is not None and not isinstance(fit_options, dict):
            raise InputError(f"The 'fit_options' parameter must be a dict of options for fit_clusterings. "
                             f"Got {fit_options!r}.")
        x, _ = _matrix(data, load_options)
        clusterings = fit_clusterings(x, r0, k, seed=seed, **(fit_options or {}))
    elif r0 is not None or k is not None or fit_options:
        raise InputError("The 'r0', 'k' and 'fit_options' parameters apply only when clusterings are fitted to "
                         "'data'; drop them.")
    if isinstance(clusterings, ClusteringSet):
        clusterings = clusterings.centroids
    elif isinstance(clusterings, (str, os.PathLike)):
        clusterings = _read_centroids(clusterings)
    cents = _centroids(clusterings, "clusterings").to(torch.float64)  # delta's checks: (R, K, N), finite
    if cents.shape[0] < 2:
        raise InputError("The 'clusterings' argument holds R = 1 clustering; delta* needs at least 2 (a single "
                         "clustering always admits a constant on one of its centroids: delta* = 0).")
    return cents


def _subset(subset, R: int) -> tuple[int, ...] | None:
    if subset is None:
        return None
    try:
        ids = tuple(subset)
    except TypeError:
        ids = (subset,)
    bad = [i for i in ids if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))
           or not 0 <= int(i) < R]
    if bad or len(set(int(i) for i in ids)) != len(ids) or len(ids) < 2:
        raise InputError(f"The 'subset' parameter must hold at least 2 distinct clustering indices in [0, {R - 1}] "
                         f"(S, e.g. the final pair), or be None for every pair. Got {subset!r}.")
    return tuple(int(i) for i in ids)


def exclusion_precondition(clusterings=None, *, eps: float, subset=None, tolerance: float = 0.05, data=None,
                           r0: int | None = None, k: int | None = None, seed: int = 0,
                           fit_options: dict | None = None, load_options: dict | None = None,
                           shared_tol: float | None = None, max_enumeration: int = 200_000,
                           max_balls: int = 5_000) -> ExclusionPrecondition:
    """Evaluate Theorem 4.4's precondition (see :func:`assert_exclusion_precondition`) without raising on a
    failure."""
    from hcdiag.checks.delta import delta_star, delta_star_pair, shared_centroid_pairs
    from hcdiag.clusterings import DEFAULT_TOL_FRACTION

    eps = _finite(eps, "eps", low=0.0, open_low=True)
    tau = _finite(tolerance, "tolerance", low=0.0)
    if shared_tol is not None:
        shared_tol = _finite(shared_tol, "shared_tol", low=0.0)
    cents = _centroid_set(clusterings, data, r0, k, seed, fit_options, load_options)  # (R, K, N) float64
    R, K, N = cents.shape
    S = _subset(subset, R)
    threshold = eps * (1.0 + tau)

    pairwise = None
    if S is None:  # the final pair is not known before training: every pair must exclude collapsed models
        pairwise = np.full((R, R), np.nan)
        best = None
        for a in range(R):
            for b in range(a + 1, R):
                d = delta_star_pair(cents[a], cents[b])
                pairwise[a, b] = pairwise[b, a] = d.value
                if best is None or d.value < best[1].value:
                    best = ((a, b), d)
        S, ds = best
    elif len(S) == 2:
        ds = delta_star_pair(cents[S[0]], cents[S[1]])
    else:
        ds = delta_star(cents[list(S)], max_enumeration=max_enumeration, max_balls=max_balls, seed=seed)
    # the two nearest centroids of different clusterings of S (for a pair: the pair delta* comes from)
    near = []
    for i, a in enumerate(S):
        for b in S[i + 1:]:
            d = delta_star_pair(cents[a], cents[b])
            kk, jj = d.choice
            near.append((float(torch.linalg.vector_norm(cents[a, kk] - cents[b, jj])), (a, kk, b, jj)))
    dist, closest = min(near)
    if shared_tol is None:  # 1% of the centroids' spread, as the clusterings' audit (hcdiag.clusterings.audit)
        spread = float(((cents - cents.mean(dim=1, keepdim=True)) ** 2).sum(dim=2).mean().sqrt())
        shared_tol = DEFAULT_TOL_FRACTION * spread
    among = list(range(R)) if pairwise is not None else list(S)
    shared = tuple(p._replace(a=among[p.a], b=among[p.b]) for p in shared_centroid_pairs(cents[among], shared_tol))

    if ds.exact:
        outcome = "holds" if ds.value > threshold else "fails"
    else:
        outcome = "holds" if ds.lower > threshold else "fails" if ds.value <= threshold else "undecided"
    a, kk, b, jj = closest
    if pairwise is not None:
        which = (f"S = clusterings {{{a}, {b}}}, the pair of smallest delta* among all {R * (R - 1) // 2} pairs of "
                 f"the {R} clusterings (before training the final pair is unknown, so every pair must hold)")
    else:
        which = f"S = clusterings {{{', '.join(map(str, S))}}} of {R}"
    if len(S) == 2:
        how = (f"exact for a pair: delta* = d^2 / 4 with d = {_g(dist)} the distance of the closest centroids, "
               f"centroid {kk} of clustering {a} and centroid {jj} of clustering {b}")
    else:
        kind = "exact" if ds.exact else f"a bound: delta* lies in [{_g(ds.lower)}, {_g(ds.upper)}]"
        how = (f"{kind} ({ds.method}, {ds.n_evaluated} enclosing balls solved); the closest centroids of S are "
               f"centroid {kk} of clustering {a} and centroid {jj} of clustering {b} at distance {_g(dist)} "
               f"(their pair's d^2 / 4 = {_g(dist * dist / 4)} <= delta*(S))")
    coords = ", ".join(_g(float(v)) for v in ds.c[:4]) + (", ..." if N > 4 else "")
    where = ("their midpoint" if len(S) == 2 else
             f"the centre of the smallest ball enclosing centroids {list(ds.choice)} of clusterings {list(S)}")
    const = f"the constant c = [{coords}] (N = {N}), {where}, has historical loss L_S(c) = {_g(ds.value)}"
    listed = ", ".join(f"{p.a}:{p.k}~{p.b}:{p.j} ({_g(p.dist)})" for p in shared[:4]) + \
        (f" and {len(shared) - 4} more" if len(shared) > 4 else "")
    share = (f"{len(shared)} shared centroid pair(s) (clustering:centroid within {_g(shared_tol)}, each driving its "
             f"pair's delta* to at most {_g(shared_tol ** 2 / 4)}){': ' + listed if shared else ''}")
    head = f"delta*(S) = {_g(ds.value)}, eps (1 + tau) = {_g(threshold)} (eps {eps:g}, tau {tau:g}) for {which}"
    if outcome == "holds":
        note = ("; for a pair delta* also bounds L_S of every model from below (claims.md T2), so no model reaches "
                "eps: refinement cannot meet it, and a region formed at the eps_T it does reach (>= delta*) holds "
                "the collapsed model again" if len(S) == 2 else "")
        lower = f" (its lower bound {_g(ds.lower)})" if not ds.exact else ""
        text = (f"Theorem 4.4's precondition holds: {head}: delta*{lower} > eps (1 + tau), so no collapsed "
                f"(constant-output) model fits inside F_T = {{L_S <= eps}} ({how}); {share}{note}.")
    elif outcome == "fails":
        text = (f"Theorem 4.4's precondition fails: a collapsed (constant-output) model fits inside F_T = "
                f"{{L_S <= eps}}: {head}; delta* <= eps (1 + tau) ({how}); {const}; {share}. "
                + (f"Choose eps < delta* / (1 + tau) = {_g(ds.value / (1 + tau))}, or clusterings whose centroids lie "
                   "farther apart." if ds.value > 0 else "No eps > 0 excludes it: choose clusterings of S that share "
                   "no centroid."))
    else:
        text = (f"Theorem 4.4's precondition undecided: {head}: eps (1 + tau) lies inside the bracket of delta* "
                f"({how}); {const}; {share}. Raise max_balls (or max_enumeration) so the search closes the bracket.")
    return ExclusionPrecondition(holds=outcome == "holds", outcome=outcome, message=text, delta_star=ds.value,
                                 lower=ds.lower, upper=ds.upper, exact=ds.exact, method=ds.method, eps=eps,
                                 tolerance=tau, threshold=threshold, subset=tuple(S), every_pair=pairwise is not None,
                                 n_clusterings=R, c=ds.c.cpu().numpy(), choice=tuple(ds.choice),
                                 closest_pair=closest, closest_distance=dist, shared=shared, shared_tol=shared_tol,
                                 pairwise=pairwise)


def assert_exclusion_precondition(clusterings=None, *, eps: float, subset=None, tolerance: float = 0.05, data=None,
                                  r0: int | None = None, k: int | None = None, seed: int = 0,
                                  fit_options: dict | None = None, load_options: dict | None = None,
                                  shared_tol: float | None = None, max_enumeration: int = 200_000,
                                  max_balls: int = 5_000) -> ExclusionPrecondition:
    """Assert Theorem 4.4's real precondition: ``delta*(S) > eps (1 + tau)`` (claims.md T2).

    ``delta*(S) = min_c max_{C in S} min_k ||c - mu_k^C||^2`` is the historical loss of the best constant
    reconstruction; when it is at most ``eps (1 + tau)``, a collapsed model (constant output, KL = 0) lies
    inside ``F_T = {L_S <= eps}`` and the theorem's exclusion fails.

    Parameters
    ----------
    clusterings : centroids of shape (R, K, N), a :class:`hcdiag.clusterings.ClusteringSet`, or a path to a
        ``.npz`` holding ``centroids`` (an EM-cache file) or a ``.npy``; or None with ``data``, ``r0``,
        ``k`` (and ``seed``, ``fit_options``) to fit them with :func:`hcdiag.clusterings.fit_clusterings`
        (``data`` as in :func:`assert_phase_precondition`).
    eps : float > 0, the threshold of the region (the refinement's eps).
    subset : indices of the clusterings forming S (the final pair, or any set of >= 2); default None:
        every pair, since the pair the halving keeps is unknown before training (the smallest pair's
        delta* decides).
    tolerance : tau >= 0, the relative tolerance of a region membership (default 0.05, as the checks).
    shared_tol : distance (data units) under which centroids of two clusterings count as shared
        (default 1% of the centroids' spread ``sqrt(mean_{r,k} ||mu_k^r - mean_k mu^r||^2)``).
    max_enumeration, max_balls : passed to :func:`hcdiag.checks.delta.delta_star` for ``|S| > 2``.

    A pair's delta* is exact (``min_{k,j} ||mu_k^a - mu_j^b||^2 / 4``); for ``|S| > 2`` it is exact by
    enumeration or branch and bound, else a bracket: then the assertion holds only when the lower end
    exceeds ``eps (1 + tau)``, fails when the upper end does not, and otherwise fails as undecided; the
    message says which. Raises ``AssertionError`` with the closest centroid pair, their distance, delta*,
    the constant c that attains it and the shared centroids; returns an :class:`ExclusionPrecondition`
    when it holds. Beware that for a pair delta* bounds ``L_S`` of EVERY model from below: when this
    holds, no model reaches ``eps`` (the message says so).
    """
    res = exclusion_precondition(clusterings, eps=eps, subset=subset, tolerance=tolerance, data=data, r0=r0, k=k,
                                 seed=seed, fit_options=fit_options, load_options=load_options,
                                 shared_tol=shared_tol, max_enumeration=max_enumeration, max_balls=max_balls)
    if not res.holds:
        raise AssertionError(res.message)
    return res


class PreconditionItem(pytest.Item):
    """One precondition (phase transition or exclusion) as a test item: pass when it holds, else fail with
    its message."""

    def __init__(self, *, result, source, what, **kw):
        super().__init__(**kw)
        self.result, self.source, self.what = result, source, what

    def runtest(self):
        if not self.result.holds:
            raise AssertionError(self.result.message)

    def reportinfo(self):
        return self.source, None, f"hcdiag {self.what}: {self.name}"

    def repr_failure(self, excinfo, style=None):
        return str(excinfo.value)


def collect_precondition_items(session, *, data=None, s2=(), multiples=(), latent_dim=8, margin=0.1, bootstrap=0,
                               seed=0, clusterings=(), eps=None, subset=None, tolerance=0.05, r0=16, k=8,
                               ci_level=0.95) -> list:
    """The items of ``pytest --hcdiag-data DATA --hcdiag-s2-multiple M`` (one per s2 or multiple, the spectrum
    computed once) and of ``--hcdiag-clusterings FILE --hcdiag-eps EPS`` (one per file; with ``data`` and no
    file, one for the ``r0`` clusterings of ``k`` components fitted to it). Evaluated while collecting, so
    bad arguments raise :class:`InputError` before any test runs."""
    from hcdiag.spectrum import spectrum

    items = []
    if s2 or multiples:
        values = [(v, "s2") for v in s2] + [(m, "multiple") for m in multiples]
        for value, name in values:  # every argument checked before the data is read
            *_, margin = _phase_args(value if name == "s2" else None, value if name == "multiple" else None, margin,
                                     latent_dim)
        x, label = _matrix(data, None)
        spec = spectrum(x, top=latent_dim, bootstrap=bootstrap, ci_level=ci_level, seed=seed, device="cpu")
        col = _Group.from_parent(session, name=f"hcdiag-phase[{data}]")
        for value, name in values:
            res = _phase_verdict(spec, label, margin=margin, latent_dim=latent_dim,
                                 **{"s2": None, "multiple": None, name: float(value)})
            items.append(PreconditionItem.from_parent(col, name=f"{name}={value:g}", result=res, source=str(data),
                                                      what="phase-transition precondition"))
    if eps is not None:
        sources = [(c, None) for c in clusterings] or [(None, data)]
        for path, to_fit in sources:
            fit = to_fit is not None
            res = exclusion_precondition(path, eps=eps, subset=subset, tolerance=tolerance, data=to_fit,
                                         r0=r0 if fit else None, k=k if fit else None, seed=seed)
            label = str(path) if path is not None else f"{data}, R0={r0}, K={k}"
            col = _Group.from_parent(session, name=f"hcdiag-exclusion[{label}]")
            name = "every-pair" if subset is None else "S=" + ",".join(str(i) for i in res.subset)
            items.append(PreconditionItem.from_parent(col, name=name, result=res, source=label,
                                                      what="Theorem 4.4 precondition"))
    return items


class _Group(pytest.Collector):
    """The parent node of precondition items (they are built while collecting, not by this node)."""

    def collect(self):
        return []
