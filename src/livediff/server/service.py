"""The server's face of the engine: sessions as the HTTP/WebRTC/WHIP service sees them (the
engine session plus its peers), independent of HTTP routes.

:func:`livediff.server.app.mount_service` puts the routes onto any FastAPI app (run
``service.lifespan`` in that app's lifespan); :func:`livediff.server.app.create_app` does both.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from livediff.config import Settings
from livediff.engine import Engine, Session, TaskSet, gather_logged
from livediff.media.egress import EncoderFrames
from livediff.media.peer import PublisherPeer, ViewerPeer
from livediff.media.sdp import Offer
from livediff.server.errors import error_detail, status_for
from livediff.transforms import Transform, TransformParams

logger = logging.getLogger(__name__)


@dataclass
class SessionRecord:
    """A session as the server knows it: the engine session and the peers around it."""

    session: Session
    kind: str
    etag: str
    publisher: PublisherPeer
    created_at: float = field(default_factory=time.time)
    viewers: dict[str, ViewerPeer] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def connection(self) -> str:
        """closed, live or connecting: the session's end and its publisher's peer state."""
        if self.session.end_reason is not None:
            return "closed"
        return {"connected": "live", "failed": "closed", "closed": "closed"}.get(
            self.publisher.connection_state, "connecting"
        )


class LivediffService:
    """The engine, and every session's peers and records."""

    def __init__(self, settings: Settings, transform: Transform | None = None) -> None:
        self.settings = settings
        self.engine = Engine(settings, transform)
        self.records: dict[str, SessionRecord] = {}
        self.tasks = TaskSet("service")

    # -- lifecycle -----------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, _app: FastAPI | None = None) -> AsyncIterator[None]:
        """Start the engine (the model loads in the background: /health says LOADING)."""
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
        self.engine.get(session_id)  # raises UnknownSessionError for a closed one
        return self.records[session_id]

    async def open_session(
        self, offer: Offer, params: TransformParams, kind: str
    ) -> tuple[SessionRecord, str]:
        """Answer a publisher's offer; returns the new session and the answer SDP."""
        session_id = secrets.token_hex(8)
        session = await self.engine.open_session(
            params,
            session_id=session_id,
            adapt_output=EncoderFrames(),
            on_end=lambda reason: self._close_later(session_id, reason),
        )
        publisher = PublisherPeer(
            session, self.settings, on_params=lambda patch: self.params_message(session_id, patch)
        )
        publisher.on_closed = lambda reason: self._close_later(session_id, reason)
        record = SessionRecord(session, kind, f'"{secrets.token_hex(8)}"', publisher)
        self.records[session_id] = record
        try:
            answer = await publisher.accept(offer)
        except BaseException:
            await self.close_session(session_id, "the session could not open")
            raise
        logger.info("session %s opened (%s)", session_id, kind)
        return record, answer

    def _close_later(self, session_id: str, reason: str) -> None:
        self.tasks.spawn(self.close_session(session_id, reason))

    async def close_session(self, session_id: str, reason: str) -> bool:
        """End a session and release everything it held; False if it was not open."""
        record = self.records.pop(session_id, None)
        if record is None:
            return False
        record.session.end(reason)
        peers = [*record.viewers.values(), record.publisher]
        record.viewers.clear()
        await gather_logged(f"session {session_id}", [peer.close() for peer in peers])
        await self.engine.close_session(session_id, reason)
        return True

    # -- viewers (WHEP) -----------------------------------------------------------------------
    async def add_viewer(self, session_id: str, offer: Offer) -> tuple[str, str]:
        """Answer a viewer's offer for a session's output; returns (viewer id, answer SDP)."""
        record = self.get(session_id)
        viewer = ViewerPeer(record.session, self.settings, record.publisher)
        viewer_id = secrets.token_hex(6)

        def viewer_closed(reason: str) -> None:
            self.tasks.spawn(self.close_viewer(session_id, viewer_id, reason))

        viewer.on_closed = viewer_closed
        try:
            answer = await viewer.accept(offer)
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
        logger.info("session %s: viewer %s left: %s", session_id, viewer_id, reason)
        await viewer.close()
        return True

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
        }
