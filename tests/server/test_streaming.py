"""Real aiortc peers against the real app under uvicorn: frames, pts, resizing, load shedding."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import httpx
import pytest

from livediff.testing.servers import LiveServer
from tests.server.streaming import publish, wait_until

FRAME_TICKS = 3000  # 90 kHz ticks per frame at 30 fps


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_passthrough_returns_every_frame_in_order_with_its_pts(
    server: LiveServer, codec: str
) -> None:
    async with publish(server.url, codec=codec, params={"width": 256, "height": 256}) as client:
        await client.video.wait_for(45, timeout=30)
    frames = [f for f in client.video.frames if f.number is not None]
    numbers = [f.number for f in frames]
    assert len(frames) >= 40
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert numbers[-1] - numbers[0] + 1 - len(numbers) <= 3  # at most a few frames lost
    first = frames[0]
    for frame in frames:
        assert frame.number is not None and first.number is not None
        expected = (frame.number - first.number) * FRAME_TICKS
        assert abs((frame.pts - first.pts) - expected) <= 2  # codec rounding only
        assert (frame.width, frame.height) == (256, 256)


async def test_output_takes_the_session_size(server: LiveServer) -> None:
    async with publish(server.url, params={"width": 128, "height": 96}) as client:
        await client.video.wait_for(5, timeout=30)
    assert {(f.width, f.height) for f in client.video.frames} == {(128, 96)}


async def test_a_slow_transform_sheds_frames_instead_of_queueing_them(
    server: LiveServer,
) -> None:
    async with publish(server.url, params={"delay_ms": 100}) as client:
        await client.video.wait_for(40, timeout=40)  # ~4 s at 10 fps out
        async with httpx.AsyncClient(base_url=server.url) as http:
            info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
    latencies = [seconds for _, seconds in client.video.latencies(client.source)]
    early, late = statistics.median(latencies[5:15]), statistics.median(latencies[-10:])
    # A queue would add 2/3 s of delay per second here (30 fps in, 10 fps out).
    assert late < early + 0.3, (early, late)
    assert info["frames_dropped"] > info["frames_out"]
    assert info["fps_out"] < info["fps_in"]


async def test_a_transform_that_raises_does_not_end_the_session(
    serve: Callable[..., LiveServer],
) -> None:
    flaky = serve(pipeline="tests.server.faulty:FlakyTransform")
    async with publish(flaky.url) as client:
        await client.video.wait_for(30, timeout=30)
        async with httpx.AsyncClient(base_url=flaky.url) as http:
            info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
    assert info["errors"] > 5 and info["state"] == "live"
    assert len([f for f in client.video.frames if f.number is not None]) >= 30


async def test_audio_is_passed_back_unchanged(server: LiveServer) -> None:
    async with publish(server.url, audio=True) as client:
        await client.video.wait_for(5, timeout=30)
        await wait_until(lambda: len(client.audio_frames) > 20)
