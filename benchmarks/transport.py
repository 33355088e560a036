"""Glass-to-glass transport latency: livediff (passthrough) against an aiortc-example baseline.

A real aiortc client streams 512x512 frames at 30 fps, each carrying its number drawn in the
pixels (livediff.testing.framecode), to a real server process, and reads the numbers back from
the returned video. Per frame: latency from handing the frame to the client's encoder to the
decoded frame arriving back. Both servers run as separate processes on this machine, one after
the other, with the same client, in one run.

Scenarios
- normal: passthrough. p50/p95/p99 latency, output fps, frames lost.
- slow: the transform takes 100 ms per frame (fed at 30 fps). Latency in the first and the
  last two seconds shows whether it stays flat (livediff sheds frames) or grows (a queue).
Each runs with the client's stock aiortc receiver, and with livediff's marker-aware receiver
(as a browser's would behave: libwebrtc releases a frame on its marker bit).

    python benchmarks/transport.py                      # ~2 minutes, writes benchmarks/results/
    python benchmarks/transport.py --seconds 5 --slow-seconds 5 --codec h264
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiortc
import av
import httpx
from aiortc.mediastreams import MediaStreamTrack

from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)

HERE = Path(__file__).resolve().parent
WARMUP_S = 1.0
EDGE_S = 2.0


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=HERE.parent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.name == "baseline" or httpx.get(f"{self.url}/health").json()["status"] in (
                    "IDLE",
                    "OK",
                ):
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
            except (OSError, httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)

    async def offer(self, http: httpx.AsyncClient, sdp: str, delay_ms: float) -> str:
        if self.name == "baseline":
            body = {"sdp": sdp, "type": "offer", "delay_ms": delay_ms}
            response = await http.post(f"{self.url}/offer", json=body)
        else:
            body = {"sdp": sdp, "type": "offer", "params": {"delay_ms": delay_ms}}
            response = await http.post(f"{self.url}/v1/sessions", json=body)
        response.raise_for_status()
        return str(response.json()["sdp"])


@dataclass
class Result:
    server: str
    scenario: str
    client_receiver: str
    codec: str
    seconds: float
    frames_sent: int
    frames_received: int
    frames_lost: int
    fps_out: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_first_2s: float  # median latency of frames arriving in the first 2 s
    latency_ms_last_2s: float  # ... and in the last 2 s (growth = a queue somewhere)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else 0.0


async def stream(
    server: Server, *, seconds: float, delay_ms: float, codec: str, marker: bool, size: int
) -> Result:
    pc = client_peer()
    source = NumberedVideoTrack(size, size, fps=30)
    recorder = FrameRecorder()
    tasks: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.ensure_future(recorder.consume(track)))

    add_camera(pc, source, codec=codec, marker_buffer=marker)
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await server.offer(http, await local_offer(pc), delay_ms)
    await accept_answer(pc, answer)
    await asyncio.sleep(seconds + WARMUP_S + 0.5)
    await pc.close()
    for task in tasks:
        task.cancel()
    return summarise(
        server.name,
        source=source,
        recorder=recorder,
        seconds=seconds,
        delay_ms=delay_ms,
        codec=codec,
        marker=marker,
    )


def summarise(
    name: str,
    *,
    source: NumberedVideoTrack,
    recorder: FrameRecorder,
    seconds: float,
    delay_ms: float,
    codec: str,
    marker: bool,
) -> Result:
    start = min(source.sent_at.values()) + WARMUP_S
    end = start + seconds
    sent = [n for n, at in source.sent_at.items() if start <= at < end]
    measured = [
        (n, lat) for n, lat in recorder.latencies(source) if start <= source.sent_at[n] < end
    ]
    latencies = [lat * 1000 for _, lat in measured]
    unique = {n for n, _ in measured}
    # By arrival time: a queue shows as frames arriving later and later.
    arrivals = [(source.sent_at[n] + lat, lat * 1000) for n, lat in recorder.latencies(source)]
    first = [ms for at, ms in arrivals if start <= at < start + EDGE_S]
    last = [ms for at, ms in arrivals if end - EDGE_S <= at < end]
    return Result(
        server=name,
        scenario="slow (100 ms/frame)" if delay_ms else "passthrough",
        client_receiver="marker" if marker else "stock",
        codec=codec,
        seconds=seconds,
        frames_sent=len(sent),
        frames_received=len(unique),
        frames_lost=len(set(sent) - unique),
        fps_out=round(len(unique) / seconds, 2),
        latency_ms_p50=round(pct(latencies, 0.50), 1),
        latency_ms_p95=round(pct(latencies, 0.95), 1),
        latency_ms_p99=round(pct(latencies, 0.99), 1),
        latency_ms_first_2s=round(statistics.median(first), 1) if first else 0.0,
        latency_ms_last_2s=round(statistics.median(last), 1) if last else 0.0,
    )


def servers(size: int) -> list[Server]:
    livediff_port, baseline_port = free_port(), free_port()
    livediff = [
        sys.executable,
        "-m",
        "livediff",
        "serve",
        "--port",
        str(livediff_port),
        "--width",
        str(size),
        "--height",
        str(size),
        "--log-level",
        "warning",
    ]
    baseline = [sys.executable, str(HERE / "baseline_server.py"), "--port", str(baseline_port)]
    return [
        Server("livediff", livediff, livediff_port),
        Server("baseline", baseline, baseline_port),
    ]


async def run(args: argparse.Namespace) -> list[Result]:
    results = []
    for server in servers(args.size):
        server.start()
        try:
            for marker in (False, True):
                for delay_ms, seconds in ((0.0, args.seconds), (100.0, args.slow_seconds)):
                    result = await stream(
                        server,
                        seconds=seconds,
                        delay_ms=delay_ms,
                        codec=args.codec,
                        marker=marker,
                        size=args.size,
                    )
                    print_row(result)
                    results.append(result)
        finally:
            server.stop()
    return results


HEADER = (
    f"{'server':9} {'scenario':20} {'client rx':9} {'p50':>7} {'p95':>7} {'p99':>7} "
    f"{'first2s':>8} {'last2s':>8} {'fps':>6} {'lost':>5}"
)


def print_row(r: Result) -> None:
    print(
        f"{r.server:9} {r.scenario:20} {r.client_receiver:9} {r.latency_ms_p50:7.1f} "
        f"{r.latency_ms_p95:7.1f} {r.latency_ms_p99:7.1f} {r.latency_ms_first_2s:8.1f} "
        f"{r.latency_ms_last_2s:8.1f} {r.fps_out:6.1f} {r.frames_lost:5d}",
        flush=True,
    )


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "av": av.__version__,
        "note": "one machine, both servers and the client sharing its cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--slow-seconds", type=float, default=10.0)
    parser.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "transport.json")
    args = parser.parse_args()
    print("latency in ms, glass to glass; fps and lost over the measured window")
    print(HEADER)
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(),
        "config": {**vars(args), "out": str(args.out)},
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
