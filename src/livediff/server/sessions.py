"""The versioned JSON API: /v1/sessions and /v1/pipeline."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from livediff.media.sdp import parse_offer
from livediff.server.http import bearer_auth, rate_limit, read_json_object, validation_error
from livediff.server.schemas import (
    ERROR_RESPONSES,
    PipelineInfo,
    SessionAnswer,
    SessionInfo,
    SessionOffer,
)
from livediff.server.service import LivediffService, SessionRecord


async def _open_session(
    service: LivediffService, body: dict[str, Any]
) -> tuple[SessionRecord, str]:
    """Validate a POST /v1/sessions body and open the session (422 names the bad field)."""
    try:
        offer_body = SessionOffer.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, ("body",)) from exc
    offer = parse_offer(offer_body.sdp, service.offer_limits)
    try:
        params = service.engine.validate(offer_body.params)
        return await service.open_session(offer, params, kind="webrtc")
    except ValidationError as exc:  # from the params model, or the transform (e.g. a model)
        raise validation_error(exc, ("body", "params")) from exc


def sessions_router(service: LivediffService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["sessions"], responses=ERROR_RESPONSES)
    auth = [Depends(bearer_auth(service.settings))]
    opening = [*auth, Depends(rate_limit(service.limiter))]

    @router.get("/pipeline", response_model=PipelineInfo)
    async def pipeline() -> dict[str, Any]:
        """The running pipeline, the JSON schema of its params and their defaults."""
        info = service.engine.transform.pipeline_info()
        info["defaults"] = service.engine.validate({}).model_dump(mode="json")
        return info

    @router.post(
        "/sessions",
        status_code=201,
        response_model=SessionAnswer,
        dependencies=opening,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SessionOffer.model_json_schema()}},
            }
        },
    )
    async def create_session(request: Request, response: Response) -> SessionAnswer:
        """Open a session from a WebRTC offer; the processed video comes back on the same peer."""
        body = await read_json_object(request, service.settings.max_json_depth)
        record, answer = await _open_session(service, body)
        response.headers["Location"] = f"{router.prefix}/sessions/{record.id}"
        return SessionAnswer(sdp=answer, session_id=record.id)

    @router.get("/sessions", response_model=list[SessionInfo], dependencies=auth)
    async def list_sessions() -> list[dict[str, Any]]:
        """Every open session with its statistics."""
        return [service.session_info(record) for record in service.open_records()]

    @router.get("/sessions/{session_id}", response_model=SessionInfo, dependencies=auth)
    async def get_session(session_id: str) -> dict[str, Any]:
        """One session: counters, fps, latency percentiles (ingest to send), params, state.
        A session the server ended (not a deleted one) still answers for a while, with state
        closed and its ``end_reason``."""
        return service.info(session_id)

    @router.patch(
        "/sessions/{session_id}/params",
        dependencies=auth,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    async def update_params(session_id: str, request: Request) -> dict[str, Any]:
        """Merge a partial params update, validate it, apply it from the next frame."""
        service.get(session_id)
        patch = await read_json_object(request, service.settings.max_json_depth)
        try:
            params = await service.update_params(session_id, patch)
        except ValidationError as exc:
            raise validation_error(exc, ("body",)) from exc
        return params.model_dump(mode="json")

    @router.delete("/sessions/{session_id}", status_code=204, dependencies=auth)
    async def delete_session(session_id: str) -> Response:
        """Close the session: the peer connection and everything it held are released. A
        session that already ended (its peer closed) and is still remembered answers 204 too."""
        await service.delete_session(session_id, "deleted by the client")
        return Response(status_code=204)

    return router
