"""Where a batch's time goes: marks between the stages of :class:`UNetBatch.process`.

Off unless a benchmark turns it on (``UNetBatch.clock = StageClock(device)``). On a GPU each
mark is a CUDA event recorded on the worker's CUDA stream (nothing waits for it); the durations are
read once the batch's one sync has passed. On the CPU the marks are the clock itself.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import torch


class StageClock:
    """Marks (stage name, when) per batch; :meth:`durations` gives milliseconds per stage."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._batches: list[list[tuple[str, Any]]] = []

    def begin(self) -> None:
        with self._lock:
            self._batches.append([("start", self._now())])

    def mark(self, stage: str) -> None:
        """The stage that just ended (since the previous mark)."""
        with self._lock:
            if self._batches:
                self._batches[-1].append((stage, self._now()))

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    def durations(self) -> dict[str, list[float]]:
        """Milliseconds of each stage in every finished batch (then forgets them)."""
        with self._lock:
            batches, self._batches = self._batches[:-1], self._batches[-1:]
        found: dict[str, list[float]] = defaultdict(list)
        for marks in batches:
            for (_, before), (stage, after) in pairwise(marks):
                found[stage].append(self._between(before, after))
        return dict(found)

    def _between(self, before: Any, after: Any) -> float:
        if not self.cuda:
            return float(after - before) * 1000
        after.synchronize()
        return float(before.elapsed_time(after))
