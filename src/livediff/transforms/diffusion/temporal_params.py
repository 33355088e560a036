"""Temporal-coherence params of the diffusion transform, in Livepeer's StreamDiffusion shape.

Torch-free (the ai-runner loader imports the params under a guard). Four processing blocks,
each ``{"enabled": true, "processors": [{"type": ..., "enabled": true, "params": {...}}]}``
(ai-runner's ``ProcessingConfig`` / ``SingleProcessorConfig``):

- ``image_preprocessing`` / ``image_postprocessing``: type ``feedback``,
  ``(1 - s) * image + s * previous_output`` on the input frame before it is encoded (pre) or
  on the decoded output (post);
- ``latent_preprocessing`` / ``latent_postprocessing``: type ``latent_feedback``,
  ``(1 - s) * latent + s * previous_latent`` on the input's latent before it is noised (pre)
  or on the denoised latent before it is decoded (post); the previous latent is the one the
  session's previous output was decoded from.

``s`` is ``params.feedback_strength`` in [0, 1] (0.5 by default). A processor's ``params`` are
checked against its type: a wrong key or value is a 422 naming
``<block>.processors.N.params.KEY``; an unknown ``type`` is a 422 on ``...processors.N.type``.

``cached_attention`` (ai-runner's ``CachedAttentionConfig``): StreamV2V's feature bank, see
``feature_bank.py``. ``motion_noise``: the motion-aware noise controller (livediff's own block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

#: Most processors one block may chain.
MAX_PROCESSORS = 8

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FeedbackParams(BaseModel):
    """``feedback`` and ``latent_feedback``: how much of the previous frame to blend in."""

    model_config = _STRICT

    feedback_strength: float = Field(
        0.5, ge=0, le=1, description="Share of the previous frame: (1 - s) now + s previous."
    )


class _Processor(BaseModel):
    """One processor of a block (ai-runner's ``SingleProcessorConfig``)."""

    model_config = _STRICT

    enabled: bool = Field(True, description="Off keeps it in the list, unused.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="The processor's own params (feedback_strength)."
    )

    @model_validator(mode="after")
    def _check_params(self) -> _Processor:
        try:
            checked = FeedbackParams.model_validate(self.params).model_dump()
        except ValidationError as exc:
            raise _nested(exc, "params") from exc
        object.__setattr__(self, "params", checked)
        return self

    @property
    def strength(self) -> float:
        """``params.feedback_strength``."""
        return float(self.params["feedback_strength"])


class ImageProcessor(_Processor):
    """An image processor: ``feedback`` blends the session's previous output image in."""

    type: Literal["feedback"] = Field(description="Processor: feedback.")


class LatentProcessor(_Processor):
    """A latent processor: ``latent_feedback`` blends the previous output latent in."""

    type: Literal["latent_feedback"] = Field(description="Processor: latent_feedback.")


class _Processing(BaseModel):
    """A processing block (ai-runner's ``ProcessingConfig``)."""

    model_config = _STRICT

    enabled: bool = Field(True, description="Off skips every processor of the block.")

    def _strengths(self, processors: Sequence[_Processor]) -> tuple[float, ...]:
        if not self.enabled:
            return ()
        return tuple(p.strength for p in processors if p.enabled and p.strength > 0)


class ImageProcessing(_Processing):
    """``image_preprocessing`` / ``image_postprocessing``."""

    processors: list[ImageProcessor] = Field(
        default_factory=list, max_length=MAX_PROCESSORS, description="Applied in order."
    )

    def strengths(self) -> tuple[float, ...]:
        """The feedback strengths of the active processors, in order (empty: nothing to do)."""
        return self._strengths(self.processors)


class LatentProcessing(_Processing):
    """``latent_preprocessing`` / ``latent_postprocessing``."""

    processors: list[LatentProcessor] = Field(
        default_factory=list, max_length=MAX_PROCESSORS, description="Applied in order."
    )

    def strengths(self) -> tuple[float, ...]:
        """The feedback strengths of the active processors, in order (empty: nothing to do)."""
        return self._strengths(self.processors)


#: The most earlier frames one self-attention layer may attend to (Livepeer's bound).
MAX_BANK_FRAMES = 4
#: The longest refresh interval, in frames (Livepeer's: a minute at 24 fps).
MAX_BANK_INTERVAL = 1440


class CachedAttention(BaseModel):
    """StreamV2V's feature bank (``cached_attention``): every self-attention layer of the UNet
    also attends to the keys and values it computed for up to ``max_frames`` earlier frames of
    the same session at the same denoising step; the bank takes the newest frame's every
    ``interval`` frames (the oldest leaves). Live: no reload, no recompile."""

    model_config = _STRICT

    enabled: bool = Field(True, description="On when the block is sent (Livepeer's default).")
    max_frames: int = Field(
        1, ge=1, le=MAX_BANK_FRAMES, description="Earlier frames each self-attention sees."
    )
    interval: int = Field(
        1, ge=1, le=MAX_BANK_INTERVAL, description="Frames between two refreshes of the bank."
    )


class MotionNoise(BaseModel):
    """The motion-aware noise controller (StreamDiffusionV2-style): the newest frame's
    denoising strength follows how much the input moved.

    Per session, on the device: ``motion`` is the mean absolute difference between the input
    frame and the one before (RGB in [0, 1], both 8x average-pooled); ``target = min_strength +
    (max_strength - min_strength) * min(1, sensitivity * motion)``; the strength used is
    smoothed over frames, ``s = smoothing * s_previous + (1 - smoothing) * target`` (the first
    frame starts at ``min_strength``); its timestep is ``round(1000 s) - 1`` (``strength``'s
    rule), for the first denoising step only (a later step of ``t_index_list`` keeps its own,
    and the first stays above the second)."""

    model_config = _STRICT

    enabled: bool = Field(False, description="Off: the steps of strength / t_index_list.")
    min_strength: float = Field(
        0.3, gt=0, le=1, description="Strength of a still scene (least re-noising)."
    )
    max_strength: float = Field(
        0.7, gt=0, le=1, description="Strength of a scene moving by 1 / sensitivity or more."
    )
    sensitivity: float = Field(
        10.0, gt=0, le=1000, description="Motion (mean |difference|, 0-1) x this = 1 is full."
    )
    smoothing: float = Field(
        0.7, ge=0, lt=1, description="Share of the previous strength kept each frame."
    )

    @model_validator(mode="after")
    def _ordered(self) -> MotionNoise:
        if self.min_strength > self.max_strength:
            raise ValueError("min_strength must not be above max_strength")
        return self


def _nested(exc: ValidationError, field: str) -> ValidationError:
    """``exc``'s errors, located under ``field`` (so the 422 names the nested key)."""
    errors: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError("value_error", str(error["msg"])),
            "loc": (field, *error["loc"]),
            "input": error.get("input"),
        }
        for error in exc.errors(include_url=False)
    ]
    return ValidationError.from_exception_data("Processor", errors)
