"""Transforms for server tests, loaded by 'module:Class' like any user's plug-in."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pydantic_core import ValidationError

from livediff.frames import Image
from livediff.pixels import resize
from livediff.transforms.base import Job, Transform, TransformParams


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


class ModelParams(TransformParams):
    model: str = "a"


class ModelSwitchTransform(Transform):
    """Holds one 'model' for every session, like the diffusion transform; 'missing' cannot load."""

    name = "model-switch"
    params_model = ModelParams

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.loaded = "a"
        self.reloads = 0

    def loaded_params(self) -> dict[str, object]:
        return {"model": self.loaded}

    def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        wanted = getattr(new, "model", self.loaded)
        return bool(wanted != getattr(old, "model", None) and wanted != self.loaded)

    def reload(self, params: TransformParams) -> None:
        wanted = getattr(params, "model", self.loaded)
        if wanted == "missing":
            raise ValidationError.from_exception_data(
                "ModelParams",
                [
                    {
                        "type": "value_error",
                        "loc": ("model",),
                        "input": wanted,
                        "ctx": {"error": "no such model"},
                    }
                ],
            )
        self.loaded, self.reloads = wanted, self.reloads + 1

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [job.frame.image for job in jobs]
