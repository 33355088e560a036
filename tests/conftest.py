"""Shared fixtures: a real livediff server (uvicorn on 127.0.0.1, its own thread and loop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from livediff.config import Settings

if TYPE_CHECKING:  # the server's packages load only where a test starts one (the GPU machine
    import uvicorn  # runs the gpu-marked tests with the diffusion packages alone)
    from fastapi import FastAPI

    from livediff.server.service import LivediffService


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is; elsewhere they are skipped, saying why."""
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class LiveServer:
    """A running server: its base URL, the app and the service inside it."""

    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def service(self) -> LivediffService:
        service: LivediffService = self.app.state.livediff
        return service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start_server(
    settings: Settings, ready_timeout: float = 60.0, *, wait_for_model: bool = True
) -> LiveServer:
    """Run ``create_app(settings)`` under uvicorn on 127.0.0.1 (an ephemeral port) until HTTP is
    up and, with ``wait_for_model``, the transform has loaded (/health no longer LOADING)."""
    import uvicorn

    from livediff.server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", app, server, thread)
    while wait_for_model and live.service.engine.health() == "LOADING":
        if time.monotonic() > deadline:
            raise RuntimeError("the test server's transform did not load")
        time.sleep(0.02)
    return live


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``serve(pipeline="passthrough", max_sessions=2, ...)`` -> a running LiveServer."""
    started: list[LiveServer] = []

    def _serve(**overrides: Any) -> LiveServer:
        live = start_server(Settings(**overrides))
        started.append(live)
        return live

    yield _serve
    for live in started:
        live.stop()


@pytest.fixture
def server(serve: Callable[..., LiveServer]) -> LiveServer:
    """A passthrough server with default settings."""
    return serve()
