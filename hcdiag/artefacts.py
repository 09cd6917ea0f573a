"""The paper's tables and figures, one function each, with the paper's numbers beside ours.

Each artefact runs (or reuses) the runs of :mod:`hcdiag.verify`'s grid (same :class:`~hcdiag.verify.Job`
names, so a folder written by ``hcdiag verify`` is reused and the numbers are the same), reads the barrier
checks cached beside each run file, and returns a named result:

* ``rows``: list of dicts, one per cell or claim: ``item``, ``conditions``, ``paper`` (the paper's number or
  statement), ``ours`` (our measurement, as text), ``verdict`` (holds / fails / mixed / inconclusive /
  reported), ``values`` (the numbers behind ``ours``: KL in nats, active units as counts) and ``runs`` (the
  run files they come from);
* ``to_markdown()`` / ``to_text()`` / ``to_dict()``;
* plot methods that take ``ax=`` and return the figure, and ``figures()`` (file name -> figure) that
  :func:`save_figures` writes.

``verification/<name>.py`` and ``notebooks/`` only call these functions (:func:`script_main` is the
scripts' whole command line).

>>> sorted(ARTEFACTS)
['diffusion', 'figure2', 'figure4', 'figure5', 'phase', 'table1', 'table2']
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from hcdiag import claims
from hcdiag.errors import InputError, cli_text, flag
from hcdiag.paper import COLLAPSE_KL, DATASETS, LOSS_CONVENTIONS, PAPER_ABLATION, PAPER_TABLE1, PAPER_TABLE2
from hcdiag.plots import axes, has_path_curves
from hcdiag.verify import (ABLATIONS, GRIDS, Job, ablation_jobs, ablation_rows, build_grid, collect, diffusion_table,
                           execute, main_claim_rows, metric, phase_claim_rows, phase_diagram)

# the reduced ablation grid of the smoke preset (Figure 4 at a glance on small synthetic data)
SMOKE_ABLATIONS = {"r0": [2, 4, 8], "eps": [1e-3, 1e-4]}
FIGURE5_MULTIPLES = (2.0, 5.0)
_DATASETS = flag("--datasets", "datasets")
CIFAR_MISSING = "not run: CIFAR-10 files not found in the data folder (data_dir)"


# ---------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ArtefactResult:
    """An artefact's rows (paper beside ours, with verdicts), its settings (``meta``) and the numbers its
    figures draw (``data``)."""

    name: str
    title: str
    rows: list
    meta: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    COLUMNS = ("item", "conditions", "paper", "ours", "verdict")

    def to_dict(self) -> dict:
        from hcdiag.formats import to_jsonable

        return to_jsonable({"schema": "hcdiag.artefact/1", "name": self.name, "title": self.title,
                            "meta": self.meta, "rows": self.rows, "data": self.data})

    def counts(self) -> dict:
        """How many rows have each verdict."""
        out: dict = {}
        for r in self.rows:
            out[r["verdict"]] = out.get(r["verdict"], 0) + 1
        return out

    def verdict_line(self) -> str:
        """One sentence: how many of the rows hold, fail, ... (computed from the rows)."""
        c = self.counts()
        parts = [f"{n} {v}" for v, n in sorted(c.items(), key=lambda kv: -kv[1])]
        return f"{self.title}: {len(self.rows)} row(s): " + ", ".join(parts) + "."

    def _note(self) -> str:
        m = self.meta
        s = f"preset {m.get('preset')}, datasets {', '.join(m.get('datasets', []))}, {m.get('seeds', 1)} seed(s)"
        if m.get("reduced"):
            s += f"; REDUCED: {m['reduced']}"
        if m.get("checks"):
            s += f"; read from the checks documents in {m['checks']} (nothing trained)"
        if m.get("missing"):
            s += f"; {len(m['missing'])} run(s) without a checks document left out: {', '.join(m['missing'])}"
        return s

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", "", f"*{self._note()}*", "", "| " + " | ".join(self.COLUMNS) + " |",
                 "|" + "---|" * len(self.COLUMNS)]
        for r in self.rows:
            lines.append("| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in self.COLUMNS) + " |")
        return "\n".join(lines + ["", self.verdict_line()]) + "\n"

    def to_text(self, width: int = 60) -> str:
        from hcdiag.formats import format_table

        def cut(s):
            s = str(s)
            return s if len(s) <= width else s[: width - 3] + "..."

        table = format_table(list(self.COLUMNS), [[cut(r.get(k, "")) for k in self.COLUMNS] for r in self.rows])
        return f"{self.title}\n({self._note()})\n\n{table}\n\n{self.verdict_line()}"

    def figures(self) -> dict:
        """File name -> matplotlib figure (the caller saves and closes them: :func:`save_figures`)."""
        return {}


@dataclass(frozen=True)
class Table1Result(ArtefactResult):
    def plot(self, ax=None, *, dataset: str | None = None, multiple: float = 2.0):
        """KL per method and stage (mean, sd over seeds as error bars) beside the paper's Table 1 KL."""
        from hcdiag.plots import table1_bars

        return table1_bars(self.rows, dataset or self.meta["datasets"][0], multiple, ax=ax)

    def figures(self) -> dict:
        out = {}
        for ds in self.meta["datasets"]:
            for m in sorted({r["values"]["multiple"] for r in self.rows if r["values"].get("dataset") == ds
                             and r["values"].get("kl") is not None}):
                out[f"{self.name}_{ds}_m{m:g}_side_by_side.png"] = self.plot(dataset=ds, multiple=m)
        return out


@dataclass(frozen=True)
class Figure2Result(ArtefactResult):
    def run(self):
        from hcdiag.runfile import load_run

        return load_run(self.data["run"])

    def plot_memory(self, ax=None):
        """Figure 2 left: l_C of every clustering over training (retained and discarded)."""
        from hcdiag import plots

        return plots.clustering_losses_over_training(self.run(), ax=ax)

    def plot_distance(self, ax=None):
        """Figure 2 right: distance to the collapsed model at each snapshot (check I3's values)."""
        from hcdiag import plots

        return plots.distance_to_collapsed(self.data["checks"]["I3"]["values"], ax=ax)

    def plot_paths(self, ax=None):
        """Historical loss along straight paths to collapsed models (check I2's values)."""
        from hcdiag import plots

        return plots.path_curves(self.data["checks"]["I2"]["values"], ax=ax)

    def plot_kl(self, ax=None):
        """KL and active units over training (paper Figure 3)."""
        from hcdiag import plots

        return plots.kl_and_active_units(self.run(), ax=ax)

    def figures(self) -> dict:
        out = {"figure2_left_memory.png": self.plot_memory(), "figure3_kl_au.png": self.plot_kl()}
        if "param_distance" in self.data["checks"].get("I3", {}).get("values", {}):
            out["figure2_right_distance.png"] = self.plot_distance()
        i2 = self.data["checks"].get("I2", {}).get("values", {})
        if has_path_curves(i2):
            out["figure2_paths.png"] = self.plot_paths()
        return out


@dataclass(frozen=True)
class Figure4Result(ArtefactResult):
    def plot(self, ax=None, *, key: str = "r0"):
        """Final KL (nats) against one ablated setting; the paper's best value and the collapse threshold marked."""
        rows = [r for r in self.rows if r["values"].get("key") == key and r["values"].get("kl") is not None]
        fig, ax = axes(ax)
        ax.plot([r["values"]["value"] for r in rows], [r["values"]["kl"] for r in rows], "o-", color="C3",
                label="ours (final KL)")
        best = PAPER_ABLATION[key][2]
        for b in (best if isinstance(best, tuple) else (best,)):
            ax.axvline(b, ls=":", color="k", lw=1)
        ax.plot([], [], ls=":", color="k", label="paper's best value")
        kls = [r["values"]["kl"] for r in rows]
        if kls and min(kls) > 0:  # log scale, so that collapsed runs (KL < 0.01) are not read as an order
            ax.set_yscale("log")
            ax.axhline(COLLAPSE_KL, ls="--", color="k", lw=1, label=f"collapse threshold (KL = {COLLAPSE_KL:g})")
        if key in ("r0", "eps"):
            ax.set_xscale("log", base=2 if key == "r0" else 10)
        ax.set_xlabel({"r0": "R0 (initial clusterings)", "eps": "refinement eps", "beta_end": "beta (stage 3 end)",
                       "keep_ratio": "keep ratio"}[key])
        ax.set_ylabel("final KL (nats)")
        ax.set_title(f"Ablation of {key}" + (" (REDUCED grid)" if self.meta.get("reduced") else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def figures(self) -> dict:
        keys = []
        for r in self.rows:
            k = r["values"].get("key")
            if k and k not in keys and r["values"].get("kl") is not None:
                keys.append(k)
        return {f"figure4_{k}.png": self.plot(key=k) for k in keys}


@dataclass(frozen=True)
class Figure5Result(ArtefactResult):
    def plot(self, ax=None, *, dataset: str | None = None):
        """KL of HCT and vanilla at each multiple s2 / lambda_max (log scale), the collapse threshold marked."""
        import numpy as np

        ds = dataset or self.meta["datasets"][0]
        rows = [r for r in self.rows if r["values"].get("dataset") == ds and r["values"].get("hct_kl") is not None]
        fig, ax = axes(ax)
        x = np.arange(len(rows))
        vals = [v for r in rows for v in (r["values"]["hct_kl"], r["values"]["vanilla_kl"]) if v]
        floor = min([v for v in vals if v > 0] + [1e-3]) / 10  # a KL of exactly 0 still shows on the log axis
        ax.bar(x - 0.2, [max(r["values"]["hct_kl"], floor) for r in rows], 0.4, color="C3", label="HCT (final)")
        ax.bar(x + 0.2, [max(r["values"]["vanilla_kl"] or 0.0, floor) for r in rows], 0.4, color="C7", label="vanilla")
        ax.axhline(COLLAPSE_KL, ls=":", color="C0", label=f"collapse threshold {COLLAPSE_KL:g}")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"s2 = {r['values']['multiple']:g} lambda_max" for r in rows])
        ax.set_ylabel("KL (nats, eval rows)")
        ax.set_title(f"Figure 5: KL under violating conditions, {ds}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def figures(self) -> dict:
        return {f"figure5_{ds}.png": self.plot(dataset=ds) for ds in self.meta["datasets"]
                if any(r["values"].get("dataset") == ds and r["values"].get("hct_kl") is not None for r in self.rows)}


@dataclass(frozen=True)
class PhaseResult(ArtefactResult):
    def plot(self, ax=None, *, dataset: str | None = None):
        """KL against s2 / lambda_max: closed form (line), trained linear VAE, MLP vanilla (markers)."""
        from hcdiag.plots import phase_diagram

        ds = dataset or self.meta["datasets"][0]
        return phase_diagram(ds, self.data["phase"][ds], ax=ax)

    def figures(self) -> dict:
        return {f"phase_{ds}.png": self.plot(dataset=ds) for ds in self.data["phase"]}


@dataclass(frozen=True)
class DiffusionResult(ArtefactResult):
    def plot(self, ax=None, *, dataset: str | None = None):
        """Noise variance 1 - abar_t of each schedule, lambda_max and the critical timesteps (eq. 13)."""
        import numpy as np

        from hcdiag.theory import alphabar

        ds = dataset or self.meta["datasets"][0]
        d = self.data["diffusion"][ds]
        fig, ax = axes(ax)
        for i, (s, v) in enumerate(d["schedules"].items()):
            g = 1.0 - alphabar(s, v["T"])
            ax.plot(np.arange(1, v["T"] + 1), g, color=f"C{i}", label=f"1 - abar_t ({s})")
            if v["t_c"] is not None:
                ax.axvline(v["t_c"], ls=":", color=f"C{i}", label=f"t_c ({s}) = {v['t_c']}")
        ax.axhline(d["lambda_max"], ls="--", color="k", label=f"lambda_max = {d['lambda_max']:.3g}")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("noise variance 1 - abar_t (data units squared)")
        ax.set_title(f"Critical timestep (eq. 13), {ds}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def figures(self) -> dict:
        return {f"diffusion_{ds}.png": self.plot(dataset=ds) for ds in self.data["diffusion"]}


def save_figures(result: ArtefactResult, out_dir) -> list[str]:
    """Write each of ``result.figures()`` as a PNG into ``out_dir`` (created) and close it; returns the paths."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in result.figures().items():
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------------------
# shared plumbing: validation, the jobs, running them


def _datasets(datasets) -> list[str]:
    if isinstance(datasets, str):
        datasets = [d.strip() for d in datasets.split(",")]
    datasets = [d for d in (datasets or []) if d]
    bad = [d for d in datasets if d not in DATASETS]
    if bad or not datasets:
        raise InputError(f"{_DATASETS}: unknown dataset(s) {', '.join(bad) or '(none given)'}; choose among "
                         f"{', '.join(DATASETS)}.")
    return datasets


def _check(preset: str, seeds) -> None:
    if preset not in GRIDS:
        raise InputError(f"{flag('--preset', 'preset')} must be one of {', '.join(GRIDS)}. Got {preset!r}.")
    if not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"{flag('--seeds', 'seeds')} must be an integer >= 1. Got {seeds}.")


def _out(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag('--out', 'out_dir')} {out} is a file; give a folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shrink(jobs: list[Job], overrides: dict | None, n_samples: int | None) -> list[Job]:
    """Apply extra training overrides and a data size to every job (tiny demos and tests). The run names
    do not record them: give such runs their own ``out_dir``."""
    if not overrides and n_samples is None:
        return jobs
    out = []
    for j in jobs:
        ov = {**dict(j.overrides), **(overrides or {})}
        out.append(replace(j, overrides=tuple(sorted(ov.items())), n_samples=n_samples or j.n_samples))
    return out


def _reduced(overrides, n_samples, extra: str = "") -> str:
    parts = [extra] if extra else []
    if overrides:
        parts.append("training overrides " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())))
    if n_samples:
        parts.append(f"n_samples={n_samples}")
    return "; ".join(parts)


def _run(jobs: list[Job], out: Path, workers, progress) -> list[dict]:
    """Run (or reuse) the jobs; a run that failed is named on stderr and left out of the artefact."""
    import sys

    from hcdiag.verify import failures

    records = execute(jobs, str(out), workers=workers or 1, progress=progress)
    if progress is None:  # the progress lines already name failed runs
        for f in failures(records):
            print(f"hcdiag: run {f['run']} failed and is left out: {f['error']}", file=sys.stderr)
    return collect(records)


def _main_jobs(preset, datasets, seeds, *, device, data_dir, losses) -> list[Job]:
    return [j for j in build_grid(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses)
            if j.group == "main"]


# ---------------------------------------------------------------------------------------------------------
# the artefacts


def table1(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
           out_dir="verification-out/table1", *, losses: list[str] | None = None, device: str = "auto",
           workers: int | None = None, data_dir=None, overrides: dict | None = None, n_samples: int | None = None,
           progress: Callable[[str], None] | None = None) -> Table1Result:
    """Paper Table 1: KL (nats) and active units (Burda) per method, HCT at each stage, beside the paper's.

    Runs the ``main`` group of :func:`hcdiag.verify.build_grid` (the methods of the preset; loss conventions
    ``losses``). HCT's stages are the last round (pre), ``refined`` (post) and ``final`` snapshots; baselines
    their ``final`` snapshot. The rows are :func:`hcdiag.verify.main_claim_rows`' Table 1 rows (the same rules
    decide them as in ``hcdiag verify``): vanilla collapses (KL < 0.01, the text), HCT keeps KL above the text's
    threshold (2.5 synthetic, 2.0 MNIST / Fashion-MNIST, 3.5 CIFAR-10), HCT has the highest KL of the methods
    of the same convention; other baselines 'reported'.
    """
    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    jobs = _shrink(_main_jobs(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses),
                   overrides, n_samples)
    recs = _run(jobs, out, workers, progress)
    rows = [r for r in main_claim_rows(recs, preset) if r["id"].startswith("table1.")]
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "out_dir": str(out), "n_runs": len(recs),
            "reduced": _reduced(overrides, n_samples), "seconds": time.perf_counter() - t0}
    return Table1Result("table1", "Table 1: posterior collapse metrics, paper beside ours", rows, meta)


def table1_from_checks(folder, preset: str = "paper", datasets: Sequence[str] = ("fashion-mnist",), seeds: int = 1,
                       *, losses: list[str] | None = None, methods: list[str] | None = None,
                       multiples: list[float] | None = None) -> Table1Result:
    """Table 1 from the checks documents a ``hcdiag verify`` left, without its run files and without training:
    each main job of the grid (:func:`hcdiag.verify.build_grid` with ``losses``, ``methods``, ``multiples``)
    is looked up as ``<run>.checks.json`` in ``folder``, in verify's layout (``main/<dataset>/...``) or flat (the
    committed ``docs/results/*/checks``), and its rows are decided by the same rules as :func:`table1`. A job
    without a checks document is left out and named in ``meta['missing']``; the comparisons are like for like
    among the jobs found. ``folder`` must hold at least one."""
    datasets = _datasets(datasets)
    _check(preset, seeds)
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{flag('--checks', 'folder')} {root} is not a folder of checks documents "
                         "(<run>.checks.json, as hcdiag verify writes them); give that folder.")
    jobs = [j for j in build_grid(preset, datasets, seeds, losses=losses, methods=methods, multiples=multiples)
            if j.group == "main"]
    recs, missing = [], []
    for j in jobs:
        name = Path(j.name).with_suffix(".checks.json")
        rec = None
        for path in dict.fromkeys(p for p in (root / name, root / name.name) if p.is_file()):
            doc = _read_checks_doc(path)
            # flat folders name runs by file name only: take a document only when it was measured on this job's
            # run (main/<dataset>/...), never another dataset's or group's run of the same file name
            run = doc.get("run")
            if isinstance(run, str) and (run == j.name or run.replace("\\", "/").endswith("/" + j.name)):
                rec = {"job": asdict(j), "run": run, "checks": str(path), "doc": doc}
                break
        if rec is None:
            missing.append(j.name)
            continue
        try:  # the rules read the document's values: a shape they cannot read is refused here, by file
            main_claim_rows([rec], preset)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{rec['checks']} is not a checks document of hcdiag check-barrier (its values cannot be "
                             f"read: {type(exc).__name__} {cli_text(exc)}); run hcdiag verify again to rewrite "
                             "it.") from None
        recs.append(rec)
    if not recs:
        raise InputError(f"{root} holds none of the {len(jobs)} checks documents of the {preset} grid's main jobs on "
                         f"{', '.join(datasets)} (e.g. {Path(jobs[0].name).with_suffix('.checks.json').name} measured "
                         f"on {jobs[0].name}); give the folder hcdiag verify wrote." if jobs else
                         f"the {preset} grid has no main jobs for these choices.")
    rows = [r for r in main_claim_rows(recs, preset) if r["id"].startswith("table1.")]
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "checks": str(root), "n_runs": len(recs),
            "missing": missing, "reduced": ""}
    return Table1Result("table1", "Table 1: posterior collapse metrics, paper beside ours", rows, meta)


def _read_checks_doc(path: Path) -> dict:
    """A checks document (``hcdiag check-barrier --format json``, cached by verify) read from ``path``, its shape
    checked as far as the claim rules read it; one line (:class:`InputError`) otherwise."""
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} is not a readable checks document ({cli_text(exc)}); run hcdiag verify "
                         "again to rewrite it.") from None
    why = None
    if not isinstance(doc, dict) or doc.get("schema") != "hcdiag.check-barrier/1" or not isinstance(
            doc.get("checks"), list):
        why = "schema hcdiag.check-barrier/1"
    else:
        for c in doc["checks"]:
            if not (isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("verdict"), str)
                    and isinstance(c.get("values", {}), dict)):
                why = "each check a record with an id, a verdict and values"
                break
            rows = c.get("values", {}).get("snapshots", []) if c["id"] == "KL" else []  # what the rules read
            if not (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("snapshot"), str)
                                                   and all(r.get(k) is None or (isinstance(r[k], (int, float))
                                                                                and math.isfinite(r[k]))
                                                           for k in ("kl", "au")) for r in rows)):
                why = f"check {c['id']}: each snapshot row named, its KL and active units numbers"
                break
    if why:
        raise InputError(f"{path} is not a checks document of hcdiag check-barrier ({why}); run hcdiag verify "
                         "again to rewrite it.")
    return doc


def table2(preset: str = "smoke", datasets: Sequence[str] = ("cifar10",), seeds: int = 1,
           out_dir="verification-out/table2", *, losses: list[str] | None = None, device: str = "auto",
           workers: int | None = None, data_dir=None, overrides: dict | None = None, n_samples: int | None = None,
           progress: Callable[[str], None] | None = None) -> Table1Result:
    """Paper Table 2: CIFAR-10 with a convolutional encoder/decoder (section 5.6): KL, active units, MS-SSIM.

    The ``main`` jobs of the grid on ``cifar10`` with ``arch='conv'``, in their own group ``table2``. Without
    CIFAR-10 files in ``data_dir`` the result has one inconclusive row (nothing is trained). MS-SSIM
    (:func:`hcdiag.ssim.ms_ssim`, higher is better) compares each run's eval inputs with their deterministic
    reconstructions ``xhat = f(mu(x))`` at the row's snapshot (the one its KL and AU come from: ``final``,
    HCT's ``refined``), as images of the model's ``image_shape``, with ``data_range`` = max - min of the
    run's eval inputs; mean and sd over seeds. Its effective settings (scales, window, weights; 8x8 images
    give one scale, a 7x7 window) are in each row's ``values`` and in ``meta['ms_ssim']``.
    """
    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    meta = {"preset": preset, "datasets": ["cifar10"], "seeds": seeds, "out_dir": str(out),
            "reduced": _reduced(overrides, n_samples)}
    title = "Table 2: CIFAR-10 with a convolutional architecture, paper beside ours"
    if datasets != ["cifar10"]:
        raise InputError(f"{_DATASETS}: Table 2 is on cifar10 only. Got {','.join(datasets)}.")
    from hcdiag.data import load

    try:
        load("cifar10", data_dir=data_dir, n_samples=2)
    except InputError as exc:
        row = {"id": "table2", "claim": "Table 2 (all methods)", "item": "Table 2 (all methods)", "section": "5.6, Table 2",
               "conditions": f"cifar10, conv, preset {preset}",
               "paper": "; ".join(f"{k}: KL {v[0]}, AU {v[1]}, MS-SSIM {v[2]}" for k, v in PAPER_TABLE2.items()),
               "ours": f"{CIFAR_MISSING} ({str(exc)})",  # a result: the library's words
               "verdict": "inconclusive", "runs": [], "values": {"reason": str(exc)}}
        return Table1Result("table2", title, [row], {**meta, "n_runs": 0, "seconds": time.perf_counter() - t0})
    jobs = [replace(j, group="table2", overrides=tuple(sorted({**dict(j.overrides), "arch": "conv"}.items())))
            for j in _main_jobs(preset, ["cifar10"], seeds, device=device, data_dir=data_dir, losses=losses)
            if j.label in ("hct", "vanilla", "beta-beta2", "anneal")]
    recs = _run(_shrink(jobs, overrides, n_samples), out, workers, progress)
    by_run = {r["run"]: r for r in recs}
    rows, settings = [], None
    for r1 in main_claim_rows(recs, preset, group="table2"):
        v = r1["values"]
        if not r1["id"].startswith("table1.") or (v.get("method") == "hct" and v.get("stage") in ("pre", "final")):
            continue  # Table 2's 'Ours' (3.55, 3) is the post-refinement model (Table 1's CIFAR-10 column)
        if "stage" in v:  # a cell: MS-SSIM beside KL and AU
            if v["method"] == "hct":
                rs = [by_run[p] for p in r1["runs"]]
                res = claims.table2_hct([metric(r, "refined") for r in rs], [metric(r, "refined", "au") for r in rs])
                r1 = res.row(r1["conditions"], item="HCT (post-refinement): non-collapsed", runs=r1["runs"],
                             **{k: v[k] for k in ("dataset", "multiple", "loss", "method", "stage", "label", "snapshots")})
            key = {"beta-beta2": "beta2"}.get(v["method"], v["method"])
            pk = PAPER_TABLE2.get(key)
            per_run = [_run_ms_ssim(p, snap) for p, snap in zip(r1["runs"], v["snapshots"])]
            ms = claims.Stat.of(m["value"] for m in per_run)
            settings = settings or next((m["params"] for m in per_run if m["params"]), None)
            r1 = {**r1, "paper": (f"KL {pk[0]}, AU {pk[1]}, MS-SSIM {pk[2]}" if pk else "not reported"),
                  "ours": f"{r1['ours']}; MS-SSIM {ms.text()}",
                  "values": {**r1["values"], "paper_kl": pk[0] if pk else None, "paper_au": pk[1] if pk else None,
                             "ms_ssim": ms.mean, "ms_ssim_sd": ms.sd, "ms_ssim_n": ms.n,
                             "ms_ssim_runs": [m["value"] for m in per_run],
                             "ms_ssim_data_range": [m["data_range"] for m in per_run],
                             "ms_ssim_params": [m["params"] for m in per_run],
                             "paper_ms_ssim": pk[2] if pk else None}}
        rows.append(r1)
    meta["ms_ssim"] = {"between": "eval inputs and xhat = f(mu(x)) at the row's snapshot",
                       "data_range": "max - min of each run's eval inputs", "settings": settings}
    return Table1Result("table2", title, rows, {**meta, "n_runs": len(recs), "seconds": time.perf_counter() - t0})


def _run_ms_ssim(path: str, snapshot: str) -> dict:
    """MS-SSIM of one run at one snapshot, averaged over its eval rows (Table 2's column).

    The model is rebuilt from ``config.model`` and the snapshot's state_dict (a run written with outputs
    only uses its stored ``xhat``); rows are reshaped to the conv family's ``image_shape`` (C, H, W).
    ``data_range`` is the span (max - min) of the eval inputs, the pixel range the images actually cover
    (about 1 for CIFAR-10 scaled to [0, 1]); reconstructions are not clipped (negative terms are clamped
    inside :func:`hcdiag.ssim.ms_ssim`). Returns ``{"value", "data_range", "params"}``; ``value`` is None
    (with ``reason``) when the run has no image shape or no reconstruction for the snapshot.
    """
    from hcdiag.models import build_model, encode_decode
    from hcdiag.runfile import load_run
    from hcdiag.ssim import ms_ssim

    run = load_run(path)
    x = run.eval_x.float()  # (m, N)
    shape = (run.config.model or {}).get("image_shape")
    if not shape:
        return {"value": None, "data_range": None, "params": None, "reason": "config.model has no image_shape"}
    if run.has_parameters and run.has_state(snapshot):
        model = build_model(run.config.model)
        model.load_state_dict(run.snapshot(snapshot))
        xhat = encode_decode(model, x)[2]
    elif run.outputs(snapshot) is not None:
        xhat = run.outputs(snapshot).xhat.float()
    else:
        return {"value": None, "data_range": None, "params": None, "reason": f"no snapshot {snapshot!r}"}
    data_range = float(x.max() - x.min())
    res = ms_ssim(x.reshape(-1, *shape), xhat.reshape(-1, *shape), data_range=data_range,
                  return_params=True)  # (m,) per image
    return {"value": float(res.value.mean()), "data_range": data_range, "params": res.params.to_dict()}


def figure2(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
            out_dir="verification-out/figure2", *, loss: str | None = None, multiple: float = 2.0,
            device: str = "auto", data_dir=None, overrides: dict | None = None, n_samples: int | None = None,
            progress: Callable[[str], None] | None = None) -> Figure2Result:
    """Paper Figure 2 on one HCT run (first dataset, seed 0): memory of discarded clusterings (left; checks
    N1-N3) and the distance to the constructed collapsed model (right; check I3), plus I2 and the final KL.

    The run is the grid's ``main`` HCT job (``loss`` defaults to the grid's first convention); the check
    values are those of ``hcdiag check-barrier`` cached beside the run file.
    """
    import json

    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    losses = [loss] if loss else None
    if loss is not None and loss not in LOSS_CONVENTIONS:
        raise InputError(f"{flag('--loss', 'loss')} must be one of literal, scaled, mean. Got {loss!r}.")
    jobs = [j for j in _main_jobs(preset, datasets[:1], 1, device=device, data_dir=data_dir, losses=losses)
            if j.label == "hct" and j.seed == 0]
    jobs = [j for j in jobs if j.loss == jobs[0].loss]
    jobs = [replace(j, multiple=float(multiple)) for j in jobs[:1]]
    rec = _run(_shrink(jobs, overrides, n_samples), out, 1, progress)[0]
    checks = {c["id"]: c for c in rec["doc"]["checks"]}
    j = rec["job"]
    cond = f"{j['dataset']}, s2 = {j['multiple']:g} lambda_max, loss {j['loss']}, seed {j['seed']}, preset {preset}"
    rows = []
    for cid in ("N1", "N2", "N3", "I3", "I2", "KL"):
        c = checks.get(cid)
        if c is None:
            continue
        values = {"check": cid}
        if cid == "I3" and "param_distance" in c["values"]:
            v = c["values"]
            values.update(param_distance=v["param_distance"], snapshots=v["snapshots"], spearman_rho=v["spearman_rho"])
        if cid == "KL":
            values.update(kl=c["values"]["final"]["kl"], snapshot=c["values"]["final"]["snapshot"])
        row = claims.barrier(cid, [(c["verdict"], c.get("summary") or c.get("reason") or "")]).row(
            cond, runs=[rec["run"]], **values)
        if cid == "KL":
            row["paper"] = _paper_final_kl(j["dataset"])
        rows.append(row)
    meta = {"preset": preset, "datasets": datasets[:1], "seeds": 1, "out_dir": str(out), "n_runs": 1,
            "reduced": _reduced(overrides, n_samples), "seconds": time.perf_counter() - t0}
    data = {"run": rec["run"], "checks": json.loads(json.dumps(checks))}
    return Figure2Result("figure2", "Figure 2: historical barrier on one HCT run", rows, meta, data)


def _paper_final_kl(ds: str) -> str:
    pk = PAPER_TABLE1.get(ds, {}).get("hct:final")
    return f"KL {pk[0]} (Table 1, final single-cluster, {ds})" if pk else f"KL >= {COLLAPSE_KL:g} (5.4)"


def _ablation_jobs(preset: str, ds: str, *, device, data_dir, losses) -> tuple[list[Job], str]:
    if GRIDS[preset]["ablations"]:
        return ([j for j in build_grid(preset, [ds], 1, device=device, data_dir=data_dir, losses=losses)
                 if j.group == "ablation"], "")
    # the smoke preset: a reduced grid, built exactly as build_grid builds the paper's ablations
    g = GRIDS[preset]
    jobs = ablation_jobs(preset, ds, SMOKE_ABLATIONS, loss=(losses or g["losses"])[0], n_samples=g["n_samples"].get(ds),
                         data_dir=data_dir, device=device)
    reduced = "reduced ablation grid (" + "; ".join(f"{k} in {{{', '.join(f'{v:g}' for v in vs)}}}"
                                                    for k, vs in SMOKE_ABLATIONS.items()) + "; beta and keep ratio not run)"
    return jobs, reduced


def _ablated(job: Job) -> str:
    """The setting an ablation job varies (its tag is the setting's name and value)."""
    return next(k for k in ABLATIONS if job.tag.startswith(k))


def figure4(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
            out_dir="verification-out/figure4", *, losses: list[str] | None = None, device: str = "auto",
            workers: int | None = None, data_dir=None, overrides: dict | None = None, n_samples: int | None = None,
            progress: Callable[[str], None] | None = None) -> Figure4Result:
    """Paper Figure 4 and section 5.5: final KL of HCT against R0, eps, beta and the keep ratio.

    ``--preset paper`` runs verify's ablation jobs (R0 in {2,4,8,16,32}, eps in {1e-3,1e-4,1e-5}, beta_end in
    {1,2,3,4,6}, keep ratio in {1/3,1/2,2/3}); ``--preset smoke`` a REDUCED grid (R0 in {2,4,8}, eps in
    {1e-3,1e-4}) on the smoke data. One row per setting (final KL), one verdict row per ablated setting.
    Ablations run one seed (as in verify); ``seeds`` is accepted for a uniform interface.
    """
    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    jobs, reduced = [], ""
    for ds in datasets:
        js, reduced = _ablation_jobs(preset, ds, device=device, data_dir=data_dir, losses=losses)
        jobs += js
    # the extra overrides never replace the ablated setting itself
    jobs = [_shrink([j], {k: v for k, v in (overrides or {}).items() if k != _ablated(j)},
                    n_samples)[0] for j in jobs]
    recs = _run(jobs, out, workers, progress)
    rows = ablation_rows(recs, preset)
    # the run files trained by this call (a folder written by ``hcdiag verify`` is reused: none)
    meta = {"preset": preset, "datasets": datasets, "seeds": 1, "out_dir": str(out), "n_runs": len(recs),
            "trained": [r["run"] for r in recs if r["trained"]],
            "reduced": _reduced(overrides, n_samples, reduced), "seconds": time.perf_counter() - t0}
    return Figure4Result("figure4", "Figure 4: ablations of HCT" + (" (REDUCED)" if reduced else ""), rows, meta)


def figure5(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
            out_dir="verification-out/figure5", *, multiples: Sequence[float] = FIGURE5_MULTIPLES,
            loss: str | None = None, device: str = "auto", workers: int | None = None, data_dir=None,
            overrides: dict | None = None, n_samples: int | None = None,
            progress: Callable[[str], None] | None = None) -> Figure5Result:
    """Paper Figure 5 (section 5.7): final KL of HCT and vanilla at s2 = 2 and 5 lambda_max.

    The grid's ``main`` HCT and vanilla jobs at each multiple (the smoke grid has 2 only; 5 is the same job at
    another multiple), under one loss convention (default the grid's first). The rows are
    :func:`hcdiag.verify.main_claim_rows`' Figure 5 rows (:func:`hcdiag.claims.hct_where_vanilla_collapses`):
    per seed, HCT's final KL >= 0.01 and vanilla's < 0.01.
    """
    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    if loss is not None and loss not in LOSS_CONVENTIONS:
        raise InputError(f"{flag('--loss', 'loss')} must be one of literal, scaled, mean. Got {loss!r}.")
    base = [j for j in _main_jobs(preset, datasets, seeds, device=device, data_dir=data_dir,
                                  losses=[loss] if loss else None) if j.label in ("hct", "vanilla")]
    first = base[0].loss
    base = [j for j in base if j.loss == first]
    jobs = list({replace(j, multiple=float(m)).name: replace(j, multiple=float(m))
                 for m in multiples for j in base}.values())
    recs = _run(_shrink(jobs, overrides, n_samples), out, workers, progress)
    rows = [r for r in main_claim_rows(recs, preset) if r["id"] == "figure5"]
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "out_dir": str(out), "n_runs": len(recs),
            "reduced": _reduced(overrides, n_samples), "seconds": time.perf_counter() - t0}
    return Figure5Result("figure5", "Figure 5: KL under violating conditions (HCT vs vanilla)", rows, meta)


def phase(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
          out_dir="verification-out/phase", *, multiples: Sequence[float] | None = None, device: str = "auto",
          workers: int | None = None, data_dir=None, overrides: dict | None = None, n_samples: int | None = None,
          linear_steps: int = 1500, mlp: bool = True, progress: Callable[[str], None] | None = None) -> PhaseResult:
    """The phase transition (Li et al. 2024; paper 3.2, 5.7): vanilla KL against s2 / lambda_max.

    Closed form (:func:`hcdiag.theory.phase_table`), trained linear VAE (:func:`hcdiag.linear_vae.fit_linear_vae`,
    ``linear_steps`` Adam steps) and, with ``mlp=True``, the grid's ``phase`` MLP vanilla runs, via
    :func:`hcdiag.verify.phase_diagram`. The claims are ``hcdiag verify``'s rows (:func:`hcdiag.claims.linear_phase`,
    P1: the trained linear VAE's KL and active units match the closed form at every multiple, within the stated
    tolerance; :func:`hcdiag.claims.mlp_phase`, P2: the MLP collapses iff s2 > lambda_max), followed by one
    ``reported`` row of numbers per multiple.
    """
    from hcdiag.train import PRESETS

    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    g = GRIDS[preset]
    mults = list(multiples) if multiples is not None else list(g["phase_multiples"])
    recs = []
    if mlp:
        jobs = [j for j in build_grid(preset, datasets, seeds, device=device, data_dir=data_dir) if j.group == "phase"]
        jobs = list({replace(j, multiple=float(m)).name: replace(j, multiple=float(m))
                     for m in mults for j in jobs if j.multiple == jobs[0].multiple}.values())
        recs = _run(_shrink(jobs, overrides, n_samples), out, workers, progress)
    # the latent dimension the MLP runs were trained with (as verify does): the call's, else the grid's overrides
    latent = int({**g["overrides"], **(overrides or {})}.get("latent_dim", PRESETS[preset]["latent_dim"]))
    ns = {ds: n_samples or g["n_samples"].get(ds) for ds in datasets}
    ph = phase_diagram(datasets, recs, latent_dim=latent, multiples=mults, n_samples=ns, data_dir=data_dir,
                       linear_steps=linear_steps)
    rows = phase_claim_rows(ph, preset)
    for ds, d in ph.items():
        p1 = {o["multiple"]: o for o in next(r for r in rows if r["id"] == "phase.P1" and r["values"]["dataset"] == ds)
              ["values"]["rows"]}
        for r in d["rows"]:
            sub = p1.get(float(r["multiple"]), {})
            mlp_s = f"; MLP KL {r['kl_mlp']:.3g}" if r.get("kl_mlp") is not None else ""
            rows.append({"id": "phase.point", "claim": f"s2 = {r['multiple']:g} lambda_max",
                         "item": f"s2 = {r['multiple']:g} lambda_max", "section": "3.2, 5.7",
                         "conditions": f"{ds}, lambda_max = {d['lambda_max']:.4g}, latent {d['latent_dim']}",
                         "paper": f"collapse (KL < {COLLAPSE_KL:g}) iff s2 > lambda_max" + (
                             "; expected collapsed" if r["multiple"] > 1 else "; expected KL > 0" if r["multiple"] < 1
                             else "; the boundary (the closed form is already 0 here): no claim"),
                         "ours": f"closed form KL {r['kl_theory']:.3g}, AU {r['au_theory']}; trained linear KL "
                                 f"{r['kl_linear']:.3g}, AU {r['au_linear']} (P1 here: {sub.get('verdict', '-')}){mlp_s}",
                         "verdict": "reported",
                         "runs": [x["run"] for x in recs if x["job"]["dataset"] == ds
                                  and math.isclose(x["job"]["multiple"], r["multiple"])],
                         "values": {"dataset": ds, **r, "p1": sub.get("verdict")}})
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "out_dir": str(out), "n_runs": len(recs),
            "reduced": _reduced(overrides, n_samples, "" if mlp else "no MLP runs"), "seconds": time.perf_counter() - t0}
    return PhaseResult("phase", "Phase transition: closed form vs trained linear VAE vs MLP vanilla", rows, meta,
                       {"phase": ph})


def diffusion(preset: str = "smoke", datasets: Sequence[str] = ("synthetic",), seeds: int = 1,
              out_dir="verification-out/diffusion", *, data_dir=None, n_samples: int | None = None,
              T: int = 1000, progress: Callable[[str], None] | None = None) -> DiffusionResult:
    """Critical timesteps (paper 7.2, eq. 13: ``1 - abar_{t_c} = lambda_max``) per schedule and dataset.

    ``lambda_max`` is the top eigenvalue of the data covariance (squared data units) on the preset's data,
    as in ``hcdiag verify``; ``T`` diffusion steps. No training (``seeds`` is accepted for a uniform
    interface). Verdict per schedule: holds when eq. 13 has a solution, fails with the reason otherwise.
    """
    from hcdiag.data import load
    from hcdiag.spectrum import spectrum
    from hcdiag.theory import critical_timestep
    from hcdiag.train import PRESETS

    datasets = _datasets(datasets)
    _check(preset, seeds)
    out = _out(out_dir)
    t0 = time.perf_counter()
    g = GRIDS[preset]
    latent = PRESETS[preset]["latent_dim"]
    lam = {}
    for ds in datasets:
        data = load(ds, n_samples=n_samples or g["n_samples"].get(ds), data_dir=data_dir)
        lam[ds] = {"lambda_max": spectrum(data.x, top=min(latent, data.d)).lambda_max}
    if T == 1000:
        diff = diffusion_table(datasets, lam)
    else:
        diff = {ds: {"lambda_max": lam[ds]["lambda_max"],
                     "schedules": {s: critical_timestep(lam[ds]["lambda_max"], s, T).to_dict() for s in ("linear", "cosine")}}
                for ds in datasets}
    rows = []
    for ds, d in diff.items():
        cond = f"{ds}, lambda_max = {d['lambda_max']:.4g}, T = {T}"
        rows.append(claims.critical_timestep(d["schedules"], T=T).row(cond, dataset=ds, lambda_max=d["lambda_max"]))
        for s, v in d["schedules"].items():  # the same rule, one schedule at a time
            tc = v["t_c"]
            ours = (f"t_c = {tc} (fractional {v['t_c_frac']:.2f})" if tc is not None else f"no t_c: {v['t_c_reason']}")
            ours += f"; SNR timestep {v['t_snr']}" if v["t_snr"] is not None else ""
            res = claims.critical_timestep({s: v}, T=T)
            rows.append({**res.row(cond, item=f"critical timestep, {s} schedule", **{**v, "dataset": ds, "schedule": s}),
                         "paper": "t_c exists with 1 - abar_tc = lambda_max (eq. 13); no number given", "ours": ours})
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "out_dir": str(out), "n_runs": 0,
            "reduced": f"n_samples={n_samples}" if n_samples else "", "seconds": time.perf_counter() - t0}
    return DiffusionResult("diffusion", "Diffusion: critical timesteps per schedule (eq. 13)", rows, meta,
                           {"diffusion": diff})


ARTEFACTS: dict[str, Callable[..., ArtefactResult]] = {
    "table1": table1, "table2": table2, "figure2": figure2, "figure4": figure4, "figure5": figure5,
    "phase": phase, "diffusion": diffusion,
}


# ---------------------------------------------------------------------------------------------------------
# the scripts' command line


def _conventions(text: str, option: str, *, one: bool = False) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in LOSS_CONVENTIONS]
    if bad or not items or (one and len(items) != 1):
        raise InputError(f"{option} must be {'one' if one else 'a comma list'} of "
                         f"{', '.join(LOSS_CONVENTIONS)}. Got {text!r}.")
    return items


def script_main(name: str, argv: list[str] | None = None) -> int:
    """The whole command line of ``verification/<name>.py``: run the artefact, print the side-by-side table
    (text or JSON), save the figures into ``--out``. Bad input: one line on stderr, exit status 2."""
    import argparse
    import json
    import sys

    fn = ARTEFACTS[name]
    p = argparse.ArgumentParser(prog=f"verification/{name}.py",
                                description=(fn.__doc__ or "").strip().splitlines()[0])
    p.add_argument("--preset", default="smoke", help="smoke (default; reduced, CPU) or paper (GPU)")
    p.add_argument("--datasets", default="cifar10" if name == "table2" else "synthetic",
                   help=f"comma list among {', '.join(DATASETS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    p.add_argument("--out", default=f"verification-out/{name}", help="output folder (runs, figures, results.json)")
    p.add_argument("--format", default="text", choices=["text", "json"], help="output format (default text)")
    p.add_argument("--data-dir", default=None, help="folder of MNIST / CIFAR-10 files")
    if name != "diffusion":
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    takes = inspect.signature(fn).parameters
    if "losses" in takes or "loss" in takes:  # to reuse a verify folder run with --losses
        p.add_argument("--losses" if "losses" in takes else "--loss", default=None,
                       help="loss convention(s) of the runs, comma list among " + ", ".join(LOSS_CONVENTIONS)
                       + " (default: the preset grid's first); the run names of a verify folder carry it")
    args = p.parse_args(argv)
    try:
        kw = dict(data_dir=args.data_dir)
        if getattr(args, "losses", None) is not None:
            kw["losses"] = _conventions(args.losses, "--losses")
        if getattr(args, "loss", None) is not None:
            kw["loss"] = _conventions(args.loss, "--loss", one=True)[0]
        if name != "diffusion":
            kw["device"] = args.device
        if name not in ("figure2", "diffusion"):
            kw["progress"] = lambda s: print(s, file=sys.stderr, flush=True)
        res = fn(args.preset, _datasets(args.datasets), args.seeds, args.out, **kw)
        figs = save_figures(res, args.out)
        doc = {**res.to_dict(), "figures": figs}
        (Path(args.out) / f"{name}.json").write_text(json.dumps(doc, indent=2))
        (Path(args.out) / f"{name}.md").write_text(res.to_markdown())
    except InputError as exc:
        print(f"error: {cli_text(exc)}", file=sys.stderr)
        return 2
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(res.to_text())
        print("figures: " + (", ".join(figs) or "none"))
    return 0
