"""The result every check returns, and the evaluation context that all checks of one run share."""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

import torch

from hcdiag.errors import InputError
from hcdiag.metrics import clustering_losses
from hcdiag.models import ModelConfig, build_model, encode_decode
from hcdiag.runfile import EVAL_BATCH_ROWS, Run

Verdict = Literal["holds", "fails", "inconclusive"]
VERDICTS = ("holds", "fails", "inconclusive")
_OUTPUT_NAMES = {"mu": "encoder mean", "logvar": "encoder log-variance", "xhat": "reconstruction"}


def _finite_outputs(out: tuple, where: str, fix: str) -> tuple:
    """Refuse (InputError) rebuilt outputs ``(mu, logvar, xhat)`` that hold NaN or inf on eval.x: parameters
    that overflow (a diverged run) would otherwise read as "not collapsed" (KL = inf) or slip past every
    comparison (NaN). ``where`` names the snapshot ('snapshot final rebuilt from snapshots.final')."""
    for key, t in zip(("mu", "logvar", "xhat"), out):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"the {_OUTPUT_NAMES[key]} of {where} holds {bad} non-finite value(s) (NaN or inf) of "
                             f"{t.numel()} on eval.x; {fix}")
    return out


@dataclass
class CheckResult:
    """One check's outcome: ``id`` (as in claims.md), the paper's ``claim`` and ``section``, the
    ``verdict``, the numbers that decided it (``values``), the ``witness`` of a failure, and for an
    inconclusive verdict the ``reason``. ``tolerance`` is the tau used for region memberships."""

    id: str
    claim: str
    section: str
    verdict: Verdict
    values: dict[str, Any] = field(default_factory=dict)
    witness: dict[str, Any] | None = None
    reason: str | None = None
    tolerance: float | None = None
    summary: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "claim": self.claim, "section": self.section, "verdict": self.verdict,
                "summary": self.summary, "values": self.values, "witness": self.witness, "reason": self.reason,
                "tolerance": self.tolerance}


def _mismatch(cfg: dict, want: dict, got: dict) -> str:
    """One line: which keys/shapes of a stored state_dict do not fit the model ``config.model`` describes."""
    parts = []
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
    return (f"a state_dict in the run does not fit config.model (family {cfg.get('family')!r}; "
            f"{'; '.join(parts) or 'load_state_dict failed'}); store snapshots of the model config.model describes.")


def inconclusive(id: str, claim: str, section: str, reason: str, **values) -> CheckResult:
    return CheckResult(id, claim, section, "inconclusive", values=values, reason=reason, summary=reason)


@dataclass(frozen=True)
class Region:
    """A feasible region ``F_t = {Theta : max_{C in ids} l_C(Theta) <= eps}`` (Def. 4.2)."""

    name: str  # 'F_0', 'F_1', ..., 'F_T'
    ids: tuple[int, ...]
    eps: float
    snapshot: str  # the snapshot at which it was formed


# the config.model fields each family reads, with the value hcdiag builds when the field is absent
_MODEL_FIELDS = {"mlp": ("enc_widths", "dec_widths", "activation"), "conv": ("channels", "activation"), "linear": ()}


class RunContext:
    """Deterministic evaluation of a run's models on its fixed evaluation rows, cached per snapshot.

    ``xhat = f(mu(x))`` (no sampling), so the same file always gives the same numbers. Numbers the run
    file stores but hcdiag can recompute (round losses, eps_t, eps_T, whether eps was reached) are
    served recomputed (:attr:`evidence`, :mod:`hcdiag.checks.evidence`). Every default a check falls
    back on because a field is absent is recorded (:meth:`setting`) and reported in its JSON.
    """

    def __init__(self, run, *, tolerance: float = 0.05, device: str | torch.device = "cpu", seed: int = 0,
                 batch_size: int = EVAL_BATCH_ROWS):  # the rows load_run's memory bound assumes
        self.run = run
        self.tol = float(tolerance)
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size
        self.x = run.eval_x.float().to(self.device)
        self.xbar = run.xbar.double()
        self.centroids = run.centroids.float().to(self.device)
        self.model_cfg = run.config.model
        self._out: dict[str, tuple] = {}
        self._losses: dict[str, torch.Tensor] = {}
        self._model = None
        self._ref_out: dict[tuple[str, str], tuple] = {}
        self._evidence = None
        self._memo: dict[str, Any] = {}
        self._defaults: list[dict] = []
        self._model_defaults = self._absent_model_fields(self.model_cfg, "config.model")

    # -- defaults of absent fields, reported per check ----------------------------------------------------
    def note_default(self, key: str, default: Any, why: str) -> None:
        """Record that the check being run used ``default`` for the absent run-file field ``key``."""
        entry = {"key": key, "default": default, "why": why}
        if entry not in self._defaults:
            self._defaults.append(entry)

    def setting(self, key: str, default: Any, why: str | None = None) -> Any:
        """The run-file field at the dotted path ``key`` (e.g. ``'config.loss'``, ``'refinement.beta'``);
        when it is absent or None, ``default``, recorded so the check's JSON says so (``values["defaults"]``)."""
        node: Any = self.run
        for part in key.split("."):
            if isinstance(node, dict):
                node = node.get(part)
            elif is_dataclass(node) or isinstance(node, Run):  # a record: its field, else a key it kept as-is
                value = getattr(node, part, None)
                if value is None and isinstance(getattr(node, "extra", None), dict):
                    value = node.extra.get(part)
                node = value
            else:
                node = None
            if node is None:
                self.note_default(key, default, why or f"{key} is absent from the run file")
                return default
        return node

    def take_defaults(self) -> list[dict]:
        """The defaults recorded since the last call (``run_checks`` calls it after each check)."""
        out, self._defaults = self._defaults, []
        return out

    @staticmethod
    def _absent_model_fields(cfg: dict | None, where: str) -> list[dict]:
        if not cfg:
            return []
        base = ModelConfig().to_dict()
        return [{"key": f"{where}.{f}", "default": base[f], "why": f"{where}.{f} is absent; hcdiag builds the "
                 f"{cfg.get('family')} model with its default"}
                for f in _MODEL_FIELDS.get(cfg.get("family"), ()) if cfg.get(f) is None]

    def _rebuilt(self) -> None:
        for d in self._model_defaults:
            self.note_default(**d)

    # -- models ------------------------------------------------------------------------------------------
    @property
    def has_parameters(self) -> bool:
        return bool(self.run.has_parameters)

    def model(self, state: dict | None = None):
        if self._model is None:
            self._model = build_model(self.model_cfg, device=self.device)
        if state is not None:
            try:
                self._model.load_state_dict(state)
            except RuntimeError:  # a valid run file whose state_dicts are not of config.model's architecture
                raise InputError(_mismatch(self.model_cfg, self._model.state_dict(), state)) from None
        return self._model

    def outputs_of_state(self, state: dict):
        self._rebuilt()
        return encode_decode(self.model(state), self.x, self.batch_size)

    def state(self, name: str) -> dict | None:
        if self.has_parameters and self.run.has_state(name):
            return self.run.snapshot(name)
        return None

    def outputs(self, name: str):
        """``(mu (m, n), logvar (m, n), xhat (m, N))`` of a snapshot, from its parameters or stored outputs."""
        st = self.state(name)
        if st is not None:
            self._rebuilt()
        if name not in self._out:
            if st is not None:
                self._out[name] = _finite_outputs(
                    self.outputs_of_state(st), f"snapshot {name} rebuilt from snapshots.{name}",
                    f"the snapshot's parameters overflow there (a diverged run?): store the last finite snapshot, or "
                    f"finite outputs.{name}.")
            else:
                o = self.run.outputs(name)
                if o is None:
                    raise KeyError(name)
                self._out[name] = tuple(t.float().to(self.device) for t in o.astuple())
        return self._out[name]

    # -- clustering losses (eq. 8) -----------------------------------------------------------------------
    def losses_of_xhat(self, xhat: torch.Tensor) -> torch.Tensor:
        return clustering_losses(xhat.double(), self.centroids.double()).cpu()  # (R0,)

    def losses(self, name: str) -> torch.Tensor:
        if name not in self._losses:
            self._losses[name] = self.losses_of_xhat(self.outputs(name)[2])
        return self._losses[name]

    def losses_of_state(self, state: dict) -> torch.Tensor:
        return self.losses_of_xhat(self.outputs_of_state(state)[2])

    # -- the run's structure -----------------------------------------------------------------------------
    @property
    def order(self) -> list[str]:
        if not self.run.has_snapshot_order and self.run.snapshot_names:
            self.note_default("snapshot_order", "the snapshots keys, then the outputs keys",
                              "snapshot_order is absent, so training order is read from the keys")
        return list(self.run.snapshot_names)

    def cached(self, key: str, compute):
        """``compute()`` once per context (results several checks share, e.g. every snapshot's metrics)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def evidence(self):
        """The recomputed numbers (:class:`hcdiag.checks.evidence.Evidence`), computed once."""
        if self._evidence is None:
            from hcdiag.checks.evidence import recompute

            self._evidence = recompute(self)
        return self._evidence

    def regions(self) -> list[Region]:
        """F_0 ... F_{T-1} from the stage-1 rounds, then F_T from the refinement (claims.md); their eps are
        RECOMPUTED from the round's / refined snapshot on eval.x (Def. 4.2), never the stored numbers."""
        ev = self.evidence
        out = [Region(f"F_{r.round}", r.kept, r.eps, r.snapshot) for r in ev.rounds]
        if ev.refinement is not None:
            out.append(Region("F_T", ev.refinement.pair, ev.refinement.eps_T, ev.refinement.snapshot))
        return out

    @property
    def refinement_eps_T(self) -> float | None:
        """``max(l_a, l_b)`` at the refined snapshot on eval.x, recomputed; None without a refinement."""
        ref = self.evidence.refinement
        return None if ref is None else ref.eps_T

    @property
    def refinement_reached(self) -> bool | None:
        """Whether the refinement reached its target, recomputed: ``eps_T < refinement.eps``; None without one."""
        ref = self.evidence.refinement
        return None if ref is None else ref.reached

    # -- references ----------------------------------------------------------------------------------------
    def reference(self, name: str):
        """The run's :class:`~hcdiag.records.Reference` ``name`` (collapsed, vanilla, control), or None."""
        refs = self.run.references
        return refs.get(name) if refs is not None else None

    def reference_model_config(self, name: str) -> tuple[dict | None, str]:
        """``(config.model, where it is)`` of reference ``name``: its own, else the run's."""
        ref = self.reference(name)
        own = ref.model if ref is not None else None
        return (own, f"references.{name}.config.model") if own is not None else (self.model_cfg, "config.model")

    def same_architecture(self, name: str) -> bool:
        """Whether reference ``name`` has parameters of the run's own architecture (a straight parameter path
        to it, or a parameter distance, is defined only then)."""
        ref = self.reference(name)
        return ref is not None and ref.state is not None and self.has_parameters and \
            self.reference_model_config(name)[0] == self.model_cfg

    def reference_outputs(self, name: str, source: str | None = None):
        """``(mu (m, n), logvar (m, n), xhat (m, N))`` of reference ``name`` on eval.x, float32: rebuilt from
        its ``state`` (with its own config.model, else the run's) when it has one, else its stored ``outputs``;
        ``source='state'`` or ``'outputs'`` picks one. None when the reference (or that source) is absent."""
        ref = self.reference(name)
        if ref is None:
            return None
        cfg, _ = self.reference_model_config(name)
        if source is None:
            source = "state" if ref.state is not None and cfg is not None else "outputs"
        if (name, source) not in self._ref_out:
            if source == "state":
                if ref.state is None or cfg is None:
                    return None
                for d in self._absent_model_fields(cfg, self.reference_model_config(name)[1]):
                    self.note_default(**d)
                if cfg == self.model_cfg:
                    out = self.outputs_of_state(ref.state)
                else:
                    model = build_model(cfg, device=self.device)
                    try:
                        model.load_state_dict(ref.state)
                    except RuntimeError:
                        raise InputError(_mismatch(cfg, model.state_dict(), ref.state)) from None
                    out = encode_decode(model, self.x, self.batch_size)
                out = _finite_outputs(out, f"references.{name} rebuilt from references.{name}.state",
                                      "its parameters overflow there: store a finite reference.")
            else:
                if ref.outputs is None:
                    return None
                out = tuple(t.float().to(self.device) for t in ref.outputs.astuple())
            self._ref_out[(name, source)] = out
        return self._ref_out[(name, source)]

    def final_region(self) -> Region | None:
        regs = self.regions()
        return regs[-1] if regs and regs[-1].name == "F_T" else None

    def inside(self, losses: torch.Tensor, region: Region) -> tuple[bool, float]:
        """Membership with the stated relative tolerance: ``L <= eps (1 + tau)``; returns (inside, L/eps)."""
        L = float(losses[list(region.ids)].max())
        ratio = L / region.eps if region.eps > 0 else (0.0 if L == 0 else float("inf"))
        return L <= region.eps * (1 + self.tol), ratio

    def historical(self, losses: torch.Tensor, ids) -> float:
        return float(losses[list(ids)].max())  # Def. 4.1
