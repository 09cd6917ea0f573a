"""Wall time of check-barrier on a smoke run and on a run with the paper preset's architecture.

Goals (issue 4): the smoke run under 10 s on this CPU; a paper-preset run (Table 3 MLP, latent 48,
5000 eval rows) with the N3 probes and I2 paths under 2 minutes on CPU. The paper-preset run is trained
with minimal epochs here (its cost for the checks depends on the architecture, the eval rows and the
number of snapshots, not on how long it trained). Printed beside: the cost of one deterministic
evaluation of one snapshot, the unit the checks are made of.
"""

import tempfile
import time
from pathlib import Path

import torch

from hcdiag.checks.barrier import run_checks
from hcdiag.data import synthetic
from hcdiag.models import build_model, encode_decode
from hcdiag.runfile import load_run
from hcdiag.train import Trainer, make_config


def _bench(label, path):
    run = load_run(path)
    model = build_model(run.config.model)
    model.load_state_dict(run.snapshot("final"))
    t = time.perf_counter()
    encode_decode(model, run.eval_x)
    unit = time.perf_counter() - t
    t = time.perf_counter()
    results = run_checks(run)
    total = time.perf_counter() - t
    print(f"-- {label}: {len(run.snapshot_names)} snapshots, {run.m} eval rows; check-barrier {total:.1f} s "
          f"= {total / unit:.0f} snapshot evaluations ({unit * 1e3:.1f} ms each)")
    for r in results:
        print(f"   {r.id:<4} {r.values.get('seconds', float('nan')):7.2f} s  {r.verdict}")


def main():
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        smoke = Path(d) / "smoke.pt"
        Trainer(make_config("smoke"), synthetic(n=10_000), smoke).run()
        _bench("smoke preset (synthetic, 10,000 rows)", smoke)
        paper = Path(d) / "paper.pt"
        cfg = make_config("paper", epoch_unit="steps", epochs_per_round=1, steps_per_clustering=1, refine_cap=2,
                          stage3_epochs=2, epochs=1, em_backend="torch")
        Trainer(cfg, synthetic(n=20_000), paper).run()
        _bench("paper preset architecture (Table 3 MLP, latent 48)", paper)


if __name__ == "__main__":
    main()
