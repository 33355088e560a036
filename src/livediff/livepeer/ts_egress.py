"""Egress: the session's processed frames -> H.264 -> MPEG-TS segments on the output channel.

A thread of its own (``livediff-egress``) runs one libx264 encoder for the stream (settings from
:class:`~livediff.encoding.EncoderSettings`: preset, bitrate, threads; always
``zerolatency``, no B-frames) and forces an IDR every ``keyframe_interval_s`` of stream time,
where it starts a new segment: one segment per GOP, each opening with a PAT/PMT and its IDR.
Every encoded frame is muxed (:class:`~livediff.livepeer.trickle.tsmux.TsMuxer`) and handed to the
segment's POST body at once; passed-through audio is muxed as it arrives. The event loop only
moves the bytes into the publisher (:class:`LoopSegments`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
from av.video.codeccontext import VideoCodecContext

from livediff.encoding import EncoderSettings
from livediff.engine import Session, SlotClosedError
from livediff.frames import Frame, now
from livediff.livepeer.events import StreamStatus
from livediff.livepeer.trickle import PublishSegment, TricklePublisher
from livediff.livepeer.trickle.ts import TS_CLOCK_HZ, TS_TIME_BASE, Pes
from livediff.livepeer.trickle.tsmux import AudioTrack, TsMuxer

logger = logging.getLogger(__name__)

#: Passed-through audio PES packets kept while the encoder thread is busy.
AUDIO_BACKLOG = 256
#: libx264's own keyframe interval, in GOPs: IDRs are forced at segment starts, not by it.
KEYINT_GOPS = 4


def open_h264(width: int, height: int, settings: EncoderSettings) -> VideoCodecContext:
    """A libx264 encoder for the output: zerolatency, no B-frames, IDRs forced by the caller."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuv420p"
    codec.time_base = TS_TIME_BASE
    codec.framerate = Fraction(settings.fps, 1)
    codec.bit_rate = settings.bitrate_start
    codec.gop_size = settings.gop_frames * KEYINT_GOPS
    codec.max_b_frames = 0
    codec.thread_count = settings.threads_for(width, height)
    codec.options = {
        "preset": settings.h264_preset,
        "tune": "zerolatency",
        "forced-idr": "1",
        "x264-params": "scenecut=0",
    }
    codec.open()
    return codec


def to_ts_ticks(pts: int, time_base: Fraction) -> int:
    if time_base == TS_TIME_BASE:
        return pts
    return round(pts * time_base / TS_TIME_BASE)


class LoopSegments:
    """The encoder thread's segments, handed to the publisher on the event loop, in order.

    Thread side: :meth:`begin`, :meth:`write`, :meth:`end` (each a ``call_soon_threadsafe``,
    so they keep their order); loop side: the publisher's current segment.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        publisher: TricklePublisher,
        on_first: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._publisher = publisher
        self._on_first = on_first
        self._segment: PublishSegment | None = None
        self.begun = 0

    def begin(self) -> None:
        self._call(self._begin)

    def write(self, data: bytes) -> None:
        if data:
            self._call(self._write, data)

    def end(self) -> None:
        self._call(self._end)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the stream is already gone
            logger.debug("output bytes after the event loop closed were dropped")

    def _begin(self) -> None:
        self._end()
        self._segment = self._publisher.next_segment()
        self.begun += 1
        if self.begun == 1:
            self._on_first()

    def _write(self, data: bytes) -> None:
        if self._segment is not None:
            self._segment.write(data)

    def _end(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()


class SegmentEncoder:
    """The egress thread: newest processed frame in, MPEG-TS segments out (see module doc)."""

    def __init__(
        self,
        settings: EncoderSettings,
        segments: LoopSegments,
        session: Session,
        status: StreamStatus,
    ) -> None:
        self._settings = settings
        self._segments = segments
        self._session = session
        self._status = status
        self._gop_ticks = round(settings.keyframe_interval_s * TS_CLOCK_HZ)
        self._cond = threading.Condition()
        self._video: Frame | None = None
        self._audio: deque[Pes] = deque(maxlen=AUDIO_BACKLOG)
        self._track: AudioTrack | None = None
        self._closed = False
        self._muxer = TsMuxer()
        self._codec: VideoCodecContext | None = None
        self._segment_start: int | None = None
        self._last_pts: int | None = None
        self.frames = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="livediff-egress", daemon=True)

    # -- any thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def put_video(self, frame: Frame) -> None:
        """The newest processed frame; one still waiting is dropped (counted)."""
        with self._cond:
            replaced, self._video = self._video, frame
            self._cond.notify()
        if replaced is not None:
            self._session.stats.on_dropped("egress")

    def audio_track(self, track: AudioTrack) -> None:
        with self._cond:
            self._track = track
            self._cond.notify()

    def audio(self, pes: Pes) -> None:
        with self._cond:
            self._audio.append(pes)
            self._cond.notify()

    def close(self) -> None:
        """Encode what is waiting, end the last segment, and stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug: say so and end the output where it is
            logger.exception("the egress thread failed")
            self._segments.end()

    def _loop(self) -> None:
        while True:
            video, audio, closed = self._take()
            for pes in audio:
                self._mux_audio(pes)
            if video is not None:
                self._encode(video)
            if closed:
                self._finish()
                return

    def _take(self) -> tuple[Frame | None, list[Pes], bool]:
        with self._cond:
            while self._video is None and not self._audio and not self._closed:
                self._cond.wait()
            video, self._video = self._video, None
            audio = list(self._audio)
            self._audio.clear()
            if self._track is not None:
                self._muxer.audio, self._track = self._track, None
            return video, audio, self._closed

    def _mux_audio(self, pes: Pes) -> None:
        if self._segment_start is not None:  # audio before the first video frame is dropped
            self._segments.write(self._muxer.audio_pes(pes.data, pes.pts, pes.dts))

    def _encode(self, frame: Frame) -> None:
        image = frame.image
        if not isinstance(image, av.VideoFrame):
            self._session.stats.on_dropped("egress_not_video")
            return
        pts = to_ts_ticks(frame.pts, frame.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            self._session.stats.on_dropped("egress_pts")
            return
        try:
            self._write_frame(image, pts)
        except av.error.FFmpegError as exc:
            self._failed(exc)
            return
        self._last_pts = pts
        self.frames += 1
        self._session.stats.on_sent(frame, now())
        self._status.last_output_time = time.time()

    def _write_frame(self, image: av.VideoFrame, pts: int) -> None:
        if image.format.name != "yuv420p":
            image = image.reformat(format="yuv420p")
        codec = self._codec_for(image.width, image.height)
        starts_segment = self._segment_start is None or pts - self._segment_start >= self._gop_ticks
        if starts_segment:
            self._begin_segment(pts)
        kind = av.video.frame.PictureType
        image.pict_type = kind.I if starts_segment else kind.NONE
        image.pts, image.time_base = pts, TS_TIME_BASE
        self._write_packets(codec.encode(image), pts)

    def _codec_for(self, width: int, height: int) -> VideoCodecContext:
        codec = self._codec
        if codec is not None and (codec.width, codec.height) == (width, height):
            return codec
        if codec is not None:  # a new size: flush the old encoder into the old segment
            self._write_packets(codec.encode(None), self._last_pts or 0)
        self._codec = open_h264(width, height, self._settings)
        self._segment_start = None  # a new encoder starts a new segment
        return self._codec

    def _begin_segment(self, pts: int) -> None:
        self._segments.begin()
        self._segments.write(self._muxer.segment_start())
        self._segment_start = pts

    def _write_packets(self, packets: list[Any], pts: int) -> None:
        for packet in packets:
            packet_pts = packet.pts if packet.pts is not None else pts
            packet_dts = packet.dts if packet.dts is not None else packet_pts
            muxed = self._muxer.video(bytes(packet), packet_pts, packet_dts, key=packet.is_keyframe)
            self._segments.write(muxed)

    def _finish(self) -> None:
        if self._codec is not None:
            try:
                self._write_packets(self._codec.encode(None), self._last_pts or 0)
            except av.error.FFmpegError as exc:
                self._failed(exc)
        self._segments.end()

    def _failed(self, exc: BaseException) -> None:
        """An encoder error: that frame is lost, and the next one starts afresh."""
        self.errors += 1
        logger.warning("output frame did not encode (%d so far): %s", self.errors, exc)
        self._codec = None
        self._segment_start = None


class Egress:
    """Moves the session's processed frames to the encoder thread until the session ends."""

    def __init__(
        self,
        session: Session,
        publisher: TricklePublisher,
        encoder: SegmentEncoder,
        *,
        failure_limit: int,
    ) -> None:
        self.session = session
        self.publisher = publisher
        self.encoder = encoder
        self.failure_limit = failure_limit

    async def run(self) -> str:
        """Until the session ends or the output channel fails; returns why."""
        self.encoder.start()
        slot = self.session.subscribe(asyncio.get_running_loop())
        try:
            while True:
                try:
                    frame = await slot.get()
                except SlotClosedError:
                    return "the session ended"
                self.encoder.put_video(frame)
                problem = self._channel_problem()
                if problem is not None:
                    return problem
        finally:
            self.session.unsubscribe(slot)

    def _channel_problem(self) -> str | None:
        if self.publisher.gone:
            return "the output channel is gone"
        if self.publisher.failures > self.failure_limit:
            return f"{self.publisher.failures} output segments in a row were lost"
        return None

    async def finish(self) -> None:
        """Encode the last frames, end the last segment, wait for the POSTs, DELETE the channel
        (as ai-runner does when its stream ends)."""
        self.encoder.close()
        if self.encoder.started:
            await asyncio.to_thread(self.encoder.join)
        await self.publisher.close(delete=True)
