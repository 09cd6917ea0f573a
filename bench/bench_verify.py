"""Wall time of the main job: `hcdiag verify --preset smoke --datasets synthetic` (what `make demo` runs).

Goal (issue 5): under 5 minutes on this 2-core CPU. Printed beside it: the time of one smoke HCT run
alone (the unit the grid is made of), measured in the same run.
"""

import tempfile
import time

from hcdiag.verify import build_grid, run_job, verify


def main():
    with tempfile.TemporaryDirectory() as d:
        job = next(j for j in build_grid("smoke", ["synthetic"], 1) if j.method == "hct")
        t = time.perf_counter()
        run_job(job, d + "/unit")
        unit = time.perf_counter() - t
        t = time.perf_counter()
        doc = verify(d + "/verify", preset="smoke", datasets=["synthetic"], seeds=1)
        total = time.perf_counter() - t
    print(f"-- smoke verify on synthetic: {total:.1f} s for {doc['meta']['n_runs']} runs "
          f"({total / 60:.2f} min; goal < 5 min) = {total / unit:.1f}x one smoke HCT run ({unit:.1f} s)")


if __name__ == "__main__":
    main()
