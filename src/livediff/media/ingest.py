"""Ingest: decoded frames from a remote track into a session's newest-wins input slot.

aiortc's remote track queue is unbounded. The pump below takes every decoded frame as soon as
aiortc's decoder thread posts it and offers it to the session's size-1 slot, so frames can only
wait in one place, and a slow worker sheds frames there (counted) instead of queueing them.
"""

from __future__ import annotations

import logging

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from livediff.engine.session import Session
from livediff.frames import VIDEO_TIME_BASE, Frame, StageTimes, now

logger = logging.getLogger(__name__)


async def pump_video(track: MediaStreamTrack, session: Session) -> None:
    """Move decoded frames from ``track`` into ``session`` until the track ends."""
    while session.end_reason is None:
        try:
            decoded = await track.recv()
        except MediaStreamError:
            logger.debug("session %s: video track ended", session.id)
            return
        if not isinstance(decoded, av.VideoFrame):
            session.stats.on_dropped("ingest_not_video")
            continue
        frame = Frame(
            image=decoded,
            pts=int(decoded.pts or 0),
            time_base=decoded.time_base or VIDEO_TIME_BASE,
            times=StageTimes(received=now()),
        )
        session.submit(frame)
