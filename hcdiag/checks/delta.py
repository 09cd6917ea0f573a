"""Theorem 4.4 kernels: the paper's delta (T1), the best-constant delta* (T2), shared centroids, and
the refinement floor of a collapsed model (T2b). Pure functions; claims.md fixes every definition.

Why delta* matters (claims.md T2): for two clusterings a, b and ANY model, per sample
``max(d_a, d_b) >= (d_a + d_b)/2 >= min_{k,j} ||mu_k^a - mu_j^b||^2 / 4`` (triangle inequality
and ``(u + v)^2 <= 2 (u^2 + v^2)``), so ``L_{a,b}(Theta) >= delta*`` for every Theta, with equality
for the constant reconstruction at the midpoint of the closest centroid pair: the refined feasible
region always holds an exactly collapsed model.

For a set S of clusterings, ``delta*(S) = min_c max_{C in S} min_k ||c - mu_k^C||^2``. Swapping the
two minimisations, ``delta*(S) = min over choices (one centroid p_s per clustering) of the squared
radius of the minimum enclosing ball of {p_s}``: that is what :func:`delta_star` enumerates.

Small results are float64; tensors in the results live on the device of the inputs.

>>> import torch
>>> cents = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[2.0, 0.0], [-9.0, 5.0]]])
>>> delta_star(cents).value
1.0
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from hcdiag.errors import InputError
from hcdiag.metrics import as_tensor
from hcdiag.paper import LOSS_CONVENTIONS

__all__ = [
    "DeltaStar",
    "EnclosingBall",
    "SharedCentroidPair",
    "T1Result",
    "T2bFloor",
    "delta_star",
    "delta_star_pair",
    "delta_t1",
    "min_enclosing_ball",
    "shared_centroid_pairs",
    "t2b_floor",
]

Convention = Literal["literal", "mean", "scaled"]
CONVENTIONS = LOSS_CONVENTIONS


def _centroids(centroids, name: str = "centroids") -> torch.Tensor:
    c = as_tensor(centroids, name=name, ndim=3, shape="(R, K, N)")
    if min(c.shape) < 1:
        raise InputError(f"The '{name}' argument must hold at least one clustering, centroid and coordinate; "
                         f"got shape {tuple(c.shape)}.")
    if not bool(torch.isfinite(c).all()):
        raise InputError(f"The '{name}' argument holds {int((~torch.isfinite(c)).sum())} non-finite value(s); "
                         "the clusterings must have finite centroids.")
    return c


def _vector(x, name: str, n: int) -> torch.Tensor:
    v = as_tensor(x, name=name, ndim=1, shape=f"({n},)")
    if v.shape[0] != n:
        raise InputError(f"The '{name}' argument must have length N = {n} (the centroids' length); got {v.shape[0]}.")
    return v


def _sq_dists_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, N), (B, N) -> (A, B) squared distances, centred first so the expansion loses little."""
    o = a.mean(axis=0)
    a = a - o
    b = b - o
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


# ----------------------------------------------------------------------------------------------
# T1: the paper's delta

@dataclass(frozen=True, eq=False)
class T1Result:
    """The paper's delta (claims.md T1): ``delta_C = min_k ||xbar - mu_k^C||^2``, ``delta = min_C delta_C``.

    ``per_clustering`` float64 (R,) squared data units; ``clustering`` and ``centroid`` attain it.
    """

    value: float
    clustering: int
    centroid: int
    per_clustering: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "clustering": self.clustering, "centroid": self.centroid,
                "per_clustering": self.per_clustering.tolist()}


def delta_t1(xbar, centroids) -> T1Result:
    """The paper's delta of Theorem 4.4 (T1).

    Parameters
    ----------
    xbar : tensor of shape (N,), the data mean.
    centroids : tensor of shape (R, K, N).
    """
    cents = _centroids(centroids).to(torch.float64)
    xbar = _vector(xbar, "xbar", cents.shape[2]).to(device=cents.device, dtype=torch.float64)
    diff = cents - xbar  # (R, K, N), direct differences: exact to rounding
    d = (diff * diff).sum(dim=2)  # (R, K)
    per, arg = d.min(dim=1)  # (R,), (R,)
    r = int(per.argmin())
    return T1Result(value=float(per[r]), clustering=r, centroid=int(arg[r]), per_clustering=per)


# ----------------------------------------------------------------------------------------------
# minimum enclosing ball (the inner problem of delta*)

@dataclass(frozen=True, eq=False)
class EnclosingBall:
    """Minimum enclosing ball of S points: ``center`` (N,), squared radius ``r2``.

    ``weights`` (S,) are the optimal dual weights: non-negative, summing to 1, ``center =
    weights @ points``, positive only on points at distance ``r`` (the KKT certificate);
    ``dual`` = ``sum_s weights_s ||p_s - center||^2`` is a lower bound on the optimum, ``r2`` (the
    largest distance from ``center``) an upper bound; they agree to rounding at convergence.
    """

    center: np.ndarray
    r2: float
    weights: np.ndarray
    dual: float
    n_iter: int

    def to_dict(self) -> dict[str, Any]:
        return {"center": self.center.tolist(), "r2": self.r2, "weights": self.weights.tolist(), "dual": self.dual,
                "n_iter": self.n_iter}


def _face_step(G: np.ndarray, g: np.ndarray, T: list[int], wT: np.ndarray):
    """Ascent direction of the dual on the face {w >= 0, sum w = 1, supp w in T} and its full step.

    With ``v = B u`` (``B`` the basis ``e_i - e_T[0]`` of ``sum v = 0``) the dual changes by
    ``h.v - v^T G v`` (``h`` its gradient). If the points of T are affinely independent the face
    maximiser is ``u = M^+ B^T h / 2`` (``M = B^T G B``, the Gram of the differences ``p_i - p_T0``):
    the circumcentre of T in its affine hull; full step 1. If they are affinely dependent and the
    gradient has a component along the dependency, the dual rises linearly along it without
    bound: move along it until a weight reaches zero (full step inf).
    """
    GT = G[np.ix_(T, T)]
    h = g[T] - 2.0 * GT @ wT  # (|T|,)
    M = GT[1:, 1:] - GT[1:, :1] - GT[:1, 1:] + GT[0, 0]  # (|T|-1, |T|-1)
    hp = h[1:] - h[0]
    e, U = np.linalg.eigh(M)
    null = e <= 1e-12 * max(float(np.abs(e).max()), 1e-300)
    hn = U[:, null].T @ hp
    if null.any() and np.linalg.norm(hn) > 1e-9 * (np.linalg.norm(hp) + 1e-300):
        u, full = U[:, null] @ hn, math.inf
    else:
        u, full = U[:, ~null] @ ((U[:, ~null].T @ hp) / (2.0 * e[~null])), 1.0
    return np.concatenate([[-u.sum()], u]), full


def min_enclosing_ball(points, *, max_iter: int | None = None) -> EnclosingBall:
    """Exact minimum enclosing ball of a few points (S small, N any), by a primal active-set method.

    Solves the dual ``max_{w in simplex} sum_s w_s ||p_s||^2 - ||sum_s w_s p_s||^2`` on the Gram
    matrix (Lawson-Hanson style): on the current support the optimum of the face is the
    circumcentre of the support in its affine hull (or, for affinely dependent supports, the dual
    rises along the dependency until a weight vanishes); the farthest point outside the ball
    enters, points whose weight would turn negative leave. Each step raises the dual, so it ends
    after finitely many steps with the KKT conditions met (to rounding); ``r2`` is always the
    radius of a ball that covers every point, and ``dual`` a lower bound on the optimum.

    Parameters
    ----------
    points : array of shape (S, N)
    """
    P = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] < 1:
        raise InputError(f"The 'points' argument must be a 2-D array of shape (S, N) with S >= 1; got shape {P.shape}.")
    S = P.shape[0]
    origin = P.mean(axis=0)
    Q = P - origin  # centred: the Gram entries stay small, so distances from it lose little
    G = Q @ Q.T  # (S, S)
    g = np.diag(G).copy()
    tol = 1e-12 * max(float(g.max()), 1e-300)
    max_iter = max_iter or 50 * S + 50
    i0 = int(np.argmax(g))
    w = np.zeros(S)
    w[i0] = 1.0
    T = [i0]
    it = 0
    stalled = False
    for it in range(1, max_iter + 1):
        Gw = G @ w
        d2 = g - 2.0 * Gw + w @ Gw  # squared distances to the centre w @ P
        r2 = float(d2[T].max())
        j = int(np.argmax(d2))
        if d2[j] <= r2 + tol or j in T:
            break
        T.append(j)
        wT = w[T]
        for inner in range(max_iter):
            d, full = _face_step(G, g, T, wT)
            neg = d < 0
            ratios = np.where(neg, wT / np.where(neg, -d, 1.0), np.inf)
            block = int(np.argmin(ratios))
            step = min(full, float(ratios[block]))
            if inner == 0 and step < full and block == len(T) - 1:
                stalled = True  # the entering point would get no weight: optimal up to rounding
                T.pop()
                wT = w[T]
                break
            wT = np.maximum(wT + step * d, 0.0)
            if step >= full:
                break
            wT[block] = 0.0  # the blocking point leaves the support
            keep = wT > 0
            T = [t for t, k in zip(T, keep) if k]
            wT = wT[keep] / wT[keep].sum()
        w = np.zeros(S)
        w[T] = wT / wT.sum()
        if stalled:
            break
    center = w @ P
    dist2 = ((P - center) ** 2).sum(axis=1)
    return EnclosingBall(center=center, r2=float(dist2.max()), weights=w, dual=float(w @ dist2), n_iter=it)


# ----------------------------------------------------------------------------------------------
# T2: delta*

@dataclass(frozen=True, eq=False)
class DeltaStar:
    """The best-constant delta* (claims.md T2) and the constant that attains it.

    ``value`` is the historical loss of the constant ``c`` (N,) (evaluated, not assumed);
    ``lower <= delta* <= upper`` (equal when ``exact``); ``choice[s]`` is the centroid of clustering
    s nearest to ``c``; ``method`` is ``pair``, ``enumeration``, ``branch-and-bound`` or ``bounds``
    (the last one not exact unless its bounds met); ``n_evaluated`` counts
    the enclosing balls solved.
    """

    value: float
    lower: float
    upper: float
    exact: bool
    c: torch.Tensor
    choice: tuple[int, ...]
    method: str
    n_evaluated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "lower": self.lower, "upper": self.upper, "exact": self.exact,
                "c": self.c.tolist(), "choice": list(self.choice), "method": self.method,
                "n_evaluated": self.n_evaluated}


def delta_star_pair(ca, cb) -> DeltaStar:
    """delta* of two clusterings: ``min_{k,j} ||mu_k^a - mu_j^b||^2 / 4`` (claims.md T2).

    Parameters
    ----------
    ca : tensor of shape (K, N); cb : tensor of shape (K', N).

    Returns the value, the pair ``choice = (k, j)`` and the midpoint ``c = (mu_k^a + mu_j^b)/2``
    (N,) at which the constant reconstruction attains it (float64, on ``ca``'s device).
    """
    a = as_tensor(ca, name="ca", ndim=2, shape="(K, N)").to(torch.float64)
    b = as_tensor(cb, name="cb", ndim=2, shape="(K, N)").to(device=a.device, dtype=torch.float64)
    if a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0], a.shape[1]) < 1:
        raise InputError(f"The 'ca' and 'cb' arguments must be non-empty with the same length N; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}.")
    diff = a.unsqueeze(1) - b.unsqueeze(0)  # (K, K', N), direct differences: exact zero for shared centroids
    d = (diff * diff).sum(dim=2)  # (K, K')
    flat = int(d.argmin())
    k, j = divmod(flat, d.shape[1])
    c = 0.5 * (a[k] + b[j])
    ka = ((a - c) ** 2).sum(1).min()
    kb = ((b - c) ** 2).sum(1).min()
    value = float(torch.maximum(ka, kb))  # the constant's own historical loss, = d[k, j] / 4
    return DeltaStar(value=value, lower=value, upper=value, exact=True, c=c, choice=(k, j), method="pair",
                     n_evaluated=0)


def _objective(C: np.ndarray, flat: np.ndarray, S: int, K: int) -> np.ndarray:
    """Historical loss of constants: C (M, N) -> (M,) ``max_s min_k ||c - mu_k^s||^2``."""
    d = _sq_dists_np_pair(C, flat).reshape(C.shape[0], S, K)  # (M, S, K)
    return d.min(axis=2).max(axis=1)


def _sq_dists_np_pair(C: np.ndarray, flat: np.ndarray) -> np.ndarray:
    if C.shape[0] * flat.shape[0] * C.shape[1] <= 4_000_000:
        return ((C[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)  # direct: exact to rounding
    return _sq_dists_np(C, flat)


def _nearest_choice(c: np.ndarray, flat: np.ndarray, S: int, K: int) -> tuple[int, ...]:
    d = ((flat - c) ** 2).sum(axis=1).reshape(S, K)
    return tuple(int(i) for i in d.argmin(axis=1))


def delta_star(centroids, *, max_enumeration: int = 200_000, max_starts: int = 256, max_balls: int = 5_000,
               seed: int = 0) -> DeltaStar:
    """delta*(S): the historical loss of the best constant reconstruction (claims.md T2).

    ``delta*(S) = min_c max_{C in S} min_k ||c - mu_k^C||^2`` for ``centroids`` of shape (S, K, N).

    Exact when ``K**S <= max_enumeration``: every choice of one centroid per clustering is a
    candidate, its value is the squared radius of the minimum enclosing ball of the chosen points
    (:func:`min_enclosing_ball`); choices are visited in increasing order of a lower bound on that
    radius, ``max(max_{s<t} ||p_s - p_t||^2 / 4, sum_{s<t} ||p_s - p_t||^2 / S^2)``, and the search
    stops once the bound reaches the best radius found, so usually only a handful of balls are
    solved. Otherwise the result brackets
    delta*: ``lower`` = the larger of the largest pairwise delta* (a subset's delta* never exceeds
    the set's) and ``sum_{s<t} min_{k,j} ||mu_k^s - mu_j^t||^2 / S^2`` (the uniform-weight bound
    above, minimised term by term), and
    ``upper`` = the best value of a monotone local search over c (nearest centroid per clustering,
    then the enclosing ball's centre, repeated) from up to ``max_starts`` starts: every centroid,
    the midpoint of every pair's closest centroids and the centroids' mean (a random subset, by
    ``seed``, when there are more), then a 1-swap descent over the best choice. A best-first
    branch and bound over partial choices then tries to close the bracket within ``max_balls``
    enclosing balls (0 skips it): if it closes, the result is exact
    (``method='branch-and-bound'``); if not, its smallest open bound may raise ``lower``. Clusterings from EM runs on the same data share near-identical centroids, which
    makes delta* small and the search short.
    """
    cents = _centroids(centroids)
    if int(max_enumeration) < 0:
        raise InputError(f"The 'max_enumeration' parameter must be an int >= 0. Got {max_enumeration!r}.")
    if int(max_balls) < 0:
        raise InputError(f"The 'max_balls' parameter must be an int >= 0. Got {max_balls!r}.")
    if int(max_starts) < 1:
        raise InputError(f"The 'max_starts' parameter must be an int >= 1. Got {max_starts!r}.")
    device = cents.device
    S, K, N = cents.shape
    flat = cents.detach().cpu().to(torch.float64).numpy().reshape(S * K, N)  # (S*K, N)
    D = _sq_dists_np(flat, flat)  # (S*K, S*K)
    pairs = list(itertools.combinations(range(S), 2))

    def result(c: np.ndarray, lower: float, upper: float, exact: bool, method: str, n: int) -> DeltaStar:
        value = float(_objective(c[None, :], flat, S, K)[0])
        if exact:
            lower = value
        return DeltaStar(value=value, lower=min(lower, value), upper=value, exact=exact,
                         c=torch.as_tensor(c, dtype=torch.float64, device=device),
                         choice=_nearest_choice(c, flat, S, K), method=method, n_evaluated=n)

    if K ** S <= int(max_enumeration):
        choices = np.indices((K,) * S).reshape(S, -1).T  # (K^S, S)
        pair_lb = np.zeros(choices.shape[0])
        total = np.zeros(choices.shape[0])
        for s, t in pairs:
            d_st = D[s * K + choices[:, s], t * K + choices[:, t]]  # (K^S,)
            pair_lb = np.maximum(pair_lb, d_st / 4.0)
            total += d_st
        # Two dual values of the ball problem, each a lower bound on its squared radius: weights
        # 1/2 on the farthest pair (D/4), and uniform weights (mean squared distance to the points'
        # mean, sum_{s<t} D_st / S^2), which is tight for near-regular simplices (high N).
        lb = np.maximum(pair_lb, total / S**2)
        best, best_c, n = math.inf, None, 0
        for idx in np.argsort(lb, kind="stable"):
            if lb[idx] >= best:
                break  # every remaining choice has a ball at least this large
            ball = min_enclosing_ball(flat[np.arange(S) * K + choices[idx]])
            n += 1
            if ball.r2 < best:
                best, best_c = ball.r2, ball.center
        return result(best_c, best, best, True, "enumeration", n)

    # bounds: lower from pairs, upper from a monotone local search
    lower, sum_min = 0.0, 0.0
    mids = []
    for s, t in pairs:
        block = D[s * K:(s + 1) * K, t * K:(t + 1) * K]
        k, j = divmod(int(block.argmin()), K)
        lower = max(lower, float(block[k, j]) / 4.0)
        sum_min += float(block[k, j])
        mids.append(0.5 * (flat[s * K + k] + flat[t * K + j]))
    # the uniform-weight dual of every choice is >= sum_{s<t} min_{k,j} D_st / S^2
    lower = max(lower, sum_min / S**2)
    starts = [flat.mean(axis=0)] + mids + list(flat)
    if len(starts) > int(max_starts):
        rng = np.random.default_rng(seed)
        keep = rng.choice(len(starts), size=int(max_starts), replace=False)
        starts = [starts[i] for i in sorted(keep)]
    best, best_c, n = math.inf, None, 0
    seen: set[tuple[int, ...]] = set()
    for c in starts:
        value = float(_objective(c[None, :], flat, S, K)[0])
        for _ in range(100):
            choice = _nearest_choice(c, flat, S, K)
            if choice in seen:
                break  # this choice's ball was already solved (from here or another start)
            seen.add(choice)
            ball = min_enclosing_ball(flat[np.arange(S) * K + np.asarray(choice)])
            n += 1
            new = float(_objective(ball.center[None, :], flat, S, K)[0])
            if new >= value:
                break
            c, value = ball.center, new
        if value < best:
            best, best_c = value, c
    # 1-swap descent on the best choice: change one clustering's centroid at a time
    for _ in range(20):
        choice = list(_nearest_choice(best_c, flat, S, K))
        improved = False
        for s_ in range(S):
            for k in range(K):
                if k == choice[s_]:
                    continue
                trial = choice.copy()
                trial[s_] = k
                if tuple(trial) in seen:
                    continue
                seen.add(tuple(trial))
                ball = min_enclosing_ball(flat[np.arange(S) * K + np.asarray(trial)])
                n += 1
                new = float(_objective(ball.center[None, :], flat, S, K)[0])
                if new < best * (1 - 1e-12):
                    best, best_c, improved = new, ball.center, True
        if not improved:
            break
    if best <= lower * (1 + 1e-12):
        return result(best_c, lower, best, True, "bounds", n)
    bb = _branch_and_bound(flat, D, S, K, best, best_c, int(max_balls))
    n += bb[3]
    if bb[2]:  # the search closed: best is delta*
        return result(bb[1], bb[0], bb[0], True, "branch-and-bound", n)
    return result(bb[1], max(lower, bb[4]), bb[0], False, "bounds", n)


def _branch_and_bound(flat, D, S, K, best, best_c, budget):
    """Best-first branch and bound over choices of one centroid per clustering.

    A node fixes the centroids of the first d clusterings (in an order that puts the most
    constraining first); the enclosing ball of those d points is a lower bound for every
    completion (a subset's ball is never larger), sharpened by a one-point look-ahead, and the
    historical loss at the ball's centre is an upper bound. Returns ``(upper, c, closed, balls, lower)``: ``closed`` when the smallest open
    lower bound reached the upper bound (then upper = delta*), ``lower`` the smallest open bound
    when the budget of ``budget`` balls ran out.
    """
    import heapq

    pair_lb = np.zeros((S, S))
    for s, t in itertools.combinations(range(S), 2):
        pair_lb[s, t] = pair_lb[t, s] = D[s * K:(s + 1) * K, t * K:(t + 1) * K].min() / 4.0
    order = list(np.unravel_index(int(pair_lb.argmax()), pair_lb.shape)) if S > 1 else [0]
    order = list(dict.fromkeys(int(i) for i in order))
    while len(order) < S:
        rest = [t for t in range(S) if t not in order]
        order.append(max(rest, key=lambda t: pair_lb[t, order].max()))
    rows = [np.arange(K) + o * K for o in order]  # flat rows of each clustering, in search order
    # rest_rows[d]: flat rows of the clusterings not yet assigned at depth d + 1, (S - d - 1) * K
    rest_rows = [np.concatenate(rows[d + 1:]) if d + 1 < S else np.zeros(0, dtype=int) for d in range(S)]
    heap = [(0.0, ())]
    balls = 0
    while heap:
        lb, choice = heap[0]
        if lb >= best * (1 - 1e-12):
            return best, best_c, True, balls, lb
        if balls >= budget:
            return best, best_c, False, balls, lb
        heapq.heappop(heap)
        d = len(choice)
        for k in range(K):
            child = choice + (k,)
            pts = flat[[rows[i][j] for i, j in enumerate(child)]]
            ball = min_enclosing_ball(pts)
            balls += 1
            value = float(_objective(ball.center[None, :], flat, S, K)[0])
            if value < best:
                best, best_c = value, ball.center
            child_lb = max(lb, ball.r2)
            if d + 1 < S:
                # One-point look-ahead: every completion adds some centroid q of each unassigned
                # clustering. Weights (1 - a) w_ball + a e_q in the dual give its squared radius
                # >= (1 - a) r^2 + a (1 - a) |q - centre|^2, at best (r^2 + delta^2)^2 / (4 delta^2)
                # when delta = |q - centre| > r; the completion pays the min over q, the max over t.
                r2 = ball.r2
                d2 = ((flat[rest_rows[d]] - ball.center) ** 2).sum(axis=1).reshape(S - d - 1, K)
                with np.errstate(divide="ignore", invalid="ignore"):
                    look = np.where(d2 > r2, (r2 + d2) ** 2 / (4.0 * d2), r2)
                child_lb = max(child_lb, float(look.min(axis=1).max()))
                if child_lb < best * (1 - 1e-12):
                    heapq.heappush(heap, (child_lb, child))
    return best, best_c, True, balls, best


class SharedCentroidPair(NamedTuple):
    """Centroid k of clustering a and centroid j of clustering b (a < b) at distance ``dist``."""

    a: int
    k: int
    b: int
    j: int
    dist: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


def shared_centroid_pairs(centroids, tol: float) -> list[SharedCentroidPair]:
    """Pairs of centroids of different clusterings within distance ``tol`` (data units, not squared).

    ``centroids`` of shape (R, K, N). Returns ``(a, k, b, j, dist)`` with ``a < b`` and
    ``||mu_k^a - mu_j^b|| <= tol``, sorted by (a, b, k, j). Shared centroids drive delta* to 0
    (claims.md T2): two clusterings sharing a centroid admit a constant with zero historical loss.
    """
    t = float(tol)
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"The 'tol' parameter must be a finite float >= 0. Got {tol!r}.")
    cents = _centroids(centroids)
    R, K, N = cents.shape
    flat = cents.detach().cpu().to(torch.float64).numpy().reshape(R * K, N)
    D = _sq_dists_np(flat, flat)
    scale = float((flat - flat.mean(axis=0)).__pow__(2).sum(axis=1).max()) if R * K > 1 else 0.0
    slack = 1e-9 * scale + 1e-300  # screen with the expansion, confirm with direct differences
    out = []
    for a, b in itertools.combinations(range(R), 2):
        block = D[a * K:(a + 1) * K, b * K:(b + 1) * K]
        for k, j in zip(*np.nonzero(block <= t * t + slack)):
            dist = float(np.sqrt(((flat[a * K + k] - flat[b * K + j]) ** 2).sum()))
            if dist <= t:
                out.append(SharedCentroidPair(a, int(k), b, int(j), dist))
    return out


# ----------------------------------------------------------------------------------------------
# T2b: where a collapsed model settles under the pipeline's own loss

@dataclass(frozen=True, eq=False)
class T2bFloor:
    """The refinement floor of a collapsed model (claims.md T2b).

    ``c`` (N,) the constant a collapsed model settles at, pulled toward centroid ``centroid``;
    ``l = ||c - mu||^2`` its clustering term there; ``per_centroid`` (K,) the same for every
    centroid (``l`` is their minimum); ``pull`` the relative weight of the clustering term
    (``2 beta s2`` for literal/mean, ``beta`` for scaled).
    """

    c: torch.Tensor
    l: float
    centroid: int
    per_centroid: torch.Tensor
    convention: str
    beta: float
    s2: float
    pull: float

    def to_dict(self) -> dict[str, Any]:
        return {"c": self.c.tolist(), "l": self.l, "centroid": self.centroid,
                "per_centroid": self.per_centroid.tolist(), "convention": self.convention, "beta": self.beta,
                "s2": self.s2, "pull": self.pull}


def t2b_floor(xbar, mu, *, beta: float, s2: float, convention: Convention = "literal") -> T2bFloor:
    """Where a collapsed (constant-output, KL = 0) model settles, and its clustering loss there.

    Parameters
    ----------
    xbar : tensor of shape (N,), the data mean.
    mu : tensor of shape (N,) (one centroid) or (K, N) (a clustering; the floor is the minimum over
        its centroids).
    beta : clustering weight (>= 0); s2 : decoder variance (> 0, squared data units).
    convention : ``literal`` | ``mean`` | ``scaled`` (claims.md "Training pipeline").

    A constant output c costs, averaged over the data (the KL of a collapsed encoder is 0):

    * literal: ``J(c) = mean_x ||x - c||^2 / (2 s2) + beta ||c - mu||^2``. First-order condition
      ``(c - xbar)/s2 + 2 beta (c - mu) = 0`` gives ``c = (xbar + 2 beta s2 mu) / (1 + 2 beta s2)``
      and ``c - mu = (xbar - mu)/(1 + 2 beta s2)``, so ``l = ||xbar - mu||^2 / (1 + 2 beta s2)^2``.
    * mean: both squared errors divided by N, ``J(c)/N``: the same condition, the same c and l.
    * scaled: clustering term divided by 2 s2, ``J(c) = [mean_x ||x - c||^2 + beta ||c - mu||^2]/(2 s2)``:
      ``(c - xbar) + beta (c - mu) = 0``, ``c = (xbar + beta mu)/(1 + beta)``,
      ``l = ||xbar - mu||^2 / (1 + beta)^2``.

    J is strictly convex in c, so c is its unique minimiser (for the centroid mu it is pulled to).
    """
    if convention not in CONVENTIONS:
        raise InputError(f"The 'convention' parameter must be one of {', '.join(CONVENTIONS)}. Got {convention!r}.")
    b = float(beta)
    v = float(s2)
    if not (math.isfinite(b) and b >= 0):
        raise InputError(f"The 'beta' parameter must be a finite float >= 0. Got {beta!r}.")
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"The 's2' parameter must be a finite float > 0. Got {s2!r}.")
    mu_t = as_tensor(mu, name="mu")
    if mu_t.dim() == 1:
        mu_t = mu_t.unsqueeze(0)
    if mu_t.dim() != 2 or mu_t.shape[0] < 1:
        raise InputError(f"The 'mu' argument must have shape (N,) or (K, N); got shape {tuple(mu_t.shape)}.")
    mu_t = mu_t.to(torch.float64)
    xb = _vector(xbar, "xbar", mu_t.shape[1]).to(device=mu_t.device, dtype=torch.float64)
    pull = 2.0 * b * v if convention in ("literal", "mean") else b
    cs = (xb.unsqueeze(0) + pull * mu_t) / (1.0 + pull)  # (K, N)
    diff = cs - mu_t
    per = (diff * diff).sum(dim=1)  # (K,)
    k = int(per.argmin())
    return T2bFloor(c=cs[k], l=float(per[k]), centroid=k, per_centroid=per, convention=convention, beta=b, s2=v,
                    pull=pull)
