"""Two batches in flight: the worker launches batch N+1 before it lands N, and nothing changes
for the sessions but the overlap.

The frames here feed themselves: the test transform submits each session's next frame from
inside ``process`` (on the worker thread), so the next batch is ready whenever the worker looks
for it and no frame is ever replaced; what the sessions get is then fixed by their frames alone,
and a run with one batch in flight and one with two can be compared output for output.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
import torch

from livediff.config import Settings
from livediff.engine import Engine, Metrics, Session, SessionStats, Worker, WorkerState
from livediff.engine import worker as worker_module
from livediff.engine.worker import WorkerFaultError, batches_in_flight_for
from livediff.frames import Frame, Image
from livediff.pixels import Downloads, finish_downloads
from livediff.pixels.device import BatchDownloads, PinnedPool, queue_downloads, rgb_to_yuv420
from livediff.testing.models import ModelFolders, tiny_options, write_model_folder
from livediff.transforms.base import AnyTransform, Job, Transform, TransformParams
from livediff.transforms.diffusion.transform import DiffusionTransform

SIZE = 64
#: (tag, frame index) of each output of a batch, as the events record them.
Frames = list[tuple[int, int]]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def picture(tag: int, index: int) -> np.ndarray:
    """An input frame that says whose it is (green) and which it is (red)."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 0], image[..., 1] = index, tag
    return image


def decoded(image: Any) -> tuple[int, int, int]:
    """(tag, frame index, the session's frames processed before it) from an output."""
    pixel = torch.as_tensor(image).reshape(-1, 3)[0] * 255
    index, count, tag = (round(float(value)) for value in pixel)
    return tag, index, count


def frame_of(image: Any) -> tuple[int, int]:
    """(tag, frame index) of an input frame (a :func:`picture`; the warm-up's is (0, 0))."""
    return int(image[0, 0, 1]), int(image[0, 0, 0])


class Feeder:
    """Submits a session's next frame as soon as the transform has taken its last one."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._sessions: dict[str, tuple[Session, int]] = {}
        self._sent: dict[str, int] = {}
        self.paused = threading.Event()

    def add(self, session: Session, tag: int) -> None:
        self._sessions[session.id] = (session, tag)
        self._sent[session.id] = 0

    def start(self) -> None:
        for session_id in self._sessions:
            self._submit(session_id)

    def fed(self, jobs: Sequence[FlightJob]) -> None:
        """After ``process`` took ``jobs``: their sessions' next frames (worker thread)."""
        for job in jobs:
            if job.session_id in self._sessions and not self.paused.is_set():
                self._submit(job.session_id)

    def _submit(self, session_id: str) -> None:
        session, tag = self._sessions[session_id]
        index = self._sent[session_id]
        if index < self.frames:
            self._sent[session_id] = index + 1
            session.submit(Frame(image=picture(tag, index), pts=index * 3000))


@dataclass
class Counter:
    """A session's state: its frames processed so far, kept where the outputs are made."""

    count: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


class FlightParams(TransformParams):
    model: str = "a"
    tint: int = 0


FlightJob = Job[FlightParams, Counter, None]


class CountingTransform(Transform[FlightParams, Counter, None]):
    """Each output says its frame, its session and the frames its session had before; records
    every launch in ``events`` (the tests' ``finish_downloads`` records every landing)."""

    name = "counting"
    params_model = FlightParams

    def __init__(self, settings: Settings | None = None, feeder: Feeder | None = None) -> None:
        super().__init__(settings or Settings())
        self.feeder = feeder
        self.events: list[tuple[str, Any]] = []
        self.jobs: list[tuple[str, FlightParams, str]] = []  # (session, params, model loaded)
        self.loaded = "a"
        self.fail_frame: tuple[int, BaseException] | None = None
        self.during_process: Callable[[Sequence[FlightJob]], None] | None = None
        self.during_stage: Callable[[Sequence[FlightJob]], None] | None = None
        self.delay_s = 0.0

    def open_session(self, params: FlightParams) -> Counter:
        return Counter()

    def close_session(self, state: Counter) -> None:
        self.events.append(("close", state))

    def requires_reload(self, old: FlightParams, new: FlightParams) -> bool:
        return old.model != new.model

    def reload(self, params: FlightParams) -> None:
        self.events.append(("reload", params.model))
        self.loaded = params.model

    def stage(self, jobs: Sequence[FlightJob]) -> None:
        if self.during_stage is not None:
            self.during_stage(jobs)

    def process(self, jobs: Sequence[FlightJob]) -> list[Image | None]:
        frames = [frame_of(job.frame.image) for job in jobs]
        self.events.append(("process", frames))
        if self.during_process is not None:
            self.during_process(jobs)
        time.sleep(self.delay_s)
        outputs: list[Image | None] = []
        for job, (tag, index) in zip(jobs, frames, strict=True):
            if self.fail_frame is not None and self.fail_frame[0] == index:
                raise self.fail_frame[1]
            self.jobs.append((job.session_id, job.params, self.loaded))
            outputs.append(self._output(job, tag, index))
        if self.feeder is not None:
            self.feeder.fed(jobs)
        return outputs

    def _output(self, job: Job[FlightParams, Counter, None], tag: int, index: int) -> Image:
        params, state = job.params, job.state
        output = torch.zeros((1, params.height, params.width, 3))
        output[..., 0], output[..., 1], output[..., 2] = index, state.count, tag
        state.count = state.count + 1
        return output / 255


@pytest.fixture
def landings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The worker's ``finish_downloads``, recording each landing's frames in the list (which a
    test hands to its transform as its ``events``, so both go in one order)."""
    events: list[tuple[str, Any]] = []
    finish = finish_downloads

    def recording(started: Downloads) -> list[Image | None]:
        images = finish(started)
        events.append(("finish", [decoded(image)[:2] for image in images if image is not None]))
        return images

    monkeypatch.setattr(worker_module, "finish_downloads", recording)  # the worker's own name
    return events


class Recorder:
    """An output adapter that keeps what each output says, on the worker thread, as delivered
    (where no consumer's slot can replace it). It asks for video frames, so the worker adapts
    the outputs as it delivers them; on the CPU nothing is downloaded: it gets the tensors."""

    wants_video_frames = True

    def __init__(self) -> None:
        self.outputs: list[tuple[int, int, int]] = []

    def __call__(self, image: Image) -> Image:
        self.outputs.append(decoded(image))
        return image


def attach(
    worker: Worker,
    tag: int,
    width: int = SIZE,
    height: int = SIZE,
    adapt_output: Callable[[Image], Image] | None = None,
) -> Session:
    """A session of ``width`` x ``height`` frames attached to ``worker``; its outputs go to
    ``adapt_output`` (default: a new :class:`Recorder`)."""
    session = Session(
        f"s{tag}",
        FlightParams(width=width, height=height),
        SessionStats(Metrics(), 5.0),
        error_limit=5,
        on_input=worker.notify,
        adapt_output=adapt_output or Recorder(),
    )
    worker.attach(session).result(10)
    return session


def outputs_of(session: Session) -> list[tuple[int, int, int]]:
    recorder = session.adapt_output
    assert isinstance(recorder, Recorder)
    return recorder.outputs


@pytest.fixture
def running() -> Iterator[Callable[..., Worker]]:
    """Factory: a started worker on a transform, stopped after the test."""
    started: list[Worker] = []

    def start(transform: AnyTransform, in_flight: int, max_batch: int = 4) -> Worker:
        made = Worker(transform, Metrics(), max_batch=max_batch, batches_in_flight=in_flight)
        made.start().result(10)
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()


SIZES = [(64, 64), (96, 64), (64, 128)]


def serve_sessions(start: Callable[..., Worker], in_flight: int, frames: int) -> list[list[Any]]:
    feeder = Feeder(frames)
    worker = start(CountingTransform(feeder=feeder), in_flight, max_batch=2)
    sessions = [attach(worker, tag, *size) for tag, size in enumerate(SIZES, 1)]
    for tag, session in enumerate(sessions, 1):
        feeder.add(session, tag)
    feeder.start()
    wait_for(lambda: all(len(outputs_of(session)) == frames for session in sessions))
    return [outputs_of(session) for session in sessions]


def test_every_session_gets_its_own_outputs_in_order_as_with_one_in_flight(
    running: Callable[..., Worker],
) -> None:
    one = serve_sessions(running, 1, frames=8)
    two = serve_sessions(running, 2, frames=8)
    assert two == one
    for tag, outputs in enumerate(two, 1):
        assert outputs == [(tag, index, index) for index in range(8)]


def launch_order(events: list[tuple[str, Any]]) -> list[str]:
    """``p3``: frame 3 launched; ``f3``: landed; ``f-``: a landing with no output (it failed)."""
    return [
        f"{kind[0]}{frames[0][1] if frames else '-'}"
        for kind, frames in events
        if kind in ("process", "finish")
    ]


@pytest.mark.parametrize(
    ("in_flight", "order"),
    [
        (1, ["p0", "f0", "p1", "f1", "p2", "f2", "p3", "f3"]),
        (2, ["p0", "p1", "f0", "p2", "f1", "p3", "f2", "f3"]),
    ],
)
def test_the_next_batch_is_launched_before_the_last_one_lands(
    running: Callable[..., Worker],
    landings: list[tuple[str, Any]],
    in_flight: int,
    order: list[str],
) -> None:
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    worker = running(transform, in_flight)
    held: list[int] = []
    transform.during_process = lambda _jobs: held.append(len(worker.activity.batch))  # type: ignore[union-attr]
    session = attach(worker, 1)
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: len(outputs_of(session)) == 4)
    assert launch_order(landings) == order
    # the watchdog's activity holds every job not delivered yet: with two in flight, the
    # launching batch's and the one before's
    assert held == ([1, 1, 1, 1] if in_flight == 1 else [1, 2, 2, 2])
    assert worker.slowest_batch_s > 0


def test_an_output_handed_on_as_a_tensor_is_adapted_before_the_next_batch_launches(
    running: Callable[..., Worker], landings: list[tuple[str, Any]]
) -> None:
    """Its ready event (and its adapter's device work) then comes before the next batch's
    work in the worker's CUDA stream: its consumer does not wait for N+1."""
    feeder = Feeder(3)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    worker = running(transform, 2)

    def adapt(image: Image) -> Image:
        landings.append(("adapt", [decoded(image)[:2]]))
        return image

    session = attach(worker, 1, adapt_output=adapt)
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: session.stats.frames_processed == 3)
    order = [f"{kind[0]}{frames[0][1]}" for kind, frames in landings]
    assert order == ["p0", "a0", "p1", "a1", "f0", "p2", "a2", "f1", "f2"]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_reload_between_taking_a_frame_and_launching_it_applies_to_it(
    running: Callable[..., Worker], landings: list[tuple[str, Any]], in_flight: int
) -> None:
    """The call comes as frame 1 is staged (taken with model a): it runs once frame 0 landed,
    and frame 1 runs on model b's params and model b."""
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    worker = running(transform, in_flight)
    session = attach(worker, 1)
    calls: list[Future[None]] = []

    def reload_to_b() -> None:
        params = FlightParams.model_validate({**session.params.model_dump(), "model": "b"})
        transform.reload(params)
        session.set_params(params)

    def call_once(_jobs: Sequence[FlightJob]) -> None:
        if not calls:
            calls.append(worker.call(reload_to_b))

    transform.during_stage = call_once
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: len(outputs_of(session)) == 4)
    calls[0].result(10)
    assert launch_order(landings)[:3] == ["p0", "f0", "p1"]
    reloads = [at for at, event in enumerate(landings) if event[0] == "reload"]
    assert [landings[at] for at in reloads] == [("reload", "b")]
    assert landings[reloads[0] - 1 : reloads[0] + 2 : 2] == [  # between f0 and p1
        ("finish", [(1, 0)]),
        ("process", [(1, 1)]),
    ]
    assert [(params.model, loaded) for _, params, loaded in transform.jobs] == [
        ("a", "a"),
        *[("b", "b")] * 3,
    ]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_session_detached_while_its_frame_is_staged_drops_it_counted(
    running: Callable[..., Worker], landings: list[tuple[str, Any]], in_flight: int
) -> None:
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    worker = running(transform, in_flight)
    leaving, staying = attach(worker, 1), attach(worker, 2)
    detached: list[Future[None]] = []

    def detach_once(jobs: Sequence[FlightJob]) -> None:
        if not detached and any(job.session_id == leaving.id for job in jobs):
            detached.append(worker.detach(leaving))

    transform.during_stage = detach_once
    for tag, session in ((1, leaving), (2, staying)):
        feeder.add(session, tag)
    feeder.start()
    wait_for(lambda: len(outputs_of(staying)) == 4)
    detached[0].result(10)
    assert [index for _, index, _ in outputs_of(leaving)] == [0]  # frame 1 was staged
    assert leaving.stats.frames_dropped == 1 and leaving.stats.frames_in == 2
    launched, landed = launched_and_landed(landings, len(landings))
    assert (1, 1) not in launched and launched == landed


def test_the_setting_is_two_in_flight_on_cuda_and_one_elsewhere() -> None:
    assert batches_in_flight_for(0, "cuda") == batches_in_flight_for(0, "cuda:1") == 2
    assert batches_in_flight_for(0, "cpu") == 1
    assert batches_in_flight_for(2, "cpu") == 2 and batches_in_flight_for(1, "cuda") == 1
    assert Worker(CountingTransform(Settings(batches_in_flight=2)), Metrics(), max_batch=1)
    with pytest.raises(ValueError, match="batches_in_flight"):
        Settings(batches_in_flight=3)


def test_a_frame_failing_in_the_next_batch_leaves_the_one_in_flight_delivered(
    running: Callable[..., Worker], landings: list[tuple[str, Any]]
) -> None:
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    transform.fail_frame = (2, ValueError("frame 2 is broken"))
    worker = running(transform, 2)
    session = attach(worker, 1)
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: len(outputs_of(session)) == 3)  # the failed frame never fed the next one
    # 1 was in flight as 2 failed, and landed before it
    assert launch_order(landings) == ["p0", "p1", "f0", "p2", "f1", "f-"]
    # frame 2 shows frame 1's output again, counted as an error
    assert outputs_of(session) == [(1, 0, 0), (1, 1, 1), (1, 1, 1)]
    assert session.stats.errors == 1 and session.stats.frames_processed == 3


def test_a_worker_fault_delivers_the_batch_in_flight_and_fails_the_next(
    landings: list[tuple[str, Any]],
) -> None:
    faults: list[BaseException] = []
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    transform.fail_frame = (2, MemoryError("out of device memory"))
    worker = Worker(transform, Metrics(), max_batch=4, batches_in_flight=2, on_fault=faults.append)
    worker.start().result(10)
    session = attach(worker, 1)
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: bool(faults))
    worker.stop()
    assert worker.state is WorkerState.STOPPED and worker.fault is not None
    assert worker.fault.kind == "out_of_memory"
    assert launch_order(landings) == ["p0", "p1", "f0", "p2", "f1"]  # 1 landed after the fault
    assert outputs_of(session) == [(1, 0, 0), (1, 1, 1), (1, 1, 1)]  # 2 failed: 1's again
    assert session.stats.errors == 1


def test_a_landing_that_fails_before_a_call_fails_the_call_and_counts_every_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frame 1 is staged and a call waits when frame 0's landing raises (a device error): the
    worker ends, frame 0 fails, frame 1 is counted as dropped, and the call fails (nobody waits
    for it forever)."""

    def broken(_started: Downloads) -> list[Image | None]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(worker_module, "finish_downloads", broken)
    faults: list[BaseException] = []
    feeder = Feeder(4)
    transform = CountingTransform(feeder=feeder)
    worker = Worker(transform, Metrics(), max_batch=4, batches_in_flight=2, on_fault=faults.append)
    worker.start().result(10)
    session = attach(worker, 1)
    calls: list[Future[None]] = []

    def call_once(_jobs: Sequence[FlightJob]) -> None:
        if not calls:
            calls.append(worker.call(lambda: None))

    transform.during_stage = call_once
    feeder.add(session, 1)
    feeder.start()
    wait_for(lambda: bool(faults))
    worker.stop()
    with pytest.raises(WorkerFaultError, match="device lost"):
        calls[0].result(10)
    assert [frame for frame, _ in transform.events if frame == "process"] == ["process"]
    assert len(outputs_of(session)) == 1  # frame 0 failed: its input shown instead
    assert session.stats.errors == 1 and session.stats.frames_dropped == 1
    assert session.stats.frames_in == 2


def test_stop_delivers_the_batches_in_flight(
    running: Callable[..., Worker], landings: list[tuple[str, Any]]
) -> None:
    feeder = Feeder(10_000)
    transform = CountingTransform(feeder=feeder)
    transform.events = landings
    worker = running(transform, 2)
    sessions = [attach(worker, tag) for tag in (1, 2)]
    for tag, session in enumerate(sessions, 1):
        feeder.add(session, tag)
    feeder.start()
    wait_for(lambda: all(len(outputs_of(session)) > 5 for session in sessions))
    stopping = threading.Thread(target=worker.stop, args=(10.0,))
    stopping.start()
    stopping.join(15)
    assert not stopping.is_alive() and worker.state is WorkerState.STOPPED
    launched = [frame for kind, frames in landings if kind == "process" for frame in frames]
    landed = [frame for kind, frames in landings if kind == "finish" for frame in frames]
    assert landed == launched
    for tag, session in enumerate(sessions, 1):
        assert [output[1] for output in outputs_of(session)] == [
            index for owner, index in launched if owner == tag
        ]


class VideoRecorder(Recorder):
    """Takes its outputs as yuv420p video frames (downloads go through pinned buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.planes: list[np.ndarray] = []

    def __call__(self, image: Image) -> Image:
        assert isinstance(image, av.VideoFrame)
        self.planes.append(image.to_ndarray())
        return image


def test_download_buffers_of_a_batch_in_flight_are_never_lent_to_the_next(
    running: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads through a host pool with the device's leasing rules: two batches outstanding
    hold distinct buffers, and every output reads the pixels its own frame made."""
    pool = PinnedPool(8, device_type="cpu")
    outstanding: list[BatchDownloads] = []
    most_outstanding = 0
    expected: list[np.ndarray] = []

    def start(images: list[Image | None], wanted: list[bool]) -> Downloads:
        nonlocal most_outstanding
        expected.extend(rgb_to_yuv420(image).numpy() for image in images)  # type: ignore[arg-type]
        started = queue_downloads(images, list(range(len(images))), pool)
        held = {id(lease.buffer) for other in outstanding for _, lease in other.pending}
        assert not held & {id(lease.buffer) for _, lease in started.pending}
        outstanding.append(started)
        most_outstanding = max(most_outstanding, len(outstanding))
        return started

    def finish(started: Downloads) -> list[Image | None]:
        assert isinstance(started, BatchDownloads)
        outstanding.remove(started)
        return started.finish()

    monkeypatch.setattr(worker_module, "start_downloads", start)
    monkeypatch.setattr(worker_module, "finish_downloads", finish)
    feeder = Feeder(6)
    worker = running(CountingTransform(feeder=feeder), 2)
    session = attach(worker, 1, adapt_output=VideoRecorder())
    feeder.add(session, 1)
    feeder.start()
    recorder = session.adapt_output
    assert isinstance(recorder, VideoRecorder)
    wait_for(lambda: len(recorder.planes) == 6)
    assert most_outstanding == 2
    for got, wanted in zip(recorder.planes, expected, strict=True):
        assert np.array_equal(got, wanted)


# -- the real engine: params, reloads and closes between batches in flight ---------------------
def numpy_card(width: int, height: int, _device: str) -> Image:
    return np.zeros((height, width, 3), dtype=np.uint8)


async def flight_engine(feeder: Feeder, **overrides: Any) -> Engine:
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1, batches_in_flight=2)
    settings = settings.model_copy(update=overrides)
    transform = CountingTransform(settings, feeder)
    transform.delay_s = 0.002
    engine = Engine(settings, transform, warmup_image=numpy_card)
    await engine.start()
    return engine


async def open_fed(engine: Engine, feeder: Feeder, tags: Sequence[int]) -> list[Session]:
    sessions = await asyncio.gather(
        *(engine.open_session(FlightParams(width=SIZE, height=SIZE)) for _ in tags)
    )
    for tag, session in zip(tags, sessions, strict=True):
        feeder.add(session, tag)
    feeder.start()
    return list(sessions)


def launched_and_landed(events: list[tuple[str, Any]], until: int) -> tuple[Frames, Frames]:
    """The sessions' frames launched and landed before ``events[until]`` (the warm-up's, tag 0,
    never land: warm-up calls ``process`` itself)."""
    launched = [f for kind, frames in events[:until] if kind == "process" for f in frames]
    landed = [f for kind, frames in events[:until] if kind == "finish" for f in frames]
    return [frame for frame in launched if frame[0] != 0], landed


def more_frames(session: Session, count: int) -> Callable[[], bool]:
    """A condition: ``count`` more of the session's frames processed than now."""
    target = session.stats.frames_processed + count
    return lambda: session.stats.frames_processed >= target


async def wait_async(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_reload_waits_until_no_batch_is_in_flight(
    landings: list[tuple[str, Any]],
) -> None:
    feeder = Feeder(10_000)
    engine = await flight_engine(feeder)
    transform = engine.transform
    assert isinstance(transform, CountingTransform)
    transform.events = landings
    try:
        [session] = await open_fed(engine, feeder, [1])
        await wait_async(lambda: session.stats.frames_processed > 5)
        for model in ("b", "c", "b"):
            await engine.update_params(session.id, {"model": model})
            await wait_async(more_frames(session, 3))
    finally:
        await engine.stop()
    reloads = [at for at, (kind, _) in enumerate(landings) if kind == "reload"]
    assert len(reloads) == 3
    for at in reloads:  # everything launched before the reload had landed
        launched, landed = launched_and_landed(landings, at)
        assert launched == landed
    served = [
        (params.model, loaded) for owner, params, loaded in transform.jobs if owner != "warm-up"
    ]
    assert all(model == loaded for model, loaded in served)  # no frame ran on another model


async def test_params_and_closes_from_concurrent_requests_with_batches_in_flight(
    landings: list[tuple[str, Any]],
) -> None:
    feeder = Feeder(10_000)
    engine = await flight_engine(feeder, max_batch=4)
    transform = engine.transform
    assert isinstance(transform, CountingTransform)
    transform.events = landings
    try:
        sessions = await open_fed(engine, feeder, [1, 2, 3, 4])
        await wait_async(lambda: all(s.stats.frames_processed > 3 for s in sessions))
        for tint in range(1, 4):
            await asyncio.gather(*(engine.update_params(s.id, {"tint": tint}) for s in sessions))
        closing, staying = sessions[:2], sessions[2:]
        states = [session.transform_state for session in closing]
        await asyncio.gather(*(engine.close_session(s.id, "left") for s in closing))
        done = [s.stats.frames_processed for s in staying]
        await wait_async(
            lambda: all(
                s.stats.frames_processed > n + 3 for s, n in zip(staying, done, strict=True)
            )
        )
    finally:
        await engine.stop()
    tints: dict[str, list[int]] = {}
    for owner, params, _ in transform.jobs:
        tints.setdefault(owner, []).append(params.tint)
    for session in sessions:
        assert tints[session.id] == sorted(tints[session.id])  # never an older params
    for session in staying:
        assert tints[session.id][-1] == 3
    closed = [
        at for at, (kind, state) in enumerate(landings) if kind == "close" and state in states
    ]
    assert len(closed) == 2
    for at in closed:  # closed with none of its frames in flight, and none launched after
        launched, landed = launched_and_landed(landings, at)
        assert launched == landed
    before = len(launched_and_landed(landings, max(closed))[0])
    later = launched_and_landed(landings, len(landings))[0][before:]
    assert later and not {tag for tag, _ in later} & {1, 2}


# -- the diffusion transform: a session's frames in flight together ---------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


async def diffusion_outputs(folders: ModelFolders, in_flight: int) -> list[list[np.ndarray]]:
    """Two sessions of the tiny diffusion model, 2 steps, 6 frames each, on the engine (the
    first frame of each gives no output: its second step is still to run)."""
    settings = Settings(**{**tiny_options(folders, SIZE), "batches_in_flight": in_flight})
    feeder = Feeder(6)
    transform = DiffusionTransform(settings)
    process = transform.process

    taken: list[str] = []

    def fed_process(jobs: Sequence[Any]) -> list[Image | None]:
        outputs = process(jobs)
        taken.extend(job.session_id for job in jobs)
        feeder.fed(jobs)
        return outputs

    transform.process = fed_process  # type: ignore[method-assign]
    engine = Engine(settings, transform, warmup_image=numpy_card)
    await engine.start()
    kept: list[list[np.ndarray]] = [[], []]
    try:
        sessions = []
        for tag in (1, 2):
            params = engine.validate({"t_index_list": [20, 35], "seed": tag})
            adapt = keeper(kept[tag - 1])
            sessions.append(await engine.open_session(params, adapt_output=adapt))
            feeder.add(sessions[-1], tag)
        hold = threading.Event()
        holding = engine.worker.call(hold.wait)  # both first frames wait for the same batch
        feeder.start()
        hold.set()
        await asyncio.wrap_future(holding)
        await wait_async(lambda: all(taken.count(s.id) == 6 for s in sessions), timeout=120)
    finally:
        await engine.stop()  # it delivers what is in flight
    return kept


def keeper(into: list[np.ndarray]) -> Callable[[Image], Image]:
    def keep(image: Image) -> Image:
        assert isinstance(image, torch.Tensor)
        into.append(image.numpy().copy())
        return image

    return keep


async def test_the_diffusion_transform_gives_the_same_frames_with_two_in_flight(
    tiny_model: ModelFolders,
) -> None:
    one = await diffusion_outputs(tiny_model, 1)
    two = await diffusion_outputs(tiny_model, 2)
    for first, second in zip(one, two, strict=True):
        assert len(first) == len(second) == 5
        for a, b in zip(first, second, strict=True):
            assert np.array_equal(a, b)
    assert not np.array_equal(one[0][-1], one[1][-1])  # the sessions' frames differ


async def test_sessions_fed_at_their_own_pace_get_their_own_frames_in_order() -> None:
    """Four sessions of three sizes, each fed by its own task faster than the worker serves
    them (so frames are replaced): every output is its session's, in order, with the state its
    frames before it left, and every frame that came is processed or counted as dropped."""
    engine = await flight_engine(Feeder(0), max_batch=3)
    sizes = [(64, 64), (96, 64), (64, 128), (64, 64)]
    try:
        sessions = [
            await engine.open_session(FlightParams(width=w, height=h), adapt_output=Recorder())
            for w, h in sizes
        ]

        async def feed(tag: int, session: Session) -> None:
            for index in range(40):
                session.submit(Frame(image=picture(tag, index), pts=index * 3000))
                await asyncio.sleep(0.001 * tag)

        await asyncio.gather(*(feed(tag, s) for tag, s in enumerate(sessions, 1)))
        await wait_async(
            lambda: all(
                s.stats.frames_in == s.stats.frames_processed + s.stats.frames_dropped
                for s in sessions
            )
        )
    finally:
        await engine.stop()
    for tag, session in enumerate(sessions, 1):
        outputs = outputs_of(session)
        indices = [index for _, index, _ in outputs]
        assert len(outputs) == session.stats.frames_processed > 1
        assert {owner for owner, _, _ in outputs} == {tag}
        assert indices == sorted(set(indices)) and indices[-1] == 39  # the newest always comes
        assert [count for _, _, count in outputs] == list(range(len(outputs)))
