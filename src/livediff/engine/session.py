"""One stream's state in the engine: its params, its slots and its statistics.

A session knows nothing of how frames reach it (WebRTC, ai-runner) or leave it: the media
layer pushes decoded frames with :meth:`Session.submit`, and reads results from the slots it
got from :meth:`Session.subscribe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from livediff.engine.slot import AsyncSlot, Slot
from livediff.engine.stats import SessionStats
from livediff.engine.threads import post_to_loop
from livediff.frames import Frame, Image, ReadyEvent, now
from livediff.pixels import adopt, fit_within, mark_ready, resize
from livediff.transforms.base import AnyJob, Job, TransformParams

logger = logging.getLogger(__name__)

Adapter = Callable[[Image], Image]


def unchanged(image: Image) -> Image:
    """The identity output adapter (the consumer takes the transform's images as they are)."""
    return image


@dataclass(frozen=True, slots=True)
class Adapted:
    """An output as the session's consumers take it (``adapt_output``'s), with the event after
    the device work that made it (rule 2 of :mod:`livediff.pixels.device`; None off CUDA)."""

    image: Image
    ready: ReadyEvent | None


class FailureBurst:
    """Counts consecutive transform failures; logs the first of each burst and its end."""

    def __init__(self, session_id: str, limit: int) -> None:
        self._session_id = session_id
        self.limit = limit
        self.consecutive = 0

    def failed(self, exc: BaseException) -> bool:
        """Record a failure; True once ``limit`` failures came in a row."""
        self.consecutive += 1
        if self.consecutive == 1:
            logger.error(
                "session %s: transform failed, showing the last good frame: %r",
                self._session_id,
                exc,
                exc_info=exc,
                extra={"session_id": self._session_id},
            )
        return self.consecutive >= self.limit

    def succeeded(self) -> None:
        if self.consecutive:
            logger.info(
                "session %s: transform recovered after %d failed frames",
                self._session_id,
                self.consecutive,
                extra={"session_id": self._session_id},
            )
        self.consecutive = 0


class Session:
    """A stream in the engine: input slot -> worker -> output slots (one per consumer)."""

    def __init__(
        self,
        session_id: str,
        params: TransformParams,
        stats: SessionStats,
        *,
        error_limit: int,
        on_input: Callable[[], None] | None = None,
        adapt_output: Adapter = unchanged,
        max_input_pixels: int | None = None,
    ) -> None:
        """``max_input_pixels``: larger input frames are scaled down (on the worker thread, as
        they are taken) before the transform sees them."""
        self.id = session_id
        self.max_input_pixels = max_input_pixels
        self.stats = stats
        self._params = params
        self.input: Slot[Frame] = Slot(
            on_put=on_input, on_drop=lambda _frame: stats.on_dropped("input")
        )
        self.adapt_output = adapt_output
        #: The consumer encodes video frames: CUDA outputs come back as yuv420p with the batch.
        self.wants_video_frames = bool(getattr(adapt_output, "wants_video_frames", False))
        #: What the transform's ``open_session`` made for this session, while the worker serves
        #: it (None otherwise). Opaque to the engine, which only hands it back in every job.
        self.transform_state: object = None
        self.failures = FailureBurst(session_id, error_limit)
        self.on_end: Callable[[str], None] | None = None
        self.end_reason: str | None = None
        self._last_output: Image | None = None
        self._outputs: list[AsyncSlot[Frame]] = []
        self._outputs_lock = threading.Lock()

    # -- params ------------------------------------------------------------------------------
    @property
    def params(self) -> TransformParams:
        return self._params

    def set_params(self, params: TransformParams) -> None:
        """Swap in new params; the worker picks them up with the next frame."""
        self._params = params

    # -- frames in ---------------------------------------------------------------------------
    def submit(self, frame: Frame) -> None:
        """Offer a decoded frame; an older one still waiting is dropped (and counted)."""
        moment = now()
        if frame.times.received == 0.0:
            frame.times.received = moment
        frame.times.queued = moment
        self.stats.on_received(moment)
        self.input.put(frame)

    def next_job(self) -> AnyJob | None:
        """The waiting frame as a job (worker thread).

        It may be taken while the session's previous job is still in flight (the worker keeps
        up to ``batches_in_flight`` batches launched): the worker delivers jobs in the order it
        took them, and the transform orders what one leaves in the session's state for the next.

        A CUDA tensor frame (ai-runner's, made on another CUDA stream) is adopted first: the
        worker's CUDA stream waits for its producer before anything reads it, the scaling down
        of a large frame included (rule 1 of :mod:`livediff.pixels.device`)."""
        frame = self.input.take()
        if frame is None:
            return None
        adopt(frame.image)
        if self.max_input_pixels is not None:
            fitted = fit_within(frame.image, self.max_input_pixels)
            if fitted is not frame.image:
                frame.image = fitted
                self.stats.on_input_downscaled()
        return Job(self.id, frame, self._params, self.transform_state)

    # -- frames out --------------------------------------------------------------------------
    def subscribe(self, loop: asyncio.AbstractEventLoop) -> AsyncSlot[Frame]:
        """A new consumer's slot of processed frames, awaited on ``loop``."""
        slot: AsyncSlot[Frame] = AsyncSlot(
            loop, on_drop=lambda _frame: self.stats.on_dropped("output")
        )
        with self._outputs_lock:
            self._outputs.append(slot)
        return slot

    def unsubscribe(self, slot: AsyncSlot[Frame]) -> None:
        with self._outputs_lock:
            if slot in self._outputs:
                self._outputs.remove(slot)
        slot.close()

    def adapt(self, image: Image) -> Adapted:
        """``image`` adapted for the consumers and marked ready (worker thread).

        The worker adapts an output that stays on the device as it launches the batch, before
        it launches the next one, so that the output's ready event (and its adapter's device
        work) comes before the next batch's work in the worker's CUDA stream, not after it."""
        adapted = self.adapt_output(image)
        return Adapted(adapted, mark_ready(adapted))

    def complete(self, job: AnyJob, output: Image | Adapted | None, finished: float) -> None:
        """The transform's result for ``job``, adapted already or not (worker thread); None =
        nothing to show yet."""
        self.failures.succeeded()
        if output is not None:
            adapted = output if isinstance(output, Adapted) else self.adapt(output)
            self._emit(job.frame, adapted, finished)

    def fail(self, job: AnyJob, exc: BaseException, finished: float) -> None:
        """The transform raised on ``job``: show the last good frame (or the input) instead."""
        self.stats.on_error()
        if self.failures.failed(exc):
            count = self.failures.consecutive
            self.stats.on_ended_by_failures()
            self.end(f"the transform failed on {count} frames in a row: {exc!r}")
            return
        fallback = self._last_output
        if fallback is None:
            fallback = resize(job.frame.image, job.params.width, job.params.height)
        self._emit(job.frame, self.adapt(fallback), finished)

    def _emit(self, frame: Frame, adapted: Adapted, finished: float) -> None:
        self._last_output = adapted.image
        out = frame.with_image(adapted.image)
        out.ready = adapted.ready
        out.times.finished = finished
        self.stats.on_processed(out)
        with self._outputs_lock:
            outputs = list(self._outputs)
        for slot in outputs:
            slot.put(out)

    # -- end ---------------------------------------------------------------------------------
    def report_end_on(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[str], None]) -> None:
        """Have ``on_end(reason)`` run on ``loop`` when the session ends itself (the worker
        thread ends it after too many failed frames)."""

        def ended_from_any_thread(reason: str) -> None:
            if not post_to_loop(loop, on_end, reason):
                logger.warning("session %s ended after its event loop closed: %s", self.id, reason)

        self.on_end = ended_from_any_thread

    def end(self, reason: str) -> None:
        """Stop taking frames and tell the owner why (any thread)."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.input.close()
        if self.on_end is not None:
            self.on_end(reason)

    def close_outputs(self) -> None:
        with self._outputs_lock:
            outputs, self._outputs = self._outputs, []
        for slot in outputs:
            slot.close()
