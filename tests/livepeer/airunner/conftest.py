"""The ai-runner adapter's tests: real ai-runner when installed, else the test double.

``tests/fakes`` holds a double of ai-runner's ``runner`` package and ``airunner_driver`` (the
process loop). The double goes on ``sys.path`` in front only when the real ai-runner is not
importable; where it is installed, ``tests/fakes`` goes last, so ``runner`` is the real one and the
driver drives it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

FAKES = Path(__file__).resolve().parents[2] / "fakes"
REPO = Path(__file__).resolve().parents[3]


def real_airunner_installed() -> bool:
    """True when a ``runner`` package with ai-runner's live modules is importable from elsewhere."""
    spec = importlib.util.find_spec("runner")
    if spec is None or spec.origin is None:  # absent, or a bare folder seen as a namespace
        return False
    return not Path(spec.origin).resolve().is_relative_to(FAKES)


USING_DOUBLE = not real_airunner_installed()
if USING_DOUBLE:
    sys.path.insert(0, str(FAKES))
elif str(FAKES) not in sys.path:
    sys.path.append(str(FAKES))

from airunner_driver import PipelineDriver  # noqa: E402 - needs the path set above
from runner.live.trickle import VideoFrame  # noqa: E402

TIME_BASE = Fraction(1, 90_000)
SIZE = 384  # ai-runner's smallest output size (multiple of 64)


def run_runner(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the runner's environment (see :func:`runner_env`); never raises on rc."""
    return subprocess.run(
        command, env=runner_env(**env), capture_output=True, text=True, timeout=120, check=False
    )


def runner_env(**extra: str) -> dict[str, str]:
    """Environment for a ``livediff-airunner`` subprocess that finds ai-runner (or its double)."""
    paths = [str(FAKES)] if USING_DOUBLE else []
    paths += [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.update(extra)
    return env


async def until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait (polling) until ``condition()`` holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


def video_frame(tensor: Any, index: int) -> VideoFrame:
    """A frame as ai-runner's decoder makes it: 30 fps timestamps on a 90 kHz clock."""
    return VideoFrame(tensor, index * 3000, TIME_BASE)


class Driven:
    """A pipeline under ``PipelineDriver`` plus the task running its loops."""

    def __init__(self, driver: PipelineDriver, task: asyncio.Task[None]) -> None:
        self.driver = driver
        self.task = task

    @property
    def pipeline(self) -> Any:
        return self.driver.pipeline

    async def ready(self) -> None:
        await until(lambda: self.driver.ready.is_set() or self.task.done(), 120, "pipeline ready")
        if self.task.done():
            self.task.result()  # raises what stopped it
            raise AssertionError(f"the pipeline loops ended: {self.driver.errors}")

    async def start_stream(self, request_id: str, params: dict[str, Any]) -> None:
        """What ai-runner does when a stream starts: reset, then the stream's full params."""
        self.driver.reset_stream(request_id)
        self.driver.update_params(params)
        await until(lambda: self.driver.request_id == request_id, what="the stream ids")
        await self.params_applied(params)

    async def params_applied(self, params: dict[str, Any]) -> None:
        def applied() -> bool:
            if not self.driver.param_updates.empty() or not self.driver.ready.is_set():
                return False
            current = self.pipeline.streams.params.model_dump()
            return all(current.get(key) == value for key, value in params.items())

        await until(applied, what=f"params {params}")

    async def roundtrip(self, frame: VideoFrame, timeout: float = 30.0) -> Any:
        """Send one frame and return the output that carries its timestamp."""
        assert self.driver.send_input(frame), "the runtime's input queue was full"
        while True:
            out = await self.driver.recv_output(timeout)
            if out.timestamp == frame.timestamp and not out.is_loading_frame:
                return out

    async def stop(self) -> None:
        self.driver.stop()
        await asyncio.wait_for(self.task, 60)


@pytest.fixture
def airunner_double() -> bool:
    return USING_DOUBLE


@pytest.fixture
async def drive(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., Awaitable[Driven]]]:
    """Factory: ``await drive("passthrough", LIVEDIFF_X="...")`` -> a ready pipeline under the
    driver, built from ``livediff.livepeer.airunner.main.build_spec()`` as ``livediff-airunner``
    builds it."""
    from livediff.livepeer.airunner.main import build_spec

    started: list[Driven] = []

    async def _drive(pipeline: str, **env: str) -> Driven:
        monkeypatch.setenv("LIVEDIFF_PIPELINE", pipeline)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        driver = PipelineDriver(build_spec())
        driven = Driven(driver, asyncio.create_task(driver.run()))
        started.append(driven)
        await driven.ready()
        return driven

    yield _drive
    for driven in started:
        if not driven.task.done():
            await driven.stop()


@pytest.fixture
def worker_threads() -> Iterator[Callable[[], int]]:
    """Counts live ``livediff-worker`` threads (to check that stop() ends them)."""
    import threading

    def count() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "livediff-worker" and t.is_alive())

    yield count
