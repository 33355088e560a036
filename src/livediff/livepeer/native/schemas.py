"""The runner contract's request and response bodies, as ai-runner v0.14.1 defines them.

go-livepeer reads an error only as 400/401/422/500 with ``{"detail": {"msg": "..."}}``
(ai-runner's ``HTTPError``), so every refusal of this face takes that shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from livediff.engine import Health


class LiveVideoToVideoRequest(BaseModel):
    """``POST /live-video-to-video``: the stream's four trickle channels and its params."""

    subscribe_url: str = Field(..., description="Trickle channel the input MPEG-TS is read from.")
    publish_url: str = Field(..., description="Trickle channel the output MPEG-TS is written to.")
    control_url: str = Field("", description="Trickle channel of params updates (JSON).")
    events_url: str = Field("", description="Trickle channel for status and error events.")
    model_id: str = Field("", description="The pipeline's name; must match when given.")
    params: dict[str, Any] = Field(default_factory=dict, description="Initial stream params.")
    gateway_request_id: str = Field("", description="The gateway's request id (for logs).")
    manifest_id: str = Field("", description="The orchestrator's manifest id (for logs).")
    stream_id: str = Field("", description="The stream id (for logs).")


class LiveVideoToVideoResponse(BaseModel):
    """What ai-runner answers (go-livepeer does not read it): the request's channels."""

    subscribe_url: str
    publish_url: str
    control_url: str = ""
    events_url: str = ""
    request_id: str = ""
    manifest_id: str = ""


class HealthResponse(BaseModel):
    status: Health = Field(
        ...,
        description="LOADING until the model is warm, IDLE without a stream, OK while "
        "streaming, ERROR when the worker failed (go-livepeer then destroys the container).",
    )


class VersionResponse(BaseModel):
    pipeline: str
    model_id: str
    version: str


class GpuComputeInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    major: int
    minor: int


class HardwareInformation(BaseModel):
    pipeline: str
    model_id: str
    gpu_info: dict[int, GpuComputeInfo]


class ApiError(BaseModel):
    msg: str


class HttpError(BaseModel):
    detail: ApiError


ErrorStatus = Literal[400, 401, 422, 500]


def http_error(message: str) -> dict[str, Any]:
    """The body of a refusal, in the one shape go-livepeer reads."""
    return HttpError(detail=ApiError(msg=message)).model_dump()
