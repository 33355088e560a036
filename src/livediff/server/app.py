"""The FastAPI application: ``create_app(settings)``, or ``mount_service`` onto your own app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from livediff import __version__
from livediff.config import Settings
from livediff.livepeer.live_runner.door import LiveRunner
from livediff.livepeer.live_runner.routes import LivepeerProxyMiddleware, live_runner_router
from livediff.server.debug import debug_router
from livediff.server.errors import STATUS_FOR, error_detail, reason_for
from livediff.server.health import health_router
from livediff.server.http import BodyLimitMiddleware, RejectionCounter, note_rejection
from livediff.server.service import LivediffService
from livediff.server.sessions import sessions_router
from livediff.server.whip import whep_router, whip_router

logger = logging.getLogger(__name__)

GUARDED_PREFIXES = ("/v1", "/whip", "/whep")
EXPOSED_HEADERS = ["Location", "ETag", "Link", "Accept-Patch", "Accept-Post", "Retry-After"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A complete livediff server: API, WHIP/WHEP, health, metrics and the demo page at /."""
    settings = settings or Settings()
    service = LivediffService(settings)
    door = LiveRunner(settings, service.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.lifespan(app):
            await door.start()  # registers with an orchestrator when one is configured
            try:
                yield
            finally:
                await door.stop()

    app = FastAPI(
        title="livediff",
        version=__version__,
        summary="Realtime video-to-video: stream in over WebRTC or WHIP, get it back transformed.",
        lifespan=lifespan,
    )
    app.state.livediff = service
    app.state.live_runner = door
    mount_service(service, app, door)
    return app


def mount_service(service: LivediffService, app: FastAPI, door: LiveRunner | None = None) -> None:
    """Add livediff's middleware, error handlers and routes to ``app`` (with ``door``, the
    Live Runner's too: ``POST /v1/trickle`` and the Livepeer proxy adapter)."""
    settings = service.settings
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        prefixes=GUARDED_PREFIXES,
        drain_factor=settings.body_drain_factor,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match"],
            expose_headers=EXPOSED_HEADERS,
        )
    if door is not None:  # inside the counter: its refusals (403) are counted too
        app.add_middleware(LivepeerProxyMiddleware, door=door, close_local=service.close_session)
    app.add_middleware(  # outermost: counts the answers of the middleware inside it too
        RejectionCounter,
        counter=service.engine.metrics.requests_rejected,
        prefixes=GUARDED_PREFIXES,
    )
    _add_error_handlers(app, settings)
    app.include_router(health_router(service))
    if settings.debug_endpoints:
        app.include_router(debug_router(service))
    app.include_router(sessions_router(service))
    app.include_router(whip_router(service))
    app.include_router(whep_router(service))
    if door is not None:
        app.include_router(live_runner_router(door))
    web_dir = find_web_dir(settings)
    if web_dir is not None:
        app.mount("/", StaticFiles(directory=web_dir, html=True), name="web")


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Answer each refusal of the engine (and bad offers) with its status from STATUS_FOR,
    and note every refusal's reason for ``livediff_requests_rejected_total``."""

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status = next(code for kind, code in STATUS_FOR.items() if isinstance(exc, kind))
        note_rejection(request, reason_for(exc))
        wait_s = getattr(exc, "retry_after_s", settings.retry_after_s)
        headers = {"Retry-After": str(wait_s)} if status in (429, 503) else None
        return JSONResponse({"detail": error_detail(exc)}, status_code=status, headers=headers)

    async def http_refused(request: Request, exc: Exception) -> Response:
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):
            note_rejection(request, reason)
        assert isinstance(exc, HTTPException)
        return await http_exception_handler(request, exc)

    for kind in STATUS_FOR:
        if not issubclass(kind, ValidationError):  # routes say which field (body, query)
            app.add_exception_handler(kind, refused)
    app.add_exception_handler(HTTPException, http_refused)


def find_web_dir(settings: Settings) -> Path | None:
    """The demo page's folder: LIVEDIFF_WEB_DIR, else the bundled copy or the checkout's web/."""
    if settings.web_dir:
        return Path(settings.web_dir)
    here = Path(__file__).resolve()
    for candidate in (here.parent.parent / "web", here.parents[3] / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    return None
