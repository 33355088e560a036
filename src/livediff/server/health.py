"""Liveness and metrics: GET /health (the runner contract's states) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livediff.server.schemas import Health
from livediff.server.service import LivediffService


def health_router(service: LivediffService) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        """LOADING while the model loads, IDLE with no session, OK when serving, ERROR if broken."""
        return Health(status=service.engine.health())

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(
            generate_latest(service.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return router
