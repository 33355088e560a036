"""The output track: processed frames of one session, paced, with the input's pts."""

from __future__ import annotations

import asyncio

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from livediff.engine.session import Session
from livediff.engine.slot import AsyncSlot, SlotClosedError
from livediff.frames import Frame, now


class ProcessedVideoTrack(MediaStreamTrack):
    """Reads one subscription of a session's output; one instance per sender.

    The output is paced by the input: each processed frame goes to the encoder as soon as it is
    ready, carrying the input frame's pts and time_base, so the receiver plays it on the input's
    clock. The newest-wins slot means a consumer that fell behind gets the newest frame, never a
    backlog; a frame whose pts does not move forward is skipped (encoders need rising pts), and
    so is one that is not already a video frame (the session's adapter, :class:`EncoderFrames`,
    makes them on the worker thread: nothing is converted here, on the event loop). Both are
    counted as drops.
    """

    kind = "video"

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._session = session
        self._slot: AsyncSlot[Frame] = session.subscribe(loop)
        self._last_pts: int | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._next_frame()
        self._last_pts = frame.pts
        video = frame.image
        assert isinstance(video, av.VideoFrame)  # _next_frame lets only video frames through
        video.pts = frame.pts
        video.time_base = frame.time_base
        self._session.stats.on_sent(frame, now())
        return video

    async def _next_frame(self) -> Frame:
        while True:
            try:
                frame = await self._slot.get()
            except SlotClosedError:
                self.stop()
                raise MediaStreamError from None
            if self._last_pts is not None and frame.pts <= self._last_pts:
                self._session.stats.on_dropped("egress_pts")
            elif not isinstance(frame.image, av.VideoFrame):
                self._session.stats.on_dropped("egress_not_video")
            else:
                return frame

    def stop(self) -> None:
        super().stop()
        self._session.unsubscribe(self._slot)
