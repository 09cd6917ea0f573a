"""The notebooks (jupytext percent-format .py files) execute from top to bottom, as CI runs them: each is
converted to .ipynb in a temporary folder and executed with ``pytest --nbmake``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_the_five_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_phase_transition.py", "02_barrier_checks.py", "03_table1.py",
                                           "04_witness_certificate.py", "05_diffusion_critical_timestep.py"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(nb, tmp_path):
    import jupytext

    notebook = jupytext.read(nb)
    kinds = [c.cell_type for c in notebook.cells]
    # written to be read: prose first, code, and prose between the code cells
    assert kinds[0] == "markdown" and kinds.count("code") >= 3 and kinds.count("markdown") >= 3
    assert "reduced demo" in notebook.cells[0].source.lower()
    target = tmp_path / f"{nb.stem}.ipynb"
    jupytext.write(notebook, target)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake",
                        "--nbmake-timeout=300", str(target)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "1 passed" in p.stdout
