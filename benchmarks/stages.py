"""Where the time goes inside the server, per frame, from its first RTP packet to its last.

The server runs in this process (``livediff.testing.servers``: uvicorn on a thread of its own,
as the tests start one) and a client streams 30 fps to it from a child process (so the client's
codecs do not share this interpreter). Nothing in livediff is changed: the functions in PATCHES
below are wrapped at runtime, each records a timestamp for the frame it handles (keyed by the
frame's pts, which livediff carries from decoder to encoder), and the stages are the spans
between them:

- receive/jitter: first packet of the frame into the jitter buffer -> the frame released
- decode: released -> decoded (the decoder thread's queue and the decode call)
- queue wait: decoded -> the worker starts it (event loop hop, Session.submit, input slot)
- to-tensor/upload: the transform's upload of the frame (diffusion only; 0 for passthrough)
- transform: the rest of ``Transform.process``
- download/convert: the output adapter (tensor -> host -> yuv420p av.VideoFrame) and
  delivery to the output slots (``Session.complete``)
- encode: output slot -> output track -> encoder thread -> encoded
- send: packetised, encrypted and handed to the socket (the sender's last packet of it)

The sum is the server's time for the frame; the client reports glass-to-glass latency for
the same run beside it. The baseline (aiortc's example, benchmarks/baseline_server.py) runs
through the same aiortc functions, with stock jitter buffer and encoder, for comparison. Bars
are the mean per stage (means add up); the JSON also has p50/p99 per stage and the bare call
times (decode, convert, encode) without the hops before them.

    python benchmarks/stages.py                       # ~1.5 minutes
    python benchmarks/stages.py --cases livediff:passthrough:1280x720 livediff:diffusion:512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiortc.codecs.h264 import H264Decoder, H264Encoder
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpsender import RTCRtpSender
from baseline_server import VideoTransformTrack
from baseline_server import app as baseline_app
from common import (
    WARMUP_S,
    Column,
    Server,
    Table,
    latency_fields,
    load_json,
    machine,
    parse_size,
    pct,
    pyplot,
    run_streams,
    save_json,
    save_plot,
    stream_stats,
)

from livediff.config import Settings
from livediff.encoding import EncoderFrames
from livediff.engine.session import Session
from livediff.frames import now
from livediff.media.codecs import ConfiguredEncoder
from livediff.media.jitter import MarkerJitterBuffer
from livediff.pixels.device import FrameUploader
from livediff.testing.models import tiny_options, write_model_folder
from livediff.testing.servers import ThreadedServer, serve_app, start_server
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.passthrough import PassthroughTransform

NAME = "stages"

#: Every function timed: role -> (the class it is looked up on, the attribute). The classes are
#: imported above, so a class that moves or is renamed stops this file at import; an attribute
#: that goes away stops it just below (:func:`check_patches`). Update this table, nothing else.
PATCHES: dict[str, tuple[type, str]] = {
    "jitter": (MarkerJitterBuffer, "add"),
    "jitter (stock)": (JitterBuffer, "add"),
    "decode vp8": (Vp8Decoder, "decode"),
    "decode h264": (H264Decoder, "decode"),
    "submit": (Session, "submit"),
    "complete": (Session, "complete"),
    "process passthrough": (PassthroughTransform, "process"),
    "process diffusion": (DiffusionTransform, "process"),
    "upload": (FrameUploader, "__call__"),
    "convert": (EncoderFrames, "__call__"),
    "encode": (ConfiguredEncoder, "encode"),
    "encode vp8 (stock)": (Vp8Encoder, "encode"),
    "encode h264 (stock)": (H264Encoder, "encode"),
    "send": (RTCRtpSender, "_next_encoded_frame"),
    "baseline output": (VideoTransformTrack, "recv"),
}


def target_name(owner: type, attribute: str) -> str:
    """``module:Class.attribute``, as the JSON records what was timed."""
    return f"{owner.__module__}:{owner.__qualname__}.{attribute}"


def check_patches() -> None:
    """Raise ImportError naming every PATCHES entry whose attribute its class no longer has."""
    missing = [
        f"{role}: {target_name(owner, attribute)}"
        for role, (owner, attribute) in PATCHES.items()
        if not callable(getattr(owner, attribute, None))
    ]
    if missing:
        raise ImportError("stages: update PATCHES, these are gone:\n  " + "\n  ".join(missing))


check_patches()

STAGES = (
    "receive/jitter",
    "decode",
    "queue wait",
    "to-tensor/upload",
    "transform",
    "download/convert",
    "encode",
    "send",
)
COLOURS = (
    "#4e79a7",
    "#a0cbe8",
    "#f28e2b",
    "#ffbe7d",
    "#59a14f",
    "#8cd17d",
    "#e15759",
    "#b07aa1",
)


# -- the recorder -------------------------------------------------------------------------------
class Recorder:
    """Timestamps per frame (by pts), from whichever thread the wrapped function runs on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.frames: dict[int, dict[str, float]] = defaultdict(dict)
            self.first_packet: dict[int, float] = {}
            self.pending_send: dict[int, int] = {}
            self.encoded: dict[int, int] = {}  # encoder's timestamp -> the frame's pts

    def mark(self, pts: int, **values: float) -> None:
        with self.lock:
            self.frames[pts].update(values)


RECORD = Recorder()


def originals() -> dict[str, tuple[type, str, Any]]:
    """role -> (class, attribute name, the function there now), all read before any patch."""
    if WRAPPERS.keys() != PATCHES.keys():
        raise RuntimeError("stages: PATCHES and WRAPPERS name different roles")
    return {
        role: (owner, attribute, getattr(owner, attribute))
        for role, (owner, attribute) in PATCHES.items()
    }


def wrap_jitter(original: Callable[..., Any]) -> Callable[..., Any]:
    def add(self: Any, packet: Any) -> Any:
        arrived = now()
        RECORD.first_packet.setdefault(packet.timestamp, arrived)
        pli, frame = original(self, packet)
        if frame is not None:
            first = RECORD.first_packet.pop(frame.timestamp, arrived)
            frame._bench_times = (first, now())  # read by decode, after aiortc renumbers it
        return pli, frame

    return add


def wrap_decode(original: Callable[..., Any]) -> Callable[..., Any]:
    def decode(self: Any, encoded: Any) -> Any:
        started = now()
        frames = original(self, encoded)
        times = getattr(encoded, "_bench_times", None)
        if times is not None:  # its timestamp is the decoded frames' pts now
            RECORD.mark(
                encoded.timestamp,
                first_packet=times[0],
                jitter_out=times[1],
                decode_start=started,
                decode_end=now(),
            )
        return frames

    return decode


def wrap_submit(original: Callable[..., Any]) -> Callable[..., Any]:
    def submit(self: Any, frame: Any) -> Any:
        RECORD.mark(frame.pts, submitted=now())
        return original(self, frame)

    return submit


def wrap_complete(original: Callable[..., Any]) -> Callable[..., Any]:
    def complete(self: Any, job: Any, image: Any, finished: float) -> Any:
        RECORD.local.pts = job.frame.pts
        try:
            result = original(self, job, image, finished)
        finally:
            RECORD.local.pts = None
        times = job.frame.times
        RECORD.mark(
            job.frame.pts,
            received=times.received,
            queued=times.queued,
            started=times.started,
            finished=finished,
            complete_end=now(),
        )
        return result

    return complete


def wrap_process(original: Callable[..., Any]) -> Callable[..., Any]:
    def process(self: Any, jobs: Any) -> Any:
        RECORD.local.upload = 0.0
        started = now()
        images = original(self, jobs)
        spent = now() - started
        for job in jobs:
            RECORD.mark(job.frame.pts, process_s=spent, upload_s=RECORD.local.upload)
        return images

    return process


def wrap_upload(original: Callable[..., Any]) -> Callable[..., Any]:
    def upload(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = now()
        result = original(self, *args, **kwargs)
        RECORD.local.upload = getattr(RECORD.local, "upload", 0.0) + now() - started
        return result

    return upload


def wrap_convert(original: Callable[..., Any]) -> Callable[..., Any]:
    def convert(self: Any, image: Any) -> Any:
        started = now()
        result = original(self, image)
        pts = getattr(RECORD.local, "pts", None)
        if pts is not None:
            RECORD.mark(pts, convert_s=now() - started)
        return result

    return convert


def wrap_encode(original: Callable[..., Any]) -> Callable[..., Any]:
    def encode(self: Any, frame: Any, *args: Any, **kwargs: Any) -> Any:
        pts = frame.pts  # read first: PyAV's encode rebases the frame's pts to the codec's
        started = now()
        result = original(self, frame, *args, **kwargs)
        RECORD.mark(pts, encode_start=started, encode_end=now())
        # the RTP timestamp the sender gets back; aiortc's own encoders round it to 1/30 s
        RECORD.encoded[result[1]] = pts
        return result

    return encode


def wrap_send(original: Callable[..., Any]) -> Callable[..., Any]:
    async def next_encoded_frame(self: Any, *args: Any, **kwargs: Any) -> Any:
        # asked for the next frame: every packet of the previous one has gone to the socket
        pending = RECORD.pending_send.pop(id(self), None)
        if pending is not None:
            RECORD.mark(pending, sent=now())
        encoded = await original(self, *args, **kwargs)
        if encoded is not None and self.kind == "video":
            pts = RECORD.encoded.pop(encoded.timestamp, encoded.timestamp)
            RECORD.pending_send[id(self)] = pts
        return encoded

    return next_encoded_frame


def wrap_baseline_output(original: Callable[..., Any]) -> Callable[..., Any]:
    async def recv(self: Any) -> Any:
        frame = await original(self)
        RECORD.mark(frame.pts, output=now())
        return frame

    return recv


WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "jitter": wrap_jitter,
    "jitter (stock)": wrap_jitter,
    "decode vp8": wrap_decode,
    "decode h264": wrap_decode,
    "submit": wrap_submit,
    "complete": wrap_complete,
    "process passthrough": wrap_process,
    "process diffusion": wrap_process,
    "upload": wrap_upload,
    "convert": wrap_convert,
    "encode": wrap_encode,
    "encode vp8 (stock)": wrap_encode,
    "encode h264 (stock)": wrap_encode,
    "send": wrap_send,
    "baseline output": wrap_baseline_output,
}


@contextmanager
def instrumented() -> Iterator[None]:
    """Every PATCHES target wrapped (on its class) for the duration."""
    found = originals()
    try:
        for role, (owner, attribute, original) in found.items():
            setattr(owner, attribute, WRAPPERS[role](original))
        yield
    finally:
        for owner, attribute, original in found.values():
            if attribute in vars(owner):
                delattr(owner, attribute)
            if getattr(owner, attribute, None) is not original:
                setattr(owner, attribute, original)


# -- per-frame stages ---------------------------------------------------------------------------
LIVEDIFF_KEYS = ("first_packet", "jitter_out", "decode_end", "started", "finished")
LIVEDIFF_KEYS += ("complete_end", "encode_end", "sent")
BASELINE_KEYS = ("first_packet", "jitter_out", "decode_end", "output", "encode_end", "sent")


def frame_stages(kind: str, t: dict[str, float]) -> dict[str, float] | None:
    """Milliseconds per stage of one frame (None unless it went all the way through)."""
    if any(key not in t for key in (LIVEDIFF_KEYS if kind == "livediff" else BASELINE_KEYS)):
        return None
    ms = 1000.0
    if kind == "livediff":
        upload = t.get("upload_s", 0.0)
        stages = {
            "queue wait": t["started"] - t["decode_end"],
            "to-tensor/upload": upload,
            "transform": t["finished"] - t["started"] - upload,
            "download/convert": t["complete_end"] - t["finished"],
            "encode": t["encode_end"] - t["complete_end"],
        }
    else:  # the example transforms inline in recv(): nothing between taking and returning
        stages = {
            "queue wait": t["output"] - t["decode_end"],
            "to-tensor/upload": 0.0,
            "transform": 0.0,
            "download/convert": 0.0,
            "encode": t["encode_end"] - t["output"],
        }
    stages["receive/jitter"] = t["jitter_out"] - t["first_packet"]
    stages["decode"] = t["decode_end"] - t["jitter_out"]
    stages["send"] = t["sent"] - t["encode_end"]
    stages["total"] = t["sent"] - t["first_packet"]
    calls = {
        "decode call": t["decode_end"] - t.get("decode_start", t["jitter_out"]),
        "encode call": t["encode_end"] - t.get("encode_start", t["encode_end"]),
        "convert call": t.get("convert_s", 0.0),
    }
    return {name: value * ms for name, value in {**stages, **calls}.items()}


def summarise(
    kind: str, frames: dict[int, dict[str, float]], warmup: float, seconds: float
) -> dict[str, Any]:
    """Per-stage mean/p50/p99 over the frames whose first packet came in the window."""
    begun = min((t["first_packet"] for t in frames.values() if "first_packet" in t), default=0.0)
    window = [
        t for t in frames.values() if 0 <= t.get("first_packet", -1.0) - begun - warmup < seconds
    ]
    kept = [s for s in (frame_stages(kind, t) for t in window) if s is not None]
    names = [*STAGES, "total", "decode call", "encode call", "convert call"]
    per_stage = {
        name: {
            "mean": round(sum(s[name] for s in kept) / len(kept), 3) if kept else 0.0,
            "p50": round(pct([s[name] for s in kept], 0.5), 3),
            "p99": round(pct([s[name] for s in kept], 0.99), 3),
        }
        for name in names
    }
    keys = LIVEDIFF_KEYS if kind == "livediff" else BASELINE_KEYS
    shed_before: dict[str, int] = defaultdict(int)  # the first timestamp a shed frame lacks
    for t in window:
        missing = [key for key in keys if key not in t]
        if missing:
            shed_before[missing[0]] += 1
    return {
        "frames_decoded": len(window),
        "frames_through": len(kept),
        "frames_shed": len(window) - len(kept),
        "frames_shed_before": dict(shed_before),
        "stages_ms": per_stage,
    }


# -- servers in this process --------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    server: str  # livediff | baseline
    pipeline: str  # passthrough | diffusion
    size: tuple[int, int]

    @property
    def label(self) -> str:
        name = "tiny diffusion" if self.pipeline == "diffusion" else self.pipeline
        return f"{self.server} {name} {self.size[0]}x{self.size[1]}"


def parse_case(text: str) -> Case:
    server, pipeline, size = text.split(":")
    if server not in ("livediff", "baseline") or pipeline not in ("passthrough", "diffusion"):
        raise argparse.ArgumentTypeError(
            f"{text}: SERVER:PIPELINE:SIZE, e.g. livediff:diffusion:256"
        )
    if server == "baseline" and pipeline != "passthrough":
        raise argparse.ArgumentTypeError("the baseline runs passthrough only")
    return Case(server, pipeline, parse_size(size))


def start_livediff(case: Case, model_root: Path) -> ThreadedServer:
    """livediff serving the case's pipeline (the tiny random model for diffusion) in-process."""
    width, height = case.size
    if case.pipeline == "diffusion":
        folders = write_model_folder(model_root / "tiny-sd", "tiny", seed=0)
        options = tiny_options(folders, width)
        options.update(width=width, height=height)
    else:
        options = {"pipeline": "passthrough", "width": width, "height": height}
    return start_server(Settings(**options, log_level="warning"), ready_timeout=300)


def start_baseline() -> ThreadedServer:
    """The aiortc-example baseline (baseline_server.py) in-process."""
    return serve_app(baseline_app, name="baseline")


def client(url: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Stream from a child process; its glass-to-glass summary."""
    command = [sys.executable, __file__, "--client", url, "--client-case", case_text(case)]
    command += ["--seconds", str(args.seconds), "--codec", args.codec]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed:\n{done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def case_text(case: Case) -> str:
    return f"{case.server}:{case.pipeline}:{case.size[0]}x{case.size[1]}"


def run_client(args: argparse.Namespace) -> None:
    case = parse_case(args.client_case)
    params = {"width": case.size[0], "height": case.size[1]} if case.server == "livediff" else {}

    async def stream() -> dict[str, Any]:
        streams, window = await run_streams(
            Server(case.server, args.client),
            1,
            size=case.size,
            seconds=args.seconds,
            codec=args.codec,
            params=params,
        )
        stats = stream_stats(streams[0], window)
        return {
            "frames_sent": stats.frames_sent,
            "frames_received": stats.frames_received,
            **latency_fields(stats.latencies_ms),
        }

    print(json.dumps(asyncio.run(stream())))


def measure(case: Case, args: argparse.Namespace, model_root: Path) -> dict[str, Any]:
    server = start_livediff(case, model_root) if case.server == "livediff" else start_baseline()
    try:
        RECORD.reset()
        glass = client(server.url, case, args)
        frames = dict(RECORD.frames)
    finally:
        server.stop()
    summary = summarise(case.server, frames, WARMUP_S, args.seconds)
    return {"case": case.label, **case.__dict__, **summary, "client": glass}


TABLE = Table(
    [
        Column("case", "case", width=34),
        *(Column(name, name, ".2f") for name in STAGES),
        Column("total", "total", ".1f"),
        Column("p99", "total_p99", ".1f"),
        Column("g2g p50", "g2g", ".1f"),
        Column("shed", "frames_shed", "d"),
    ]
)


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    stages = row["stages_ms"]
    return {
        "case": row["case"],
        **{name: stages[name]["mean"] for name in STAGES},
        "total": stages["total"]["mean"],
        "total_p99": stages["total"]["p99"],
        "g2g": row["client"]["latency_ms_p50"] if row["client"]["frames_received"] else "n/a",
        "frames_shed": row["frames_shed"],
    }


def glass(row: dict[str, Any]) -> str:
    """The client's view of the same run (a diffusion model's output has no readable number)."""
    if not row["client"]["frames_received"]:
        return "g2g n/a*"
    return f"g2g p50 {row['client']['latency_ms_p50']:.0f} ms"


def _bars(axes: Any, rows: list[dict[str, Any]], label_from: float, notes: bool) -> None:
    for y, row in enumerate(rows):
        left = 0.0
        for name, colour in zip(STAGES, COLOURS, strict=True):
            width = row["stages_ms"][name]["mean"]
            axes.barh(y, width, 0.6, left=left, color=colour, label=name if y == 0 else None)
            if width >= label_from:
                axes.text(left + width / 2, y, f"{width:.1f}", ha="center", va="center", fontsize=7)
            left += width
        note = f"{left:.1f} ms" + (f" in the server; {glass(row)}" if notes else "")
        axes.text(left * 1.01 + 0.1, y, note, va="center", fontsize=7)
    axes.set_yticks(range(len(rows)), [row["case"].replace(" ", "\n", 1) for row in rows])
    axes.invert_yaxis()
    most = max(sum(r["stages_ms"][n]["mean"] for n in STAGES) for r in rows)
    axes.set_xlim(0, most * (1.45 if notes else 1.2))
    axes.grid(axis="x", alpha=0.3)


def plot(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    plt = pyplot()
    totals = [sum(r["stages_ms"][n]["mean"] for n in STAGES) for r in rows]
    fast = [row for row, total in zip(rows, totals, strict=True) if total <= max(totals) / 4]
    zoom = 0 < len(fast) < len(rows)
    figure, panels = plt.subplots(
        1,
        2 if zoom else 1,
        figsize=(13 if zoom else 10, 2.2 + 0.7 * len(rows)),
        width_ratios=[3, 2] if zoom else None,
        squeeze=False,
    )
    whole = panels[0][0]
    _bars(whole, rows, 3.0, notes=True)
    whole.set_xlabel("ms per frame (mean), first RTP packet in -> last RTP packet out")
    whole.set_title("Where a frame's time goes inside the server (30 fps in)")
    if zoom:
        close = panels[0][1]
        slowest = max(sum(r["stages_ms"][n]["mean"] for n in STAGES) for r in fast)
        _bars(close, fast, slowest / 10, notes=False)
        close.set_xlabel("ms per frame (mean)")
        close.set_title("The faster cases, closer")
    handles, labels = whole.get_legend_handles_labels()
    figure.legend(handles, labels, ncols=8, loc="lower center", fontsize=7, frameon=False)
    if any(not r["client"]["frames_received"] for r in rows):
        figure.text(
            0.005,
            0.995,
            "* g2g n/a: the random-weight model's output keeps no readable frame number",
            fontsize=7,
            color="0.4",
            va="top",
        )
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_plot(figure, NAME, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        type=parse_case,
        nargs="+",
        default=[
            parse_case("livediff:passthrough:512"),
            parse_case("baseline:passthrough:512"),
            parse_case("livediff:passthrough:256"),
            parse_case("livediff:diffusion:256"),
        ],
        help="SERVER:PIPELINE:SIZE (livediff|baseline : passthrough|diffusion : 512 or WxH)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per case")
    parser.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--client-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args)
        return
    if args.replot:
        saved = load_json(NAME)
        plot(saved["results"], saved["machine"])
        return
    rows = []
    print("ms per frame, mean per stage; total = the server's time; g2g = the client's p50")
    print(TABLE.header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="livediff-stages-") as root, instrumented():
        for case in args.cases:
            row = measure(case, args, Path(root))
            print(TABLE.row(table_row(row)), flush=True)
            rows.append(row)
    info = machine()
    config = {
        "cases": [case_text(c) for c in args.cases],
        "seconds": args.seconds,
        "codec": args.codec,
        "fps_in": 30,
        "client_receiver": "marker",
        "patched": {role: target_name(*target) for role, target in PATCHES.items()},
    }
    path = save_json(NAME, info, config, rows)
    plot(rows, info)
    print(f"saved {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
