"""The worker: one thread per device that runs the transform on batches across sessions.

The thread owns the device (and, on CUDA, its own CUDA stream): the transform is loaded, warmed,
called and closed there, and nowhere else. The event loop only hands it frames through the
sessions' slots and small calls through :meth:`Worker.call`.

What the thread is busy with (a load, a call, a batch) and since when is its
:attr:`Worker.activity`, which the engine's watchdog reads; a worker stuck in one past its limit
is given up on with :meth:`Worker.abandon`, and its thread, if the call ever returns, ends
without touching anything that another worker serves now.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from livediff.engine.session import Session
from livediff.engine.stats import Metrics
from livediff.engine.threads import ThreadOwner
from livediff.frames import Image, now
from livediff.pixels import finish_downloads, start_downloads
from livediff.transforms.base import AnyJob, AnyTransform

logger = logging.getLogger(__name__)

R = TypeVar("R")
#: A session and its job in the batch being taken, staged or run.
Batch = list[tuple[Session, AnyJob]]


class WorkerState(StrEnum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's (CUDA) OutOfMemoryError, recognised without importing torch."""
    if isinstance(exc, MemoryError):
        return True
    return any(
        kind.__name__ == "OutOfMemoryError" and kind.__module__.startswith("torch")
        for kind in type(exc).__mro__
    )


class WorkerFaultError(Exception):
    """Wraps what ended a worker thread (out of memory, an error outside a frame); the engine
    builds a new worker when one ends so."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the worker failed: {cause!r}")
        self.cause = cause

    @property
    def kind(self) -> str:
        """``out_of_memory`` or ``worker_died`` (the ``livediff_errors_total`` kinds)."""
        return "out_of_memory" if is_out_of_memory(self.cause) else "worker_died"


class TransformHungError(TimeoutError):
    """A call into the transform ran past its watchdog limit (it may never return)."""


class WorkerHungError(WorkerFaultError):
    """The worker was given up on: its thread is stuck in a transform call
    (:class:`TransformHungError` says which and for how long)."""

    @property
    def kind(self) -> str:
        return "worker_hung"


class _AbandonedError(BaseException):
    """Unwinds an abandoned worker's thread once its stuck call returns (not an Exception, so
    that nothing on the way counts it as a frame's error)."""


#: What the worker thread is busy with: loading (and warming up) the transform, running a call
#: (which may reload a model), or running a batch.
ActivityKind = Literal["load", "call", "batch"]


@dataclass(slots=True)
class _Outcome:
    image: Image | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True, slots=True, eq=False)
class Activity:
    """One stretch of work on the worker thread, as the watchdog sees it."""

    kind: ActivityKind
    #: ``time.monotonic()`` when it began.
    started: float
    #: A batch with a session, or a session's params, that this worker has not run before: it
    #: may allocate or compile for new shapes, so it gets the first-batch limit.
    novel: bool = False
    #: The batch's sessions and jobs (a batch only).
    batch: tuple[tuple[Session, AnyJob], ...] = ()
    #: The call's future (a call only), failed if the worker is abandoned in it.
    future: concurrent.futures.Future[Any] | None = None

    def elapsed(self, moment: float | None = None) -> float:
        return (time.monotonic() if moment is None else moment) - self.started


@contextmanager
def device_scope(device: str, pinned_buffers: int) -> Iterator[None]:
    """Make ``device`` current on this thread, with a CUDA stream of its own and a pool of
    ``pinned_buffers`` pinned staging buffers when on a GPU."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    from livediff.pixels.device import pinned_scope

    target = torch.device(device)
    if target.index is not None:
        torch.cuda.set_device(target)
    cuda_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(cuda_stream), pinned_scope(pinned_buffers):
        yield


class Worker:
    """Runs ``transform`` for every attached session on one thread."""

    def __init__(
        self,
        transform: AnyTransform,
        metrics: Metrics,
        *,
        max_batch: int,
        pinned_buffers: int = 8,
        after_load: Callable[[], None] | None = None,
        on_fault: Callable[[WorkerFaultError], None] | None = None,
        owner: ThreadOwner | None = None,
    ) -> None:
        """``after_load`` runs on the thread after ``transform.load()`` (warm-up), before the
        worker reports READY; when it raises, the worker fails like a failed load.

        ``on_fault`` is called on the thread, after the transform was closed, when the thread
        ends on an error other than a frame's: the transform ran out of memory (MemoryError,
        torch's OutOfMemoryError) or something outside a frame raised. The worker is then dead
        (state ERROR, :attr:`fault` set); the owner may build a new one.

        ``owner`` is claimed by the thread as it starts, so that what must run on the worker
        thread can check it does (the engine passes the same one to every worker it builds)."""
        self.transform = transform
        self.owner = owner if owner is not None else ThreadOwner("worker", strict=True)
        self.max_batch = max_batch
        self._pinned_buffers = pinned_buffers
        self._after_load = after_load
        self._on_fault = on_fault
        self.fault: WorkerFaultError | None = None
        self._metrics = metrics
        self._cond = threading.Condition()
        self._sessions: list[Session] = []
        self._calls: list[_Call] = []
        self._taken: list[_Call] = []  # calls taken off the queue, not run yet
        self._rotation = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.state = WorkerState.NEW
        self.load_error: BaseException | None = None
        self._loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        #: What the thread is busy with now (None while it waits for work), for the watchdog.
        self.activity: Activity | None = None
        #: The longest a settled batch (no new session or params) has taken, in seconds.
        self.slowest_batch_s = 0.0
        self._ran_params: dict[str, object] = {}  # each session's params the last batch ran
        self._abandoned = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> concurrent.futures.Future[None]:
        """Start the thread; the future completes when the transform is loaded (or failed)."""
        if self._thread is None:
            self.state = WorkerState.LOADING
            self._thread = threading.Thread(target=self._main, name="livediff-worker", daemon=True)
            self._thread.start()
        return self._loaded

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current batch, close the transform and end the thread (an abandoned
        worker is not waited for: its thread may never return)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if self._abandoned:
                return
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = WorkerState.STOPPED

    def abandon(self, activity: Activity, fault: WorkerHungError) -> bool:
        """Give up on the thread, stuck in ``activity`` (any thread; the engine's watchdog).

        From now on the worker refuses calls and fails the ones waiting (and the one stuck)
        with ``fault``; its thread, should the stuck call return, ends without delivering
        anything or touching the sessions, which another worker serves by then. Returns False
        when ``activity`` ended meanwhile (nothing is abandoned then)."""
        with self._cond:
            if self.activity is not activity or self._abandoned:
                return False
            self._abandoned = self._stopping = True
            self.fault = fault
            self.state = WorkerState.ERROR
            waiting = [pending.future for pending in [*self._taken, *self._calls]]
            self._calls = []
            for future in [*waiting, activity.future, self._loaded]:
                if future is not None and not future.done():
                    future.set_exception(fault)
        return True

    @property
    def attached(self) -> tuple[Session, ...]:
        """The sessions the worker serves now (a snapshot)."""
        return tuple(self._sessions)

    @property
    def alive(self) -> bool:
        """The thread runs and serves (an abandoned worker's thread is not alive in this
        sense, even while it is still stuck)."""
        return self._thread is not None and self._thread.is_alive() and not self._abandoned

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    @property
    def stuck(self) -> bool:
        """Abandoned, and its thread has not returned from the stuck call (yet)."""
        return self._abandoned and self._thread is not None and self._thread.is_alive()

    # -- sessions and calls (any thread) ------------------------------------------------------
    def notify(self) -> None:
        """Wake the thread: a session has a frame waiting."""
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], R]) -> concurrent.futures.Future[R]:
        """Run ``fn`` on the worker thread between batches."""
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or not self.alive:
                future.set_exception(RuntimeError("the worker is not running"))
                return future
            self._calls.append(_Call(fn, future))
            self._cond.notify()
        return future

    def attach(self, session: Session) -> concurrent.futures.Future[None]:
        """Open the transform's state for ``session`` and start serving its frames."""

        return self.call(lambda: self.attach_here(session))

    def attach_here(self, session: Session) -> None:
        """:meth:`attach`, from a call already running on the worker thread."""
        self.owner.assert_current()
        session.transform_state = self.transform.open_session(session.params)
        self._sessions.append(session)

    def detach(self, session: Session) -> concurrent.futures.Future[None]:
        """Stop serving ``session`` and release its transform state."""
        return self.call(lambda: self.detach_here(session))

    def detach_here(self, session: Session) -> None:
        """:meth:`detach`, from a call already running on the worker thread."""
        self.owner.assert_current()
        self._ran_params.pop(session.id, None)
        if session in self._sessions:
            self._sessions.remove(session)
            self.transform.close_session(session.transform_state)
        session.transform_state = None

    # -- the thread ----------------------------------------------------------------------------
    def _main(self) -> None:
        self.owner.claim()
        try:
            with device_scope(self.transform.device, self._pinned_buffers):
                if self._load():
                    self._serve_to_the_end()
        except _AbandonedError as exc:
            self._leave(exc.__context__)

    def _serve_to_the_end(self) -> None:
        try:
            self._serve()
        except _AbandonedError:
            raise
        except BaseException as exc:  # the thread ends here: say why, whatever it was
            fault = exc if isinstance(exc, WorkerFaultError) else WorkerFaultError(exc)
            self._shutdown()
            self._died(fault)
        else:
            self._shutdown()

    @contextmanager
    def _busy(
        self,
        kind: ActivityKind,
        *,
        batch: Batch | None = None,
        future: concurrent.futures.Future[Any] | None = None,
    ) -> Iterator[Activity]:
        """Mark the thread busy with ``kind`` for the watchdog; when the worker was abandoned
        meanwhile, end the thread as the work returns (whatever it returned or raised)."""
        novel = self._learn_params(batch) if batch else False
        activity = Activity(kind, time.monotonic(), novel, tuple(batch or ()), future)
        with self._cond:
            self.activity = activity
        try:
            yield activity
        finally:
            with self._cond:
                self.activity = None
                abandoned = self._abandoned
            if abandoned:
                raise _AbandonedError  # an abandoned worker's results and errors go nowhere

    def _learn_params(self, batch: Batch) -> bool:
        """Whether ``batch`` has a session, or a session's params, not run before."""
        novel = False
        for session, job in batch:
            if self._ran_params.get(session.id) is not job.params:
                self._ran_params[session.id] = job.params
                novel = True
        return novel

    def _leave(self, returned: BaseException | None) -> None:
        """The stuck call of an abandoned worker returned: end the thread. The sessions are
        another worker's now (with their transform state made anew), so only this worker's
        own transform is closed."""
        outcome = "returned" if returned is None else f"raised {returned!r}"
        logger.warning(
            "the abandoned %s worker's stuck call %s after all; its thread ends",
            self.transform.name,
            outcome,
        )
        self._sessions.clear()
        try:
            self.transform.close()
        except Exception:
            logger.exception("closing the abandoned %s transform failed", self.transform.name)

    def _died(self, fault: WorkerFaultError) -> None:
        """The thread is ending on ``fault``: refuse and fail every call, then report it."""
        logger.error("the worker failed and stops: %r", fault.cause, exc_info=fault.cause)
        with self._cond:
            self._stopping = True
            calls, self._calls = self._calls, []
        self.fault = fault
        self.state = WorkerState.ERROR
        for pending in calls:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(fault)
        if self._on_fault is not None:
            self._on_fault(fault)

    def _load(self) -> bool:
        try:
            with self._busy("load"):
                self.transform.load()
                if self._after_load is not None:
                    self._after_load()
        except Exception as exc:
            logger.exception("loading the %s transform failed", self.transform.name)
            self.load_error = exc
            self.state = WorkerState.ERROR
            self._settle_load(exc)
            return False
        self.state = WorkerState.READY
        self._settle_load(None)
        return True

    def _settle_load(self, error: BaseException | None) -> None:
        """Complete the load's future, unless whoever waited for it cancelled it."""
        try:
            if error is None:
                self._loaded.set_result(None)
            else:
                self._loaded.set_exception(error)
        except concurrent.futures.InvalidStateError:
            logger.info("the %s transform's load ended with nobody waiting", self.transform.name)

    def _serve(self) -> None:
        staged: Batch = []  # the next batch, its inputs already moving
        while True:
            calls, batch = self._wait_for_work(ready=bool(staged))
            faults = [fault for fault in map(self._run_call, calls) if fault is not None]
            if faults:
                raise WorkerFaultError(faults[0])
            batch = [item for item in staged if item[0] in self._sessions] + batch
            staged = self._run_batch(batch) if batch else []
            if not batch and self._stopping and not calls:
                return

    def _wait_for_work(self, ready: bool) -> tuple[list[_Call], Batch]:
        """Pending calls, and a batch unless ``ready`` (one was staged already)."""
        with self._cond:
            while not (ready or self._stopping or self._calls or self._any_ready()):
                self._cond.wait()
            calls, self._calls = self._calls, []
            self._taken = list(calls)
            batch = [] if self._stopping or ready else self._take_batch()
        return calls, batch

    def _stage_next(self) -> Batch:
        """Take the frames already waiting and let the transform start moving them onto the
        device (on its CUDA copy stream) while the batch in flight computes."""
        with self._cond:
            batch = [] if self._stopping else self._take_batch()
        if batch:
            try:
                self.transform.stage([job for _, job in batch])
            except Exception as exc:  # staging is an optimisation: process() uploads them itself
                if is_out_of_memory(exc):
                    raise WorkerFaultError(exc) from exc
                logger.exception("staging the next batch failed; it is uploaded when it runs")
                for _, job in batch:
                    job.staged = None
        return batch

    def _any_ready(self) -> bool:
        return any(session.input.ready() for session in self._sessions)

    def _take_batch(self) -> Batch:
        """Up to ``max_batch`` sessions' newest frames, starting where the last batch stopped."""
        count = len(self._sessions)
        batch: Batch = []
        for offset in range(count):
            session = self._sessions[(self._rotation + offset) % count]
            job = session.next_job()
            if job is not None:
                batch.append((session, job))
                if len(batch) == self.max_batch:
                    self._rotation = (self._rotation + offset + 1) % count
                    break
        return batch

    def _run_call(self, pending: _Call) -> BaseException | None:
        """Run a call; returns what it raised when that ends the worker (out of memory)."""
        with self._cond:
            self._taken.remove(pending)
            if not pending.future.set_running_or_notify_cancel():
                return None
        try:
            with self._busy("call", future=pending.future):
                result = pending.fn()
        except Exception as exc:
            pending.future.set_exception(exc)
            return exc if is_out_of_memory(exc) else None
        pending.future.set_result(result)
        return None

    def _run_batch(self, batch: Batch) -> Batch:
        """Process ``batch``; returns the next batch, staged while this one computed.

        The device is waited for once per batch: after the outputs' downloads are queued and
        the next batch's uploads are on their way, so ``finished`` is when the device finished.
        The whole of it is one activity for the watchdog; results are delivered only after it,
        so that an abandoned worker delivers nothing.
        """
        with self._busy("batch", batch=batch) as activity:
            outcomes, staged = self._compute(batch)
        finished = now()
        if not activity.novel:
            self.slowest_batch_s = max(self.slowest_batch_s, activity.elapsed())
        self._deliver(batch, outcomes, finished)
        return staged

    def _compute(self, batch: Batch) -> tuple[list[_Outcome], Batch]:
        started = now()
        for _, job in batch:
            job.frame.times.started = started
        outcomes = self._process([job for _, job in batch])
        images = [outcome.image for outcome in outcomes]
        wanted = [session.wants_video_frames for session, _ in batch]
        downloads = start_downloads(images, wanted)
        staged = self._stage_next()
        for outcome, image in zip(outcomes, finish_downloads(downloads), strict=True):
            outcome.image = image
        return outcomes, staged

    def _deliver(self, batch: Batch, outcomes: list[_Outcome], finished: float) -> None:
        self._metrics.batch_size.observe(len(batch))
        for (session, job), outcome in zip(batch, outcomes, strict=True):
            if job.skipped:
                session.stats.on_dropped("similarity")
            if job.filtered:
                session.stats.on_filtered()
            if outcome.error is None:
                session.complete(job, outcome.image, finished)
            else:
                session.fail(job, outcome.error, finished)

    def _process(self, jobs: list[AnyJob]) -> list[_Outcome]:
        """Run the batch; when it raises, run its jobs one by one to find whose frame failed."""
        try:
            images = self.transform.process(jobs)
            if len(images) != len(jobs):
                raise RuntimeError(f"transform returned {len(images)} images for {len(jobs)} jobs")
            return [_Outcome(image=image) for image in images]
        except Exception as exc:
            if is_out_of_memory(exc):  # the device's state is unknown now: start afresh
                raise WorkerFaultError(exc) from exc
            if len(jobs) == 1:
                return [_Outcome(error=exc)]
            return [self._process([job])[0] for job in jobs]

    def _shutdown(self) -> None:
        for session in self._sessions:
            try:
                self.transform.close_session(session.transform_state)
            except Exception:
                logger.exception("closing session %s in the transform failed", session.id)
        self._sessions.clear()
        try:
            self.transform.close()
        except Exception:
            logger.exception("closing the %s transform failed", self.transform.name)
