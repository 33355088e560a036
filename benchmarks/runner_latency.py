"""The native runner's added latency: an input frame published to its output frame received.

The gateway's side runs in this process (``livediff.testing.trickle``): a numbered H.264 clip
(512x512, 30 fps, one segment per 2 s GOP, made by FFmpeg's MPEG-TS muxer as a gateway's is) is
published in real time on the stream's input channel, and the output channel is read back, each
frame taken at its last byte. The orchestrator's side is the trickle server double
(``livediff.testing.trickle_server``, a real HTTP server on 127.0.0.1) and ``livediff runner
--pipeline passthrough`` in a process of its own. A frame's latency runs from its last input
byte handed to the publisher to its last output byte read: two trickle hops (in and out), the
runner's demux, decode, engine, encode and mux. For scale, the same clip read straight off the
input channel (one hop, no runner) is measured in the same run.

    python benchmarks/runner_latency.py                 # ~40 s
    python benchmarks/runner_latency.py --size 1280x720 --seconds 30 --audio

Prints a table and writes ``benchmarks/results/runner_latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from livediff.testing.trickle import ClipPublisher, OutputReader, encode_clip
from livediff.testing.trickle_server import FakeTrickleServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

try:  # the shared machine description of every result file, when benchmarks/common.py is there
    import common
except ImportError:
    common = None

NAME = "runner_latency"
#: Frames of the first seconds are left out (encoders and rate control settle).
WARMUP_S = 1.0


def machine() -> dict[str, Any]:
    if common is not None:
        info: dict[str, Any] = common.machine()
        return info
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RunnerProcess:
    """``livediff runner`` in a process (and process group) of its own."""

    def __init__(self, pipeline: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "livediff", "runner", "--pipeline", pipeline]
        self.command += ["--port", str(self.port), "--log-level", "warning"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> RunnerProcess:
        self.process = subprocess.Popen(self.command, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"livediff runner exited ({self.process.returncode})")
            if self.health() == "IDLE":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"livediff runner was not IDLE within {timeout:g} s")

    def health(self) -> str:
        try:
            return str(httpx.get(f"{self.url}/health", timeout=2).json()["status"])
        except (httpx.HTTPError, ValueError, KeyError):
            return ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the runner process (from /proc), None elsewhere."""
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(os.getpgid(self.process.pid), signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
            self.process.wait(10)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(
    case: str, reader: OutputReader, publisher: ClipPublisher, numbers: dict[int, int], fps: int
) -> dict[str, Any]:
    """Latency percentiles of the frames after the warm-up, and how many came through."""
    skip = round(WARMUP_S * fps)
    latencies = []
    for frame in reader.frames:
        number = numbers.get(frame.pts)
        if number is not None and number >= skip and number in publisher.sent:
            latencies.append((frame.arrived - publisher.sent[number]) * 1000)
    measured = len([n for n in publisher.sent if n >= skip])
    return {
        "case": case,
        "frames_sent": measured,
        "frames_received": len(latencies),
        "frames_lost": measured - len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p90_ms": round(percentile(latencies, 0.90), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=0.0), 2),
        "mean_ms": round(statistics.fmean(latencies) if latencies else 0.0, 2),
    }


async def stream_through(
    args: argparse.Namespace, trickle: FakeTrickleServer, runner: RunnerProcess
) -> list[dict[str, Any]]:
    width, height = args.size
    frames = round(args.seconds * args.fps)
    clip = encode_clip(frames, args.size, fps=args.fps, gop_s=2.0, audio=args.audio)
    channels = trickle.create_stream("bench")
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
        publisher = ClipPublisher(client, channels.subscribe_url, args.fps)
        output = OutputReader(client, channels.publish_url)
        relay = OutputReader(client, channels.subscribe_url)  # the input itself: one hop
        readers = [asyncio.ensure_future(output.read()), asyncio.ensure_future(relay.read())]
        body = {
            "subscribe_url": channels.subscribe_url,
            "publish_url": channels.publish_url,
            "control_url": channels.control_url,
            "events_url": channels.events_url,
            "model_id": "livediff",
            "params": {"width": width, "height": height},
            "gateway_request_id": "bench",
        }
        (await client.post(f"{runner.url}/live-video-to-video", json=body)).raise_for_status()
        await subscribed(trickle, channels.names[0])  # it reads from the live edge: wait for it
        cpu_before = runner.cpu_seconds()
        await publisher.publish(clip)
        cpu_after = runner.cpu_seconds()
        await asyncio.sleep(1.0)
        await publisher.close()
        trickle.delete_channel("bench")
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    rows = [
        summary(
            "runner (passthrough), in to out", output, publisher, clip.numbers_by_pts, args.fps
        ),
        summary("trickle relay only, one hop", relay, publisher, clip.numbers_by_pts, args.fps),
    ]
    if cpu_before is not None and cpu_after is not None:
        rows[0]["runner_cpu_ms_per_frame"] = round(
            (cpu_after - cpu_before) * 1000 / max(1, clip.frames), 2
        )
    return rows


async def subscribed(trickle: FakeTrickleServer, channel: str, timeout: float = 30.0) -> None:
    """Until the runner's GET for the input's next segment waits on the server (beside the
    relay reader's)."""
    deadline = time.monotonic() + timeout
    while trickle.in_flight("GET", channel) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the runner never subscribed to its input")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # its other channels and threads settle


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    trickle = FakeTrickleServer().start()
    runner = RunnerProcess("passthrough")
    try:
        runner.start()
        return await stream_through(args, trickle, runner)
    finally:
        runner.stop()
        trickle.stop()


COLUMNS = [
    ("case", "case", 34, ""),
    ("sent", "frames_sent", 6, "d"),
    ("lost", "frames_lost", 5, "d"),
    ("p50 ms", "p50_ms", 7, ".1f"),
    ("p90 ms", "p90_ms", 7, ".1f"),
    ("p99 ms", "p99_ms", 7, ".1f"),
    ("max ms", "max_ms", 7, ".1f"),
    ("CPU ms/frame", "runner_cpu_ms_per_frame", 12, ".1f"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["  ".join(f"{title:<{width}}" for title, _, width, _ in COLUMNS)]
    for row in rows:
        cells = []
        for _, key, width, spec in COLUMNS:
            value = row.get(key, "")
            text = format(value, spec) if spec and isinstance(value, int | float) else str(value)
            cells.append(f"{text:<{width}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WxH (default 512)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the clip")
    parser.add_argument("--audio", action="store_true", help="an Opus track passed through")
    args = parser.parse_args()
    print(f"native runner latency, {args.size[0]}x{args.size[1]} at {args.fps} fps, passthrough")
    rows = asyncio.run(measure(args))
    print(table(rows))
    config = {
        "size": list(args.size),
        "fps": args.fps,
        "seconds": args.seconds,
        "gop_s": 2.0,
        "audio": args.audio,
        "warmup_s": WARMUP_S,
        "pipeline": "passthrough",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": NAME, "machine": machine(), "config": config, "results": rows}
    path = RESULTS / f"{NAME}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
