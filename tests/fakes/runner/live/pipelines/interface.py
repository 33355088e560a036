"""TEST DOUBLE of ``runner.live.pipelines.interface`` (ai-runner v0.14.1): Pipeline, BaseParams."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, Field

from runner.live.trickle import DEFAULT_HEIGHT, DEFAULT_WIDTH, VideoFrame, VideoOutput


class BaseParams(BaseModel):
    """Params every live pipeline takes. Unknown keys are ignored (pydantic's default)."""

    width: int = Field(default=DEFAULT_WIDTH, ge=384, le=1024, multiple_of=64)
    height: int = Field(default=DEFAULT_HEIGHT, ge=384, le=1024, multiple_of=64)
    show_reloading_frame: bool = True

    def get_output_resolution(self) -> tuple[int, int]:
        """(width, height) of the frames the pipeline outputs."""
        return (self.width, self.height)


class Pipeline(ABC):
    """A live pipeline, built by the loader with no arguments."""

    def __init__(self) -> None:  # noqa: B027 - as in the real interface
        pass

    @abstractmethod
    async def initialize(self, **params: Any) -> None:
        """Load and warm up; the runtime reports LOADING until this returns."""

    @abstractmethod
    async def put_video_frame(self, frame: VideoFrame, request_id: str) -> None:
        """Take one input frame of the stream ``request_id``."""

    @abstractmethod
    async def get_processed_video_frame(self) -> VideoOutput:
        """The next processed frame."""

    @abstractmethod
    async def update_params(self, **params: Any) -> asyncio.Task[None] | None:
        """Apply a full params set; a Task means a slow reload the runtime waits for."""

    async def stop(self) -> None:  # noqa: B027 - optional hook, as in the real interface
        """Called once when the pipeline is no longer needed."""

    @classmethod
    @abstractmethod
    def prepare_models(cls) -> None:
        """Download and/or compile what the pipeline needs (PREPARE_MODELS=1)."""
