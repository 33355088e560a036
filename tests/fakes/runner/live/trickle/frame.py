"""TEST DOUBLE of ``runner.live.trickle.frame`` (ai-runner v0.14.1).

Same names, constructor signatures and properties as the real frame types. The tensor is whatever
the caller gives (a ``torch.Tensor`` in practice). The real module imports av, numpy, PIL and
torch, so every process that can import a params class already has them loaded; this one imports
av and numpy too (what a params import may then find loaded) but never torch, so tests can tell
who imports it.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av  # noqa: F401 - loaded as by the real module (see above)
import numpy  # noqa: F401 - loaded as by the real module (see above)

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512


class SideData:
    """Per-frame extras the real runtime carries along (skipped frames, original input)."""

    skipped: bool = True
    input: Any = None


class InputFrame:
    """Base of the frames the runtime hands a pipeline."""

    timestamp: int
    time_base: Fraction
    log_timestamps: dict[str, float]
    side_data: SideData


class VideoFrame(InputFrame):
    """A decoded video frame: ``tensor`` is (1, H, W, 3) float32 in [0, 1]."""

    def __init__(
        self,
        tensor: Any,
        timestamp: int,
        time_base: Fraction,
        log_timestamps: dict[str, float] | None = None,
    ) -> None:
        self.tensor = tensor
        self.timestamp = timestamp
        self.time_base = time_base
        self.log_timestamps = {} if log_timestamps is None else log_timestamps
        self.side_data = SideData()

    def replace_tensor(self, tensor: Any) -> VideoFrame:
        """The same frame (timestamps, side data) with other pixels."""
        frame = VideoFrame(tensor, self.timestamp, self.time_base, self.log_timestamps)
        frame.side_data = self.side_data
        return frame


class OutputFrame:
    """Base of what a pipeline hands back."""

    is_loading_frame: bool = False


class VideoOutput(OutputFrame):
    """A processed frame for the stream ``request_id`` (frames of another id are dropped)."""

    def __init__(
        self, frame: VideoFrame, request_id: str = "", is_loading_frame: bool = False
    ) -> None:
        self.frame = frame
        self.request_id = request_id
        self.is_loading_frame = is_loading_frame

    def replace_tensor(self, tensor: Any) -> VideoOutput:
        return VideoOutput(
            self.frame.replace_tensor(tensor), self.request_id, self.is_loading_frame
        )

    @property
    def tensor(self) -> Any:
        return self.frame.tensor

    @property
    def timestamp(self) -> int:
        return self.frame.timestamp

    @property
    def time_base(self) -> Fraction:
        return self.frame.time_base

    @property
    def log_timestamps(self) -> dict[str, float]:
        return self.frame.log_timestamps
