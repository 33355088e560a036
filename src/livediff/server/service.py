"""The server's face of the engine: sessions as the HTTP/WebRTC/WHIP service sees them (the
engine session plus its peers), independent of HTTP routes.

:func:`livediff.server.app.mount_service` puts the routes onto any FastAPI app (run
``service.lifespan`` in that app's lifespan); :func:`livediff.server.app.create_app` does both.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI

from livediff.config import Settings
from livediff.encoding import EncoderFrames
from livediff.engine import Engine, Session, TaskSet, UnknownSessionError, gather_logged
from livediff.logs import session_context
from livediff.media import dtls_compat
from livediff.media.peer import PublisherPeer, ViewerPeer
from livediff.media.sdp import Offer, OfferLimits
from livediff.server.errors import ViewersFullError, error_detail, status_for
from livediff.server.limits import RateLimiter
from livediff.transforms import AnyTransform, TransformParams

logger = logging.getLogger(__name__)


#: A record's life: ``open`` (serving), ``closing`` (its peers and engine session are being
#: released), ``ended`` (released; out of ``records``). Each change is one step on the loop.
RecordState = Literal["open", "closing", "ended"]


@dataclass
class SessionRecord:
    """A session as the server knows it: the engine session, the peers around it, and where it
    is in its life (``state``, and the first ``end_reason``), which every route reads."""

    session: Session
    kind: str
    etag: str
    publisher: PublisherPeer
    created_at: float = field(default_factory=time.time)
    viewers: dict[str, ViewerPeer] = field(default_factory=dict)
    viewers_opening: int = 0  # WHEP offers being answered (counted against max_viewers)
    state: RecordState = "open"
    end_reason: str | None = None
    #: Set when the record is ``ended``: everything the session held is released.
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def connection(self) -> str:
        """closed, live or connecting: the session's end and its publisher's peer state."""
        if self.state != "open" or self.session.end_reason is not None:
            return "closed"
        return {"connected": "live", "failed": "closed", "closed": "closed"}.get(
            self.publisher.connection_state, "connecting"
        )

    def begin_close(self, reason: str) -> bool:
        """open -> closing with the first reason the session ended for (the engine's, if it
        ended the session itself first); False if it was not open. One step, on the loop."""
        if self.state != "open":
            return False
        self.session.end(reason)  # keeps a reason the engine set first
        self.state = "closing"
        self.end_reason = self.session.end_reason or reason
        return True

    def not_open(self) -> UnknownSessionError:
        """The 404 for a request that needs this session open."""
        if self.state == "closing":
            return UnknownSessionError(f"session {self.id!r} is closing: {self.end_reason}")
        return UnknownSessionError(f"session {self.id!r} ended: {self.end_reason}")


#: Most ended sessions remembered at once (the oldest are forgotten first).
MAX_ENDED = 1000


class EndedSessions:
    """What GET answered for each session the server ended, kept ``ttl_s`` seconds."""

    def __init__(
        self, ttl_s: float, limit: int = MAX_ENDED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._clock = clock
        self._infos: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def add(self, session_id: str, info: dict[str, Any]) -> None:
        if self.ttl_s <= 0:
            return
        self._infos[session_id] = (self._clock(), info)
        self._reap()

    def get(self, session_id: str) -> dict[str, Any] | None:
        self._reap()
        kept = self._infos.get(session_id)
        return kept[1] if kept is not None else None

    def _reap(self) -> None:
        moment = self._clock()
        while self._infos:
            session_id, (ended_at, _) = next(iter(self._infos.items()))
            if moment - ended_at <= self.ttl_s and len(self._infos) <= self.limit:
                return
            del self._infos[session_id]

    def __len__(self) -> int:
        self._reap()
        return len(self._infos)


class LivediffService:
    """The engine, and every session's peers and records."""

    def __init__(self, settings: Settings, transform: AnyTransform | None = None) -> None:
        self.settings = settings
        self.engine = Engine(settings, transform)
        self.records: dict[str, SessionRecord] = {}
        self.ended = EndedSessions(settings.ended_session_ttl_s)
        self.limiter = RateLimiter(settings.session_rate_per_min, settings.session_burst)
        self.offer_limits = OfferLimits(settings.max_sdp_bytes, settings.max_sdp_media)
        self.tasks = TaskSet("service")

    # -- lifecycle -----------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _app: FastAPI | None = None) -> AsyncIterator[None]:
        """Start the engine (the model loads in the background: /health says LOADING).

        Every way of serving passes here (create_app's app, and an app that mounts the service
        runs this lifespan, or no session can open), so this is also where the DTLS diagnostics
        are installed: from now on a failed handshake is logged with its reason.
        """
        dtls_compat.install()
        self.engine.start_in_background()
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        await gather_logged(
            "shutdown",
            [self.close_session(sid, "service shutting down") for sid in list(self.records)],
        )
        await self.tasks.wait()
        await self.engine.stop()

    # -- params -------------------------------------------------------------------------------
    async def update_params(self, session_id: str, patch: Mapping[str, Any]) -> TransformParams:
        """Merge, validate and apply a params update; reloads weights only when it must."""
        self.get(session_id)
        with session_context(session_id):
            return await self.engine.update_params(session_id, patch)

    async def params_message(self, session_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A params update from a data channel, answered as a message (errors as data)."""
        try:
            params = await self.update_params(session_id, patch)
        except Exception as exc:
            status = status_for(exc)
            if status is None:
                raise
            return {"type": "error", "status": status, "detail": error_detail(exc)}
        return {"type": "params", "params": params.model_dump(mode="json")}

    # -- sessions -----------------------------------------------------------------------------
    def get(self, session_id: str) -> SessionRecord:
        """The open session ``session_id``; UnknownSessionError (404) for one that is closing,
        ended or unknown. Only the record is read: its state changes in one step."""
        record = self.records.get(session_id)
        if record is None:
            raise self._unknown(session_id)
        if record.state != "open":
            raise record.not_open()
        return record

    def open_records(self) -> list[SessionRecord]:
        return [record for record in self.records.values() if record.state == "open"]

    def info(self, session_id: str) -> dict[str, Any]:
        """A session's info (state closed while it closes), or what it last said if the
        server ended it lately."""
        record = self.records.get(session_id)
        if record is not None:
            return self.session_info(record)
        ended = self.ended.get(session_id)
        if ended is None:
            raise UnknownSessionError(f"no session {session_id!r}")
        return ended

    def _unknown(self, session_id: str) -> UnknownSessionError:
        ended = self.ended.get(session_id)
        if ended is not None:
            return UnknownSessionError(f"session {session_id!r} ended: {ended['end_reason']}")
        return UnknownSessionError(f"no session {session_id!r}")

    async def open_session(
        self, offer: Offer, params: TransformParams, kind: str
    ) -> tuple[SessionRecord, str]:
        """Answer a publisher's offer; returns the new session and the answer SDP.

        The session's id is the logging context from here on: the tasks its peer starts
        (transports, the ingest pump) carry it into their records too.
        """
        session_id = secrets.token_hex(8)
        with session_context(session_id):
            return await self._open(session_id, offer, params, kind)

    async def _open(
        self, session_id: str, offer: Offer, params: TransformParams, kind: str
    ) -> tuple[SessionRecord, str]:
        session = await self.engine.open_session(
            params,
            session_id=session_id,
            adapt_output=EncoderFrames(),
            on_end=lambda reason: self._close_later(session_id, reason),
        )
        publisher = PublisherPeer(
            session, self.settings, on_params=lambda patch: self.params_message(session_id, patch)
        )
        publisher.on_closed = lambda reason: self._peer_closed(session_id, publisher, reason)
        record = SessionRecord(session, kind, f'"{secrets.token_hex(8)}"', publisher)
        self.records[session_id] = record
        try:
            answer = await publisher.accept(offer)
        except BaseException:
            await self.close_session(session_id, "the session could not open", remember=False)
            raise
        logger.info("session %s opened (%s)", session_id, kind)
        return record, answer

    def _peer_closed(self, session_id: str, publisher: PublisherPeer, reason: str) -> None:
        if publisher.connection_state == "failed":
            self.engine.metrics.errors.labels("peer_failed").inc()
        self._close_later(session_id, reason)

    def _close_later(self, session_id: str, reason: str) -> None:
        """Begin closing now (the record says closing from here on); the release is a task."""
        record = self.records.get(session_id)
        if record is not None:
            self._begin_close(record, reason, remember=True)

    def _begin_close(self, record: SessionRecord, reason: str, *, remember: bool) -> bool:
        """open -> closing (one step) and the task that releases it; False if not open."""
        if not record.begin_close(reason):
            return False
        self.tasks.spawn(self._release(record, remember))
        return True

    async def close_session(self, session_id: str, reason: str, *, remember: bool = True) -> bool:
        """End a session and release everything it held; False if it was not open.

        The publisher is told why on its params channel (``{"type": "ended", "reason": ...}``)
        before its peer closes. With ``remember``, GET still answers for the session (state
        closed, ``end_reason``) for ``ended_session_ttl_s``; a client's DELETE forgets it.
        """
        record = self.records.get(session_id)
        if record is None or not self._begin_close(record, reason, remember=remember):
            return False
        await record.released.wait()
        return True

    async def delete_session(self, session_id: str, reason: str) -> None:
        """A client's DELETE, answered once the session is released.

        An open session closes with ``reason`` and is forgotten. One that is closing or that
        the server ended lately (within ``ended_session_ttl_s``: its peer closed, too many
        failures) is already gone, so the DELETE succeeds too and keeps the first reason.
        Raises UnknownSessionError (404) only for a session livediff knows nothing of.
        """
        record = self.records.get(session_id)
        if record is None:
            if self.ended.get(session_id) is None:
                raise UnknownSessionError(f"no session {session_id!r}")
            return
        self._begin_close(record, reason, remember=False)  # no-op unless it is open
        await record.released.wait()

    async def _release(self, record: SessionRecord, remember: bool) -> None:
        """Close a closing session's viewers, publisher and engine session; then it is ended."""
        reason = record.end_reason or "closed"
        with session_context(record.id):
            try:
                viewers = list(record.viewers.values())
                record.viewers.clear()
                self._count_viewers()
                closing = [*(viewer.close() for viewer in viewers), record.publisher.close(reason)]
                await gather_logged(f"session {record.id}", closing)
                await self.engine.close_session(record.id, reason)
            finally:
                self._end(record, remember)

    def _end(self, record: SessionRecord, remember: bool) -> None:
        """closing -> ended in one step: out of ``records`` and, if ``remember``, into
        ``ended``; whoever waits for the release goes on."""
        del self.records[record.id]
        record.state = "ended"
        record.released.set()
        if remember:
            self.ended.add(record.id, self.session_info(record))

    # -- viewers (WHEP) -----------------------------------------------------------------------
    async def add_viewer(self, session_id: str, offer: Offer) -> tuple[str, str]:
        """Answer a viewer's offer for a session's output; returns (viewer id, answer SDP)."""
        record = self.get(session_id)
        limit = self.settings.max_viewers
        if len(record.viewers) + record.viewers_opening >= limit:
            raise ViewersFullError(
                f"session {session_id} has all {limit} viewer slots in use (max_viewers);"
                " try again later"
            )
        with session_context(session_id):
            record.viewers_opening += 1
            try:
                viewer_id, answer = await self._answer_viewer(record, offer)
            finally:
                record.viewers_opening -= 1
        self._count_viewers()
        return viewer_id, answer

    async def _answer_viewer(self, record: SessionRecord, offer: Offer) -> tuple[str, str]:
        viewer = ViewerPeer(record.session, self.settings, record.publisher)
        viewer_id = secrets.token_hex(6)

        def viewer_closed(reason: str) -> None:
            self.tasks.spawn(self.close_viewer(record.id, viewer_id, reason))

        viewer.on_closed = viewer_closed
        try:
            answer = await viewer.accept(offer)
            if record.state != "open":  # it began closing meanwhile
                raise record.not_open()
        except BaseException:
            await viewer.close()
            raise
        record.viewers[viewer_id] = viewer
        return viewer_id, answer

    async def close_viewer(self, session_id: str, viewer_id: str, reason: str) -> bool:
        record = self.records.get(session_id)
        viewer = record.viewers.pop(viewer_id, None) if record else None
        if viewer is None:
            return False
        with session_context(session_id):
            logger.info("session %s: viewer %s left: %s", session_id, viewer_id, reason)
            self._count_viewers()
            await viewer.close()
        return True

    def _count_viewers(self) -> None:
        watching = sum(len(record.viewers) for record in self.records.values())
        self.engine.metrics.viewers_active.set(watching)

    # -- reporting ----------------------------------------------------------------------------
    def session_info(self, record: SessionRecord) -> dict[str, Any]:
        """The engine's stats of the session plus what the server knows of it."""
        return {
            "session_id": record.id,
            "kind": record.kind,
            "state": record.connection,
            "created_at": record.created_at,
            **self.engine.session_stats(record.session),
            "viewers": len(record.viewers),
            "end_reason": record.end_reason or record.session.end_reason,
        }
