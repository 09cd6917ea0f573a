"""A producer of its own: a plain PyTorch VAE trained in its own loop, written as an hcdiag run file (docs/runfile.md).
Only its parameter names follow the `mlp` family, so hcdiag rebuilds the snapshots and recomputes what it checks.
Run: python docs/examples/own_trainer.py run.pt && hcdiag check-barrier run.pt (a vanilla VAE: no HCT rounds).
This writes the dict by hand to show the contract; hcdiag.Recorder does it for you (README, "Your own training loop")."""
import sys

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from hcdiag.data import load
from hcdiag.runfile import save_run


class VAE(nn.Module):
    def __init__(self, N, n=4, w=64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(N, w), nn.ReLU())  # state_dict keys encoder.0.weight, ...
        self.dec_hidden = nn.Sequential(nn.Linear(n, w), nn.ReLU())
        self.enc_mu, self.enc_logvar, self.dec_out = nn.Linear(w, n), nn.Linear(w, n), nn.Linear(w, N)

    def forward(self, x, sample=True):  # -> mu, logvar, xhat; xhat = f(mu) without sampling (evaluation)
        h = self.encoder(x)
        mu, lv = self.enc_mu(h), self.enc_logvar(h)
        return mu, lv, self.dec_out(self.dec_hidden(mu + torch.randn_like(mu) * (0.5 * lv).exp() if sample else mu))


def train(x, s2, epochs=6, seed=0):  # -> model, {"epoch0": state_dict, ..., "epoch6": state_dict}
    torch.manual_seed(seed)
    model, snaps = VAE(x.shape[1]), {}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs + 1):
        snaps[f"epoch{epoch}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for idx in torch.randperm(len(x)).split(128) if epoch < epochs else []:
            mu, lv, xhat = model(x[idx])  # negative ELBO, decoder variance s2 fixed (paper eq. 2)
            loss = ((x[idx] - xhat) ** 2).sum(1) / (2 * s2) + 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum(1)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
    return model, snaps


def main(out):
    data = load("synthetic", n_samples=2000, dim=16, k=4, seed=0).x  # (2000, 16); the first 500 rows evaluate
    x, ev = torch.from_numpy(data), torch.from_numpy(data[:500])
    eig = torch.linalg.eigvalsh(torch.from_numpy(np.cov(data.T))).flip(0).clamp_min(0).float()  # descending
    lam, gmms = float(eig[0]), [GaussianMixture(4, covariance_type="diag", random_state=s).fit(data) for s in range(4)]
    (model, snaps), (collapsed, _) = train(x, 2 * lam), train(x, 10 * lam, seed=1)
    with torch.no_grad():
        mu, lv, xhat = model(ev, sample=False)  # stored beside the last snapshot: hcdiag compares the two
    stack = lambda f: torch.tensor(np.stack([f(g) for g in gmms])).float()  # noqa: E731, one row per EM run
    save_run({"format": "hcdiag-run", "version": 1,
              "config": {"method": "vanilla", "s2": 2 * lam, "multiple": 2.0, "loss": "literal", "seed": 0,
                         "model": {"family": "mlp", "input_dim": 16, "latent_dim": 4, "enc_widths": [64],
                                   "dec_widths": [64], "activation": "relu"}},
              "eval": {"x": ev, "xbar": x.mean(0), "eigenvalues": eig[:10]},
              "clusterings": {"centroids": stack(lambda g: g.means_), "weights": stack(lambda g: g.weights_),
                              "seeds": torch.arange(4), "loglik": stack(lambda g: g.score(data)),
                              "covariance_type": "diag", "resp": stack(lambda g: g.predict_proba(data[:500]))},
              "snapshots": snaps, "snapshot_order": list(snaps),
              "outputs": {"epoch6": {"mu": mu, "logvar": lv, "xhat": xhat}},
              "references": {"collapsed": {"config": {"method": "vanilla", "s2": 10 * lam, "multiple": 10.0},
                                           "state": collapsed.state_dict()}}}, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run.pt")
