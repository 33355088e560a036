"""``LiveRunner``: livediff as a go-livepeer Live Runner, beside the service it registers.

The service (``livediff serve``) answers the proxied HTTP as it answers anyone; this door adds
what the orchestrator needs: the registration (:class:`~.registrar.Registrar`, when an
orchestrator is configured), the reserved Livepeer sessions and the work tied to them
(:class:`~.reservations.Reservations`), and trickle streams started through the session's
channels (:meth:`LiveRunner.start_trickle`), run by the same :class:`TrickleStream` as the native
runner's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from livediff import __version__
from livediff.config import Settings
from livediff.engine import Engine, TaskSet
from livediff.livepeer.hardware import gpu_info
from livediff.livepeer.live_runner.o2r import follow_o2r
from livediff.livepeer.live_runner.protocol import (
    READY,
    ChannelDescriptor,
    ChannelsReply,
    HeartbeatReply,
    metadata_text,
)
from livediff.livepeer.live_runner.registrar import Registrar
from livediff.livepeer.live_runner.reservations import Closer, NotReservedError, Reservations
from livediff.livepeer.params import transform_values
from livediff.livepeer.trickle import CURRENT_SEQ, TrickleSubscriber
from livediff.livepeer.trickle_stream import StreamChannels, TrickleStream, trickle_client

logger = logging.getLogger(__name__)

#: How long a request naming an unknown Livepeer session waits for its reservation to arrive
#: (the client's first request can outrun the O2R event; a heartbeat is asked for at once).
RESERVATION_WAIT_S = 3.0
#: The trickle channels of a session's stream: name -> MIME type (go-livepeer's names).
STREAM_CHANNELS = {
    "input": "video/MP2T",
    "output": "video/MP2T",
    "control": "application/json",
    "events": "application/json",
}


class ChannelsRefusedError(Exception):
    """The orchestrator would not create the session's trickle channels."""


@dataclass(frozen=True, slots=True)
class SessionCallback:
    """What the proxy tells the runner about a request's session (the ``Livepeer-*`` headers)."""

    session_id: str
    token: str
    control_url: str


class LiveRunner:
    """The Live Runner door: registration, reservations, and trickle streams per session."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.tasks = TaskSet("live-runner")
        self.reservations = Reservations(self.tasks)
        self.streams: dict[str, TrickleStream] = {}
        self.registrar = self._registrar() if settings.live_runner_orch else None
        self._gpu: dict[str, Any] | None = None
        self._run_task: asyncio.Task[None] | None = None

    @property
    def dynamic(self) -> bool:
        """Registered by this process (the orchestrator's reservations are then enforced)."""
        return self.registrar is not None

    def _registrar(self) -> Registrar:
        settings = self.settings
        if not settings.live_runner_url:
            raise ValueError("LIVEDIFF_LIVE_RUNNER_URL is needed to register with an orchestrator")
        if settings.live_runner_secret is None:
            raise ValueError(
                "LIVEDIFF_LIVE_RUNNER_SECRET (the orchestrator's -orchSecret) is needed"
            )
        return Registrar(
            str(settings.live_runner_orch),
            settings.live_runner_secret.get_secret_value(),
            self.registration,
            self._on_reply,
            self._follow_o2r,
            proposed_id=settings.live_runner_id,
            retry_max_s=settings.live_runner_retry_max_s,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.registrar is None:
            return
        self._gpu = await asyncio.to_thread(self._describe_gpu)
        self._run_task = asyncio.ensure_future(self.registrar.run())

    async def stop(self) -> None:
        """Stop heartbeating, close every session's work, unregister."""
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
        self.reservations.release_all("the runner is stopping")
        await self.tasks.wait()
        if self.registrar is not None:
            await self.registrar.stop()

    # -- the registration ---------------------------------------------------------------------
    def status(self) -> str:
        """``ready`` only with the model loaded and the worker healthy."""
        health = self.engine.health()
        return {"LOADING": "loading", "ERROR": "error"}.get(health, READY)

    def registration(self) -> dict[str, Any]:
        """The whole registration, sent with every heartbeat (omitted fields would reset)."""
        settings = self.settings
        body: dict[str, Any] = {
            "runner_url": settings.live_runner_url,
            "app": settings.live_runner_app,
            "version": __version__,
            "metadata": metadata_text(self._metadata()),
            "status": self.status(),
            "mode": "persistent",
            "capacity": settings.max_sessions,
            "session_ids": self.reservations.ids(),
        }
        if self._gpu is not None:
            body["gpu"] = self._gpu
        if settings.live_runner_price is not None:
            body["price_info"] = {
                "price": settings.live_runner_price,
                "currency": "usd",
                "unit": settings.live_runner_price_unit,
            }
        return body

    def _metadata(self) -> dict[str, Any]:
        settings = self.settings
        values: dict[str, Any] = {"pipeline": settings.pipeline}
        if settings.pipeline == "diffusion":
            values["model"] = settings.model
        values.update(
            width=settings.width,
            height=settings.height,
            max_sessions=settings.max_sessions,
            media=["webrtc", "whip", "whep", "trickle"],
        )
        return values

    def _describe_gpu(self) -> dict[str, Any] | None:
        index = self.settings.live_runner_gpu
        if index < 0:
            return None
        found = gpu_info().get(index)
        if found is None:
            return None
        return {"id": str(index), "name": found.name, "vram_mb": found.memory_total >> 20}

    def _on_reply(self, reply: HeartbeatReply, asked_at: float) -> None:
        if reply.session_ids is not None:
            self.reservations.replace(reply.session_ids, asked_at)

    async def _follow_o2r(self, channel: ChannelDescriptor) -> None:
        client = trickle_client(self.settings)
        try:
            subscriber = TrickleSubscriber(
                client,
                channel.runner_url,
                start_seq=CURRENT_SEQ,
                retries=self.settings.trickle_retries,
                retry_delay_s=self.settings.trickle_retry_delay_s,
                wait_s=self.settings.trickle_wait_s,
            )
            await follow_o2r(subscriber, self.reservations)
        finally:
            await client.aclose()

    # -- sessions -----------------------------------------------------------------------------
    async def check_reserved(self, session_id: str) -> None:
        """Raise :class:`NotReservedError` unless the orchestrator reserved ``session_id`` here
        (only enforced when this process registered itself)."""
        if self.registrar is None or self.reservations.is_reserved(session_id):
            return
        self.registrar.request_heartbeat()
        if not await self.reservations.wait_reserved(session_id, RESERVATION_WAIT_S):
            raise NotReservedError(
                f"Livepeer session {session_id} was not reserved for this runner"
            )

    def tie(self, session_id: str, close: Closer) -> None:
        """Tie local work to a session (static registration: remembered all the same)."""
        if self.registrar is None and not self.reservations.is_reserved(session_id):
            self.reservations.reserve(session_id)
        self.reservations.tie(session_id, close)

    # -- trickle ------------------------------------------------------------------------------
    async def start_trickle(
        self, callback: SessionCallback, raw_params: dict[str, Any]
    ) -> dict[str, str]:
        """Create the session's four channels, start its stream; the channels' public URLs."""
        await self.check_reserved(callback.session_id)
        params = self.engine.validate(transform_values(raw_params))
        self.engine.check_can_open()
        channels = await self._create_channels(callback)
        stream = TrickleStream(
            self.engine,
            callback.session_id,
            StreamChannels(
                subscribe_url=channels["input"].runner_url,
                publish_url=channels["output"].runner_url,
                control_url=channels["control"].runner_url,
                events_url=channels["events"].runner_url,
            ),
            params,
            self.settings,
        )
        self._replace_stream(callback.session_id, stream)
        return {name: channel.url for name, channel in channels.items()}

    def _replace_stream(self, session_id: str, stream: TrickleStream) -> None:
        previous = self.streams.get(session_id)
        self.streams[session_id] = stream

        async def close(reason: str) -> None:
            stream.stop(reason)
            await stream.ended.wait()

        self.tie(session_id, close)
        self.tasks.spawn(self._run_stream(session_id, previous, stream, close))

    async def _run_stream(
        self,
        session_id: str,
        previous: TrickleStream | None,
        stream: TrickleStream,
        close: Closer,
    ) -> None:
        if previous is not None:
            previous.stop(f"stream {session_id} was started again")
            await previous.ended.wait()
        try:
            await stream.run()
        finally:
            if self.streams.get(session_id) is stream:
                del self.streams[session_id]
            self.reservations.untie(session_id, close)

    async def _create_channels(self, callback: SessionCallback) -> dict[str, ChannelDescriptor]:
        body = {"channels": [{"name": n, "mime_type": m} for n, m in STREAM_CHANNELS.items()]}
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False) as client:
            try:
                response = await client.post(
                    f"{callback.control_url.rstrip('/')}/channels",
                    json=body,
                    headers={"Livepeer-Session-Token": callback.token},
                )
            except httpx.HTTPError as exc:
                raise ChannelsRefusedError(f"the orchestrator cannot be reached: {exc!r}") from exc
        if response.status_code != 200:
            raise ChannelsRefusedError(
                f"the orchestrator refused the channels: {response.status_code} "
                f"{response.text.strip()[:200]}"
            )
        return _descriptors(response.content)


def _descriptors(content: bytes) -> dict[str, ChannelDescriptor]:
    try:
        reply = ChannelsReply.model_validate_json(content)
    except ValueError as exc:
        raise ChannelsRefusedError(f"malformed channels reply: {exc}") from exc
    found = {channel.name: channel for channel in reply.channels}
    missing = sorted(set(STREAM_CHANNELS) - set(found))
    if missing:
        raise ChannelsRefusedError(f"the orchestrator did not create {', '.join(missing)}")
    return found


__all__ = ["ChannelsRefusedError", "LiveRunner", "NotReservedError", "SessionCallback"]
