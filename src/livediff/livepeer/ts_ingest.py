"""Ingest: the input channel's MPEG-TS segments -> decoded frames in the stream's session.

The event loop only moves bytes: each chunk of a segment goes, stamped with the time it
arrived, to the decoder thread (``livediff-ingest``). There :class:`~livediff.livepeer.trickle.ts.
TsDemuxer` releases each video frame at its last byte and PyAV decodes it (slice threads only:
frame threads would hold frames back); the frame goes into the session's newest-wins input slot
with that arrival time as its ``received`` time. Audio PES packets go to the egress unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol, cast

import av
from av.video.codeccontext import VideoCodecContext

from livediff.engine import Session
from livediff.frames import Frame, StageTimes, now
from livediff.livepeer.events import StreamStatus
from livediff.livepeer.trickle import SubscribeSegment, TrickleError, TrickleSubscriber
from livediff.livepeer.trickle.ts import TS_TIME_BASE, Pes, TsDemuxer
from livediff.livepeer.trickle.tsmux import AudioTrack

logger = logging.getLogger(__name__)

#: MPEG-TS timestamps tick at 90 kHz.
#: Chunks the decoder thread may have waiting before the reader pauses (backpressure).
QUEUE_CHUNKS = 1024


class SegmentEnd:
    """Marker: the segment ended (its last PES packets are complete)."""


class StreamEnd:
    """Marker: no more input; the thread flushes and ends."""


Chunk = tuple[bytes, float]
Item = Chunk | SegmentEnd | StreamEnd


class AudioSink(Protocol):
    """Where passed-through audio goes (the egress's encoder thread)."""

    def audio_track(self, track: AudioTrack) -> None: ...

    def audio(self, pes: Pes) -> None: ...


class DecodeThread:
    """MPEG-TS bytes in, decoded frames to ``deliver``; audio PES packets to ``audio``."""

    def __init__(
        self, deliver: Callable[[Frame], None], audio: AudioSink, status: StreamStatus
    ) -> None:
        self._deliver = deliver
        self._audio = audio
        self._status = status
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._demuxer = TsDemuxer()
        self._decoder: VideoCodecContext | None = None
        self._decoder_codec: str | None = None
        self._track: AudioTrack | None = None
        self.frames = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="livediff-ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, item: Item) -> bool:
        """Queue an item without blocking; False when the thread is behind (try again)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug: say so; the stream then sees no input and times out
            logger.exception("the ingest thread failed")

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, StreamEnd):
                self._handle(self._demuxer.flush())
                self._drain_decoder()
                return
            if isinstance(item, SegmentEnd):
                self._handle(self._demuxer.flush())
            else:
                data, arrived = item
                self._handle(self._demuxer.feed(data, arrived))

    def _handle(self, packets: list[Pes]) -> None:
        video, audio = self._demuxer.video, self._demuxer.audio
        for pes in packets:
            if video is not None and pes.pid == video.pid:
                self._decode(pes, video.codec or "h264")
            elif audio is not None and pes.pid == audio.pid:
                self._pass_audio(pes)

    def _pass_audio(self, pes: Pes) -> None:
        audio = self._demuxer.audio
        if audio is None:
            return
        track = AudioTrack.from_input(audio, pes.stream_id)
        if track != self._track:
            self._track = track
            self._audio.audio_track(track)
        self._audio.audio(pes)

    def _decode(self, pes: Pes, codec: str) -> None:
        decoder = self._decoder_for(codec)
        packet = av.Packet(pes.data)
        packet.pts, packet.dts, packet.time_base = pes.pts, pes.dts, TS_TIME_BASE
        try:
            decoded = decoder.decode(packet)
        except av.error.FFmpegError as exc:
            self._failed(exc)
            return
        for frame in decoded:
            self._submit(frame, pes.arrived)

    def _decoder_for(self, codec: str) -> VideoCodecContext:
        if self._decoder is None or self._decoder_codec != codec:
            self._decoder = cast(VideoCodecContext, av.CodecContext.create(codec, "r"))
            self._decoder.thread_type = "SLICE"
            self._decoder_codec = codec
        return self._decoder

    def _drain_decoder(self) -> None:
        if self._decoder is None:
            return
        try:
            for frame in self._decoder.decode(None):
                self._submit(frame, now())
        except av.error.FFmpegError as exc:
            self._failed(exc)

    def _submit(self, frame: av.VideoFrame, arrived: float) -> None:
        if frame.pts is None:
            return
        self.frames += 1
        self._status.last_input_time = time.time()
        times = StageTimes(received=arrived)
        self._deliver(Frame(image=frame, pts=int(frame.pts), time_base=TS_TIME_BASE, times=times))

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            logger.warning("input frame did not decode (%d so far): %s", self.errors, exc)


class Ingest:
    """Reads the input channel until it ends and feeds the decoder thread."""

    def __init__(
        self,
        subscriber: TrickleSubscriber,
        session: Session,
        audio: AudioSink,
        status: StreamStatus,
        on_first_segment: Callable[[], None],
    ) -> None:
        self.subscriber = subscriber
        self.thread = DecodeThread(session.submit, audio, status)
        self._on_first_segment = on_first_segment
        self.segments = 0

    async def run(self) -> str:
        """Until the channel ends (or fails); returns why. The thread is ended on the way out."""
        self.thread.start()
        try:
            while (segment := await self.subscriber.next_segment()) is not None:
                await self._read(segment)
            return "the input channel ended"
        except TrickleError as exc:
            return f"the input channel failed: {exc}"
        finally:
            await self._stop()

    async def _read(self, segment: SubscribeSegment) -> None:
        try:
            async for chunk in segment.chunks():
                await self._put((chunk, now()))
        except TrickleError as exc:
            logger.warning("input segment %d broke off: %s", segment.seq, exc)
        await self._put(SegmentEnd())
        self.segments += 1
        if self.segments == 1:
            self._on_first_segment()

    async def _put(self, item: Item) -> None:
        while not self.thread.offer(item):
            if not self.thread.alive:
                return
            await asyncio.sleep(0.002)

    async def _stop(self) -> None:
        await self.subscriber.close()
        await self._put(StreamEnd())
        await asyncio.to_thread(self.thread.join)
