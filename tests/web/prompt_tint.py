"""A small real transform for the page's tests: it tints every frame by a hash of the prompt.

It takes a ``prompt`` like the diffusion pipeline does, so a prompt typed in the page can be seen
arriving twice: in the session's params on the server, and in the colour of the video that comes
back to the browser.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from livediff.config import Settings
from livediff.frames import Image, RgbArray
from livediff.pixels import resize, to_rgb_array
from livediff.transforms.base import Job, Transform, TransformParams
from livediff.transforms.diffusion.params import DiffusionParams

PROMPT_MAX_LENGTH = 120


def tint_colour(prompt: str) -> tuple[int, int, int]:
    """The RGB colour a prompt tints frames with (the first bytes of its SHA-256)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return digest[0], digest[1], digest[2]


def tint(image: Image, width: int, height: int, prompt: str, strength: float) -> RgbArray:
    """The image at width x height, blended with the prompt's colour by ``strength``."""
    pixels = to_rgb_array(resize(image, width, height))
    colour = np.asarray(tint_colour(prompt), dtype=np.float32)
    mixed = pixels.astype(np.float32) * (1.0 - strength) + colour * strength
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


class PromptTintParams(TransformParams):
    prompt: str = Field(
        "", max_length=PROMPT_MAX_LENGTH, description="Text whose hash picks the tint colour."
    )
    strength: float = Field(0.6, ge=0, le=1, description="How much the tint covers the frame.")


class PromptTint(Transform):
    """Output = input x (1 - strength) + colour(prompt) x strength, at the session's size."""

    name = "prompt-tint"
    params_model = PromptTintParams

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [self._tint(job) for job in jobs]

    def _tint(self, job: Job) -> Image:
        params = job.params
        assert isinstance(params, PromptTintParams)
        return tint(job.frame.image, params.width, params.height, params.prompt, params.strength)


class DiffusionParamsTint(PromptTint):
    """PromptTint taking the diffusion pipeline's own params (DiffusionParams, torch-free), so
    the page shows and sends exactly the controls of ``--pipeline diffusion``."""

    name = "diffusion-params-tint"
    params_model = DiffusionParams

    def _tint(self, job: Job) -> Image:
        params = job.params
        assert isinstance(params, DiffusionParams)
        prompt = params.prompt if isinstance(params.prompt, str) else params.prompt[0][0]
        return tint(job.frame.image, params.width, params.height, prompt, params.strength)


class GatedTint(PromptTint):
    """PromptTint whose load() waits until the test opens its gate, so LOADING can be seen."""

    name = "gated-tint"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gate = threading.Event()

    def load(self) -> None:
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
