"""The checks of ``claims.md``, one module per claim group.

Pure numerical kernels live here (functions on tensors, no I/O, no global state); the layer that
reads a run file, picks the snapshots and turns numbers into verdicts calls them.

* :mod:`hcdiag.checks.delta` -- Theorem 4.4: the paper's delta (T1), the best-constant delta* and
  its collapsed witness (T2), shared centroids, and the refinement floor of a collapsed model (T2b).
* :mod:`hcdiag.checks.witness` -- T4: the teacher-information certificate against constant collapse
  (companion notes, seed 000).

The collapse metrics every snapshot gets (KL, active units, MI, MSE) and the clustering losses of
eq. 8 are in :mod:`hcdiag.metrics`.
"""
