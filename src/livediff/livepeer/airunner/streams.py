"""The ai-runner door's face of the engine: one stream at a time, switched by the request id.

Everything else (transform, worker, params merging and the reload policy, warm-up, sessions,
stats) is the :class:`~livediff.engine.Engine` that ``livediff serve`` runs, and the stream
switch is the one every Livepeer door uses (:class:`~livediff.livepeer.switch.StreamSwitch`).
What is this door's own: frames arrive as ai-runner tensors with a request id, a frame with a
new id replaces the stream, params come as full sets (not patches), a reload is returned as a
Task, and outputs leave converted to ai-runner's tensor contract on the worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine import AsyncSlot, Engine, Session, SlotClosedError
from livediff.frames import Frame, Image
from livediff.livepeer.airunner.tensors import to_runner_tensor, warmup_tensor
from livediff.livepeer.params import refusal_message, transform_values
from livediff.livepeer.switch import StreamSwitch, SwitchStoppedError
from livediff.transforms import TransformParams

logger = logging.getLogger(__name__)


class PipelineStoppedError(RuntimeError):
    """The pipeline was stopped; it takes and gives no more frames."""


class StreamFailedError(RuntimeError):
    """The transform failed on too many frames in a row and the stream's session ended."""


class AiRunnerStream:
    """The session serving one ai-runner stream (request id) and its output slot.

    Opened before it becomes the switch's current stream; :meth:`stop` closes its session in the
    background (after the open, if it is still opening) and then sets :attr:`ended`.
    """

    def __init__(self, request_id: str, engine: Engine) -> None:
        self.id = request_id
        self.engine = engine
        self.ended = asyncio.Event()
        self.reason: str | None = None
        self._session: Session | None = None
        self._output: AsyncSlot[Frame] | None = None
        self._opening = False

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError(f"stream {self.id} is not open")
        return self._session

    @property
    def output(self) -> AsyncSlot[Frame]:
        if self._output is None:
            raise RuntimeError(f"stream {self.id} is not open")
        return self._output

    async def open(
        self,
        params: TransformParams,
        adapt: Callable[[Image], Image],
        on_end: Callable[[str], None],
    ) -> None:
        """Open the stream's engine session; one stopped meanwhile is closed at once."""
        self._opening = True
        try:
            session = await self.engine.open_session(
                params, session_id=self.id, adapt_output=adapt, on_end=on_end
            )
        except BaseException:
            self.ended.set()
            raise
        finally:
            self._opening = False
        self._session, self._output = session, session.subscribe(asyncio.get_running_loop())
        if self.reason is not None:
            await self._close()

    def stop(self, reason: str) -> None:
        """Close the stream's session in the background; :attr:`ended` is set once closed."""
        if self.reason is not None:
            return
        self.reason = reason
        if not self._opening:
            self.engine.tasks.spawn(self._close())

    async def _close(self) -> None:
        try:
            if self._session is not None:
                await self.engine.close_session(self._session.id, self.reason or "stopped")
        finally:
            self.ended.set()


class AiRunnerStreams:
    """The engine, the params ai-runner set last, and the stream served now."""

    def __init__(self, settings: Settings) -> None:
        self.engine = Engine(settings, warmup_image=warmup_tensor)
        self.switch: StreamSwitch[AiRunnerStream] = StreamSwitch(self.engine)
        self.params = self.validate({})
        self._failure: str | None = None

    # -- params -------------------------------------------------------------------------------
    def validate(self, raw: Mapping[str, Any]) -> TransformParams:
        """A full params set from ai-runner over the defaults (raises ValidationError)."""
        return self.engine.validate(transform_values(raw))

    async def update(self, raw: Mapping[str, Any]) -> asyncio.Task[None] | None:
        """Swap params in place; a Task (that reloads on the worker) only when the model changes."""
        new = self.validate(raw)
        if await self.engine.requires_reload(self.params, new):
            return asyncio.create_task(self._reload(new))
        await self._apply(new)
        return None

    async def _apply(self, params: TransformParams) -> None:
        self.params = params
        stream = self.switch.current
        if stream is not None:
            await self.engine.update_params(stream.session.id, params.model_dump())

    async def _reload(self, new: TransformParams) -> None:
        stream = self.switch.current
        live = stream.session.id if stream is not None else None
        try:
            await self.engine.load_for(new, session_id=live)
        except ValidationError as exc:
            # The transform refused the new model (say, not downloaded) and kept the running
            # one: report it (ai-runner shows records marked report_error) and carry on, rather
            # than fail the Task, which would make ai-runner restart the whole process.
            logger.error(
                "params refused, keeping %s: %s",
                self.params.model_dump(mode="json"),
                refusal_message(exc),
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
        await self.switch.stop("the pipeline is stopping")
        await self.engine.stop()

    # -- frames -------------------------------------------------------------------------------
    async def submit(self, frame: Frame, request_id: str, device: torch.device) -> None:
        """Hand a frame of stream ``request_id`` to its session (newest wins; drops counted)."""
        if self.switch.stopped:
            raise PipelineStoppedError("the pipeline is stopped")
        stream = self.switch.current
        if stream is None or stream.id != request_id:
            stream = await self._open(request_id, device)
        stream.session.submit(frame)

    async def next_output(self) -> tuple[AiRunnerStream, Frame]:
        """The current stream's next processed frame (its image in ai-runner's contract)."""
        while True:
            if self._failure is not None:
                reason, self._failure = self._failure, None
                raise StreamFailedError(reason)
            try:
                stream = await self.switch.next_current()
            except SwitchStoppedError as exc:
                raise PipelineStoppedError("the pipeline is stopped") from exc
            try:
                return stream, await stream.output.get()
            except SlotClosedError:  # its session closed: let the stream end, then go on
                stream.stop("its session closed")
                await stream.ended.wait()

    # -- streams ------------------------------------------------------------------------------
    async def _open(self, request_id: str, device: torch.device) -> AiRunnerStream:
        previous = self.switch.current
        if previous is not None:  # its session gives the engine's slot back first
            previous.stop(f"stream {request_id} replaced it")
            await previous.ended.wait()

        def adapt(image: Image) -> Image:
            return to_runner_tensor(image, device)

        stream = AiRunnerStream(request_id, self.engine)
        await stream.open(self.params, adapt, lambda reason: self._ended(stream, reason))
        if stream.session.params != self.params:  # a params update landed while attaching
            await self.engine.update_params(request_id, self.params.model_dump())
        self.switch.replace(stream)
        logger.info("stream %s opened on the %s transform", request_id, self.engine.transform.name)
        return stream

    def _ended(self, stream: AiRunnerStream, reason: str) -> None:
        """The session ended itself (the transform failed too often): report it and let go."""
        if stream.reason is not None:
            return
        logger.error("stream %s ended: %s", stream.id, reason)
        self._failure = f"stream {stream.id} ended: {reason}"
        stream.stop(reason)
        self.switch.release(stream)

    # -- reporting ----------------------------------------------------------------------------
    def stream_stats(self) -> dict[str, Any]:
        """The current stream's counters (frames in, processed, dropped, errors) and params."""
        stream = self.switch.current
        if stream is None:
            return {"request_id": None, "params": self.params.model_dump(mode="json")}
        return {"request_id": stream.id, **self.engine.session_stats(stream.session)}
