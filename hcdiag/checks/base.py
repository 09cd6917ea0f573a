"""The result every check returns, and the evaluation context that all checks of one run share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hcdiag.errors import InputError
from hcdiag.models import build_model, encode_decode

Verdict = Literal["holds", "fails", "inconclusive"]
VERDICTS = ("holds", "fails", "inconclusive")


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


class RunContext:
    """Deterministic evaluation of a run's models on its fixed evaluation rows, cached per snapshot.

    ``xhat = f(mu(x))`` (no sampling), so the same file always gives the same numbers.
    """

    def __init__(self, run, *, tolerance: float = 0.05, device: str | torch.device = "cpu", seed: int = 0,
                 batch_size: int = 4096):
        self.run = run
        self.tol = float(tolerance)
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size
        self.x = run.eval_x.float().to(self.device)
        self.xbar = run.xbar.double()
        self.centroids = run.centroids.float().to(self.device)
        self.model_cfg = run.config.get("model")
        self._out: dict[str, tuple] = {}
        self._losses: dict[str, torch.Tensor] = {}
        self._model = None

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
        return encode_decode(self.model(state), self.x, self.batch_size)

    def state(self, name: str) -> dict | None:
        if self.has_parameters and name in self.run.data.get("snapshots", {}):
            return self.run.snapshot(name)
        return None

    def outputs(self, name: str):
        """``(mu (m, n), logvar (m, n), xhat (m, N))`` of a snapshot, from its parameters or stored outputs."""
        if name not in self._out:
            st = self.state(name)
            if st is not None:
                self._out[name] = self.outputs_of_state(st)
            else:
                o = self.run.outputs(name)
                if o is None:
                    raise KeyError(name)
                self._out[name] = (o["mu"].float().to(self.device), o["logvar"].float().to(self.device),
                                   o["xhat"].float().to(self.device))
        return self._out[name]

    # -- clustering losses (eq. 8) -----------------------------------------------------------------------
    def losses_of_xhat(self, xhat: torch.Tensor) -> torch.Tensor:
        from hcdiag.metrics import clustering_losses

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
        return list(self.run.snapshot_names)

    def regions(self) -> list[Region]:
        """F_0 ... F_{T-1} from the stage-1 rounds, then F_T from the refinement (claims.md)."""
        out = []
        for r in self.run.rounds or []:
            out.append(Region(f"F_{int(r['round'])}", tuple(int(i) for i in r["kept"]), float(r["eps"]), str(r["snapshot"])))
        ref = self.run.refinement
        if ref:
            out.append(Region("F_T", tuple(int(i) for i in ref["pair"]), float(ref["eps_T"]),
                              str(ref.get("snapshot", "refined"))))
        return out

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
