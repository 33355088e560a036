"""``Reservations``: the Livepeer sessions reserved for this runner, and the work tied to each.

The orchestrator is the authority on which sessions exist: every heartbeat reply lists them
(``session_ids``), and the O2R channel announces ``reserved`` / ``released`` in between. A
Livepeer session is one capacity slot; livediff work (a WebRTC session, a trickle stream) opened
through the proxy is tied to the session named by its ``Livepeer-Session-Id`` header.

Invariant: a session id is reserved iff the orchestrator's latest word on it says so (a reply
lists it, or a ``reserved`` event came after the reply was asked for); work is tied only to a
reserved session, and when the session leaves the set, the closing of all its work starts in the
same step (on the event loop; the closes themselves run as tasks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from livediff.engine import TaskSet

logger = logging.getLogger(__name__)

#: Closes one piece of local work, given the reason.
Closer = Callable[[str], Coroutine[Any, Any, object]]


class NotReservedError(LookupError):
    """A request names a Livepeer session the orchestrator did not reserve for this runner."""


class Reservations:
    """Reserved Livepeer session ids (and when each was reserved) and their closers."""

    def __init__(self, tasks: TaskSet) -> None:
        self._tasks = tasks
        self._reserved: dict[str, float] = {}
        self._work: dict[str, list[Closer]] = {}
        self._changed = asyncio.Event()
        self.released_total = 0

    def ids(self) -> list[str]:
        return list(self._reserved)

    def is_reserved(self, session_id: str) -> bool:
        return session_id in self._reserved

    # -- the orchestrator's word ------------------------------------------------------------
    def replace(self, session_ids: Iterable[str], asked_at: float) -> None:
        """A heartbeat reply's list (asked for at ``asked_at``, ``time.monotonic()``): sessions
        it leaves out are released unless a ``reserved`` event for them came after the ask."""
        listed = set(session_ids)
        for session_id in listed:
            self._reserved.setdefault(session_id, asked_at)
        for session_id, since in list(self._reserved.items()):
            if session_id not in listed and since <= asked_at:
                self.release(session_id, "the orchestrator no longer lists it")
        self._changed.set()

    def reserve(self, session_id: str) -> None:
        if session_id not in self._reserved:
            self._reserved[session_id] = time.monotonic()
            logger.info("livepeer session %s reserved", session_id)
        self._changed.set()

    def release(self, session_id: str, reason: str) -> None:
        """Forget the session and start closing everything tied to it."""
        self._reserved.pop(session_id, None)
        closers = self._work.pop(session_id, [])
        if closers:
            self.released_total += 1
            logger.info("livepeer session %s released (%s): closing its work", session_id, reason)
        for close in closers:
            self._tasks.spawn(close(f"livepeer session {session_id} released: {reason}"))

    def release_all(self, reason: str) -> None:
        for session_id in list(self._reserved) + list(self._work):
            self.release(session_id, reason)

    # -- local work -------------------------------------------------------------------------
    def tie(self, session_id: str, close: Closer) -> None:
        """Tie a piece of work to a reserved session (raises :class:`NotReservedError`)."""
        if session_id not in self._reserved:
            raise NotReservedError(f"livepeer session {session_id} is not reserved here")
        self._work.setdefault(session_id, []).append(close)

    def untie(self, session_id: str, close: Closer) -> None:
        closers = self._work.get(session_id, [])
        if close in closers:
            closers.remove(close)

    async def wait_reserved(self, session_id: str, timeout_s: float) -> bool:
        """True once ``session_id`` is reserved, False after ``timeout_s`` without it (a
        client's first request can outrun the O2R event of its own reservation)."""
        deadline = time.monotonic() + timeout_s
        while session_id not in self._reserved:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return session_id in self._reserved
        return True
