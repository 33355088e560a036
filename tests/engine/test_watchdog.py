"""The watchdog (issue 19): a transform call that does not return in time is a hang. The worker
stuck in it is abandoned (counted); on the CPU a new worker on a new transform instance serves
the sessions again, on a device (or past the restart budget) the sessions are told and the
process exits for its supervisor. Slow loads and calls are not hangs; nothing waits for the
stuck thread at shutdown, and every test releases it as it ends."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import Any

import pytest

from livediff.config import Settings
from livediff.engine import Engine, EngineUnavailableError
from livediff.engine.recovery import HANG_EXIT_STATUS, HangLimits
from livediff.engine.worker import Activity, WorkerHungError
from tests.engine.test_faults import Feed, sample
from tests.engine.test_faults import fed as fed_session
from tests.server.faulty import AcceleratorTransform, FaultyTransform
from tests.server.streaming import wait_until

SIZE = 64
TIME_BASE = Fraction(1, 90_000)
#: The batch limits these tests run under: short, so that a hang is seen in half a second.
LIMIT_S = 0.5
FAST = {"batch_timeout_first_s": LIMIT_S, "batch_timeout_min_s": LIMIT_S}


@pytest.fixture(autouse=True)
def fresh_commands() -> Iterator[None]:
    FaultyTransform.reset()
    yield
    FaultyTransform.reset()  # releases every blocked call: no thread outlives the test


class Exits:
    """Stands in for ``os._exit``: records the statuses asked for."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def __call__(self, status: int) -> None:
        self.statuses.append(status)


@asynccontextmanager
async def running_engine(
    transform: type[FaultyTransform] = FaultyTransform,
    exits: Exits | None = None,
    **overrides: Any,
) -> AsyncIterator[Engine]:
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1).model_copy(update=overrides)
    engine = Engine(settings, transform(settings), exit_process=exits or Exits())
    try:
        await engine.start()
        yield engine
    finally:
        await engine.stop()


@asynccontextmanager
async def fed(engine: Engine) -> AsyncIterator[Feed]:
    """A session fed and collected, closed when it ends itself (as a face does), so that an
    exit does not wait for it."""
    async with fed_session(engine, close_when_ended=True) as feed:
        yield feed


async def hang_now() -> float:
    """Make the next batch block; returns when it began blocking (monotonic time)."""
    FaultyTransform.arm("hang")
    await wait_until(lambda: FaultyTransform.hung == 1, interval=0.005)
    return time.monotonic()


async def test_a_hung_batch_is_abandoned_and_a_new_worker_serves_the_session() -> None:
    async with running_engine(**FAST) as engine, fed(engine) as feed:
        first_worker, first_transform = engine.worker, engine.transform
        assert isinstance(first_transform, FaultyTransform)
        await feed.more(5)
        FaultyTransform.reload_gate.clear()  # hold the new instance's load, to see ERROR
        began = await hang_now()
        await wait_until(lambda: engine.health() == "ERROR", interval=0.005)
        noticed = time.monotonic() - began  # began: a little after the batch did
        assert LIMIT_S - 0.1 <= noticed < LIMIT_S + 1.0, noticed  # the limit, plus a look
        assert first_worker.stuck and not first_worker.alive
        with pytest.raises(EngineUnavailableError, match=r"TransformHungError.*restarting"):
            engine.check_can_open()
        FaultyTransform.reload_gate.set()
        await wait_until(lambda: engine.health() == "OK")
        await feed.more(10)  # frames again, from the new worker on a new transform
        assert engine.worker is not first_worker and engine.transform is not first_transform
        assert engine.worker.attached == (feed.session,)
        assert feed.session.end_reason is None
        assert feed.session.stats.errors == 1  # the stuck frame failed, as a frame that raised
        assert sample(engine, "livediff_workers_abandoned_total") == 1
        assert sample(engine, "livediff_errors_total", kind="worker_hung") == 1
        assert sample(engine, "livediff_worker_restarts_total") == 1
        FaultyTransform.reset()  # the stuck call returns: its thread ends, closing its own
        await wait_until(lambda: not first_worker.stuck)
        assert first_transform.closes == 1 and engine.transform.closes == 0
        await feed.more(5)  # and delivered nothing that disturbs the new worker


async def test_a_hung_call_fails_its_caller_and_the_engine_recovers() -> None:
    release = threading.Event()
    async with running_engine(load_timeout_s=LIMIT_S) as engine:
        first_worker = engine.worker
        try:
            with pytest.raises(EngineUnavailableError, match="load_timeout_s"):
                await engine.on_worker(lambda: release.wait(30))
        finally:
            release.set()
        await wait_until(lambda: engine.health() == "IDLE" and engine.worker is not first_worker)
        assert sample(engine, "livediff_workers_abandoned_total") == 1
        await wait_until(lambda: not first_worker.stuck)
        assert await engine.on_worker(lambda: "served") == "served"


async def test_a_session_closed_during_a_hang_closes_once_the_worker_is_abandoned() -> None:
    async with running_engine(**FAST) as engine, fed(engine) as feed:
        await feed.more(3)
        await hang_now()
        assert await engine.close_session(feed.session.id, "the client left")
        assert engine.sessions == {} and feed.session.end_reason == "the client left"
        await wait_until(lambda: engine.health() == "IDLE")
        assert engine.worker.attached == ()


async def test_slow_loads_and_calls_are_not_hangs() -> None:
    """Loads and calls (which may reload a model) have their own, larger limit."""

    class SlowLoad(FaultyTransform):
        def load(self) -> None:
            time.sleep(2 * LIMIT_S)

    async with running_engine(SlowLoad, **FAST) as engine:
        await engine.on_worker(lambda: time.sleep(2 * LIMIT_S))
        assert engine.health() == "IDLE"
        assert sample(engine, "livediff_workers_abandoned_total") == 0


async def test_a_load_past_its_limit_fails_the_start_and_a_new_instance_loads() -> None:
    release = threading.Event()
    built: list[FaultyTransform] = []

    class FirstLoadHangs(FaultyTransform):
        def __init__(self, settings: Settings) -> None:
            super().__init__(settings)
            built.append(self)

        def load(self) -> None:
            if len(built) == 1:
                release.wait(30)

    try:
        with pytest.raises(WorkerHungError, match="load has run for"):
            async with running_engine(FirstLoadHangs, load_timeout_s=LIMIT_S):
                pass
        assert len(built) == 2  # the recovery started on a new instance before the stop
    finally:
        release.set()


@pytest.mark.parametrize(
    ("transform", "restarts", "why"),
    [(AcceleratorTransform, 3, "runs on mps"), (FaultyTransform, 0, "restarted 0 times")],
)
async def test_a_hang_that_cannot_be_recovered_here_ends_the_sessions_and_exits(
    transform: type[FaultyTransform], restarts: int, why: str
) -> None:
    exits = Exits()
    async with (
        running_engine(transform, exits, worker_restarts=restarts, **FAST) as engine,
        fed(engine) as feed,
    ):
        first_worker = engine.worker
        await feed.more(3)
        await hang_now()
        await wait_until(lambda: exits.statuses, timeout=10)
        assert exits.statuses == [HANG_EXIT_STATUS]
        reason = str(feed.session.end_reason)
        assert why in reason and f"exits (status {HANG_EXIT_STATUS})" in reason
        assert "batch has run for" in reason
        assert engine.sessions == {}  # told and closed before the exit
        assert engine.health() == "ERROR" and engine.worker is first_worker
        assert sample(engine, "livediff_workers_abandoned_total") == 1


async def test_stopping_does_not_wait_for_a_stuck_thread() -> None:
    async with running_engine(**FAST) as engine, fed(engine) as feed:
        await feed.more(3)
        first_worker = engine.worker
        await hang_now()
        await wait_until(lambda: engine.health() == "OK" and engine.worker is not first_worker)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0  # stop() did not wait for the stuck thread
    assert first_worker.stuck
    FaultyTransform.reset()
    await wait_until(lambda: not first_worker.stuck)


def activity(kind: str = "batch", *, novel: bool = False) -> Activity:
    return Activity(kind, time.monotonic(), novel)  # type: ignore[arg-type]


def test_the_limits_follow_the_slowest_batch_with_a_floor() -> None:
    limits = HangLimits(factor=10, floor_s=10, first_s=600, load_s=3600)
    assert limits.limit(activity("load"), 0.0) == (3600, "load_timeout_s")
    assert limits.limit(activity("call"), 5.0) == (3600, "load_timeout_s")
    assert limits.limit(activity(novel=True), 5.0) == (600, "batch_timeout_first_s")
    assert limits.limit(activity(), 0.0) == (600, "batch_timeout_first_s")  # none timed yet
    assert limits.limit(activity(), 0.05) == (10, "batch_timeout_min_s")
    found = limits.limit(activity(), 2.5)
    assert found is not None and found[0] == 25 and "slowest batch, 2.5 s" in found[1]
    assert limits.interval_s == 1.0


def test_zero_turns_a_limit_off() -> None:
    limits = HangLimits(factor=0, floor_s=10, first_s=0, load_s=0)
    assert limits.limit(activity("load"), 0.0) is None
    assert limits.limit(activity(novel=True), 1.0) is None
    assert limits.limit(activity(), 1.0) is None
    fast = HangLimits(factor=10, floor_s=0.2, first_s=0.5, load_s=0)
    assert fast.interval_s == pytest.approx(0.02)
