"""ControlNet entries of the diffusion params, in Livepeer's StreamDiffusion shape. Torch-free.

Each entry names a ControlNet (hub id or diffusers folder), how strongly it steers
(``conditioning_scale``), which part of the denoising it acts on (``control_guidance_start`` /
``control_guidance_end``, shares of the steps), and the preprocessor that turns each input frame
into its control image, with that preprocessor's own params (checked against it: a wrong key or
value is a 422 naming ``controlnets.N.preprocessor_params.KEY``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

#: Most ControlNets one session may combine (each costs about half a UNet pass per row).
MAX_CONTROLNETS = 4

Preprocessor = Literal["canny", "depth", "passthrough", "temporal_net", "temporal_net_tensorrt"]
#: TemporalNet's preprocessors: the session's previous output is the control image
#: (``temporal_net``: 3 channels, TemporalNet; ``temporal_net_tensorrt``: 6 channels,
#: TemporalNet2: the previous output and the input's optical flow as colours, Livepeer's name).
TEMPORAL_NET = frozenset({"temporal_net", "temporal_net_tensorrt"})


class CannyParams(BaseModel):
    """Canny edges; thresholds on the 0-255 scale OpenCV and Livepeer's pipeline use."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    low_threshold: float = Field(100.0, ge=0, le=255, description="Weaker edges below this go.")
    high_threshold: float = Field(200.0, ge=0, le=255, description="Edges above this are kept.")

    @model_validator(mode="after")
    def _ordered(self) -> CannyParams:
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must not be above high_threshold")
        return self


class DepthParams(BaseModel):
    """Depth Anything V2 (Small) depth maps, near = bright."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    detect_resolution: int = Field(
        518, ge=140, le=1036, multiple_of=14, description="Side the depth model runs at."
    )


class PassthroughParams(BaseModel):
    """The frame itself is the control image (for clients that send their own maps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TemporalNetParams(BaseModel):
    """TemporalNet2's optical flow (``temporal_net_tensorrt``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    flow_strength: float = Field(
        1.0, ge=0, le=2, description="Flow scaled before it is coloured (higher: stronger)."
    )


PREPROCESSOR_PARAMS: dict[str, type[BaseModel]] = {
    "canny": CannyParams,
    "depth": DepthParams,
    "passthrough": PassthroughParams,
    "temporal_net": PassthroughParams,
    "temporal_net_tensorrt": TemporalNetParams,
}


class ControlNetSpec(BaseModel):
    """One ControlNet of a session."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model_id: str = Field(
        min_length=1,
        max_length=500,
        description="ControlNet: hub id or diffusers folder, of the base model's family.",
    )
    conditioning_scale: float = Field(1.0, ge=0, le=5, description="How strongly it steers.")
    preprocessor: Preprocessor = Field("canny", description="Frame -> control image.")
    preprocessor_params: dict[str, Any] = Field(
        default_factory=dict, description="The preprocessor's own params (see its defaults)."
    )
    enabled: bool = Field(True, description="Off keeps it loaded but unused.")
    control_guidance_start: float = Field(
        0.0, ge=0, le=1, description="Share of the denoising steps before it starts acting."
    )
    control_guidance_end: float = Field(
        1.0, ge=0, le=1, description="Share of the denoising steps after which it stops."
    )

    @model_validator(mode="after")
    def _check(self) -> ControlNetSpec:
        if self.control_guidance_start > self.control_guidance_end:
            raise ValueError("control_guidance_start must not be after control_guidance_end")
        object.__setattr__(self, "preprocessor_params", self.checked_preprocessor_params())
        return self

    def checked_preprocessor_params(self) -> dict[str, Any]:
        """``preprocessor_params`` validated by the preprocessor's own model, with defaults."""
        model = PREPROCESSOR_PARAMS[self.preprocessor]
        try:
            return model.model_validate(self.preprocessor_params).model_dump()
        except ValidationError as exc:
            raise _nested(exc, "preprocessor_params") from exc

    def active(self, step: int, steps: int) -> bool:
        """Whether it acts on denoising step ``step`` of ``steps`` (diffusers' rule: the
        step's share of the schedule lies inside [start, end])."""
        if not self.enabled or self.conditioning_scale == 0:
            return False
        return not (
            step / steps < self.control_guidance_start
            or (step + 1) / steps > self.control_guidance_end
        )


def _nested(exc: ValidationError, field: str) -> ValidationError:
    """``exc``'s errors, located under ``field`` (so the 422 names the nested key)."""
    errors: list[InitErrorDetails] = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"])
        errors.append(
            {
                "type": PydanticCustomError("value_error", message),
                "loc": (field, *error["loc"]),
                "input": error.get("input"),
            }
        )
    return ValidationError.from_exception_data("ControlNetSpec", errors)
