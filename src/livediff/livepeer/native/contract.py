"""``NativeRunner``: the engine and the one stream it serves now, as the runner contract wants.

go-livepeer lends an IDLE container one stream at a time and never stops a stream by request:
the stream ends when its channels close. A new ``POST /live-video-to-video`` replaces the stream
that is running (the :class:`~livediff.livepeer.switch.StreamSwitch` every Livepeer door uses).
Health is the switch's: the engine's LOADING until warm and ERROR when the worker failed, and
otherwise OK while a stream is running and IDLE without one.
"""

from __future__ import annotations

import logging
import secrets

from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine import Engine, Health, TaskSet
from livediff.livepeer.native.schemas import ErrorStatus, LiveVideoToVideoRequest
from livediff.livepeer.params import refusal_message, transform_values
from livediff.livepeer.switch import StreamSwitch
from livediff.livepeer.trickle_stream import StreamChannels, TrickleStream
from livediff.transforms import TransformParams

logger = logging.getLogger(__name__)


class RunnerRefusal(Exception):
    """A stream request refused, with the status go-livepeer understands (400/401/422/500)."""

    def __init__(self, status: ErrorStatus, message: str) -> None:
        super().__init__(message)
        self.status: ErrorStatus = status
        self.message = message


class NativeRunner:
    """The engine plus the :class:`TrickleStream` it serves now."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.streams: StreamSwitch[TrickleStream] = StreamSwitch(self.engine)
        self.tasks = TaskSet("runner")

    def start(self) -> None:
        """Load and warm up the transform in the background (health says LOADING meanwhile)."""
        self.engine.start_in_background()

    async def stop(self) -> None:
        """End the stream, wait for it, stop the engine."""
        await self.streams.stop("the runner is stopping")
        await self.tasks.wait()
        await self.engine.stop()

    def health(self) -> Health:
        return self.streams.health()

    # -- stream requests --------------------------------------------------------------------
    def check(self, request: LiveVideoToVideoRequest, authorization: str | None) -> TransformParams:
        """The stream's params if the request may start a stream; else :class:`RunnerRefusal`."""
        self._check_token(authorization)
        wanted = self.settings.runner_model_id
        if request.model_id and request.model_id != wanted:
            raise RunnerRefusal(
                400, f"pipeline configured with {wanted} but called with {request.model_id}."
            )
        self._check_ready()
        try:
            return self.engine.validate(transform_values(request.params))
        except ValidationError as exc:
            raise RunnerRefusal(422, f"invalid params: {refusal_message(exc)}") from exc

    def _check_token(self, authorization: str | None) -> None:
        token = self.settings.runner_auth_token
        if token is None:
            return
        expected = f"Bearer {token.get_secret_value()}"
        if authorization is None or not secrets.compare_digest(authorization, expected):
            raise RunnerRefusal(401, "Invalid bearer token.")

    def _check_ready(self) -> None:
        status = self.engine.health()
        if status == "LOADING":
            raise RunnerRefusal(500, "the model is still loading; try again when /health is IDLE")
        if status == "ERROR":
            error = self.engine.worker.load_error
            raise RunnerRefusal(500, f"the transform failed: {error!r}")

    def begin(self, request: LiveVideoToVideoRequest, params: TransformParams) -> TrickleStream:
        """Start the stream in the background; the one running now is stopped first."""
        stream_id = request.gateway_request_id or request.stream_id or secrets.token_hex(8)
        channels = StreamChannels(
            request.subscribe_url, request.publish_url, request.control_url, request.events_url
        )
        stream = TrickleStream(self.engine, stream_id, channels, params, self.settings)
        previous = self.streams.replace(stream)
        self.tasks.spawn(self._run(previous, stream))
        logger.info(
            "stream %s requested (manifest %s, stream %s)",
            stream.id,
            request.manifest_id or "-",
            request.stream_id or "-",
        )
        return stream

    async def _run(self, previous: TrickleStream | None, stream: TrickleStream) -> None:
        if previous is not None:
            await previous.ended.wait()
        try:
            await stream.run()
        finally:
            self.streams.release(stream)
