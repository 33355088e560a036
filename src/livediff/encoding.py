"""What every video encoder of livediff shares, with no transport in it (PyAV only).

- :class:`EncoderSettings`: bitrates, keyframe interval, preset and threads, from Settings;
- :class:`EncoderFrames`: a session's output adapter that makes yuv420p frames once, on the
  worker thread, for every encoder that takes them.

The WebRTC encoders (:mod:`livediff.media.codecs`) and the MPEG-TS encoder of the Livepeer faces
(:mod:`livediff.livepeer.ts_egress`) both build on these, so a Livepeer face never loads aiortc.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import av
from av.video.reformatter import VideoReformatter

from livediff.config import Settings
from livediff.frames import Image
from livediff.pixels import to_video_frame


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    bitrate_min: int
    bitrate_start: int
    bitrate_max: int
    keyframe_interval_s: float
    h264_preset: str
    threads: int
    #: The frame rate encoders plan their rate control and keyframe interval for.
    fps: int = 30

    @classmethod
    def from_settings(cls, settings: Settings) -> EncoderSettings:
        return cls(
            bitrate_min=settings.video_bitrate_min,
            bitrate_start=settings.video_bitrate_start,
            bitrate_max=settings.video_bitrate_max,
            keyframe_interval_s=settings.keyframe_interval_s,
            h264_preset=settings.h264_preset,
            threads=settings.encoder_threads,
            fps=settings.nominal_fps,
        )

    @property
    def gop_frames(self) -> int:
        return max(1, round(self.keyframe_interval_s * self.fps))

    def threads_for(self, width: int, height: int) -> int:
        if self.threads:
            return self.threads
        cpus = multiprocessing.cpu_count()
        pixels = width * height
        if pixels >= 1920 * 1080:
            return min(8, max(1, cpus // 2))
        if pixels > 640 * 480:  # two threads only where two cores are left for the rest
            return min(2, max(1, cpus // 2))
        return 1


class EncoderFrames:
    """A session's output adapter for WebRTC: yuv420p frames, made once on the worker thread.

    Every encoder of the session (the publisher's and each viewer's) then takes the frame as it
    is: the colour conversion is neither repeated per viewer nor run on the event loop.
    """

    #: CUDA outputs come back as yuv420p video frames with their batch (one wait for all).
    wants_video_frames = True

    def __init__(self) -> None:
        self._reformatter = VideoReformatter()  # used by the worker thread only

    def __call__(self, image: Image) -> av.VideoFrame:
        frame = to_video_frame(image)
        if frame.format.name == "yuv420p":
            return frame
        return self._reformatter.reformat(frame, format="yuv420p")
