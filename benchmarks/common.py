"""What the benchmarks share: the machine they ran on, servers in processes of their own (with
their CPU time), client streams that read frame numbers back, tables, JSON and plots.

Not a benchmark itself (``livediff bench`` does not list it). Every benchmark writes
``benchmarks/results/<name>.json`` as ``{"benchmark", "machine", "config", "results", ...}``
and a PNG of the same name.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from livediff.frames import now
from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)

try:
    import psutil
except ImportError as exc:  # pragma: no cover - a message instead of a traceback
    raise SystemExit("the benchmarks need the 'bench' extra: pip install -e '.[bench]'") from exc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
#: Seconds of streaming before the measured window (codecs and rate control settle).
WARMUP_S = 1.0
#: Seconds after the window for the last frames to come back.
TAIL_S = 0.5
#: The span of the "first" and "last" latency medians.
EDGE_S = 2.0
#: Above this a plot is too big to commit.
PNG_LIMIT_BYTES = 150_000


# -- the machine --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """GPU names: from torch when it is imported already, else from nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """Where and on what a benchmark ran (goes into every result file)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    packages = ("livediff", "aiortc", "av", "numpy", "torch", "diffusers")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
        "commit": _git("rev-parse", "--short", "HEAD"),
        "tree_modified": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def machine_label(info: dict[str, Any]) -> str:
    """'AMD EPYC, 2 cores, no GPU': what a plot or a README table names."""
    gpu = ", ".join(info["gpus"]) or "no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {gpu}"


# -- results ------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def save_json(
    name: str,
    info: dict[str, Any],
    config: Any,
    results: Any,
    *,
    benchmark: str | None = None,
    **extra: Any,
) -> Path:
    """``results/<name>.json``: benchmark (default: the name), machine, config, results and
    any extra keys."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": benchmark or name,
        "machine": info,
        "config": config,
        "results": results,
        **extra,
    }
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    return path


def load_json(name: str) -> dict[str, Any]:
    """A saved result (for ``--replot``: draw the PNG again without measuring)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no saved result {path}; run the benchmark first")
    payload: dict[str, Any] = json.loads(path.read_text())
    return payload


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("plots need matplotlib: pip install -e '.[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt


def save_plot(figure: Any, name: str, info: dict[str, Any]) -> Path:
    """``results/<name>.png``, the machine named in its corner."""
    plt = pyplot()
    figure.text(0.995, 0.005, machine_label(info), ha="right", va="bottom", fontsize=7, color="0.4")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    size = path.stat().st_size
    if size > PNG_LIMIT_BYTES:
        print(f"warning: {path.name} is {size // 1000} KB (keep plots under 150 KB)")
    return path


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    fmt: str = ""  # a format spec for numbers ('.1f'); text is left-aligned
    width: int = 0  # at least the header's width


class Table:
    """A fixed-width text table that can be printed row by row as results come in."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = list(columns)
        self.widths = [max(len(c.header), c.width, 7 if c.fmt else 8) for c in self.columns]

    def header(self) -> str:
        cells = []
        for column, width in zip(self.columns, self.widths, strict=True):
            cells.append(f"{column.header:>{width}}" if column.fmt else f"{column.header:<{width}}")
        return "  ".join(cells)

    def row(self, values: dict[str, Any]) -> str:
        cells = []
        for column, width in zip(self.columns, self.widths, strict=True):
            value = values.get(column.key, "")
            if column.fmt and isinstance(value, int | float):
                cells.append(f"{value:>{width}{column.fmt}}")
            else:
                cells.append(f"{value!s:<{width}}")
        return "  ".join(cells)

    def render(self, rows: Sequence[dict[str, Any]]) -> str:
        return "\n".join([self.header(), *(self.row(r) for r in rows)])


# -- statistics ---------------------------------------------------------------------------------
def pct(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def parse_size(text: str) -> tuple[int, int]:
    """'512' or '1280x720' -> (width, height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


# -- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server the client can stream to: livediff's API or the baseline's /offer."""

    kind: str  # "livediff" or "baseline"
    url: str

    def cpu_seconds(self) -> float:
        return 0.0

    async def offer(self, http: httpx.AsyncClient, sdp: str, params: dict[str, Any]) -> str:
        """Post an offer; the answer's SDP. A full livediff server (503) is asked again."""
        if self.kind == "baseline":
            path, body = "/offer", {"sdp": sdp, "type": "offer", **params}
        else:
            path, body = "/v1/sessions", {"sdp": sdp, "type": "offer", "params": params}
        deadline = time.monotonic() + 20
        while True:
            response = await http.post(f"{self.url}{path}", json=body)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)  # the last run's sessions are still closing
        response.raise_for_status()
        return str(response.json()["sdp"])


@dataclass
class ServerProcess(Server):
    """A server in a process of its own, whose CPU time is read from the operating system."""

    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None
    _ps: psutil.Process | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.process = subprocess.Popen(self.command, cwd=REPO, env={**os.environ, **self.env})
        self._ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.kind} server exited ({self.process.returncode})")
            if self._ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"the {self.kind} server did not start within {timeout:g} s")

    def _ready(self) -> bool:
        try:
            if self.kind == "livediff":
                status = httpx.get(f"{self.url}/health", timeout=2).json()["status"]
                return status in ("IDLE", "OK")
            port = int(self.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except (OSError, httpx.HTTPError, ValueError, KeyError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process (all its threads) has used."""
        if self._ps is None:
            return 0.0
        times = self._ps.cpu_times()
        return float(times.user + times.system)

    async def settle(self, timeout: float = 10.0, busy: float = 0.05) -> None:
        """Wait until the server is idle (below ``busy`` of a core), e.g. after a backlog."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            await asyncio.sleep(0.25)
            if (self.cpu_seconds() - before) / 0.25 < busy:
                return


def livediff_server(*options: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``livediff serve`` on a free port (``options`` added to its command line, ``env`` to its
    environment: ``LIVEDIFF_*`` settings)."""
    port = free_port()
    command = [sys.executable, "-m", "livediff", "serve", "--port", str(port)]
    command += ["--log-level", "warning", *options]
    return ServerProcess("livediff", f"http://127.0.0.1:{port}", command=command, env=env or {})


def baseline_bitrates(codec: str) -> dict[str, str]:
    """livediff settings that make its encoders use the bitrates aiortc's own encoders (the
    baseline's) use: for CPU and saturation compared at the same bits per frame. livediff's
    defaults are higher (better pictures, more work for both ends)."""
    from aiortc.codecs import h264, vpx

    module = vpx if codec == "vp8" else h264
    return {
        "LIVEDIFF_VIDEO_BITRATE_MIN": str(module.MIN_BITRATE),
        "LIVEDIFF_VIDEO_BITRATE_START": str(module.DEFAULT_BITRATE),
        "LIVEDIFF_VIDEO_BITRATE_MAX": str(module.MAX_BITRATE),
    }


def baseline_server() -> ServerProcess:
    """The aiortc-example baseline (benchmarks/baseline_server.py) on a free port."""
    port = free_port()
    command = [sys.executable, str(HERE / "baseline_server.py"), "--port", str(port)]
    return ServerProcess("baseline", f"http://127.0.0.1:{port}", command=command)


@contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """Start every server (stopping them all on the way out)."""
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        yield servers


# -- client streams -----------------------------------------------------------------------------
@dataclass
class ClientStream:
    """One client peer: a numbered camera out, the server's video read back."""

    pc: RTCPeerConnection
    source: NumberedVideoTrack
    recorder: FrameRecorder
    tasks: list[asyncio.Task[None]]

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()


async def open_stream(
    server: Server,
    http: httpx.AsyncClient,
    *,
    size: tuple[int, int],
    codec: str,
    marker: bool,
    params: dict[str, Any],
) -> ClientStream:
    pc = client_peer()
    source = NumberedVideoTrack(size[0], size[1], fps=30)
    recorder = FrameRecorder()
    tasks: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.ensure_future(recorder.consume(track)))

    add_camera(pc, source, codec=codec, marker_buffer=marker)
    answer = await server.offer(http, await local_offer(pc), params)
    await accept_answer(pc, answer)
    return ClientStream(pc, source, recorder, tasks)


@dataclass
class Window:
    """The measured span (``now()`` seconds) and the server CPU seconds spent in it."""

    start: float
    end: float
    cpu_s: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


async def run_streams(
    server: Server,
    count: int,
    *,
    size: tuple[int, int],
    seconds: float,
    codec: str = "vp8",
    marker: bool = True,
    params: dict[str, Any] | None = None,
    warmup: float = WARMUP_S,
) -> tuple[list[ClientStream], Window]:
    """Stream ``count`` cameras at once for ``warmup + seconds``; the window starts ``warmup``
    after the last stream's first frame, and the server's CPU time is read at its edges."""
    async with httpx.AsyncClient(timeout=30) as http:
        streams = await asyncio.gather(
            *(
                open_stream(
                    server, http, size=size, codec=codec, marker=marker, params=params or {}
                )
                for _ in range(count)
            )
        )
    try:
        deadline = now() + 30
        while not all(s.source.sent_at for s in streams):
            if now() > deadline:
                raise RuntimeError("the streams did not start within 30 s")
            await asyncio.sleep(0.02)
        start = max(min(s.source.sent_at.values()) for s in streams) + warmup
        await asyncio.sleep(max(0.0, start - now()))
        cpu_before = server.cpu_seconds()
        await asyncio.sleep(max(0.0, start + seconds - now()))
        cpu_after = server.cpu_seconds()
        await asyncio.sleep(TAIL_S)
    finally:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
    return list(streams), Window(start, start + seconds, cpu_after - cpu_before)


@dataclass
class StreamStats:
    """One stream over a window: frames sent in it, and how (and whether) they came back."""

    frames_sent: int
    frames_received: int
    latencies_ms: list[float]  # per frame sent in the window that came back
    arrivals: list[tuple[float, float]]  # (seconds into the window, latency ms) by arrival

    @property
    def frames_lost(self) -> int:
        return self.frames_sent - self.frames_received


def stream_stats(stream: ClientStream, window: Window) -> StreamStats:
    sent_at = stream.source.sent_at
    sent = {n for n, at in sent_at.items() if window.start <= at < window.end}
    measured = [(n, lat) for n, lat in stream.recorder.latencies(stream.source) if n in sent]
    arrivals = sorted(
        (sent_at[n] + lat - window.start, lat * 1000)
        for n, lat in stream.recorder.latencies(stream.source)
        if window.start <= sent_at[n] + lat < window.end
    )
    return StreamStats(
        frames_sent=len(sent),
        frames_received=len({n for n, _ in measured}),
        latencies_ms=[lat * 1000 for _, lat in measured],
        arrivals=arrivals,
    )


def latency_fields(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {
        "latency_ms_p50": round(pct(latencies_ms, 0.50), 1),
        "latency_ms_p95": round(pct(latencies_ms, 0.95), 1),
        "latency_ms_p99": round(pct(latencies_ms, 0.99), 1),
    }


def edge_fields(arrivals: Sequence[tuple[float, float]], window: Window) -> dict[str, float]:
    """Median latency of the frames arriving in the window's first and last EDGE_S seconds
    (a queue shows as the last being far above the first)."""
    first = [ms for at, ms in arrivals if at < EDGE_S]
    last = [ms for at, ms in arrivals if at >= window.seconds - EDGE_S]
    return {
        "latency_ms_first_2s": round(median(first), 1),
        "latency_ms_last_2s": round(median(last), 1),
    }


def growth_ms_per_s(arrivals: Sequence[tuple[float, float]]) -> float:
    """Slope of latency over arrival time (least squares): ~0 flat, > 0 a growing queue."""
    if len(arrivals) < 3 or len({at for at, _ in arrivals}) < 2:
        return 0.0
    fit = statistics.linear_regression([at for at, _ in arrivals], [ms for _, ms in arrivals])
    return round(fit.slope, 1)


def cpu_fields(window: Window, frames_in: int) -> dict[str, float]:
    """Server CPU per input frame (ms) and as a share of one core (%) over the window."""
    return {
        "server_cpu_ms_per_frame": round(window.cpu_s * 1000 / frames_in, 2) if frames_in else 0.0,
        "server_cpu_percent": round(window.cpu_s * 100 / window.seconds, 1),
    }
