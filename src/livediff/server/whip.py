"""WHIP ingest (RFC 9725) and WHEP viewers of a session's processed video.

POST /whip                 publish (application/sdp offer, sendonly or sendrecv) -> 201 answer
PATCH /whip/{id}           trickle ICE (application/trickle-ice-sdpfrag) -> 204
DELETE /whip/{id}          end the session -> 200
POST /whep/{id}            watch a session's output (recvonly offer) -> 201 answer
PATCH/DELETE /whep/{id}/{viewer}
Query parameters of POST /whip are initial params (e.g. ``/whip?prompt=a%20cat``), since WHIP
clients such as OBS send no JSON.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import ValidationError

from livediff.config import Settings
from livediff.media.sdp import parse_offer
from livediff.server.http import bearer_auth, rate_limit, read_text, validation_error
from livediff.server.schemas import ERROR_RESPONSES
from livediff.server.service import LivediffService, SessionRecord

SDP = "application/sdp"
SDP_FRAGMENT = "application/trickle-ice-sdpfrag"
SDP_BODY = {"requestBody": {"required": True, "content": {SDP: {"schema": {"type": "string"}}}}}
FRAGMENT_BODY = {
    "requestBody": {"required": True, "content": {SDP_FRAGMENT: {"schema": {"type": "string"}}}}
}
SDP_ANSWER: dict[int | str, dict[str, Any]] = {
    201: {"content": {SDP: {"schema": {"type": "string"}}}, "description": "The SDP answer"}
}


def ice_server_links(settings: Settings) -> list[str]:
    """RFC 9725 section 4.6 Link header values announcing the configured ICE servers."""
    links = []
    for url in settings.ice_servers:
        link = f'<{url}>; rel="ice-server"'
        if url.startswith("turn") and settings.ice_username and settings.ice_credential:
            secret = settings.ice_credential.get_secret_value()
            link += (
                f'; username="{settings.ice_username}"; credential="{secret}"'
                '; credential-type="password"'
            )
        links.append(link)
    return links


def _answer_response(answer: str, location: str, etag: str, settings: Settings) -> Response:
    headers = {"Location": location, "ETag": etag, "Accept-Patch": SDP_FRAGMENT}
    response = Response(content=answer, status_code=201, media_type=SDP, headers=headers)
    for link in ice_server_links(settings):
        response.headers.append("Link", link)
    return response


def _options_response(allow: str, settings: Settings, accept_post: bool) -> Response:
    response = Response(status_code=204, headers={"Allow": allow})
    if accept_post:
        response.headers["Accept-Post"] = SDP
    for link in ice_server_links(settings):
        response.headers.append("Link", link)
    return response


def _check_if_match(request: Request, etag: str) -> None:
    expected = request.headers.get("if-match")
    if expected is not None and expected.strip() not in ("*", etag):
        raise HTTPException(status_code=412, detail="If-Match does not match the session's ETag")


def _refuse_ice_restart(fragment: str, record: SessionRecord) -> None:
    if "a=ice-ufrag:" in fragment or "a=ice-pwd:" in fragment:
        remote = record.publisher.pc.remoteDescription
        remote_sdp = remote.sdp if remote is not None else ""
        for line in fragment.splitlines():
            if line.startswith(("a=ice-ufrag:", "a=ice-pwd:")) and line.strip() not in remote_sdp:
                raise HTTPException(status_code=422, detail="ICE restarts are not supported")


def whip_router(service: LivediffService) -> APIRouter:
    router = APIRouter(tags=["whip/whep"], responses=ERROR_RESPONSES)
    auth = [Depends(bearer_auth(service.settings))]
    opening = [*auth, Depends(rate_limit(service.limiter))]
    settings = service.settings

    @router.options("/whip", include_in_schema=False)
    async def whip_options() -> Response:
        return _options_response("OPTIONS, POST", settings, accept_post=True)

    @router.post(
        "/whip",
        status_code=201,
        dependencies=opening,
        openapi_extra=SDP_BODY,
        responses=SDP_ANSWER,
    )
    async def whip_publish(request: Request) -> Response:
        """Publish a stream (OBS 30+, any WHIP client); query parameters set initial params."""
        offer = parse_offer(await read_text(request, SDP), service.offer_limits)
        try:
            params = service.engine.validate(dict(request.query_params))
        except ValidationError as exc:
            raise validation_error(exc, ("query",)) from exc
        try:
            record, answer = await service.open_session(offer, params, kind="whip")
        except ValidationError as exc:
            raise validation_error(exc, ("query",)) from exc
        return _answer_response(answer, f"/whip/{record.id}", record.etag, settings)

    @router.options("/whip/{session_id}", include_in_schema=False)
    async def whip_resource_options() -> Response:
        return _options_response("OPTIONS, PATCH, DELETE", settings, accept_post=False)

    @router.patch(
        "/whip/{session_id}", status_code=204, dependencies=auth, openapi_extra=FRAGMENT_BODY
    )
    async def whip_trickle(session_id: str, request: Request) -> Response:
        """Add the client's ICE candidates (trickle ICE, RFC 8840)."""
        record = service.get(session_id)
        fragment = await read_text(request, SDP_FRAGMENT)
        _check_if_match(request, record.etag)
        _refuse_ice_restart(fragment, record)
        await record.publisher.add_candidates(fragment)
        return Response(status_code=204)

    @router.delete("/whip/{session_id}", dependencies=auth)
    async def whip_delete(session_id: str) -> Response:
        """End the published session (200 also when it already ended, e.g. because the client
        closed its peer connection first, while livediff remembers it)."""
        await service.delete_session(session_id, "WHIP client ended the session")
        return Response(status_code=200)

    return router


def whep_router(service: LivediffService) -> APIRouter:
    router = APIRouter(tags=["whip/whep"], responses=ERROR_RESPONSES)
    auth = [Depends(bearer_auth(service.settings))]
    opening = [*auth, Depends(rate_limit(service.limiter))]
    settings = service.settings

    @router.options("/whep/{session_id}", include_in_schema=False)
    async def whep_options() -> Response:
        return _options_response("OPTIONS, POST", settings, accept_post=True)

    @router.post(
        "/whep/{session_id}",
        status_code=201,
        dependencies=opening,
        openapi_extra=SDP_BODY,
        responses=SDP_ANSWER,
    )
    async def whep_watch(session_id: str, request: Request) -> Response:
        """Watch a session's processed video; several viewers (up to max_viewers) may watch
        one session."""
        record = service.get(session_id)
        offer = parse_offer(await read_text(request, SDP), service.offer_limits)
        viewer_id, answer = await service.add_viewer(session_id, offer)
        return _answer_response(answer, f"/whep/{session_id}/{viewer_id}", record.etag, settings)

    @router.patch(
        "/whep/{session_id}/{viewer_id}",
        status_code=204,
        dependencies=auth,
        openapi_extra=FRAGMENT_BODY,
    )
    async def whep_trickle(session_id: str, viewer_id: str, request: Request) -> Response:
        """Add the viewer's ICE candidates."""
        viewer = service.get(session_id).viewers.get(viewer_id)
        if viewer is None:
            raise HTTPException(status_code=404, detail=f"no viewer {viewer_id!r}")
        await viewer.add_candidates(await read_text(request, SDP_FRAGMENT))
        return Response(status_code=204)

    @router.delete("/whep/{session_id}/{viewer_id}", dependencies=auth)
    async def whep_delete(session_id: str, viewer_id: str) -> Response:
        """Stop watching."""
        if not await service.close_viewer(session_id, viewer_id, "viewer left"):
            raise HTTPException(status_code=404, detail=f"no viewer {viewer_id!r}")
        return Response(status_code=200)

    return router
