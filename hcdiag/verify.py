"""``hcdiag verify``: the paper's tables and figures, run end to end, beside our measurements.

A grid of training jobs (datasets x methods x multiples x loss conventions x seeds, plus the phase
diagram's vanilla runs and, with the paper preset, the ablations) runs through an executor; each job is
pure (it loads its data, trains, and writes its own run file, resuming or skipping a run already
written), then the barrier checks run on every run file, and the claims table is assembled:
one row per claim and condition, the paper's statement and number beside ours (mean and spread over
seeds) and a verdict.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable


from hcdiag import claims
from hcdiag.errors import InputError, flag
from hcdiag.paper import DATASETS, INCONSISTENCIES, PAPER_ABLATION

@dataclass(frozen=True)
class Job:
    """One training run of the grid; ``name`` is its run file's path below the output folder."""

    dataset: str
    method: str
    multiple: float
    loss: str
    seed: int
    preset: str
    group: str = "main"  # main | phase | ablation | witness | diffusion
    tag: str = ""
    overrides: tuple = ()
    n_samples: int | None = None
    data_dir: str | None = None
    device: str = "auto"
    after: str = ""  # the name of a job whose run file this one starts from (the rescue starts from the collapse)
    # the other of literal/scaled, whose complete run file of this same job this one is relabelled from instead of
    # training again (hcdiag.train.twin: a baseline's training does not depend on it); see ``twin``
    relabel_from: str = ""

    @property
    def name(self) -> str:
        if self.group == "diffusion":  # `multiple` is the lambda_max the data are rescaled to (DIFFUSION)
            return f"diffusion/{self.dataset}/{self.method}_lam{self.multiple:g}_s{self.seed}.pt"
        tag = f"-{self.tag}" if self.tag else ""
        return f"{self.group}/{self.dataset}/{self.method}{tag}_m{self.multiple:g}_{self.loss}_s{self.seed}.pt"

    @property
    def twin(self) -> str:
        """The name of the job this one is relabelled from (``relabel_from``), or ''. Derived, so that a job
        copied with another group, multiple or settings (``dataclasses.replace``) names its own twin."""
        return replace(self, loss=self.relabel_from, relabel_from="").name if self.relabel_from else ""

    @property
    def label(self) -> str:
        return self.method + (f"-{self.tag}" if self.tag else "")


# methods: (method, tag); the tag 'warmup' is HCT with its clustering weight beta warmed up from 0 (claims.md
# lists it beside the three loss conventions); it runs under the grid's first convention, 'literal', where the
# paper's beta >= 1 against a reconstruction weight 1/(2 s2) snaps xhat onto a centroid in the first epoch.
# Every other method runs under every convention, so that each comparison is like for like (same
# convention, s2, data and seed): under 'mean' the objective is 'literal' at s2 -> N s2, beta -> beta / N.
GRIDS = {
    "smoke": dict(methods=[("hct", ""), ("hct", "warmup"), ("vanilla", "")], multiples=[2.0],
                  losses=["literal", "scaled", "mean"],
                  phase_multiples=[0.25, 0.5, 1.0, 2.0, 5.0], phase_epochs=8, n_samples={},
                  ablations=False, overrides={}, witness=True, diffusion=True),
    "paper": dict(methods=[("hct", ""), ("hct", "warmup"), ("vanilla", ""), ("beta", "beta2"), ("beta", "beta4"),
                           ("anneal", ""), ("aggressive", ""), ("em-type", "")],
                  multiples=[2.0, 5.0], losses=["literal", "scaled", "mean"],
                  phase_multiples=[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0], phase_epochs=30, n_samples={},
                  ablations=True, overrides={}, witness=True, diffusion=True),
}
ABLATIONS = {"r0": [2, 4, 8, 16, 32], "eps": [1e-3, 1e-4, 1e-5], "beta_end": [1.0, 2.0, 3.0, 4.0, 6.0],
             "keep_ratio": [1 / 3, 1 / 2, 2 / 3]}


GROUPS = ("main", "phase", "ablation", "witness", "diffusion")

# section 7 (issue 14): Algorithm 2 on the data rescaled to each lambda_max (D1, D2 across the rescaling), and at
# `controls_at` its two controls on the same steps (D3, D4); `train`: hcdiag.diffusion.train.DiffusionConfig fields
# lambda_max 0.7 is where eq. 13 and SNR lambda_max = 1 part (their log SNRs differ by |log(1 - lambda)|, under a
# factor 2 for lambda <= 0.5; eq. 13 has no solution from 1): the only scale at which a measurement can tell them apart
DIFFUSION = {"smoke": dict(lambdas=[0.1, 0.7, 10.0], controls_at=0.7, n_samples={"synthetic": 4000},
                           train=dict(kind="linear", R=4, epochs_per_round=500)),
             "paper": dict(lambdas=[0.1, 0.3, 0.7, 1.0, 3.0, 10.0], controls_at=0.7, n_samples={"synthetic": 20000},
                           train=dict(kind="linear", R=8, epochs_per_round=2000))}
DIFFUSION_METHODS = ("consensus", "single", "logsnr")
DIFFUSION_RUN_CHECKS = ["D1", "D2", "D4"]  # per run; D3 compares runs and is decided when the grid is collected


def _source_hash() -> str | None:
    """A hash of hcdiag's own source as it is on disk now: every regular ``.py`` file of the package (not dot
    files such as an editor's lock links; one that cannot be read counts as its name). None when no source file
    is found (a zipped or compiled-only install): then no cached checks document is ever reused."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    found = False
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or p.is_symlink() or not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            data = b"\0unreadable"
        found = True
        h.update(rel.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:20] if found else None


# the source this process imported hcdiag.verify from (hcdiag.checks and the rest are imported after it)
_SOURCE_AT_IMPORT = _source_hash()


def code_fingerprint() -> str | None:
    """The stamp of the code this process runs, for each checks document verify caches beside a run file: the
    hash of hcdiag's source (:func:`_source_hash`) when it is still what this process imported, else None (the
    files changed under a running process: what it computes is stamped by nothing, so it is never reused). A
    document without this stamp (an older hcdiag's, an edited check's) is measured again from its run file."""
    now = _source_hash()
    return now if now is not None and now == _SOURCE_AT_IMPORT else None


def _stamp(run_path: Path) -> dict | None:
    """What a cached checks document of the run file ``run_path`` was computed from: this code
    (:func:`code_fingerprint`), the run file (size and modification time: a file replaced by hand is another run)
    and the numeric libraries. None when the code has no stamp."""
    code = code_fingerprint()
    if code is None:
        return None
    import numpy
    import torch

    try:
        st = os.stat(run_path)
    except OSError:
        return None
    return {"checks_code": code, "run_file": [st.st_size, st.st_mtime_ns],
            "versions": {"torch": str(torch.__version__), "numpy": numpy.__version__}}


def _cached_checks(path: Path, run_path: Path, **extra) -> bool:
    """Whether the checks document at ``path`` can be reused for the run file ``run_path``: readable, and written
    from this code, this very run file and these libraries (:func:`_stamp`), with ``extra`` (e.g. the diffusion
    checks' version). Anything else (missing, unreadable, another hcdiag's) is measured again."""
    stamp = _stamp(run_path)
    if stamp is None:
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(doc, dict) and isinstance(doc.get("checks"), list)
            and all(doc.get(k) == v for k, v in {**stamp, **extra}.items()))


def _write_checks(path: Path, run_path: Path, doc: dict) -> None:
    """Write a checks document whole (:func:`hcdiag.atomic.write_bytes`), stamped (:func:`_stamp`) after the
    checks ran: with no code stamp (``checks_code`` None) if the source changed meanwhile."""
    from hcdiag.atomic import write_bytes

    legacy = path.with_suffix(".tmp")  # the fixed-name temporary earlier versions wrote
    if legacy.is_file() and not legacy.is_symlink():
        legacy.unlink(missing_ok=True)
    stamp = _stamp(run_path) or {"checks_code": None}
    write_bytes(path, json.dumps({**doc, **stamp}, default=float).encode())


# stamped into each diffusion run's .checks.json: a grid resumed after the checks changed decides them again
DIFFUSION_CHECKS_VERSION = 4  # 3: inconclusive for a denoiser that has not learned the data; 4: D3 asks the controls first


def diffusion_jobs(preset: str, dataset: str, seed: int, *, data_dir=None, device="auto") -> list[Job]:
    d = DIFFUSION[preset]
    n = d["n_samples"].get(dataset)
    return [Job(dataset, m, lam, "eps", seed, preset, group="diffusion", n_samples=n, data_dir=data_dir, device=device)
            for lam in d["lambdas"] for m in (DIFFUSION_METHODS if lam == d["controls_at"] else ("consensus",))]

# the companion notes' three phases (issue 13), the teacher-guided VAE at s2 = multiple x lambda_max under the
# grid's first convention: trained with alignment from scratch (prevent), without it (collapse: alpha = 0), and
# restarted with alignment from the collapse run's final snapshot (rescue); snapshots at `snapshots` evenly
# spaced epochs, so the rescue's time to the certificate is read at that resolution
WITNESS = {"smoke": dict(multiples=[2.0, 0.5], alpha=1.0, snapshots=8),
           "paper": dict(multiples=[2.0, 0.5], alpha=1.0, snapshots=20)}
WITNESS_PHASES = ("prevent", "collapse", "rescue")
# beside them, prevention with a teacher that sees a random view of x (check W4's view gap is then not 0): the
# image shifted by up to a pixel, or, for data without an image shape, Gaussian noise of sd 1 in the data's units
IMAGE_DATASETS = ("fashion-mnist", "mnist", "cifar10", "digits")


def witness_view(dataset: str) -> str:
    return "shift:1" if dataset in IMAGE_DATASETS else "noise:1"


def witness_jobs(preset: str, dataset: str, seed: int, *, loss: str, n_samples=None, data_dir=None,
                 device="auto") -> list[Job]:
    """Prevention, collapse and rescue of the teacher-guided VAE at each of the preset's witness multiples."""
    w = WITNESS[preset]
    common = dict(preset=preset, group="witness", n_samples=n_samples, data_dir=data_dir, device=device)
    jobs = []
    for m in w["multiples"]:
        base = {**GRIDS[preset]["overrides"], "references": (), "baseline_snapshots": w["snapshots"]}
        collapse = Job(dataset, "teacher", m, loss, seed, tag="collapse",
                       overrides=tuple(sorted({**base, "teacher_alpha": 0.0}.items())), **common)
        on = tuple(sorted({**base, "teacher_alpha": w["alpha"]}.items()))
        view = tuple(sorted({**base, "teacher_alpha": w["alpha"], "teacher_view": witness_view(dataset)}.items()))
        jobs += [Job(dataset, "teacher", m, loss, seed, tag="prevent", overrides=on, **common), collapse,
                 Job(dataset, "teacher", m, loss, seed, tag="rescue", overrides=on, after=collapse.name, **common),
                 Job(dataset, "teacher", m, loss, seed, tag="view", overrides=view, **common)]
    return jobs


def ablation_jobs(preset: str, dataset: str, ablations: dict, *, loss: str, n_samples=None, data_dir=None,
                  device="auto") -> list[Job]:
    """HCT at 2 lambda_max, seed 0, once per ablated value (Figure 4 / section 5.5): the grid's overrides as
    every other job, but never over the ablated setting itself. R0 not a power of two and keep ratios other
    than 1/2 need uneven halving."""
    g = GRIDS[preset]
    jobs = []
    for key, vals in ablations.items():
        for v in vals:
            ov = {**g["overrides"], key: v, "references": ()}
            if key == "keep_ratio" or (key == "r0" and v & (v - 1)):
                ov["uneven"] = True
            jobs.append(Job(dataset, "hct", 2.0, loss, 0, preset=preset, group="ablation", tag=f"{key}{v:g}",
                            overrides=tuple(sorted(ov.items())), n_samples=n_samples, data_dir=data_dir, device=device))
    return jobs


def build_grid(preset: str, datasets: list[str], seeds: int, *, device="auto", data_dir=None,
               losses: list[str] | None = None, groups: list[str] | None = None, methods: list[str] | None = None,
               multiples: list[float] | None = None, readings: list[str] | None = None) -> list[Job]:
    """The jobs of a preset's grid; ``groups`` keeps only some of main (methods x multiples x conventions),
    phase (vanilla at each multiple) and ablation (paper preset) when compute is short. ``methods`` keeps
    only the main jobs of those labels (``hct``, ``hct-warmup``, ``vanilla``, ``beta-beta2``, ...: a method
    with its tag; ``hct`` is HCT alone), ``multiples`` only the main jobs at those multiples of lambda_max.
    ``readings``: readings of HCT's epoch (:data:`hcdiag.train.config.EPOCH_UNITS`) besides the preset's, each
    adding HCT's main jobs trained under it (label ``hct-reading-<unit>``), so that the claims are decided under
    every reading and those that change verdict between them are reported (:func:`reading_changes`)."""
    if readings:
        from hcdiag.train.config import EPOCH_UNITS

        bad = [u for u in readings if u not in EPOCH_UNITS]
        if bad:
            raise InputError(f"{flag('--readings', 'readings')}: unknown reading(s) {', '.join(bad)}; choose among "
                             f"{', '.join(EPOCH_UNITS)}.")
        jobs = build_grid(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses, groups=groups,
                          methods=methods, multiples=multiples)
        own = _preset_reading(preset)
        extra = []
        for u in dict.fromkeys(readings):
            if u == own:
                continue
            extra += [replace(j, tag=f"reading-{u}", overrides=tuple(sorted({**dict(j.overrides), "epoch_unit": u}.items())))
                      for j in jobs if j.group == "main" and j.label == "hct"]
        return jobs + extra
    if methods is not None or multiples is not None:
        jobs = build_grid(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses, groups=groups)
        labels = list(dict.fromkeys(j.label for j in jobs if j.group == "main"))
        if not labels:
            raise InputError(f"{flag('--methods and --multiples', 'methods and multiples')} choose among the main "
                             f"jobs, and the grid has none ({flag('--groups', 'groups')} "
                             f"{','.join(groups or ())}): add main to the groups.")
        bad = [m for m in methods or () if m not in labels]
        if bad or methods == []:
            raise InputError(f"{flag('--methods', 'methods')}: unknown method(s) {', '.join(bad) or '(none given)'} "
                             f"in the {preset} grid; choose among {', '.join(labels)}.")
        have = sorted({j.multiple for j in jobs if j.group == "main"})
        off = [m for m in multiples or () if m not in have]
        if off or multiples == []:
            raise InputError(f"{flag('--multiples', 'multiples')}: the {preset} grid's main jobs are at "
                             f"{', '.join(f'{m:g}' for m in have)} x lambda_max; got {', '.join(f'{m:g}' for m in off) or '(none)'}.")
        return [j for j in jobs if j.group != "main" or ((methods is None or j.label in methods)
                                                         and (multiples is None or j.multiple in multiples))]
    if preset not in GRIDS:
        raise InputError(f"The 'preset' parameter must be one of {', '.join(GRIDS)}. Got {preset!r}.")
    if seeds < 1:
        raise InputError(f"{flag('--seeds', 'seeds')} must be an integer >= 1. Got {seeds}.")
    if groups is not None:
        bad = [x for x in groups if x not in GROUPS]
        if bad or not groups:
            raise InputError(f"{flag('--groups', 'groups')}: unknown group(s) {', '.join(bad) or '(none given)'}; "
                             f"choose among {', '.join(GROUPS)}.")
        return [j for j in build_grid(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses)
                if j.group in groups]
    from hcdiag.train.twin import shareable, twin_loss

    g = GRIDS[preset]
    losses = losses or g["losses"]
    jobs = []
    for ds in datasets:
        n = g["n_samples"].get(ds)
        common = dict(preset=preset, n_samples=n, data_dir=data_dir, device=device)
        for seed in range(seeds):
            for method, tag in g["methods"]:
                ov = dict(g["overrides"])
                if tag.startswith("beta"):
                    ov["kl_weight"] = float(tag[4:])
                if tag == "warmup":
                    ov["beta_schedule"] = "warmup"
                if method != "hct":
                    ov["references"] = ()
                for m in g["multiples"]:
                    mine = losses[:1] if tag == "warmup" else losses
                    for loss in mine:
                        job = Job(ds, method, m, loss, seed, tag=tag, overrides=tuple(sorted(ov.items())), **common)
                        other = twin_loss(loss) if shareable(method, loss) else None
                        if other in mine and mine.index(other) < mine.index(loss):  # trained once, under the first
                            job = replace(job, relabel_from=other)
                        jobs.append(job)
            for m in g["phase_multiples"]:
                ov = {**g["overrides"], "epochs": g["phase_epochs"], "references": ()}
                jobs.append(Job(ds, "vanilla", m, losses[0], seed, group="phase", overrides=tuple(sorted(ov.items())), **common))
            if g.get("witness"):  # the companion notes' phases (WITNESS)
                jobs += witness_jobs(preset, ds, seed, loss=losses[0], n_samples=n, data_dir=data_dir, device=device)
            if g.get("diffusion"):  # section 7 (DIFFUSION)
                jobs += diffusion_jobs(preset, ds, seed, data_dir=data_dir, device=device)
        if g["ablations"]:
            jobs += ablation_jobs(preset, ds, ABLATIONS, loss=losses[0], n_samples=n, data_dir=data_dir, device=device)
    return jobs


_DATA_CACHE: dict = {}


def _load(job: Job):
    from hcdiag.data import load

    key = (job.dataset, job.n_samples, job.data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load(job.dataset, n_samples=job.n_samples, data_dir=job.data_dir)
    return _DATA_CACHE[key]


def run_job(job: Job, out_dir: str, heartbeat: float | None = None) -> dict:
    """Train one job (resuming a partial run file, returning at once for a complete one), then run the
    barrier checks on it (cached next to the run file). Pure: everything goes to its own files. With
    ``heartbeat`` seconds, a line of the run's progress goes to stderr at most that often
    (:class:`hcdiag.train.progress.Heartbeat`)."""
    import torch

    from hcdiag.checks.barrier import run_checks
    from hcdiag.report import to_json_doc
    from hcdiag.runfile import load_run
    from hcdiag.train import Progress, Trainer, make_config
    from hcdiag.train.progress import Heartbeat

    torch.set_num_threads(max(1, int(os.environ.get("HCDIAG_THREADS", "1"))))
    if job.group == "diffusion":
        return run_diffusion_job(job, out_dir, heartbeat)
    path = Path(out_dir) / job.name
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start = {"init_from": str(Path(out_dir) / job.after)} if job.after else {}
    cfg = make_config(job.preset, method=job.method, multiple=job.multiple, loss=job.loss, seed=job.seed,
                      device=job.device, **dict(job.overrides), **start)
    trained = False
    shared = None
    complete = False
    if path.exists():
        try:
            complete = load_run(path).complete
        except InputError:
            complete = False
    if not complete:
        # stage 0 is shared: every job of a seed fits the same clusterings of the same data
        # the references are shared by the grid's runs (HCDIAG_SHARE_REFERENCES=0: each run trains its own, as
        # bench verify does to measure what sharing saves)
        share = os.environ.get("HCDIAG_SHARE_REFERENCES", "1") != "0"
        beat = Heartbeat(job.name, heartbeat) if heartbeat else Progress(enabled=False, summaries=False)
        trainer = Trainer(cfg, _load(job), path, progress=beat,
                          em_cache=Path(out_dir) / "em-cache",
                          ref_cache=Path(out_dir) / "ref-cache" if share else None)
        if job.twin:
            from hcdiag.train.twin import relabel

            if relabel(trainer, Path(out_dir) / job.twin, path) is not None:
                shared = job.twin
        if shared is None:
            trainer.run(resume=True)
            trained = True
    checks_path = path.with_suffix(".checks.json")
    measured = trained or shared or not _cached_checks(checks_path, path)
    if measured:
        select = {"main": None, "witness": WITNESS_CHECKS}.get(job.group, ["KL", "AU"])
        results = run_checks(path, select=select)
        _write_checks(checks_path, path, to_json_doc(results, run_path=str(path)))
    return {"job": asdict(job), "run": str(path), "checks": str(checks_path), "trained": trained,
            "shared_from": shared, "measured": bool(measured), "seconds": time.perf_counter() - t0}


def run_diffusion_job(job: Job, out_dir: str, heartbeat: float | None = None) -> dict:
    """Train one diffusion job (resuming a partial run file; a complete one is kept) and run D1, D2, D4 on it."""
    from hcdiag.checks.diffusion import run_diffusion_checks
    from hcdiag.device import resolve_device
    from hcdiag.diffusion.data import prepare
    from hcdiag.diffusion.runfile import load_diffusion_run, save_diffusion_run
    from hcdiag.diffusion.train import DiffusionConfig, train_diffusion
    from hcdiag.report import to_json_doc
    from hcdiag.train.progress import Heartbeat

    path = Path(out_dir) / job.name
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prev = None
    if path.exists():
        try:
            prev = load_diffusion_run(path)
        except InputError:
            prev = None  # unreadable (a killed writer never leaves one: writes are atomic): train again
    trained = False
    if prev is None or not prev.complete:
        data = prepare(_load(job), lambda_max=job.multiple)
        cfg = DiffusionConfig(method=job.method, seed=job.seed, device=str(resolve_device(job.device)),
                              **DIFFUSION[job.preset]["train"])
        beat = Heartbeat(job.name, heartbeat) if heartbeat else None
        out = train_diffusion(data.x, cfg, beat, resume=prev.resume_state() if prev is not None else None,
                              checkpoint=lambda part: save_diffusion_run(part, path, data), checkpoint_steps=500)
        save_diffusion_run(out, path, data)
        trained = True
    checks_path = path.with_suffix(".checks.json")
    measured = trained or not _cached_checks(checks_path, path, checks_version=DIFFUSION_CHECKS_VERSION)
    if measured:
        results = run_diffusion_checks(load_diffusion_run(path), select=DIFFUSION_RUN_CHECKS, seed=job.seed)
        _write_checks(checks_path, path, {**to_json_doc(results, run_path=str(path), tolerance=None),
                                          "checks_version": DIFFUSION_CHECKS_VERSION})
    return {"job": asdict(job), "run": str(path), "checks": str(checks_path), "trained": trained,
            "shared_from": None, "measured": bool(measured), "seconds": time.perf_counter() - t0}


# the teacher-guided VAE's runs: no rounds for HCT's checks, and T4 would certify against clustering 0, not the
# run's teacher (W3 is the teacher's own certificate)
WITNESS_CHECKS = ["KL", "AU", "W3", "W4"]


def _die_with_parent() -> None:
    """Linux: ask the kernel to stop this worker when the verify process that started it dies (killed,
    crashed), instead of training on as an orphan and writing into the output folder."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before the request was made
            os._exit(1)


def _failure(job: Job, exc: BaseException) -> dict:
    """The record of a job that did not finish: it is reported, and the other jobs go on."""
    from concurrent.futures.process import BrokenProcessPool

    from hcdiag.errors import HcdiagError

    if isinstance(exc, BrokenProcessPool):
        msg = "its worker process died (killed, or out of memory); run verify again to resume it"
    elif isinstance(exc, HcdiagError):
        msg = str(exc)
    else:
        msg = f"{type(exc).__name__}: {str(exc)}"  # a record: the library's words
    return {"job": asdict(job), "run": None, "checks": None, "trained": False, "seconds": 0.0,
            "error": msg.splitlines()[0] if msg else type(exc).__name__}


def _init_worker(gpu_ids: list[int] | None, counter):
    """Pin each worker to one GPU (one run per GPU) before torch initialises CUDA; stop with the parent."""
    _die_with_parent()
    if gpu_ids:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids[i % len(gpu_ids)])


def _preset_reading(preset: str) -> str:
    """The reading of HCT's epoch the grid's runs use unless told otherwise."""
    from hcdiag.train import make_config

    return make_config(preset, **GRIDS[preset]["overrides"]).epoch_unit


def reading_changes(rows: list[dict]) -> list[dict]:
    """The claims whose verdict differs between readings of HCT's epoch: for each row of an
    ``hct-reading-<unit>`` job whose claim, dataset, s2, convention and stage has a row of plain HCT (the
    preset's reading) with another verdict, one ``reported`` row naming both."""
    def key(r):
        v = r["values"]
        return (r["id"], v.get("dataset"), v.get("multiple"), v.get("loss"), v.get("stage"))

    base = {key(r): r for r in rows if r["values"].get("method") == "hct"}
    out = []
    for r in rows:
        lab = r["values"].get("method") or ""
        if not lab.startswith("hct-reading-") or key(r) not in base:
            continue
        b = base[key(r)]
        if b["verdict"] != r["verdict"]:
            unit = lab[len("hct-reading-"):]
            out.append({"id": f"reading.{r['id']}", "claim": f"{b['claim']} (the verdict depends on how HCT's epoch "
                        "is read)", "item": b["item"], "section": b["section"], "paper": b["paper"],
                        "ours": f"preset's reading: {b['verdict']} ({b['ours']}); {unit}: {r['verdict']} ({r['ours']})",
                        "verdict": "reported", "conditions": b["conditions"], "runs": b["runs"] + r["runs"],
                        "values": {**{k: b["values"].get(k) for k in ("dataset", "multiple", "loss", "stage")},
                                   "method": "hct", "verdicts": {"preset": b["verdict"], unit: r["verdict"]}}})
    return out


def _readings(recs: list[dict]) -> str:
    """The readings of HCT's epoch the grid's HCT runs were trained with (``config.hct.epoch_unit`` of each
    run file; a grid resumed across hcdiag versions may mix them), e.g. ``data_pass``; ``none`` without HCT."""
    from hcdiag.runfile import load_run

    seen = []
    for r in recs:
        if r["job"]["method"] == "hct":
            try:
                unit = (load_run(r["run"]).config.hct or {}).get("epoch_unit", "not recorded")
            except InputError:
                unit = "unreadable"
            if unit not in seen:
                seen.append(unit)
    return " and ".join(seen) if seen else "none (no HCT run)"


def plan(preset: str, datasets, seeds: int, *, data_dir=None, losses=None, groups=None, methods=None,
         multiples=None, readings=None, workers: int | None = None) -> dict:
    """What the grid would cost on this machine, before any work (``hcdiag verify --plan``): its jobs and
    their work (:mod:`hcdiag.plan`) at unit costs measured here on each dataset (one thread, the grid's
    architecture; about 10-30 s per dataset). Nothing is trained or written. Returns ``{"plan", "units",
    "workers", "text"}``."""
    from hcdiag.data import load
    from hcdiag.plan import format_plan, grid_plan, unit_costs

    datasets = list(datasets)
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise InputError(f"{flag('--datasets', 'datasets')}: unknown dataset(s) {', '.join(bad)}; choose among "
                         f"{', '.join(DATASETS)}.")
    jobs = build_grid(preset, datasets, seeds, device="cpu", data_dir=data_dir, losses=losses, groups=groups,
                      methods=methods, multiples=multiples, readings=readings)
    g = GRIDS[preset]
    n_rows, units = {}, {}
    for ds in datasets:
        data = load(ds, n_samples=g["n_samples"].get(ds), data_dir=data_dir)
        n_rows[ds] = len(data.x)
        units[ds] = unit_costs(data, preset, **g["overrides"])
    workers = max(1, min(workers or (os.cpu_count() or 1), len(jobs) or 1))
    p = grid_plan(jobs, n_rows, units)
    return {"plan": p, "units": units, "workers": workers, "text": format_plan(p, units, workers)}


def _dependents(jobs: list[Job]) -> dict[int, list[int]]:
    """Job index -> the indices of the jobs that wait for its run file: those that start from it (``after``) and
    those relabelled from it (``twin``). A job whose ``after`` or ``twin`` is not in the list runs at once (and
    fails if its ``after`` run file does not exist; trains if its twin's does not)."""
    index = {j.name: i for i, j in enumerate(jobs)}
    out: dict[int, list[int]] = {}
    for k, j in enumerate(jobs):
        for dep in dict.fromkeys(d for d in (j.after, j.twin) if d and d in index):
            out.setdefault(index[dep], []).append(k)
    return out


class _Waits:
    """The jobs waiting on others (:func:`_dependents`): :meth:`finished` records one job's end and returns its
    dependents whose every dependency has ended, with the error each must fail with (None: run it). A job fails
    when a job it starts from (``after``) failed; a failed twin only means it trains itself."""

    def __init__(self, jobs: list[Job]):
        self.jobs, self.waiting = jobs, _dependents(jobs)
        self.left = {}
        for ks in self.waiting.values():
            for k in ks:
                self.left[k] = self.left.get(k, 0) + 1
        self.blocked: dict[int, str] = {}

    def first(self) -> list[int]:
        return [i for i in range(len(self.jobs)) if i not in self.left]

    def finished(self, i: int, failed: bool) -> list[tuple[int, str | None]]:
        out = []
        for k in self.waiting.pop(i, []):
            if failed and self.jobs[k].after == self.jobs[i].name:
                self.blocked.setdefault(k, f"it starts from {self.jobs[i].name}, which did not finish")
            self.left[k] -= 1
            if self.left[k] == 0:
                out.append((k, self.blocked.get(k)))
        return out


def _heartbeat(seconds: float | None) -> float | None:
    """``heartbeat`` checked before any work: ``None`` or 0 for none, else a finite number of seconds > 0."""
    if seconds is None or seconds == 0:
        return None
    try:
        ok = float(seconds) > 0 and math.isfinite(float(seconds))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{flag('--heartbeat', 'heartbeat')} must be a number of seconds >= 0 (0: no progress lines "
                         f"while a run trains). Got {seconds}.")
    return float(seconds)


def execute(jobs: list[Job], out_dir: str, *, executor: str = "local", workers: int | None = None,
            progress: Callable[[str], None] | None = None, slurm: dict | None = None,
            heartbeat: float | None = None) -> list[dict]:
    """Run the jobs with the local process pool (one run per core, or per GPU) or submitit (a SLURM job
    array; ``slurm={'cluster': 'local'}`` uses submitit's local executor, as the tests do). ``progress``
    gets a line as each run ends; with ``heartbeat`` seconds every running run also writes a line of its own
    progress to stderr at most that often (a worker's stderr: the terminal, or submitit's log)."""
    heartbeat = _heartbeat(heartbeat)
    beat = {"heartbeat": heartbeat} if heartbeat else {}
    if executor == "local":
        import multiprocessing as mp

        import torch

        from hcdiag.formats import duration

        n_gpu = torch.cuda.device_count() if any(j.device in ("auto", "cuda") for j in jobs) else 0
        workers = workers or (n_gpu or max(1, os.cpu_count() or 1))
        workers = max(1, min(workers, len(jobs)))
        results: list[dict | None] = [None] * len(jobs)

        t_start = time.perf_counter()
        index = {j.name: k for k, j in enumerate(jobs)}

        def _will_train(k: int) -> bool:
            src = index.get(jobs[k].twin) if jobs[k].twin else None
            return src is None or bool((results[src] or {}).get("error"))

        def done(i: int, rec: dict) -> None:
            results[i] = rec
            if progress:
                n = sum(r is not None for r in results)
                what = f"FAILED: {rec['error']}" if rec.get("error") else f"{rec['seconds']:.1f} s" + (
                    f", relabelled from {rec['shared_from']}: the same training" if rec.get("shared_from") else "")
                # the pace of the runs trained here: runs finished before (a resumed grid) took no time and would
                # make the estimate seconds for hours of work
                worked = sum(r is not None and bool(r.get("trained")) for r in results)
                # the jobs left that train: one relabelled from its twin's run file takes seconds, not a run's time,
                # unless its twin failed or is not in the grid (then it trains, hcdiag.train.twin)
                to_train = sum(r is None and _will_train(k) for k, r in enumerate(results))
                left = (time.perf_counter() - t_start) / worked * to_train if worked and to_train else None
                eta = f", about {duration(left)} to the end" if left is not None else ""
                progress(f"[{n}/{len(jobs)}] {jobs[i].name} ({what}{eta})")

        waits = _Waits(jobs)  # the jobs that start from another's run file, or are relabelled from it

        def finished(i: int, rec: dict) -> list[int]:
            """Record job i; return its dependents now ready. A failed job fails the jobs that start from its
            file, and theirs, down the chain."""
            done(i, rec)
            ready = []
            for k, error in waits.finished(i, bool(rec.get("error"))):
                if error:
                    ready += finished(k, _failure(jobs[k], InputError(error)))
                else:
                    ready.append(k)
            return ready

        def never_started() -> list[dict]:
            for k, r in enumerate(results):  # only a cycle of 'after' names leaves a job here
                if r is None:
                    done(k, _failure(jobs[k], InputError(f"it never started: it starts from {jobs[k].after}, which "
                                                         "waits on it in turn (a cycle of dependencies)")))
            return results

        first = waits.first()
        if workers == 1:
            queue = list(first)
            while queue:
                i = queue.pop(0)
                try:
                    rec = run_job(jobs[i], out_dir, **beat)
                except Exception as exc:  # one failed run is reported; the grid goes on
                    rec = _failure(jobs[i], exc)
                queue += finished(i, rec)
            return never_started()
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(list(range(n_gpu)) or None, counter)) as pool:
            futs = {pool.submit(run_job, jobs[i], out_dir, **beat): i for i in first}
            while futs:  # progress in the order runs finish, not the order submitted
                finished_now, _ = wait(futs, return_when=FIRST_COMPLETED)
                for f in finished_now:
                    i = futs.pop(f)
                    try:
                        rec = f.result()
                    except Exception as exc:
                        rec = _failure(jobs[i], exc)
                    for k in finished(i, rec):
                        futs[pool.submit(run_job, jobs[k], out_dir, **beat)] = k
            return never_started()
    if executor == "submitit":
        try:
            import submitit
        except ImportError:
            submitit_flag = flag("--executor submitit", "executor='submitit'")
            raise InputError(f"{submitit_flag} needs the submitit package: "
                             "pip install 'hcdiag[cluster]'.") from None
        slurm = dict(slurm or {})
        cluster = slurm.pop("cluster", None)
        ex = submitit.AutoExecutor(folder=str(Path(out_dir) / "submitit"), cluster=cluster)
        params = {"timeout_min": slurm.pop("timeout_min", 360)}
        if cluster != "local":
            params.update(slurm_array_parallelism=slurm.pop("array_parallelism", 64), gpus_per_node=slurm.pop("gpus", 1),
                          cpus_per_task=slurm.pop("cpus", 4))
        params.update(slurm)
        ex.update_parameters(**params)
        waits = _Waits(jobs)
        out: list[dict | None] = [None] * len(jobs)
        wave = waits.first()
        while wave:  # a job array per wave: the jobs that wait on another's run file go in a later one
            sj = ex.map_array(partial(run_job, **beat), [jobs[i] for i in wave], [out_dir] * len(wave))
            nxt = []
            for i, s in zip(wave, sj):
                try:
                    out[i] = s.result()
                except Exception as exc:  # submitit re-raises the job's error (or its own, for a lost job)
                    out[i] = _failure(jobs[i], exc)
                stack = [i]
                while stack:  # a failed job fails the jobs that start from it, and theirs, down the chain
                    p = stack.pop()
                    for k, error in waits.finished(p, bool(out[p].get("error"))):
                        if error:
                            out[k] = _failure(jobs[k], InputError(error))
                            stack.append(k)
                        else:
                            nxt.append(k)
                if progress:
                    what = f"FAILED: {out[i]['error']}" if out[i].get("error") else f"job {s.job_id}"
                    progress(f"[{sum(r is not None for r in out)}/{len(jobs)}] {jobs[i].name} ({what})")
            wave = nxt
        for k, r in enumerate(out):
            if r is None:
                out[k] = _failure(jobs[k], InputError(f"it never started: it starts from {jobs[k].after}, which waits "
                                                      "on it in turn (a cycle of dependencies)"))
        return out
    raise InputError(f"{flag('--executor', 'executor')} must be local or submitit. Got {executor!r}.")


# ---------------------------------------------------------------------------------------------------------
# measurements: the runs' cached checks documents as plain records, and the claims decided on them by
# hcdiag.claims (the one place a claim is decided; the artefacts select their rows from these functions)

BARRIER_IDS = ("N1", "N2", "N3", "T1", "T2", "T2b", "T3", "T4", "I1", "I2", "I3")


def snapshot_row(doc: dict, name: str) -> dict | None:
    """The KL check's per-snapshot metrics row (KL, active units, MI, MSE) of snapshot ``name``, or None."""
    kl = next((c for c in doc["checks"] if c["id"] == "KL"), None)
    if kl is None or "snapshots" not in kl["values"]:
        return None
    return next((r for r in kl["values"]["snapshots"] if r["snapshot"] == name), None)


def metric(rec: dict, snapshot: str | None, key: str = "kl"):
    """One metric (``kl`` in nats, ``au`` ...) of a run's snapshot, recomputed by its checks; None if absent."""
    return (snapshot_row(rec["doc"], snapshot) or {}).get(key) if snapshot is not None else None


def last_round(rec: dict) -> str | None:
    """The last stage-1 round's snapshot (HCT's pre-refinement model in Table 1); None when the run has none
    (R0 = 2), so that the pre-refinement claim is inconclusive rather than decided on another snapshot."""
    kl = next((c for c in rec["doc"]["checks"] if c["id"] == "KL"), None)
    names = [r["snapshot"] for r in (kl["values"].get("snapshots", []) if kl else []) if r["snapshot"].startswith("round")]
    return names[-1] if names else None


def check_of(doc: dict, cid: str) -> tuple[str, str]:
    """(verdict, summary) of check ``cid`` in a checks document; not run is inconclusive."""
    c = next((c for c in doc["checks"] if c["id"] == cid), None)
    return (c["verdict"], c.get("summary") or c.get("reason") or "") if c else ("inconclusive", f"check {cid} not run")


def label(job: dict) -> str:
    return job["method"] + (f"-{job['tag']}" if job["tag"] else "")


def collect(records: list[dict]) -> list[dict]:
    """Load each finished record's checks document (and its job) for aggregation; failed runs (``error``)
    are left out here and listed by :func:`failures`."""
    out = []
    for r in records:
        if r.get("error"):
            continue
        doc = json.loads(Path(r["checks"]).read_text())
        out.append({**r, "doc": doc})
    return out


def failures(records: list[dict]) -> list[dict]:
    """The runs that did not finish: run file name and the one-line reason."""
    return [{"run": Job(**r["job"]).name, "error": r["error"]} for r in records if r.get("error")]


HCT_STAGES = (("pre", last_round), ("post", lambda r: "refined"), ("final", lambda r: "final"))


def _by_seed(rs: list[dict], snapshot, key: str = "kl") -> dict:
    return {r["job"]["seed"]: metric(r, snapshot(r) if callable(snapshot) else snapshot, key) for r in rs}


def main_claim_rows(recs: list[dict], preset: str, *, group: str = "main") -> list[dict]:
    """Table 1, Figure 5 and the barrier checks, one block per (dataset, s2, loss convention[, HCT variant]).

    Like for like: HCT is compared only with baselines of the same dataset, s2, loss convention and seed.
    Rows (see :meth:`hcdiag.claims.ClaimResult.row`) carry ``values`` with ``dataset``, ``multiple``, ``loss``,
    ``method`` and, for Table 1 cells, ``stage``, ``label`` and ``snapshots``."""
    by: dict = {}
    for r in recs:
        j = r["job"]
        if j["group"] == group:
            by.setdefault((j["dataset"], j["multiple"], j["loss"]), {}).setdefault(label(j), []).append(r)
    rows = []
    for ds, m, loss in sorted(by):
        cell = by[(ds, m, loss)]
        cond = f"{ds}, preset {preset}, s2 = {m:g} lambda_max, loss {loss}"
        at = dict(dataset=ds, multiple=m, loss=loss)
        base_labels = sorted(lab for lab in cell if not lab.startswith("hct"))
        baselines = {lab: _by_seed(cell[lab], "final") for lab in base_labels}
        for lab in base_labels:
            rs = sorted(cell[lab], key=lambda r: r["job"]["seed"])
            kl, au = [metric(r, "final") for r in rs], [metric(r, "final", "au") for r in rs]
            res = (claims.vanilla_collapses(kl, au, dataset=ds) if lab == "vanilla"
                   else claims.baseline_cell(lab, kl, au, dataset=ds))
            item = "vanilla VAE" if lab == "vanilla" else lab
            rows.append(res.row(cond, item=item, runs=[r["run"] for r in rs], **at, method=lab, stage="final",
                                label=f"{item} [{loss}]", snapshots=["final"] * len(rs)))
        for lab in sorted(lab for lab in cell if lab.startswith("hct")):
            rs = sorted(cell[lab], key=lambda r: r["job"]["seed"])
            runs = [r["run"] for r in rs]
            warm = lab == "hct-warmup"
            reading = lab[len("hct-reading-"):] if lab.startswith("hct-reading-") else None
            c = cond + (", beta warm-up from 0" if warm else "") + (f", HCT's epoch read as {reading}" if reading else "")
            name = "HCT, beta warm-up" if warm else f"HCT ({reading} epochs)" if reading else "HCT"
            for stage, snap in HCT_STAGES:
                snaps = [snap(r) for r in rs]
                kl = [metric(r, s) for r, s in zip(rs, snaps)]
                au = [metric(r, s, "au") for r, s in zip(rs, snaps)]
                item = f"{name} ({claims.STAGE_NAMES[stage]})"
                rows.append(claims.hct_keeps_kl(stage, kl, au, dataset=ds).row(
                    c, item=item, runs=runs, **at, method=lab, stage=stage, label=f"{item} [{loss}]", snapshots=snaps))
            # always a row: a missing comparator (e.g. its run failed) makes the claim inconclusive, not absent
            final = _by_seed(rs, "final")
            rows.append(claims.hct_highest_kl(final, baselines).row(
                c, runs=runs + [r["run"] for lab2 in base_labels for r in cell[lab2]], **at, method=lab))
            van_runs = [r["run"] for r in cell.get("vanilla", [])]
            rows.append(claims.hct_where_vanilla_collapses(final, baselines.get("vanilla", {})).row(
                c, runs=runs + van_runs, **at, method=lab, hct_runs=runs, vanilla_runs=van_runs))
            for cid in BARRIER_IDS:
                rows.append(claims.barrier(cid, [check_of(r["doc"], cid) for r in rs]).row(c, runs=runs, **at, method=lab))
    return rows


def _w3_rows(rec: dict) -> list[dict]:
    c = next((c for c in rec["doc"]["checks"] if c["id"] == "W3"), None)
    return (c or {}).get("values", {}).get("rows", []) if c and c["verdict"] != "inconclusive" else []


def _final_gap(rec: dict | None):
    return next((r["G_T"] for r in _w3_rows(rec) if r["snapshot"] == "final"), None) if rec else None


def _final(rec: dict) -> dict:
    """KL, active units, MI and MSE of a run's final snapshot (its KL check's row)."""
    return {k: metric(rec, "final", k) for k in ("kl", "au", "mi", "mse")}


def _prevention(rec: dict) -> dict:
    """A prevention run's record for :func:`hcdiag.claims.witness_prevention`: W3's verdict, its smallest gap and
    the final metrics."""
    return {"w3": check_of(rec["doc"], "W3"), "min_gap": min((x["G_T"] for x in _w3_rows(rec)), default=None),
            **_final(rec)}


def _epoch_of(snapshot: str, epochs: int) -> int | None:
    if snapshot == "final":
        return epochs
    return int(snapshot[len("epoch"):]) if snapshot.startswith("epoch") and snapshot[5:].isdigit() else None


def witness_series(recs: list[dict]) -> dict:
    """(dataset, multiple, loss) -> phase -> (epochs, G_T) of seed 0's teacher-guided runs, from W3's rows."""
    out: dict = {}
    for r in recs:
        j = r["job"]
        if j["group"] == "witness" and j["seed"] == 0:
            rows = _w3_rows(r)
            n = len(rows)
            # the snapshots after init are evenly spaced epochs ending at 'final' (the last epoch)
            eps = [_epoch_of(x["snapshot"], -1) for x in rows]
            last = max([e for e in eps if e is not None and e > 0], default=0)
            step = last / max(1, n - 1) if n > 1 else 1
            eps = [e if e is not None and e >= 0 else (last + step if n > 1 else 1) for e in eps]
            out.setdefault((j["dataset"], j["multiple"], j["loss"]), {})[j["tag"]] = (eps, [x["G_T"] for x in rows])
    return out


def witness_claim_rows(recs: list[dict], preset: str) -> list[dict]:
    """The companion notes' prevention, collapse and rescue (and W4) per (dataset, s2, convention), each decided
    by its rule in :mod:`hcdiag.claims`, and the methods side by side at that s2: the main grid's runs of the same
    dataset, s2, convention and seed 0 beside the teacher-guided ones."""
    from hcdiag.train import make_config

    by: dict = {}
    for r in recs:
        j = r["job"]
        if j["group"] == "witness":
            by.setdefault((j["dataset"], j["multiple"], j["loss"]), {}).setdefault(j["tag"], []).append(r)
    rows = []
    for ds, m, loss in sorted(by):
        cell = {k: sorted(v, key=lambda r: r["job"]["seed"]) for k, v in by[(ds, m, loss)].items()}
        any_rec = next(iter(cell.values()))[0]
        cfg = make_config(preset, method="teacher", **dict((k, v) for k, v in any_rec["job"]["overrides"]))
        alpha = WITNESS[preset]["alpha"] if preset in WITNESS else cfg.teacher_alpha
        cond = f"{ds}, preset {preset}, s2 = {m:g} lambda_max, loss {loss}, teacher-guided VAE (alpha {alpha:g})"
        at = dict(dataset=ds, multiple=m, loss=loss)
        prevent = cell.get("prevent", [])
        rows.append(claims.witness_prevention(
            [_prevention(r) for r in prevent]).row(cond, runs=[r["run"] for r in prevent], **at))
        collapse = cell.get("collapse", [])
        rows.append(claims.witness_collapse(
            [{"gap": _final_gap(r), **_final(r)} for r in collapse]
        ).row(cond.replace(f"alpha {alpha:g}", "alpha 0"), runs=[r["run"] for r in collapse], **at))
        rescue = cell.get("rescue", [])
        start = {r["job"]["seed"]: _final_gap(r) for r in collapse}
        margin = next((c["values"].get("margin") for r in rescue for c in r["doc"]["checks"] if c["id"] == "W3"
                       and c.get("values")), 0.05)
        every = max(1, cfg.epochs // max(1, cfg.baseline_snapshots))
        res = []
        for r in rescue:
            first = next((x["snapshot"] for x in _w3_rows(r) if x["certified"]), None)
            res.append({"start_gap": start.get(r["job"]["seed"]), "gap": _final_gap(r), **_final(r),
                        "first_epoch": _epoch_of(first, cfg.epochs) if first else None, "every": every})
        rows.append(claims.witness_rescue(res, margin=margin).row(
            cond + ", from the collapse run's final snapshot", runs=[r["run"] for r in rescue], **at))
        # W4 only where the teacher sees a random view: the three phases' identity teacher has no view gap
        viewed = cell.get("view", [])
        if viewed:
            v = dict(viewed[0]["job"]["overrides"]).get("teacher_view")
            rows.append(claims.witness_prevention(
                [_prevention(r) for r in viewed]).row(cond + f", the teacher seeing the view {v}",
                                                                   runs=[r["run"] for r in viewed], **at))
            rows.append(claims.witness_view([check_of(r["doc"], "W4") for r in viewed]).row(
                cond + f", the teacher seeing the view {v}", runs=[r["run"] for r in viewed], **at))
        cells = {}
        for tag in WITNESS_PHASES + ("view",):
            r = next((r for r in cell.get(tag, []) if r["job"]["seed"] == 0), None)
            if r is not None:
                g = _final_gap(r)
                cells[f"teacher-{tag}"] = {"kl": metric(r, "final"), "gap": g, "by": "W3",
                                           "certified": None if g is None else g > margin}
        for r in recs:
            j = r["job"]
            if (j["group"], j["dataset"], j["multiple"], j["loss"], j["seed"]) == ("main", ds, m, loss, 0):
                t4 = next((c for c in r["doc"]["checks"] if c["id"] == "T4"), None)
                ok = None if t4 is None or t4["verdict"] == "inconclusive" else t4["verdict"] == "holds"
                cells[label(j)] = {"kl": metric(r, "final"), "by": "T4", "certified": ok,
                                   "gap": (t4 or {}).get("values", {}).get("gap")}
        rows.append(claims.witness_side_by_side(cells).row(cond.split(", teacher-guided")[0] + ", seed 0", **at))
    return rows


def phase_claim_rows(phase: dict, preset: str) -> list[dict]:
    """P1 (trained linear VAE against the closed form) and P2 (the MLP's phase transition) per dataset."""
    rows = []
    for ds, ph in phase.items():
        rows.append(claims.linear_phase(ph["rows"]).row(f"{ds}, linear VAE, latent {ph['latent_dim']}", dataset=ds))
        rows.append(claims.mlp_phase(ph["rows"]).row(f"{ds}, MLP vanilla, preset {preset}", dataset=ds))
    return rows


def diffusion_claim_rows(diffusion: dict) -> list[dict]:
    """Eq. 13 per dataset (the critical timestep of each schedule)."""
    return [claims.critical_timestep(d["schedules"]).row(f"{ds}, lambda_max = {d['lambda_max']:.4g}, T = 1000",
                                                         dataset=ds, lambda_max=d["lambda_max"])
            for ds, d in diffusion.items()]


def ablation_rows(recs: list[dict], preset: str) -> list[dict]:
    """Figure 4 / section 5.5: one ``reported`` row per ablation setting (final KL) and one claim row per
    ablated setting (:func:`hcdiag.claims.ablation`), from the records of ablation jobs."""
    datasets = sorted({r["job"]["dataset"] for r in recs})
    rows = []
    for ds in datasets:
        for key in ABLATIONS:
            rs = [r for r in recs if r["job"]["dataset"] == ds and r["job"]["tag"].startswith(key)
                  and key in dict(map(tuple, r["job"]["overrides"]))]
            if not rs:
                continue
            pts = []
            for r in rs:
                v = float(dict(map(tuple, r["job"]["overrides"]))[key])
                kl = metric(r, "final")
                pts.append((v, kl))
                rows.append({"id": "ablation.point", "claim": f"{key} = {v:g}", "item": f"{key} = {v:g}",
                             "section": PAPER_ABLATION[key][0], "conditions": f"{ds}, s2 = 2 lambda_max, preset {preset}",
                             "paper": f"see Figure 4 / {PAPER_ABLATION[key][0]}",
                             "ours": f"final KL {kl:.4g}" if kl is not None else "no final KL measured",
                             "verdict": "reported", "runs": [r["run"]],
                             "values": {"dataset": ds, "key": key, "value": v, "kl": kl}})
            res = claims.ablation(key, pts)
            rows.append(res.row(f"{ds}, preset {preset}", item=f"ablation {key}: {PAPER_ABLATION[key][1]}",
                                runs=[r["run"] for r in rs], dataset=ds))
    return rows


def _check_values(doc: dict, cid: str) -> dict | None:
    return next((c for c in doc.get("checks", []) if c["id"] == cid), None)


def diffusion_grid_rows(recs: list[dict], preset: str, *, seed: int = 0) -> list[dict]:
    """Section 7.4 per dataset from the diffusion group's runs (seed ``seed``): D1 over the rescaled consensus
    runs, the rescaling slope (D2), eq. 13 itself, D3 (Algorithm 2 against its controls at ``controls_at``,
    decided here: it compares runs) and D4 beside the logSNR control's."""
    from hcdiag.checks.diffusion import run_diffusion_checks
    from hcdiag.diffusion.runfile import load_diffusion_run

    rows = []
    d = DIFFUSION.get(preset, {})
    dif = [r for r in recs if r["job"]["group"] == "diffusion" and r["job"]["seed"] == seed]
    for ds in sorted({r["job"]["dataset"] for r in dif}):
        mine = [r for r in dif if r["job"]["dataset"] == ds]
        cons = sorted((r for r in mine if r["job"]["method"] == "consensus"), key=lambda r: r["job"]["multiple"])
        cond = f"{ds}, diffusion (Algorithm 2, {d.get('train', {}).get('kind', '?')} family), seed {seed}"
        crit, points = {}, []
        for r in cons:
            d1, d2 = _check_values(r["doc"], "D1"), _check_values(r["doc"], "D2")
            lam = r["job"]["multiple"]
            crit[lam] = (d1["verdict"] if d1 else "inconclusive", (d1 or {}).get("values", {}).get("t_measured"))
            if d2:
                points.append({"lambda_max": lam, **{k: d2["values"].get(k) for k in (
                    "log_snr_measured", "t_measured", "t_snr", "t_eq13", "follows")}})
        runs = [r["run"] for r in cons]
        rows.append(claims.diffusion_critical(crit).row(cond, runs=runs, dataset=ds))
        rows.append(claims.diffusion_rescaling(points).row(cond, runs=runs, dataset=ds))
        rows.append(claims.diffusion_eq13(points).row(cond, runs=runs, dataset=ds))
        at = d.get("controls_at")
        by = {r["job"]["method"]: r for r in mine if r["job"]["multiple"] == at}
        cond_at = f"{ds}, diffusion at lambda_max {at:g}, seed {seed}" if at is not None else cond
        if "consensus" in by:
            run = load_diffusion_run(by["consensus"]["run"])
            ctl = {m: load_diffusion_run(by[m]["run"]) for m in ("single", "logsnr") if m in by}
            d3 = run_diffusion_checks(run, select=["D3"], controls=ctl, seed=seed)[0]
            rows.append(claims.diffusion_barrier(d3.verdict, d3.summary or d3.reason or "", d3.values).row(
                cond_at, runs=[by[m]["run"] for m in by], dataset=ds))
            d4 = _check_values(by["consensus"]["doc"], "D4")
            c4 = _check_values(by["logsnr"]["doc"], "D4") if "logsnr" in by else None
            c4v = (c4 or {}).get("values", {})
            rows.append(claims.diffusion_flexibility(
                d4["verdict"] if d4 else "inconclusive", (d4 or {}).get("summary") or "D4 not run",
                (c4v["measured_verdict"], c4v.get("measured_summary") or "") if "measured_verdict" in c4v else None
            ).row(cond_at, runs=[by["consensus"]["run"]], dataset=ds))
    return rows


def diffusion_series(recs: list[dict], *, seed: int = 0) -> dict:
    """``{dataset: {lambda_max: D1 values}}`` of the consensus runs, for the rescaling figure."""
    out: dict = {}
    for r in recs:
        j = r["job"]
        if j["group"] == "diffusion" and j["method"] == "consensus" and j["seed"] == seed:
            d1 = _check_values(r["doc"], "D1")
            if d1 and "gain" in d1["values"]:
                out.setdefault(j["dataset"], {})[j["multiple"]] = d1["values"]
    return out


def claims_table(recs: list[dict], phase: dict, diffusion: dict, preset: str) -> list[dict]:
    """Every claim of the grid: Table 1, Figure 5 and the barrier checks per condition, the phase transition,
    eq. 13 and the ablations; each decided by its rule in :mod:`hcdiag.claims`."""
    rows = main_claim_rows(recs, preset)
    rows += reading_changes(rows)
    rows += witness_claim_rows(recs, preset)
    rows += phase_claim_rows(phase, preset)
    rows += diffusion_claim_rows(diffusion)
    rows += diffusion_grid_rows(recs, preset)
    abl = [r for r in recs if r["job"]["group"] == "ablation"]
    rows += [a for a in ablation_rows(abl, preset) if a["verdict"] != "reported"]
    if not abl:
        why = ("not run in the smoke preset" if not GRIDS[preset]["ablations"] else "not run (groups without ablation)")
        rows.append({"id": "ablation", "claim": "Ablations: " + "; ".join(c for _, c, _ in PAPER_ABLATION.values()),
                     "item": "ablations", "section": "5.5, Figures 4 and 8",
                     "paper": "see Figures 4 and 8", "ours": why, "verdict": "inconclusive",
                     "conditions": "run with the paper preset", "runs": [], "values": {}})
    return rows


def phase_diagram(datasets: list[str], recs: list[dict], *, latent_dim: int, multiples: list[float], n_samples: dict,
                  data_dir=None, linear_steps: int = 1500) -> dict:
    """Vanilla KL/AU against s2 / lambda_max: closed form, trained linear VAE, trained MLP (phase jobs)."""
    from hcdiag.data import load
    from hcdiag.linear_vae import fit_linear_vae
    from hcdiag.spectrum import spectrum
    from hcdiag.theory import phase_table

    out = {}
    for ds in datasets:
        data = load(ds, n_samples=n_samples.get(ds), data_dir=data_dir)
        sp = spectrum(data.x, top=min(latent_dim, data.d))
        theory = phase_table(sp.eigenvalues, multiples, latent_dim, trace=sp.trace, N=data.d)
        rows = []
        for t in theory:
            fit = fit_linear_vae(data.x, t["s2"], latent_dim, steps=linear_steps, device="cpu")
            mlp = [r for r in recs if r["job"]["group"] == "phase" and r["job"]["dataset"] == ds
                   and math.isclose(r["job"]["multiple"], t["multiple"])]
            rows.append({"multiple": t["multiple"], "s2": t["s2"], "kl_theory": t["kl"], "au_theory": t["au_burda"],
                         "kl_per_dim_theory": list(t["kl_per_dim"]), "kl_linear": fit.kl, "au_linear": fit.au_burda,
                         "kl_per_dim_linear": sorted(map(float, fit.kl_per_dim), reverse=True),
                         "kl_mlp": claims.Stat.of(metric(r, "final") for r in mlp).mean,
                         "kl_mlp_seeds": [metric(r, "final") for r in sorted(mlp, key=lambda r: r["job"]["seed"])],
                         "au_mlp": claims.Stat.of(metric(r, "final", "au") for r in mlp).mean})
        out[ds] = {"lambda_max": sp.lambda_max, "latent_dim": latent_dim, "rows": rows}
    return out


def diffusion_table(datasets: list[str], phase: dict) -> dict:
    from hcdiag.theory import critical_timestep

    return {ds: {"lambda_max": phase[ds]["lambda_max"],
                 "schedules": {s: critical_timestep(phase[ds]["lambda_max"], s).to_dict() for s in ("linear", "cosine")}}
            for ds in datasets}


# ---------------------------------------------------------------------------------------------------------
# figures and the report


def write_report(out_dir: Path, rows: list[dict], phase: dict, diffusion: dict, recs: list[dict], meta: dict) -> list[str]:
    """``report.md``, ``report.html``, ``results.json`` and PNG figures (each written then renamed)."""
    from hcdiag import plots, report
    from hcdiag.formats import to_jsonable
    from hcdiag.runfile import load_run

    figs = []
    for ds, ph in phase.items():
        figs.append((f"Phase diagram on {ds}: KL of vanilla VAEs against s2 / lambda_max, closed form beside the "
                     "trained linear and MLP VAEs (claims.md P1, P2).", f"phase_{ds}.png", plots.phase_diagram(ds, ph)))
    for ds in sorted({r["job"]["dataset"] for r in recs}):
        for m in sorted({r["job"]["multiple"] for r in recs if r["job"]["group"] == "main"}):
            if any(r["id"].startswith("table1.") and r["values"].get("dataset") == ds and r["values"].get("multiple") == m
                   and r["values"].get("kl") is not None for r in rows):
                figs.append((f"KL per method on {ds} at s2 = {m:g} lambda_max, mean and spread over seeds, beside the "
                             "paper's Table 1 and its claimed KL > threshold.", f"table1_{ds}_m{m:g}.png",
                             plots.table1_bars(rows, ds, m)))
        for r in recs:
            j = r["job"]
            if j["group"] == "main" and j["method"] == "hct" and j["dataset"] == ds and j["seed"] == 0:
                run = load_run(r["run"])
                tag = f"{j['tag']}_" if j["tag"] else ""
                what = ", beta warm-up from 0" if j["tag"] == "warmup" else ""
                figs.append((f"Loss of every clustering over training, {ds}, loss {j['loss']}{what}, s2 = "
                             f"{j['multiple']:g} lambda_max (paper Figure 2 left).",
                             f"memory_{ds}_{tag}{j['loss']}_m{j['multiple']:g}.png",
                             plots.clustering_losses_over_training(run)))
    for (ds, m, loss), series in witness_series(recs).items():
        figs.append((f"The companion notes' three phases on {ds} at s2 = {m:g} lambda_max, loss {loss}: the certificate's "
                     "margin G_T of the teacher-guided VAE at every snapshot, trained with alignment, without, and "
                     "rescued from the collapsed run.", f"witness_{ds}_m{m:g}.png",
                     plots.witness_phases(series, margin=0.05, title=f"simplex witness certificate, {ds}, "
                                                                     f"s2 = {m:g} lambda_max")))
    for ds, series in diffusion_series(recs).items():
        figs.append((f"Section 7 on {ds}: the gain of E[x0|xt] along the top covariance direction of Algorithm 2's "
                     "denoiser, the data rescaled to each lambda_max, beside the Gaussian closed form; markers at "
                     "SNR lambda_max = 1.", f"diffusion_{ds}.png", plots.diffusion_rescaling(series, title=ds)))
    images = report.figure_pngs(figs)
    md = ["# hcdiag verify: the paper's claims beside our measurements", "",
          f"Preset `{meta['preset']}`, datasets {', '.join(meta['datasets'])}, {meta['seeds']} seed(s), "
          f"{meta['n_runs']} runs, {meta['seconds']:.0f} s wall time. Verdicts: holds / fails / mixed (differs "
          "across the seeds or schedules pooled in the row) / inconclusive (the evidence is missing: the reason is "
          "given) / reported (a number with no claim to test). Every comparison is like for like: HCT against "
          "baselines of the same dataset, s2, loss convention and seed. HCT's epoch (stage 1, the refinement, "
          f"stage 3) is read as `{meta.get('epoch_unit')}`"
          + (f": {report.EPOCH_READINGS[meta['epoch_unit']]}" if meta.get("epoch_unit") in report.EPOCH_READINGS
             else " (the HCT runs' own config.hct.epoch_unit)")
          + " (each run file records its reading in config.hct.epoch_unit).", "",
          "## Claims", "", "| claim | section | paper | ours | verdict | conditions |", "|---|---|---|---|---|---|"]
    if meta.get("failed"):
        md[3:3] = ["## Failed runs", "", f"{len(meta['failed'])} run(s) did not finish; the claims below use the "
                   "others. Run verify again with the same flags to retry them (finished runs are kept).", ""] + \
                  [f"- `{f['run']}`: {f['error']}" for f in meta["failed"]] + [""]
    for r in rows:
        md.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in ("claim", "section", "paper", "ours", "verdict",
                                                                           "conditions")) + " |")
    md += ["", "A claim checked under several loss conventions has one row per convention; where the verdict differs "
           "between rows the claim holds under those conventions only.", "", "## The paper's internal inconsistencies", ""]
    md += [f"- **{k}**: {v}" for k, v in INCONSISTENCIES]
    md += ["", "## Figures"]
    for cap, name, _f in figs:
        md += ["", f"![{cap}]({name})", "", f"*{cap}*"]
    md += ["", "## Runs", "", "| run | trained in this call | seconds |", "|---|---|---|"]
    md += [f"| `{Path(r['run']).relative_to(out_dir)}` | {_how(r)} | {r['seconds']:.1f} |" for r in recs]
    md_text = "\n".join(md) + "\n"
    files = {**images, "report.md": md_text.encode(), "report.html": report.html(md_text, images).encode(),
             "results.json": json.dumps(to_jsonable({"schema": "hcdiag.verify/1", **meta, "claims": rows,
                                                     "phase": phase, "diffusion": diffusion,
                                                     "inconsistencies": [{"topic": k, "where": v} for k, v in INCONSISTENCIES],
                                                     "runs": [{k: r.get(k) for k in ("job", "run", "checks", "trained",
                                                                                     "shared_from", "measured", "seconds")}
                                                              for r in recs]}), indent=2).encode()}
    return report.write_files(out_dir, files)


def _how(rec: dict) -> str:
    """How a run of the grid came to be, for the report's table of runs."""
    if rec.get("shared_from"):
        return (f"no: relabelled from `{Path(rec['shared_from']).name}`, the same training under the other "
                "convention (hcdiag.train.twin)")
    if rec.get("trained"):
        return "yes"
    return "no (finished before; its checks measured again)" if rec.get("measured") else "no (finished before)"


_OUT = flag("--out", "out_dir")  # verify's output folder


def verify(out_dir, *, preset: str = "smoke", datasets=("synthetic",), seeds: int = 1, executor: str = "local",
           device: str = "auto", workers: int | None = None, data_dir=None, losses=None,
           progress: Callable[[str], None] | None = None, slurm: dict | None = None,
           groups: list[str] | None = None, methods: list[str] | None = None,
           multiples: list[float] | None = None, readings: list[str] | None = None,
           heartbeat: float | None = None) -> dict:
    """Run the grid, the checks, the phase diagram, and write the report; returns the results document.
    ``progress`` gets a line as each run ends; ``heartbeat`` (seconds) makes each running run write a line of
    its own progress to stderr at most that often (:func:`execute`)."""
    t0 = time.perf_counter()
    heartbeat = _heartbeat(heartbeat)
    datasets = list(datasets)
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise InputError(f"{flag('--datasets', 'datasets')}: unknown dataset(s) {', '.join(bad)}; choose among "
                         f"{', '.join(DATASETS)}.")
    jobs = build_grid(preset, datasets, seeds, device=device, data_dir=data_dir, losses=losses, groups=groups,
                      methods=methods, multiples=multiples, readings=readings)
    # fail early, before any training or writing, on a dataset that cannot be loaded
    from hcdiag.data import load

    for ds in datasets:
        load(ds, n_samples=GRIDS.get(preset, {}).get("n_samples", {}).get(ds) or 100, data_dir=data_dir)
    if not str(out_dir).strip():
        raise InputError(f"{_OUT} must name a folder. Got {str(out_dir)!r}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{_OUT} {out} is a file; give a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise InputError(f"{_OUT} {out} cannot be created: part of its path is a file, not a folder; "
                         "choose another folder.") from None
    except OSError as exc:
        raise InputError(f"{_OUT} {out} cannot be created ({exc.strerror or str(exc)}); "
                         "choose a writable folder.") from None
    try:
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "permission denied")
        import tempfile

        with tempfile.TemporaryFile(dir=out):  # root passes os.access; a read-only file system does not pass this
            pass
    except OSError as exc:
        raise InputError(f"{_OUT} {out} is not writable ({(exc.strerror or str(exc)).lower()}); "
                         "choose another folder.") from None
    if progress:
        progress(f"verify: {len(jobs)} runs ({preset} preset) into {out}")
    records = execute(jobs, str(out), executor=executor, workers=workers, progress=progress, slurm=slurm,
                      heartbeat=heartbeat)
    recs = collect(records)
    from hcdiag.train import PRESETS

    g = GRIDS[preset]
    # the closed form and the linear VAE at the latent dimension the phase runs were trained with
    latent = int(g["overrides"].get("latent_dim", PRESETS[preset]["latent_dim"]))
    phase = phase_diagram(datasets, recs, latent_dim=latent, multiples=g["phase_multiples"], n_samples=g["n_samples"],
                          data_dir=data_dir)
    diff = diffusion_table(datasets, phase)
    rows = claims_table(recs, phase, diff, preset)
    meta = {"preset": preset, "datasets": datasets, "seeds": seeds, "n_runs": len(recs), "failed": failures(records),
            "epoch_unit": _readings(recs),
            "groups": list(groups) if groups else [x for x in GROUPS if x != "ablation" or g["ablations"]],
            "seconds": time.perf_counter() - t0, "executor": executor}
    files = write_report(out, rows, phase, diff, recs, meta)
    return {"meta": meta, "claims": rows, "files": files}


def claims_text(rows: list[dict], width: int = 118) -> str:
    """The claims table for a terminal: grouped by conditions, one line per claim (verdict, claim, ours)."""
    import textwrap

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["conditions"], []).append(r)
    out = []
    for cond, rs in groups.items():
        out += ["", f"== {cond}"]
        for r in rs:
            head = f"  {r['verdict'].upper() if r['verdict'] == 'fails' else r['verdict']:<12} {r['claim']}"
            out.append(head)
            out += textwrap.wrap(r["ours"], width, initial_indent=" " * 15 + "ours: ", subsequent_indent=" " * 21)
    return "\n".join(out).lstrip("\n")
