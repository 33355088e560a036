"""Faults (issue 12): failing frames, a worker out of memory, input that changes size, SIGTERM.

Faults are injected by :class:`tests.server.faulty.FaultyTransform`, on command.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from livediff.testing.framecode import Scene
from livediff.testing.peers import NumberedVideoTrack
from livediff.testing.servers import LiveServer, free_port
from tests.server.faulty import FaultyTransform
from tests.server.streaming import publish, sample_offer, wait_serving, wait_until
from tests.server.test_api import metric

FAULTY = "tests.server.faulty:FaultyTransform"
SMALL = {"width": 128, "height": 128}


@pytest.fixture(autouse=True)
def fresh_commands() -> Iterator[None]:
    FaultyTransform.reset()
    yield
    FaultyTransform.reset()


def labelled(text: str, name: str, **labels: str) -> float:
    """A labelled sample's value in Prometheus text."""
    inside = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{inside}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"{prefix.strip()} not in metrics")


async def test_repeated_failures_end_the_session_with_a_reason(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(pipeline=FAULTY, transform_error_limit=5)
    async with (
        publish(server.url, params=SMALL, channel=True) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await client.video.wait_for(5, timeout=30)
        FaultyTransform.arm("raise", frames=1000)
        await wait_until(lambda: client.messages, timeout=20)
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        text = (await http.get("/metrics")).text
        health = (await http.get("/health")).json()
    [ended] = client.messages
    assert ended["type"] == "ended"
    assert "failed on 5 frames in a row" in ended["reason"] and "injected" in ended["reason"]
    assert info["state"] == "closed" and info["end_reason"] == ended["reason"]
    assert info["errors"] == 5 and info["frames_out"] >= 5
    assert labelled(text, "livediff_errors_total", kind="session_failed") == 1
    assert labelled(text, "livediff_errors_total", kind="transform") == 5
    assert health == {"status": "IDLE"}  # the session ended, not the server
    assert server.service.records == {}


async def test_out_of_memory_restarts_the_worker_and_the_session_goes_on(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(pipeline=FAULTY)
    transform = server.service.engine.transform
    assert isinstance(transform, FaultyTransform)
    async with (
        publish(server.url, params=SMALL) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await client.video.wait_for(5, timeout=30)
        FaultyTransform.reload_gate.clear()  # hold the restart, to see /health meanwhile
        FaultyTransform.arm("oom")
        await wait_until(lambda: transform.closes == 1)
        during = (await http.get("/health")).json()
        refused = await http.post("/v1/sessions", json={"sdp": await sample_offer()})
        FaultyTransform.reload_gate.set()
        await wait_until(lambda: server.service.engine.health() == "OK", timeout=20)
        before = len(client.video.frames)
        await client.video.wait_for(before + 10, timeout=20)
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        text = (await http.get("/metrics")).text
    assert during == {"status": "ERROR"}
    assert refused.status_code == 503 and "MemoryError" in refused.json()["detail"]
    assert "restarting" in refused.json()["detail"] and "retry-after" in refused.headers
    assert transform.loads == 2 and info["state"] == "live"
    assert labelled(text, "livediff_errors_total", kind="out_of_memory") == 1
    assert metric(text, "livediff_worker_restarts_total") == 1
    assert labelled(text, "livediff_requests_rejected_total", reason="worker_error", status="503")


class ResizingTrack(NumberedVideoTrack):
    """A camera whose picture changes size (here from 128x128 to 320x240) after ``switch_at``
    frames, as a browser does when it adapts its resolution."""

    def __init__(self, switch_at: int, then: tuple[int, int]) -> None:
        super().__init__(128, 128)
        self.switch_at = switch_at
        self.then = then

    async def recv(self) -> Any:
        if self.count == self.switch_at:
            self.scene = Scene(*self.then)
        return await super().recv()


async def test_input_that_changes_size_mid_stream_keeps_flowing(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(max_input_pixels=160 * 120)
    source = ResizingTrack(switch_at=20, then=(320, 240))
    async with (
        publish(server.url, params=SMALL, source=source) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await wait_until(lambda: source.count > source.switch_at, timeout=30)
        received = len(client.video.frames)
        await client.video.wait_for(received + 20, timeout=30)
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        text = (await http.get("/metrics")).text
    assert {(f.width, f.height) for f in client.video.frames} == {(128, 128)}
    assert info["errors"] == 0 and info["state"] == "live"
    assert metric(text, "livediff_input_downscaled_total") >= 10  # 320x240 > 160x120


async def test_sigterm_closes_peers_politely_and_exits() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "livediff", "serve", "--port", str(port)]
    command += ["--log-format", "json", "--log-level", "info"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        await wait_serving(url, process)
        async with publish(url, params=SMALL, channel=True) as client:
            await client.video.wait_for(10, timeout=30)
            process.send_signal(signal.SIGTERM)
            await wait_until(lambda: client.messages, timeout=20)
            await wait_until(lambda: client.pc.connectionState == "closed", timeout=20)
            exit_status = await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=20)
    assert client.messages == [{"type": "ended", "reason": "service shutting down"}]
    assert exit_status in (0, -signal.SIGTERM)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    about_session = [line for line in lines if line.get("session_id") == client.session_id]
    assert any("opened" in line["msg"] for line in about_session)
    assert any("closed: service shutting down" in line["msg"] for line in about_session)
