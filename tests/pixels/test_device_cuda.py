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

from livediff.pixels import mark_ready, to_video_frame, wait_ready
from livediff.pixels.device import FrameUploader, PinnedPool, download, pinned_scope

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
    first, first_copied = pool.take("upload", (4, 4))
    second, _ = pool.take("upload", (4, 4))
    assert first.data_ptr() != second.data_ptr()  # two in turn: one fills while one copies
    first_copied.record()
    again, _ = pool.take("upload", (4, 4))
    assert again.data_ptr() == first.data_ptr() and first_copied.query()


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
