"""Transforms for server tests, loaded by 'module:Class' like any user's plug-in."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from livediff.frames import Image, resize
from livediff.transforms.base import Job, Transform


class FlakyTransform(Transform):
    """Passes frames through but raises on every other call, like a model with a bad input path."""

    name = "flaky"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        self.calls += 1
        if self.calls % 2 == 0:
            raise RuntimeError("flaky model")
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]


class GatedLoadTransform(Transform):
    """Its load() waits until the test opens the gate, so LOADING can be observed."""

    name = "gated"
    gate = threading.Event()

    def load(self) -> None:
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [job.frame.image for job in jobs]
