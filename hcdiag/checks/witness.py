"""T4: the teacher-information certificate against constant collapse (claims.md T4, seed 000).

A teacher ``T(k|x)`` (rows of shape (m, K): the GMM responsibilities of a clustering) has
information ``I_T = H(mean_x T) - mean_x H(T(.|x))`` nats, the mutual information between x and
the teacher's label. For an input-independent student W, ``mean_x KL(T(.|x) || W) =
I_T + KL(mean_x T || W)``, so the best constant student is ``mean_x T`` and it pays exactly
``I_T``. A softmax witness that reads ONLY the latent mean ``mu(x)`` and pays less than ``I_T``
(with a margin, on held-out rows) therefore proves that ``mu`` is not constant in x.

All sums in float64; entropies use ``0 log 0 = 0``.

>>> import torch
>>> T = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> round(teacher_information(T), 6) == round(float(torch.log(torch.tensor(2.0))), 6)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hcdiag.errors import InputError
from hcdiag.metrics import as_tensor

__all__ = [
    "SoftmaxWitness",
    "ViewGap",
    "WitnessCertificate",
    "alignment_loss",
    "certificate_gap",
    "certify_nonconstant",
    "fit_softmax_witness",
    "teacher_information",
    "view_certificate",
    "view_gap",
]

_ROW_SUM_TOL = 1e-6


def _distribution_rows(p, name: str, k: int | None = None) -> torch.Tensor:
    t = as_tensor(p, name=name, ndim=2, shape="(m, K)").detach().to(torch.float64)
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise InputError(f"The '{name}' argument must have at least one row and one class; got shape {tuple(t.shape)}.")
    if k is not None and t.shape[1] != k:
        raise InputError(f"The '{name}' argument must have K = {k} columns (as the teacher); got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"The '{name}' argument holds {int((~torch.isfinite(t)).sum())} non-finite value(s); "
                         "its rows must be probability distributions.")
    if bool((t < 0).any()):
        raise InputError(f"The '{name}' argument holds {int((t < 0).sum())} negative value(s); its rows must be "
                         "probability distributions.")
    bad = (t.sum(dim=1) - 1).abs() > _ROW_SUM_TOL
    if bool(bad.any()):
        raise InputError(f"The '{name}' rows must sum to 1; {int(bad.sum())} row(s) do not (first: row "
                         f"{int(bad.nonzero()[0])}). Normalise them (e.g. GMM responsibilities).")
    return t


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    """(m, K) -> (m,) entropies in nats, ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def teacher_information(T) -> float:
    """Teacher information ``I_T = H(mean_x T) - mean_x H(T(.|x))`` in nats (claims.md T4).

    ``T`` of shape (m, K), rows the teacher distributions ``T(k|x)``.
    """
    t = _distribution_rows(T, "T")
    info = float(_entropy_rows(t.mean(dim=0)) - _entropy_rows(t).mean())
    return max(info, 0.0)  # >= 0 by concavity of H; clamp the rounding


def alignment_loss(T, W) -> float:
    """Alignment loss ``mean_x KL(T(.|x) || W(.|x))`` in nats.

    ``T``, ``W`` of shape (m, K) (or ``W`` of shape (K,): one input-independent student). Infinite
    when W gives zero mass where T does not.
    """
    t = _distribution_rows(T, "T")
    w = as_tensor(W, name="W")
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(t.shape[0], -1)
    w = _distribution_rows(w, "W", k=t.shape[1]).to(t.device)
    if w.shape[0] != t.shape[0]:
        raise InputError(f"The 'T' and 'W' arguments must have the same number of rows; got {tuple(t.shape)} and "
                         f"{tuple(w.shape)}.")
    # KL = sum_k T log T - T log W; xlogy keeps 0 log 0 = 0 and gives +inf for T > 0 = W
    kl = (torch.special.xlogy(t, t) - torch.special.xlogy(t, w)).sum(dim=1)
    return float(kl.mean())


@dataclass(frozen=True, eq=False)
class SoftmaxWitness:
    """``W(k|x) = softmax(A ((f(x) - shift) / scale) + b)`` on the latent means ``f = mu(x)``.

    ``A`` (d, K), ``b`` (K,), ``shift``/``scale`` (d,) (standardisation of the fit features;
    constant features get scale 1, so they contribute nothing); ``objective`` the final penalised
    soft-target cross-entropy on the fit split (nats); ``n_iter`` LBFGS iterations; ``converged``
    whether LBFGS stopped on its tolerances before ``max_iter``.
    """

    A: torch.Tensor
    b: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    objective: float
    n_iter: int
    converged: bool

    def logits(self, features) -> torch.Tensor:
        f = as_tensor(features, name="features", ndim=2, shape="(m, d)")
        if f.shape[1] != self.A.shape[0]:
            raise InputError(f"The 'features' must have d = {self.A.shape[0]} columns (as at fit time); got shape "
                             f"{tuple(f.shape)}.")
        f = f.detach().to(device=self.A.device, dtype=torch.float64)
        return ((f - self.shift) / self.scale) @ self.A + self.b  # (m, K)

    def predict(self, features) -> torch.Tensor:
        """Witness distributions (m, K) for features (m, d), float64."""
        return torch.softmax(self.logits(features), dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"A": self.A.tolist(), "b": self.b.tolist(), "shift": self.shift.tolist(),
                "scale": self.scale.tolist(), "objective": self.objective, "n_iter": self.n_iter,
                "converged": self.converged}


def _features_and_teacher(features, T, fname: str, tname: str):
    f = as_tensor(features, name=fname, ndim=2, shape="(m, d)")
    t = _distribution_rows(T, tname)
    if f.shape[0] != t.shape[0]:
        raise InputError(f"The '{fname}' and '{tname}' arguments must have the same number of rows; got "
                         f"{tuple(f.shape)} and {tuple(t.shape)}.")
    if not bool(torch.isfinite(f).all()):
        raise InputError(f"The '{fname}' argument holds {int((~torch.isfinite(f)).sum())} non-finite value(s).")
    return f, t


def fit_softmax_witness(features, T, *, l2: float = 1e-4, max_iter: int = 200, device=None) -> SoftmaxWitness:
    """Fit a softmax witness on the latent means only (claims.md T4).

    Minimises ``mean_x CE(T(.|x), softmax(A f(x) + b)) + l2 ||A||^2`` (soft-target cross-entropy,
    nats; ``f`` standardised) in float64 with LBFGS (strong Wolfe), starting from ``A = 0``,
    ``b = log mean_x T``: the best constant student, so the fit can only improve on it.

    Parameters
    ----------
    features : (m, d) latent means ``mu(x)``; T : (m, K) teacher rows; l2 : ridge weight on A (>= 0);
    max_iter : LBFGS iterations; device : where to fit (default: the features' device).
    """
    f, t = _features_and_teacher(features, T, "features", "T")
    if not (math.isfinite(float(l2)) and float(l2) >= 0):
        raise InputError(f"The 'l2' parameter must be a finite float >= 0. Got {l2!r}.")
    if int(max_iter) < 1:
        raise InputError(f"The 'max_iter' parameter must be an int >= 1. Got {max_iter!r}.")
    if device is None:
        dev = f.device
    else:
        from hcdiag.device import resolve_device

        dev = resolve_device(device)
    f = f.detach().to(device=dev, dtype=torch.float64)
    t = t.to(dev)
    shift = f.mean(dim=0)
    scale = f.std(dim=0, correction=0)
    scale = torch.where(scale > 1e-12 * (1 + shift.abs()), scale, torch.ones_like(scale))
    z = (f - shift) / scale  # (m, d)
    d, k = z.shape[1], t.shape[1]
    A = torch.zeros(d, k, dtype=torch.float64, device=dev, requires_grad=True)
    # log of the mean teacher, floored so an unused class does not start at -inf
    b0 = torch.log(t.mean(dim=0).clamp_min(1e-300))
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([A, b], lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        logp = torch.log_softmax(z @ A + b, dim=1)  # (m, K)
        return -(t * logp).sum(dim=1).mean() + float(l2) * (A * A).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    n_iter = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
    with torch.no_grad():
        final = float(objective())
    return SoftmaxWitness(A=A.detach(), b=b.detach(), shift=shift, scale=scale, objective=final, n_iter=n_iter,
                          converged=n_iter < int(max_iter))


@dataclass(frozen=True, eq=False)
class WitnessCertificate:
    """The T4 certificate on the held-out split (nats).

    ``certified`` iff ``loss < teacher_information - margin``. ``best_constant_loss`` equals
    ``teacher_information`` (the eval split's I_T: the best input-independent student, the eval
    mean of T, pays exactly that); ``gap = I_T - loss``; ``relative_gap = gap / I_T`` (NaN when
    I_T = 0); ``relative_margin = margin / I_T``. ``fit_loss`` is the witness's alignment loss on
    the fit split.
    """

    teacher_information: float
    loss: float
    margin: float
    certified: bool
    best_constant_loss: float
    gap: float
    relative_gap: float
    relative_margin: float
    fit_loss: float
    n_fit: int
    n_eval: int
    witness: SoftmaxWitness | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_information": self.teacher_information, "loss": self.loss, "margin": self.margin,
                "certified": self.certified, "best_constant_loss": self.best_constant_loss, "gap": self.gap,
                "relative_gap": self.relative_gap, "relative_margin": self.relative_margin,
                "fit_loss": self.fit_loss, "n_fit": self.n_fit, "n_eval": self.n_eval}


def certificate_gap(T, W) -> tuple[float, float, float]:
    """``(I_T, L, G_T)`` of a witness ``W`` (m, K) against the teacher ``T`` (m, K) on the same rows: the teacher
    information, the alignment loss and the gap ``G_T = I_T - L`` (nats). The certificate's one kernel: T4
    (a fitted softmax witness) and W3 (the teacher-guided VAE's fixed simplex head) both decide by it; the
    latent mean is certified non-constant when ``G_T > margin``."""
    info = teacher_information(T)
    loss = alignment_loss(T, W)
    return info, loss, info - loss


@dataclass(frozen=True)
class ViewGap:
    """The view gap of a teacher seen through ``M`` sampled views of each of ``m`` rows (nats):

    * ``I_T``: the teacher information over the (row, view) pairs, what the best constant student pays;
    * ``gap`` ``G_V = mean_x [H(Tbar(x)) - mean_j H(T_j(x))]`` with ``Tbar(x) = mean_j T_j(x)``: for any student
      ``W(.|x)`` that reads only x, ``mean_{x,j} KL(T_j(x) || W(x)) = G_V + mean_x KL(Tbar(x) || W(x)) >= G_V``
      (equality at ``W = Tbar``), so no latent-only student aligns below ``G_V`` on these samples;
    * ``reachable`` ``= I_T - G_V = H(mean T) - mean_x H(Tbar(x))``, the information of the view-averaged teacher
      ``Tbar``: the largest certificate margin ``I_T - L`` any latent-only student can reach.
    """

    I_T: float  # noqa: N815 (the notes' symbol)
    gap: float
    reachable: float


def _views(T_views, name: str = "T_views") -> torch.Tensor:
    t = as_tensor(T_views, name=name, ndim=3, shape="(M, m, K)").detach().to(torch.float64)
    flat = _distribution_rows(t.reshape(-1, t.shape[-1]), name)
    return flat.reshape(t.shape)


def view_gap(T_views) -> ViewGap:
    """:class:`ViewGap` of ``T_views`` (M, m, K): teacher distributions of M sampled views of m rows."""
    t = _views(T_views)
    tbar = t.mean(dim=0)
    h_views = _entropy_rows(t).mean()
    info = float(_entropy_rows(t.mean(dim=(0, 1))) - h_views)
    gap = float(_entropy_rows(tbar).mean() - h_views)
    reach = float(_entropy_rows(t.mean(dim=(0, 1))) - _entropy_rows(tbar).mean())
    return ViewGap(max(info, 0.0), max(gap, 0.0), max(reach, 0.0))


def view_certificate(T_views, W) -> tuple[ViewGap, float]:
    """``(view_gap(T_views), L)``: the gap and the alignment loss ``L = mean_{x,j} KL(T_j(x) || W(x))`` of a
    student ``W`` (m, K) (one distribution per row, the same for every view of it) or ``W`` (M, m, K) (a student
    that sees each view: the gap's premise broken, so it may align below ``G_V``). The certificate's kernel under
    views: :func:`certificate_gap` on the (row, view) pairs gives ``I_T - L``."""
    t = _views(T_views)
    w = as_tensor(W, name="W", shape="(m, K) or (M, m, K)").detach().to(torch.float64)
    if w.dim() == 2 and tuple(w.shape) == tuple(t.shape[1:]):
        w = w.unsqueeze(0).expand_as(t)
    if tuple(w.shape) != tuple(t.shape):
        raise InputError(f"The 'W' argument must have shape {tuple(t.shape[1:])} or {tuple(t.shape)} (as T_views); "
                         f"got {tuple(w.shape)}.")
    info, loss, _ = certificate_gap(t.reshape(-1, t.shape[-1]), w.reshape(-1, w.shape[-1]))
    g = view_gap(t)
    return ViewGap(info, g.gap, g.reachable), loss


def certify_nonconstant(features_fit, T_fit, features_eval, T_eval, *, margin: float = 0.05,
                        **fit_kw) -> WitnessCertificate:
    """Certify that the latent mean is not constant in x (claims.md T4).

    Fits :func:`fit_softmax_witness` on ``(features_fit (m1, d), T_fit (m1, K))``, evaluates its
    alignment loss on the held-out ``(features_eval (m2, d), T_eval (m2, K))``, and certifies iff
    that loss is below the eval split's teacher information minus ``margin`` (nats, >= 0).
    ``fit_kw`` goes to :func:`fit_softmax_witness` (``l2``, ``max_iter``, ``device``).
    """
    mg = float(margin)
    if not (math.isfinite(mg) and mg >= 0):
        raise InputError(f"The 'margin' parameter must be a finite float >= 0 (nats). Got {margin!r}.")
    f_eval, t_eval = _features_and_teacher(features_eval, T_eval, "features_eval", "T_eval")
    f_fit, t_fit = _features_and_teacher(features_fit, T_fit, "features_fit", "T_fit")
    if f_fit.shape[1] != f_eval.shape[1] or t_fit.shape[1] != t_eval.shape[1]:
        raise InputError(f"The fit and eval splits must have the same columns; got features {tuple(f_fit.shape)} vs "
                         f"{tuple(f_eval.shape)} and teachers {tuple(t_fit.shape)} vs {tuple(t_eval.shape)}.")
    witness = fit_softmax_witness(f_fit, t_fit, **fit_kw)
    info, loss, _ = certificate_gap(t_eval.to(witness.A.device), witness.predict(f_eval))
    fit_loss = alignment_loss(t_fit.to(witness.A.device), witness.predict(f_fit))
    gap = info - loss
    return WitnessCertificate(
        teacher_information=info, loss=loss, margin=mg, certified=bool(loss < info - mg), best_constant_loss=info,
        gap=gap, relative_gap=gap / info if info > 0 else math.nan,
        relative_margin=mg / info if info > 0 else math.inf, fit_loss=fit_loss,
        n_fit=int(f_fit.shape[0]), n_eval=int(f_eval.shape[0]), witness=witness)
