"""``hcdiag clusterings``: fit the R0 EM clusterings of stage 0 and print their diversity audit."""

from __future__ import annotations

import argparse
import sys

from hcdiag.cli.common import SEED_MAX, add_data_arguments, add_device_argument, add_format_argument, float_arg, int_arg

NAME = "clusterings"
HELP = "fit R0 Gaussian-mixture clusterings (stage 0) and audit how different they are"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--r0", type=int_arg(2), default=16, help="number of EM runs, a power of two (default 16)")
    p.add_argument("--k", type=int_arg(1), default=8, help="components per clustering (default 8)")
    p.add_argument("--covariance", choices=["diag", "full"], default="diag", help="covariance type (default diag)")
    p.add_argument("--backend", choices=["sklearn", "torch"], default="sklearn",
                   help="sklearn: one GaussianMixture per seed; torch: all runs batched (default sklearn)")
    p.add_argument("--init", choices=["kmeans", "random"], default="kmeans", help="EM initialisation (default kmeans)")
    p.add_argument("--seed", type=int_arg(0, SEED_MAX), default=0, help="run r uses seed + r (default 0)")
    p.add_argument("--max-iter", type=int_arg(1), default=100, help="EM iterations at most (default 100)")
    p.add_argument("--tol", type=float_arg(0), default=1e-3, help="EM stops when the mean log-likelihood changes less (default 1e-3)")
    p.add_argument("--reg-covar", type=float_arg(0), default=1e-6, help="added to covariance diagonals (default 1e-6)")
    p.add_argument("--n-jobs", type=int_arg(1, or_value=-1, meaning="all cores"), default=None,
                   help="joblib workers of the sklearn backend (default 1; -1 all cores)")
    p.add_argument("--uneven-halving", action="store_true", help="accept an R0 that is not a power of two")
    p.add_argument("--audit-tol", type=float_arg(0), default=None,
                   help="distance under which centroids count as the same (default 1%% of sqrt(total variance))")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_device_argument(p)
    add_format_argument(p)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hcdiag.cli import common
    from hcdiag.formats import format_table
    from hcdiag.clusterings import audit, check_r0, check_seed, fit_clusterings
    from hcdiag.errors import InputError, NumericalError, marked

    check_seed(args.seed, check_r0(args.r0, uneven=args.uneven_halving))  # refused before loading any data
    ds = common.load_data(args)
    x = ds.x

    def progress(msg: str) -> None:
        print(f"hcdiag clusterings: {msg}", file=sys.stderr, flush=True)

    try:
        cs = fit_clusterings(x, args.r0, args.k, covariance=args.covariance, backend=args.backend, init=args.init,
                             seed=args.seed, max_iter=args.max_iter, tol=args.tol, reg_covar=args.reg_covar,
                             n_jobs=args.n_jobs, device=args.device, uneven=args.uneven_halving,
                             progress=None if args.quiet else progress)
    except NumericalError as exc:  # user-fixable: fewer components or a larger reg_covar
        raise InputError(marked(exc)) from None
    au = audit(cs, x, tol=args.audit_tol)
    payload = {
        "data": {"name": getattr(ds, "name", str(args.data)), "n": int(x.shape[0]), "dim": int(x.shape[1])},
        "clusterings": {key: val for key, val in cs.to_dict().items() if key not in ("centroids", "weights")},
        "seeds": cs.seeds, "loglik": cs.loglik,
        "audit": au.to_dict(),
    }
    if args.format == "json":
        common.emit(args, payload, "")
        return 0
    lines = [f"clusterings: R0={cs.r} K={cs.k} covariance={cs.covariance_type} backend={cs.backend} init={cs.init}, "
             f"data {x.shape[0]} x {x.shape[1]}", ""]
    rows = [[r, int(cs.seeds[r]), float(cs.loglik[r]), int(cs.n_iter[r]), "yes" if cs.converged[r] else "NO"]
            for r in range(cs.r)]
    lines.append(format_table(["run", "seed", "loglik (nats/sample)", "n_iter", "converged"], rows))
    off = ~np.eye(cs.r, dtype=bool)
    lines.append("")
    if au.ari is not None:
        a = au.ari[off]
        lines.append(f"adjusted Rand index between runs ({au.n_rows} rows): min {a.min():.3f}  "
                     f"median {np.median(a):.3f}  max {a.max():.3f}")
    d = au.centroid_dist[off]
    lines.append(f"Hungarian-matched mean centroid distance: min {d.min():.4g}  median {np.median(d):.4g}  "
                 f"max {d.max():.4g}  (data scale sqrt(total variance) {au.scale:.4g})")
    m = au.min_pair_centroid_dist[off]
    lines.append(f"closest centroid pair between runs: min {m.min():.4g}  median {np.median(m):.4g}")
    lines.append(f"duplicate groups (all matched centroids within tol={au.tol:.3g}): "
                 + (", ".join(str(g) for g in au.duplicate_groups) if au.duplicate_groups else "none"))
    if au.shared_centroids:
        lines.append(f"shared centroids within tol ({len(au.shared_centroids)}; run a centroid j ~ run b centroid k):")
        for a_, j, b, k, dist in au.shared_centroids[:20]:
            lines.append(f"  run {a_} centroid {j} ~ run {b} centroid {k}: distance {dist:.3g}")
        if len(au.shared_centroids) > 20:
            lines.append(f"  ... {len(au.shared_centroids) - 20} more (use --format json)")
    else:
        lines.append("shared centroids within tol: none")
    for w in au.warnings:
        lines.append(f"warning: {w}")
    common.emit(args, payload, "\n".join(lines))
    return 0
