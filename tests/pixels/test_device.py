"""Frames onto the device: yuv420p planes converted there, RGB arrays, tensors, resizing."""

from __future__ import annotations

import av
import numpy as np
import numpy.typing as npt
import pytest
import torch

from livediff.pixels import mark_ready, to_video_frame, wait_ready
from livediff.pixels.device import (
    DeviceConstants,
    FrameUploader,
    constant,
    copy_yuv420_planes,
    rgb_to_yuv420,
    to_output_images,
)

HEIGHT, WIDTH = 48, 64


def gradient() -> npt.NDArray[np.uint8]:
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    channels = [cols * 255 / WIDTH, rows * 255 / HEIGHT, (cols + rows) * 255 / (WIDTH + HEIGHT)]
    return np.stack(channels, -1).astype(np.uint8)


def as_rgb(uploaded: torch.Tensor) -> npt.NDArray[np.float32]:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return ((uploaded[0].permute(1, 2, 0) + 1) / 2).numpy()


@pytest.fixture
def upload() -> FrameUploader:
    return FrameUploader(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("pixel_format", ["yuv420p", "yuvj420p"])
def test_yuv_frames_convert_on_the_device_like_libswscale(
    upload: FrameUploader, pixel_format: str
) -> None:
    source = gradient()
    frame = av.VideoFrame.from_ndarray(source, format="rgb24").reformat(format=pixel_format)
    reference = frame.to_ndarray(format="rgb24").astype(np.float32) / 255
    ours = as_rgb(upload(frame, WIDTH, HEIGHT))
    assert ours.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(ours - reference).mean() < 0.01 and np.abs(ours - reference).max() < 0.04
    # and as close to the original RGB as libswscale gets
    assert np.abs(ours - source / 255).mean() < 0.01


def test_rgb_arrays_and_other_pixel_formats(upload: FrameUploader) -> None:
    source = gradient()
    np.testing.assert_allclose(as_rgb(upload(source, WIDTH, HEIGHT)), source / 255, atol=1e-6)
    bgr = av.VideoFrame.from_ndarray(source[:, :, ::-1].copy(), format="bgr24")
    np.testing.assert_allclose(as_rgb(upload(bgr, WIDTH, HEIGHT)), source / 255, atol=1e-6)


def test_tensors_are_used_where_they_are_and_resized_there(upload: FrameUploader) -> None:
    tensor = torch.rand(1, HEIGHT, WIDTH, 3)
    same = upload(tensor, WIDTH, HEIGHT)
    torch.testing.assert_close(same, tensor.permute(0, 3, 1, 2) * 2 - 1)
    resized = upload(tensor[0], 32, 64)  # (H, W, 3) works too
    assert resized.shape == (1, 3, 64, 32)
    assert float(resized.min()) >= -1.0 and float(resized.max()) <= 1.0


def test_outputs_follow_the_frame_contract_and_convert_once() -> None:
    decoded = torch.rand(2, 3, HEIGHT, WIDTH) * 2.4 - 1.2  # a little out of range
    images = to_output_images(decoded)
    assert [tuple(image.shape) for image in images] == [(1, HEIGHT, WIDTH, 3)] * 2
    assert all(float(i.min()) >= 0.0 and float(i.max()) <= 1.0 for i in images)
    frame = to_video_frame(images[1])
    expected = (images[1][0] * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(frame.to_ndarray(format="rgb24"), expected)


def test_outputs_become_yuv420p_on_the_device_like_libswscale() -> None:
    """What to_video_frame does with a CUDA output (checked here on the CPU)."""
    source = gradient()
    reference = av.VideoFrame.from_ndarray(source, format="rgb24").reformat(format="yuv420p")
    planes = rgb_to_yuv420(torch.from_numpy(source).float()[None] / 255)
    assert planes.dtype == torch.uint8 and tuple(planes.shape) == (HEIGHT * 3 // 2, WIDTH)
    difference = np.abs(planes.numpy().astype(int) - reference.to_ndarray().astype(int))
    assert difference.max() <= 1
    shown = av.VideoFrame.from_ndarray(planes.numpy(), format="yuv420p")
    back = shown.to_ndarray(format="rgb24").astype(int)
    assert np.abs(back - source).mean() < 2.5


@pytest.mark.parametrize("size", [(64, 48), (100, 50), (62, 30)])
def test_decoded_planes_are_copied_straight_into_the_staging_buffer(size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(width)
    source = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(source, format="rgb24").reformat(format="yuv420p")
    staged = np.zeros((height * 3 // 2, width), dtype=np.uint8)
    copy_yuv420_planes(frame, staged)  # rows padded by PyAV (line_size > width) are skipped
    assert np.array_equal(staged, frame.to_ndarray())


def test_constant_tensors_are_made_once_per_value_and_device() -> None:
    cache = DeviceConstants(capacity=3)
    cpu = torch.device("cpu")
    first = cache.get((1.0, 2.0), cpu, torch.float32)
    assert cache.get([1.0, 2.0], cpu, torch.float32) is first  # lists and tuples alike
    other = cache.get((1.0, 2.0), cpu, torch.float64)
    assert other is not first and other.dtype == torch.float64
    rows = cache.get([[0, 1], [2, 3]], cpu, torch.long)
    assert rows.tolist() == [[0, 1], [2, 3]] and cache.misses == 3
    cache.get((3.0,), cpu, torch.float32)  # a fourth: the least recently used goes
    assert cache.misses == 4
    assert cache.get((1.0, 2.0), cpu, torch.float64) is other and cache.misses == 4
    assert cache.get((1.0, 2.0), cpu, torch.float32) is not first and cache.misses == 5
    assert constant((1.0, 2.0), cpu, torch.float32) is constant((1.0, 2.0), cpu, torch.float32)


def test_hand_offs_of_host_images_need_no_event() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    assert mark_ready(frame) is None and mark_ready(torch.zeros(1, 4, 4, 3)) is None
    wait_ready(torch.zeros(1, 4, 4, 3), None)  # nothing to wait for on the CPU
