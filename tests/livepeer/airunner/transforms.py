"""Small real transforms for the adapter's tests (``tests.livepeer.airunner.transforms:Class``).

``GainTransform`` scales pixels by ``gain`` (values past 1 show the adapter's clamp) and adds an
offset that depends on the loaded ``model``; changing ``model`` is a reload, which waits for
``reload_gate`` so that a test can look at the runtime while it is reloading; ``fail`` makes it
raise on every frame.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from livediff.config import Settings
from livediff.frames import Image
from livediff.transforms.base import Job, Transform, TransformParams

MODEL_OFFSETS = {"dim": 0.0, "bright": 0.25}


class GainParams(TransformParams):
    gain: float = Field(1.0, ge=0, le=4)
    model: str = Field("dim", pattern="^(dim|bright)$")
    fail: bool = Field(False, description="Raise on every frame (a broken model).")


class GainTransform(Transform):
    name = "gain"
    params_model = GainParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loaded_model = ""
        self.reloads: list[str] = []
        self.reload_gate = threading.Event()
        self.reload_gate.set()
        self.closed = False

    def load(self) -> None:
        self.loaded_model = "dim"

    def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        return getattr(old, "model", None) != getattr(new, "model", None)

    def reload(self, params: TransformParams) -> None:
        if not self.reload_gate.wait(30):
            raise TimeoutError("the test never opened the reload gate")
        self.loaded_model = str(getattr(params, "model", "dim"))
        self.reloads.append(self.loaded_model)

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        offset = MODEL_OFFSETS[self.loaded_model]
        outputs: list[Image | None] = []
        for job in jobs:
            assert isinstance(job.frame.image, torch.Tensor)
            if getattr(job.params, "fail", False):
                raise RuntimeError("the model broke")
            gain = float(getattr(job.params, "gain", 1.0))
            outputs.append(job.frame.image * gain + offset)
        return outputs

    def close(self) -> None:
        self.closed = True


class BrokenLoadTransform(Transform):
    """A transform whose model cannot be loaded."""

    name = "broken-load"

    def load(self) -> None:
        raise RuntimeError("weights not found: /models/nothing")

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        raise AssertionError("never loaded, never called")


class PreparedTransform(Transform):
    """Passes frames through. ``prepare_models`` and ``load`` record, in ``MODEL_DIR``, that they
    ran and whether the hub was reachable for them."""

    name = "prepared"

    @classmethod
    def prepare_models(cls, settings: Settings) -> None:
        cls._record(settings, "prepared")

    def load(self) -> None:
        self._record(self.settings, "loaded")

    @staticmethod
    def _record(settings: Settings, step: str) -> None:
        if settings.model_dir is None:
            raise ValueError("MODEL_DIR is not set")
        marker = Path(settings.model_dir) / f"{step}.json"
        offline = os.environ.get("HF_HUB_OFFLINE")
        marker.write_text(json.dumps({"model": settings.model, "hf_hub_offline": offline}))

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [job.frame.image for job in jobs]
