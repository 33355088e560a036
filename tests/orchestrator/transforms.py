"""Small transforms for the native runner's tests (``tests.orchestrator.transforms:Class``).

``GatedLoadTransform`` loads only when its class gate opens (health is LOADING until then);
``BrokenLoadTransform`` cannot load (health ERROR); ``FailingTransform`` is passthrough until a
stream sets ``fail``, then raises on every frame.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pydantic import Field

from livediff.frames import Image
from livediff.pixels import resize
from livediff.transforms.base import Job, Transform, TransformParams


class GatedLoadTransform(Transform):
    name = "gated-load"
    gate = threading.Event()

    def load(self) -> None:
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the load gate")

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]


class BrokenLoadTransform(Transform):
    name = "broken-load"

    def load(self) -> None:
        raise RuntimeError("weights not found: /models/nothing")

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        raise AssertionError("never loaded, never called")


class FailingParams(TransformParams):
    fail: bool = Field(False, description="Raise on every frame (a broken model).")


class FailingTransform(Transform):
    name = "failing"
    params_model = FailingParams

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        if any(getattr(job.params, "fail", False) for job in jobs):
            raise RuntimeError("the model broke")
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]
