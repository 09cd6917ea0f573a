"""Progress of a long training on a terminal: a live line (stage, round, epoch, loss, KL) and one summary
line per round and stage."""

from __future__ import annotations

import sys
import time


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
