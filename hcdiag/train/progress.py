"""Progress of a long training on a terminal: a live line (stage, round, epoch, loss, KL) and one summary
line per round and stage."""

from __future__ import annotations

import sys
import time

from hcdiag.formats import duration


class Progress:
    """A one-line progress display on a terminal (stage, round, epoch, loss, KL); silent otherwise."""

    def __init__(self, stream=None, enabled: bool | None = None, summaries: bool = True):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if enabled is None else enabled
        self.summaries = summaries
        self._last = 0.0

    def update(self, text: str) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r\033[K" + text[:150])
        self.stream.flush()

    def summary(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        if self.summaries:
            self.stream.write(text + "\n")
            self.stream.flush()


class Heartbeat(Progress):
    """Progress of a run trained out of sight (``hcdiag verify``'s workers, a log file): the latest live line,
    written as a whole line after the run's name at most once every ``every`` seconds, with the time so far
    (``  main/synthetic/hct_m2_scaled_s0.pt: refine epoch 12 loss ... (14 min so far)``); the summaries only
    with ``summaries=True`` (``hcdiag train`` into a log file).
    Called with one text it is also the ``progress`` callable of the diffusion trainer."""

    def __init__(self, name: str, every: float, stream=None, clock=time.monotonic, summaries: bool = False):
        if not every > 0:
            raise ValueError(f"every must be > 0 seconds. Got {every!r}.")
        super().__init__(stream=stream, enabled=False, summaries=summaries)
        self.name, self.every, self.clock = name, float(every), clock
        self._t0 = clock()
        self._next = self._t0 + self.every

    def update(self, text: str) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        self.stream.write(f"  {self.name}: {text[:150]} ({duration(now - self._t0)} so far)\n")
        self.stream.flush()

    __call__ = update
