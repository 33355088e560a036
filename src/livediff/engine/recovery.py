"""What the engine does about a worker that died or hung: the event loop's record of it.

A worker that runs out of memory or raises outside a frame ends (``WorkerFaultError``); its
thread hands the fault to the event loop, where :meth:`Recovery.recover` has a new worker built
on the same transform (which loads again and warms up) and the open sessions attached to it, or
ends them with the reason. :class:`Recovery` keeps what that takes: the fault being recovered
from, whether the engine gave up, and the restart budget (``worker_restarts`` in
:data:`RESTART_WINDOW_S`). It is loop-owned: only the event loop runs it.

A worker whose thread is stuck in a transform call never ends by itself. The :class:`Watchdog`
(a task on the loop) sees the thread busy past its :class:`HangLimits` and reports it; the
engine then abandons that worker (``WorkerHungError``). Python cannot stop a thread, and the
stuck one still holds its transform, so a new worker cannot safely use that object: where
:meth:`Recovery.exit_reason` finds no reason against it, the engine recovers as for a dead
worker but on a new instance of the transform; where it does (the transform runs on a device,
or the restart budget is spent), :meth:`Recovery.exit_after_hang` tells the sessions and ends
the process with :data:`HANG_EXIT_STATUS`, so that its supervisor starts a clean one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

from livediff.config import Settings
from livediff.engine.errors import EngineUnavailableError
from livediff.engine.session import Session
from livediff.engine.stats import Metrics
from livediff.engine.worker import (
    Activity,
    TransformHungError,
    Worker,
    WorkerFaultError,
    WorkerHungError,
)

logger = logging.getLogger(__name__)

#: The span over which ``worker_restarts`` restarts of a failed worker are allowed.
RESTART_WINDOW_S = 600.0
RESTARTING = "is restarting; try again shortly"
GAVE_UP = "could not be restarted (see /health and the log)"
#: The exit status after a hang this process cannot recover from: EX_TEMPFAIL (sysexits.h,
#: "try again later"). Any non-zero status makes systemd (Restart=on-failure), Docker
#: (--restart on-failure) and Kubernetes start the service again.
HANG_EXIT_STATUS = 75
#: Longest wait, before such an exit, for the faces to close the sessions told to end (each
#: peer's "ended" message waits up to a second to be acknowledged).
EXIT_GRACE_S = 3.0

#: Ends the process with a status (:func:`exit_now`; tests pass their own).
ExitProcess = Callable[[int], None]
#: The watchdog's report: the worker, what its thread is stuck in, and the fault to give.
HangReport = Callable[[Worker, Activity, WorkerHungError], None]


def exit_now(status: int) -> None:
    """End the process now with ``status``, once the log is flushed.

    ``os._exit``, not ``sys.exit``: the stuck thread is a daemon and would not hold a normal
    exit up, but a normal exit runs interpreter shutdown and ``atexit`` handlers (torch's CUDA
    teardown among them) that may wait forever on the device the stuck call holds, and a
    graceful shutdown ends with status 0, which a supervisor does not restart on failure."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(status)


@dataclass(frozen=True, slots=True)
class HangLimits:
    """How long the worker thread may stay busy with one thing before it counts as hung."""

    #: A settled batch may take this many times the slowest settled batch seen (0: no limit)...
    factor: float
    #: ...but never less than this.
    floor_s: float
    #: A batch with a session or params not run before (it may compile), or one before any
    #: batch was timed (0: no limit).
    first_s: float
    #: A load with its warm-up, and any call (which may reload a model) (0: no limit).
    load_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HangLimits:
        return cls(
            factor=settings.batch_timeout_factor,
            floor_s=settings.batch_timeout_min_s,
            first_s=settings.batch_timeout_first_s,
            load_s=settings.load_timeout_s,
        )

    def limit(self, activity: Activity, slowest_batch_s: float) -> tuple[float, str] | None:
        """``activity``'s limit in seconds and the setting it comes from; None: no limit."""
        if activity.kind != "batch":
            return (self.load_s, "load_timeout_s") if self.load_s else None
        if activity.novel or slowest_batch_s <= 0:
            return (self.first_s, "batch_timeout_first_s") if self.first_s else None
        if not self.factor:
            return None
        scaled = self.factor * slowest_batch_s
        if scaled <= self.floor_s:
            return self.floor_s, "batch_timeout_min_s"
        return scaled, f"batch_timeout_factor x the slowest batch, {slowest_batch_s:.3g} s"

    @property
    def interval_s(self) -> float:
        """How often the watchdog looks: a tenth of the shortest limit, 10 ms to 1 s."""
        limits = [self.first_s, self.load_s, self.floor_s if self.factor else 0.0]
        shortest = min((limit for limit in limits if limit > 0), default=10.0)
        return min(1.0, max(0.01, shortest / 10))


class Watchdog:
    """Looks at the worker's activity every :attr:`HangLimits.interval_s` (a loop task) and
    reports one past its limit, once, through ``on_hang``."""

    def __init__(
        self, limits: HangLimits, current_worker: Callable[[], Worker], on_hang: HangReport
    ) -> None:
        self.limits = limits
        self._current_worker = current_worker
        self._on_hang = on_hang

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            await asyncio.sleep(self.limits.interval_s)
            self.check()

    def check(self) -> None:
        """Report the worker if it is busy past its limit (and not given up on already)."""
        worker = self._current_worker()
        activity = worker.activity
        if activity is None or worker.abandoned:
            return
        found = self.limits.limit(activity, worker.slowest_batch_s)
        if found is None:
            return
        limit, source = found
        elapsed = activity.elapsed()
        if elapsed > limit:
            cause = TransformHungError(
                f"the {worker.transform.name} transform's {activity.kind} has run for"
                f" {elapsed:.1f} s, over its limit of {limit:.3g} s ({source})"
            )
            self._on_hang(worker, activity, WorkerHungError(cause))


class Recovery:
    """The fault under recovery, the restart budget, and the restart itself (event loop only)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, exit_process: ExitProcess = exit_now
    ) -> None:
        self.max_restarts = settings.worker_restarts
        self._metrics = metrics
        self._exit_process = exit_process
        #: The process is about to exit (after a hang it cannot recover from).
        self.exiting = False
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
        if not self.restarts_left():
            return False
        self._restarts.append(time.monotonic())
        return True

    def restarts_left(self) -> bool:
        """Whether the budget allows one more restart now (counting nothing)."""
        moment = time.monotonic()
        while self._restarts and moment - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        return len(self._restarts) < self.max_restarts

    def exit_reason(self, device: str) -> str | None:
        """Why a hung worker cannot be replaced in this process (None when it can).

        On the CPU the stuck thread holds only itself and its transform object: a new worker
        on a new instance serves, and the thread is left behind (a daemon; one that spins
        still costs a core). On a device it also holds the device: its context, its memory
        and perhaps a kernel that never ends, so a new instance would queue behind it or run
        out of memory, and only a new process gets the device back. And each hang leaves a
        thread behind, so past the restart budget the process is not kept either."""
        if device.partition(":")[0] != "cpu":
            return (
                f"the transform runs on {device}, and the stuck call holds that device (its"
                " context, memory and any kernel still running), which only a new process frees"
            )
        if not self.restarts_left():
            return (
                f"the worker was restarted {self.max_restarts} times in {RESTART_WINDOW_S:g} s"
                " already, and each hung worker leaves a thread that only a new process frees"
            )
        return None

    async def exit_after_hang(
        self, fault: WorkerHungError, why: str, sessions: Callable[[], Collection[Session]]
    ) -> None:
        """End the open sessions with the reason, give the faces :data:`EXIT_GRACE_S` to close
        them (and tell their peers), then end the process with :data:`HANG_EXIT_STATUS`."""
        self.exiting = self.gave_up = True
        self.begin(fault)
        reason = (
            f"{fault.cause}; {why}: the service exits (status {HANG_EXIT_STATUS}) for its"
            " supervisor to restart it"
        )
        ending = list(sessions())
        logger.critical("%s; ending %d session(s)", reason, len(ending))
        for session in ending:
            session.end(reason)
        deadline = time.monotonic() + EXIT_GRACE_S
        while sessions() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._exit_process(HANG_EXIT_STATUS)

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
