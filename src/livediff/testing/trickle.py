"""For tests and benchmarks of the native runner: a gateway's side of the trickle channels.

- :func:`encode_clip` makes an H.264 (+ Opus) MPEG-TS clip the way a gateway's FFmpeg does, one
  segment per GOP, with each frame's number drawn in its pixels (:mod:`~livediff.testing.
  framecode`), and knows which piece of bytes completes which frame;
- :class:`ClipPublisher` publishes it in real time (a piece per frame interval) and records when
  each frame's last byte went out;
- :class:`OutputReader` reads a channel of MPEG-TS segments back, releasing each frame at its
  last byte, and records every frame's number, pts, size and arrival time.

A frame's latency is then its output arrival minus its input's last byte, both on
:func:`livediff.frames.now`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, cast

import av
import httpx
import numpy as np
from av.audio.stream import AudioStream
from av.video.stream import VideoStream

from livediff.frames import now
from livediff.livepeer.trickle import NEXT_SEQ, TrickleError, TricklePublisher, TrickleSubscriber
from livediff.livepeer.trickle.ts import TS_CLOCK_HZ, TS_TIME_BASE, TsDemuxer
from livediff.testing.framecode import Scene, numbered_frame, read_frame_number

AUDIO_RATE = 48_000
AUDIO_FRAME = 960  # 20 ms of Opus


@dataclass
class Piece:
    """Bytes the muxer wrote while one input frame was muxed, and the frames they complete."""

    data: bytes
    completes: list[int] = field(default_factory=list)


@dataclass
class ClipSegment:
    pieces: list[Piece]


@dataclass
class Clip:
    """A clip's segments, and each frame's number by the pts its PES packet carries."""

    segments: list[ClipSegment]
    numbers_by_pts: dict[int, int]

    @property
    def frames(self) -> int:
        return len(self.numbers_by_pts)


class _Sink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data, self.buffer = bytes(self.buffer), bytearray()
        return data


def encode_clip(
    frames: int,
    size: tuple[int, int] = (256, 256),
    *,
    fps: int = 30,
    gop_s: float = 1.0,
    audio: bool = False,
    first_number: int = 0,
) -> Clip:
    """``frames`` numbered frames as MPEG-TS segments of ``gop_s`` seconds (FFmpeg's muxer)."""
    width, height = size
    gop = max(1, round(gop_s * fps))
    scene = Scene(width, height)
    segments: list[ClipSegment] = []
    for start in range(0, frames, gop):
        numbers = range(start, min(start + gop, frames))
        pieces = _encode_segment(numbers, scene, fps, audio, first_number)
        segments.append(ClipSegment(pieces))
    return Clip(segments, _mark_completions(segments, first_number))


def _encode_segment(
    numbers: range, scene: Scene, fps: int, audio: bool, first_number: int
) -> list[Piece]:
    sink = _Sink()
    container = av.open(sink, "w", format="mpegts")
    video = _video_stream(container, scene, fps)
    sound = _audio_stream(container) if audio else None
    pieces: list[Piece] = []
    audio_pts = numbers.start * AUDIO_RATE // fps
    for number in numbers:
        frame = numbered_frame(first_number + number, scene)
        frame.pts, frame.time_base = number * TS_CLOCK_HZ // fps, TS_TIME_BASE
        if number == numbers.start:
            frame.pict_type = av.video.frame.PictureType.I
        container.mux(video.encode(frame))
        if sound is not None:
            audio_pts = _mux_audio(container, sound, audio_pts, (number + 1) * AUDIO_RATE // fps)
        pieces.append(Piece(sink.take()))
    container.mux(video.encode(None))
    container.close()
    pieces[-1].data += sink.take()
    return pieces


def _video_stream(container: Any, scene: Scene, fps: int) -> VideoStream:
    options = {"preset": "superfast", "tune": "zerolatency", "bf": "0"}
    stream = cast(VideoStream, container.add_stream("libx264", rate=fps, options=options))
    stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, "yuv420p"
    codec = stream.codec_context
    codec.gop_size = 10 * fps  # one keyframe per segment, forced at its start
    return stream


def _audio_stream(container: Any) -> AudioStream:
    stream = cast(AudioStream, container.add_stream("libopus", rate=AUDIO_RATE))
    stream.layout = "mono"
    return stream


def _mux_audio(container: Any, stream: AudioStream, pts: int, until: int) -> int:
    while pts < until:
        tone = (np.sin(np.arange(AUDIO_FRAME) * 0.05) * 4000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, pts, Fraction(1, AUDIO_RATE)
        container.mux(stream.encode(frame))
        pts += AUDIO_FRAME
    return pts


def _mark_completions(segments: Sequence[ClipSegment], first_number: int) -> dict[int, int]:
    """Which piece holds each frame's last byte (found by the demuxer the runner uses); the
    frames' numbers by pts."""
    demuxer = TsDemuxer()
    numbers_by_pts: dict[int, int] = {}
    for segment in segments:
        for piece in segment.pieces:
            for pes in demuxer.feed(piece.data, 0.0):
                _count_frame(demuxer, pes, piece, numbers_by_pts, first_number)
        for pes in demuxer.flush():
            _count_frame(demuxer, pes, segment.pieces[-1], numbers_by_pts, first_number)
    return numbers_by_pts


def _count_frame(
    demuxer: TsDemuxer, pes: Any, piece: Piece, numbers_by_pts: dict[int, int], first: int
) -> None:
    if demuxer.video is not None and pes.pid == demuxer.video.pid and pes.pts is not None:
        number = first + len(numbers_by_pts)
        numbers_by_pts[pes.pts] = number
        piece.completes.append(number)


class ClipPublisher:
    """Publishes clip segments in real time; ``sent[number]`` is when its last byte went out."""

    def __init__(self, client: httpx.AsyncClient, url: str, fps: int = 30) -> None:
        self.publisher = TricklePublisher(client, url, "video/mp2t")
        self.fps = fps
        self.sent: dict[int, float] = {}

    async def publish(self, clip: Clip) -> None:
        start = now()
        index = 0
        for clip_segment in clip.segments:
            segment = self.publisher.next_segment()
            for piece in clip_segment.pieces:
                await asyncio.sleep(max(0.0, start + index / self.fps - now()))
                segment.write(piece.data)
                moment = now()
                self.sent.update(dict.fromkeys(piece.completes, moment))
                index += 1
            segment.close()

    async def close(self) -> None:
        await self.publisher.close()


@dataclass(frozen=True)
class OutputFrame:
    number: int | None  # read from the pixels (None: unreadable, e.g. a diffusion output)
    pts: int
    width: int
    height: int
    arrived: float
    segment: int


class OutputReader:
    """Reads a channel of MPEG-TS segments until it ends, decoding every video frame."""

    def __init__(self, client: httpx.AsyncClient, url: str, *, start_seq: int = NEXT_SEQ) -> None:
        self.subscriber = TrickleSubscriber(client, url, start_seq=start_seq, retries=2)
        self.frames: list[OutputFrame] = []
        self.audio_packets = 0
        self.segments: list[int] = []
        self.segment_starts_with_key: list[bool] = []
        self.keyframes: dict[int, int] = {}  # IDR frames per segment seq
        self._demuxer = TsDemuxer()
        self._decoder = av.CodecContext.create("h264", "r")

    async def read(self) -> None:
        try:
            while (segment := await self.subscriber.next_segment()) is not None:
                self.segments.append(segment.seq)
                async for chunk in segment.chunks():
                    self._take(self._demuxer.feed(chunk, now()), segment.seq)
                self._take(self._demuxer.flush(), segment.seq)
        except TrickleError:
            return
        finally:
            await self.subscriber.close()

    def _take(self, packets: list[Any], seq: int) -> None:
        video, audio = self._demuxer.video, self._demuxer.audio
        for pes in packets:
            if audio is not None and pes.pid == audio.pid:
                self.audio_packets += 1
            elif video is not None and pes.pid == video.pid:
                self._decode(pes, seq)

    def _decode(self, pes: Any, seq: int) -> None:
        key = is_idr(pes.data)
        if len(self.segment_starts_with_key) < len(self.segments):
            self.segment_starts_with_key.append(key)
        self.keyframes[seq] = self.keyframes.get(seq, 0) + int(key)
        packet = av.Packet(pes.data)
        packet.pts, packet.dts, packet.time_base = pes.pts, pes.dts, TS_TIME_BASE
        for frame in self._decoder.decode(packet):
            number = read_frame_number(frame)
            pts = int(frame.pts if frame.pts is not None else -1)
            self.frames.append(
                OutputFrame(number, pts, frame.width, frame.height, pes.arrived, seq)
            )


def is_idr(access_unit: bytes) -> bool:
    """Whether an H.264 access unit (Annex B) holds an IDR slice."""
    at = access_unit.find(b"\x00\x00\x01")
    while at >= 0:
        if at + 3 < len(access_unit) and access_unit[at + 3] & 0x1F == 5:
            return True
        at = access_unit.find(b"\x00\x00\x01", at + 3)
    return False


class EventReader:
    """Reads a channel of JSON events until it ends; ``events`` are (arrival, body) pairs."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.subscriber = TrickleSubscriber(client, url, start_seq=0, retries=2)
        self.events: list[tuple[float, dict[str, Any]]] = []

    async def read(self) -> None:
        try:
            while (segment := await self.subscriber.next_segment()) is not None:
                body = await segment.read(1 << 20)
                if body:
                    self.events.append((now(), json.loads(body)))
        except TrickleError:
            return
        finally:
            await self.subscriber.close()

    def of_type(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, body) for at, body in self.events if body["event"].get("type") == kind]


def control_message(client: httpx.AsyncClient, url: str) -> TricklePublisher:
    """A publisher for a control channel (the gateway's side): one JSON object per segment."""
    return TricklePublisher(client, url, "application/json")


def send_json(publisher: TricklePublisher, message: dict[str, Any]) -> None:
    segment = publisher.next_segment()
    segment.write(json.dumps(message).encode())
    segment.close()
