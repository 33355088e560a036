"""The Live Runner door on the HTTP service: ``POST /v1/trickle`` and the proxy adapter.

go-livepeer's proxy forwards ``/apps/{runner}/session/{session}/app/{path}`` to this service's
``/{path}`` with the ``Livepeer-*`` headers. :class:`LivepeerProxyMiddleware` makes the service
right behind it, without the routes knowing:

- a request naming a Livepeer session that the orchestrator did not reserve for this runner is
  refused (403) before any route runs;
- a ``Location`` the service answers with (``/whip/{id}``, ``/v1/sessions/{id}``) is given the
  public prefix, so clients that follow it come back through the proxy;
- a livediff session opened through the proxy (``201`` to ``POST /v1/sessions`` or ``/whip``)
  is tied to its Livepeer session: releasing that closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livediff.engine import EngineUnavailableError
from livediff.livepeer.live_runner.door import (
    ChannelsRefusedError,
    LiveRunner,
    NotReservedError,
    SessionCallback,
)
from livediff.livepeer.live_runner.protocol import (
    RUNNER_ROUTE_HEADER,
    SESSION_CONTROL_HEADER,
    SESSION_ID_HEADER,
    SESSION_TOKEN_HEADER,
)
from livediff.livepeer.params import refusal_message

logger = logging.getLogger(__name__)

#: Closes a livediff session (the service's), given its id and the reason.
CloseLocal = Callable[[str, str], Awaitable[object]]
#: Where a created session's id sits in the ``Location`` the service answers with.
CREATING_PATHS = {"/v1/sessions": "/v1/sessions/", "/whip": "/whip/"}


class TrickleRequest(BaseModel):
    """``POST /v1/trickle``: the stream's initial params (a full set, as Livepeer sends)."""

    params: dict[str, Any] = Field(default_factory=dict)


class TrickleResponse(BaseModel):
    """The session's trickle channels, as the client reaches them through the orchestrator."""

    session_id: str
    input: str = Field(description="Publish MPEG-TS (H.264) here.")
    output: str = Field(description="Subscribe to the restyled MPEG-TS here.")
    control: str = Field(description="Publish params updates (JSON, full sets) here.")
    events: str = Field(description="Subscribe to status and error events here.")


def live_runner_router(door: LiveRunner) -> APIRouter:
    router = APIRouter(tags=["livepeer"])

    @router.post(
        "/v1/trickle",
        response_model=TrickleResponse,
        responses={400: {}, 403: {}, 422: {}, 502: {}, 503: {}},
        summary="Start this Livepeer session's stream over trickle channels",
    )
    async def start_trickle(body: TrickleRequest, request: Request) -> Any:
        callback = session_callback(request)
        if callback is None:
            return refusal(
                400,
                "POST /v1/trickle is reached through a Livepeer orchestrator's session proxy "
                f"(it needs the {SESSION_ID_HEADER}, {SESSION_TOKEN_HEADER} and "
                f"{SESSION_CONTROL_HEADER} headers)",
            )
        try:
            urls = await door.start_trickle(callback, body.params)
        except ValidationError as exc:
            return refusal(422, f"invalid params: {refusal_message(exc)}")
        except NotReservedError as exc:
            return refusal(403, str(exc))
        except EngineUnavailableError as exc:
            return refusal(503, str(exc))
        except ChannelsRefusedError as exc:
            return refusal(502, str(exc))
        return TrickleResponse(session_id=callback.session_id, **urls)

    return router


def session_callback(request: Request) -> SessionCallback | None:
    headers = request.headers
    values = [headers.get(name, "") for name in (SESSION_ID_HEADER, SESSION_TOKEN_HEADER)]
    control = headers.get(SESSION_CONTROL_HEADER, "")
    if not all(values) or not control:
        return None
    return SessionCallback(session_id=values[0], token=values[1], control_url=control)


def refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


class LivepeerProxyMiddleware:
    """Refuses unreserved Livepeer sessions, prefixes ``Location``, ties created sessions."""

    def __init__(self, app: ASGIApp, door: LiveRunner, close_local: CloseLocal) -> None:
        self.app = app
        self.door = door
        self.close_local = close_local

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = _header(scope, SESSION_ID_HEADER) if scope["type"] == "http" else ""
        if not session_id:
            await self.app(scope, receive, send)
            return
        try:
            await self.door.check_reserved(session_id)
        except NotReservedError as exc:
            await refusal(403, str(exc))(scope, receive, send)
            return
        prefix = _public_prefix(scope, session_id)
        creating = CREATING_PATHS.get(scope["path"]) if scope["method"] == "POST" else None

        async def send_adapted(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self._adapt(message, prefix, session_id, creating)
            await send(message)

        await self.app(scope, receive, send_adapted)

    def _adapt(
        self, message: Message, prefix: str, session_id: str, creating: str | None
    ) -> Message:
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
        for index, (name, value) in enumerate(headers):
            if name.lower() != b"location":
                continue
            location = value.decode("latin-1")
            if creating and message["status"] == 201 and location.startswith(creating):
                self._tie(session_id, location[len(creating) :])
            if prefix and location.startswith("/"):
                headers[index] = (name, (prefix + location).encode("latin-1"))
        return {**message, "headers": headers}

    def _tie(self, livepeer_session: str, local_id: str) -> None:
        async def close(reason: str) -> None:
            await self.close_local(local_id, reason)

        try:
            self.door.tie(livepeer_session, close)
        except NotReservedError:  # released while the session was being opened
            self.door.tasks.spawn(close(f"livepeer session {livepeer_session} was released"))
            return
        logger.info("session %s tied to livepeer session %s", local_id, livepeer_session)


def _header(scope: Scope, name: str) -> str:
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            return str(value.decode("latin-1"))
    return ""


def _public_prefix(scope: Scope, session_id: str) -> str:
    """The path the orchestrator serves this app under (``/apps/{route}/session/{sid}/app``)."""
    route = _header(scope, RUNNER_ROUTE_HEADER)
    return f"/apps/{route}/session/{session_id}/app" if route else ""
