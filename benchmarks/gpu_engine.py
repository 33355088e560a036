"""The diffusion engine on its real path: ms per frame by stage, fps, and sessions batched.

Everything runs the way ``livediff serve --pipeline diffusion`` runs it: an :class:`Engine`
whose worker thread owns the device and its own CUDA stream, loads the model, compiles every
batch bucket at load (``--compile``), warms up, batches the sessions' frames, and brings each
output back as a yuv420p video frame in one wait per batch. Only the weights differ: they are
random, built on the device from the published sd-turbo (UNet, CLIP text encoder) and TAESD
configs, which costs the same time as the real ones (see "Models without their weights" in
docs/diffusion.md, with the FLOPs a frame costs and the published speeds to compare with).

Measured, for eager and compiled engines (one load each: steps and session counts are params,
they pick a bucket and never recompile), one row per case:

- 1, 2 and 4 steps, one session: ms per frame (worker batch time), fps, and the stages inside
  the batch (upload + colour conversion, VAE encode, UNet, VAE decode) from CUDA events;
- 1, 2, 4 and 8 sessions at 1 step: aggregate fps and each session's fps;
- ``--in-flight 1 2``: the steps and sessions cases with one batch in flight, then two (the
  worker launches batch N+1 before it waits for N), side by side; every row says its
  ``"in_flight"``;
- diffusers' ``AutoPipelineForImage2Image`` on the same components, same size and steps;
- the cost of ControlNet per frame (``--controlnets``: none, canny, depth, canny+depth) at one
  step, with random ControlNets of the base UNet's size (``ControlNetModel.from_unet``) and a
  random Depth Anything V2 Small-sized depth model; compiled (``--compiled-controlnets``), each
  ControlNet and the UNet's residual variant are planned in the buckets as they are added;
- the frame graph (``--frame-graph off on``): each engine without it (every batch in stages:
  encode, UNet, decode, each session's step math between) and with it (a plain batch as one
  function; compiled, one CUDA graph per bucket; ``--frame-graph-steps`` are planned), rows
  marked ``"frame_graph"``, side by side;
- FP8 against bf16 (``--fp8``): each engine twice, its UNet in bfloat16 and in FP8
  (``unet_quantization fp8``), rows marked ``"unet"``, the layers converted under
  ``"fp8_layers"``, and under ``"fp8"`` the PSNR of the FP8 engine's output frames against the
  bf16 engine's on the same frames (one session, same seed and weights, one step, frame by frame).

A case that cannot finish fails alone, with its reason, and the run goes on: a session the
engine ended (the transform failed ``ERROR_LIMIT`` frames in a row, e.g. a missing package) or
no result within ``--row-timeout`` seconds. The JSON report (``--json``) is rewritten after every
row, so a run stopped from outside keeps every row it measured; the exit status is 1 when a case
failed.

    python benchmarks/gpu_engine.py --compile-backend eager        # CPU dry run: tiny, 64 px
    python benchmarks/gpu_engine.py --preset sd-turbo --size 512   # the GPU run (device/run.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
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
from livediff.engine.worker import batches_in_flight_for
from livediff.frames import Frame
from livediff.testing.ip_adapter import style_data_url, write_ip_adapter
from livediff.testing.models import build_components
from livediff.transforms.diffusion.bundle import ModelBundle
from livediff.transforms.diffusion.clock import StageClock
from livediff.transforms.diffusion.models import ModelChoice
from livediff.transforms.diffusion.transform import DiffusionTransform

RESULTS = Path(__file__).resolve().parent / "results"
#: t_index_list for 1, 2 and 4 steps (sd-turbo style: strength 0.5 and below)
STEP_INDICES = {1: [25], 2: [25, 37], 4: [25, 31, 37, 43]}


class RandomWeightsTransform(DiffusionTransform):
    """The diffusion transform on random weights of a published architecture, built on the
    device (no download: timing does not depend on the weights)."""

    preset = "tiny"

    @classmethod
    def check_available(cls, settings: Settings) -> None:
        return None  # nothing to download

    def load_bundle(self, choice: ModelChoice) -> ModelBundle:
        device = "cuda" if torch.cuda.is_available() and self.device.startswith("cuda") else "cpu"
        parts = build_components(self.preset, device=device)
        bundle = ModelBundle(
            unet=parts["unet"].to(self._dtype),
            vae=parts["taesd"].to(self._dtype),
            text_encoder=parts["text_encoder"].to(self._dtype),
            tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"],
        )
        if "text_encoder_2" in parts:  # the SDXL family
            bundle.text_encoder_2 = parts["text_encoder_2"].to(self._dtype)
            bundle.tokenizer_2 = parts["tokenizer_2"]
            bundle.zeros_for_empty_prompt = True
        return bundle


def camera(size: int, count: int = 4) -> list[av.VideoFrame]:
    """yuv420p frames like a decoder's (smooth gradients plus noise), distinct from each other."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    frames = []
    for _ in range(count):
        base = ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + rng.uniform(-40, 40, 3)
        noisy = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        frames.append(av.VideoFrame.from_ndarray(noisy, format="rgb24").reformat(format="yuv420p"))
    return frames


RANDOM_CONTROLNETS = ["random-canny", "random-depth"]


def control_params(setting: str) -> dict[str, Any]:
    """Params for a ControlNet setting: 'none', 'canny', 'depth' or 'canny+depth'."""
    kinds = [] if setting == "none" else setting.split("+")
    entries = [{"model_id": f"random-{kind}", "preprocessor": kind} for kind in kinds]
    return {"t_index_list": STEP_INDICES[1], "controlnets": entries}


def add_random_controlnets(engine: Engine) -> None:
    """Worker thread: random ControlNets of the base UNet's architecture, one per preprocessor
    (weights do not change the time; the zero convolutions are randomised all the same)."""
    from diffusers import ControlNetModel

    unet_batch = engine.transform.unet_batch  # type: ignore[attr-defined]
    for kind in ("canny", "depth"):
        controlnet = ControlNetModel.from_unet(unet_batch.bundle.uncompiled_unet)
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                torch.nn.init.normal_(parameter, std=0.02)
        controlnet.to(unet_batch.device, unet_batch.dtype).eval().requires_grad_(False)
        unet_batch.controlnets.add(f"random-{kind}", controlnet)


def write_depth_model(folder: Path, preset: str) -> str:
    """A random Depth Anything (V2 Small's shape for sd-turbo, a tiny one otherwise)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    small = preset in ("sd-turbo", "sdxl-turbo")
    backbone = Dinov2Config(
        hidden_size=384 if small else 32,
        num_hidden_layers=12 if small else 2,
        num_attention_heads=6 if small else 2,
        intermediate_size=1536 if small else 64,
        patch_size=14,
        image_size=518,
        out_features=["stage3", "stage6", "stage9", "stage12"] if small else ["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=384 if small else 32,
        neck_hidden_sizes=[48, 96, 192, 384] if small else [16, 32],
        reassemble_factors=[4, 2, 1, 0.5] if small else [4, 2],
        fusion_hidden_size=64 if small else 16,
        head_hidden_size=32 if small else 8,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    return str(folder)


#: Frames failed in a row after which the engine ends a measured session (and its case fails).
ERROR_LIMIT = 3
#: Frames whose outputs ``--fp8`` compares (bf16 against FP8).
COMPARED_FRAMES = 8


def engine_settings(
    args: argparse.Namespace, compiled: bool, unet: str | None = None, frame_graph: bool = True
) -> Settings:
    """The engine's settings; ``unet`` 'bf16' or 'fp8' under ``--fp8`` (both in bfloat16)."""
    return Settings(
        dtype="bfloat16" if unet else "auto",
        unet_quantization="fp8" if unet == "fp8" else "none",
        depth_model=args.depth_model,
        allow_models=[
            f"random:{args.preset}",
            f"random:{args.preset}-taesd",
            *RANDOM_CONTROLNETS,
            str(args.ip_adapter_folder),
        ],
        pipeline="diffusion",
        device=args.device,
        model=f"random:{args.preset}",
        vae=f"random:{args.preset}-taesd",
        width=args.size,
        height=args.size,
        max_sessions=max(args.sessions),
        max_batch=max(args.sessions),
        compile=compiled,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        compile_cache_dir=args.compile_cache_dir,
        batch_buckets=args.buckets,
        frame_graph=frame_graph,
        frame_graph_steps=args.frame_graph_steps,
        warmup_frames=8,
        transform_error_limit=ERROR_LIMIT,
    )


@dataclass(frozen=True)
class Case:
    """One row: its name, its sessions' params, how many sessions, what the row adds."""

    name: str
    params: dict[str, Any]
    sessions: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    #: The worker's ``batches_in_flight`` for the row (0: the setting's auto, 2 on CUDA).
    in_flight: int = 0


def at_each_in_flight(rows: list[Case], args: argparse.Namespace) -> list[Case]:
    """Each case at each ``--in-flight`` value in turn (one row each, side by side)."""
    return [replace(case, in_flight=n) for case in rows for n in args.in_flight]


def cases(args: argparse.Namespace, compiled: bool) -> list[Case]:
    """Steps (one session), ControlNets (--controlnets eager, --compiled-controlnets compiled:
    each planned in the buckets as it is added), then sessions."""
    steps = [Case(f"steps={n}", {"t_index_list": STEP_INDICES[n]}) for n in args.steps]
    controls = [
        Case(f"controlnets={setting}", control_params(setting), extra={"controlnets": setting})
        for setting in controlnet_settings(args, compiled)
    ]
    sessions = [
        Case(f"sessions={n}", {"t_index_list": STEP_INDICES[1]}, n) for n in args.sessions if n > 1
    ]
    styled = [] if compiled or not args.ip_adapter else [ip_adapter_case(args)]
    # what a ControlNet or an IP-Adapter costs is measured at the first --in-flight value only
    extras = [replace(case, in_flight=args.in_flight[0]) for case in controls + styled]
    return at_each_in_flight(steps, args) + extras + at_each_in_flight(sessions, args)


def controlnet_settings(args: argparse.Namespace, compiled: bool) -> list[str]:
    """The ControlNet settings measured on the compiled or the eager engine."""
    return list(args.compiled_controlnets if compiled else args.controlnets)


def ip_adapter_case(args: argparse.Namespace) -> Case:
    """One step with a random IP-Adapter and a style image (compare with steps=1: off)."""
    params = {
        "t_index_list": STEP_INDICES[1],
        "ip_adapter": {
            "enabled": True,
            "scale": 0.8,
            "ipadapter_model_path": str(args.ip_adapter_folder),
        },
        "ip_adapter_style_image_url": style_data_url(1),
    }
    return Case("ip_adapter=on", params, extra={"ip_adapter": True})


async def add_random_ip_adapter(engine: Engine, folder: Path) -> None:
    """A random IP-Adapter of the loaded UNet's family written to ``folder``, loaded into the
    transform's pool before any case asks for it (its first frames would run without it)."""

    def write() -> None:
        unet_batch = engine.transform.unet_batch  # type: ignore[attr-defined]
        write_ip_adapter(folder, unet_batch.bundle.uncompiled_unet, seed=1)

    def loaded() -> bool:
        pool = engine.transform.unet_batch.ip_adapters  # type: ignore[attr-defined]
        if (reason := pool.refusal(str(folder))) is not None:
            raise CaseFailedError(f"the random IP-Adapter was refused: {reason}")
        return pool.get(str(folder)) is not None

    await engine.on_worker(write)
    while not await engine.on_worker(loaded):
        await asyncio.sleep(0.05)


def set_stage_clock(engine: Engine, clock: StageClock | None) -> None:
    """Worker thread only: the clock the transform marks its stages on. The worker reads it in
    every batch, so setting it from the event loop would race with a batch in flight (a batch
    half on one clock); run through ``engine.on_worker`` it lands between batches."""
    engine.worker_side.worker_thread.assert_current()
    engine.transform.unet_batch.clock = clock  # type: ignore[attr-defined]


def set_batches_in_flight(engine: Engine, setting: int) -> int:
    """Worker thread only (a call, so none is in flight as it changes): the worker's batches
    in flight for ``setting`` (0: auto for its device); returns the number now in force."""
    engine.worker_side.worker_thread.assert_current()
    worker = engine.worker
    worker.batches_in_flight = batches_in_flight_for(setting, engine.transform.device)
    return worker.batches_in_flight


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
    opened.append(session)  # before any frame: the end is posted to this loop, so it comes later
    return session


def session_ended(session: Session) -> CaseFailedError:
    return CaseFailedError(f"session ended: {session.end_reason}")


async def run_session(
    session: Session, frames: list[av.VideoFrame], count: int
) -> list[tuple[float, float]]:
    """Keep the session's input slot full (a new frame whenever the worker took the last one,
    like a camera faster than the model) until ``count`` outputs came back; (received,
    finished) times of each. Raises :class:`CaseFailedError` when the session ends first."""
    slot = session.subscribe(asyncio.get_running_loop())
    if session.end_reason is not None:  # ended before this slot existed: nothing will close it
        session.unsubscribe(slot)
        raise session_ended(session)
    outputs: list[Frame] = []

    async def feed() -> None:
        index = 0
        while True:
            if not session.input.ready():
                session.submit(Frame(image=frames[index % len(frames)], pts=index))
                index += 1
            await asyncio.sleep(0.0005)

    feeder = asyncio.ensure_future(feed())
    try:
        while len(outputs) < count:
            outputs.append(await slot.get())
    except SlotClosedError:
        raise session_ended(session) from None
    finally:
        feeder.cancel()
        session.unsubscribe(slot)
    return [(out.times.received, out.times.finished) for out in outputs]


@dataclass
class Measured:
    """What one case's measured window gave: its length, each session's (received, finished)
    times, the stage clock's durations and the frames that failed."""

    elapsed: float
    runs: list[list[tuple[float, float]]]
    stages: dict[str, list[float]]
    failed_frames: int


async def measure(
    engine: Engine, case: Case, frames: list[av.VideoFrame], count: int
) -> dict[str, Any]:
    """``case.sessions`` sessions with ``case.params``, ``count`` frames each after a warm-up."""
    steps = len(case.params["t_index_list"])
    clock = StageClock(torch.device(engine.transform.device))
    in_flight = await engine.on_worker(lambda: set_batches_in_flight(engine, case.in_flight))
    opened: list[Session] = []
    try:
        for k in range(case.sessions):
            opened.append(await open_measured(engine, case.params, 1 + k))
        await all_or_first_failure([run_session(s, frames, steps + 2) for s in opened])
        await engine.on_worker(lambda: set_stage_clock(engine, clock))
        started = time.perf_counter()
        runs = await all_or_first_failure([run_session(s, frames, count) for s in opened])
        elapsed = time.perf_counter() - started
    finally:
        await engine.on_worker(lambda: set_stage_clock(engine, None))
        for session in opened:
            await engine.close_session(session.id, "measured")
    failed = sum(session.stats.errors for session in opened)
    row = summarise(case, count, Measured(elapsed, runs, clock.durations(), failed))
    return {**row, "in_flight": in_flight}


def summarise(case: Case, count: int, measured: Measured) -> dict[str, Any]:
    stages = {name: round(statistics.median(values), 3) for name, values in measured.stages.items()}
    latencies = [
        (finished - received) * 1000 for run in measured.runs for received, finished in run
    ]
    return {
        "case": case.name,
        "sessions": case.sessions,
        "steps": len(case.params["t_index_list"]),
        "fps_total": round(case.sessions * count / measured.elapsed, 2),
        "fps_per_session": round(count / measured.elapsed, 2),
        "ms_per_frame": round(measured.elapsed * 1000 / count, 3),
        "latency_ms_p50": round(statistics.median(latencies), 3),
        "failed_frames": measured.failed_frames,
        "stages_ms": stages,
        **case.extra,
    }


class Report:
    """The run's figures as one JSON document, written again after every row: a run stopped
    from outside (a step's timeout on the GPU machine) leaves every row it measured."""

    def __init__(self, path: Path, machine: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "machine": machine,
            "config": config,
            "livediff": [],
            "diffusers": [],
            "fp8": [],
            "failed": [],
        }
        self.save()

    def add(self, section: str, row: dict[str, Any]) -> None:
        """A measured row of ``section`` ('livediff' or 'diffusers')."""
        self.data[section].append(row)
        print(json.dumps({section: row}), flush=True)
        self.save()

    def fail(self, case: str, compiled: bool, reason: str) -> None:
        """A case that could not be measured, and why."""
        self.add("failed", {"case": case, "compiled": compiled, "error": reason})

    @property
    def failed(self) -> bool:
        return bool(self.data["failed"])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


async def measure_cases(
    engine: Engine,
    args: argparse.Namespace,
    compiled: bool,
    report: Report,
    unet: str | None = None,
) -> None:
    """Every case in turn; one that fails is reported with its reason and the next one runs."""
    frames = camera(args.size)
    label: dict[str, Any] = {"unet": unet} if unet else {}
    label["frame_graph"] = engine.settings.frame_graph
    for case in cases(args, compiled):
        try:
            row = await asyncio.wait_for(
                measure(engine, case, frames, args.frames), args.row_timeout
            )
        except TimeoutError:
            report.fail(case.name, compiled, f"no result within {args.row_timeout} s")
            continue
        except (CaseFailedError, EngineUnavailableError) as exc:
            report.fail(case.name, compiled, str(exc))
            continue
        report.add("livediff", {**row, "compiled": compiled, **label})


async def start_engine(
    args: argparse.Namespace,
    compiled: bool,
    report: Report,
    unet: str | None = None,
    frame_graph: bool = True,
) -> Engine | None:
    """A loaded (and, when ``compiled``, compiled) engine; None, reported, if it did not load."""
    RandomWeightsTransform.preset = args.preset
    settings = engine_settings(args, compiled, unet, frame_graph)
    engine = Engine(settings, RandomWeightsTransform(settings))
    loading = time.perf_counter()
    try:
        await engine.start()
    except Exception as exc:
        report.fail("load", compiled, repr(exc))
        await engine.stop()
        return None
    load_s = round(time.perf_counter() - loading, 1)
    kind = ("compiled" if compiled else "eager") + (f"-{unet}" if unet else "")
    kind += "" if frame_graph else "-staged"
    report.data.setdefault("load_s", {})[kind] = load_s
    if unet == "fp8":
        layers = engine.transform.unet_batch.bundle.fp8  # type: ignore[attr-defined]
        report.data["fp8_layers"] = asdict(layers)
    print(json.dumps({"load_s": load_s, "compiled": compiled}), flush=True)
    return engine


async def engine_runs(
    args: argparse.Namespace,
    compiled: bool,
    report: Report,
    unet: str | None = None,
    frame_graph: bool = True,
) -> np.ndarray | None:
    """One engine's rows (and diffusers' beside the eager one with the frame graph); under
    ``--fp8``, the output frames :func:`fp8_runs` compares (None without ``--fp8`` or when it
    failed)."""
    engine = await start_engine(args, compiled, report, unet, frame_graph)
    if engine is None:
        return None
    try:
        if controlnet_settings(args, compiled):  # compiled: planned in the buckets as added
            await engine.on_worker(lambda: add_random_controlnets(engine))
        if not compiled and args.ip_adapter:
            await add_random_ip_adapter(engine, args.ip_adapter_folder)
        await measure_cases(engine, args, compiled, report, unet)
        if not compiled and frame_graph and not args.no_diffusers:
            await asyncio.to_thread(diffusers_runs, engine, args, report)
        return await compared_outputs(engine, args, compiled, report) if unet else None
    finally:
        await engine.stop()


async def fp8_runs(args: argparse.Namespace, compiled: bool, report: Report) -> None:
    """The bf16 engine, then the FP8 one, and the PSNR of FP8's output frames against bf16's."""
    reference = await engine_runs(args, compiled, report, "bf16")
    outputs = await engine_runs(args, compiled, report, "fp8")
    if reference is None or outputs is None:
        report.fail("fp8-psnr", compiled, "an engine gave no output frames to compare")
        return
    error = (outputs.astype(np.float64) - reference) ** 2
    row = {
        "compiled": compiled,
        "frames": len(outputs),
        "psnr_db": round(float(10 * np.log10(255.0**2 / max(float(error.mean()), 1e-12))), 2),
        "max_abs_diff": int(np.sqrt(error).max()),
    }
    report.add("fp8", row)


async def compared_outputs(
    engine: Engine, args: argparse.Namespace, compiled: bool, report: Report
) -> np.ndarray | None:
    """One session's RGB output frames for :func:`camera`'s frames (one step, seed 1), one
    frame in and its output out at a time, so both engines see the same frames; None, with
    the reason reported, when they did not all come back."""
    session = await open_measured(engine, {"t_index_list": STEP_INDICES[1]}, 1)
    slot = session.subscribe(asyncio.get_running_loop())
    images = []
    try:
        for index, frame in enumerate(camera(args.size, COMPARED_FRAMES)):
            session.submit(Frame(image=frame, pts=index))
            output = await asyncio.wait_for(slot.get(), args.row_timeout)
            assert isinstance(output.image, av.VideoFrame)  # the VideoFrames adapter's
            images.append(output.image.to_ndarray(format="rgb24"))
    except (TimeoutError, SlotClosedError) as exc:
        report.fail("fp8-outputs", compiled, f"{type(exc).__name__}: {session.end_reason}")
        return None
    finally:
        session.unsubscribe(slot)
        await engine.close_session(session.id, "compared")
    return np.stack(images)


def diffusers_runs(engine: Engine, args: argparse.Namespace, report: Report) -> None:
    """diffusers' img2img on the eager engine's components (worker idle), batch 1; a failure
    (diffusers' own code) is reported as the row's and ends the comparison."""
    # imported here: diffusers' pipelines take a second or two to import, which every run
    # with --no-diffusers would pay for nothing
    from livediff.testing.reference import diffusers_img2img, diffusers_sdxl_img2img

    bundle = engine.transform.unet_batch.bundle  # type: ignore[attr-defined]
    device = torch.device(engine.transform.device)
    try:
        pipe = diffusers_sdxl_img2img(bundle) if bundle.sdxl else diffusers_img2img(bundle)
        dtype = next(bundle.unet.parameters()).dtype
        image = torch.rand((1, 3, args.size, args.size), device=device, dtype=dtype)
        for steps in args.steps:
            report.add("diffusers", diffusers_row(pipe, image, steps, args.frames))
    except Exception as exc:
        report.fail("diffusers", False, repr(exc))


def diffusers_row(pipe: Any, image: torch.Tensor, steps: int, frames: int) -> dict[str, Any]:
    for _ in range(3):
        diffusers_frame(pipe, image, steps)
    count = max(5, frames // 4)
    started = time.perf_counter()
    for _ in range(count):
        diffusers_frame(pipe, image, steps)
    elapsed = time.perf_counter() - started
    row = {"steps": steps, "fps": count / elapsed, "ms_per_frame": elapsed * 1000 / count}
    return {key: round(value, 3) for key, value in row.items()}


def diffusers_frame(pipe: Any, image: torch.Tensor, steps: int) -> None:
    """One img2img frame, brought back to the host as uint8 (as a video frame would be)."""
    out = pipe(
        prompt="a watercolour painting",
        image=image,
        num_inference_steps=2 * steps,
        strength=0.5,
        guidance_scale=0.0,
        output_type="pt",
    ).images
    (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


STAGES = ("upload", "encode", "controlnet", "unet", "decode", "frame")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}")
    header = (
        f"{'engine':<15} {'steps':>5} {'sessions':>8} {'ms/frame':>9} {'fps':>8} {'fps/sess':>9}"
    )
    print(f"{header}  stages ms ({', '.join(STAGES)})")
    for row in report["livediff"]:
        stages = ", ".join(f"{row['stages_ms'].get(stage, 0):.2f}" for stage in STAGES)
        kind = "compiled" if row["compiled"] else "eager"
        if "controlnets" in row:
            kind = f"cn:{row['controlnets']}"
        if "unet" in row:
            kind = f"{kind}/{row['unet']}"
        kind = f"{kind} in{row['in_flight']}"  # batches in flight
        if not row.get("frame_graph", True):
            kind = f"{kind} st"  # staged: the frame graph off
        print(
            f"{kind:<15} {row['steps']:>5} {row['sessions']:>8} {row['ms_per_frame']:>9.2f}"
            f" {row['fps_total']:>8.1f} {row['fps_per_session']:>9.1f}  {stages}"
        )
    for row in report["diffusers"]:
        timing = f"{row['ms_per_frame']:>9.2f} {row['fps']:>8.1f}"
        print(f"{'diffusers':<15} {row['steps']:>5} {1:>8} {timing}")
    for row in report["fp8"]:
        kind = "compiled" if row["compiled"] else "eager"
        print(
            f"fp8 against bf16, {kind}: PSNR {row['psnr_db']:.2f} dB over {row['frames']} frames"
            f" (largest difference {row['max_abs_diff']} of 255)"
        )
    for row in report["failed"]:
        kind = "compiled" if row["compiled"] else "eager"
        print(f"FAILED {kind} {row['case']}: {row['error']}")


def default_json(args: argparse.Namespace, machine: dict[str, Any]) -> Path:
    """benchmarks/results/gpu_engine-<preset>-<size>-<card or cpu>[-eager|-compiled].json"""
    label = machine.get("gpu", "cpu").lower().replace(" ", "-")
    kinds = {"off": "eager", "on": "compiled"}
    suffix = f"-{kinds[args.compile[0]]}" if len(set(args.compile)) == 1 else ""
    return RESULTS / f"gpu_engine-{args.preset}-{args.size}-{label}{suffix}.json"


async def main(args: argparse.Namespace) -> Report:
    machine = machine_info(args.device)
    report = Report(args.json or default_json(args, machine), machine, vars(args))
    for compiled in args.compile:
        if args.fp8:
            await fp8_runs(args, compiled == "on", report)
            continue
        for frame_graph in args.frame_graph:
            await engine_runs(args, compiled == "on", report, frame_graph=frame_graph == "on")
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="tiny", choices=["tiny", "sd-turbo", "tiny-sdxl", "sdxl-turbo"]
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-cache-dir", default=None)
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--frames", type=int, default=40, help="measured frames per session")
    parser.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=[0],
        choices=[0, 1, 2],
        help="the worker's batches in flight each steps and sessions case is measured at, side"
        " by side (1 2: one row each); 0 = auto (2 on CUDA, 1 on the CPU)",
    )
    parser.add_argument(
        "--frame-graph",
        nargs="+",
        default=["on"],
        choices=["off", "on"],
        help="engines with the frame graph off (every batch in stages) and/or on, side by side",
    )
    parser.add_argument(
        "--frame-graph-steps",
        type=int,
        nargs="+",
        default=[1],
        choices=[1, 2, 3, 4],
        help="step counts whose frame graphs a compiled engine plans at load (others: staged)",
    )
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="each engine twice, its UNet in bfloat16 and in FP8 (unet_quantization fp8), and"
        " the PSNR of FP8's output frames against bf16's",
    )
    parser.add_argument(
        "--ip-adapter",
        action="store_true",
        help="also measure 1 step with a random IP-Adapter and a style image (eager; SD 1.5 and"
        " SDXL widths only: h94 has no adapter for sd-turbo's)",
    )
    parser.add_argument(
        "--controlnets",
        nargs="*",
        default=["none", "canny", "depth", "canny+depth"],
        choices=["none", "canny", "depth", "canny+depth"],
        help="ControlNet settings measured at 1 step on the eager engine (none to skip all)",
    )
    parser.add_argument(
        "--compiled-controlnets",
        nargs="*",
        default=[],
        choices=["none", "canny", "depth", "canny+depth"],
        help="ControlNet settings measured at 1 step on the compiled engine (default none:"
        " each ControlNet and the UNet's residual variant compile per bucket as it is added)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="the report, rewritten after every row (default: benchmarks/results/gpu_engine-"
        "<preset>-<size>-<card>[-eager|-compiled].json)",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=120.0,
        help="seconds a case may take (warm-up included) before it fails",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; 1 when a case failed."""
    scratch = Path(tempfile.mkdtemp(prefix="livediff-bench-"))
    args.depth_model = write_depth_model(scratch / "depth", args.preset)
    args.ip_adapter_folder = scratch / "ip-adapter"
    report = asyncio.run(main(args))
    print_table(report.data)
    print(f"wrote {report.path}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run(parse()))
