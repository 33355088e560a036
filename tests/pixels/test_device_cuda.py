"""The CUDA branches of the pixel room: pinned staging, stream adoption and hand-offs.

Marked ``gpu``: skipped (with the reason) where no CUDA device is present; on a GPU machine
``python -m pytest -m gpu`` runs them.
"""

from __future__ import annotations

import threading

import av
import numpy as np
import pytest
import torch

from livediff.frames import Image
from livediff.pixels import mark_ready, to_video_frame, wait_ready
from livediff.pixels.device import (
    MAX_IN_FLIGHT,
    DeviceConstants,
    FrameUploader,
    PinnedPool,
    download,
    pinned_scope,
    rgb_to_yuv420,
    start_downloads,
)

pytestmark = pytest.mark.gpu
SIZE = (96, 64)  # width, height


def camera() -> av.VideoFrame:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")


def test_uploads_through_pinned_staging_equal_the_cpu_path() -> None:
    frame = camera()
    on_cpu = FrameUploader(torch.device("cpu"), torch.float32)(frame, *SIZE)
    cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(cuda_stream), pinned_scope(4):
        on_gpu = FrameUploader(torch.device("cuda"), torch.float32)(frame, *SIZE)
        cuda_stream.synchronize()
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)


def test_a_staging_buffer_is_not_refilled_while_its_copy_is_queued() -> None:
    pool = PinnedPool(capacity=2)
    first = pool.take("upload", (4, 4))
    assert first.buffer.is_pinned()
    torch.cuda._sleep(100_000_000)  # keeps the device busy: the copy below stays queued
    first.buffer.fill_(7)
    on_device = torch.empty((4, 4), dtype=torch.uint8, device="cuda")
    on_device.copy_(first.buffer, non_blocking=True)
    first.copied.record()
    first.release()
    second = pool.take("upload", (4, 4))
    assert second is not first  # its copy is still queued: another buffer, no wait
    torch.cuda.current_stream().synchronize()
    second.release()
    assert pool.take("upload", (4, 4)) is first and first.copied.query()
    assert bool((on_device == 7).all())


def test_batch_downloads_lease_one_buffer_per_output_until_read() -> None:
    images: list[Image | None] = [
        torch.rand(1, 16, 32, 3, device="cuda") for _ in range(MAX_IN_FLIGHT + 3)
    ]
    with pinned_scope(2) as pool:
        started = start_downloads(images, [True] * len(images))
        assert pool.buffers("download", (24, 32)) == len(images)
        frames = started.finish()
    for image, frame in zip(images, frames, strict=True):
        assert isinstance(image, torch.Tensor) and isinstance(frame, av.VideoFrame)
        assert np.array_equal(frame.to_ndarray(), rgb_to_yuv420(image).cpu().numpy())


def test_constants_are_made_without_waiting_and_ordered_for_other_streams() -> None:
    device = torch.device("cuda")
    cache = DeviceConstants()
    cache.get((1.0,), device, torch.float32)  # the first pinned allocation may wait: not timed
    worker_cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(worker_cuda_stream):
        torch.cuda._sleep(50_000_000)  # the worker's CUDA stream is busy
        torch.cuda.set_sync_debug_mode("error")
        try:
            made = cache.get((0.25, 0.5), device, torch.float32)  # no wait for that work
        finally:
            torch.cuda.set_sync_debug_mode("default")
    read = cache.get((0.25, 0.5), device, torch.float32) * 2  # on the default CUDA stream
    assert read.tolist() == [0.5, 1.0] and cache.misses == 2 and made.is_cuda


def test_downloads_come_back_through_the_pinned_pool() -> None:
    pixels = torch.arange(48, dtype=torch.uint8, device="cuda").view(4, 4, 3)
    with pinned_scope(2):
        host = download(pixels)
        assert np.array_equal(host, pixels.cpu().numpy())


def test_a_tensor_from_another_stream_is_adopted_before_it_is_read() -> None:
    produced = torch.full((1, SIZE[1], SIZE[0], 3), 0.5, device="cuda")  # default stream
    worker_cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(worker_cuda_stream):
        uploaded = FrameUploader(torch.device("cuda"), torch.float32)(produced, *SIZE)
        worker_cuda_stream.synchronize()
    assert torch.allclose(uploaded.cpu(), torch.zeros_like(uploaded.cpu()), atol=1e-6)


def test_outputs_handed_to_another_thread_are_ordered_by_an_event() -> None:
    worker_cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(worker_cuda_stream):
        big = torch.rand(2048, 2048, device="cuda")
        image = (big @ big).clamp(0, 1)[:64, :96, None].expand(64, 96, 3)[None].contiguous()
        ready = mark_ready(image)
    assert ready is not None
    seen: list[torch.Tensor] = []

    def consume() -> None:  # another thread, its own (default) stream
        wait_ready(image, ready)
        seen.append(image.sum().cpu())

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(30)
    worker_cuda_stream.synchronize()
    assert torch.allclose(seen[0], image.sum().cpu())
    assert to_video_frame(image).format.name == "yuv420p"  # made on the device
