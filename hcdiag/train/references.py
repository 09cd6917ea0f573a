"""The reference models trained beside a run (same architecture and initialisation seed), for the checks:

* ``collapsed``: the constructed collapsed model, a vanilla VAE at ``s2 = collapsed_multiple * lambda_max``
  (paper 5.3: 10 lambda_max), for T3, I2 and I3;
* ``vanilla``: a vanilla VAE at the run's own s2, with snapshots along its training (I3's baseline);
* ``control``: a no-history control, trained from scratch on the final pair only with the step budget of
  stages 1 and 2 (N3's probe).

Pipeline methods get all three; other methods only the collapsed model. Each is saved as it finishes, so
``--resume`` skips the ones done.
"""

from __future__ import annotations

import time

from hcdiag.losses import LossWeights, Schedule
from hcdiag.records import Reference
from hcdiag.train.methods.vae import Vanilla, train_vae
from hcdiag.train.refcache import reference_key, shared
from hcdiag.train.writer import cpu_state, no_stream

VANILLA = Vanilla()


def train_references(t, run: dict, pipeline: bool) -> None:
    """Train the references ``t.cfg.references`` asks for that ``run`` lacks, recording each in
    ``run['references'][name]`` (config, state, metrics and, for ``vanilla``, its snapshots)."""
    c = t.cfg
    wanted = [r for r in c.references if pipeline or r == "collapsed"]
    done = set(t.writer.references_done())
    t0 = time.perf_counter()
    for name in wanted:
        if name in done:
            continue
        extra = {}
        if name == "collapsed":
            s2 = c.collapsed_multiple * t.lambda_max
            w = LossWeights.for_convention(c.loss, s2, t.N)
            model = _shared_vanilla(t, name, s2, lambda m: train_vae(t, VANILLA, m, c.epochs, run=None,
                                                                     stage="reference", weights=w, seed_offset=1))
            rcfg = {"method": "vanilla", "s2": s2, "multiple": c.collapsed_multiple, "epochs": c.epochs}
        elif name == "vanilla":
            snaps = []
            model = _shared_vanilla(t, name, t.s2, lambda m: train_vae(t, VANILLA, m, c.epochs, run=None,
                                                                       stage="reference", seed_offset=2), snaps)
            rcfg = {"method": "vanilla", "s2": t.s2, "multiple": c.multiple, "epochs": c.epochs}
            extra = {"snapshots": dict(snaps), "snapshot_order": [n for n, _ in snaps]}
        else:
            if t.writer.refinement() is None:
                continue
            model, rcfg = _control(t, run)
        ev = t.loop.evaluate(model)
        rcfg["model"] = t.model_cfg.to_dict()
        t.writer.add_reference(Reference(name, rcfg, cpu_state(model.state_dict()),
                                         metrics={"kl": ev["kl"], "au": ev["au"], "mse": ev["mse"]}, **extra))
        t.progress.summary(f"reference {name}: KL={ev['kl']:.4f}, AU={ev['au']}, MSE={ev['mse']:.4g}")
        t.writer.save(model, None, no_stream(), {"stage": "references", "done": t.writer.references_done()})
    t.timings["references"] = t.timings.get("references", 0.0) + time.perf_counter() - t0


def _shared_vanilla(t, name: str, s2: float, fit, snaps: list | None = None):
    """The reference ``name`` trained by ``fit(model)`` (-> (stream state, snapshots)) from the run's initial
    model, or read from the trainer's reference cache (:mod:`hcdiag.train.refcache`) when another run of the
    grid trained the same one; its training snapshots are appended to ``snaps`` when given."""
    want = {k: tuple(v.shape) for k, v in t.new_model().state_dict().items()}

    def train():
        model = t.new_model()
        _, got = fit(model)
        return cpu_state(model.state_dict()), got

    def fits(state) -> bool:
        return isinstance(state, dict) and {k: tuple(v.shape) for k, v in state.items()} == want

    state, got, hit = shared(getattr(t, "ref_cache", None), reference_key(t, name, s2), train, fits)
    if hit:
        t.progress.summary(f"reference {name}: shared (trained by another run of this grid: same data, model, s2, "
                           "convention, seed and settings)")
    model = t.new_model()
    model.load_state_dict(state)
    if snaps is not None:
        snaps.extend(got)
    return model


def _control(t, run: dict):
    """No history: trained from scratch on the final pair only, for the steps stages 1 and 2 took."""
    import torch

    c = t.cfg
    ref = t.writer.refinement()
    pair = list(ref.pair)
    model = t.new_model()
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    state = t.loop.new_state(c.seed + 3000)
    budget = max(1, int(ref.step))
    b_end = Schedule(c.beta_schedule, c.beta_start, c.beta_end).value(1.0)
    while state["step"] < budget:
        t.loop.cycle(model, opt, state, pair, b_end, "reference (control), epoch %d" % (state["epoch"] + 1))
        state["epoch"] += 1
        t.progress.update(f"reference (control) step {state['step']}/{budget}")
    return model, {"method": "hct-control", "s2": t.s2, "multiple": c.multiple, "pair": pair, "steps": state["step"]}
