"""A small real transform for the ControlNet panel's tests: it takes the diffusion pipeline's
``controlnets`` list and passes frames through (resized to the session's size).

Like the diffusion pipeline, it refuses a ControlNet it cannot load with a 422 on that entry's
``model_id`` (``controlnets.N.model_id``): here, any model id under ``missing/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, ValidationError

from livediff.frames import Image
from livediff.pixels import resize, to_rgb_array
from livediff.transforms.base import Job, Transform, TransformParams
from livediff.transforms.diffusion.control_params import MAX_CONTROLNETS, ControlNetSpec
from livediff.transforms.diffusion.params import DiffusionParams

#: Model ids under this prefix are refused as if they could not be loaded.
UNLOADABLE = "missing/"


class ControlNetEchoParams(TransformParams):
    """The output size and DiffusionParams' own ``controlnets`` field."""

    controlnets: list[ControlNetSpec] = Field(
        default_factory=list,
        max_length=MAX_CONTROLNETS,
        description=DiffusionParams.model_fields["controlnets"].description,
    )


def refusal(index: int, model_id: str) -> ValidationError:
    """The 422 a pipeline answers for a ControlNet it cannot load (as the diffusion pool does)."""
    reason = f"no ControlNet can be loaded from {model_id!r} (a test transform refuses it)"
    return ValidationError.from_exception_data(
        "ControlNetEchoParams",
        [
            {
                "type": "value_error",
                "loc": ("controlnets", index, "model_id"),
                "input": model_id,
                "ctx": {"error": reason},
            }
        ],
    )


class ControlNetEcho(Transform):
    """Output = the input frame at the session's size; the params are only kept."""

    name = "controlnet-echo"
    params_model = ControlNetEchoParams

    def validate_params(self, params: TransformParams) -> None:
        assert isinstance(params, ControlNetEchoParams)
        for index, spec in enumerate(params.controlnets):
            if spec.model_id.startswith(UNLOADABLE):
                raise refusal(index, spec.model_id)

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [
            to_rgb_array(resize(job.frame.image, job.params.width, job.params.height))
            for job in jobs
        ]
