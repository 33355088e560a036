"""Liveness and metrics: GET /health (the runner contract's states), GET /ready (the status code
alone tells: go-livepeer's static Live Runner registration needs an exact one) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livediff.server.schemas import Health
from livediff.server.service import LivediffService


def health_router(service: LivediffService) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        """LOADING while the model loads, IDLE with no session, OK when serving, ERROR if broken."""
        return Health(status=service.engine.health())

    @router.get("/ready", response_model=Health, responses={503: {"model": Health}})
    async def ready() -> JSONResponse:
        """200 when a session can be served (IDLE or OK), 503 while LOADING or ERROR."""
        status = service.engine.health()
        code = 200 if status in ("IDLE", "OK") else 503
        return JSONResponse({"status": status}, status_code=code)

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(
            generate_latest(service.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return router
