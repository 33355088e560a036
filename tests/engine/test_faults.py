"""The engine under faults: a worker that dies or runs out of memory is rebuilt and its sessions
get frames again; a rebuild that fails ends them with the reason; slow and failing frames and
input that changes form keep a session going."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from fractions import Fraction

import av
import numpy as np
import pytest

from livediff.config import Settings
from livediff.engine import Engine, EngineUnavailableError, Session
from livediff.engine.worker import is_out_of_memory
from livediff.frames import Frame, Image, image_size
from livediff.transforms import TransformParams
from tests.server.faulty import Fault, FaultyTransform
from tests.server.streaming import wait_until

SIZE = 64
TIME_BASE = Fraction(1, 90_000)


@pytest.fixture(autouse=True)
def fresh_commands() -> Iterator[None]:
    FaultyTransform.reset()
    yield
    FaultyTransform.reset()


def sample(engine: Engine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"{name} {labels} is not in the metrics"
    return value


@asynccontextmanager
async def running_engine(**overrides: int) -> AsyncIterator[Engine]:
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1).model_copy(update=overrides)
    engine = Engine(settings, FaultyTransform(settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


class Feed:
    """Submits a frame to a session every 10 ms and counts what comes out."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.outputs: list[Frame] = []

    async def run(self, images: list[Image]) -> None:
        index = 0
        while self.session.end_reason is None:
            image = images[index % len(images)]
            self.session.submit(Frame(image=image, pts=index * 300, time_base=TIME_BASE))
            index += 1
            await asyncio.sleep(0.01)

    async def collect(self) -> None:
        slot = self.session.subscribe(asyncio.get_running_loop())
        try:
            while True:
                self.outputs.append(await slot.get())
        finally:
            self.session.unsubscribe(slot)

    async def more(self, count: int, timeout: float = 20) -> None:
        """Wait until ``count`` more outputs came."""
        target = len(self.outputs) + count
        await wait_until(lambda: len(self.outputs) >= target, timeout=timeout)


@asynccontextmanager
async def fed(
    engine: Engine, images: list[Image] | None = None, *, close_when_ended: bool = False
) -> AsyncIterator[Feed]:
    """A session fed and collected; with ``close_when_ended``, closed when it ends itself (as a
    face does), so that nothing waits for it after an exit."""
    closing: list[asyncio.Task[bool]] = []

    def ended(reason: str) -> None:
        closing.append(asyncio.ensure_future(engine.close_session(session.id, reason)))

    session = await engine.open_session(
        TransformParams(width=SIZE, height=SIZE), on_end=ended if close_when_ended else None
    )
    feed = Feed(session)
    pictures = images or [np.full((SIZE, SIZE, 3), 90, dtype=np.uint8)]
    tasks = [asyncio.ensure_future(feed.run(pictures)), asyncio.ensure_future(feed.collect())]
    try:
        yield feed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *closing, return_exceptions=True)


@pytest.mark.parametrize("fault", ["cuda_oom", "oom", "die"])
async def test_a_dead_worker_is_rebuilt_and_its_session_gets_frames_again(fault: Fault) -> None:
    async with running_engine() as engine, fed(engine) as feed:
        transform = engine.transform
        assert isinstance(transform, FaultyTransform)
        first_worker = engine.worker
        await feed.more(5)
        FaultyTransform.reload_gate.clear()
        FaultyTransform.arm(fault)
        await wait_until(lambda: engine.worker is not first_worker)
        assert engine.health() == "ERROR"
        with pytest.raises(EngineUnavailableError, match="restarting"):
            engine.check_can_open()
        FaultyTransform.reload_gate.set()
        await wait_until(lambda: engine.health() == "OK")
        await feed.more(10)
        assert engine.worker.attached == (feed.session,)
        assert (transform.loads, transform.closes) == (2, 1)
        kind = "worker_died" if fault == "die" else "out_of_memory"
        assert sample(engine, "livediff_errors_total", kind=kind) == 1
        assert feed.session.end_reason is None


async def test_a_rebuild_that_fails_ends_the_sessions_with_the_reason() -> None:
    async with running_engine() as engine, fed(engine) as feed:
        await feed.more(3)
        FaultyTransform.fail_reloads = True
        FaultyTransform.arm("oom")
        await wait_until(lambda: feed.session.end_reason is not None)
        assert "could not restart" in str(feed.session.end_reason)
        assert "weights are gone" in str(feed.session.end_reason)
        assert engine.health() == "ERROR"
        with pytest.raises(EngineUnavailableError, match="could not be restarted"):
            engine.check_can_open()
        assert sample(engine, "livediff_errors_total", kind="worker_restart_failed") == 1


async def test_restarts_beyond_the_budget_end_the_sessions() -> None:
    async with running_engine(worker_restarts=1) as engine, fed(engine) as feed:
        await feed.more(3)
        FaultyTransform.arm("die")
        await wait_until(
            lambda: (
                engine.health() == "OK" and sample(engine, "livediff_worker_restarts_total") == 1
            )
        )
        await feed.more(3)
        FaultyTransform.arm("die")
        await wait_until(lambda: feed.session.end_reason is not None)
        assert "not restarted again" in str(feed.session.end_reason)
        assert engine.health() == "ERROR"


async def test_a_slow_frame_and_a_failing_burst_keep_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    FaultyTransform.sleep_s = 0.3
    async with running_engine(transform_error_limit=10) as engine, fed(engine) as feed:
        await feed.more(3)
        with caplog.at_level(logging.INFO, logger="livediff.engine.session"):
            FaultyTransform.arm("sleep")
            FaultyTransform.arm("raise", frames=4)
            await feed.more(10)
            FaultyTransform.arm("raise", frames=3)
            await feed.more(10)
        assert feed.session.end_reason is None and feed.session.stats.errors == 7
        assert feed.session.stats.frames_dropped > 0  # frames shed while the slow one ran
        assert engine.health() == "OK"
    failed = [r for r in caplog.records if "transform failed" in r.getMessage()]
    recovered = [r for r in caplog.records if "recovered after" in r.getMessage()]
    assert len(failed) == 2 and len(recovered) == 2  # once per burst, not once per frame
    assert {getattr(r, "session_id", None) for r in failed} == {feed.session.id}
    FaultyTransform.sleep_s = 0.5


def video(width: int, height: int, pixel_format: str) -> av.VideoFrame:
    rgb = np.random.default_rng(width).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pixel_format)


async def test_input_changing_size_and_pixel_format_keeps_flowing() -> None:
    """What a decoder switch looks like to the engine: frames of another size and format
    (H.264 decoders give yuvj420p, hardware ones nv12), and one larger than the limit."""
    images: list[Image] = [
        video(160, 120, "yuv420p"),
        video(320, 240, "yuvj420p"),
        video(96, 64, "nv12"),
        np.zeros((50, 70, 3), dtype=np.uint8),
        video(1280, 720, "yuv420p"),
    ]
    async with running_engine(max_input_pixels=320 * 240) as engine, fed(engine, images) as feed:
        await feed.more(25)
        assert feed.session.stats.errors == 0
        assert {image_size(output.image) for output in feed.outputs} == {(SIZE, SIZE)}
        assert sample(engine, "livediff_input_downscaled_total") > 0


def test_out_of_memory_is_recognised_without_importing_torch_names() -> None:
    import torch

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
