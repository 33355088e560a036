"""The stream switch every Livepeer door shares: a newer stream replaces the running one, in one
step, and the health go-livepeer reads follows it. Run on a real engine (passthrough)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from livediff.config import Settings
from livediff.engine import Engine
from livediff.livepeer.switch import StreamSwitch, SwitchStoppedError


class RecordingStream:
    """A test double of a door's stream: records why it was asked to stop, ends when told."""

    def __init__(self, stream_id: str) -> None:
        self.id = stream_id
        self.ended = asyncio.Event()
        self.stop_reasons: list[str] = []

    def stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)

    def end(self) -> None:
        self.ended.set()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    running = Engine(Settings(pipeline="passthrough", width=64, height=64))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_a_newer_stream_replaces_and_stops_the_running_one(engine: Engine) -> None:
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    assert switch.health() == "IDLE" and switch.current is None
    first, second = RecordingStream("a"), RecordingStream("b")
    assert switch.replace(first) is None
    assert switch.current is first and switch.health() == "OK"
    assert switch.replace(second) is first
    assert switch.current is second and switch.started == 2
    assert first.stop_reasons == ["stream b replaced it"] and second.stop_reasons == []


async def test_an_ended_stream_is_no_longer_current(engine: Engine) -> None:
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    stream = RecordingStream("a")
    switch.replace(stream)
    stream.end()
    assert switch.current is None and switch.health() == "IDLE"
    switch.release(stream)
    other = RecordingStream("b")
    switch.replace(other)
    switch.release(stream)  # a stale release leaves the newer stream alone
    assert switch.current is other


async def test_waiters_get_the_next_stream_and_learn_of_the_stop(engine: Engine) -> None:
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    waiter = asyncio.ensure_future(switch.next_current())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    stream = RecordingStream("a")
    switch.replace(stream)
    assert await asyncio.wait_for(waiter, 2) is stream

    stream.end()
    blocked = asyncio.ensure_future(switch.next_current())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(switch.stop("stopping"), 2)
    with pytest.raises(SwitchStoppedError):
        await asyncio.wait_for(blocked, 2)
    with pytest.raises(SwitchStoppedError):
        switch.replace(RecordingStream("late"))


async def test_stop_asks_the_current_stream_to_end_and_waits_for_it(engine: Engine) -> None:
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    stream = RecordingStream("a")
    switch.replace(stream)
    stopping = asyncio.ensure_future(switch.stop("the runner is stopping"))
    await asyncio.sleep(0.01)
    assert stream.stop_reasons == ["the runner is stopping"] and not stopping.done()
    stream.end()
    await asyncio.wait_for(stopping, 2)
    assert switch.stopped and switch.current is None


async def test_concurrent_replacements_leave_exactly_the_newest_current(engine: Engine) -> None:
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    streams = [RecordingStream(str(n)) for n in range(50)]

    async def replace(stream: RecordingStream) -> None:
        await asyncio.sleep(0)
        switch.replace(stream)

    await asyncio.gather(*(replace(stream) for stream in streams))
    current = switch.current
    assert current is not None and switch.started == len(streams)
    stopped = [stream for stream in streams if stream.stop_reasons]
    assert len(stopped) == len(streams) - 1 and current not in stopped
    assert all(len(stream.stop_reasons) == 1 for stream in stopped)


async def test_health_is_the_engines_while_it_is_not_ready() -> None:
    engine = Engine(Settings(pipeline="passthrough", width=64, height=64))
    switch: StreamSwitch[RecordingStream] = StreamSwitch(engine)
    switch.replace(RecordingStream("a"))
    assert switch.health() == engine.health() == "LOADING"
