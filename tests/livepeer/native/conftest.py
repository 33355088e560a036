"""Fixtures of the native runner's tests: the trickle server double and a runner in-process.

The runner (``create_runner_app``) runs under uvicorn on 127.0.0.1 in a thread and event loop of
its own, as ``livediff runner`` would, so its tasks and threads can be counted from here. The
trickle server double (:mod:`livediff.testing.trickle_server`) plays the orchestrator's side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from livediff.config import Settings
from livediff.livepeer.native.app import create_runner_app
from livediff.livepeer.native.contract import NativeRunner
from livediff.testing.trickle_server import FakeTrickleServer

#: Settings every runner here starts from: quick status events, short waits.
FAST = {"runner_status_interval_s": 0.5, "trickle_retry_delay_s": 0.05, "warmup_frames": 2}
STREAM_THREADS = ("livediff-ingest", "livediff-egress")


@dataclass
class RunnerServer:
    """A runner app serving on 127.0.0.1 in its own thread and loop."""

    url: str
    runner: NativeRunner
    server: uvicorn.Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the runner's event loop and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def loop_tasks(self) -> int:
        """Tasks alive on the runner's loop (uvicorn's own included)."""
        return int(self.call(lambda: len(asyncio.all_tasks())))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_runner(
    settings: Settings, timeout: float = 120.0, *, wait_for_model: bool = True
) -> RunnerServer:
    """Serve ``create_runner_app(settings)`` until HTTP is up and (``wait_for_model``) the
    transform has loaded."""
    app = create_runner_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def serve() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            loop.run_until_complete(server.serve())
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="runner-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the runner did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = RunnerServer(f"http://127.0.0.1:{port}", app.state.runner, server, thread, loops[0])
    while wait_for_model and live.runner.health() == "LOADING":
        if time.monotonic() > deadline:
            raise RuntimeError("the runner's transform did not load")
        time.sleep(0.02)
    return live


@pytest.fixture
def trickle() -> Iterator[FakeTrickleServer]:
    server = FakeTrickleServer().start()
    yield server
    server.stop()


@pytest.fixture
def runner_factory() -> Iterator[Callable[..., RunnerServer]]:
    """``runner_factory(pipeline="passthrough", ...)``: a running runner (stopped afterwards)."""
    started: list[RunnerServer] = []

    def make(**overrides: Any) -> RunnerServer:
        live = start_runner(Settings(**{**FAST, **overrides}))
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as http:
        yield http


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in STREAM_THREADS and t.is_alive()]


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def health(client: httpx.AsyncClient, runner: RunnerServer) -> str:
    response = await client.get(f"{runner.url}/health")
    return str(response.json()["status"])
