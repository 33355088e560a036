"""The one frame type: pixels + pts + time_base + the stage timestamps.

Pixels travel in whichever form their source produced, so that nothing is converted twice:
- ``av.VideoFrame`` (any pixel format; WebRTC ingest gives yuv420p),
- ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, RGB,
- ``torch.Tensor`` of shape (H, W, 3) or (1, H, W, 3), float in [0, 1], RGB, on any device
  (the ai-runner contract).

A transform reads the form it likes with the helpers of :mod:`livediff.pixels` and may return
any of them; the consumer of a session (WebRTC egress, ai-runner adapter) converts once, on the
worker thread, through its session's output adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, TypeAlias

import av
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

RgbArray: TypeAlias = npt.NDArray[np.uint8]
Image: TypeAlias = "av.VideoFrame | RgbArray | torch.Tensor"
#: What a consumer on another CUDA stream or thread waits for before reading a CUDA tensor image.
ReadyEvent: TypeAlias = "torch.cuda.Event"

#: RTP video clock: what aiortc's decoders stamp on frames.
VIDEO_TIME_BASE = Fraction(1, 90_000)


def now() -> float:
    """The clock every stage timestamp uses (monotonic seconds)."""
    return time.perf_counter()


@dataclass(slots=True)
class StageTimes:
    """When the frame passed each stage, in :func:`now` seconds; 0.0 = not yet."""

    received: float = 0.0
    queued: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    sent: float = 0.0


@dataclass(slots=True)
class Frame:
    """One video frame on its way through the engine."""

    image: Image
    pts: int
    time_base: Fraction = VIDEO_TIME_BASE
    times: StageTimes = field(default_factory=StageTimes)
    #: For a CUDA tensor image made on the worker's CUDA stream: the event a consumer on another
    #: CUDA stream or thread waits for before reading it (see livediff.pixels.device, rule 2).
    ready: ReadyEvent | None = None

    @property
    def seconds(self) -> float:
        """Presentation time in seconds."""
        return float(self.pts * self.time_base)

    def with_image(self, image: Image) -> Frame:
        """The same frame (pts, time_base, a copy of the stage times) carrying other pixels."""
        return Frame(image=image, pts=self.pts, time_base=self.time_base, times=replace(self.times))


def is_tensor(image: object) -> bool:
    """True for a ``torch.Tensor``, without importing torch."""
    return type(image).__module__.startswith("torch")


def image_size(image: Image) -> tuple[int, int]:
    """(width, height) of any supported image."""
    if isinstance(image, av.VideoFrame):
        return image.width, image.height
    shape = tuple(image.shape)
    if len(shape) == 4:
        shape = shape[1:]
    return int(shape[1]), int(shape[0])
