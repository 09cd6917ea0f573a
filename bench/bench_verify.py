"""Wall time of the main job: `hcdiag verify --preset smoke --datasets synthetic` (what `make demo` runs).

Goal (issue 5): under 5 minutes on this 2-core CPU. Printed beside it: the time of one smoke HCT run
alone (the unit the grid is made of), measured in the same run, and the same grid with every run training
its own references (``HCDIAG_SHARE_REFERENCES=0``) against the grid sharing them (issue 12: the references
should no longer be the largest part of a smoke run), with the references' share of the HCT runs' time.
"""

import os
import tempfile
import time
from pathlib import Path

import torch

from hcdiag.verify import build_grid, run_job, verify


def _reference_share(folder: str) -> tuple[float, float]:
    """Seconds of the HCT runs' references and of the runs in all (their run files' ``timings``)."""
    refs = total = 0.0
    for p in Path(folder).glob("main/*/hct*.pt"):
        t = torch.load(p, weights_only=True).get("timings") or {}
        refs += t.get("references", 0.0)
        total += sum(v for k, v in t.items() if k != "total")  # per stage; the file is written before 'total'
    return refs, total


def main():
    with tempfile.TemporaryDirectory() as d:
        job = next(j for j in build_grid("smoke", ["synthetic"], 1) if j.method == "hct")
        t = time.perf_counter()
        run_job(job, d + "/unit")
        unit = time.perf_counter() - t
        times, shares = {}, {}
        for share in ("0", "1"):
            os.environ["HCDIAG_SHARE_REFERENCES"] = share
            try:
                t = time.perf_counter()
                doc = verify(f"{d}/verify{share}", preset="smoke", datasets=["synthetic"], seeds=1)
                times[share] = time.perf_counter() - t
            finally:
                os.environ.pop("HCDIAG_SHARE_REFERENCES", None)
            shares[share] = _reference_share(f"{d}/verify{share}")
    total = times["1"]
    print(f"-- smoke verify on synthetic: {total:.1f} s for {doc['meta']['n_runs']} runs "
          f"({total / 60:.2f} min; goal < 5 min) = {total / unit:.1f}x one smoke HCT run ({unit:.1f} s)")
    for share, what in (("0", "each run trains its own references"), ("1", "references shared by the grid")):
        refs, runs = shares[share]
        print(f"   {what}: {times[share]:.1f} s wall; the HCT runs spent {refs:.1f} of {runs:.1f} s on references "
              f"({refs / runs if runs else float('nan'):.0%})")
    print(f"   sharing: {times['0'] / times['1']:.2f}x faster (ratio of the two grids' wall times, same run)")


if __name__ == "__main__":
    main()
