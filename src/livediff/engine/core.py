"""``Engine``: the one engine behind every face (HTTP/WebRTC service, ai-runner adapter, ...).

It owns the transform, the worker thread that runs it, the metrics and the open sessions, and
decides everything a face would otherwise decide again: how params are merged and validated,
when a params change reloads the model (on the worker thread, refused while other sessions use
it), how the model is warmed up, how a session opens and closes, and what its stats say. A face
adapts it to a protocol and nothing more: the server keeps its peers and HTTP mapping, the runner
its stream-id switching and tensor contract.

Threads: this class is the event loop's side. It keeps the sessions, the recovery of a dead or
hung worker (and the watchdog that finds a hung one) and the worker itself, and sends whatever
touches the transform to the worker thread's side,
:class:`~livediff.engine.worker_side.WorkerSide`, through one hand-off (:meth:`_to_worker`);
the worker reaches the loop back through one other (:func:`post_to_loop`). Methods that change
the loop's state check that they run on the loop (:mod:`livediff.engine.threads`); those that
only read (:meth:`health`, :meth:`check_can_open`, :meth:`validate`, :meth:`session_stats`) may
be called from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine.errors import EngineUnavailableError, UnknownSessionError
from livediff.engine.params import ParamsRules
from livediff.engine.recovery import ExitProcess, HangLimits, Recovery, Watchdog, exit_now
from livediff.engine.session import Adapter, Session, unchanged
from livediff.engine.stats import Metrics, SessionStats
from livediff.engine.tasks import TaskSet
from livediff.engine.threads import ThreadOwner, post_to_loop
from livediff.engine.warmup import WarmupImage, warmup_card, warmup_video_frame
from livediff.engine.worker import Activity, Worker, WorkerFaultError, WorkerHungError, WorkerState
from livediff.engine.worker_side import WorkerSide
from livediff.frames import now
from livediff.transforms import AnyJob, AnyTransform, TransformParams, resolve_transform

logger = logging.getLogger(__name__)

R = TypeVar("R")
Health = Literal["LOADING", "IDLE", "OK", "ERROR"]

__all__ = ["Engine", "Health", "WarmupImage", "warmup_card", "warmup_video_frame"]


class Engine:
    """Transform + worker + metrics + sessions, behind one facade that every face uses."""

    def __init__(
        self,
        settings: Settings,
        transform: AnyTransform | None = None,
        *,
        warmup_image: WarmupImage | None = None,
        exit_process: ExitProcess = exit_now,
    ) -> None:
        """``warmup_image(width, height, device)`` makes the warm-up frames in the form the face
        delivers frames in (default: yuv420p video frames, as WebRTC decoders give them).
        ``exit_process(status)`` ends the process after a hang it cannot recover from."""
        self.settings = settings
        self.metrics = Metrics()
        self.transform = transform or resolve_transform(settings.pipeline)(settings)
        self.params_rules = ParamsRules(settings, self.transform)
        self._warmup_image = warmup_image or warmup_video_frame
        self.worker_side = self._build_worker_side(self.transform)
        #: The event loop's thread, claimed by :meth:`start` (lenient until then: an engine not
        #: started yet is used from one thread).
        self.loop_thread = ThreadOwner("event loop", strict=False)
        self.worker = self._build_worker()
        self.sessions: dict[str, Session] = {}
        self.tasks = TaskSet("engine")
        self._reserved = 0  # sessions being opened (counted against the limit and the model)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recovery = Recovery(settings, self.metrics, exit_process=exit_process)
        self._stopping = False
        self._watchdog = Watchdog(
            HangLimits.from_settings(settings), lambda: self.worker, self._worker_hung
        )
        self._watching = TaskSet("the engine's watchdog")

    def _build_worker_side(self, transform: AnyTransform) -> WorkerSide:
        """The worker-thread half for ``transform``: at start, and anew after a hang."""
        return WorkerSide(
            self.settings,
            transform,
            self.metrics,
            self.params_rules,
            warmup_image=self._warmup_image,
            report_fault=self._report_fault,
        )

    def _build_worker(self) -> Worker:
        """The one place a Worker is made: at start, and again after a worker failed."""
        return Worker(
            self.transform,
            self.metrics,
            max_batch=self.settings.max_batch,
            pinned_buffers=self.settings.pinned_buffers,
            after_load=self.worker_side.after_load,
            on_fault=self.worker_side.worker_failed,
            owner=self.worker_side.worker_thread,
        )

    # -- what both threads may read -----------------------------------------------------------
    @property
    def defaults(self) -> Mapping[str, Any]:
        """What a new session's params start from (the worker's last published snapshot)."""
        return self.worker_side.snapshot.defaults

    @property
    def allowed_models(self) -> frozenset[str]:
        """Model ids params may name (configured, the transform's defaults, allow_models)."""
        return self.params_rules.allowed_models

    @property
    def fault(self) -> WorkerFaultError | None:
        """What killed the worker, until a new one serves again (health is ERROR meanwhile):
        the fault the loop is recovering from, or one the worker reported but the loop has not
        taken up yet."""
        fault = self._recovery.fault
        return fault if fault is not None else self.worker.fault

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up the transform on the worker thread (health is LOADING until then)."""
        self._bind_loop()
        await asyncio.wrap_future(self.worker.start())

    def start_in_background(self) -> None:
        """Start loading without waiting (the service answers LOADING meanwhile); called on the
        event loop, which then restarts a worker that fails."""
        self._bind_loop()
        self.worker.start()

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.loop_thread.claim()
        if not self._watching:
            self._watching.spawn(self._watchdog.run())

    async def stop(self) -> None:
        """End every session, wait for background work, then stop the worker thread (a hung
        one is not waited for)."""
        self.loop_thread.assert_current()
        self._stopping = True
        self._watching.cancel()
        await asyncio.gather(
            *(self.close_session(sid, "the engine is stopping") for sid in list(self.sessions))
        )
        await self.tasks.wait()
        await asyncio.to_thread(self.worker.stop)

    # -- the hand-offs between the threads -----------------------------------------------------
    async def on_worker(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the worker thread between batches (EngineUnavailableError while there
        is no worker: it failed and a new one is not started yet)."""
        return await self._to_worker(lambda _worker: fn())

    async def _to_worker(self, fn: Callable[[Worker], R]) -> R:
        """The loop's one way to the worker thread: run ``fn(worker)`` there, await its result."""
        self.loop_thread.assert_current()
        worker = self.worker
        if self.fault is not None and not worker.alive:
            raise self._unavailable()
        try:
            return await asyncio.wrap_future(worker.call(lambda: fn(worker)))
        except WorkerFaultError as exc:
            raise self._unavailable() from exc

    def _report_fault(self, fault: WorkerFaultError) -> None:
        """Worker thread, as it ends: the worker's way back, posted to the loop, which takes the
        fault up and restarts it (``_loop`` was set before any worker thread started)."""
        if not post_to_loop(self._loop, self._fault_arrived, fault):
            logger.warning("the worker failed with no event loop to restart it: %r", fault.cause)

    # -- faults: a worker that dies is rebuilt ------------------------------------------------
    def _fault_arrived(self, fault: WorkerFaultError) -> None:
        self.loop_thread.assert_current()
        self._recovery.begin(fault)
        if not self._stopping:
            self.tasks.spawn(self._recover(fault))

    async def _recover(self, fault: WorkerFaultError) -> None:
        """A new worker on the same transform (closed by the old one, loaded again by the new
        one); the open sessions are attached to it, or ended with the reason it did not work."""
        self.loop_thread.assert_current()
        if not self._stopping:
            await self._recovery.recover(
                fault, self._start_new_worker, self._reattach, self.sessions.values
            )

    async def _start_new_worker(self) -> None:
        self.worker = self._build_worker()
        await asyncio.wrap_future(self.worker.start())

    async def _reattach(
        self,
        stuck: tuple[tuple[Session, AnyJob], ...] = (),
        fault: WorkerFaultError | None = None,
    ) -> int:
        """Serve the open sessions on the new worker; the ``stuck`` jobs of those fail first
        (their sessions count the error and show their last good frame)."""
        sessions = list(self.sessions.values())
        failing = [(session, job) for session, job in stuck if session in sessions]

        def on_worker(worker: Worker) -> None:
            self.worker_side.reattach(worker, sessions)
            finished = now()
            for session, job in failing:
                if session.end_reason is None and fault is not None:
                    session.fail(job, fault.cause, finished)

        await self._to_worker(on_worker)
        return len(sessions)

    # -- hangs: a worker stuck in a transform call is abandoned -----------------------------
    def _worker_hung(self, worker: Worker, activity: Activity, fault: WorkerHungError) -> None:
        """The watchdog's report: ``worker`` is stuck in ``activity``. Abandon it; then replace
        it with a worker on a new transform, or exit where this process cannot recover."""
        self.loop_thread.assert_current()
        if self._stopping or self._recovery.exiting or worker is not self.worker:
            return
        if not worker.abandon(activity, fault):
            return  # it returned just now
        self.metrics.workers_abandoned.inc()
        self.metrics.errors.labels(fault.kind).inc()
        logger.error("%s; the worker is abandoned", fault.cause)
        why = self._recovery.exit_reason(self.transform.device)
        if why is not None:
            self.tasks.spawn(self._recovery.exit_after_hang(fault, why, self._open_sessions))
        elif self._recovery.fault is None:  # else a recovery is under way: its start fails
            self._recovery.begin(fault)
            self.tasks.spawn(self._recover_from_hang(fault, activity))

    def _open_sessions(self) -> list[Session]:
        return list(self.sessions.values())

    async def _recover_from_hang(self, fault: WorkerHungError, stuck: Activity) -> None:
        """As for a dead worker, but on a new transform instance (the stuck thread still holds
        the old one); the frames stuck in the batch fail, as a frame that raised does."""
        self.loop_thread.assert_current()
        if not self._stopping:
            await self._recovery.recover(
                fault,
                self._start_fresh_worker,
                lambda: self._reattach(stuck.batch, fault),
                self.sessions.values,
            )

    async def _start_fresh_worker(self) -> None:
        self.transform = type(self.transform)(self.settings)
        self.worker_side = self._build_worker_side(self.transform)
        await self._start_new_worker()

    def _unavailable(self) -> EngineUnavailableError:
        restarting = self._loop is not None and not self._stopping
        return self._recovery.unavailable(self.fault, restarting)

    # -- status (any thread) -------------------------------------------------------------------
    def health(self) -> Health:
        """LOADING until warm, ERROR if the worker failed, else OK with sessions, IDLE without."""
        if self.fault is not None:
            return "ERROR"
        state = self.worker.state
        if state in (WorkerState.NEW, WorkerState.LOADING):
            return "LOADING"
        if state is not WorkerState.READY or not self.worker.alive:
            return "ERROR"
        return "OK" if self.sessions else "IDLE"

    def check_can_open(self) -> None:
        """Raise :class:`EngineUnavailableError` (with the reason) unless a session may open."""
        status = self.health()
        if status == "LOADING":
            raise EngineUnavailableError(
                "the model is still loading; try again shortly", reason="loading"
            )
        if self.fault is not None:
            raise self._unavailable()
        if status == "ERROR":
            raise EngineUnavailableError(
                f"the transform failed to load: {self.worker.load_error!r}", reason="worker_error"
            )
        if len(self.sessions) + self._reserved >= self.settings.max_sessions:
            raise EngineUnavailableError(
                f"all {self.settings.max_sessions} session slots are in use; try again later",
                reason="sessions_full",
            )

    # -- params ------------------------------------------------------------------------------
    def validate(
        self, values: Mapping[str, Any], base: TransformParams | None = None
    ) -> TransformParams:
        """``values`` over ``base`` (or over the defaults), validated by the transform's params
        model, whose model ids must be on the allow-list (raises pydantic.ValidationError naming
        the bad field). Any thread: it reads the published defaults once."""
        return self.params_rules.validate(values, self.defaults, base)

    async def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        """Whether moving from ``old`` to ``new`` reloads the model (asked on the worker)."""
        self.loop_thread.assert_current()
        return await self._to_worker(lambda _: self.worker_side.requires_reload(old, new))

    async def update_params(self, session_id: str, patch: Mapping[str, Any]) -> TransformParams:
        """Merge ``patch`` into the session's params, validate, apply from its next frame; what
        they point at (a style image) is fetched here first, on the loop
        (``Transform.resolve_params``), so the worker never waits on the network."""
        self.loop_thread.assert_current()
        session = self.get(session_id)
        await self._resolve_patch(session, patch)
        others = self._others(session_id)
        return await self._to_worker(lambda _: self.worker_side.apply(session, patch, others))

    async def _resolve_patch(self, session: Session, patch: Mapping[str, Any]) -> None:
        """What ``patch`` over the session's params points at, fetched on the loop. The
        session's params seen here may still lack an update on its way to the worker, so a
        patch that does not validate over them is not refused here: the worker validates it
        over the params in force, in the order the updates came, and its refusal is the one."""
        try:
            wanted = self.validate(patch, session.params)
        except ValidationError:
            return
        await self.transform.resolve_params(wanted)

    async def load_for(self, params: TransformParams, session_id: str | None = None) -> None:
        """Reload (and warm up) the model ``params`` ask for, if it is not the loaded one; with
        ``session_id``, that session (which must be alone) takes ``params`` in the same step."""
        self.loop_thread.assert_current()
        session = self.get(session_id) if session_id is not None else None
        await self.transform.resolve_params(params)
        others = self._others(session_id)
        await self._to_worker(lambda _: self.worker_side.load_for(params, session, others))

    def _others(self, session_id: str | None) -> int:
        return len([sid for sid in self.sessions if sid != session_id]) + self._reserved

    # -- sessions ----------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"no session {session_id!r}") from None

    async def open_session(
        self,
        params: TransformParams,
        *,
        session_id: str | None = None,
        adapt_output: Adapter = unchanged,
        on_end: Callable[[str], None] | None = None,
    ) -> Session:
        """A new session, attached to the worker (which may first load the model it asks for).

        ``on_end(reason)`` is called on the event loop when the session ends itself (too many
        failed frames); the face then closes it with :meth:`close_session`.
        """
        self.loop_thread.assert_current()
        self.check_can_open()
        await self.transform.resolve_params(params)
        session = self._new_session(params, session_id, adapt_output)
        others = self._others(None)
        self._reserved += 1
        try:
            await self._to_worker(lambda worker: self.worker_side.attach(worker, session, others))
        finally:
            self._reserved -= 1
        if on_end is not None:
            session.report_end_on(asyncio.get_running_loop(), on_end)
        self.sessions[session.id] = session
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.sessions_total.inc()
        return session

    def _new_session(
        self, params: TransformParams, session_id: str | None, adapt_output: Adapter
    ) -> Session:
        return Session(
            session_id or secrets.token_hex(8),
            params,
            SessionStats(self.metrics, self.settings.stats_window_s),
            error_limit=self.settings.transform_error_limit,
            on_input=self._notify_worker,
            adapt_output=adapt_output,
            max_input_pixels=self.settings.max_input_pixels,
        )

    def _notify_worker(self) -> None:
        """A session's frame is waiting (any thread): wake whichever worker serves now."""
        self.worker.notify()

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session and release what the transform held for it; False if not open."""
        self.loop_thread.assert_current()
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.metrics.sessions_active.set(len(self.sessions))
        session.on_end = None
        session.end(reason)
        if self.worker.alive:
            try:
                await self._to_worker(lambda worker: worker.detach_here(session))
            except EngineUnavailableError as exc:  # it died or hung meanwhile: nothing to detach
                logger.info("session %s: not detached from the worker: %s", session_id, exc)
        session.close_outputs()
        logger.info("session %s closed: %s", session_id, reason)
        return True

    # -- reporting ---------------------------------------------------------------------------
    def session_stats(self, session: Session) -> dict[str, Any]:
        """A session's counters, rates, latency percentiles (ingest to send) and params."""
        return {
            "pipeline": self.transform.name,
            "params": session.params.model_dump(mode="json"),
            "pipeline_state": self.transform.describe_session(session.params),
            **session.stats.report(),
        }
