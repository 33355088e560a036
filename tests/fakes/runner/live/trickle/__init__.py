"""TEST DOUBLE of ``runner.live.trickle`` (ai-runner v0.14.1): the frame types only."""

from runner.live.trickle.frame import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    InputFrame,
    OutputFrame,
    SideData,
    VideoFrame,
    VideoOutput,
)

__all__ = [
    "DEFAULT_HEIGHT",
    "DEFAULT_WIDTH",
    "InputFrame",
    "OutputFrame",
    "SideData",
    "VideoFrame",
    "VideoOutput",
]
