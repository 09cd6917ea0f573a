"""The settings of a training run: one frozen config, its validation, and the presets.

Presets fill a :class:`TrainConfig`; any field can be overridden (``make_config``); the method's name must
be one of the registry's (:mod:`hcdiag.train.methods`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from hcdiag.errors import InputError
from hcdiag.models import WIDTH_PRESETS
from hcdiag.paper import LOSS_CONVENTIONS


# The readings of HCT's "epoch" (stage 1: "Train the VAE for E epochs, cycling through all clustering results in
# R_t", section 4.2.1; Algorithm 1: one batch per clustering per epoch). Each is one optimizer-step schedule:
#   steps      Algorithm 1: an epoch gives each active clustering steps_per_clustering steps (default 1);
#   epochs     an epoch gives each active clustering a full pass over the data, so round t costs E |S_t| passes
#              and stage 1 at R0 = 16, E = 30 costs 30 (16 + 8 + 4) = 840 passes: bench paper_plan measured
#              6.9-8.3 h per run on Fashion-MNIST (one thread), ~9-10x a 100-epoch vanilla run;
#   data_pass  an epoch is one pass over the data whose steps cycle through the active clusterings (the run's
#              step s on active[s mod |S_t|], the rotation going on across epochs so each clustering gets the
#              same steps within one), so each round costs E passes whatever |S_t| is: stage 1 is 90 passes and
#              a whole run (refinement capped at 100, stage 3 30) about 220, ~2.2x vanilla.
# The paper states its cost twice, "the total training time remains acceptable (2-3x vanilla VAE)" (section
# 6.2) and "approximately 4-6 hours per dataset, compared to 1-2 hours for vanilla VAE" (Appendix B.2); only
# data_pass fits both, so it is the paper preset's reading. The others stay options (--epoch-unit), and every
# run file records its reading (config.hct.epoch_unit).
EPOCH_UNITS = ("steps", "epochs", "data_pass")


def method_names() -> tuple[str, ...]:
    """The registered methods (the CLI's ``--method`` choices)."""
    from hcdiag.train.methods import METHODS

    return tuple(METHODS)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; presets fill it, flags override any field."""

    method: str = "hct"
    multiple: float = 2.0
    loss: str = "literal"
    # architecture
    arch: str = "mlp"
    latent_dim: int = 8
    enc_widths: tuple[int, ...] = (256, 128)
    dec_widths: tuple[int, ...] = (128, 256)
    activation: str = "relu"
    channels: tuple[int, ...] = (32, 64)
    # optimisation
    lr: float = 3e-3
    batch_size: int = 512
    epochs: int = 30  # baselines and references: data epochs
    # clusterings (stage 0)
    r0: int = 16
    k: int = 8
    covariance: str = "diag"
    em_backend: str = "sklearn"
    em_init: str = "kmeans"
    uneven: bool = False
    # Historical Consensus
    mode: str = "cycle"
    epoch_unit: str = "steps"
    steps_per_clustering: int = 1
    epochs_per_round: int = 30
    keep_ratio: float = 0.5
    eps: float = 1e-4
    refine_cap: int = 200
    stage3_epochs: int = 30
    stage3_snapshots: int = 4
    # the teacher-guided VAE (companion notes, hcdiag.train.methods.teacher)
    teacher_alpha: float = 1.0
    witness_beta: float = 1.0
    teacher_view: str = "identity"  # what the teacher sees of x (hcdiag.views): identity, noise:s, shift:p, pool:k
    teacher_view_samples: int = 4  # samples of a random view per row
    teacher_features: str = "input"  # the teacher's GMM on x (input) or on its top-d principal components (pca:d)
    beta_schedule: str = "linear"
    beta_start: float = 1.0
    beta_end: float = 4.0
    # baselines
    kl_weight: float = 1.0
    anneal_epochs: int = 10
    free_bits: float = 0.1
    # He et al. 2019 aggressive schedule: encoder-only steps before each decoder step, at most
    # aggressive_max_inner, stopped early when the mean loss of a block of aggressive_check_every steps
    # is higher than the previous block's (their text.py: sub_iter < 100, sub_iter % 15)
    aggressive_max_inner: int = 100
    aggressive_check_every: int = 15
    # EM-type training (ICASSP 2023; hcdiag.train.methods.em_type): per batch an E-step of encoder-only steps
    # until the mean loss of a block of em_check_every steps improves by less than em_tol (relative) or
    # em_max_e_steps were taken, then em_m_steps decoder-only steps
    em_max_e_steps: int = 20
    em_check_every: int = 5
    em_tol: float = 1e-3
    em_m_steps: int = 1
    baseline_snapshots: int = 5
    # references
    references: tuple[str, ...] = ("collapsed", "vanilla", "control")
    collapsed_multiple: float = 10.0
    # evaluation and run
    eval_rows: int = 4096
    # the main model's start: a snapshot of another run file (the rescue experiment of the companion notes:
    # restart from a collapsed checkpoint), else a fresh initialisation from the seed
    init_from: str | None = None
    init_snapshot: str = "final"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False

    def __post_init__(self):
        _validate_config(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


def _validate_config(c: TrainConfig) -> None:
    def choice(name, allowed):
        if getattr(c, name) not in allowed:
            raise InputError(f"The '{name}' parameter must be one of {', '.join(map(str, allowed))}. Got {getattr(c, name)!r}.")

    choice("method", method_names())
    choice("loss", LOSS_CONVENTIONS)
    choice("arch", ("mlp", "conv", "linear"))
    choice("mode", ("cycle", "simultaneous"))
    choice("epoch_unit", EPOCH_UNITS)
    choice("covariance", ("diag", "full"))
    choice("em_backend", ("sklearn", "torch"))
    choice("em_init", ("kmeans", "random"))
    choice("beta_schedule", ("constant", "linear", "warmup"))
    if not (isinstance(c.multiple, (int, float)) and math.isfinite(c.multiple) and c.multiple > 0):
        raise InputError(f"The 'multiple' parameter must be a float > 0. Got {c.multiple}.")
    for name in ("lr", "eps", "collapsed_multiple"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"The '{name}' parameter must be a float > 0. Got {v}.")
    for name in ("latent_dim", "batch_size", "epochs", "k", "steps_per_clustering", "epochs_per_round",
                 "refine_cap", "eval_rows", "aggressive_max_inner", "aggressive_check_every", "em_max_e_steps",
                 "em_check_every", "em_m_steps"):
        if int(getattr(c, name)) < 1:
            raise InputError(f"The '{name}' parameter must be an integer >= 1. Got {getattr(c, name)}.")
    for name in ("stage3_epochs", "anneal_epochs", "stage3_snapshots"):
        if int(getattr(c, name)) < 0:
            raise InputError(f"The '{name}' parameter must be an integer >= 0. Got {getattr(c, name)}.")
    if not 0 < c.keep_ratio < 1:
        raise InputError(f"The 'keep_ratio' parameter must lie in (0, 1). Got {c.keep_ratio}.")
    for f in fields(c):  # NaN passes every comparison below: --free-bits nan would train without free bits
        v = getattr(c, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"The '{f.name}' parameter must be a finite number. Got {v}.")
    from hcdiag.views import parse_view

    parse_view(c.teacher_view)
    from hcdiag.train.methods.teacher import parse_features

    parse_features(c.teacher_features)
    if not (isinstance(c.teacher_view_samples, int) and c.teacher_view_samples >= 1):
        raise InputError(f"The 'teacher_view_samples' parameter must be an integer >= 1. Got {c.teacher_view_samples!r}.")
    if not c.witness_beta > 0:
        raise InputError(f"The 'witness_beta' parameter must be a float > 0. Got {c.witness_beta}.")
    if c.kl_weight < 0 or c.free_bits < 0 or c.beta_start < 0 or c.beta_end < 0 or c.teacher_alpha < 0:
        raise InputError("The weights kl_weight, free_bits, beta_start, beta_end and teacher_alpha must be >= 0.")
    if not c.em_tol >= 0:
        raise InputError(f"The 'em_tol' parameter must be a float >= 0. Got {c.em_tol}.")
    bad = [r for r in c.references if r not in ("collapsed", "vanilla", "control")]
    if bad:
        raise InputError(f"Unknown reference(s) {bad}; choose among collapsed, vanilla, control.")
    if c.method == "hct":
        from hcdiag.clusterings import check_r0


        check_r0(c.r0, uneven=c.uneven or c.keep_ratio != 0.5)


PRESETS: dict[str, dict] = {
    # The whole run, references included, within ~90 s on a 2-core CPU (synthetic data).
    "smoke": dict(enc_widths=WIDTH_PRESETS["smoke"][0], dec_widths=WIDTH_PRESETS["smoke"][1], latent_dim=8,
                  batch_size=256, lr=3e-3, epochs=8, r0=16, k=8, em_backend="torch", epochs_per_round=10,
                  steps_per_clustering=16, refine_cap=60, stage3_epochs=30, stage3_snapshots=4, eps=1e-4,
                  eval_rows=2048),
    # The paper's section 5.1 settings with Table 3's architecture, meant for a GPU. R0 = 16 (section
    # 5.5.1; Table 3's 24 is not a power of two) and eps = 1e-4 (Table 3; section 4.2.2 says 1e-5). Its epoch
    # is a data pass cycling through the active clusterings (EPOCH_UNITS: the reading that fits the paper's cost).
    "paper": dict(enc_widths=WIDTH_PRESETS["table3"][0], dec_widths=WIDTH_PRESETS["table3"][1], latent_dim=48,
                  batch_size=512, lr=3e-3, epochs=100, r0=16, k=8, em_backend="torch", epoch_unit="data_pass",
                  epochs_per_round=30, refine_cap=100, stage3_epochs=30, stage3_snapshots=6, eps=1e-4,
                  eval_rows=5000),
}


def make_config(preset: str | None = "smoke", **overrides) -> TrainConfig:
    """A config from a preset (``smoke`` or ``paper``) with any field overridden."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"The 'preset' parameter must be one of {', '.join(PRESETS)}. Got {preset!r}.")
    base = dict(PRESETS.get(preset, {})) if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)
