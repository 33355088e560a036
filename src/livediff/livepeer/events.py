"""A stream's events channel: status every few seconds, errors and traces, as ai-runner sends them.

go-livepeer stops a stream that sends no event for 30 s, stores ``type: status`` events for its
status API (``inference_status.last_params`` is sent once and then left empty), and forwards
every event to its queue under ``queue_event_type``. The fields follow ai-runner v0.14.1
(``runner/live/process/status.py``, ``process_guardian.py``): times in epoch milliseconds, the
pipeline state ``ONLINE`` / ``DEGRADED_INPUT`` / ``DEGRADED_INFERENCE`` / ``OFFLINE`` /
``ERROR``, input and output fps, the last params and their hash, the last error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from livediff.livepeer.trickle import TricklePublisher

logger = logging.getLogger(__name__)

ONLINE = "ONLINE"
OFFLINE = "OFFLINE"
DEGRADED_INPUT = "DEGRADED_INPUT"
DEGRADED_INFERENCE = "DEGRADED_INFERENCE"
ERROR = "ERROR"
#: Input older than this makes the state DEGRADED_INPUT (seconds).
INPUT_GRACE_S = 2.0
#: Output older than this while input flows makes it DEGRADED_INFERENCE (seconds).
OUTPUT_GRACE_S = 5.0
STREAM_EVENTS = "ai_stream_events"
STREAM_TRACE = "stream_trace"
#: Event requests left unanswered before new events are dropped (the channel is stuck).
MAX_EVENTS_IN_FLIGHT = 8


def epoch_ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


def params_hash(params: dict[str, Any]) -> str:
    """ai-runner's ``last_params_hash``: MD5 of the params as sorted JSON."""
    return hashlib.md5(json.dumps(params, sort_keys=True).encode()).hexdigest()


@dataclass
class StreamStatus:
    """One stream's state for its status events. Times are epoch seconds (``time.time()``);
    the ingest and egress threads set their times by plain assignment."""

    pipeline: str
    start_time: float = field(default_factory=time.time)
    running: bool = True
    failed: bool = False
    state: str = ONLINE
    last_state_update_time: float | None = None
    last_input_time: float | None = None
    last_output_time: float | None = None
    last_params_update_time: float | None = None
    last_params: dict[str, Any] | None = None  # sent in the next status event only
    last_params_hash: str | None = None
    last_error_time: float | None = None
    last_error: str | None = None
    last_status_time: float | None = None

    def params_applied(self, params: dict[str, Any]) -> None:
        self.last_params = params
        self.last_params_hash = params_hash(params)
        self.last_params_update_time = time.time()

    def error(self, message: str) -> None:
        self.last_error = message
        self.last_error_time = time.time()

    def current_state(self, at: float) -> str:
        if self.failed:
            return ERROR
        if not self.running:
            return OFFLINE
        if at - (self.last_input_time or self.start_time) > INPUT_GRACE_S:
            return DEGRADED_INPUT
        recent_output = at - (self.last_output_time or self.start_time) <= OUTPUT_GRACE_S
        return ONLINE if recent_output else DEGRADED_INFERENCE

    def report(self, fps_in: float, fps_out: float) -> dict[str, Any]:
        """The next status event (and the transient fields are cleared)."""
        at = time.time()
        state = self.current_state(at)
        if state != self.state:
            logger.info("stream state %s -> %s", self.state, state)
            self.state, self.last_state_update_time = state, at
        event = {
            "type": "status",
            "pipeline": self.pipeline,
            "start_time": epoch_ms(self.start_time),
            "state": state,
            "last_state_update_time": epoch_ms(self.last_state_update_time),
            "input_status": {"last_input_time": epoch_ms(self.last_input_time), "fps": fps_in},
            "inference_status": self._inference(fps_out),
            "last_status_timestamp": epoch_ms(self.last_status_time or self.start_time),
        }
        self.last_status_time = at
        self.last_params = None
        return event

    def _inference(self, fps_out: float) -> dict[str, Any]:
        return {
            "last_output_time": epoch_ms(self.last_output_time),
            "fps": fps_out,
            "last_params_update_time": epoch_ms(self.last_params_update_time),
            "last_params": self.last_params,
            "last_params_hash": self.last_params_hash,
            "last_error_time": epoch_ms(self.last_error_time),
            "last_error": self.last_error,
            "last_restart_time": None,
            "last_restart_logs": None,
            "restart_count": 0,
        }


class EventPublisher:
    """Events of one stream, one JSON object per trickle segment; never blocks the caller."""

    def __init__(self, publisher: TricklePublisher | None, pipeline: str) -> None:
        self.publisher = publisher
        self.pipeline = pipeline
        self.sent = 0

    def emit(self, event: dict[str, Any], queue_event_type: str = STREAM_EVENTS) -> bool:
        """Publish an event (stamped with ``timestamp``); False when it could not go out."""
        publisher = self.publisher
        if publisher is None:
            return False
        if publisher.in_flight > MAX_EVENTS_IN_FLIGHT:
            logger.warning("events channel is not taking events; dropped a %s", event.get("type"))
            return False
        stamped = {**event, "timestamp": epoch_ms(time.time())}
        body = {"event": stamped, "queue_event_type": queue_event_type}
        segment = publisher.next_segment()
        segment.write(json.dumps(body).encode())
        segment.close()
        self.sent += 1
        return True

    def error(self, message: str) -> bool:
        """An error event, as ai-runner sends one (the stream goes on)."""
        logger.error("stream error: %s", message)
        event = {"type": "error", "pipeline": self.pipeline, "message": message}
        return self.emit({**event, "time": time.time()})

    def trace(self, kind: str) -> bool:
        """A ``stream_trace`` milestone (ai-runner: runner_receive_stream_request, ...)."""
        return self.emit({"type": kind, "timestamp": epoch_ms(time.time())}, STREAM_TRACE)

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close(delete=True)
