"""Issue 19, items 3 and 4, through a real server and a real aiortc publisher: a transform that
blocks forever (the watchdog replaces the worker, or the service exits where it cannot), and a
stream larger than max_decode_pixels (refused before anything decodes it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from livediff.engine.recovery import HANG_EXIT_STATUS
from livediff.media.frame_size import REFUSE_AFTER_FRAMES
from livediff.testing.peers import NumberedVideoTrack
from livediff.testing.servers import LiveServer, free_port
from tests.server.faulty import FaultyTransform
from tests.server.streaming import publish, wait_serving, wait_until
from tests.server.test_api import metric
from tests.server.test_faults import labelled

FAULTY = "tests.server.faulty:FaultyTransform"
SMALL = {"width": 128, "height": 128}
LIMIT_S = 1.0
WATCHDOG = {"batch_timeout_first_s": LIMIT_S, "batch_timeout_min_s": LIMIT_S}


@pytest.fixture(autouse=True)
def fresh_commands() -> Iterator[None]:
    FaultyTransform.reset()
    yield
    FaultyTransform.reset()  # releases the blocked call: its thread ends with the test


async def test_a_hung_transform_is_replaced_and_the_session_gets_frames_again(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(pipeline=FAULTY, **WATCHDOG)
    first = server.service.engine.transform
    async with (
        publish(server.url, params=SMALL) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await client.video.wait_for(5, timeout=30)
        FaultyTransform.reload_gate.clear()  # hold the new transform's load, to see ERROR
        FaultyTransform.arm("hang")
        await wait_until(lambda: FaultyTransform.hung == 1, interval=0.01)
        began = time.monotonic()
        while (await http.get("/health")).json()["status"] != "ERROR":
            assert time.monotonic() - began < LIMIT_S + 2, "/health never said ERROR"
        noticed = time.monotonic() - began
        FaultyTransform.reload_gate.set()
        await wait_until(lambda: server.service.engine.health() == "OK", timeout=20)
        before = len(client.video.frames)
        await client.video.wait_for(before + 10, timeout=20)
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        text = (await http.get("/metrics")).text
    assert noticed < LIMIT_S + 2
    assert server.service.engine.transform is not first  # a new instance serves
    assert info["state"] == "live" and info["errors"] == 1  # the stuck frame, failed
    assert metric(text, "livediff_workers_abandoned_total") == 1
    assert labelled(text, "livediff_errors_total", kind="worker_hung") == 1
    assert metric(text, "livediff_worker_restarts_total") == 1


async def test_a_device_hang_tells_the_session_and_exits_for_the_supervisor() -> None:
    """A transform on an accelerator blocks in its first frame: the service ends the session
    with the reason and exits with status 75, with the stuck thread still blocked."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "livediff", "serve", "--port", str(port)]
    command += ["--pipeline", "tests.server.faulty:HangingAcceleratorTransform"]
    env = dict(os.environ, LIVEDIFF_BATCH_TIMEOUT_FIRST_S="1", LIVEDIFF_BATCH_TIMEOUT_MIN_S="1")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
    try:
        await wait_serving(url, process)
        async with publish(url, params=SMALL, channel=True) as client:
            status = await asyncio.to_thread(process.wait, 30)
            await wait_until(lambda: client.messages, timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=20)
    assert status == HANG_EXIT_STATUS, stderr.decode()[-2000:]
    [ended] = client.messages
    assert ended["type"] == "ended"
    assert "runs on mps" in ended["reason"] and f"status {HANG_EXIT_STATUS}" in ended["reason"]
    assert "batch_timeout_first_s" in ended["reason"]


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_a_stream_over_the_decode_limit_is_never_decoded(
    serve: Callable[..., LiveServer], codec: str
) -> None:
    """A 320x240 camera against a limit of 160x120 pixels: every frame is dropped before the
    decoder (counted), and the session ends naming the size and the limit."""
    server = serve(max_decode_pixels=160 * 120)
    source = NumberedVideoTrack(320, 240)
    async with (
        publish(server.url, params=SMALL, codec=codec, source=source, channel=True) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await wait_until(lambda: client.messages, timeout=30)
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        text = (await http.get("/metrics")).text
    [ended] = client.messages
    assert ended["type"] == "ended"
    assert "320x240" in ended["reason"] and "over the limit of 19200" in ended["reason"]
    assert info["state"] == "closed" and info["end_reason"] == ended["reason"]
    assert labelled(text, "livediff_frames_dropped_total", stage="oversize") >= REFUSE_AFTER_FRAMES
    assert metric(text, "livediff_frames_received_total") == 0  # nothing was decoded
    assert client.video.frames == []
