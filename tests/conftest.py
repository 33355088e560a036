"""Shared fixtures: a real livediff server (uvicorn on 127.0.0.1, its own thread and loop).

The server starter is :mod:`livediff.testing.servers`, shared with the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from livediff.config import Settings
from livediff.testing.servers import LiveServer, start_server


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
