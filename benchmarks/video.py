"""The causal video pipeline on its real path: fps, chunk latency, first-frame latency, memory.

Everything runs the way ``livediff serve --pipeline video`` runs it: an :class:`Engine` whose
worker thread owns the device loads the :class:`VideoTransform`, warms it up, batches the
sessions' frames and brings each output back as a yuv420p video frame. Only the weights differ:
they are random, built directly on the device from the configs in
:mod:`livediff.testing.video_models` (``--preset wan-1.3b``: the published Wan 2.1 T2V 1.3B
transformer and VAE and the UMT5-XXL encoder, in bf16 on CUDA; ``tiny``: the tests' tiny ones),
which costs the same time as the real model. The tokenizer is the tests' character-level one,
padded to the model's text length (512 tokens for Wan), so UMT5 does the same work.

Cases (one row each): 1 and 4 denoising steps (``denoising_step_list`` ``[1000]`` and
``[1000, 750, 500, 250]`` at ``noise_scale`` 1, so every listed step runs, plus the pass that
writes the clean chunk into the KV cache), 1 and 2 sessions, ``chunk_frames`` 1 (4 video frames
a chunk, the first 5), each ``--cache-write`` rule (``clean``: that extra pass; ``last_step``:
the last step's pass writes, one pass fewer a chunk; ``last_step`` rows are measured saturating
only, where the pass saved shows as throughput), in two feeding modes:

- ``saturating``: a new frame whenever the worker has taken the last one (the engine's input
  slot never runs dry, so the worker never waits): the pipeline's throughput;
- ``source``: frames submitted on a timer at ``--fps`` (24), newest wins in the engine's input
  slot as with a camera: whether the pipeline keeps up with a live source, and what it drops.

Per row: ``fps_per_session`` (output frames per second of each session, the mean) and
``fps_total`` (all sessions), over ``--frames`` outputs per session after the first two chunks;
``chunk_ms_p50`` (a steady chunk's encode + denoise + decode in the transform, batched sessions
sharing one chunk) and ``first_chunk_ms``; ``first_frame_ms`` (the session's first input frame
submitted to its first output frame received, the worst session; per session in
``first_frame_ms_sessions``); ``gpu_memory_gib`` (``torch.cuda.max_memory_allocated``, reset
at the case's start, weights included; null on the CPU); ``dropped`` (frames the engine
dropped); ``failed_frames``.

A case that cannot finish fails alone, with its reason, and the next one runs: a session the
engine ended (the transform failed ``ERROR_LIMIT`` frames in a row) or no result within
``--row-timeout`` seconds. The JSON report (``--json``) is rewritten after every row, so a run
stopped from outside keeps every row it measured; the exit status is 1 when a case failed.

    python benchmarks/video.py                                      # CPU: tiny, 64x64, < 1 min
    python benchmarks/video.py --preset wan-1.3b --size 480x832     # the GPU (device/run.sh)

``--size`` is HEIGHTxWIDTH (480x832 is Wan's 480p landscape) or one number for a square.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from engine_cases import CaseFailedError, VideoFrames, all_or_first_failure, machine_info

from livediff.config import Settings
from livediff.engine import Engine, Session
from livediff.engine.errors import EngineUnavailableError
from livediff.engine.slot import SlotClosedError
from livediff.frames import Frame
from livediff.testing import video_models as configs
from livediff.transforms.video.models import VideoModel
from livediff.transforms.video.transform import VideoTransform, _Chunk

RESULTS = Path(__file__).resolve().parent / "results"
#: ``denoising_step_list`` per step count (at noise_scale 1 every listed step runs).
STEP_LISTS = {1: [1000], 2: [1000, 500], 3: [1000, 750, 500], 4: [1000, 750, 500, 250]}
#: Frames failed in a row after which the engine ends a measured session (and its case fails).
ERROR_LIMIT = 3
#: Video frames a chunk takes (chunk_frames 1: one latent frame), the first chunk one more.
CHUNK = 4
#: Outputs before the measured window: the first chunk (5 frames) and the next one.
LEAD_IN = 1 + 2 * CHUNK
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]] = {
    "tiny": (
        configs.TINY_WAN_TRANSFORMER,
        configs.TINY_WAN_VAE,
        configs.TINY_UMT5_TEXT_ENCODER,
        configs.TINY_TEXT_TOKENS,
    ),
    "wan-1.3b": (
        configs.WAN21_T2V_1_3B_TRANSFORMER,
        configs.WAN21_VAE,
        configs.WAN21_UMT5_TEXT_ENCODER,
        configs.WAN21_TEXT_TOKENS,
    ),
}


def build_video_model(
    preset: str, device: torch.device, dtype: torch.dtype, text_device: torch.device | None = None
) -> VideoModel:
    """Random weights of ``preset``, built on ``device`` (one component at a time, cast to
    ``dtype`` before the next is built, so UMT5-XXL's float32 build is the peak); UMT5 on
    ``text_device`` when given (``--text-device cpu``: host memory)."""
    transformer_config, vae_config, encoder_config, tokens = PRESETS[preset]
    text_device = device if text_device is None else text_device

    def ready(module: Any, on: torch.device = device) -> Any:
        module = module.to(device=on, dtype=dtype).eval().requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return module

    with torch.device(text_device):
        text_encoder = ready(configs.build_umt5_encoder(encoder_config, seed=0), text_device)
    with torch.device(device):
        transformer = ready(configs.build_wan_transformer(transformer_config, seed=0))
        vae = ready(configs.build_wan_vae(vae_config, seed=0))
    return VideoModel(
        folder=Path(f"random:{preset}"),
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=configs.build_tiny_tokenizer(tokens),
    )


class RandomWeightsVideoTransform(VideoTransform):
    """The video transform on random weights of a published architecture, built on the device
    (no download: timing does not depend on the weights); it logs every chunk's time."""

    preset = "tiny"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        #: (sessions in the batch, first chunk?, ms) of each chunk run (worker thread only).
        self.chunk_log: list[tuple[int, bool, float]] = []

    @classmethod
    def check_available(cls, settings: Settings) -> None:
        return None  # nothing to download

    def _load(self, name: str) -> None:
        self.close()
        built = build_video_model(self.preset, self._device, self._dtype, self._text_device)
        self._serve_model(built, name)

    def _run(self, group: list[_Chunk]) -> None:
        first = group[0].state.vae.frames_encoded == 0
        started = time.perf_counter()
        super()._run(group)  # ends with the frames on the host: the time is the device's too
        self.chunk_log.append((len(group), first, (time.perf_counter() - started) * 1000))


def camera(height: int, width: int, count: int = 8) -> list[av.VideoFrame]:
    """yuv420p frames like a decoder's (smooth gradients plus noise), distinct from each other."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    frames = []
    for _ in range(count):
        base = ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + rng.uniform(-40, 40, 3)
        noisy = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        frames.append(av.VideoFrame.from_ndarray(noisy, format="rgb24").reformat(format="yuv420p"))
    return frames


@dataclass(frozen=True)
class Case:
    """One row: steps, sessions and how frames are fed (``source_fps`` None: saturating)."""

    steps: int
    sessions: int
    source_fps: float | None
    cache_write: str = "clean"

    @property
    def mode(self) -> str:
        return "saturating" if self.source_fps is None else "source"

    @property
    def name(self) -> str:
        name = f"{self.mode}/steps={self.steps}/sessions={self.sessions}"
        return name if self.cache_write == "clean" else f"{name}/cache_write={self.cache_write}"

    def params(self, height: int, width: int) -> dict[str, Any]:
        return {
            "width": width,
            "height": height,
            "denoising_step_list": STEP_LISTS[self.steps],
            "noise_scale": 1.0,
            "chunk_frames": 1,
            "cache_write": self.cache_write,
        }


def cases(args: argparse.Namespace) -> list[Case]:
    """Saturating first (the throughput), then at the source rate; cache-write rules (the
    ``last_step`` ones saturating only), steps, then sessions."""
    modes: list[float | None] = [None] if args.mode == "saturating" else [args.fps]
    if args.mode == "both":
        modes = [None, args.fps]
    return [
        Case(s, n, fps, rule)
        for fps in modes
        for rule in args.cache_write
        if rule == "clean" or fps is None
        for s in args.steps
        for n in args.sessions
    ]


@dataclass
class Played:
    """One session's case: when its first frame went in, when each output came back."""

    first_in: float
    outputs: list[float]


async def feed(
    session: Session, frames: list[av.VideoFrame], source_fps: float | None, first_in: list[float]
) -> None:
    """Submit frames until cancelled: whenever the worker took the last one (saturating), or
    on a timer at ``source_fps`` (newest wins: a frame still waiting is dropped by the engine).
    The first submission's time goes into ``first_in``."""
    started = time.perf_counter()
    index = 0
    while True:
        if source_fps is not None or not session.input.ready():
            if not first_in:
                first_in.append(time.perf_counter())
            session.submit(Frame(image=frames[index % len(frames)], pts=index))
            index += 1
        if source_fps is None:
            await asyncio.sleep(0.0005)
        else:
            await asyncio.sleep(max(0.0, started + index / source_fps - time.perf_counter()))


async def play(
    session: Session, frames: list[av.VideoFrame], count: int, source_fps: float | None
) -> Played:
    """Feed the session (saturating, or at ``source_fps``) until ``count`` outputs came back.
    Raises :class:`CaseFailedError` when the session ends first."""
    slot = session.subscribe(asyncio.get_running_loop())
    if session.end_reason is not None:  # ended before this slot existed: nothing will close it
        session.unsubscribe(slot)
        raise CaseFailedError(f"session ended: {session.end_reason}")
    first_in: list[float] = []
    feeder = asyncio.ensure_future(feed(session, frames, source_fps, first_in))
    outputs: list[float] = []
    try:
        while len(outputs) < count:
            await slot.get()
            outputs.append(time.perf_counter())
    except SlotClosedError:
        raise CaseFailedError(f"session ended: {session.end_reason}") from None
    finally:
        feeder.cancel()
        session.unsubscribe(slot)
    return Played(first_in[0], outputs)


def cuda(engine: Engine) -> bool:
    return engine.transform.device.startswith("cuda")


def reset_memory(engine: Engine) -> None:
    if cuda(engine):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gib(count: float) -> float:
    return round(count / 1024**3, 3)


async def measure(
    engine: Engine, case: Case, size: tuple[int, int], frames: list[av.VideoFrame], count: int
) -> dict[str, Any]:
    """``case.sessions`` new sessions fed until each gave ``LEAD_IN + count`` outputs."""
    transform = engine.transform
    assert isinstance(transform, RandomWeightsVideoTransform)

    def start() -> None:
        transform.chunk_log.clear()
        reset_memory(engine)

    await engine.on_worker(start)
    params = case.params(*size)
    opened: list[Session] = []
    try:
        for k in range(case.sessions):
            opened.append(await open_measured(engine, params, 1 + k))
        played = await all_or_first_failure(
            [play(s, frames, LEAD_IN + count, case.source_fps) for s in opened]
        )
        chunks = await engine.on_worker(lambda: list(transform.chunk_log))
        memory = await engine.on_worker(
            lambda: torch.cuda.max_memory_allocated() if cuda(engine) else None
        )
    finally:
        for session in opened:
            await engine.close_session(session.id, "measured")
    return summarise(case, size, count, played, chunks=chunks, memory=memory, sessions=opened)


async def open_measured(engine: Engine, params: dict[str, Any], seed: int) -> Session:
    """A session whose end (the engine ends it after ERROR_LIMIT failed frames in a row) closes
    its output slots, so that a reader waiting for its next frame wakes up and says why."""
    opened: list[Session] = []

    def ended(_reason: str) -> None:
        for session in opened:
            session.close_outputs()

    session = await engine.open_session(
        engine.validate({**params, "seed": seed}), adapt_output=VideoFrames(), on_end=ended
    )
    opened.append(session)
    return session


def summarise(
    case: Case,
    size: tuple[int, int],
    count: int,
    played: list[Played],
    *,
    chunks: list[tuple[int, bool, float]],
    memory: int | None,
    sessions: list[Session],
) -> dict[str, Any]:
    fps = [count / (run.outputs[-1] - run.outputs[LEAD_IN - 1]) for run in played]
    first = [(run.outputs[0] - run.first_in) * 1000 for run in played]
    steady = [ms for _, is_first, ms in chunks if not is_first]
    first_chunks = [ms for _, is_first, ms in chunks if is_first]
    return {
        "case": case.name,
        "mode": case.mode,
        "source_fps": case.source_fps,
        "size": f"{size[0]}x{size[1]}",
        "steps": case.steps,
        "cache_write": case.cache_write,
        "transformer_calls_per_chunk": case.steps + (case.cache_write == "clean"),
        "denoising_step_list": STEP_LISTS[case.steps],
        "sessions": case.sessions,
        "frames": count,
        "fps_per_session": round(statistics.mean(fps), 2),
        "fps_total": round(sum(fps), 2),
        "chunk_ms_p50": round(statistics.median(steady), 2) if steady else None,
        "first_chunk_ms": round(max(first_chunks), 2) if first_chunks else None,
        "chunk_sessions_mean": round(statistics.mean(n for n, _, _ in chunks), 2),
        "first_frame_ms": round(max(first), 2),
        "first_frame_ms_sessions": [round(ms, 2) for ms in first],
        "gpu_memory_gib": None if memory is None else gib(memory),
        "dropped": sum(session.stats.frames_dropped for session in sessions),
        "failed_frames": sum(session.stats.errors for session in sessions),
    }


class Report:
    """The run's figures as one JSON document, written again after every row: a run stopped
    from outside (a step's timeout on the GPU machine) leaves every row it measured."""

    def __init__(self, path: Path, machine: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "benchmark": "video",
            "machine": machine,
            "config": config,
            "load": None,
            "results": [],
            "failed": [],
        }
        self.save()

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data[section].append(row)
        print(json.dumps({section: row}), flush=True)
        self.save()

    def fail(self, case: str, reason: str) -> None:
        self.add("failed", {"case": case, "error": reason})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


def engine_settings(args: argparse.Namespace) -> Settings:
    height, width = args.size
    model = f"random:{args.preset}"
    return Settings(
        pipeline="video",
        model=model,
        allow_models=[model],
        video_text_device=args.text_device,
        device=args.device,
        width=width,
        height=height,
        max_sessions=max(args.sessions),
        max_batch=max(args.sessions),
        warmup_frames=2 * CHUNK + 1,
        transform_error_limit=ERROR_LIMIT,
    )


async def start_engine(args: argparse.Namespace, report: Report) -> Engine | None:
    """A loaded, warmed-up engine; None, reported, if it did not load."""
    RandomWeightsVideoTransform.preset = args.preset
    loading = time.perf_counter()
    try:
        settings = engine_settings(args)
        engine = Engine(settings, RandomWeightsVideoTransform(settings))
    except Exception as exc:
        report.fail("load", repr(exc))
        return None
    try:
        await engine.start()
    except Exception as exc:
        report.fail("load", repr(exc))
        await engine.stop()
        return None
    load: dict[str, Any] = {"load_s": round(time.perf_counter() - loading, 1)}
    if cuda(engine):
        load["weights_gib"] = gib(await engine.on_worker(torch.cuda.memory_allocated))
    report.data["load"] = load
    print(json.dumps({"load": load}), flush=True)
    return engine


async def main(args: argparse.Namespace) -> Report:
    machine = machine_info(args.device)
    report = Report(args.json or default_json(args, machine), machine, config(args))
    engine = await start_engine(args, report)
    if engine is None:
        return report
    frames = camera(*args.size)
    count = max(CHUNK, -(-args.frames // CHUNK) * CHUNK)  # whole chunks
    try:
        for case in cases(args):
            try:
                row = await asyncio.wait_for(
                    measure(engine, case, args.size, frames, count), args.row_timeout
                )
            except TimeoutError:
                report.fail(case.name, f"no result within {args.row_timeout} s")
                continue
            except (CaseFailedError, EngineUnavailableError) as exc:
                report.fail(case.name, str(exc))
                continue
            report.add("results", row)
    finally:
        await engine.stop()
    return report


def config(args: argparse.Namespace) -> dict[str, Any]:
    values = {key: value for key, value in vars(args).items() if key != "json"}
    values["size"] = f"{args.size[0]}x{args.size[1]}"
    return values


def default_json(args: argparse.Namespace, machine: dict[str, Any]) -> Path:
    """benchmarks/results/video-<preset>-<height>x<width>-<card or cpu>.json"""
    label = machine.get("gpu", "cpu").lower().replace(" ", "-")
    return RESULTS / f"video-{args.preset}-{args.size[0]}x{args.size[1]}-{label}.json"


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}  load {report['load']}")
    print(
        f"{'mode':<11} {'size':>8} {'write':>9} {'steps':>5} {'sess':>4} {'fps/sess':>8} {'fps':>7}"
        f" {'chunk ms':>9} {'1st chunk':>9} {'1st frame':>9} {'GiB':>7} {'dropped':>7}"
    )

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    for row in report["results"]:
        memory = "n/a" if row["gpu_memory_gib"] is None else f"{row['gpu_memory_gib']:.2f}"
        print(
            f"{row['mode']:<11} {row['size']:>8} {row['cache_write']:>9} {row['steps']:>5}"
            f" {row['sessions']:>4}"
            f" {row['fps_per_session']:>8.1f} {row['fps_total']:>7.1f}"
            f" {ms(row['chunk_ms_p50']):>9} {ms(row['first_chunk_ms']):>9}"
            f" {ms(row['first_frame_ms']):>9} {memory:>7} {row['dropped']:>7}"
        )
    for row in report["failed"]:
        print(f"FAILED {row['case']}: {row['error']}")


def parse_size(text: str) -> tuple[int, int]:
    """'480x832' -> (480, 832), height first; '512' -> (512, 512)."""
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--size", type=parse_size, default=(64, 64), help="HEIGHTxWIDTH, or one number"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4], choices=sorted(STEP_LISTS))
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--text-device",
        default="auto",
        choices=["auto", "cpu"],
        help="where UMT5 runs (cpu: host memory; the load's weights_gib then leaves it out)",
    )
    parser.add_argument(
        "--cache-write",
        nargs="+",
        default=["clean"],
        choices=["clean", "last_step"],
        help="cache-write rules to measure (last_step rows: saturating only)",
    )
    parser.add_argument(
        "--mode",
        default="both",
        choices=["both", "saturating", "source"],
        help="saturating (a frame whenever the worker took the last), at --fps, or both",
    )
    parser.add_argument("--fps", type=float, default=24.0, help="the source rate of 'source'")
    parser.add_argument(
        "--frames", type=int, default=16, help="measured outputs per session (whole chunks)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the report, rewritten after every row (default: benchmarks/results/video-"
        "<preset>-<size>-<card>.json)",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=120.0,
        help="seconds a case may take before it fails",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; 1 when a case (or the load) failed."""
    report = asyncio.run(main(args))
    print_table(report.data)
    print(f"wrote {report.path}")
    return 1 if report.data["failed"] else 0


if __name__ == "__main__":
    sys.exit(run(parse()))
