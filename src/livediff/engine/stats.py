"""Per-session statistics and the service's Prometheus metrics."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from livediff.frames import Frame, now

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
)
#: The kinds ``livediff_errors_total`` counts (each starts at 0, so that dashboards see it).
ERROR_KINDS = (
    "transform",  # a frame on which the transform raised
    "session_failed",  # a session ended after transform_error_limit failures in a row
    "out_of_memory",  # MemoryError or torch's OutOfMemoryError: the worker restarts
    "worker_died",  # the worker thread ended on another error: it restarts
    "worker_hung",  # a transform call ran past its watchdog limit: a new worker takes over
    "worker_restart_failed",  # a restarted worker could not load: its sessions end
    "peer_failed",  # a peer connection failed (ICE, DTLS)
)


class Metrics:
    """The service's metrics, in a registry of their own (so several apps can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.sessions_active = Gauge(
            "livediff_sessions_active", "Sessions currently open.", registry=reg
        )
        self.sessions_total = Counter("livediff_sessions_total", "Sessions opened.", registry=reg)
        self.frames_received = Counter(
            "livediff_frames_received_total", "Decoded frames taken from peers.", registry=reg
        )
        self.frames_processed = Counter(
            "livediff_frames_processed_total", "Frames the transform produced.", registry=reg
        )
        self.frames_dropped = Counter(
            "livediff_frames_dropped_total",
            "Frames that went no further: replaced in a newest-wins slot (input, output), not"
            " video (ingest), pts not advancing (egress), skipped as unchanged (similarity),"
            " not decoded for a coded size over max_decode_pixels (oversize) or a size header"
            " that cannot be read (size_unreadable).",
            ["stage"],
            registry=reg,
        )
        self.frames_filtered = Counter(
            "livediff_frames_filtered_total",
            "Output frames the safety filter flagged as NSFW and replaced (by the session's"
            " last safe output, or a black frame) before they were sent.",
            registry=reg,
        )
        self.transform_errors = Counter(
            "livediff_transform_errors_total", "Frames on which the transform raised.", registry=reg
        )
        self.frame_latency = Histogram(
            "livediff_frame_latency_seconds",
            "Time from ingest (decoded frame received) to send (handed to the encoder).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "livediff_stage_seconds",
            "Time spent per stage: queue (ingest to worker), process (transform), deliver.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.reloads_refused = Counter(
            "livediff_reloads_refused_total",
            "Params changes refused because they would reload a model other sessions use.",
            registry=reg,
        )
        self.model_loads = Counter(
            "livediff_model_loads_total",
            "Model loads and reloads (warm-up included).",
            registry=reg,
        )
        self.errors = Counter(
            "livediff_errors_total",
            "Errors by kind: transform (a frame raised), session_failed (ended by repeated"
            " failures), out_of_memory, worker_died and worker_hung (the worker restarts),"
            " worker_restart_failed, peer_failed.",
            ["kind"],
            registry=reg,
        )
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.worker_restarts = Counter(
            "livediff_worker_restarts_total",
            "Workers rebuilt after a fault (the transform closed and loaded again).",
            registry=reg,
        )
        self.workers_abandoned = Counter(
            "livediff_workers_abandoned_total",
            "Worker threads left stuck in a transform call past its watchdog limit (a daemon"
            " thread that cannot be stopped; a new worker on a new transform took over).",
            registry=reg,
        )
        self.input_downscaled = Counter(
            "livediff_input_downscaled_total",
            "Input frames larger than max_input_pixels, scaled down before the transform.",
            registry=reg,
        )
        self.requests_rejected = Counter(
            "livediff_requests_rejected_total",
            "API requests answered with an error, by reason and HTTP status.",
            ["reason", "status"],
            registry=reg,
        )
        self.viewers_active = Gauge(
            "livediff_viewers_active", "WHEP viewers currently watching.", registry=reg
        )
        self.batch_size = Histogram(
            "livediff_batch_size",
            "Frames per transform call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=reg,
        )


class _Window:
    """(time, value) samples of the last ``span`` seconds."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, value: float = 0.0) -> None:
        self._samples.append((at, value))
        self._trim(at)

    def _trim(self, at: float) -> None:
        while self._samples and at - self._samples[0][0] > self.span:
            self._samples.popleft()

    def rate(self, at: float) -> float:
        self._trim(at)
        if len(self._samples) < 2:
            return 0.0
        elapsed = max(at - self._samples[0][0], self._samples[-1][0] - self._samples[0][0])
        return (len(self._samples) - 1) / elapsed if elapsed > 0 else 0.0

    def values(self, at: float) -> list[float]:
        self._trim(at)
        return [value for _, value in self._samples]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[rank]


@dataclass(frozen=True)
class LatencySummary:
    p50: float
    p95: float
    p99: float


class SessionStats:
    """Counters and sliding windows for one session; safe to update from any thread."""

    def __init__(self, metrics: Metrics, window_s: float) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_processed = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.errors = 0
        self._received = _Window(window_s)
        self._sent = _Window(window_s)
        self._latency = _Window(window_s)

    def on_received(self, at: float) -> None:
        with self._lock:
            self.frames_in += 1
            self._received.add(at)
        self._metrics.frames_received.inc()

    def on_dropped(self, stage: str) -> None:
        with self._lock:
            self.frames_dropped += 1
        self._metrics.frames_dropped.labels(stage).inc()

    def on_processed(self, frame: Frame) -> None:
        times = frame.times
        with self._lock:
            self.frames_processed += 1
        self._metrics.frames_processed.inc()
        self._metrics.stage_seconds.labels("queue").observe(times.started - times.received)
        self._metrics.stage_seconds.labels("process").observe(times.finished - times.started)

    def on_filtered(self) -> None:
        """Count an output the safety filter replaced."""
        self._metrics.frames_filtered.inc()

    def on_error(self) -> None:
        with self._lock:
            self.errors += 1
        self._metrics.transform_errors.inc()
        self._metrics.errors.labels("transform").inc()

    def on_input_downscaled(self) -> None:
        self._metrics.input_downscaled.inc()

    def on_ended_by_failures(self) -> None:
        self._metrics.errors.labels("session_failed").inc()

    def on_sent(self, frame: Frame, at: float) -> None:
        """Count a frame handed to an encoder; its latency is recorded on its first send."""
        first_send = frame.times.sent == 0.0
        with self._lock:
            self.frames_out += 1
            self._sent.add(at)
            if first_send:
                frame.times.sent = at
                self._latency.add(at, at - frame.times.received)
        if first_send:
            self._metrics.frame_latency.observe(at - frame.times.received)
            self._metrics.stage_seconds.labels("deliver").observe(at - frame.times.finished)

    def latency(self, at: float | None = None) -> LatencySummary:
        with self._lock:
            values = sorted(self._latency.values(now() if at is None else at))
        return LatencySummary(
            p50=percentile(values, 0.50), p95=percentile(values, 0.95), p99=percentile(values, 0.99)
        )

    def fps(self, at: float | None = None) -> tuple[float, float]:
        """(fps in, fps out) over the window."""
        moment = now() if at is None else at
        with self._lock:
            return self._received.rate(moment), self._sent.rate(moment)

    def report(self) -> dict[str, Any]:
        """Counters, rates over the window and latency percentiles (ingest to send, in ms), as
        a session's stats show them."""
        fps_in, fps_out = self.fps()
        latency = self.latency()
        return {
            "frames_in": self.frames_in,
            "frames_processed": self.frames_processed,
            "frames_out": self.frames_out,
            "frames_dropped": self.frames_dropped,
            "errors": self.errors,
            "fps_in": round(fps_in, 2),
            "fps_out": round(fps_out, 2),
            "latency_ms": {
                "p50": round(latency.p50 * 1000, 2),
                "p95": round(latency.p95 * 1000, 2),
                "p99": round(latency.p99 * 1000, 2),
            },
        }
