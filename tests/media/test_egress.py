"""The output track: only video frames with rising pts reach the encoder; the rest are counted."""

from __future__ import annotations

import asyncio

import av
import numpy as np

from livediff.engine import Metrics, Session, SessionStats
from livediff.frames import Frame
from livediff.media.egress import ProcessedVideoTrack
from livediff.transforms import TransformParams


def video(value: int) -> av.VideoFrame:
    pixels = np.full((16, 16, 3), value, dtype=np.uint8)
    return av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")


async def test_frames_that_are_not_video_or_do_not_advance_are_dropped_and_counted() -> None:
    metrics = Metrics()
    session = Session(
        "s", TransformParams(width=64, height=64), SessionStats(metrics, 5.0), error_limit=3
    )
    track = ProcessedVideoTrack(session, asyncio.get_running_loop())
    slot = session._outputs[0]
    received: list[int] = []

    async def read(count: int) -> None:
        for _ in range(count):
            received.append(int((await track.recv()).pts))

    reader = asyncio.ensure_future(read(2))
    for pts, image in [
        (1, video(10)),
        (1, video(20)),
        (2, np.zeros((16, 16, 3), np.uint8)),
        (3, video(30)),
    ]:
        slot.put(Frame(image=image, pts=pts))
        await asyncio.sleep(0.01)
    await asyncio.wait_for(reader, 5)
    track.stop()
    assert received == [1, 3]
    dropped = metrics.registry.get_sample_value
    assert dropped("livediff_frames_dropped_total", {"stage": "egress_pts"}) == 1
    assert dropped("livediff_frames_dropped_total", {"stage": "egress_not_video"}) == 1
    assert session.stats.frames_dropped == 2
