"""What the engine benchmarks the GPU run carries share (gpu_engine.py, video.py): light on
purpose, torch, PyAV and livediff only (the GPU machine gets no psutil or matplotlib)."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import av
import torch

from livediff.frames import Image
from livediff.pixels import to_video_frame

T = TypeVar("T")


class CaseFailedError(Exception):
    """A case that cannot finish; the message says why."""


class VideoFrames:
    """The WebRTC face's output adapter, without aiortc: outputs come back as video frames."""

    wants_video_frames = True

    def __call__(self, image: Image) -> av.VideoFrame:
        return to_video_frame(image)


async def all_or_first_failure(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, or the first failure with the other coroutines cancelled and finished."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return [task.result() for task in tasks]


def machine_info(device: str) -> dict[str, Any]:
    """The CPU, Python and torch of the run, and the GPU's name on a CUDA device."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
