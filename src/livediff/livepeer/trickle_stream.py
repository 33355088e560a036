"""One stream of the runner contract, from ``POST /live-video-to-video`` to its channels' end.

A stream is a session of the :class:`~livediff.engine.Engine` plus five concurrent parts:

- ingest (:mod:`.ingest`): the input channel, from the live edge, decoded on a thread;
- egress (:mod:`.egress`): processed frames encoded on a thread, one segment per GOP;
- control (:mod:`.control`): params updates, applied through the engine (a refused update is
  an error event; the stream goes on);
- status: a status event every ``runner_status_interval_s`` (and one at once), the input
  watched for silence (``runner_input_timeout_s``);
- events: errors and ai-runner's ``stream_trace`` milestones.

It ends when the input channel ends (404 / ``Lp-Trickle-Closed``; the frames already in the
engine get up to a second to come out), when the output channel fails, when the transform fails
too often, or when :meth:`TrickleStream.stop` is called (a new stream replaces it, the runner
stops). Then every task and thread is ended, the session closed and the client closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from livediff.config import Settings
from livediff.encoding import EncoderFrames, EncoderSettings
from livediff.engine import Engine, Session, UnknownSessionError
from livediff.livepeer.control import follow_control
from livediff.livepeer.events import EventPublisher, StreamStatus
from livediff.livepeer.params import PARAMS_REFUSALS, refusal_message, transform_values
from livediff.livepeer.trickle import CURRENT_SEQ, NEXT_SEQ, TricklePublisher, TrickleSubscriber
from livediff.livepeer.ts_egress import Egress, LoopSegments, SegmentEncoder
from livediff.livepeer.ts_ingest import Ingest
from livediff.transforms import TransformParams

logger = logging.getLogger(__name__)

#: After the input ends, how long frames already in the engine may take to come out.
DRAIN_S = 1.0


@dataclass(frozen=True, slots=True)
class StreamChannels:
    """Where one stream's media and messages flow: its trickle channels (empty: none)."""

    subscribe_url: str
    publish_url: str
    control_url: str = ""
    events_url: str = ""


def trickle_client(settings: Settings) -> httpx.AsyncClient:
    """One stream's HTTP client. TLS is not verified unless configured: orchestrators serve
    trickle with self-signed certificates (ai-runner does not verify them either)."""
    read_s = max(30.0, settings.trickle_wait_s + 5.0)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_s, connect=5.0, pool=10.0),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        verify=settings.trickle_verify_tls,
        trust_env=False,
    )


class TrickleStream:
    """One stream: its session, channels, threads and tasks."""

    def __init__(
        self,
        engine: Engine,
        stream_id: str,
        channels: StreamChannels,
        params: TransformParams,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.channels = channels
        self.params = params
        self.settings = settings
        self.id = stream_id
        self.status = StreamStatus(pipeline=settings.runner_model_id)
        self.session: Session | None = None
        self.reason: str | None = None
        self.ended = asyncio.Event()
        self._stopping = asyncio.Event()
        self._events = EventPublisher(None, settings.runner_model_id)

    def stop(self, reason: str) -> None:
        """Ask the stream to end (it does so in the background; await :attr:`ended`)."""
        if self.reason is None:
            self.reason = reason
        self._stopping.set()

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the stream until it ends; everything it started is ended on the way out."""
        if self._stopping.is_set():  # replaced before it began
            self.ended.set()
            return
        client = trickle_client(self.settings)
        self._events = EventPublisher(self._events_channel(client), self.settings.runner_model_id)
        try:
            self._events.trace("runner_receive_stream_request")
            session = await self._open_session()
            if session is not None:
                await self._serve(session, client)
        finally:
            await self._close(client)

    def _events_channel(self, client: httpx.AsyncClient) -> TricklePublisher | None:
        if not self.channels.events_url:
            logger.warning("stream %s has no events_url: no status events", self.id)
            return None
        return self._publisher(client, self.channels.events_url, "application/json")

    async def _open_session(self) -> Session | None:
        try:
            self.session = await self.engine.open_session(
                self.params,
                session_id=self.id,
                adapt_output=EncoderFrames(),
                on_end=self._transform_failed,
            )
        except Exception as exc:  # any reason it cannot start is reported, not raised
            logger.exception("stream %s could not start", self.id)
            self._fail(f"the stream could not start: {refusal_message(exc)}")
            return None
        self.status.params_applied(self.params.model_dump(mode="json"))
        logger.info("stream %s opened on the %s transform", self.id, self.engine.transform.name)
        return self.session

    async def _serve(self, session: Session, client: httpx.AsyncClient) -> None:
        output = self._publisher(client, self.channels.publish_url, "video/mp2t")
        egress = self._egress(session, output)
        ingest = self._ingest(session, client, egress.encoder)
        ingest_task = asyncio.ensure_future(ingest.run())
        egress_task = asyncio.ensure_future(egress.run())
        stopping = asyncio.ensure_future(self._stopping.wait())
        side = [asyncio.ensure_future(self._report(session))]
        if self.channels.control_url:
            side.append(asyncio.ensure_future(self._control(session, client)))
        try:
            first = {ingest_task, egress_task, stopping}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if not self._stopping.is_set():  # a stopped stream ends at once, undrained
                await self._ended_by(session, ingest_task, egress_task)
        finally:
            await self._end_tasks(ingest_task, stopping, *side)
            await self.engine.close_session(session.id, self.reason or "the stream ended")
            await asyncio.gather(egress_task, return_exceptions=True)
            await egress.finish()

    def _egress(self, session: Session, output: TricklePublisher) -> Egress:
        segments = LoopSegments(
            asyncio.get_running_loop(),
            output,
            on_first=lambda: self._trace("runner_send_first_processed_segment"),
        )
        encoder = SegmentEncoder(
            EncoderSettings.from_settings(self.settings), segments, session, self.status
        )
        return Egress(session, output, encoder, failure_limit=self.settings.trickle_retries)

    def _ingest(
        self, session: Session, client: httpx.AsyncClient, encoder: SegmentEncoder
    ) -> Ingest:
        subscriber = self._subscriber(client, self.channels.subscribe_url, NEXT_SEQ)
        return Ingest(
            subscriber,
            session,
            encoder,
            self.status,
            on_first_segment=lambda: self._trace("runner_receive_first_ingest_segment"),
        )

    async def _ended_by(
        self, session: Session, ingest: asyncio.Future[str], egress: asyncio.Future[str]
    ) -> None:
        """The input ended (the last frames may still come out) or the output failed."""
        if ingest.done():
            self.reason = self.reason or ingest.result()
            await self._drain(session)
        elif egress.done():
            self._fail(egress.result())

    async def _drain(self, session: Session) -> None:
        """Give the frames already in the engine up to :data:`DRAIN_S` to come out."""
        deadline = time.monotonic() + DRAIN_S
        processed = -1
        while time.monotonic() < deadline:
            if not session.input.ready() and session.stats.frames_processed == processed:
                return
            processed = session.stats.frames_processed
            await asyncio.sleep(0.05)

    async def _end_tasks(self, *tasks: asyncio.Future[Any]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self, client: httpx.AsyncClient) -> None:
        self.status.running = False
        self._emit_status()
        await self._events.close()
        await client.aclose()
        logger.info("stream %s ended: %s", self.id, self.reason or "stopped")
        self.ended.set()

    # -- status -----------------------------------------------------------------------------
    async def _report(self, session: Session) -> None:
        """A status event now and every interval after; a silent input stops the stream."""
        interval = self.settings.runner_status_interval_s
        next_at = time.monotonic()
        while True:
            self._emit_status(session)
            quiet = time.time() - (self.status.last_input_time or self.status.start_time)
            if quiet > self.settings.runner_input_timeout_s:
                self.stop(f"the input sent nothing for {quiet:.0f} s")
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _emit_status(self, session: Session | None = None) -> None:
        stats = self.engine.session_stats(session) if session is not None else {}
        self._events.emit(self.status.report(stats.get("fps_in", 0.0), stats.get("fps_out", 0.0)))

    def _trace(self, kind: str) -> None:
        self._events.trace(kind)

    def _fail(self, message: str) -> None:
        self.status.failed = True
        self.status.error(message)
        self._events.error(message)
        self.stop(message)

    def _transform_failed(self, reason: str) -> None:
        """The session ended itself (the transform failed too often): end the stream."""
        self._fail(f"the transform failed: {reason}")

    # -- control ----------------------------------------------------------------------------
    async def _control(self, session: Session, client: httpx.AsyncClient) -> None:
        subscriber = self._subscriber(client, self.channels.control_url, CURRENT_SEQ)

        async def apply(message: dict[str, Any]) -> None:
            await self.apply_params(session, message)

        await follow_control(subscriber, apply, self._events)

    async def apply_params(self, session: Session, message: dict[str, Any]) -> None:
        """A full params set (fields left out go back to their defaults), through the engine;
        a refusal is an error event and the stream goes on with its params."""
        try:
            full = self.engine.validate(transform_values(message))
            applied = await self.engine.update_params(session.id, full.model_dump())
        except UnknownSessionError:
            return  # the stream is ending
        except PARAMS_REFUSALS as exc:
            message_text = f"params refused: {refusal_message(exc)}"
            self.status.error(message_text)
            self._events.error(message_text)
            return
        self.params = applied
        self.status.params_applied(applied.model_dump(mode="json"))

    # -- channels ---------------------------------------------------------------------------
    def _publisher(self, client: httpx.AsyncClient, url: str, mime: str) -> TricklePublisher:
        settings = self.settings
        return TricklePublisher(
            client,
            url,
            mime,
            retries=settings.trickle_retries,
            retry_delay_s=settings.trickle_retry_delay_s,
        )

    def _subscriber(self, client: httpx.AsyncClient, url: str, start: int) -> TrickleSubscriber:
        settings = self.settings
        return TrickleSubscriber(
            client,
            url,
            start_seq=start,
            retries=settings.trickle_retries,
            retry_delay_s=settings.trickle_retry_delay_s,
            wait_s=settings.trickle_wait_s,
        )
