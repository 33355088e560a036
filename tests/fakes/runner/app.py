"""TEST DOUBLE of ``runner.app`` (ai-runner v0.14.1): ``start_app`` for live pipelines.

As the real one: with ``PREPARE_MODELS=1`` (or ``--prepare-models`` on the command line) it
imports the pipeline class, calls its ``prepare_models()`` and returns; otherwise it serves on
``HOST``/``PORT`` (default 0.0.0.0:8000) with ``GET /health`` -> ``{"status": "LOADING" | "IDLE" |
"OK" | "ERROR"}`` and ``GET /version``. Unlike the real one it runs the pipeline in this process
(with the loops of ``airunner_driver``) and has no trickle endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from airunner_driver import PipelineDriver
from fastapi import FastAPI

from runner.live.pipelines import PipelineSpec
from runner.live.pipelines.loader import load_pipeline_class

logger = logging.getLogger(__name__)

# The real module configures logging when imported (INFO, or DEBUG with VERBOSE_LOGGING=1).
logging.basicConfig(
    level=logging.DEBUG if os.getenv("VERBOSE_LOGGING") == "1" else logging.INFO,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)


def prepare_models(pipeline_spec: PipelineSpec) -> None:
    """Prepare models for a live pipeline: its class's ``prepare_models()``."""
    logger.info("Preparing models for pipeline: %s", pipeline_spec.name)
    load_pipeline_class(pipeline_spec.pipeline_cls).prepare_models()
    logger.info("Model preparation complete")


def _health(driver: PipelineDriver, running: asyncio.Task[None] | None) -> str:
    if driver.fatal or (running is not None and running.done()):
        return "ERROR"
    if not driver.ready.is_set():
        return "LOADING"
    return "OK" if driver.request_id else "IDLE"


def create_app(spec: PipelineSpec) -> FastAPI:
    """An app that loads ``spec``'s pipeline at start and reports its state."""
    driver = PipelineDriver(spec)
    running: dict[str, asyncio.Task[None]] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        running["task"] = asyncio.create_task(driver.run())
        try:
            yield
        finally:
            driver.stop()
            await asyncio.gather(running["task"], return_exceptions=True)

    app = FastAPI(lifespan=lifespan)
    app.state.driver = driver

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": _health(driver, running.get("task"))}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {
            "pipeline": os.environ.get("PIPELINE", "live-video-to-video"),
            "model_id": os.environ.get("MODEL_ID", spec.name),
            "version": os.environ.get("VERSION", "undefined"),
        }

    return app


def start_app(
    pipeline: PipelineSpec | None = None,
    host: str | None = None,
    port: int | None = None,
    **uvicorn_kwargs: Any,
) -> None:
    """Prepare models and return (``PREPARE_MODELS=1``), or serve the pipeline until stopped."""
    if not isinstance(pipeline, PipelineSpec):
        raise TypeError("the ai-runner double only hosts live pipelines given as a PipelineSpec")
    if os.getenv("PREPARE_MODELS") == "1" or "--prepare-models" in sys.argv:
        prepare_models(pipeline)
        return
    import uvicorn

    bind_host = host or os.getenv("HOST", "0.0.0.0")
    bind_port = port or int(os.getenv("PORT", "8000"))
    uvicorn.run(create_app(pipeline), host=bind_host, port=bind_port, **uvicorn_kwargs)
