"""Request and response bodies of the HTTP API (they document the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class SessionOffer(BaseModel):
    sdp: str = Field(description="The SDP offer; its video must be sendrecv (or sendonly).")
    type: Literal["offer"] = "offer"
    params: dict[str, Any] = Field(
        default_factory=dict, description="Initial params; GET /v1/pipeline has their schema."
    )


class SessionAnswer(BaseModel):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str


class LatencyMs(BaseModel):
    p50: float
    p95: float
    p99: float


class SessionInfo(BaseModel):
    session_id: str
    kind: Literal["webrtc", "whip"]
    state: Literal["connecting", "live", "closed"]
    pipeline: str
    created_at: float = Field(description="Unix time the session opened.")
    params: dict[str, Any]
    pipeline_state: dict[str, Any] = Field(
        default_factory=dict,
        description="What the pipeline reports of the session, e.g. diffusion's active "
        "temporal tools: {'temporal': ['image_postprocessing.feedback', 'motion_noise']}.",
    )
    frames_in: int = Field(description="Decoded frames received.")
    frames_processed: int = Field(description="Frames the transform produced.")
    frames_out: int = Field(description="Frames handed to encoders (all viewers).")
    frames_dropped: int = Field(description="Frames shed by newest-wins slots.")
    errors: int = Field(description="Frames on which the transform raised.")
    fps_in: float
    fps_out: float
    latency_ms: LatencyMs = Field(description="Ingest to send, over the last few seconds.")
    viewers: int = Field(description="WHEP viewers watching the output.")
    end_reason: str | None = Field(
        None, description="Why the session ended (state closed), e.g. repeated failures."
    )


class PipelineInfo(BaseModel):
    name: str
    params_schema: dict[str, Any]
    defaults: dict[str, Any]


class Health(BaseModel):
    status: Literal["OK", "LOADING", "IDLE", "ERROR"]


class ErrorBody(BaseModel):
    detail: Any


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed SDP or JSON",
        401: "Missing or wrong bearer token",
        404: "Unknown session",
        413: "Body larger than the limit",
        415: "Wrong Content-Type",
        422: "Invalid params, or a model that is not allowed",
        429: "Sessions or viewers opened too fast from this address (see Retry-After)",
        503: "Full (sessions or viewers), or the model is loading or restarting (Retry-After)",
    }.items()
}
