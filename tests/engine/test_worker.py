"""The worker thread: batches across sessions, isolates failures, keeps pts, runs calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import pytest

from livediff.config import Settings
from livediff.engine import Metrics, Session, SessionStats, Worker, WorkerState
from livediff.frames import Frame, Image
from livediff.transforms.base import Job, Transform, TransformParams
from livediff.transforms.passthrough import PassthroughParams, PassthroughTransform

SIZE = 64


def rgb(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, dtype=np.uint8)


class RecordingTransform(Transform):
    """Adds 1 to every pixel; raises for frames whose first pixel is 13; records batches."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(Settings())
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.batches.append([job.session_id for job in jobs])
        outputs: list[Image | None] = []
        for job in jobs:
            pixels = job.frame.image
            assert isinstance(pixels, np.ndarray)
            if pixels[0, 0, 0] == 13:
                raise ValueError("unlucky frame")
            outputs.append(pixels + 1)
        return outputs


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def transform() -> RecordingTransform:
    return RecordingTransform()


@pytest.fixture
def worker(transform: RecordingTransform, metrics: Metrics) -> Iterator[Worker]:
    running = Worker(transform, metrics, max_batch=4)
    running.start().result(10)
    yield running
    running.stop()


def make_session(name: str, worker: Worker, metrics: Metrics, error_limit: int = 5) -> Session:
    session = Session(
        name,
        TransformParams(width=SIZE, height=SIZE),
        SessionStats(metrics, 5.0),
        error_limit=error_limit,
        on_input=worker.notify,
    )
    worker.attach(session).result(10)
    return session


def frame(value: int, pts: int) -> Frame:
    return Frame(image=rgb(value), pts=pts, time_base=Fraction(1, 90_000))


async def next_output(session: Session, slot_timeout: float = 10.0) -> Frame:
    slot = session.subscribe(asyncio.get_running_loop())
    try:
        return await asyncio.wait_for(slot.get(), slot_timeout)
    finally:
        session.unsubscribe(slot)


async def test_output_keeps_pts_time_base_and_stage_times(worker: Worker, metrics: Metrics) -> None:
    session = make_session("a", worker, metrics)
    slot = session.subscribe(asyncio.get_running_loop())
    session.submit(frame(5, pts=4321))
    out = await asyncio.wait_for(slot.get(), 10)
    assert out.pts == 4321
    assert out.time_base == Fraction(1, 90_000)
    assert isinstance(out.image, np.ndarray) and out.image[0, 0, 0] == 6
    times = out.times
    assert 0 < times.received <= times.queued <= times.started <= times.finished


async def test_frames_of_several_sessions_run_in_one_batch(
    worker: Worker, transform: RecordingTransform, metrics: Metrics
) -> None:
    sessions = [make_session(name, worker, metrics) for name in "abc"]
    slots = [s.subscribe(asyncio.get_running_loop()) for s in sessions]
    transform.gate.clear()  # hold the worker so that all three frames wait together
    sessions[0].submit(frame(1, 0))
    await asyncio.sleep(0.05)  # the worker is now blocked inside process() with session a
    for session in sessions:
        session.submit(frame(2, 3000))
    transform.gate.set()
    for slot in slots:
        await asyncio.wait_for(slot.get(), 10)
    assert sorted(transform.batches[-1]) == ["a", "b", "c"]
    assert transform.threads == {"livediff-worker"}


async def test_a_slow_worker_sheds_frames_newest_wins(
    worker: Worker, transform: RecordingTransform, metrics: Metrics
) -> None:
    session = make_session("a", worker, metrics)
    slot = session.subscribe(asyncio.get_running_loop())
    transform.gate.clear()
    session.submit(frame(1, 0))
    await asyncio.sleep(0.05)
    for pts in range(1, 6):
        session.submit(frame(1, pts * 3000))
    transform.gate.set()
    while (await asyncio.wait_for(slot.get(), 10)).pts != 5 * 3000:
        pass
    assert session.stats.frames_processed == 2  # the first frame and the newest one
    assert session.input.dropped == 4
    assert session.stats.frames_dropped >= 4


async def test_a_failing_frame_shows_the_last_good_one_and_spares_other_sessions(
    worker: Worker, transform: RecordingTransform, metrics: Metrics
) -> None:
    good, bad = make_session("good", worker, metrics), make_session("bad", worker, metrics)
    bad_slot = bad.subscribe(asyncio.get_running_loop())
    good_slot = good.subscribe(asyncio.get_running_loop())
    bad.submit(frame(40, 0))
    first = await asyncio.wait_for(bad_slot.get(), 10)
    transform.gate.clear()
    bad.submit(frame(13, 3000))
    good.submit(frame(20, 3000))
    transform.gate.set()
    fallback = await asyncio.wait_for(bad_slot.get(), 10)
    other = await asyncio.wait_for(good_slot.get(), 10)
    assert fallback.pts == 3000 and fallback.image is first.image
    assert isinstance(other.image, np.ndarray) and other.image[0, 0, 0] == 21
    assert bad.stats.errors == 1 and good.stats.errors == 0
    assert bad.end_reason is None


async def test_a_session_ends_after_too_many_failures_in_a_row(
    worker: Worker, metrics: Metrics
) -> None:
    ended = asyncio.Event()
    reasons: list[str] = []
    loop = asyncio.get_running_loop()
    session = make_session("a", worker, metrics, error_limit=3)

    def on_end(reason: str) -> None:
        reasons.append(reason)
        loop.call_soon_threadsafe(ended.set)

    session.on_end = on_end
    for pts in range(3):
        session.submit(frame(13, pts))
        await asyncio.sleep(0.05)
    await asyncio.wait_for(ended.wait(), 10)
    assert "3 frames in a row" in reasons[0] and "unlucky frame" in reasons[0]
    assert session.input.put(frame(1, 99)) is False


async def test_detach_releases_the_session(worker: Worker, metrics: Metrics) -> None:
    session = make_session("a", worker, metrics)
    worker.detach(session).result(10)
    session.submit(frame(1, 0))
    await asyncio.sleep(0.1)
    assert session.stats.frames_processed == 0


def test_call_runs_on_the_worker_thread(worker: Worker) -> None:
    name = worker.call(lambda: threading.current_thread().name).result(10)
    assert name == "livediff-worker"


def test_a_transform_that_fails_to_load_puts_the_worker_in_error(metrics: Metrics) -> None:
    class Broken(PassthroughTransform):
        def load(self) -> None:
            raise RuntimeError("no weights")

    broken = Worker(Broken(Settings()), metrics, max_batch=1)
    with pytest.raises(RuntimeError, match="no weights"):
        broken.start().result(10)
    assert broken.state is WorkerState.ERROR
    assert broken.call(lambda: None).exception(10) is not None


async def test_passthrough_resizes_to_the_session_size(metrics: Metrics) -> None:
    running = Worker(PassthroughTransform(Settings()), metrics, max_batch=2)
    running.start().result(10)
    try:
        session = Session(
            "a",
            PassthroughParams(width=96, height=72),
            SessionStats(metrics, 5.0),
            error_limit=3,
            on_input=running.notify,
        )
        running.attach(session).result(10)
        slot = session.subscribe(asyncio.get_running_loop())
        session.submit(frame(100, 0))
        out = await asyncio.wait_for(slot.get(), 10)
        assert isinstance(out.image, np.ndarray) and out.image.shape == (72, 96, 3)
    finally:
        running.stop()


class StagingTransform(RecordingTransform):
    """Records when each job was staged: the batch in flight at that moment."""

    name = "staging"

    def __init__(self) -> None:
        super().__init__()
        self.staged_during: list[tuple[str, object]] = []

    def stage(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            job.staged = len(self.staged_during)  # jobs already in process (the last computing)

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        self.staged_during.extend((job.session_id, job.staged) for job in jobs)
        return super().process(jobs)


async def test_the_next_batch_is_staged_while_the_current_one_computes(metrics: Metrics) -> None:
    transform = StagingTransform()
    running = Worker(transform, metrics, max_batch=4)
    running.start().result(10)
    try:
        session = make_session("a", running, metrics)
        slot = session.subscribe(asyncio.get_running_loop())
        transform.gate.clear()
        session.submit(frame(1, 0))
        while not transform.staged_during:  # until batch 1 is computing (held in process)
            await asyncio.sleep(0.01)
        session.submit(frame(2, 3000))  # waits; taken and staged when batch 1 is done computing
        transform.gate.set()
        async with asyncio.timeout(10):
            while len(transform.staged_during) < 2:
                await asyncio.sleep(0.01)
            newest = await slot.get()  # newest wins: the second frame's output
    finally:
        running.stop()
    assert newest.pts == 3000
    assert transform.staged_during == [("a", None), ("a", 1)]  # staged during batch 1
