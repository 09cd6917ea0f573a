"""What a method of the system under test is: a name and a ``train`` that trains the run's main model.

A method trains through the trainer's services (``t.loop``: batches, steps, cycles, evaluation;
``t.writer``: snapshots, history rows, saves that ``--resume`` continues; ``t.cfg``, ``t.progress``,
``t.new_model``) and adds its own records to ``t.writer.run``. A new method is one module and one entry
in :data:`hcdiag.train.methods.METHODS`.
"""

from __future__ import annotations


class Method:
    """Base of the methods. ``pipeline`` marks Historical Consensus's staged pipeline (stage-0 clusterings
    used in training, rounds, refinement, stage 3): the trainer records ``config.hct`` and trains the
    no-history control and the vanilla reference only for it."""

    name: str = ""
    pipeline: bool = False

    def train(self, t, run: dict) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError
