"""Pixels: every conversion and copy of an image between its forms, in one room.

An image (:data:`livediff.frames.Image`) is an ``av.VideoFrame``, an RGB ``numpy`` array or a
float RGB ``torch.Tensor``. The helpers here read and convert any of them; nothing else in
livediff converts pixels. The host side (PyAV, numpy) is in this module and imports no torch;
the device side (pinned staging, uploads and downloads, YUV <-> RGB on the device) is
:mod:`livediff.pixels.device`, imported only when a tensor is at hand.

Conversions that copy or convert run on the worker thread, never on the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import av
import numpy as np

from livediff.frames import Image, ReadyEvent, RgbArray, image_size, is_tensor

__all__ = [
    "Downloads",
    "adopt",
    "finish_downloads",
    "fit_within",
    "mark_ready",
    "resize",
    "start_downloads",
    "to_rgb_array",
    "to_video_frame",
    "wait_ready",
]


def to_rgb_array(image: Image) -> RgbArray:
    """RGB uint8 (H, W, 3) on the host. Runs a colour conversion or a device copy: worker only."""
    if isinstance(image, av.VideoFrame):
        return cast(RgbArray, image.to_ndarray(format="rgb24"))
    if isinstance(image, np.ndarray):
        return image
    from livediff.pixels.device import tensor_to_rgb_array

    return tensor_to_rgb_array(image)


def to_video_frame(image: Image) -> av.VideoFrame:
    """An ``av.VideoFrame`` of the image; an existing one is returned as it is.

    A CUDA tensor of even size becomes yuv420p on the device (half the bytes to copy back, and
    no colour conversion left for the encoders' threads); other tensors become rgb24.
    """
    if isinstance(image, av.VideoFrame):
        return image
    if isinstance(image, np.ndarray):
        return av.VideoFrame.from_ndarray(image, format="rgb24")
    from livediff.pixels.device import tensor_to_video_frame

    return tensor_to_video_frame(image)


def resize(image: Image, width: int, height: int) -> Image:
    """The image at width x height, in its own form; unchanged when the size already fits."""
    if image_size(image) == (width, height):
        return image
    if isinstance(image, av.VideoFrame):
        return image.reformat(width=width, height=height)
    if isinstance(image, np.ndarray):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        resized = frame.reformat(width=width, height=height, format="rgb24")
        return cast(RgbArray, resized.to_ndarray())
    from livediff.pixels.device import resize_tensor  # a tensor: what is left of Image

    return resize_tensor(image, width, height)


def fit_within(image: Image, max_pixels: int) -> Image:
    """The image scaled down (aspect ratio kept, even sides, its own form and pixel format) to
    at most ``max_pixels`` pixels; unchanged when it has no more. Worker thread only."""
    width, height = image_size(image)
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    fitted_width = max(2, math.floor(width * scale / 2) * 2)
    fitted_height = max(2, math.floor(height * scale / 2) * 2)
    return resize(image, fitted_width, fitted_height)


def adopt(image: Image) -> None:
    """Rule 1 of :mod:`livediff.pixels.device`: a CUDA tensor made on another CUDA stream
    (ai-runner's input frames) becomes safe to read on this thread's, before *any* op reads it
    (a resize included); nothing to do for other images. Worker thread only."""
    if isinstance(image, av.VideoFrame | np.ndarray):
        return
    from livediff.pixels.device import adopt as adopt_tensor

    if image.is_cuda:
        adopt_tensor(image)


def mark_ready(image: Image) -> ReadyEvent | None:
    """The event a consumer on another CUDA stream waits for before reading ``image`` (a CUDA
    tensor made on this thread's CUDA stream); None for other images (see pixels.device, rule
    2)."""
    if not is_tensor(image):
        return None
    from livediff.pixels.device import mark_ready as mark_tensor_ready

    return mark_tensor_ready(image)


def wait_ready(image: Image, ready: ReadyEvent | None) -> None:
    """Order this thread's CUDA stream after ``ready`` before it reads ``image`` (rule 2)."""
    if ready is None or not is_tensor(image):
        return
    from livediff.pixels.device import wait_ready as wait_tensor_ready

    wait_tensor_ready(image, ready)


class Downloads(Protocol):
    """A batch's outputs on their way back to the host (:func:`start_downloads`)."""

    def finish(self) -> list[Image | None]:
        """The outputs, once they are on the host (one wait, when anything was on a device)."""
        ...


@dataclass(frozen=True, slots=True)
class HostImages:
    """Outputs that need no download (no tensor among them): :meth:`finish` gives them back."""

    images: list[Image | None]

    def finish(self) -> list[Image | None]:
        return self.images


def start_downloads(images: Sequence[Image | None], wanted: Sequence[bool]) -> Downloads:
    """Worker thread, after a batch: queue the copies back of the outputs that will be encoded
    (``wanted``) and are CUDA tensors; nothing waits yet. Pass the result to
    :func:`finish_downloads`, which waits once for the lot."""
    if not any(is_tensor(image) for image in images):
        return HostImages(list(images))
    from livediff.pixels.device import start_downloads as start_tensor_downloads

    return start_tensor_downloads(list(images), list(wanted))  # a device.BatchDownloads


def finish_downloads(started: Downloads) -> list[Image | None]:
    """The batch's outputs, the downloaded ones as yuv420p video frames, after one wait for the
    device (when anything is on it)."""
    return started.finish()
