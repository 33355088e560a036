"""TEST DOUBLE of ai-runner's process loop: runs a live ``Pipeline`` the way ai-runner drives one.

Written from the facts of ``runner/src/runner/live/process/process.py`` of ai-runner v0.14.1.
The real ``PipelineProcess`` runs these loops in a spawned child and talks to it through
multiprocessing queues; this driver runs them as tasks on the caller's event loop, with thread-safe
queues of the same sizes, so that a test can feed frames and read outputs:

- the input and output queues hold one item and *drop the new item* when full;
- the input loop, the output loop and the params loop run concurrently;
- params updates are full sets: the latest queued one wins, it is validated with the spec's
  params class (``parse_pipeline_params``, import guard included), a change of output resolution
  within one stream is rejected, and a Task returned by ``update_params`` is awaited while the
  pipeline is marked not ready - input frames then become loading frames instead of reaching it;
- a reload Task that fails ends the process (here: ``fatal`` is set and the loops stop).

It uses only public names of ``runner.live``, so it drives the real ai-runner as well as the double.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sys
import threading
import time
from typing import Any

from runner.live.pipelines import BaseParams, Pipeline, PipelineSpec
from runner.live.pipelines.loader import load_pipeline, parse_pipeline_params
from runner.live.trickle import VideoFrame, VideoOutput

logger = logging.getLogger(__name__)

LOADING_GREY = 0.5
POLL_S = 0.1


def _drain(items: queue.Queue[Any]) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return


class PipelineDriver:
    """One pipeline, driven by ai-runner's three loops; the test plays the parent process."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.input_queue: queue.Queue[VideoFrame] = queue.Queue(maxsize=1)
        self.output_queue: queue.Queue[VideoOutput] = queue.Queue(maxsize=1)
        self.param_updates: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ready = threading.Event()
        self.done = threading.Event()
        self.errors: list[str] = []
        self.fatal = False
        self.request_id = ""
        self.inputs_dropped = 0
        self.outputs_dropped = 0
        self.loading_frames = 0
        self.reloads = 0
        self.pipeline: Pipeline | None = None
        self.last_params: BaseParams = BaseParams()
        self._last_params_request_id = ""
        self._overlay_active = False

    # -- the parent's side ----------------------------------------------------------------------
    def send_input(self, frame: VideoFrame) -> bool:
        """Offer a frame; False when the input queue was full and the frame was dropped."""
        return self._try_put(self.input_queue, frame, "input")

    async def recv_output(self, timeout: float = 10.0) -> VideoOutput:
        """The next output frame; TimeoutError when none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.done.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                return await asyncio.to_thread(self.output_queue.get, timeout=POLL_S)
        raise TimeoutError(f"no output frame within {timeout} s (errors: {self.errors})")

    def update_params(self, params: dict[str, Any]) -> None:
        self.param_updates.put(params)

    def reset_stream(self, request_id: str, manifest_id: str = "m", stream_id: str = "s") -> None:
        """A new stream starts: queues are cleared and its ids go through the params queue."""
        for pending in (self.input_queue, self.output_queue, self.param_updates):
            _drain(pending)
        ids = {"request_id": request_id, "manifest_id": manifest_id, "stream_id": stream_id}
        self.param_updates.put(ids)

    def stop(self) -> None:
        self.done.set()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        if not await asyncio.to_thread(self.ready.wait, timeout):
            raise TimeoutError(f"pipeline not ready within {timeout} s (errors: {self.errors})")

    # -- the child's side -----------------------------------------------------------------------
    async def run(self) -> None:
        """Initialize the pipeline, run the three loops until stopped, then stop the pipeline."""
        pipeline = await self._initialize_pipeline()
        self.pipeline = pipeline
        loops = [
            asyncio.create_task(self._input_loop(pipeline)),
            asyncio.create_task(self._output_loop(pipeline)),
            asyncio.create_task(self._param_update_loop(pipeline)),
            asyncio.create_task(self._wait_for_stop()),
        ]
        self.ready.set()
        try:
            await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._stop_pipeline(pipeline)

    async def _initialize_pipeline(self) -> Pipeline:
        params = self.spec.initial_params
        try:
            return await self._load(params)
        except Exception as exc:
            self._report_error("Error loading pipeline", exc)
            if not params:
                raise
        return await self._load({})

    async def _load(self, params: dict[str, Any]) -> Pipeline:
        self.last_params = parse_pipeline_params(self.spec, params)
        self._last_params_request_id = self.request_id
        pipeline = load_pipeline(self.spec)
        await pipeline.initialize(**params)
        return pipeline

    async def _wait_for_stop(self) -> None:
        while not self.done.is_set():
            await asyncio.sleep(POLL_S)

    async def _stop_pipeline(self, pipeline: Pipeline) -> None:
        try:
            await pipeline.stop()
        except Exception as exc:
            self._report_error("Error stopping pipeline", exc)

    def _is_loading(self) -> bool:
        return not self.ready.is_set() or self.done.is_set()

    async def _input_loop(self, pipeline: Pipeline) -> None:
        while not self.done.is_set():
            try:
                frame = await asyncio.to_thread(self.input_queue.get, timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                frame.log_timestamps["pre_process_frame"] = time.time()
                frame = _to_device(frame)
                if self._is_loading() and self.last_params.show_reloading_frame:
                    self._render_loading_frame(frame)
                else:
                    await pipeline.put_video_frame(frame, self.request_id)
            except Exception as exc:
                self._report_error("Error processing input frame", exc)

    def _render_loading_frame(self, frame: VideoFrame) -> None:
        self._overlay_active = True
        width, height = self.last_params.get_output_resolution()
        grey = frame.tensor.new_full((1, height, width, 3), LOADING_GREY).cpu()
        self.loading_frames += 1
        loading = VideoOutput(frame.replace_tensor(grey), self.request_id, is_loading_frame=True)
        self._try_put(self.output_queue, loading, "output")

    async def _output_loop(self, pipeline: Pipeline) -> None:
        while not self.done.is_set():
            try:
                out = await pipeline.get_processed_video_frame()
                if self._overlay_active:
                    if self._is_loading():
                        continue  # frames that raced the reload are not shown
                    self._overlay_active = False
                if out.tensor.is_cuda:
                    out = out.replace_tensor(out.tensor.cpu())
                out.log_timestamps["post_process_frame"] = time.time()
                self._try_put(self.output_queue, out, "output")
            except Exception as exc:
                self._report_error("Error processing output frame", exc)

    async def _param_update_loop(self, pipeline: Pipeline) -> None:
        while not self.done.is_set():
            params = await self._latest_params()
            if params is None:
                continue
            try:
                reload_task = await self._apply_params(pipeline, params)
            except Exception as exc:
                self._report_error("Error updating params", exc)
                continue
            if reload_task is not None:
                await self._await_reload(reload_task)

    async def _apply_params(
        self, pipeline: Pipeline, params: dict[str, Any]
    ) -> asyncio.Task[None] | None:
        new_params = parse_pipeline_params(self.spec, params)
        if self._last_params_request_id == self.request_id:
            current = self.last_params.get_output_resolution()
            requested = new_params.get_output_resolution()
            if current != requested:
                raise ValueError(
                    f"Cannot change output resolution mid-stream (Current resolution: {current}"
                    f" requested resolution: {requested})."
                )
        reload_task = await pipeline.update_params(**params)
        self.last_params = new_params
        self._last_params_request_id = self.request_id
        return reload_task

    async def _await_reload(self, reload_task: asyncio.Task[None]) -> None:
        self.reloads += 1
        self.ready.clear()
        try:
            await reload_task
        except Exception as exc:
            self._report_error("Error reloading pipeline", exc)
            self.fatal = True
            self.done.set()
            return
        self.ready.set()

    async def _latest_params(self) -> dict[str, Any] | None:
        """The newest queued params set (stream ids are taken on the way), or None."""
        try:
            params: dict[str, Any] | None = await asyncio.to_thread(
                self.param_updates.get, timeout=POLL_S
            )
        except queue.Empty:
            return None
        if params is not None and self._take_stream_ids(params):
            params = None
        while True:
            try:
                newer = self.param_updates.get_nowait()
            except queue.Empty:
                return params
            if not self._take_stream_ids(newer):
                params = newer

    def _take_stream_ids(self, params: dict[str, Any]) -> bool:
        if {"request_id", "manifest_id", "stream_id"} <= params.keys():
            self.request_id = str(params["request_id"])
            return True
        return False

    def _report_error(self, message: str, exc: BaseException) -> None:
        logger.error("%s: %r", message, exc, exc_info=exc)
        self.errors.append(f"{message}: {exc}")

    def _try_put(self, target: queue.Queue[Any], item: Any, name: str) -> bool:
        try:
            target.put_nowait(item)
        except queue.Full:
            if name == "input":
                self.inputs_dropped += 1
            else:
                self.outputs_dropped += 1
            return False
        return True


def _to_device(frame: VideoFrame) -> VideoFrame:
    """The runtime moves input tensors to the GPU when there is one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and not frame.tensor.is_cuda:
        return frame.replace_tensor(frame.tensor.cuda())
    return frame
