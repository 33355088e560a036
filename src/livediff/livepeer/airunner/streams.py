"""The runner's face of the engine: one stream at a time, switched by ai-runner's request id.

Everything else (transform, worker, params merging and the reload policy, warm-up, sessions,
stats) is the :class:`~livediff.engine.Engine` that ``livediff serve`` runs. What is the runner's
own: frames arrive as ai-runner tensors with a stream id, a frame with a new id replaces the
stream's session, params come as full sets (not patches), a reload is returned as a Task, and
outputs leave converted to ai-runner's tensor contract on the worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine import AsyncSlot, Engine, Session, SlotClosedError
from livediff.frames import Frame, Image
from livediff.livepeer.airunner.tensors import to_runner_tensor, warmup_tensor
from livediff.transforms import TransformParams

logger = logging.getLogger(__name__)

#: Fields of ai-runner's BaseParams that only ai-runner reads; not passed on to the transform.
RUNNER_ONLY_FIELDS = frozenset({"show_reloading_frame"})


class PipelineStoppedError(RuntimeError):
    """The pipeline was stopped; it takes and gives no more frames."""


class StreamFailedError(RuntimeError):
    """The transform failed on too many frames in a row and the stream's session ended."""


@dataclass(eq=False)
class RunnerStream:
    """The session serving one ai-runner stream (request id) and its output slot."""

    request_id: str
    session: Session
    output: AsyncSlot[Frame]
    closed: bool = False


class StreamSwitch:
    """The engine and the stream it serves now; a frame of another stream replaces it."""

    def __init__(self, settings: Settings) -> None:
        self.engine = Engine(settings, warmup_image=warmup_tensor)
        self.params = self.validate({})
        self.stream: RunnerStream | None = None
        self._failure: str | None = None
        self._stopped = False
        self._stream_opened = asyncio.Event()

    # -- params -------------------------------------------------------------------------------
    def validate(self, raw: Mapping[str, Any]) -> TransformParams:
        """A full params set from ai-runner over the defaults (raises ValidationError)."""
        values = {key: value for key, value in raw.items() if key not in RUNNER_ONLY_FIELDS}
        return self.engine.validate(values)

    async def update(self, raw: Mapping[str, Any]) -> asyncio.Task[None] | None:
        """Swap params in place; a Task (that reloads on the worker) only when the model changes."""
        new = self.validate(raw)
        if await self.engine.requires_reload(self.params, new):
            return asyncio.create_task(self._reload(new))
        await self._apply(new)
        return None

    async def _apply(self, params: TransformParams) -> None:
        self.params = params
        stream = self.stream
        if stream is not None and not stream.closed:
            await self.engine.update_params(stream.session.id, params.model_dump())

    async def _reload(self, new: TransformParams) -> None:
        stream = self.stream
        live = stream.session.id if stream is not None and not stream.closed else None
        try:
            await self.engine.load_for(new, session_id=live)
        except ValidationError as exc:
            # The transform refused the new model (say, not downloaded) and kept the running
            # one: report it (ai-runner shows records marked report_error) and carry on, rather
            # than fail the Task, which would make ai-runner restart the whole process.
            logger.error(
                "params refused, keeping %s: %s",
                self.params.model_dump(mode="json"),
                exc,
                extra={"report_error": True},
            )
            return
        self.params = new

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, raw: Mapping[str, Any]) -> None:
        """Load (and warm up) the transform, then the model ``raw`` params ask for if other."""
        params = self.validate(raw)
        try:
            await self.engine.start()
            await self.engine.load_for(params)
        except BaseException:
            await self.engine.stop()
            raise
        self.params = params

    async def stop(self) -> None:
        """End the stream and the engine; the transform closes (frees its memory) there."""
        self._stopped = True
        self._stream_opened.set()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.closed = True
        await self.engine.stop()

    # -- frames -------------------------------------------------------------------------------
    async def submit(self, frame: Frame, request_id: str, device: torch.device) -> None:
        """Hand a frame of stream ``request_id`` to its session (newest wins; drops counted)."""
        if self._stopped:
            raise PipelineStoppedError("the pipeline is stopped")
        stream = self.stream
        if stream is None or stream.closed or stream.request_id != request_id:
            stream = await self._open(request_id, device)
        stream.session.submit(frame)

    async def next_output(self) -> tuple[RunnerStream, Frame]:
        """The current stream's next processed frame (its image in ai-runner's contract)."""
        while True:
            if self._failure is not None:
                reason, self._failure = self._failure, None
                raise StreamFailedError(reason)
            stream = await self._live_stream()
            try:
                return stream, await stream.output.get()
            except SlotClosedError:
                continue

    async def _live_stream(self) -> RunnerStream:
        while True:
            if self._stopped:
                raise PipelineStoppedError("the pipeline is stopped")
            stream = self.stream
            if stream is not None and not stream.closed:
                return stream
            self._stream_opened.clear()
            await self._stream_opened.wait()

    # -- streams ------------------------------------------------------------------------------
    async def _open(self, request_id: str, device: torch.device) -> RunnerStream:
        previous, self.stream = self.stream, None
        if previous is not None and not previous.closed:
            await self._close(previous, f"stream {request_id} replaced it")

        def adapt(image: Image) -> Image:
            return to_runner_tensor(image, device)

        holder: list[RunnerStream] = []
        session = await self.engine.open_session(
            self.params,
            session_id=request_id,
            adapt_output=adapt,
            on_end=lambda reason: self._ended(holder[0], reason),
        )
        stream = RunnerStream(request_id, session, session.subscribe(asyncio.get_running_loop()))
        holder.append(stream)
        if session.params != self.params:  # a params update landed while attaching
            await self.engine.update_params(request_id, self.params.model_dump())
        self.stream = stream
        self._stream_opened.set()
        logger.info("stream %s opened on the %s transform", request_id, self.engine.transform.name)
        return stream

    def _ended(self, stream: RunnerStream, reason: str) -> None:
        """The session ended itself (the transform failed too often): report it and let go."""
        if stream.closed:
            return
        logger.error("stream %s ended: %s", stream.request_id, reason)
        self._failure = f"stream {stream.request_id} ended: {reason}"
        stream.closed = True
        self.engine.tasks.spawn(self.engine.close_session(stream.session.id, reason))

    async def _close(self, stream: RunnerStream, reason: str) -> None:
        stream.closed = True
        await self.engine.close_session(stream.session.id, reason)

    # -- reporting ----------------------------------------------------------------------------
    def stream_stats(self) -> dict[str, Any]:
        """The current stream's counters (frames in, processed, dropped, errors) and params."""
        stream = self.stream
        if stream is None or stream.closed:
            return {"request_id": None, "params": self.params.model_dump(mode="json")}
        return {"request_id": stream.request_id, **self.engine.session_stats(stream.session)}
