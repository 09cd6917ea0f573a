"""VAE architectures of the pipeline: MLP, convolutional and linear, behind one registry.

Every model exposes ``encode(x) -> (mu, logvar)`` with shapes ``(B, n)``, ``decode(z) -> xhat`` with
shape ``(B, N)`` (images are flattened), and ``collapsed_state(c)``: the state dict of the exactly
collapsed model of claims.md T2 (``q(z|x) = N(0, I)`` for every x, reconstruction the constant ``c``),
or ``None`` with the reason when the architecture cannot output an arbitrary constant.

The decoder is Gaussian with a FIXED variance ``s2 = m * lambda_max`` (paper eq. 2); ``s2`` lives in the
loss, not in the model. Rebuild any model from its config with :func:`build_model`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from hcdiag.errors import InputError, flag

Family = Literal["mlp", "conv", "linear"]

# Width presets: the paper's section 5.1.3 and its Table 3 disagree (claims.md, inconsistencies).
WIDTH_PRESETS = {
    "paper": ((256, 128), (128, 256)),          # section 5.1.3
    "table3": ((1024, 512, 256), (256, 512, 1024)),  # appendix B, Table 3
    "smoke": ((64, 32), (32, 64)),
}

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VAE; ``to_dict``/``from_dict`` round-trip through the run file."""

    family: Family = "mlp"
    input_dim: int = 32
    latent_dim: int = 8
    enc_widths: tuple[int, ...] = (256, 128)
    dec_widths: tuple[int, ...] = (128, 256)
    activation: str = "relu"
    image_shape: tuple[int, ...] | None = None  # (C, H, W) for the conv family
    channels: tuple[int, ...] = (32, 64)  # conv channels of the two encoder layers

    def __post_init__(self):
        if self.family not in MODEL_FAMILIES:
            raise InputError(f"The model family must be one of {sorted(MODEL_FAMILIES)}. Got {self.family!r}.")
        if self.latent_dim < 1 or self.input_dim < 1:
            raise InputError(f"The latent and input dimensions must be >= 1. Got latent {self.latent_dim}, input {self.input_dim}.")
        if self.activation not in _ACTIVATIONS:
            raise InputError(f"The activation must be one of {sorted(_ACTIVATIONS)}. Got {self.activation!r}.")
        if self.family == "conv":
            if not self.image_shape or len(self.image_shape) != 3:
                raise InputError("The conv family needs image_shape (C, H, W); use " + flag("--arch mlp", "family='mlp'")
                                 + " for data without an image shape.")
            c, h, w = self.image_shape
            if c * h * w != self.input_dim:
                raise InputError(f"image_shape {tuple(self.image_shape)} has {c * h * w} values but input_dim is {self.input_dim}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("enc_widths", "dec_widths", "channels", "image_shape"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("enc_widths", "dec_widths", "channels", "image_shape"):
            if kw.get(k) is not None:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)


def _mlp(widths, in_dim, act) -> tuple[nn.Sequential, int]:
    layers, d = [], in_dim
    for w in widths:
        layers += [nn.Linear(d, w), _ACTIVATIONS[act]()]
        d = w
    return nn.Sequential(*layers), d


class MLPVAE(nn.Module):
    """MLP encoder ``N -> widths -> (mu, logvar)`` and decoder ``n -> widths -> N`` (linear output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, h = _mlp(cfg.enc_widths, cfg.input_dim, cfg.activation)
        self.enc_mu = nn.Linear(h, cfg.latent_dim)
        self.enc_logvar = nn.Linear(h, cfg.latent_dim)
        self.dec_hidden, h = _mlp(cfg.dec_widths, cfg.latent_dim, cfg.activation)
        self.dec_out = nn.Linear(h, cfg.input_dim)

    def encode(self, x):
        h = self.encoder(x)
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z):
        return self.dec_out(self.dec_hidden(z))

    def collapsed_state(self, c):
        """Encoder mean/log-variance heads zero (q = N(0, I)), last decoder layer zero with bias ``c``."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for head in ("enc_mu", "enc_logvar"):
            sd[f"{head}.weight"].zero_()
            sd[f"{head}.bias"].zero_()
        sd["dec_out.weight"].zero_()
        sd["dec_out.bias"].copy_(torch.as_tensor(c, dtype=sd["dec_out.bias"].dtype))
        return sd, None


def _conv_out(size: int) -> int:  # Conv2d(k=3, s=2, p=1)
    return (size + 1) // 2


class ConvVAE(nn.Module):
    """Two Conv+activation layers (stride 2) and a transposed-conv decoder (paper 5.1.3, CIFAR-10)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.image_shape
        c1, c2 = cfg.channels[0], cfg.channels[-1]
        act = _ACTIVATIONS[cfg.activation]
        h1, w1 = _conv_out(h), _conv_out(w)
        h2, w2 = _conv_out(h1), _conv_out(w1)
        self._shapes = (c, h, w, c2, h1, w1, h2, w2)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, 3, stride=2, padding=1), act(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), act(), nn.Flatten())
        flat = c2 * h2 * w2
        self.enc_mu = nn.Linear(flat, cfg.latent_dim)
        self.enc_logvar = nn.Linear(flat, cfg.latent_dim)
        self.dec_in = nn.Sequential(nn.Linear(cfg.latent_dim, flat), act())
        # ConvTranspose2d(k=3, s=2, p=1) maps size s to 2s - 1 + output_padding
        self.dec_hidden = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=h1 - (2 * h2 - 1)), act())
        self.dec_out = nn.ConvTranspose2d(c1, c, 3, stride=2, padding=1, output_padding=h - (2 * h1 - 1))

    def encode(self, x):
        c, h, w = self._shapes[:3]
        hdn = self.encoder(x.reshape(-1, c, h, w))
        return self.enc_mu(hdn), self.enc_logvar(hdn)

    def decode(self, z):
        _, _, _, c2, _, _, h2, w2 = self._shapes
        hdn = self.dec_in(z).reshape(-1, c2, h2, w2)  # (B, C2, H2, W2)
        return self.dec_out(self.dec_hidden(hdn)).flatten(1)  # (B, N)

    def collapsed_state(self, c):
        return None, ("the conv decoder's last layer has one bias per channel, so it cannot output an "
                      "arbitrary constant image; the witness is evaluated in output space")


class LinearVAE(nn.Module):
    """Linear VAE (Lucas et al. 2019): ``mu = V x + c``, input-independent log-variance, ``xhat = W z + b``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_mu = nn.Linear(cfg.input_dim, cfg.latent_dim)
        self.enc_logvar = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.dec_out = nn.Linear(cfg.latent_dim, cfg.input_dim)

    def encode(self, x):
        mu = self.enc_mu(x)
        return mu, self.enc_logvar.expand_as(mu)

    def decode(self, z):
        return self.dec_out(z)

    def collapsed_state(self, c):
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        sd["enc_mu.weight"].zero_()
        sd["enc_mu.bias"].zero_()
        sd["enc_logvar"].zero_()
        sd["dec_out.weight"].zero_()
        sd["dec_out.bias"].copy_(torch.as_tensor(c, dtype=sd["dec_out.bias"].dtype))
        return sd, None


MODEL_FAMILIES: dict[str, type[nn.Module]] = {"mlp": MLPVAE, "conv": ConvVAE, "linear": LinearVAE}


def build_model(cfg: ModelConfig | dict, *, seed: int | None = None, device="cpu") -> nn.Module:
    """Build a model from its config; ``seed`` fixes the initialisation (same seed, same init)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODEL_FAMILIES[cfg.family](cfg)
    else:
        model = MODEL_FAMILIES[cfg.family](cfg)
    return model.to(device)


@torch.no_grad()
def encode_decode(model: nn.Module, x: torch.Tensor, batch_size: int = 4096):
    """Deterministic evaluation: ``mu, logvar = encode(x)``, ``xhat = decode(mu)`` (claims.md Notation).

    Returns ``(mu (m, n), logvar (m, n), xhat (m, N))`` in float32, computed in batches.
    """
    was_training = model.training
    model.eval()
    mus, lvs, xhs = [], [], []
    for start in range(0, x.shape[0], batch_size):
        mu, lv = model.encode(x[start:start + batch_size])
        mus.append(mu)
        lvs.append(lv)
        xhs.append(model.decode(mu))
    model.train(was_training)
    return torch.cat(mus), torch.cat(lvs), torch.cat(xhs)


def parameter_vector(state: dict) -> torch.Tensor:
    """All floating tensors of a state dict flattened into one float64 vector (for distances)."""
    return torch.cat([v.detach().reshape(-1).double().cpu() for v in state.values() if torch.is_floating_point(v)])


def parameter_distance(a: dict, b: dict) -> float:
    """``||a - b||_2`` over the floating tensors of state dict ``a`` (matched by name in ``b``, so the key
    order of ``b`` does not matter), in float64."""
    keys = [k for k in a if torch.is_floating_point(a[k])]
    return float(torch.linalg.vector_norm(parameter_vector({k: a[k] for k in keys}) -
                                          parameter_vector({k: b[k] for k in keys})))


__all__ = ["ModelConfig", "MLPVAE", "ConvVAE", "LinearVAE", "MODEL_FAMILIES", "WIDTH_PRESETS", "build_model",
           "encode_decode", "parameter_vector", "parameter_distance"]
