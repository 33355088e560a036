"""``LivediffPipeline``: livediff as an ai-runner live pipeline (``runner.live.pipelines``).

ai-runner builds it with no arguments in its pipeline process and drives it from three concurrent
loops (input, output, params). It runs the same transform and worker as ``livediff serve``, chosen
by the ``LIVEDIFF_*`` settings (``LIVEDIFF_PIPELINE``: ``diffusion`` in the image):

- ``put_video_frame`` hands the (1, H, W, 3) float32 [0, 1] tensor to the stream's session, whose
  size-1 slot keeps only the newest frame, so a slow model never backs up ai-runner's queues;
- ``get_processed_video_frame`` awaits the session's output slot and returns a ``VideoOutput`` of
  the same shape and range (clamped) on the input's device, with the input's timestamp, time base
  and log timestamps, and the stream's request id;
- ``update_params`` swaps params in place (None) unless the model itself changes (a Task that
  reloads and warms up on the worker thread).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import OrderedDict
from typing import Any, cast

import torch
from runner.live.pipelines import Pipeline
from runner.live.trickle import VideoFrame, VideoOutput

from livediff.config import Settings
from livediff.frames import Frame
from livediff.livepeer.airunner.params import runner_settings, settings_for_params
from livediff.livepeer.airunner.streams import AiRunnerStreams, PipelineStoppedError
from livediff.livepeer.airunner.tensors import release_device_memory
from livediff.pixels import wait_ready
from livediff.transforms import resolve_transform

logger = logging.getLogger(__name__)

#: Input frames remembered for their log timestamps and side data until their output comes back.
#: At most three are in flight (input slot, worker, output slot); older ones were dropped.
REMEMBERED_INPUTS = 8


class LivediffPipeline(Pipeline):  # type: ignore[misc]  # ai-runner is untyped
    """livediff's transforms served to a Livepeer orchestrator through ai-runner."""

    def __init__(self, settings: Settings | None = None) -> None:
        """ai-runner builds it with no arguments: the settings then come from ``LIVEDIFF_*``."""
        super().__init__()
        self._settings = settings
        self._streams: AiRunnerStreams | None = None
        self._inputs: OrderedDict[tuple[str, int], VideoFrame] = OrderedDict()

    @property
    def streams(self) -> AiRunnerStreams:
        """The engine and its current stream; raises once stopped."""
        if self._streams is None:
            raise PipelineStoppedError("the pipeline is not initialized or was stopped")
        return self._streams

    async def initialize(self, **params: Any) -> None:
        """Load the transform for ``params`` (the model they name, if any) and warm it up."""
        settings = settings_for_params(self._settings or runner_settings(), params)
        streams = AiRunnerStreams(settings)
        await streams.start(params)
        self._streams = streams
        logger.info(
            "livediff pipeline ready: %s transform on %s",
            settings.pipeline,
            streams.engine.transform.device,
        )

    async def put_video_frame(self, frame: VideoFrame, request_id: str) -> None:
        tensor = cast(torch.Tensor, frame.tensor)
        self._remember(request_id, frame)
        image = Frame(image=tensor, pts=int(frame.timestamp), time_base=frame.time_base)
        await self.streams.submit(image, request_id, tensor.device)

    def _remember(self, request_id: str, frame: VideoFrame) -> None:
        self._inputs[(request_id, int(frame.timestamp))] = frame
        while len(self._inputs) > REMEMBERED_INPUTS:
            self._inputs.popitem(last=False)

    async def get_processed_video_frame(self) -> VideoOutput:
        stream, frame = await self.streams.next_output()
        wait_ready(frame.image, frame.ready)  # ai-runner reads it on its own stream
        source = self._inputs.pop((stream.id, frame.pts), None)
        if source is None:
            output = VideoFrame(frame.image, frame.pts, frame.time_base, {})
        else:
            output = source.replace_tensor(frame.image)
        return VideoOutput(output, stream.id)

    async def update_params(self, **params: Any) -> asyncio.Task[None] | None:
        """Apply a full params set; returns an ``asyncio.Task`` only when the model must reload."""
        return await self.streams.update(params)

    async def stop(self) -> None:
        """End the stream, stop the worker thread and give the GPU memory back."""
        streams, self._streams = self._streams, None
        self._inputs.clear()
        if streams is None:
            return
        device = streams.engine.transform.device
        await streams.stop()
        del streams
        gc.collect()
        release_device_memory(device)
        logger.info("livediff pipeline stopped")

    def stats(self) -> dict[str, Any]:
        """The current stream's counters and params (for logs and tests)."""
        return self.streams.stream_stats()

    @classmethod
    def prepare_models(cls) -> None:
        """Get the selected transform ready to serve offline (``PREPARE_MODELS=1``).

        A transform's own ``prepare_models(settings)`` classmethod runs first when it has one
        (e.g. downloads with progress). Then the transform is loaded once and a warm-up frame
        goes through it, as at serving time: that fetches whatever is still missing into
        ``MODEL_DIR``, fills the compile caches there, and proves the model runs on this device.
        """
        settings = runner_settings()
        hook = getattr(resolve_transform(settings.pipeline), "prepare_models", None)
        if callable(hook):
            hook(settings)
        asyncio.run(_load_once(settings))


async def _load_once(settings: Settings) -> None:
    streams = AiRunnerStreams(settings)
    await streams.start({})
    await streams.stop()
    logger.info("the %s transform is prepared", settings.pipeline)
