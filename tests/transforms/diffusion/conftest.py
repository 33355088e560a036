"""Fixtures: a tiny random-weight SD model saved in diffusers layout, and transforms loading it.

The model is written once per test run (a few hundred thousand parameters, about 1.5 MB) and
loaded through the same path a user's ``--model`` folder takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from livediff.config import Settings
from livediff.frames import Frame
from livediff.testing.models import ModelFolders, tiny_options, write_model_folder
from livediff.transforms.base import Job
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform

SIZE = 64


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


def tiny_settings(folders: ModelFolders, **overrides: Any) -> Settings:
    return Settings(**{**tiny_options(folders, SIZE), **overrides})


@pytest.fixture
def make_transform(tiny_model: ModelFolders) -> Iterator[Callable[..., DiffusionTransform]]:
    """Factory: a loaded DiffusionTransform on the tiny model (settings overridable)."""
    made: list[DiffusionTransform] = []

    def _make(**overrides: Any) -> DiffusionTransform:
        transform = DiffusionTransform(tiny_settings(tiny_model, **overrides))
        transform.load()
        made.append(transform)
        return transform

    yield _make
    for transform in made:
        transform.close()


def camera_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct RGB frames (smooth gradients plus noise), SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    frames = []
    for _ in range(count):
        base = ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + rng.uniform(-40, 40, 3)
        noisy = base + rng.normal(0, 25, (SIZE, SIZE, 3))
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return frames


class Stream:
    """One session of a transform: open it, feed frames, read outputs."""

    def __init__(self, transform: DiffusionTransform, **params: Any) -> None:
        self.transform = transform
        self.params = params_for(transform, **params)
        self.state = transform.open_session(self.params)
        self.count = 0
        self.skips = 0  # frames the transform marked as skipped (repeated an output)

    def job(self, image: Any) -> Job:
        job = Job("s", Frame(image, pts=self.count), self.params, self.state)
        self.count += 1
        return job

    def feed(self, image: Any) -> Any:
        job = self.job(image)
        output = self.transform.process([job])[0]
        self.skips += job.skipped
        return output

    def update(self, **patch: Any) -> None:
        self.params = DiffusionParams.model_validate({**self.params.model_dump(), **patch})


def params_for(transform: DiffusionTransform, **values: Any) -> DiffusionParams:
    defaults = {**transform.default_params(transform.settings), **transform.loaded_params()}
    return DiffusionParams.model_validate({**defaults, **values})
