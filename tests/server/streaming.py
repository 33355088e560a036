"""A publishing client for the server tests: a real aiortc peer streaming numbered frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack

from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)


@dataclass
class Publisher:
    pc: RTCPeerConnection
    source: NumberedVideoTrack
    video: FrameRecorder
    session_id: str
    response: httpx.Response
    audio_frames: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: What came on the params data channel (with ``channel=True``), parsed.
    messages: list[dict[str, Any]] = field(default_factory=list)


async def count_audio(track: MediaStreamTrack, into: list[Any]) -> None:
    while True:
        try:
            into.append(await track.recv())
        except Exception:  # the track ended; MediaStreamError in aiortc
            return


@asynccontextmanager
async def publish(
    base_url: str,
    *,
    params: dict[str, Any] | None = None,
    codec: str | None = None,
    size: int = 256,
    audio: bool = False,
    headers: dict[str, str] | None = None,
    source: NumberedVideoTrack | None = None,
    channel: bool = False,
) -> AsyncIterator[Publisher]:
    """Open a /v1/sessions session and stream numbered frames (from ``source``, default a
    ``size`` square camera) until the block ends; with ``channel``, a params data channel."""
    pc = client_peer()
    source = source or NumberedVideoTrack(size, size)
    recorder = FrameRecorder()
    audio_frames: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    messages: list[dict[str, Any]] = []
    if channel:
        params_channel = pc.createDataChannel("params")
        params_channel.on("message", lambda message: messages.append(json.loads(message)))

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            tasks.append(asyncio.ensure_future(recorder.consume(track)))
        else:
            tasks.append(asyncio.ensure_future(count_audio(track, audio_frames)))

    add_camera(pc, source, codec=codec, marker_buffer=True)
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    offer = await local_offer(pc)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.post(
            "/v1/sessions",
            json={"sdp": offer, "type": "offer", "params": params or {}},
            headers=headers,
        )
    try:
        assert response.status_code == 201, response.text
        body = response.json()
        await accept_answer(pc, body["sdp"])
        yield Publisher(
            pc, source, recorder, body["session_id"], response, audio_frames, tasks, messages
        )
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()


async def sample_offer(size: int = 64) -> str:
    """A real offer (sendrecv video) from a peer that is closed right after."""
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(size, size))
    try:
        return await local_offer(pc)
    finally:
        await pc.close()


async def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true (raises TimeoutError)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def wait_serving(url: str, process: Any) -> None:
    """Until the ``livediff serve`` subprocess ``process`` answers IDLE at ``url``."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(300):
            assert process.poll() is None, "livediff serve exited"
            try:
                if (await http.get("/health")).json()["status"] == "IDLE":
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("livediff serve did not become healthy")
