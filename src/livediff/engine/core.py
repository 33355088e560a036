"""``Engine``: the one engine behind every face (HTTP/WebRTC service, ai-runner adapter, ...).

It owns the transform, the worker thread that runs it, the metrics and the open sessions, and
decides everything a face would otherwise decide again: how params are merged and validated,
when a params change reloads the model (on the worker thread, refused while other sessions use
it), how the model is warmed up, how a session opens and closes, and what its stats say. A face
adapts it to a protocol and nothing more: the server keeps its peers and HTTP mapping, the runner
its stream-id switching and tensor contract.

Threads: the methods here run on the event loop; whatever touches the transform is sent to the
worker thread (:meth:`Worker.call`), as :mod:`livediff.transforms.base` promises.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import av
import numpy as np
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from livediff.config import Settings
from livediff.engine.errors import EngineUnavailableError, ModelInUseError, UnknownSessionError
from livediff.engine.session import Adapter, Session, unchanged
from livediff.engine.stats import Metrics, SessionStats
from livediff.engine.tasks import TaskSet
from livediff.engine.worker import Worker, WorkerFaultError, WorkerState
from livediff.frames import Frame, Image, RgbArray
from livediff.transforms import Job, Transform, TransformParams, resolve_transform

logger = logging.getLogger(__name__)

R = TypeVar("R")
Health = Literal["LOADING", "IDLE", "OK", "ERROR"]
WarmupImage = Callable[[int, int, str], Image]
#: The span over which ``worker_restarts`` restarts of a failed worker are allowed.
RESTART_WINDOW_S = 600.0


class Engine:
    """Transform + worker + metrics + sessions, behind one facade that every face uses."""

    def __init__(
        self,
        settings: Settings,
        transform: Transform | None = None,
        *,
        warmup_image: WarmupImage | None = None,
    ) -> None:
        """``warmup_image(width, height, device)`` makes the warm-up frames in the form the face
        delivers frames in (default: yuv420p video frames, as WebRTC decoders give them)."""
        self.settings = settings
        self._warmup_image = warmup_image or warmup_video_frame
        self.metrics = Metrics()
        self.transform = transform or resolve_transform(settings.pipeline)(settings)
        self.worker = self._build_worker()
        self.sessions: dict[str, Session] = {}
        self.tasks = TaskSet("engine")
        #: What a new session's params start from: the configured defaults, then (once loaded)
        #: what the transform has loaded. Refreshed on the worker thread after every (re)load.
        self.defaults: dict[str, Any] = type(self.transform).default_params(settings)
        #: Model ids params may name: the configured ones, the transform's defaults and
        #: ``allow_models``; nothing else reaches the transform's loader.
        self.allowed_models = self._models_allowed()
        self._reserved = 0  # sessions being opened (counted against the limit and the model)
        #: The params the loaded model was loaded (or last reloaded) for; worker thread only.
        self._loaded_for: TransformParams | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: What killed the worker, until a new one serves again (health is ERROR meanwhile).
        self.fault: WorkerFaultError | None = None
        self._recovery = ""  # what is done about the fault, for refusals: a sentence's end
        self._restarts: deque[float] = deque()
        self._stopping = False

    def _build_worker(self) -> Worker:
        """The one place a Worker is made: at start, and again after a worker failed."""
        return Worker(
            self.transform,
            self.metrics,
            max_batch=self.settings.max_batch,
            pinned_buffers=self.settings.pinned_buffers,
            after_load=self._after_load,
            on_fault=self._worker_failed,
        )

    def _models_allowed(self) -> frozenset[str]:
        configured = {self.settings.model, self.settings.vae, *self.settings.allow_models}
        defaults = self.transform.params_model.model_construct(**self.defaults)
        return frozenset(configured | set(type(self.transform).model_ids(defaults).values()))

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up the transform on the worker thread (health is LOADING until then)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.wrap_future(self.worker.start())

    def start_in_background(self) -> None:
        """Start loading without waiting (the service answers LOADING meanwhile); called on the
        event loop, which then restarts a worker that fails."""
        self._loop = asyncio.get_running_loop()
        self.worker.start()

    async def stop(self) -> None:
        """End every session, wait for background work, then stop the worker thread."""
        self._stopping = True
        await asyncio.gather(
            *(self.close_session(sid, "the engine is stopping") for sid in list(self.sessions))
        )
        await self.tasks.wait()
        await asyncio.to_thread(self.worker.stop)

    def _after_load(self) -> None:
        """Worker thread, after ``load()``: learn the loaded params, then warm up with them."""
        self.metrics.model_loads.inc()
        self._refresh_defaults()
        self._loaded_for = self.validate({})
        self.warm_up(self._loaded_for)

    def _refresh_defaults(self) -> None:
        configured = type(self.transform).default_params(self.settings)
        self.defaults = {**configured, **self.transform.loaded_params()}

    def warm_up(self, params: TransformParams) -> None:
        """Worker thread: feed test frames through the transform until one comes out.

        That compiles, autotunes and allocates for ``params`` before a client's frame arrives.
        """
        state = self.transform.open_session(params)
        try:
            card = self._warmup_image(params.width, params.height, self.transform.device)
            for index in range(self.settings.warmup_frames):
                job = Job("warm-up", Frame(image=card, pts=index), params, state)
                if self.transform.process([job])[0] is not None:
                    self.transform.synchronize()
                    return
        finally:
            self.transform.close_session(state)
        raise RuntimeError(
            f"the {self.transform.name} transform gave no frame for "
            f"{self.settings.warmup_frames} warm-up frames"
        )

    async def on_worker(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the worker thread between batches (EngineUnavailableError while there
        is no worker: it failed and a new one is not started yet)."""
        if self.fault is not None and not self.worker.alive:
            raise self._unavailable()
        try:
            return await asyncio.wrap_future(self.worker.call(fn))
        except WorkerFaultError as exc:
            raise self._unavailable() from exc

    # -- faults: a worker that dies is rebuilt ------------------------------------------------
    def _worker_failed(self, fault: WorkerFaultError) -> None:
        """Worker thread, as it ends on ``fault``: count it; the event loop restarts it."""
        self._recovery = "is restarting; try again shortly"
        self.fault = fault
        self.metrics.errors.labels(fault.kind).inc()
        loop = self._loop
        if loop is None or self._stopping:
            return
        try:
            loop.call_soon_threadsafe(self._recover_later, fault)
        except RuntimeError:  # the loop has closed: nobody is left to serve
            logger.warning("the worker failed after the event loop closed: %r", fault.cause)

    def _recover_later(self, fault: WorkerFaultError) -> None:
        self.tasks.spawn(self._recover(fault))

    async def _recover(self, fault: WorkerFaultError) -> None:
        """A new worker on the same transform (closed by the old one, loaded again by the new
        one); the open sessions are attached to it, or ended with the reason it did not work."""
        if self._stopping:
            return
        if not self._may_restart():
            self._end_sessions(
                f"the worker failed ({fault.cause!r}) more than {self.settings.worker_restarts}"
                f" times in {RESTART_WINDOW_S:g} s; it is not restarted again"
            )
            return
        self.metrics.worker_restarts.inc()
        logger.warning("restarting the worker after %r", fault.cause)
        self.worker = self._build_worker()
        try:
            await asyncio.wrap_future(self.worker.start())
        except Exception as exc:
            self.metrics.errors.labels("worker_restart_failed").inc()
            self._end_sessions(
                f"the worker failed ({fault.cause!r}) and could not restart: {exc!r}"
            )
            return
        sessions = list(self.sessions.values())
        await asyncio.wrap_future(self.worker.call(lambda: self._reattach(sessions)))
        self.fault = None
        logger.info("the worker serves again (%d session(s) re-attached)", len(sessions))

    def _may_restart(self) -> bool:
        moment = time.monotonic()
        while self._restarts and moment - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= self.settings.worker_restarts:
            return False
        self._restarts.append(moment)
        return True

    def _reattach(self, sessions: list[Session]) -> None:
        """Worker thread: serve the sessions that are still open (their state made anew), but
        not one that an open already attached to this worker."""
        attached = self.worker.attached
        for session in sessions:
            if session.end_reason is None and session not in attached:
                self.worker.attach_here(session)

    def _end_sessions(self, reason: str) -> None:
        self._recovery = "could not be restarted (see /health and the log)"
        logger.error("%s; ending %d session(s)", reason, len(self.sessions))
        for session in list(self.sessions.values()):
            session.end(reason)

    def _unavailable(self) -> EngineUnavailableError:
        cause = f" ({self.fault.cause!r})" if self.fault is not None else ""
        message = f"the worker failed{cause} and {self._recovery or 'is not running'}"
        return EngineUnavailableError(message, reason="worker_error")

    # -- status ------------------------------------------------------------------------------
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
        the bad field)."""
        start = base.model_dump() if base is not None else self.defaults
        params = self.transform.params_model.model_validate({**start, **values})
        refusals = self._models_refused(params)
        if refusals:
            raise ValidationError.from_exception_data(type(params).__name__, refusals)
        return params

    def _models_refused(self, params: TransformParams) -> list[InitErrorDetails]:
        return [
            {
                "type": PydanticCustomError(
                    "model_not_allowed",
                    "{value} is not an allowed model on this server; start it with"
                    " --allow-model {value} (or add it to LIVEDIFF_ALLOW_MODELS) to allow it",
                    {"value": value},
                ),
                "loc": loc,
                "input": value,
            }
            for loc, value in type(self.transform).model_ids(params).items()
            if value not in self.allowed_models
        ]

    async def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        """Whether moving from ``old`` to ``new`` reloads the model (asked on the worker)."""
        return await self.on_worker(lambda: self.transform.requires_reload(old, new))

    async def update_params(self, session_id: str, patch: Mapping[str, Any]) -> TransformParams:
        """Merge ``patch`` into the session's params, validate, apply from its next frame."""
        session = self.get(session_id)
        others = self._others(session_id)
        return await self.on_worker(lambda: self._apply(session, patch, others))

    async def load_for(self, params: TransformParams, session_id: str | None = None) -> None:
        """Reload (and warm up) the model ``params`` ask for, if it is not the loaded one; with
        ``session_id``, that session (which must be alone) takes ``params`` in the same step."""
        session = self.get(session_id) if session_id is not None else None
        others = self._others(session_id)

        def load_and_apply() -> None:
            self._reload_if_needed(self._loaded_params(), params, others)
            if session is not None:
                session.set_params(params)

        await self.on_worker(load_and_apply)

    def _apply(self, session: Session, patch: Mapping[str, Any], others: int) -> TransformParams:
        """Worker thread: merge ``patch`` into the params the session has now (so that updates
        sent back to back all count), reload when the change needs it (alone only), swap in."""
        new = self.validate(patch, base=session.params)
        self._reload_if_needed(session.params, new, others)
        self.transform.validate_params(new)
        session.set_params(new)
        return new

    def _reload_if_needed(self, old: TransformParams, new: TransformParams, others: int) -> None:
        """Worker thread: the reload policy. One model serves every session, so only a session
        alone may change it; a reload warms the new model up before any frame reaches it."""
        if not self.transform.requires_reload(old, new):
            return
        if others:
            self.metrics.reloads_refused.inc()
            raise ModelInUseError(
                f"these params need another model, but the loaded one serves {others} other "
                "session(s); change the model when no other session is open, or run another "
                "server for it"
            )
        logger.info("params change reloads the %s transform", self.transform.name)
        self.transform.reload(new)
        self.metrics.model_loads.inc()
        self._refresh_defaults()
        self._loaded_for = new
        self.warm_up(new)

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
        self.check_can_open()
        session = Session(
            session_id or secrets.token_hex(8),
            params,
            SessionStats(self.metrics, self.settings.stats_window_s),
            error_limit=self.settings.transform_error_limit,
            on_input=self._notify_worker,
            adapt_output=adapt_output,
            max_input_pixels=self.settings.max_input_pixels,
        )
        others = self._others(None)
        self._reserved += 1
        try:
            await self.on_worker(lambda: self._attach(session, others))
        finally:
            self._reserved -= 1
        self._watch_end(session, on_end)
        self.sessions[session.id] = session
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.sessions_total.inc()
        return session

    def _notify_worker(self) -> None:
        """A session's frame is waiting: wake whichever worker serves now."""
        self.worker.notify()

    def _attach(self, session: Session, others: int) -> None:
        """Worker thread: load the session's model if it asks for another, then serve it."""
        self._reload_if_needed(self._loaded_params(), session.params, others)
        self.transform.validate_params(session.params)
        self.worker.attach_here(session)

    def _loaded_params(self) -> TransformParams:
        return self._loaded_for if self._loaded_for is not None else self.validate({})

    def _watch_end(self, session: Session, on_end: Callable[[str], None] | None) -> None:
        if on_end is None:
            return
        loop = asyncio.get_running_loop()

        def ended_from_any_thread(reason: str) -> None:
            loop.call_soon_threadsafe(on_end, reason)

        session.on_end = ended_from_any_thread

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session and release what the transform held for it; False if not open."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.metrics.sessions_active.set(len(self.sessions))
        session.on_end = None
        session.end(reason)
        if self.worker.alive:
            await asyncio.wrap_future(self.worker.detach(session))
        session.close_outputs()
        logger.info("session %s closed: %s", session_id, reason)
        return True

    # -- reporting ---------------------------------------------------------------------------
    def session_stats(self, session: Session) -> dict[str, Any]:
        """A session's counters, rates, latency percentiles (ingest to send) and params."""
        stats = session.stats
        fps_in, fps_out = stats.fps()
        latency = stats.latency()
        return {
            "pipeline": self.transform.name,
            "params": session.params.model_dump(mode="json"),
            "frames_in": stats.frames_in,
            "frames_processed": stats.frames_processed,
            "frames_out": stats.frames_out,
            "frames_dropped": stats.frames_dropped,
            "errors": stats.errors,
            "fps_in": round(fps_in, 2),
            "fps_out": round(fps_out, 2),
            "latency_ms": {
                "p50": round(latency.p50 * 1000, 2),
                "p95": round(latency.p95 * 1000, 2),
                "p99": round(latency.p99 * 1000, 2),
            },
        }


def warmup_card(width: int, height: int) -> RgbArray:
    """An RGB uint8 warm-up image: colour gradients, so that no model sees a flat picture."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    columns = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    mix = np.array([1.0, 0.5, 0.0], dtype=np.float32)[None, None, :]
    card = rows * mix + columns * (1.0 - mix)
    return np.ascontiguousarray((card * 255).round().astype(np.uint8))


def warmup_video_frame(width: int, height: int, _device: str) -> av.VideoFrame:
    """The warm-up card as a yuv420p video frame (what the WebRTC face's decoders deliver)."""
    frame = av.VideoFrame.from_ndarray(warmup_card(width, height), format="rgb24")
    return frame.reformat(format="yuv420p")
