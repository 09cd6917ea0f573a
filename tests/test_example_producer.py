"""docs/examples/own_trainer.py: a producer of its own (plain PyTorch, its own loop) writes a run file that
hcdiag reads, rebuilds and checks without refusing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from hcdiag.checks.base import RunContext
from hcdiag.checks.evidence import verify
from hcdiag.cli import main
from hcdiag.models import build_model, encode_decode
from hcdiag.runfile import load_run

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own_trainer.py"


def test_the_example_producer_writes_a_run_check_barrier_accepts(tmp_path, capsys):
    out = tmp_path / "own.pt"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = load_run(out)  # the schema, state_dicts that fit config.model included
    assert run.config.model["family"] == "mlp" and run.snapshot_names[0] == "epoch0"
    verify(RunContext(run))  # its stored outputs are its snapshot's
    # the stored outputs are what hcdiag's own rebuild of the module gives (an oracle independent of verify)
    model = build_model(run.config.model)
    model.load_state_dict(run.snapshot("epoch6"))
    mu, _, xhat = encode_decode(model, run.eval_x)
    torch.testing.assert_close(mu, run.outputs("epoch6").mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xhat, run.outputs("epoch6").xhat, rtol=1e-5, atol=1e-6)
    code = main(["check-barrier", str(out), "--format", "json"])
    stdout, err = capsys.readouterr()
    assert code in (0, 1) and err == ""  # verdicts are whatever they are; never bad input
    doc = json.loads(stdout)
    verdicts = {c["id"]: c["verdict"] for c in doc["checks"]}
    assert verdicts["N1"] == verdicts["T1"] == "inconclusive"  # a vanilla run has no rounds
    assert verdicts["T3"] != "inconclusive" and verdicts["T4"] != "inconclusive" and verdicts["KL"] != "inconclusive"
