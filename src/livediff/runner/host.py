"""The engine behind the ai-runner face: one transform on one worker, one session per stream.

It is the same engine ``livediff serve`` runs (``resolve_transform`` -> ``Worker`` -> ``Session``);
only the edges differ: frames arrive as ai-runner tensors with a stream id, and leave through the
session's newest-wins output slot converted to ai-runner's tensor contract on the worker thread.
ai-runner serves one stream at a time; a frame with a new stream id replaces the session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.engine import AsyncSlot, Metrics, Session, SessionStats, SlotClosedError, Worker
from livediff.frames import Frame, Image
from livediff.runner.tensors import to_runner_tensor, warmup_image
from livediff.transforms import Job, TransformParams, resolve_transform

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: Fields of ai-runner's BaseParams that only ai-runner reads; not passed on to the transform.
RUNNER_ONLY_FIELDS = frozenset({"show_reloading_frame"})
#: Frames fed at warm-up until the transform returns one (a stream batch needs a few to fill).
WARMUP_FRAMES = 8


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


class StreamHost:
    """Owns the transform, its worker and the current stream's session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.transform = resolve_transform(settings.pipeline)(settings)
        self.worker = Worker(self.transform, self.metrics, max_batch=settings.max_batch)
        self.params = self.validate({})
        self.stream: RunnerStream | None = None
        self._failure: str | None = None
        self._stopped = False
        self._stream_opened = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    # -- params -------------------------------------------------------------------------------
    def validate(self, raw: Mapping[str, Any]) -> TransformParams:
        """A full params set from ai-runner, on top of the transform's defaults (raises
        pydantic.ValidationError naming the bad field)."""
        values = {key: value for key, value in raw.items() if key not in RUNNER_ONLY_FIELDS}
        defaults = self.transform.default_params()
        return self.transform.params_model.model_validate({**defaults, **values})

    async def update(self, raw: Mapping[str, Any]) -> asyncio.Task[None] | None:
        """Swap params in place; a Task (that reloads on the worker) only when the model changes."""
        new = self.validate(raw)
        if self.transform.requires_reload(self.params, new):
            logger.info("params change needs a reload of the %s transform", self.transform.name)
            return asyncio.create_task(self._reload(new))
        self._apply(new)
        return None

    def _apply(self, params: TransformParams) -> None:
        self.params = params
        stream = self.stream
        if stream is not None:
            stream.session.set_params(params)

    async def _reload(self, new: TransformParams) -> None:
        def reload_and_warm_up() -> None:
            self.transform.reload(new)
            self._warm_up(new)
            self._apply(new)

        try:
            await self._on_worker(reload_and_warm_up)
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

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, raw: Mapping[str, Any]) -> None:
        """Load the transform for ``raw`` params and run warm-up frames through it."""
        params = self.validate(raw)
        try:
            await asyncio.wrap_future(self.worker.start())
            await self._on_worker(lambda: self._load_for(params))
        except BaseException:
            await asyncio.to_thread(self.worker.stop)
            raise
        self.params = params

    def _load_for(self, params: TransformParams) -> None:
        loaded = self.transform.params_model.model_validate(self.transform.default_params())
        if self.transform.requires_reload(loaded, params):
            self.transform.reload(params)
        self._warm_up(params)

    def _warm_up(self, params: TransformParams) -> None:
        """Feed test frames through the transform (worker thread) until one comes out."""
        device = torch.device(self.transform.device)
        state = self.transform.open_session(params)
        try:
            for index in range(WARMUP_FRAMES):
                card = warmup_image(params.width, params.height, device)
                job = Job("warm-up", Frame(image=card, pts=index), params, state)
                image = self.transform.process([job])[0]
                if image is not None:
                    to_runner_tensor(image, device)
                    return
        finally:
            self.transform.close_session(state)
        raise RuntimeError(f"the transform gave no frame for {WARMUP_FRAMES} warm-up frames")

    async def stop(self) -> None:
        """End the stream and the worker thread; the transform closes (frees its memory) there."""
        self._stopped = True
        self._stream_opened.set()
        stream, self.stream = self.stream, None
        if stream is not None:
            self._close(stream, "the pipeline stopped")
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.worker.stop)

    async def _on_worker(self, fn: Callable[[], R]) -> R:
        return await asyncio.wrap_future(self.worker.call(fn))

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
            self._close(previous, f"stream {request_id} replaced it")
            await self._detach(previous)
        session = self._new_session(request_id, device)
        loop = asyncio.get_running_loop()
        stream = RunnerStream(request_id, session, session.subscribe(loop))

        def ended_from_any_thread(reason: str) -> None:
            loop.call_soon_threadsafe(self._ended, stream, reason)

        session.on_end = ended_from_any_thread
        await asyncio.wrap_future(self.worker.attach(session))
        session.set_params(self.params)  # a params update may have landed while attaching
        self.stream = stream
        self._stream_opened.set()
        logger.info("stream %s opened on the %s transform", request_id, self.transform.name)
        return stream

    def _new_session(self, request_id: str, device: torch.device) -> Session:
        def adapt(image: Image) -> Image:
            return to_runner_tensor(image, device)

        return Session(
            request_id,
            self.params,
            SessionStats(self.metrics, self.settings.stats_window_s),
            error_limit=self.settings.transform_error_limit,
            on_input=self.worker.notify,
            adapt_output=adapt,
        )

    def _ended(self, stream: RunnerStream, reason: str) -> None:
        """The session ended itself (the transform failed too often): report it and let go."""
        if stream.closed:
            return
        logger.error("stream %s ended: %s", stream.request_id, reason)
        self._failure = f"stream {stream.request_id} ended: {reason}"
        self._close(stream, reason)
        task = asyncio.ensure_future(self._detach(stream))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _close(stream: RunnerStream, reason: str) -> None:
        stream.closed = True
        stream.session.on_end = None
        stream.session.end(reason)
        stream.session.close_outputs()

    async def _detach(self, stream: RunnerStream) -> None:
        if self.worker.alive:
            await asyncio.wrap_future(self.worker.detach(stream.session))

    # -- reporting ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The current stream's counters (frames in, processed, dropped, errors) and params."""
        stream = self.stream
        if stream is None:
            return {"request_id": None, "params": self.params.model_dump(mode="json")}
        stats = stream.session.stats
        return {
            "request_id": stream.request_id,
            "frames_in": stats.frames_in,
            "frames_processed": stats.frames_processed,
            "frames_dropped": stats.frames_dropped,
            "errors": stats.errors,
            "params": stream.session.params.model_dump(mode="json"),
        }
