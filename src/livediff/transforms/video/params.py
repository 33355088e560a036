"""``VideoParams``: the video pipeline's params, in the style of Daydream Scope's (torch-free).

Validated like the diffusion params (a bad value is a 422 naming the field) and applied live:

* ``prompt``: a text, or weighted texts ``[[text, weight], ...]`` whose UMT5 embeddings are
  blended by weight;
* ``denoising_step_list``: the distilled schedule's raw timesteps (1-4, strictly decreasing);
* ``noise_scale``: the video-to-video strength (the level the input chunk is noised to), moved by
  the motion-aware ``noise_controller`` when it is on (down from it, by at most ``max_drop``);
* ``cache_write``: how a chunk enters the KV cache: ``clean`` (an extra pass over the denoised
  chunk at timestep 0, Self-Forcing's) or ``last_step`` (the last denoising step's pass writes,
  one pass fewer, StreamDiffusionV2's);
* ``seed``; ``reset_cache``: a one-shot flag (it is not kept in the session's params, so the
  next update does not repeat it);
* ``chunk_frames`` (latent frames per chunk: 4 video frames each; the first chunk 1 + 4k
  frames, k + 1 latent frames, which stay in the cache as its sink) and ``max_cache_frames``
  (the rolling KV cache's bound, sink chunk included).
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from livediff.transforms.base import TransformParams

#: The model a fresh install serves with ``--pipeline video`` (diffusers' layout on the hub).
DEFAULT_VIDEO_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

PromptText = Annotated[str, Field(max_length=2000)]
CacheWrite = Literal["clean", "last_step"]
WeightedPrompt = tuple[PromptText, Annotated[float, Field(ge=0, le=10)]]


class NoiseController(BaseModel):
    """StreamDiffusionV2's motion-aware noise controller (its ``compute_noise_scale_and_step``):
    the noise level follows the input's frame-to-frame motion, more motion less noise, so fast
    movement keeps its structure. A still input gets ``noise_scale``, full motion (an RMS
    difference of ``motion_scale`` or more) ``noise_scale - max_drop``; each chunk's level is
    ``(1 - smoothing) * target + smoothing * previous``. The defaults are StreamDiffusionV2's."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(False, description="Let the input's motion set the noise scale.")
    max_drop: float = Field(
        0.1, ge=0, lt=1, description="How far full motion lowers the noise below noise_scale."
    )
    motion_scale: float = Field(
        0.2,
        gt=0,
        le=2,
        description="RMS frame-to-frame difference (pixels in [-1, 1]) that counts as full motion.",
    )
    smoothing: float = Field(
        0.1, ge=0, lt=1, description="Weight of the previous chunk's noise scale."
    )


class VideoParams(TransformParams):
    """Params of ``--pipeline video`` (see the module doc)."""

    width: int = Field(512, ge=32, le=1280, multiple_of=16, description="Output width in pixels.")
    height: int = Field(512, ge=32, le=1280, multiple_of=16, description="Output height in pixels.")
    prompt: PromptText | Annotated[list[WeightedPrompt], Field(min_length=1, max_length=8)] = Field(
        "a painting in the style of van gogh", description="Text, or [[text, weight], ...]."
    )
    denoising_step_list: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        default_factory=lambda: [750, 250],
        min_length=1,
        max_length=4,
        description="The distilled schedule's timesteps, strictly decreasing (1-4 steps).",
    )
    noise_scale: float = Field(
        0.7, gt=0, le=1, description="Video-to-video strength: how far each input chunk is noised."
    )
    noise_controller: NoiseController = Field(default_factory=NoiseController)
    cache_write: CacheWrite = Field(
        "clean",
        description="How a chunk enters the KV cache: clean (an extra pass over the denoised"
        " chunk, Self-Forcing's) or last_step (the last step's pass writes: one pass fewer).",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Noise seed.")
    reset_cache: bool = Field(
        False,
        exclude=True,
        description="One-shot: clear the session's KV and VAE caches (not kept in its params).",
    )
    model: str = Field(
        DEFAULT_VIDEO_MODEL, description="Wan 2.1 model: diffusers folder or hub id."
    )
    chunk_frames: int = Field(
        1, ge=1, le=3, description="Latent frames per chunk (4 video frames each)."
    )
    max_cache_frames: int = Field(
        21, ge=2, le=64, description="Latent frames the rolling KV cache keeps (sink included)."
    )

    @field_validator("denoising_step_list")
    @classmethod
    def _decreasing(cls, steps: list[int]) -> list[int]:
        if any(a <= b for a, b in itertools.pairwise(steps)):
            raise ValueError("denoising_step_list must be strictly decreasing")
        return steps

    @field_validator("noise_controller")
    @classmethod
    def _drop_within_noise(cls, value: NoiseController, info: ValidationInfo) -> NoiseController:
        if value.enabled and value.max_drop >= info.data.get("noise_scale", 1.0):
            raise ValueError("noise_controller.max_drop must stay below noise_scale")
        return value

    @field_validator("prompt")
    @classmethod
    def _some_weight(cls, prompt: str | list[tuple[str, float]]) -> str | list[tuple[str, float]]:
        if isinstance(prompt, list) and sum(weight for _, weight in prompt) <= 0:
            raise ValueError("prompt weights must not all be 0")
        return prompt

    @field_validator("max_cache_frames")
    @classmethod
    def _holds_two_chunks(cls, value: int, info: ValidationInfo) -> int:
        if value < 2 * info.data.get("chunk_frames", 1) + 1:
            raise ValueError("max_cache_frames must hold the sink chunk and one more chunk")
        return value

    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        """The prompt as (text, weight) pairs, weights summing to 1 (the cache key of the text)."""
        pairs = [(self.prompt, 1.0)] if isinstance(self.prompt, str) else list(self.prompt)
        total = sum(weight for _, weight in pairs)
        return tuple((text, weight / total) for text, weight in pairs if weight > 0)
