"""The FastAPI application: ``create_app(settings)``, or ``mount_service`` onto your own app."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from livediff import __version__
from livediff.config import Settings
from livediff.media.sdp import OfferError
from livediff.server.health import health_router
from livediff.server.http import BodyLimitMiddleware
from livediff.server.service import (
    LivediffService,
    ModelInUseError,
    ServiceUnavailableError,
    UnknownSessionError,
)
from livediff.server.sessions import sessions_router
from livediff.server.whip import whep_router, whip_router

logger = logging.getLogger(__name__)

GUARDED_PREFIXES = ("/v1", "/whip", "/whep")
EXPOSED_HEADERS = ["Location", "ETag", "Link", "Accept-Patch", "Accept-Post", "Retry-After"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A complete livediff server: API, WHIP/WHEP, health, metrics and the demo page at /."""
    settings = settings or Settings()
    service = LivediffService(settings)
    app = FastAPI(
        title="livediff",
        version=__version__,
        summary="Realtime video-to-video: stream in over WebRTC or WHIP, get it back transformed.",
        lifespan=service.lifespan,
    )
    app.state.livediff = service
    service.mount(app)
    return app


def mount_service(service: LivediffService, app: FastAPI) -> None:
    """Add livediff's middleware, error handlers and routes to ``app``."""
    settings = service.settings
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_body_bytes, prefixes=GUARDED_PREFIXES
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match"],
            expose_headers=EXPOSED_HEADERS,
        )
    _add_error_handlers(app, settings)
    app.include_router(health_router(service))
    app.include_router(sessions_router(service))
    app.include_router(whip_router(service))
    app.include_router(whep_router(service))
    web_dir = find_web_dir(settings)
    if web_dir is not None:
        app.mount("/", StaticFiles(directory=web_dir, html=True), name="web")


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def offer_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    async def unknown_session(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.args[0]) if exc.args else "no such session"}, status_code=404
        )

    async def unavailable(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    async def model_in_use(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    app.add_exception_handler(OfferError, offer_error)
    app.add_exception_handler(ModelInUseError, model_in_use)
    app.add_exception_handler(UnknownSessionError, unknown_session)
    app.add_exception_handler(ServiceUnavailableError, unavailable)


def find_web_dir(settings: Settings) -> Path | None:
    """The demo page's folder: LIVEDIFF_WEB_DIR, else the bundled copy or the checkout's web/."""
    if settings.web_dir:
        return Path(settings.web_dir)
    here = Path(__file__).resolve()
    for candidate in (here.parent.parent / "web", here.parents[3] / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    return None
