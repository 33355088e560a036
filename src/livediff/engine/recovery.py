"""What the engine does about a worker that died: the event loop's record of it.

A worker that runs out of memory or raises outside a frame ends (``WorkerFaultError``); its
thread hands the fault to the event loop, where :meth:`Recovery.recover` has a new worker built
on the same transform (which loads again and warms up) and the open sessions attached to it, or
ends them with the reason. :class:`Recovery` keeps what that takes: the fault being recovered
from, whether the engine gave up, and the restart budget (``worker_restarts`` in
:data:`RESTART_WINDOW_S`). It is loop-owned: only the event loop runs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from livediff.config import Settings
from livediff.engine.errors import EngineUnavailableError
from livediff.engine.session import Session
from livediff.engine.stats import Metrics
from livediff.engine.worker import WorkerFaultError

logger = logging.getLogger(__name__)

#: The span over which ``worker_restarts`` restarts of a failed worker are allowed.
RESTART_WINDOW_S = 600.0
RESTARTING = "is restarting; try again shortly"
GAVE_UP = "could not be restarted (see /health and the log)"


class Recovery:
    """The fault under recovery, the restart budget, and the restart itself (event loop only)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.max_restarts = settings.worker_restarts
        self._metrics = metrics
        #: What killed the worker, until a new one serves again.
        self.fault: WorkerFaultError | None = None
        self.gave_up = False
        self._restarts: deque[float] = deque()

    def begin(self, fault: WorkerFaultError) -> None:
        """A worker died of ``fault``: it is what the engine reports until :meth:`done`."""
        self.fault = fault

    async def recover(
        self,
        fault: WorkerFaultError,
        start_worker: Callable[[], Awaitable[None]],
        reattach: Callable[[], Awaitable[int]],
        open_sessions: Callable[[], Iterable[Session]],
    ) -> None:
        """Restart after ``fault`` if the budget allows: ``start_worker()`` builds and loads a
        new worker, ``reattach()`` serves the open sessions on it (and says how many); when
        either is refused or the start fails, ``open_sessions()`` end with the reason."""
        if not self.may_restart():
            reason = (
                f"the worker failed ({fault.cause!r}) more than {self.max_restarts} times in"
                f" {RESTART_WINDOW_S:g} s; it is not restarted again"
            )
            self.give_up(reason, open_sessions())
            return
        self._metrics.worker_restarts.inc()
        logger.warning("restarting the worker after %r", fault.cause)
        try:
            await start_worker()
        except Exception as exc:
            self._metrics.errors.labels("worker_restart_failed").inc()
            reason = f"the worker failed ({fault.cause!r}) and could not restart: {exc!r}"
            self.give_up(reason, open_sessions())
            return
        count = await reattach()
        self.done()
        logger.info("the worker serves again (%d session(s) re-attached)", count)

    def may_restart(self) -> bool:
        """Whether the budget allows one more restart now (and if so, count it)."""
        moment = time.monotonic()
        while self._restarts and moment - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(moment)
        return True

    def give_up(self, reason: str, sessions: Iterable[Session]) -> None:
        """No new worker will serve: end the open sessions with ``reason``."""
        self.gave_up = True
        ending = list(sessions)
        logger.error("%s; ending %d session(s)", reason, len(ending))
        for session in ending:
            session.end(reason)

    def done(self) -> None:
        """A new worker serves again."""
        self.fault = None

    def unavailable(
        self, fault: WorkerFaultError | None, restarting: bool
    ) -> EngineUnavailableError:
        """The refusal while no worker serves: what failed, and what is done about it."""
        cause = f" ({fault.cause!r})" if fault is not None else ""
        if self.gave_up:
            action = GAVE_UP
        elif restarting:
            action = RESTARTING
        else:
            action = "is not running"
        return EngineUnavailableError(
            f"the worker failed{cause} and {action}", reason="worker_error"
        )
