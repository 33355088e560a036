"""The runner contract's HTTP face: what go-livepeer calls on a live runner container.

``create_runner_app(settings)`` serves, on the container's port:

- ``GET /health``: ``{"status": "LOADING" | "IDLE" | "OK" | "ERROR"}`` (always 200; go-livepeer
  polls it, returns IDLE containers to its pool and destroys ERROR ones);
- ``GET /ready``: 200 when a stream can be served (IDLE or OK), 503 otherwise; for health checks
  that look at the status code only (go-livepeer's Live Runner registry);
- ``GET /version``: ``{"pipeline", "model_id", "version"}``;
- ``GET /hardware/info``: ``{"pipeline", "model_id", "gpu_info": {index: {...}}}``;
- ``POST /live-video-to-video``: start a stream on the given trickle channels, answered at once
  (the stream runs in the background and replaces the one running now).

Refusals are ``{"detail": {"msg": "..."}}`` with 400 (wrong ``model_id``), 401 (bad token),
422 (invalid body or params) or 500 (not ready), the only ones go-livepeer reads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from livediff import __version__
from livediff.config import Settings
from livediff.livepeer.hardware import gpu_info
from livediff.livepeer.native.contract import NativeRunner, RunnerRefusal
from livediff.livepeer.native.schemas import (
    HardwareInformation,
    HealthResponse,
    HttpError,
    LiveVideoToVideoRequest,
    LiveVideoToVideoResponse,
    VersionResponse,
    http_error,
)

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": HttpError} for status in (400, 401, 422, 500)
}


def create_runner_app(settings: Settings | None = None) -> FastAPI:
    """The runner contract app around a :class:`NativeRunner` (started with the app)."""
    runner = NativeRunner(settings or Settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        yield
        await runner.stop()

    app = FastAPI(
        title="livediff runner",
        version=__version__,
        description="go-livepeer's live runner contract, served by livediff's engine.",
        lifespan=lifespan,
    )
    app.state.runner = runner
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.include_router(router)
    return app


def runner_of(request: Request) -> NativeRunner:
    runner: NativeRunner = request.app.state.runner
    return runner


async def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """A malformed body, in go-livepeer's error shape (FastAPI's own 422 is a list)."""
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    )
    return JSONResponse(status_code=422, content=http_error(f"invalid request: {problems}"))


router = APIRouter()


@router.get("/health", response_model=HealthResponse)
@router.get("/health/", response_model=HealthResponse, include_in_schema=False)
async def health(request: Request) -> HealthResponse:
    return HealthResponse(status=runner_of(request).health())


@router.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(request: Request) -> JSONResponse:
    status = runner_of(request).health()
    code = 200 if status in ("IDLE", "OK") else 503
    return JSONResponse(status_code=code, content={"status": status})


@router.get("/version", response_model=VersionResponse)
@router.get("/version/", response_model=VersionResponse, include_in_schema=False)
async def version(request: Request) -> VersionResponse:
    settings = runner_of(request).settings
    return VersionResponse(
        pipeline=settings.runner_pipeline,
        model_id=settings.runner_model_id,
        version=image_version(),
    )


def image_version() -> str:
    """The image's ``VERSION`` (as ai-runner reports it), else livediff's own version."""
    given = os.environ.get("VERSION", "")
    return given if given and given != "undefined" else __version__


@router.get("/hardware/info", response_model=HardwareInformation)
@router.get("/hardware/info/", response_model=HardwareInformation, include_in_schema=False)
async def hardware_info(request: Request) -> HardwareInformation:
    settings = runner_of(request).settings
    gpus = await asyncio.to_thread(gpu_info)
    return HardwareInformation(
        pipeline=settings.runner_pipeline, model_id=settings.runner_model_id, gpu_info=gpus
    )


@router.post(
    "/live-video-to-video",
    response_model=LiveVideoToVideoResponse,
    responses=ERROR_RESPONSES,
    summary="Start a stream on the given trickle channels",
)
@router.post(
    "/live-video-to-video/",
    response_model=LiveVideoToVideoResponse,
    responses=ERROR_RESPONSES,
    include_in_schema=False,
)
async def live_video_to_video(
    body: LiveVideoToVideoRequest, request: Request
) -> LiveVideoToVideoResponse | JSONResponse:
    runner = runner_of(request)
    try:
        params = runner.check(body, request.headers.get("authorization"))
    except RunnerRefusal as refusal:
        headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
        return JSONResponse(
            http_error(refusal.message), status_code=refusal.status, headers=headers
        )
    stream = runner.begin(body, params)
    return LiveVideoToVideoResponse(
        subscribe_url=body.subscribe_url,
        publish_url=body.publish_url,
        control_url=body.control_url,
        events_url=body.events_url,
        request_id=stream.id,
        manifest_id=body.manifest_id,
    )
