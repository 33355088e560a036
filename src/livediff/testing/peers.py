"""Client-side WebRTC helpers for tests and benchmarks: a numbered source and a recorder.

``NumberedVideoTrack`` sends frames whose number is drawn in the pixels (see
:mod:`livediff.testing.framecode`) at a steady rate and remembers when each was handed to the
encoder; ``FrameRecorder`` reads the numbers back from a received track, so latency is measured
per frame, glass to glass, through real codecs.
"""

from __future__ import annotations

import asyncio
import fractions
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from livediff.frames import now
from livediff.media.jitter import use_marker_jitter_buffer
from livediff.testing.framecode import LIMIT, Scene, numbered_frame, read_frame_number

CLOCK_RATE = 90_000


class NumberedVideoTrack(MediaStreamTrack):
    """Synthetic camera: frame n carries n in its pixels and pts n * 90000 / fps."""

    kind = "video"

    def __init__(self, width: int = 512, height: int = 512, fps: float = 30.0) -> None:
        super().__init__()
        self.fps = fps
        self.scene = Scene(width, height)
        self.sent_at: dict[int, float] = {}
        self.count = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        number = self.count
        if self._start is None:
            self._start = now()
        delay = self._start + number / self.fps - now()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = numbered_frame(number, self.scene)
        frame.pts = round(number * CLOCK_RATE / self.fps)
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        self.count += 1
        self.sent_at[number % LIMIT] = now()
        return frame


@dataclass(slots=True)
class ReceivedFrame:
    number: int | None
    pts: int
    at: float
    width: int
    height: int


@dataclass
class FrameRecorder:
    """Reads every frame of a received track and the number drawn in it."""

    frames: list[ReceivedFrame] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.VideoFrame):
                continue
            at = now()
            self.frames.append(
                ReceivedFrame(
                    read_frame_number(frame), int(frame.pts or 0), at, frame.width, frame.height
                )
            )
            self.arrived.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until ``count`` frames arrived (raises TimeoutError otherwise)."""
        async with asyncio.timeout(timeout):
            while len(self.frames) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def latencies(self, source: NumberedVideoTrack) -> list[tuple[int, float]]:
        """(number, seconds from hand-off to the sender's encoder to arrival) per read frame."""
        found = []
        for frame in self.frames:
            if frame.number is not None and frame.number in source.sent_at:
                found.append((frame.number, frame.at - source.sent_at[frame.number]))
        return found


def client_peer() -> RTCPeerConnection:
    """A client peer with no ICE servers (nothing outside this machine is reachable)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def add_camera(
    pc: RTCPeerConnection,
    track: MediaStreamTrack,
    *,
    direction: str = "sendrecv",
    codec: str | None = None,
    marker_buffer: bool = False,
) -> Any:
    """Add ``track`` as the peer's video (optionally forcing one codec); returns the transceiver."""
    transceiver = pc.addTransceiver(track, direction=direction)
    if codec is not None:
        capabilities = RTCRtpSender.getCapabilities("video")
        wanted = [
            c
            for c in capabilities.codecs
            if c.mimeType.lower() in (f"video/{codec.lower()}", "video/rtx")
        ]
        transceiver.setCodecPreferences(wanted)
    if marker_buffer:
        use_marker_jitter_buffer(transceiver.receiver)
    return transceiver


async def local_offer(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


async def accept_answer(pc: RTCPeerConnection, sdp: str) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
