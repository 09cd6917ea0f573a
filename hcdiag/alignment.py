"""Permutation alignment of two VAEs of one architecture: weight matching (Ainsworth, Hayase & Srinivasa
2023, "Git Re-Basin", Algorithm "weight matching"), for check I3's permutation-aligned distance.

Permuting the hidden units of a layer (the rows of its weight and bias, and the matching columns of
the next layer's weight) leaves the network's function unchanged, so ``||Theta_A - Theta_B||_2`` can
be large between two models that compute the same thing. The aligned distance is

    min over permutations P of ||Theta_A - P(Theta_B)||_2,

approximated by coordinate descent: for one permutation at a time, with the others fixed, the
problem ``max_P <Theta_A, P(Theta_B)>`` is a linear assignment problem, solved exactly by
:func:`scipy.optimize.linear_sum_assignment`; the layers are visited in a random order (from a seeded
generator) each pass, until a pass changes no permutation (or ``max_iter`` passes). A layer whose
neighbours did not move since it was last solved is not solved again (the answer would be the same),
so when the identity is already optimal, as between models trained from one initialisation, one pass
of one assignment per layer settles it. The similarity matrices are formed in float32 by default
(the paper preset's 784-1024-512-256 MLP: about 3.5 GMAC per pass); a new assignment is accepted only
if it raises ``<Theta_A, P(Theta_B)>`` in float64, so the descent starts at the identity and never
goes up: the aligned distance never exceeds the raw one. Coordinate descent is a local method: it
can stop short of the minimum, on narrow nets or against an exactly collapsed model (zero heads and
output layer leave the decoder's units nothing fixed to be matched by); the value is then still
between the minimum and the raw distance.

Which units are permuted (one *permutation group* per layer of units, named after that layer):

* ``mlp``: every hidden layer of the encoder (``encoder.0``, ``encoder.2``, ...) and of the decoder
  (``dec_hidden.0``, ...).
* ``conv``: the channels of both encoder convolutions (``encoder.0``, ``encoder.2``; the second one's
  channels are blocks of ``h2 * w2`` columns of the heads after ``Flatten``), the channels of the
  decoder's input layer (``dec_in.0``, blocks of ``h2 * w2`` rows before the reshape) and of its
  transposed convolution (``dec_hidden.0``).
* ``linear``: no hidden layer, so only the latent group below applies (with ``latent=False`` the
  aligned distance is the raw one).
* ``latent`` (every family, on by default): the latent dimensions, consistently in the ``mu`` and
  ``logvar`` heads' rows and the first decoder layer's columns. This is a symmetry of the VAE, not
  of the encoder as a function: ``mu(x)`` and ``logvar(x)`` come out with their coordinates
  permuted, but the prior ``N(0, I)`` is isotropic and the posterior diagonal, so the KL (a sum over
  dimensions), the active-unit count, ``xhat = f(mu(x))`` and every clustering loss are unchanged.
  ``latent=False`` aligns hidden units only. The sign flip ``z_j -> -z_j`` (``mu_j`` and the decoder's
  column negated, ``logvar_j`` kept) is a further exact symmetry that is NOT quotiented out, so the
  aligned distance is an upper bound of the distance between the two symmetry orbits.

The activations are elementwise (ReLU, ELU, tanh, GELU, leaky ReLU), which is what makes these
permutations exact.

A permutation ``perm`` of a group of ``k`` units maps position ``i`` of the aligned model to unit
``perm[i]`` of model B: ``P(W)`` is ``W.index_select(axis, perm)`` on every axis the group acts on.

>>> import torch
>>> from hcdiag.models import ModelConfig, build_model
>>> cfg = ModelConfig(input_dim=6, latent_dim=2, enc_widths=(5,), dec_widths=(4,))
>>> a = build_model(cfg, seed=0).state_dict()
>>> spec = permutation_spec(cfg)
>>> shuffled = permute(a, {name: torch.randperm(k) for name, k in spec.sizes.items()}, spec)
>>> round(aligned_distance(a, shuffled, cfg), 12)
0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hcdiag.errors import InputError
from hcdiag.models import MODEL_FAMILIES, ModelConfig, parameter_distance


@dataclass(frozen=True)
class PermutationSpec:
    """Which axis of which parameter each permutation group acts on.

    ``sizes[name]`` is the number of units of group ``name``; ``axes[param]`` names, per axis of the
    parameter ``param``, the group acting on it (``None``: not permuted). An axis may hold ``g``
    consecutive entries per unit (a conv channel flattened into ``h * w`` columns): its length is
    then ``g * sizes[name]``. ``shapes[param]`` is the shape the architecture gives the parameter.
    """

    family: str
    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    shapes: dict[str, tuple[int, ...]]

    def acting(self, group: str) -> list[tuple[str, int]]:
        """``(param, axis)`` for every axis that ``group`` permutes."""
        return [(p, ax) for p, names in self.axes.items() for ax, n in enumerate(names) if n == group]


def _mlp_spec(cfg: ModelConfig, latent: str | None) -> tuple[dict, dict]:
    sizes, axes = {}, {}
    prev = None  # the input is never permuted
    for i, w in enumerate(cfg.enc_widths):
        name = f"encoder.{2 * i}"  # Linear, activation, Linear, ...: the Linears sit at even indices
        sizes[name] = w
        axes[f"{name}.weight"], axes[f"{name}.bias"] = (name, prev), (name,)
        prev = name
    for head in ("enc_mu", "enc_logvar"):
        axes[f"{head}.weight"], axes[f"{head}.bias"] = (latent, prev), (latent,)
    prev = latent
    for j, w in enumerate(cfg.dec_widths):
        name = f"dec_hidden.{2 * j}"
        sizes[name] = w
        axes[f"{name}.weight"], axes[f"{name}.bias"] = (name, prev), (name,)
        prev = name
    axes["dec_out.weight"], axes["dec_out.bias"] = (None, prev), (None,)  # the output is never permuted
    return sizes, axes


def _conv_spec(cfg: ModelConfig, latent: str | None) -> tuple[dict, dict]:
    c1, c2 = cfg.channels[0], cfg.channels[-1]
    sizes = {"encoder.0": c1, "encoder.2": c2, "dec_in.0": c2, "dec_hidden.0": c1}
    axes = {
        "encoder.0.weight": ("encoder.0", None, None, None), "encoder.0.bias": ("encoder.0",),  # (c1, C, 3, 3)
        "encoder.2.weight": ("encoder.2", "encoder.0", None, None), "encoder.2.bias": ("encoder.2",),
        # Flatten makes the channel the outer index: columns [u h2 w2, (u + 1) h2 w2) belong to channel u
        "enc_mu.weight": (latent, "encoder.2"), "enc_mu.bias": (latent,),
        "enc_logvar.weight": (latent, "encoder.2"), "enc_logvar.bias": (latent,),
        "dec_in.0.weight": ("dec_in.0", latent), "dec_in.0.bias": ("dec_in.0",),  # rows reshaped to (c2, h2, w2)
        "dec_hidden.0.weight": ("dec_in.0", "dec_hidden.0", None, None),  # ConvTranspose2d: (in c2, out c1, 3, 3)
        "dec_hidden.0.bias": ("dec_hidden.0",),
        "dec_out.weight": ("dec_hidden.0", None, None, None), "dec_out.bias": (None,),  # (in c1, out C, 3, 3)
    }
    return sizes, axes


def _linear_spec(cfg: ModelConfig, latent: str | None) -> tuple[dict, dict]:
    # no hidden layer; the input-independent log-variance is one value per latent dimension
    axes = {"enc_mu.weight": (latent, None), "enc_mu.bias": (latent,), "enc_logvar": (latent,),
            "dec_out.weight": (None, latent), "dec_out.bias": (None,)}
    return {}, axes


_SPECS = {"mlp": _mlp_spec, "conv": _conv_spec, "linear": _linear_spec}


def permutation_spec(arch: ModelConfig | dict, *, latent: bool = True) -> PermutationSpec:
    """The permutation groups of an architecture (``config.model`` of a run, or a :class:`ModelConfig`);
    ``latent`` adds the latent dimensions as one more group (see the module docstring)."""
    cfg = arch if isinstance(arch, ModelConfig) else ModelConfig.from_dict(arch)
    sizes, axes = _SPECS[cfg.family](cfg, "latent" if latent else None)
    if latent:
        sizes["latent"] = cfg.latent_dim
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        shapes = {k: tuple(v.shape) for k, v in MODEL_FAMILIES[cfg.family](cfg).state_dict().items()}
    assert set(shapes) == set(axes), f"the {cfg.family} permutation spec is out of date with its model"
    return PermutationSpec(cfg.family, sizes, axes, shapes)


def _as_spec(arch: ModelConfig | dict | PermutationSpec) -> PermutationSpec:
    return arch if isinstance(arch, PermutationSpec) else permutation_spec(arch)


def _check_fits(spec: PermutationSpec, state: dict, which: str) -> None:
    """One line naming what does not fit, so a state of another architecture is never silently half-aligned."""
    missing = [k for k in spec.shapes if k not in state]
    unexpected = [k for k in state if k not in spec.shapes]
    bad = [f"{k} {tuple(state[k].shape)} vs {want}" for k, want in spec.shapes.items()
           if k in state and tuple(state[k].shape) != want]
    parts = [f"{label}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)) if keys]
    if parts:
        raise InputError(f"{which} does not fit the {spec.family!r} architecture given ({'; '.join(parts)}); "
                         f"pass the model config the state was saved from.")


def _expand(perm: torch.Tensor, length: int) -> torch.Tensor:
    """Index along an axis of ``length = g * len(perm)`` entries holding ``g`` consecutive entries per unit."""
    g = length // perm.numel()
    return (perm[:, None] * g + torch.arange(g, device=perm.device)).reshape(-1)  # (k g,)


def _permuted(w: torch.Tensor, names: tuple[str | None, ...], perms: dict[str, torch.Tensor],
              skip: int | None = None) -> torch.Tensor:
    """``P(w)``: every axis whose group has a permutation in ``perms`` reordered, except axis ``skip``."""
    for ax, n in enumerate(names):
        if n is not None and ax != skip and n in perms:
            w = w.index_select(ax, _expand(perms[n].to(w.device), w.shape[ax]))
    return w


def permute(state: dict, perms: dict[str, torch.Tensor], arch: ModelConfig | dict | PermutationSpec) -> dict:
    """The state dict with permutation ``perms[name]`` (a LongTensor of ``sizes[name]`` indices) applied to
    every group ``name`` it names (others stay as they are); the model it describes computes the same
    ``xhat`` (and, for hidden groups, the same ``mu`` and ``logvar``). Tensors that no permutation
    reorders are the input's own, not copies."""
    spec = _as_spec(arch)
    _check_fits(spec, state, "the state dict")
    for n, p in perms.items():
        if n not in spec.sizes:
            raise InputError(f"permute: {n!r} is not a permutation group of this architecture; "
                             f"its groups are {sorted(spec.sizes)}.")
        if sorted(torch.as_tensor(p).tolist()) != list(range(spec.sizes[n])):
            raise InputError(f"permute: perms[{n!r}] must be a permutation of 0..{spec.sizes[n] - 1}.")
    perms = {n: torch.as_tensor(p, dtype=torch.long) for n, p in perms.items()}
    perms = {n: p for n, p in perms.items() if not torch.equal(p, torch.arange(p.numel()))}  # nothing to reorder
    return {k: (_permuted(v, spec.axes[k], perms) if k in spec.axes else v) for k, v in state.items()}


@dataclass(frozen=True)
class WeightMatching:
    """Outcome of :func:`weight_matching`: the permutations (``perms[group]``, LongTensor), model B
    permuted by them (``state``, sharing the tensors no permutation reorders), the distances before and
    after, the passes made (``n_iter``) and whether every permutation is optimal given the others
    (``converged``; otherwise ``max_iter`` passes were reached first)."""

    perms: dict[str, torch.Tensor]
    state: dict
    distance: float
    raw_distance: float
    n_iter: int
    converged: bool

    @property
    def moved(self) -> int:
        """Number of units (over all groups) that the alignment moved away from their own position."""
        return int(sum(int((p != torch.arange(p.numel())).sum()) for p in self.perms.values()))


def weight_matching(state_a: dict, state_b: dict, arch: ModelConfig | dict, *, latent: bool = True,
                    max_iter: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, restarts: int = 2) -> WeightMatching:
    """Permute model B's units (hidden layers, and latent dimensions if ``latent``) to bring its
    parameters as close as possible to model A's in L2 (Git Re-Basin weight matching, see the module
    docstring). The similarity matrices are formed in ``dtype`` on ``device``; the assignment problems
    are solved on the CPU, and each accepted step is checked in float64. ``seed`` fixes the order in
    which the layers are visited; ``max_iter`` caps the passes.

    The descent solves one group at a time, so two coupled groups can settle together in a wrong pair of
    assignments (seen: a conv VAE's latent dimensions and its decoder's first channels, a shuffled small step
    aligned to 7.28 instead of 0.073). ``restarts`` descents are run, the first from B as it is and each
    other from a seeded random shuffle of B, and the closest result is kept (the same shuffled step: every
    restart found 0.073).

    ``state_a``, ``state_b``: state dicts of the model ``arch`` describes (``config.model`` of a run).
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"The 'max_iter' parameter must be an int >= 1. Got {max_iter!r}.")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise InputError(f"The 'restarts' parameter must be an int >= 1. Got {restarts!r}.")
    spec = permutation_spec(arch, latent=latent)
    _check_fits(spec, state_a, "state_a")
    _check_fits(spec, state_b, "state_b")
    best = _descend(state_a, state_b, spec, max_iter=max_iter, seed=seed, device=device, dtype=dtype)
    for i in range(1, restarts):
        g = torch.Generator().manual_seed(int(seed) * 7919 + i)
        start = {n: torch.randperm(k, generator=g) for n, k in spec.sizes.items()}
        wm = _descend(state_a, permute(state_b, start, spec), spec, max_iter=max_iter, seed=seed + i, device=device,
                      dtype=dtype)
        if wm.distance < best.distance:  # its perms act on the shuffled B: compose them with the shuffle
            perms = {n: start[n][wm.perms[n]] for n in spec.sizes}
            best = WeightMatching(perms, permute(state_b, perms, spec), wm.distance, best.raw_distance,
                                  best.n_iter + wm.n_iter, wm.converged)
    return best


def _descend(state_a: dict, state_b: dict, spec, *, max_iter: int, seed: int, device, dtype) -> WeightMatching:
    """One coordinate descent of :func:`weight_matching` from B as given."""
    device = torch.device(device)
    a = {k: state_a[k].detach().to(device, dtype) for k in spec.axes}
    b = {k: state_b[k].detach().to(device, dtype) for k in spec.axes}
    perms: dict[str, torch.Tensor] = {}  # groups not in it keep the identity (nothing to reorder)
    acting = {n: spec.acting(n) for n in spec.sizes}
    # a group's similarity matrix depends on the permutations of the groups it shares a parameter with
    neighbours = {n: {m for p, ax in acting[n] for m in spec.axes[p] if m is not None and m != n} for n in acting}
    names = sorted(spec.sizes)  # a fixed order for the seeded shuffles
    rng = np.random.default_rng(seed)
    stale, n_iter = set(names), 0  # groups whose permutation may not be optimal given their neighbours'
    while stale and n_iter < max_iter:
        n_iter += 1
        for n in (names[i] for i in rng.permutation(len(names))):
            if n not in stale:  # its neighbours did not move since it was solved: the same answer again
                continue
            stale.discard(n)
            k = spec.sizes[n]
            sim = torch.zeros(k, k, dtype=dtype, device=device)  # sim[i, j] = <A's unit i, B's unit j>
            for p, ax in acting[n]:
                wa = a[p].movedim(ax, 0).reshape(k, -1)
                wb = _permuted(b[p], spec.axes[p], perms, skip=ax).movedim(ax, 0).reshape(k, -1)
                sim.addmm_(wa, wb.T)
            s = sim.double().cpu().numpy()
            _, col = _lap(s)
            cur = perms[n].cpu().numpy() if n in perms else np.arange(k)
            if np.array_equal(col, cur):
                continue
            # The assignment was chosen on `dtype` similarities; accept it only if it raises <A, P(B)> in
            # float64, strictly: then the descent never goes up, and near-ties cannot make it cycle.
            gain = sum(_gain(state_a[p], state_b[p], spec.axes[p], ax, k, perms, cur, col) for p, ax in acting[n])
            if gain > 1e-12 * max(1.0, abs(float(s[np.arange(k), cur].sum()))):
                perms[n] = torch.as_tensor(col, device=device)
                stale |= neighbours[n]
    converged = not stale
    perms = {n: perms[n].cpu() if n in perms else torch.arange(k) for n, k in spec.sizes.items()}
    out = permute(state_b, perms, spec)
    raw = parameter_distance(state_a, state_b)
    dist = parameter_distance(state_a, out) if any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values()) else raw
    if dist > raw:  # float64 rounding of a gain at the 1e-12 level at most: the identity is a candidate too
        perms = {n: torch.arange(k) for n, k in spec.sizes.items()}
        out, dist = dict(state_b), raw
    return WeightMatching(perms, out, dist, raw, n_iter, converged)


def _gain(wa: torch.Tensor, wb: torch.Tensor, names: tuple[str | None, ...], ax: int, k: int,
          perms: dict[str, torch.Tensor], cur: np.ndarray, new: np.ndarray) -> float:
    """Exact (float64) change of ``<A, P(B)>`` on one parameter when the group on axis ``ax`` goes from
    the assignment ``cur`` to ``new``; only the rows that change are read."""
    rows = np.flatnonzero(cur != new)
    ua = wa.movedim(ax, 0).reshape(k, -1)[rows].double()  # (r, rest)
    ub = _permuted(wb, names, perms, skip=ax).movedim(ax, 0).reshape(k, -1).to(ua.device)  # (k, rest)
    return float((ua * (ub[new[rows]].double() - ub[cur[rows]].double())).sum())


def _lap(s: np.ndarray):
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(s, maximize=True)


def align(state_a: dict, state_b: dict, arch: ModelConfig | dict, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(permuted_state_b, perms)``: model B with its units permuted to match model A's (weight
    matching; keyword arguments as :func:`weight_matching`)."""
    wm = weight_matching(state_a, state_b, arch, **kw)
    return wm.state, wm.perms


def aligned_distance(state_a: dict, state_b: dict, arch: ModelConfig | dict, **kw) -> float:
    """``||Theta_A - P(Theta_B)||_2`` for the permutation ``P`` weight matching finds (<= the raw distance)."""
    return weight_matching(state_a, state_b, arch, **kw).distance


__all__ = ["PermutationSpec", "WeightMatching", "permutation_spec", "permute", "weight_matching", "align",
           "aligned_distance"]
