"""Warm-up frames: what a (re)loaded model sees before a client's first frame.

The engine feeds them through the transform on the worker thread until one comes out, so that
compiling, autotuning and allocating happen at load. Each face makes them in the form its own
frames come in (:data:`WarmupImage`), so the first real frame takes a path that already ran.
"""

from __future__ import annotations

from collections.abc import Callable

import av
import numpy as np

from livediff.frames import Image, RgbArray

#: ``warmup_image(width, height, device)``: a warm-up frame in the form the face delivers.
WarmupImage = Callable[[int, int, str], Image]


def warmup_card(width: int, height: int) -> RgbArray:
    """An RGB uint8 warm-up image: colour gradients, so that no model sees a flat picture."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    columns = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    mix = np.array([1.0, 0.5, 0.0], dtype=np.float32)[None, None, :]
    card = rows * mix + columns * (1.0 - mix)
    return np.ascontiguousarray((card * 255).round().astype(np.uint8))


def warmup_video_frame(width: int, height: int, _device: str) -> av.VideoFrame:
    """The warm-up card as a yuv420p video frame (what the WebRTC face's decoders deliver)."""
    frame = av.VideoFrame.from_ndarray(warmup_card(width, height), format="rgb24")
    return frame.reformat(format="yuv420p")
