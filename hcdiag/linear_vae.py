"""A trainable linear VAE (Lucas et al. 2019), the model whose optimum ``hcdiag.theory`` knows.

Encoder ``q(z|x) = N(V x + c, diag(exp(logvar)))`` with an input-independent, learned log-variance;
decoder ``p(x|z) = N(W z + b, s2 I)`` with the decoder variance ``s2`` FIXED (paper eq. 2; it lives
in the loss, not in the model). :func:`fit_linear_vae` trains it with Adam and measures the
collapse metrics of claims.md (KL per dimension, ``Var_x(mu)``, active units) so they can be
compared with :func:`hcdiag.theory.linear_vae_optimum` (claim P1).

Parameter names (``enc_mu``, ``enc_logvar``, ``dec_out``) are those of the ``linear`` family in
``hcdiag.models``, so state dicts are interchangeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


from hcdiag.errors import InputError, NumericalError
from hcdiag.models import LinearVAE as _ModelsLinearVAE
from hcdiag.models import ModelConfig
from hcdiag.theory import AU_THRESHOLD, _positive_float, _positive_int
from hcdiag.validation import as_data_matrix


class LinearVAE(_ModelsLinearVAE):
    """The ``linear`` family of :mod:`hcdiag.models` built from its two sizes.

    ``mu = V x + c``, ``logvar`` a learned vector of shape (n,), ``xhat = W z + b``;
    ``encode``, ``decode`` and ``collapsed_state`` are the family's. ``forward(x)`` is the
    deterministic reconstruction ``decode(mu(x))`` (claims.md Notation) returned with ``(mu, logvar)``.
    """

    def __init__(self, input_dim: int, latent_dim: int):
        input_dim = _positive_int(input_dim, "input_dim")
        latent_dim = _positive_int(latent_dim, "latent_dim")
        super().__init__(ModelConfig(family="linear", input_dim=input_dim, latent_dim=latent_dim))
        self.input_dim, self.latent_dim = input_dim, latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(mu), mu, logvar


@dataclass(frozen=True)
class LinearVAEMetrics:
    """Collapse metrics of a linear VAE on data x (mean over the rows of x).

    Per-dimension arrays have shape ``(latent_dim,)``; KL in nats; ``neg_elbo = recon + kl`` in
    nats per sample with the expectation over ``q`` of the Gaussian reconstruction term in closed
    form; ``mu_var`` the population (ddof 0) variance over x; ``active`` is Burda's
    ``Var_x(mu_j) > 0.01``.
    """

    s2: float
    kl_per_dim: np.ndarray
    kl: float
    mu_var: np.ndarray
    posterior_var: np.ndarray
    neg_elbo: float
    recon: float
    active: np.ndarray

    @property
    def au_burda(self) -> int:
        return int(self.active.sum())

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("s2", "kl", "neg_elbo", "recon")}
        for k in ("kl_per_dim", "mu_var", "posterior_var", "active"):
            out[k] = getattr(self, k).tolist()
        out["au_burda"] = self.au_burda
        return out


@dataclass(frozen=True)
class LinearVAEFit(LinearVAEMetrics):
    """A trained linear VAE and its measured collapse metrics (mean over the training data).

    Per-dimension arrays have shape ``(latent_dim,)`` in the model's latent order (not sorted).
    KL values in nats; ``neg_elbo`` and ``recon`` in nats per sample, with the expectation over
    ``q`` of the Gaussian reconstruction term in closed form. ``active`` is Burda's criterion
    ``Var_x(mu_j) > 0.01``. ``model`` holds float64 parameters in the data's original units (CPU).
    ``final_loss`` is the last training loss (nats per sample, in the ``s2 = 1`` training units,
    without the constant ``0.5 N log(2 pi s2)``); ``loss_change`` its absolute change over the
    last 10% of the steps, a convergence indicator.
    """

    model: LinearVAE = field(repr=False, default=None)
    latent_dim: int = 0
    steps: int = 0
    final_loss: float = float("nan")
    loss_change: float = float("nan")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "latent_dim": self.latent_dim, "steps": self.steps,
                "final_loss": self.final_loss, "loss_change": self.loss_change}


def _neg_elbo_terms(x, V, c, logvar, W, b, s2: float):
    """Per-sample analytic negative ELBO terms in nats, averaged over the rows of x (B, N).

    Reconstruction: ``E_q ||x - W z - b||^2 = ||x - W mu - b||^2 + sum_j ||W_j||^2 sigma_j^2``
    (z = mu + sigma * eps, eps ~ N(0, I)); KL to N(0, I) per dimension
    ``0.5 (sigma^2 + mu^2 - 1 - log sigma^2)``. Returns (recon, kl_per_dim (n,)).
    """
    N = x.shape[1]
    mu = x @ V.T + c                                   # (B, n)
    var = logvar.exp()                                 # (n,)
    resid = x - mu @ W.T - b                           # (B, N)
    sq = (resid ** 2).sum(1).mean() + ((W ** 2).sum(0) * var).sum()
    recon = 0.5 * N * math.log(2 * math.pi * s2) + sq / (2 * s2)
    kl_per_dim = 0.5 * (var + (mu ** 2).mean(0) - 1.0 - logvar)
    return recon, kl_per_dim


def fit_linear_vae(x, s2: float, latent_dim: int, *, steps: int = 3000, lr: float = 0.05,
                   batch_size: Optional[int] = None, device="auto", seed: int = 0, analytic: bool = True,
                   dtype=torch.float64) -> LinearVAEFit:
    """Train a :class:`LinearVAE` with Adam at fixed decoder variance ``s2`` and measure it.

    Parameters
    ----------
    x : array of shape (n_samples, N)
        Training data (validated with :func:`hcdiag.validation.as_data_matrix`).
    s2 : float > 0
        Decoder variance, squared data units.
    latent_dim : int
        Latent dimension n.
    steps, lr : Adam steps and peak learning rate (cosine-decayed to 1% of it).
    batch_size : int or None
        None: full batch. With ``analytic=True`` the full-batch loss is quadratic in x, so its mean
        over the data depends on x only through its mean and covariance; it is evaluated from the
        (N, N) covariance, exactly the same loss and gradient as the full data batch but O(N^2 n)
        per step. An integer: minibatches of that many rows, reshuffled every pass.
    analytic : bool
        True: the expectation over q of the reconstruction term in closed form (deterministic
        training). False: one reparameterised sample of z per row.
    device, seed, dtype : compute device, seed of the initialisation and shuffling, dtype.

    Training runs in units where ``s2 = 1`` (data centred once and divided by ``sqrt(s2)``), which
    leaves the optimum's KL and ``Var_x(mu)`` unchanged and keeps Adam's steps on the scale of the
    parameters; the returned model is mapped back to the original units.
    """
    from hcdiag.device import resolve_device

    s2 = _positive_float(s2, "s2")
    latent_dim = _positive_int(latent_dim, "latent_dim")
    steps = _positive_int(steps, "steps")
    lr = _positive_float(lr, "lr")
    if batch_size is not None:
        batch_size = _positive_int(batch_size, "batch_size")
    x, _ = as_data_matrix(x, name="data")
    dev = resolve_device(device)
    X = torch.as_tensor(np.asarray(x), dtype=dtype, device=dev)
    n_rows, N = X.shape
    mean = X.mean(0)
    scale = math.sqrt(s2)
    Xn = (X - mean) / scale                                 # centred, units where s2 = 1
    use_cov = batch_size is None and analytic
    if use_cov:
        cov = Xn.T @ Xn / n_rows                            # (N, N), 1/n normalised like the spectrum
        tr_cov = torch.trace(cov)

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LinearVAE(N, latent_dim)
    model = model.to(device=dev, dtype=dtype)
    V, c = model.enc_mu.weight, model.enc_mu.bias
    W, b = model.dec_out.weight, model.dec_out.bias
    logvar = model.enc_logvar
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))

    def loss_cov():
        # Mean over x of the analytic neg ELBO, from the covariance of the centred data (mean 0):
        # E||x - W(Vx + c) - b||^2 = tr(cov) - 2 tr(W V cov) + tr(W^T W V cov V^T) + ||W c + b||^2,
        # O(n N^2) per step (never forms the (N, N) matrix I - W V).
        var = logvar.exp()
        VC = V @ cov                                        # (n, N)
        M = VC @ V.T                                        # (n, n) = Cov_x(mu)
        sq = (tr_cov - 2 * (W.T * VC).sum() + ((W.T @ W) * M).sum()
              + ((W @ c + b) ** 2).sum() + ((W ** 2).sum(0) * var).sum())
        kl = 0.5 * (var + torch.diagonal(M) + c ** 2 - 1.0 - logvar)
        return 0.5 * sq + kl.sum()

    def loss_batch(xb):
        mu = xb @ V.T + c                                   # (B, n)
        var = logvar.exp()
        if analytic:
            sq = ((xb - mu @ W.T - b) ** 2).sum(1).mean() + ((W ** 2).sum(0) * var).sum()
        else:
            eps = torch.randn(mu.shape, generator=gen, dtype=dtype).to(dev)
            z = mu + var.sqrt() * eps
            sq = ((xb - z @ W.T - b) ** 2).sum(1).mean()
        kl = 0.5 * (var + (mu ** 2).mean(0) - 1.0 - logvar)
        return 0.5 * sq + kl.sum()

    history = []
    bs = n_rows if batch_size is None else min(batch_size, n_rows)
    # Each step is a few small products ((n, N) for the covariance loss, (bs, N) for batches):
    # intra-op threads only add overhead there (measured 10-30x slower with 2 threads on a loaded
    # 2-core machine), so small problems run on one CPU thread, restored afterwards.
    threads = torch.get_num_threads()
    if dev.type == "cpu" and (N * N if use_cov else bs * N) <= 4_000_000:
        torch.set_num_threads(1)
    try:
        _train(steps, use_cov, loss_cov, loss_batch, opt, sched, history, Xn, bs, gen, dev)
    finally:
        torch.set_num_threads(threads)
    if not all(math.isfinite(h) for h in history[-10:]):
        raise NumericalError(f"Linear VAE training diverged (loss {history[-1]}); lower 'lr' (got {lr}).")
    tail = max(1, steps // 10)
    loss_change = abs(history[-1] - history[-tail - 1]) if steps > tail else float("nan")

    # Back to the original units: x = mean + scale * xn.
    with torch.no_grad():
        V.div_(scale)
        c.sub_(V @ mean)
        W.mul_(scale)
        b.mul_(scale).add_(mean)
        met = _measure(model, X, s2)
    model = model.cpu()
    return LinearVAEFit(model=model, s2=s2, latent_dim=latent_dim, steps=steps,
                        kl_per_dim=met.kl_per_dim, kl=met.kl, mu_var=met.mu_var,
                        posterior_var=met.posterior_var, neg_elbo=met.neg_elbo, recon=met.recon,
                        active=met.active, final_loss=history[-1], loss_change=float(loss_change))


def measure_linear_vae(model: LinearVAE, x, s2: float, *, device="auto") -> LinearVAEMetrics:
    """KL per dimension, ``Var_x(mu)``, posterior variance and the analytic negative ELBO of
    ``model`` on data ``x`` (shape (n_samples, N)) at decoder variance ``s2``; float64."""
    from hcdiag.device import resolve_device

    s2 = _positive_float(s2, "s2")
    x, _ = as_data_matrix(x, name="data")
    if x.shape[1] != model.input_dim:
        raise InputError(f"The data has {x.shape[1]} columns but the model's input_dim is {model.input_dim}; "
                         "pass data of the dimension the model was built for.")
    dev = resolve_device(device)
    m = LinearVAE(model.input_dim, model.latent_dim).to(device=dev, dtype=torch.float64)
    m.load_state_dict({k: v.detach().to(dev, torch.float64) for k, v in model.state_dict().items()})
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=dev)
    with torch.no_grad():
        return _measure(m, X, s2)


def _train(steps, use_cov, loss_cov, loss_batch, opt, sched, history, Xn, bs, gen, dev):
    n_rows = Xn.shape[0]
    perm, pos = None, n_rows
    for _ in range(steps):
        if use_cov:
            loss = loss_cov()
        else:
            if pos + bs > n_rows:
                perm, pos = torch.randperm(n_rows, generator=gen).to(dev), 0
            loss = loss_batch(Xn[perm[pos:pos + bs]])
            pos += bs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))


@torch.no_grad()
def _measure(model: LinearVAE, X: torch.Tensor, s2: float, chunk: int = 65536):
    """Metrics of ``model`` over X (n, N), both float64 on the same device, in row chunks."""
    V, c = model.enc_mu.weight, model.enc_mu.bias
    W, b = model.dec_out.weight, model.dec_out.bias
    logvar = model.enc_logvar
    n_rows = X.shape[0]
    recon = 0.0
    kl = torch.zeros_like(logvar)
    s1 = torch.zeros_like(logvar)
    s2m = torch.zeros_like(logvar)
    for start in range(0, n_rows, chunk):
        xb = X[start:start + chunk]
        w = xb.shape[0] / n_rows
        r, k = _neg_elbo_terms(xb, V, c, logvar, W, b, s2)
        recon += float(r) * w
        kl += k * w
        mu = xb @ V.T + c
        s1 += mu.sum(0)
        s2m += (mu ** 2).sum(0)
    m1 = s1 / n_rows
    mu_var = (s2m / n_rows - m1 ** 2).clamp_min(0.0).cpu().numpy()  # population variance (ddof 0)
    kl = kl.cpu().numpy()
    return LinearVAEMetrics(s2=s2, kl_per_dim=kl, kl=float(kl.sum()), mu_var=mu_var,
                            posterior_var=logvar.exp().cpu().numpy(), neg_elbo=float(recon + kl.sum()),
                            recon=float(recon), active=mu_var > AU_THRESHOLD)
