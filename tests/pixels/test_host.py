"""Image forms and their conversions."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import torch

from livediff.frames import Frame, image_size
from livediff.pixels import resize, to_rgb_array, to_video_frame


def test_numpy_images_resize_and_convert() -> None:
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, :, 0] = 200
    assert image_size(image) == (64, 48)
    resized = resize(image, 32, 24)
    assert isinstance(resized, np.ndarray) and resized.shape == (24, 32, 3)
    assert abs(int(resized[10, 10, 0]) - 200) <= 2
    video = to_video_frame(image)
    assert (video.width, video.height) == (64, 48)


def test_tensor_images_keep_their_form() -> None:
    tensor = torch.full((1, 48, 64, 3), 0.5)
    assert image_size(tensor) == (64, 48)
    resized = resize(tensor, 32, 16)
    assert isinstance(resized, torch.Tensor) and tuple(resized.shape) == (1, 16, 32, 3)
    rgb = to_rgb_array(torch.full((8, 8, 3), 2.0))  # out of range: clamped
    assert rgb.dtype == np.uint8 and int(rgb.max()) == 255


def test_video_frames_resize_without_changing_form() -> None:
    video = av.VideoFrame(64, 48, "yuv420p")
    resized = resize(video, 32, 24)
    assert isinstance(resized, av.VideoFrame) and (resized.width, resized.height) == (32, 24)
    assert resize(video, 64, 48) is video


def test_with_image_keeps_timing() -> None:
    frame = Frame(image=np.zeros((2, 2, 3), np.uint8), pts=90, time_base=Fraction(1, 90_000))
    frame.times.received = 1.5
    other = frame.with_image(np.ones((2, 2, 3), np.uint8))
    assert (other.pts, other.time_base, other.times.received) == (90, Fraction(1, 90_000), 1.5)
    other.times.sent = 2.0
    assert frame.times.sent == 0.0
    assert frame.seconds == 0.001
