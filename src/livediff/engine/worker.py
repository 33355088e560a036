"""The worker: one thread per device that runs the transform on batches across sessions.

The thread owns the device (and, on CUDA, its own CUDA stream): the transform is loaded, warmed,
called and closed there, and nowhere else. The event loop only hands it frames through the
sessions' slots and small calls through :meth:`Worker.call`.

Batches in flight. A batch is *launched* (``Transform.process``, then its outputs' downloads
queued: on CUDA neither waits for the device), then *landed* (one wait for the device, the
downloads read) and delivered to its sessions. With ``batches_in_flight`` 2 (the default on
CUDA) the thread launches batch N+1, when its frames are there at once, before it lands N, so
the device computes N while the thread's Python launches N+1 and delivers N-1; with 1 (the CPU,
whose ``process`` computes before it returns) it lands each batch before the next. Invariants:

- at most ``batches_in_flight`` batches are launched and not delivered, and they are delivered
  in launch order, so a session's outputs keep its frames' order. A session may have a frame in
  N and the next in N+1: a transform leaves what the next frame of a session needs in the
  session's state as ``process`` returns (on the device, ordered by the worker's CUDA stream);
- a batch's pinned download buffers stay leased until it lands, so N+1's downloads get others;
  an output handed on as a tensor (ai-runner's) is adapted and marked ready as its batch
  launches, so its consumer waits for its batch's work only, not for N+1's;
- calls (attach, detach, params, a reload) run with no batch in flight: the thread lands them
  all first, and a staged batch then takes its sessions' params and state as the calls left them
  (a detached session's frame is dropped, and counted);
- a step (a launch, the next batch's staging, a landing) is one activity for the watchdog that
  holds every job not delivered yet; a step that raises ends the worker after the batches
  launched before it were delivered and every other job it held failed (counted, never lost);
- at stop, the thread lands and delivers every batch in flight before it closes the transform.

What the thread is busy with (a load, a call, a batch step) and since when is its
:attr:`Worker.activity`, which the engine's watchdog reads; a worker stuck in one past its limit
is given up on with :meth:`Worker.abandon`, and its thread, if the call ever returns, ends
without touching anything that another worker serves now.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from livediff.engine.session import Adapted, Session
from livediff.engine.stats import Metrics
from livediff.engine.threads import ThreadOwner
from livediff.frames import Image, is_tensor, now
from livediff.pixels import Downloads, finish_downloads, start_downloads
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
    #: The output adapted for its session as the batch launched (one that stays a tensor).
    adapted: Adapted | None = None


@dataclass(slots=True, eq=False)
class _Launched:
    """A batch between launch and delivery: ``process`` returned (on CUDA its work may only be
    queued) and its outputs' downloads are queued behind it, their buffers leased until
    :meth:`land` has read them."""

    batch: Batch
    outcomes: list[_Outcome]
    downloads: Downloads
    #: It ran a session or params for the first time (see :attr:`Activity.novel`).
    novel: bool
    #: What landing raised: the buffers were given back then, so they are never read again.
    landing_error: Exception | None = None

    def land(self) -> None:
        """Wait for the device (once) and put the outputs, downloaded, in the outcomes."""
        if self.landing_error is not None:
            raise self.landing_error
        try:
            images = finish_downloads(self.downloads)
        except Exception as exc:
            self.landing_error = exc
            raise
        for outcome, image in zip(self.outcomes, images, strict=True):
            outcome.image = image


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
    #: A batch step with a session, or a session's params, that this worker has not run before
    #: (launched or still in flight): it may allocate or compile for new shapes, so it gets the
    #: first-batch limit.
    novel: bool = False
    #: Every job a batch step holds undelivered (those in flight and the one it launches),
    #: failed by the engine if the worker is abandoned in it (a batch only).
    batch: tuple[tuple[Session, AnyJob], ...] = ()
    #: The call's future (a call only), failed if the worker is abandoned in it.
    future: concurrent.futures.Future[Any] | None = None

    def elapsed(self, moment: float | None = None) -> float:
        return (time.monotonic() if moment is None else moment) - self.started


def batches_in_flight_for(setting: int, device: str) -> int:
    """The number of batches a worker on ``device`` keeps in flight for ``setting`` (the
    ``batches_in_flight`` setting): 0, auto, is 2 on CUDA, where ``process`` only queues the
    device's work, and 1 elsewhere, where it computes before it returns and a second batch in
    flight would only hold the first one's delivery back."""
    if setting:
        return setting
    return 2 if device.startswith("cuda") else 1


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
        batches_in_flight: int | None = None,
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
        thread can check it does (the engine passes the same one to every worker it builds).

        ``batches_in_flight`` is the setting of that name (None: the transform's settings'),
        resolved for the transform's device by :func:`batches_in_flight_for`."""
        self.transform = transform
        self.owner = owner if owner is not None else ThreadOwner("worker", strict=True)
        self.max_batch = max_batch
        setting = batches_in_flight
        if setting is None:
            setting = transform.settings.batches_in_flight
        #: Most batches launched and not delivered (1 or 2). Read by the thread at every step:
        #: change it only from a call (which runs with none in flight).
        self.batches_in_flight = batches_in_flight_for(setting, transform.device)
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
        #: The longest a settled batch step (no new session or params) has taken, in seconds:
        #: a launch and a landing (of the same batch with one in flight, of the one before with
        #: two, where it is one period of the pipeline).
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
        """Deliver the batches in flight, close the transform and end the thread (an abandoned
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
        held: Batch | None = None,
        novel: bool = False,
        future: concurrent.futures.Future[Any] | None = None,
    ) -> Iterator[Activity]:
        """Mark the thread busy with ``kind`` for the watchdog (``held``: every job the work
        holds undelivered; ``novel``: it runs a session or params for the first time); when the
        worker was abandoned meanwhile, end the thread as the work returns (whatever it
        returned or raised)."""
        activity = Activity(kind, time.monotonic(), novel, tuple(held or ()), future)
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
        """The thread is ending on ``fault``: refuse and fail every call (those taken off the
        queue too: landing the batches in flight before them may be what failed), then report
        it."""
        logger.error("the worker failed and stops: %r", fault.cause, exc_info=fault.cause)
        with self._cond:
            self._stopping = True
            calls, self._calls = [*self._taken, *self._calls], []
            self._taken = []
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
        """Launch, stage and land batches until stopped: at most :attr:`batches_in_flight`
        launched and not delivered, delivered in launch order; calls run with none in flight."""
        staged: Batch = []  # the next batch: taken, its inputs already moving
        in_flight: deque[_Launched] = deque()  # launched, not delivered yet, oldest first
        while True:
            busy = bool(staged or in_flight)
            calls, batch = self._wait_for_work(busy=busy, have_next=bool(staged))
            if calls:
                try:
                    self._land_all(in_flight)  # a call may reload or close: nothing may run
                    self._run_calls(calls)
                except Exception:
                    self._dropped(staged)  # the worker ends: they go no further
                    raise
                staged = self._still_served(staged)
            batch = staged + batch
            if batch or in_flight:
                staged = self._step(batch, in_flight)
            elif self._stopping and not calls:
                return

    def _wait_for_work(self, busy: bool, have_next: bool) -> tuple[list[_Call], Batch]:
        """Pending calls, and the frames waiting unless ``have_next`` (a batch is staged) or
        calls came (they run first); waits only when not ``busy`` (nothing staged or in
        flight)."""
        with self._cond:
            while not (busy or self._stopping or self._calls or self._any_ready()):
                self._cond.wait()
            calls, self._calls = self._calls, []
            self._taken = list(calls)
            taking = not (self._stopping or have_next or calls)
            batch = self._take_batch() if taking else []
        return calls, batch

    def _run_calls(self, calls: list[_Call]) -> None:
        faults = [fault for fault in map(self._run_call, calls) if fault is not None]
        if faults:
            raise WorkerFaultError(faults[0])

    def _still_served(self, staged: Batch) -> Batch:
        """The staged batch after calls ran: a detached session's job dropped (and counted),
        the others on their session's params and state as the calls left them, so that a
        params change or a reload between taking a frame and launching it applies to it."""
        kept: Batch = []
        for session, job in staged:
            if session not in self._sessions:
                self._dropped([(session, job)])
                continue
            job.params, job.state = session.params, session.transform_state
            kept.append((session, job))
        return kept

    def _stage_next(self) -> Batch:
        """Take the frames already waiting and let the transform start moving them onto the
        device (on its CUDA copy stream) while the batches in flight compute; nothing when a
        call waits (it runs first, the frames after it)."""
        with self._cond:
            batch = [] if self._stopping or self._calls else self._take_batch()
        if batch:
            try:
                self.transform.stage([job for _, job in batch])
            except Exception as exc:  # staging is an optimisation: process() uploads them itself
                if is_out_of_memory(exc):
                    self._dropped(batch)  # the worker ends: they go no further
                    raise WorkerFaultError(exc) from exc
                logger.exception("staging the next batch failed; it is uploaded when it runs")
                for _, job in batch:
                    job.staged = None
        return batch

    @staticmethod
    def _dropped(batch: Batch) -> None:
        """Count the jobs of ``batch``, taken and never to run, as dropped frames."""
        for session, _ in batch:
            session.stats.on_dropped("input")

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

    def _step(self, batch: Batch, in_flight: deque[_Launched], *, staging: bool = True) -> Batch:
        """Launch ``batch`` (if any), take and stage the next one (unless not ``staging``), and
        land the oldest batch in flight when :attr:`batches_in_flight` are, or when no batch
        follows at once; returns the staged batch.

        The device is waited for once per landing: after this step's launch and the next
        batch's uploads are queued, so ``finished`` is when the device finished. The step is
        one activity for the watchdog, holding every job not delivered yet (so that an
        abandoned worker's frames all fail) and novel when any of them is; its length is
        :attr:`slowest_batch_s`' measure: with two in flight, a launch and a landing, one
        period of the pipeline. Results are delivered after it, so that an abandoned worker
        delivers nothing; when it raises (the worker ends), :meth:`_salvage` settles them.
        """
        novel_batch = self._learn_params(batch)
        novel = novel_batch or any(launched.novel for launched in in_flight)
        held = [item for launched in in_flight for item in launched.batch] + batch
        staged: Batch = []
        try:
            with self._busy("batch", held=held, novel=novel) as activity:
                if batch:
                    in_flight.append(self._launch(batch, novel_batch))
                staged = self._stage_next() if staging else []
                landed = self._land_oldest(in_flight, followed=bool(staged))
        except Exception as exc:
            self._salvage(held, in_flight, exc)
            self._dropped(staged)
            raise
        finished = now()
        if not novel:
            self.slowest_batch_s = max(self.slowest_batch_s, activity.elapsed())
        if landed is not None:
            self._deliver(landed.batch, landed.outcomes, finished)
        return staged

    def _launch(self, batch: Batch, novel: bool) -> _Launched:
        """Call ``process`` (on CUDA it only queues the work), queue the outputs' downloads
        behind it and adapt the outputs handed on as tensors (their ready events then come
        before the next batch's work); nothing waits for the device here."""
        started = now()
        for _, job in batch:
            job.frame.times.started = started
        outcomes = self._process([job for _, job in batch])
        images = [outcome.image for outcome in outcomes]
        wanted = [session.wants_video_frames for session, _ in batch]
        downloads = start_downloads(images, wanted)
        for (session, _), outcome in zip(batch, outcomes, strict=True):
            image = outcome.image
            if image is not None and is_tensor(image) and not session.wants_video_frames:
                outcome.adapted = session.adapt(image)  # handed on as a tensor: see Session.adapt
        return _Launched(batch, outcomes, downloads, novel)

    def _land_oldest(self, in_flight: deque[_Launched], followed: bool) -> _Launched | None:
        """Wait for the oldest batch's outputs unless another may still be launched before
        it (fewer than :attr:`batches_in_flight` are in flight and a batch follows at once)."""
        if not in_flight or (followed and len(in_flight) < self.batches_in_flight):
            return None
        in_flight[0].land()
        return in_flight.popleft()

    def _land_all(self, in_flight: deque[_Launched]) -> None:
        """Land and deliver every batch in flight, oldest first, taking no new frames (before
        calls, which may reload the model or close a session)."""
        while in_flight:
            self._step([], in_flight, staging=False)

    def _salvage(self, held: Batch, in_flight: deque[_Launched], cause: Exception) -> None:
        """A step raised ``cause``, which ends the worker: the batches launched before it that
        still land are delivered, in order; every other job the step held fails with the cause
        (its session counts the error and shows its last good frame), so that no frame is lost
        uncounted and none reaches its session out of order."""
        landed: list[_Launched] = []
        with self._busy("batch", held=held):
            for launched in in_flight:
                try:
                    launched.land()
                except Exception:
                    logger.exception("a batch in flight did not land after the worker failed")
                    break
                landed.append(launched)
        in_flight.clear()
        finished = now()
        for launched in landed:
            self._deliver(launched.batch, launched.outcomes, finished)
        delivered = {id(job) for launched in landed for _, job in launched.batch}
        error = cause.cause if isinstance(cause, WorkerFaultError) else cause
        for session, job in held:
            if id(job) not in delivered:
                session.fail(job, error, finished)

    def _deliver(self, batch: Batch, outcomes: list[_Outcome], finished: float) -> None:
        self._metrics.batch_size.observe(len(batch))
        for (session, job), outcome in zip(batch, outcomes, strict=True):
            if job.skipped:
                session.stats.on_dropped("similarity")
            if job.filtered:
                session.stats.on_filtered()
            if outcome.error is not None:
                session.fail(job, outcome.error, finished)
            elif outcome.adapted is not None:
                session.complete(job, outcome.adapted, finished)
            else:
                session.complete(job, outcome.image, finished)

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
