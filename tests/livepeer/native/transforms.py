"""A small transform for the native runner's tests (``tests.livepeer.native.transforms:Class``):
``FailingTransform`` is passthrough until a stream sets ``fail``, then raises on every frame.
(The gated and broken loads are the server's and the ai-runner face's test transforms.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from livediff.frames import Image
from livediff.pixels import resize
from livediff.transforms.base import Job, Transform, TransformParams


class FailingParams(TransformParams):
    fail: bool = Field(False, description="Raise on every frame (a broken model).")


class FailingTransform(Transform):
    name = "failing"
    params_model = FailingParams

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        if any(getattr(job.params, "fail", False) for job in jobs):
            raise RuntimeError("the model broke")
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]
