"""The runners' added latency: native and Live Runner, trickle in to out, and WHIP signaling.

The gateway's side runs in this process (``livediff.testing.trickle``): a numbered H.264 clip
(512x512, 30 fps, one segment per 2 s GOP, made by FFmpeg's MPEG-TS muxer as a gateway's is) is
published in real time on the stream's input channel, and the output channel is read back, each
frame taken at its last byte. A frame's latency runs from its last input byte handed to the
publisher to its last output byte read: two trickle hops (in and out), the runner's demux,
decode, engine, encode and mux. Two runners, one after the other in the same run:

- the native runner: the trickle server double (``livediff.testing.trickle_server``, a real HTTP
  server on 127.0.0.1) and ``livediff runner --pipeline passthrough`` in a process of its own;
- the Live Runner: ``livediff serve --pipeline passthrough`` in a process of its own, registered
  (``LIVEDIFF_LIVE_RUNNER_*``) with the go-livepeer orchestrator double
  (``livediff.testing.live_orchestrator``) that runs in this process. A session is reserved
  (``POST /apps/{runner}/session``), ``POST {app_url}/v1/trickle`` makes livediff create the
  session's channels on the orchestrator (on its own trickle server double), and the clip goes
  in and out through them.

For scale, and so that both cases put the same load on this process, each also reads the clip
straight off its input channel (one hop, no runner).

CPU ms/frame is the runner process's (native: ``livediff runner``, Live Runner: ``livediff
serve``) user + system time while the clip was published, per frame.

Signaling: real aiortc WHIP offers (``livediff.testing.peers``) posted straight to the Live
Runner's ``/whip`` (it runs with ``--max-sessions 4 --session-rate 0``) and, for a reserved
session, to ``{app_url}/whip`` (the orchestrator's reverse proxy), alternating direct and
proxied (which goes first alternates too), each timed from the POST to its 201 answer and
deleted at once through the same path (its ``Location``). Each proxied offer has a session of
its own: reserved, made known to livediff by one proxied ``GET /health`` (timed as "reserve to
first proxied request": it includes livediff's wait for the reservation) and released after.
``proxy adds`` is the median of the per-pair differences (proxied minus direct). The first
offers of each path are warm-up, left out. The orchestrator double (its proxy, its trickle
server) runs in this process, as the native case's trickle server does: Python where
go-livepeer has Go, so the proxy's share measures the path (one more HTTP hop on loopback),
not go-livepeer's own speed.

    python benchmarks/runner_latency.py                 # ~50 s
    python benchmarks/runner_latency.py --size 1280x720 --seconds 30 --audio --offers 60

Prints the tables and writes ``benchmarks/results/runner_latency.json`` (``results``: the
trickle rows; ``signaling``: the offer-to-answer rows and the proxy's added ms).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from livediff.testing.live_orchestrator import LiveOrchestratorDouble
from livediff.testing.peers import NumberedVideoTrack, add_camera, client_peer, local_offer
from livediff.testing.servers import free_port
from livediff.testing.trickle import Clip, ClipPublisher, OutputReader, encode_clip
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
#: Offers per path left out before the measured ones (first imports, first connections).
WARMUP_OFFERS = 2
#: The orchestrator double's -orchSecret (a local benchmark: nothing to keep secret).
ORCH_SECRET = "runner-latency-bench"
#: Sessions ``livediff serve`` takes at once (its capacity on the orchestrator).
MAX_SESSIONS = 4
NATIVE_CASE = "runner (passthrough), in to out"
LIVE_CASE = "live runner (passthrough), in to out, through the orchestrator's channels"
RELAY_CASE = "trickle relay only, one hop"
LIVE_RELAY_CASE = "trickle relay only, one hop, the orchestrator's input channel"


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


class LivediffProcess:
    """A ``livediff`` command in a process (and process group) of its own, on a free port."""

    what = "livediff"

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "livediff", *command, "--port", str(self.port)]
        self.command += ["--log-level", "warning"]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        env = None if self.env is None else {**os.environ, **self.env}
        self.process = subprocess.Popen(self.command, cwd=REPO, env=env, start_new_session=True)

    def wait_until(self, ready: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
        """Poll ``ready`` until it returns something truthy, while the process lives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"{self.what} exited ({code})")
            found = ready()
            if found:
                return found
            time.sleep(0.2)
        raise RuntimeError(f"{self.what} was not {what} within {timeout:g} s")

    def health(self) -> str:
        try:
            return str(httpx.get(f"{self.url}/health", timeout=2).json()["status"])
        except (httpx.HTTPError, ValueError, KeyError):
            return ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the process (from /proc), None elsewhere."""
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


class RunnerProcess(LivediffProcess):
    """``livediff runner`` (the native ai-runner protocol)."""

    what = "livediff runner"

    def __init__(self, pipeline: str) -> None:
        super().__init__(["runner", "--pipeline", pipeline])

    def start(self, timeout: float = 120.0) -> RunnerProcess:
        if self.process is None:
            self.launch()
        self.wait_until(lambda: self.health() == "IDLE", "IDLE", timeout)
        return self


class LiveRunnerProcess(LivediffProcess):
    """``livediff serve`` registering itself with an orchestrator as a Live Runner."""

    what = "livediff serve (Live Runner)"

    def __init__(self, pipeline: str, orchestrator: str, size: tuple[int, int]) -> None:
        command = ["serve", "--pipeline", pipeline, "--host", "127.0.0.1"]
        command += ["--width", str(size[0]), "--height", str(size[1])]
        command += ["--max-sessions", str(MAX_SESSIONS), "--session-rate", "0"]
        super().__init__(command)
        self.env = {
            "LIVEDIFF_LIVE_RUNNER_ORCH": orchestrator,
            "LIVEDIFF_LIVE_RUNNER_SECRET": ORCH_SECRET,
            "LIVEDIFF_LIVE_RUNNER_URL": self.url,
        }

    def registered(self, orchestrator: LiveOrchestratorDouble, timeout: float = 120.0) -> str:
        """Wait until the orchestrator lists this process ready; its runner id."""

        def ready_id() -> str | None:
            for runner_id, runner in orchestrator.runners.items():
                if runner.ready and runner.body.get("runner_url") == self.url:
                    return runner_id
            return None

        runner_id: str = self.wait_until(ready_id, "ready on the orchestrator", timeout)
        return runner_id


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


def cpu_per_frame(before: float | None, after: float | None, frames: int) -> dict[str, float]:
    if before is None or after is None:
        return {}
    return {"runner_cpu_ms_per_frame": round((after - before) * 1000 / max(1, frames), 2)}


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), trust_env=False)


# -- the native runner ----------------------------------------------------------------------------
async def stream_through(
    args: argparse.Namespace, clip: Clip, trickle: FakeTrickleServer, runner: RunnerProcess
) -> list[dict[str, Any]]:
    width, height = args.size
    channels = trickle.create_stream("bench")
    async with http_client() as client:
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
        # it reads from the live edge: wait for its GET (beside the relay reader's)
        await subscribed(trickle, channels.names[0], readers=2)
        cpu_before = runner.cpu_seconds()
        await publisher.publish(clip)
        cpu_after = runner.cpu_seconds()
        await asyncio.sleep(1.0)
        await publisher.close()
        trickle.delete_channel("bench")
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    numbers = clip.numbers_by_pts
    native = summary(NATIVE_CASE, output, publisher, numbers, args.fps)
    native.update(cpu_per_frame(cpu_before, cpu_after, clip.frames))
    return [native, summary(RELAY_CASE, relay, publisher, numbers, args.fps)]


async def subscribed(
    trickle: FakeTrickleServer, channel: str, readers: int = 1, timeout: float = 30.0
) -> None:
    """Until ``readers`` GETs for the channel's next segment wait on the server."""
    deadline = time.monotonic() + timeout
    while trickle.in_flight("GET", channel) < readers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runner never subscribed to {channel}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # its other channels and threads settle


# -- the Live Runner ------------------------------------------------------------------------------
async def reserve(
    client: httpx.AsyncClient, orchestrator: LiveOrchestratorDouble, runner_id: str
) -> dict[str, str]:
    """``POST {orch}/apps/{runner}/session``: ``{session_id, app_url, control_url}``."""
    response = await client.post(f"{orchestrator.public_url}/apps/{runner_id}/session")
    response.raise_for_status()
    reply: dict[str, str] = response.json()
    return reply


async def release(client: httpx.AsyncClient, session: dict[str, str]) -> None:
    """``POST {control_url}/stop``: the client ends its session (livediff closes its work)."""
    (await client.post(f"{session['control_url']}/stop")).raise_for_status()


async def stream_through_live_runner(
    args: argparse.Namespace,
    clip: Clip,
    orchestrator: LiveOrchestratorDouble,
    service: LiveRunnerProcess,
    runner_id: str,
) -> list[dict[str, Any]]:
    width, height = args.size
    async with http_client() as client:
        session = await reserve(client, orchestrator, runner_id)
        body = {"params": {"width": width, "height": height}}
        response = await client.post(f"{session['app_url']}/v1/trickle", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/trickle: {response.status_code} {response.text}")
        urls = response.json()
        publisher = ClipPublisher(client, urls["input"], args.fps)
        output = OutputReader(client, urls["output"])
        relay = OutputReader(client, urls["input"])  # as in the native case: the same load here
        readers = [asyncio.ensure_future(output.read()), asyncio.ensure_future(relay.read())]
        await subscribed(orchestrator.trickle, f"{session['session_id']}-input", readers=2)
        cpu_before = service.cpu_seconds()
        await publisher.publish(clip)
        cpu_after = service.cpu_seconds()
        await asyncio.sleep(1.0)
        await publisher.close()
        await release(client, session)  # its channels go with it: the readers end
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    numbers = clip.numbers_by_pts
    live = summary(LIVE_CASE, output, publisher, numbers, args.fps)
    live.update(cpu_per_frame(cpu_before, cpu_after, clip.frames))
    return [live, summary(LIVE_RELAY_CASE, relay, publisher, numbers, args.fps)]


# -- signaling ------------------------------------------------------------------------------------
async def whip_offer(client: httpx.AsyncClient, whip_url: str, size: tuple[int, int]) -> float:
    """One real offer posted to ``whip_url``: ms from the POST to its 201 answer (the session is
    deleted at once, through the same path)."""
    pc = client_peer()
    try:
        add_camera(pc, NumberedVideoTrack(*size))
        offer = await local_offer(pc)
        started = time.perf_counter()
        response = await client.post(
            whip_url, content=offer, headers={"Content-Type": "application/sdp"}
        )
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 201:
            raise RuntimeError(f"POST {whip_url}: {response.status_code} {response.text[:200]}")
        location = response.url.join(response.headers["Location"])
        (await client.delete(location)).raise_for_status()
        return elapsed
    finally:
        await pc.close()


async def proxied_offer(
    client: httpx.AsyncClient,
    orchestrator: LiveOrchestratorDouble,
    runner_id: str,
    size: tuple[int, int],
) -> tuple[float, float]:
    """An offer through the proxy, in a session reserved for it: (ms from the reservation to
    its first proxied request answered, ms from the offer to its answer)."""
    session = await reserve(client, orchestrator, runner_id)
    try:
        reserved = time.perf_counter()
        (await client.get(f"{session['app_url']}/health")).raise_for_status()
        first = (time.perf_counter() - reserved) * 1000
        return first, await whip_offer(client, f"{session['app_url']}/whip", size)
    finally:
        await release(client, session)


def offer_row(case: str, values: list[float]) -> dict[str, Any]:
    return {
        "case": case,
        "offers": len(values),
        "p50_ms": round(percentile(values, 0.50), 2),
        "p90_ms": round(percentile(values, 0.90), 2),
        "max_ms": round(max(values, default=0.0), 2),
        "mean_ms": round(statistics.fmean(values) if values else 0.0, 2),
    }


async def signaling(
    args: argparse.Namespace,
    orchestrator: LiveOrchestratorDouble,
    service: LiveRunnerProcess,
    runner_id: str,
) -> dict[str, Any]:
    """WHIP offers direct and through the proxy, alternating (who goes first alternates too)."""
    direct: list[float] = []
    proxied: list[float] = []
    first_requests: list[float] = []
    async with http_client() as client:
        for index in range(WARMUP_OFFERS + args.offers):
            pair: dict[str, float] = {}
            for path in ("direct", "proxy") if index % 2 == 0 else ("proxy", "direct"):
                if path == "direct":
                    pair[path] = await whip_offer(client, f"{service.url}/whip", args.size)
                else:
                    first, pair[path] = await proxied_offer(
                        client, orchestrator, runner_id, args.size
                    )
                    pair["first"] = first
            if index >= WARMUP_OFFERS:
                direct.append(pair["direct"])
                proxied.append(pair["proxy"])
                first_requests.append(pair["first"])
    added = [through - straight for through, straight in zip(proxied, direct, strict=True)]
    return {
        "offers": args.offers,
        "warmup_offers": WARMUP_OFFERS,
        "rows": [
            offer_row("WHIP offer to answer, direct (livediff /whip)", direct),
            offer_row("WHIP offer to answer, through the proxy ({app_url}/whip)", proxied),
            offer_row("reserve to first proxied request answered (GET /health)", first_requests),
        ],
        "proxy_added_p50_ms": round(statistics.median(added) if added else 0.0, 2),
        "proxy_added_p90_ms": round(percentile(added, 0.90), 2),
    }


# -- the run --------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    trickle = FakeTrickleServer().start()
    orchestrator = LiveOrchestratorDouble(
        ORCH_SECRET, heartbeat_interval_s=1.0, heartbeat_ttl_s=10.0
    ).start()
    runner = RunnerProcess("passthrough")
    service = LiveRunnerProcess("passthrough", orchestrator.url, args.size)
    try:
        runner.launch()
        service.launch()  # both start at once; the cases run one after the other
        frames = round(args.seconds * args.fps)
        clip = encode_clip(frames, args.size, fps=args.fps, gop_s=2.0, audio=args.audio)
        runner.start()
        runner_id = service.registered(orchestrator)
        rows = await stream_through(args, clip, trickle, runner)
        runner.stop()
        live, live_relay = await stream_through_live_runner(
            args, clip, orchestrator, service, runner_id
        )
        rows = [rows[0], live, rows[1], live_relay]
        return rows, await signaling(args, orchestrator, service, runner_id)
    finally:
        runner.stop()
        service.stop()
        orchestrator.stop()
        trickle.stop()


COLUMNS = [
    ("case", "case", 74, ""),
    ("sent", "frames_sent", 5, "d"),
    ("lost", "frames_lost", 4, "d"),
    ("p50 ms", "p50_ms", 6, ".1f"),
    ("p90 ms", "p90_ms", 6, ".1f"),
    ("p99 ms", "p99_ms", 6, ".1f"),
    ("max ms", "max_ms", 6, ".1f"),
    ("CPU ms/frame", "runner_cpu_ms_per_frame", 12, ".1f"),
]
SIGNALING_COLUMNS = [
    ("signaling", "case", 74, ""),
    ("n", "offers", 5, "d"),
    ("p50 ms", "p50_ms", 6, ".1f"),
    ("p90 ms", "p90_ms", 6, ".1f"),
    ("max ms", "max_ms", 6, ".1f"),
]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int, str]] = COLUMNS) -> str:
    lines = ["  ".join(f"{title:<{width}}" for title, _, width, _ in columns).rstrip()]
    for row in rows:
        cells = []
        for _, key, width, spec in columns:
            value = row.get(key, "")
            text = format(value, spec) if spec and isinstance(value, int | float) else str(value)
            cells.append(f"{text:<{width}}")
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def signaling_table(found: dict[str, Any]) -> str:
    added = f"proxy adds (median of the {found['offers']} pairs' proxied - direct): "
    added += f"{found['proxy_added_p50_ms']:.1f} ms (p90 {found['proxy_added_p90_ms']:.1f} ms)"
    return table(found["rows"], SIGNALING_COLUMNS) + "\n" + added


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WxH (default 512)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the clip")
    parser.add_argument("--audio", action="store_true", help="an Opus track passed through")
    parser.add_argument("--offers", type=int, default=30, help="measured WHIP offers per path")
    args = parser.parse_args()
    size = f"{args.size[0]}x{args.size[1]}"
    print(f"native and Live Runner latency, {size} at {args.fps} fps, passthrough")
    started = time.monotonic()
    rows, found = asyncio.run(measure(args))
    print(table(rows))
    print()
    print(signaling_table(found))
    print(f"run time {time.monotonic() - started:.0f} s")
    config = {
        "size": list(args.size),
        "fps": args.fps,
        "seconds": args.seconds,
        "gop_s": 2.0,
        "audio": args.audio,
        "warmup_s": WARMUP_S,
        "pipeline": "passthrough",
        "offers": args.offers,
        "warmup_offers": WARMUP_OFFERS,
        "live_runner_max_sessions": MAX_SESSIONS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": NAME,
        "machine": machine(),
        "config": config,
        "results": rows,
        "signaling": found,
    }
    path = RESULTS / f"{NAME}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
