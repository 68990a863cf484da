"""Say when a training step stalls: a frozen or dead peer rank leaves the others waiting in a collective (all-reduce)
until training.timeout_minutes ends the run, and without a word the run looks merely slow."""
from __future__ import annotations

import statistics
import sys
import threading
import time
from collections import deque


class StallWatch:
    """Call `beat(step)` after every optimizer step; a background thread prints one line when the next step has
    run `factor` times longer than the recent median step (and at least `min_seconds`)."""

    def __init__(self, rank: int, timeout_minutes: float, factor: float = 10.0, min_seconds: float = 60.0,
                 poll_seconds: float = 5.0, out=None):
        self.rank, self.timeout_minutes = rank, timeout_minutes
        self.factor, self.min_seconds, self.poll_seconds = factor, min_seconds, poll_seconds
        self.out = out or sys.stderr
        self.durations: deque[float] = deque(maxlen=20)
        self.step, self.last = 0, None  # the last finished step and when it finished
        self.reported = -1  # the last step reported as stalled
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="stall-watch", daemon=True)
        self.thread.start()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        with self.lock:
            if self.last is not None:
                self.durations.append(now - self.last)
            self.step, self.last = step, now

    def check(self) -> None:
        with self.lock:
            if self.last is None or not self.durations or self.reported == self.step:
                return
            waited, usual = time.monotonic() - self.last, statistics.median(self.durations)
            if waited < max(self.min_seconds, self.factor * usual):
                return
            self.reported = self.step
        print(f"rank {self.rank}: step {self.step + 1} has run for {waited:.0f} s (steps took {usual:.1f} s): a peer "
              f"rank may be stalled; the run stops when a collective has waited training.timeout_minutes="
              f"{self.timeout_minutes:g}", file=self.out, flush=True)

    def _loop(self) -> None:
        while not self.stopped.wait(self.poll_seconds):
            self.check()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
