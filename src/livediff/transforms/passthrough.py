"""The passthrough transform: input pixels, resized to the session's size when they differ.

It exists to measure transport latency without a model. ``delay_ms`` makes it behave like a
slow model (it sleeps on the worker thread), to show how the engine sheds load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import Field

from livediff.frames import Image
from livediff.pixels import resize
from livediff.transforms.base import Job, Transform, TransformParams


class PassthroughParams(TransformParams):
    delay_ms: float = Field(
        0.0, ge=0, le=2000, description="Extra time per batch, to imitate a slow model."
    )


class PassthroughTransform(Transform[PassthroughParams, None, None]):
    """No model, no session state, nothing staged: the input at the session's size."""

    name = "passthrough"
    params_model = PassthroughParams

    def process(self, jobs: Sequence[Job[PassthroughParams, None, None]]) -> list[Image | None]:
        delay_ms = max(job.params.delay_ms for job in jobs)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]
