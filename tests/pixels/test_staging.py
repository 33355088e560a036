"""The staging pool's rules, run on the CPU: a buffer carries one frame at a time.

The pool and the batch download path are the ones the GPU runs (:func:`queue_downloads` is
:func:`start_downloads` without the choice of CUDA outputs); here the buffers are plain host
memory and the copies' events are either :class:`HostEvent` (complete at once, as a CPU copy
is) or :class:`FakeDeviceEvent`, a double of a GPU whose copies stay queued until someone
waits for them, which is how a busy device looks to the host.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch

from livediff.frames import Image
from livediff.pixels.device import (
    MAX_IN_FLIGHT,
    CopyEvent,
    PinnedPool,
    queue_downloads,
    rgb_to_yuv420,
)


class FakeDevice:
    """A double of one CUDA stream as the host sees it: copies complete in the order they were
    queued, and only when the host waits for one of them (a device that never gets ahead of
    the host, the worst case for reuse)."""

    def __init__(self) -> None:
        self.queued = 0
        self.completed = 0
        self.waits = 0

    def event(self) -> FakeDeviceEvent:
        return FakeDeviceEvent(self)


class FakeDeviceEvent:
    """An event on a :class:`FakeDevice`: complete once the host waited for it or a later one
    (stream order), like ``torch.cuda.Event``; never recorded, it is complete."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.position = 0

    def record(self, stream: Any = None) -> None:
        self.device.queued += 1
        self.position = self.device.queued

    def query(self) -> bool:
        return self.position <= self.device.completed

    def synchronize(self) -> None:
        self.device.waits += 1
        self.device.completed = max(self.device.completed, self.position)


def cpu_pool(event: str, device: FakeDevice | None = None) -> PinnedPool:
    """A pool of host buffers whose copies' events are HostEvents or a fake device's."""
    if event == "host-event":
        return PinnedPool(4, device_type="cpu")
    return PinnedPool(4, device_type="cpu", new_event=(device or FakeDevice()).event)


EVENTS = ["host-event", "fake-device-event"]


def outputs(sizes: list[tuple[int, int]], seed: int) -> list[Image | None]:
    """One distinct float RGB output (1, H, W, 3) per session, at the given (width, height)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, height, width, 3, generator=generator) for width, height in sizes]


#: 13 sessions, three sizes interleaved: 10 outputs of one size, more than MAX_IN_FLIGHT.
SIZES = [(32, 16), (16, 8), (32, 16), (8, 8)] * 2 + [(32, 16)] * 6 + [(16, 8)]


@pytest.mark.parametrize("event", EVENTS)
def test_every_session_gets_its_own_pixels_however_many_outputs_share_a_size(
    event: str,
) -> None:
    assert SIZES.count((32, 16)) > MAX_IN_FLIGHT
    pool = cpu_pool(event)
    for seed in range(3):  # and again, with the buffers the batch before gave back
        images = outputs(SIZES, seed)
        frames = queue_downloads(images, list(range(len(images))), pool).finish()
        for image, frame in zip(images, frames, strict=True):
            assert isinstance(image, torch.Tensor) and frame is not None
            assert not isinstance(frame, torch.Tensor | np.ndarray)
            assert np.array_equal(frame.to_ndarray(), rgb_to_yuv420(image).numpy())
    shape = (16 * 3 // 2, 32)
    assert pool.buffers("download", shape) == SIZES.count((32, 16))  # one per output, reused


def test_only_chosen_outputs_are_downloaded() -> None:
    images = outputs([(16, 8), (16, 8)], seed=4)
    frames = queue_downloads(images, [1], cpu_pool("host-event")).finish()
    assert frames[0] is images[0]
    assert frames[1] is not None and not isinstance(frames[1], torch.Tensor | np.ndarray)


def test_a_leased_buffer_is_never_handed_out_even_when_its_copy_is_done() -> None:
    pool = cpu_pool("host-event")
    first = pool.take("download", (4, 4))
    second = pool.take("download", (4, 4))
    assert first.copied.query() and first.buffer.data_ptr() != second.buffer.data_ptr()
    first.release()
    again = pool.take("download", (4, 4))
    assert again is first  # given back and its copy complete: reused, the pool does not grow
    assert pool.buffers("download", (4, 4)) == 2


def test_a_buffer_is_refilled_only_after_its_last_copy() -> None:
    device = FakeDevice()
    pool = cpu_pool("fake-device-event", device)
    busy = []
    for _ in range(MAX_IN_FLIGHT):  # uploads: each given back as soon as its copy is queued
        lease = pool.take("upload", (4, 4))
        lease.copied.record()
        lease.release()
        busy.append(lease)
    assert not any(lease.copied.query() for lease in busy)
    reused = pool.take("upload", (4, 4))
    assert reused is busy[0]  # the oldest, after a wait for its copy: no ninth buffer
    assert device.waits == 1 and reused.copied.query() and not busy[1].copied.query()
    assert pool.buffers("upload", (4, 4)) == MAX_IN_FLIGHT


def test_downloads_never_finished_give_their_buffers_back_when_dropped() -> None:
    device = FakeDevice()
    pool = cpu_pool("fake-device-event", device)
    images = outputs([(8, 8)] * 3, seed=5)
    started = queue_downloads(images, [0, 1, 2], pool)
    leases = [lease for _, lease in started.pending]
    assert all(lease.leased for lease in leases)
    del started
    gc.collect()
    assert not any(lease.leased for lease in leases)
    newer = pool.take("download", (12, 8))
    assert newer not in leases  # given back, but their copies are still queued
    leases[-1].copied.synchronize()
    assert pool.take("download", (12, 8)) is leases[0]  # complete now: reused


def test_the_event_double_keeps_stream_order() -> None:
    device = FakeDevice()
    first: CopyEvent = device.event()
    second = device.event()
    assert first.query()  # never recorded: nothing to wait for
    first.record()
    second.record()
    assert not first.query() and not second.query()
    second.synchronize()
    assert first.query() and second.query()
