"""The system under test: Historical Consensus Training and its baselines, writing run files.

One trainer core and the methods as plug-ins (the layout follows scikit-learn's ``mixture/_base.py``, a base
with the loop, one module per model, and pythae's split of model, config and trainer):

* :mod:`~hcdiag.train.config`: :class:`TrainConfig`, its validation, the presets (``smoke``, ``paper``);
* :mod:`~hcdiag.train.objectives`: the objectives as pure functions (the VAE terms of eq. 7, the clustering
  term of eq. 8 with its closed-form gradient);
* :mod:`~hcdiag.train.loop`: the data stream, one step, a cycle over clusterings, the deterministic evaluation;
* :mod:`~hcdiag.train.writer`: snapshots, history rows, saves that ``--resume`` continues bitwise;
* :mod:`~hcdiag.train.guard`: ``--out`` never the data, never replaced unless asked, locked; ``--resume``
  only on the same data and settings;
* :mod:`~hcdiag.train.methods`: the registry ``METHODS`` (``hct``: stages 1-3 in
  :mod:`~hcdiag.train.methods.hct`; the baselines ``vanilla``, ``beta``, ``anneal``, ``freebits`` in
  :mod:`~hcdiag.train.methods.vae`, ``aggressive`` (He et al. 2019) in :mod:`~hcdiag.train.methods.aggressive`);
* :mod:`~hcdiag.train.references`: the collapsed model, the vanilla reference and the no-history control;
* :mod:`~hcdiag.train.trainer`: :class:`Trainer`, which ties them together, and :func:`train`.

A *cycle* is HCT's "epoch", by ``epoch_unit`` (:data:`~hcdiag.train.config.EPOCH_UNITS`, with the argument):
``steps`` gives every active clustering ``steps_per_clustering`` steps, interleaved (Algorithm 1's "epoch" is
one step per clustering); ``epochs`` gives each one full pass over the data; ``data_pass`` (the paper
preset's) is one pass over the data whose steps cycle through the active clusterings. ``mode='cycle'``
uses one clustering's term per step (Algorithm 1);
``mode='simultaneous'`` puts every active clustering's term in every step (section 4.1).

The run file is written atomically at the end of every round and stage; ``resume=True`` continues a partial
run and gives the same final run as an uninterrupted one (bitwise on CPU, deterministic mode).
"""

from hcdiag.train.config import PRESETS, TrainConfig, make_config
from hcdiag.train.methods import METHODS, Method, get_method
from hcdiag.train.progress import Progress
from hcdiag.train.trainer import Trainer, train
from hcdiag.train.writer import STAGE_CODES

__all__ = ["METHODS", "PRESETS", "STAGE_CODES", "Method", "Progress", "TrainConfig", "Trainer", "get_method",
           "make_config", "train"]
