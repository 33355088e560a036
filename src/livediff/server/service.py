"""The service: the transform, its worker and the open sessions, independent of HTTP routes.

``LivediffService(settings).mount(app)`` puts livediff's endpoints onto any FastAPI app (run
``service.lifespan`` in that app's lifespan); :func:`livediff.server.app.create_app` does both.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine import Metrics, Session, SessionStats, Worker, WorkerState
from livediff.media.egress import EncoderFrames
from livediff.media.peer import PublisherPeer, ViewerPeer
from livediff.media.sdp import Offer
from livediff.transforms import Transform, TransformParams, resolve_transform

logger = logging.getLogger(__name__)


class ServiceUnavailableError(Exception):
    """No session can be opened now (full, loading, or failed); HTTP 503."""


class UnknownSessionError(LookupError):
    """No open session has this id; HTTP 404."""


class ModelInUseError(Exception):
    """A params change would reload the model that other sessions are using; HTTP 409."""


@dataclass
class SessionRecord:
    """A session as the server knows it: the engine session and the peers around it."""

    session: Session
    kind: str
    etag: str
    created_at: float = field(default_factory=time.time)
    publisher: PublisherPeer | None = None
    viewers: dict[str, ViewerPeer] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def state(self) -> str:
        if self.session.end_reason is not None:
            return "closed"
        peer_state = self.publisher.connection_state if self.publisher else "new"
        return {"connected": "live", "failed": "closed", "closed": "closed"}.get(
            peer_state, "connecting"
        )


class LivediffService:
    """Owns the transform, the worker thread and every session."""

    def __init__(self, settings: Settings, transform: Transform | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.transform = transform or resolve_transform(settings.pipeline)(settings)
        self.worker = Worker(self.transform, self.metrics, max_batch=settings.max_batch)
        self.sessions: dict[str, SessionRecord] = {}
        self._opening = 0
        self._closing: set[asyncio.Task[bool]] = set()

    # -- lifecycle -----------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _app: FastAPI | None = None) -> AsyncIterator[None]:
        """Start the worker (the model loads in the background: /health says LOADING)."""
        self.worker.start()
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        await asyncio.gather(
            *(self.close_session(sid, "service shutting down") for sid in list(self.sessions)),
            *self._closing,
            return_exceptions=True,
        )
        await asyncio.to_thread(self.worker.stop)

    def mount(self, app: FastAPI) -> None:
        """Add livediff's middleware and routes to ``app``."""
        from livediff.server.app import mount_service

        mount_service(self, app)

    # -- status ---------------------------------------------------------------------------------
    def health(self) -> str:
        state = self.worker.state
        if state in (WorkerState.NEW, WorkerState.LOADING):
            return "LOADING"
        if state is not WorkerState.READY or not self.worker.alive:
            return "ERROR"
        return "OK" if self.sessions else "IDLE"

    def _check_can_open(self) -> None:
        status = self.health()
        if status == "LOADING":
            raise ServiceUnavailableError("the model is still loading; try again shortly")
        if status == "ERROR":
            error = self.worker.load_error
            raise ServiceUnavailableError(f"the transform failed to load: {error!r}")
        if len(self.sessions) + self._opening >= self.settings.max_sessions:
            raise ServiceUnavailableError(
                f"all {self.settings.max_sessions} session slots are in use; try again later"
            )

    # -- params -------------------------------------------------------------------------------
    def initial_params(self, patch: Mapping[str, Any]) -> TransformParams:
        """The transform's defaults (output size from settings) updated by ``patch`` (validated)."""
        defaults = self.transform.default_params()
        return self.transform.params_model.model_validate({**defaults, **patch})

    async def update_params(self, session_id: str, patch: Mapping[str, Any]) -> TransformParams:
        """Merge, validate and apply a params update; reloads weights only when it must."""
        record = self.get(session_id)
        new = record.session.merged_params(patch)
        old = record.session.params
        if self.transform.requires_reload(old, new):
            self._refuse_shared_reload(new, session_id)
            await asyncio.wrap_future(self.worker.call(lambda: self.transform.reload(new)))
        record.session.set_params(new)
        return new

    async def params_message(self, session_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A params update from a data channel, answered as a message."""
        try:
            params = await self.update_params(session_id, patch)
        except ValidationError as exc:
            detail = exc.errors(include_url=False, include_context=False)
            return {"type": "error", "status": 422, "detail": detail}
        except UnknownSessionError:
            return {"type": "error", "status": 404, "detail": "the session is closed"}
        except ModelInUseError as exc:
            return {"type": "error", "status": 409, "detail": str(exc)}
        return {"type": "params", "params": params.model_dump(mode="json")}

    def _refuse_shared_reload(self, new: TransformParams, session_id: str | None) -> None:
        """The worker holds one model for all sessions: only a session alone may change it."""
        others = len([sid for sid in self.sessions if sid != session_id]) + self._opening
        if others:
            raise ModelInUseError(
                f"these params need another model, but the loaded one serves {others} other "
                "session(s); change the model when no other session is open, or run another "
                "server for it"
            )

    # -- sessions -----------------------------------------------------------------------------
    def get(self, session_id: str) -> SessionRecord:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"no session {session_id!r}") from None

    async def open_session(
        self, offer: Offer, params: TransformParams, kind: str
    ) -> tuple[SessionRecord, str]:
        """Answer a publisher's offer; returns the new session and the answer SDP."""
        self._check_can_open()
        if self.transform.requires_reload(self.initial_params({}), params):
            self._refuse_shared_reload(params, None)
        self._opening += 1
        try:
            record = self._new_record(params, kind)
            try:  # attaching may load the session's model: it can fail like the offer
                await asyncio.wrap_future(self.worker.attach(record.session))
                answer = await record.publisher.accept(offer)  # type: ignore[union-attr]
            except BaseException:
                await self._release(record, "the session could not open")
                raise
        finally:
            self._opening -= 1
        self.sessions[record.id] = record
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.sessions_total.inc()
        logger.info("session %s opened (%s)", record.id, kind)
        return record, answer

    def _new_record(self, params: TransformParams, kind: str) -> SessionRecord:
        session_id = secrets.token_hex(8)
        session = Session(
            session_id,
            params,
            SessionStats(self.metrics, self.settings.stats_window_s),
            error_limit=self.settings.transform_error_limit,
            on_input=self.worker.notify,
            adapt_output=EncoderFrames(),
        )
        record = SessionRecord(session=session, kind=kind, etag=f'"{secrets.token_hex(8)}"')
        loop = asyncio.get_running_loop()

        def end_from_any_thread(reason: str) -> None:
            loop.call_soon_threadsafe(self._close_later, session_id, reason)

        session.on_end = end_from_any_thread
        record.publisher = PublisherPeer(
            session, self.settings, on_params=lambda patch: self.params_message(session_id, patch)
        )
        record.publisher.on_closed = lambda reason: self._close_later(session_id, reason)
        return record

    def _close_later(self, session_id: str, reason: str) -> None:
        task = asyncio.ensure_future(self.close_session(session_id, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session and release everything it held; False if it was not open."""
        record = self.sessions.pop(session_id, None)
        if record is None:
            return False
        self.metrics.sessions_active.set(len(self.sessions))
        logger.info("session %s closed: %s", session_id, reason)
        await self._release(record, reason)
        return True

    async def _release(self, record: SessionRecord, reason: str) -> None:
        record.session.end(reason)
        peers = [*record.viewers.values(), *([record.publisher] if record.publisher else [])]
        record.viewers.clear()
        await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)
        if self.worker.alive:
            await asyncio.wrap_future(self.worker.detach(record.session))
        record.session.close_outputs()

    # -- viewers (WHEP) -----------------------------------------------------------------------
    async def add_viewer(self, session_id: str, offer: Offer) -> tuple[str, str]:
        """Answer a viewer's offer for a session's output; returns (viewer id, answer SDP)."""
        record = self.get(session_id)
        viewer = ViewerPeer(record.session, self.settings, record.publisher)
        viewer_id = secrets.token_hex(6)
        viewer.on_closed = lambda reason: self._drop_viewer_later(session_id, viewer_id, reason)
        try:
            answer = await viewer.accept(offer)
        except BaseException:
            await viewer.close()
            raise
        record.viewers[viewer_id] = viewer
        return viewer_id, answer

    def _drop_viewer_later(self, session_id: str, viewer_id: str, reason: str) -> None:
        task = asyncio.ensure_future(self.close_viewer(session_id, viewer_id, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_viewer(self, session_id: str, viewer_id: str, reason: str) -> bool:
        record = self.sessions.get(session_id)
        viewer = record.viewers.pop(viewer_id, None) if record else None
        if viewer is None:
            return False
        logger.info("session %s: viewer %s left: %s", session_id, viewer_id, reason)
        await viewer.close()
        return True

    # -- reporting ----------------------------------------------------------------------------
    def describe(self, record: SessionRecord) -> dict[str, Any]:
        stats = record.session.stats
        fps_in, fps_out = stats.fps()
        latency = stats.latency()
        return {
            "session_id": record.id,
            "kind": record.kind,
            "state": record.state,
            "pipeline": self.transform.name,
            "created_at": record.created_at,
            "params": record.session.params.model_dump(mode="json"),
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
            "viewers": len(record.viewers),
        }
