"""Reserved Livepeer sessions and the work tied to them: the orchestrator's list is authoritative,
an O2R reservation newer than the list survives it, and a release closes all of a session's work
once, also when many releases and ties race."""

from __future__ import annotations

import asyncio
import time

import pytest

from livediff.engine import TaskSet
from livediff.livepeer.live_runner.reservations import NotReservedError, Reservations


class ClosedWork:
    """Records the reasons the work it stands for was closed with."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def close(self, reason: str) -> None:
        self.reasons.append(reason)


async def test_release_closes_everything_tied_to_the_session() -> None:
    tasks = TaskSet("test")
    reservations = Reservations(tasks)
    reservations.reserve("s1")
    webrtc, trickle = ClosedWork(), ClosedWork()
    reservations.tie("s1", webrtc.close)
    reservations.tie("s1", trickle.close)
    reservations.release("s1", "the orchestrator released it")
    await tasks.wait()
    assert (
        webrtc.reasons
        == trickle.reasons
        == ["livepeer session s1 released: the orchestrator released it"]
    )
    assert not reservations.is_reserved("s1") and reservations.released_total == 1


async def test_work_is_tied_only_to_a_reserved_session() -> None:
    reservations = Reservations(TaskSet("test"))
    with pytest.raises(NotReservedError, match="s2"):
        reservations.tie("s2", ClosedWork().close)


async def test_the_heartbeat_list_is_authoritative_but_not_older_than_an_event() -> None:
    tasks = TaskSet("test")
    reservations = Reservations(tasks)
    stale = ClosedWork()
    reservations.replace(["old"], asked_at=time.monotonic())
    reservations.tie("old", stale.close)
    asked_at = time.monotonic()
    reservations.reserve("new")  # the O2R event arrives while the heartbeat is in flight
    reservations.replace([], asked_at)
    await tasks.wait()
    assert reservations.ids() == ["new"]
    assert stale.reasons == ["livepeer session old released: the orchestrator no longer lists it"]


async def test_waiting_for_a_reservation_that_comes_late() -> None:
    reservations = Reservations(TaskSet("test"))
    waiting = asyncio.ensure_future(reservations.wait_reserved("s3", timeout_s=2.0))
    await asyncio.sleep(0.05)
    reservations.reserve("s3")
    assert await waiting is True
    assert await reservations.wait_reserved("never", timeout_s=0.05) is False


async def test_concurrent_ties_and_releases_close_each_piece_of_work_once() -> None:
    tasks = TaskSet("test")
    reservations = Reservations(tasks)
    works = {f"s{n}": [ClosedWork() for _ in range(3)] for n in range(20)}

    async def open_and_release(session_id: str) -> None:
        reservations.reserve(session_id)
        for work in works[session_id]:
            await asyncio.sleep(0)
            reservations.tie(session_id, work.close)
        await asyncio.sleep(0)
        reservations.release(session_id, "done")
        reservations.release(session_id, "again")  # a second release finds nothing to close

    await asyncio.gather(*(open_and_release(session_id) for session_id in works))
    await tasks.wait()
    assert reservations.ids() == []
    assert all(work.reasons == [f"livepeer session {sid} released: done"]
               for sid, pieces in works.items() for work in pieces)  # fmt: skip
