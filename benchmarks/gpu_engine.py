"""The diffusion engine on its real path: ms per frame by stage, fps, and sessions batched.

Everything runs the way ``livediff serve --pipeline diffusion`` runs it: an :class:`Engine`
whose worker thread owns the device and its own CUDA stream, loads the model, compiles every
batch bucket at load (``--compile``), warms up, batches the sessions' frames, and brings each
output back as a yuv420p video frame in one wait per batch. Only the weights differ: they are
random, built on the device from the published sd-turbo (UNet, CLIP text encoder) and TAESD
configs, which costs the same time as the real ones (see "Models without their weights" in
docs/diffusion.md, with the FLOPs a frame costs and the published speeds to compare with).

Measured, for eager and compiled engines (one load each: steps and session counts are params,
they pick a bucket and never recompile):

- 1, 2 and 4 steps, one session: ms per frame (worker batch time), fps, and the stages inside
  the batch (upload + colour conversion, VAE encode, UNet, VAE decode) from CUDA events;
- 1, 2, 4 and 8 sessions at 1 step: aggregate fps and each session's fps;
- diffusers' ``AutoPipelineForImage2Image`` on the same components, same size and steps;
- the cost of ControlNet per frame (``--controlnets``: none, canny, depth, canny+depth) at one
  step, with random ControlNets of the base UNet's size (``ControlNetModel.from_unet``) and a
  random Depth Anything V2 Small-sized depth model.

    python benchmarks/gpu_engine.py --compile-backend eager        # CPU dry run: tiny, 64 px
    python benchmarks/gpu_engine.py --preset sd-turbo --size 512   # the GPU run (device/run.sh)

It prints a table and writes ``benchmarks/results/gpu_engine-<device>.json`` (and a copy to
``$OUT`` when set, as on the lent GPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from livediff.config import Settings
from livediff.engine import Engine, Session
from livediff.frames import Frame, Image
from livediff.pixels import to_video_frame
from livediff.testing.models import build_components
from livediff.testing.reference import diffusers_img2img
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
        return ModelBundle(
            unet=parts["unet"].to(self._dtype),
            vae=parts["taesd"].to(self._dtype),
            text_encoder=parts["text_encoder"].to(self._dtype),
            tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"],
        )


class VideoFrames:
    """The WebRTC face's output adapter, without aiortc: outputs come back as video frames."""

    wants_video_frames = True

    def __call__(self, image: Image) -> av.VideoFrame:
        return to_video_frame(image)


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
        controlnet = ControlNetModel.from_unet(unet_batch.bundle.unet)
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                torch.nn.init.normal_(parameter, std=0.02)
        controlnet.to(unet_batch.device, unet_batch.dtype).eval().requires_grad_(False)
        unet_batch.controlnets.add(f"random-{kind}", controlnet)


def write_depth_model(folder: Path, preset: str) -> str:
    """A random Depth Anything (V2 Small's shape for sd-turbo, a tiny one otherwise)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    small = preset == "sd-turbo"
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


def engine_settings(args: argparse.Namespace, compiled: bool) -> Settings:
    return Settings(
        depth_model=args.depth_model,
        allow_models=[f"random:{args.preset}", f"random:{args.preset}-taesd", *RANDOM_CONTROLNETS],
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
        warmup_frames=8,
    )


async def run_session(
    session: Session, frames: list[av.VideoFrame], count: int
) -> list[tuple[float, float]]:
    """Keep the session's input slot full (a new frame whenever the worker took the last one,
    like a camera faster than the model) until ``count`` outputs came back; (received,
    finished) times of each."""
    slot = session.subscribe(asyncio.get_running_loop())
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
    finally:
        feeder.cancel()
        session.unsubscribe(slot)
    return [(out.times.received, out.times.finished) for out in outputs]


async def measure(
    engine: Engine, params: dict[str, Any], sessions: int, frames: list[av.VideoFrame], count: int
) -> dict[str, Any]:
    """``sessions`` sessions with ``params``, ``count`` frames each after a warm-up."""
    opened = [
        await engine.open_session(
            engine.validate({**params, "seed": 1 + k}), adapt_output=VideoFrames()
        )
        for k in range(sessions)
    ]
    steps = len(params["t_index_list"])
    try:
        await asyncio.gather(*(run_session(s, frames, steps + 2) for s in opened))
        clock = StageClock(torch.device(engine.transform.device))
        engine.transform.unet_batch.clock = clock  # type: ignore[attr-defined]
        started = time.perf_counter()
        runs = await asyncio.gather(*(run_session(s, frames, count) for s in opened))
        elapsed = time.perf_counter() - started
        engine.transform.unet_batch.clock = None  # type: ignore[attr-defined]
    finally:
        for session in opened:
            await engine.close_session(session.id, "measured")
    stages = {
        name: round(statistics.median(values), 3) for name, values in clock.durations().items()
    }
    latencies = [(finished - received) * 1000 for run in runs for received, finished in run]
    return {
        "sessions": sessions,
        "steps": steps,
        "fps_total": round(sessions * count / elapsed, 2),
        "fps_per_session": round(count / elapsed, 2),
        "ms_per_frame": round(elapsed * 1000 / count, 3),
        "latency_ms_p50": round(statistics.median(latencies), 3),
        "stages_ms": stages,
    }


async def engine_runs(
    args: argparse.Namespace, compiled: bool
) -> tuple[list[dict[str, Any]], Engine]:
    RandomWeightsTransform.preset = args.preset
    settings = engine_settings(args, compiled)
    engine = Engine(settings, RandomWeightsTransform(settings))
    loading = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - loading
    if not compiled and args.controlnets:
        await engine.on_worker(lambda: add_random_controlnets(engine))
    frames = camera(args.size)
    results = []
    for steps in args.steps:
        row = await measure(engine, {"t_index_list": STEP_INDICES[steps]}, 1, frames, args.frames)
        results.append({**row, "compiled": compiled, "load_s": round(load_s, 1)})
        print(json.dumps(results[-1]), flush=True)
    for setting in args.controlnets if not compiled else []:
        row = await measure(engine, control_params(setting), 1, frames, args.frames)
        results.append({**row, "compiled": compiled, "controlnets": setting})
        print(json.dumps(results[-1]), flush=True)
    for sessions in args.sessions:
        if sessions == 1:
            continue
        row = await measure(
            engine, {"t_index_list": STEP_INDICES[1]}, sessions, frames, args.frames
        )
        results.append({**row, "compiled": compiled, "load_s": round(load_s, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results, engine


def diffusers_runs(engine: Engine, args: argparse.Namespace) -> list[dict[str, Any]]:
    """diffusers' img2img on the eager engine's components (worker idle), batch 1."""
    bundle = engine.transform.unet_batch.bundle  # type: ignore[attr-defined]
    device = torch.device(engine.transform.device)
    pipe = diffusers_img2img(bundle)
    dtype = next(bundle.unet.parameters()).dtype
    image = torch.rand((1, 3, args.size, args.size), device=device, dtype=dtype)
    rows = []
    for steps in args.steps:
        for _ in range(3):
            diffusers_frame(pipe, image, steps)
        count = max(5, args.frames // 4)
        started = time.perf_counter()
        for _ in range(count):
            diffusers_frame(pipe, image, steps)
        elapsed = time.perf_counter() - started
        row = {"steps": steps, "fps": count / elapsed, "ms_per_frame": elapsed * 1000 / count}
        rows.append({key: round(value, 3) for key, value in row.items()})
        print(json.dumps({"diffusers": rows[-1]}), flush=True)
    return rows


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


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


STAGES = ("upload", "encode", "controlnet", "unet", "decode")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['machine']}")
    header = (
        f"{'engine':<9} {'steps':>5} {'sessions':>8} {'ms/frame':>9} {'fps':>8} {'fps/sess':>9}"
    )
    print(f"{header}  stages ms ({', '.join(STAGES)})")
    for row in report["livediff"]:
        stages = ", ".join(f"{row['stages_ms'].get(stage, 0):.2f}" for stage in STAGES)
        kind = "compiled" if row["compiled"] else "eager"
        if "controlnets" in row:
            kind = f"cn:{row['controlnets']}"
        print(
            f"{kind:<15} {row['steps']:>5} {row['sessions']:>8} {row['ms_per_frame']:>9.2f}"
            f" {row['fps_total']:>8.1f} {row['fps_per_session']:>9.1f}  {stages}"
        )
    for row in report["diffusers"]:
        timing = f"{row['ms_per_frame']:>9.2f} {row['fps']:>8.1f}"
        print(f"{'diffusers':<15} {row['steps']:>5} {1:>8} {timing}")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine_info(args.device),
        "config": vars(args),
        "livediff": [],
        "diffusers": [],
    }
    for compiled in args.compile:
        rows, engine = await engine_runs(args, compiled == "on")
        report["livediff"].extend(rows)
        if compiled == "off" and not args.no_diffusers:
            report["diffusers"] = await asyncio.to_thread(diffusers_runs, engine, args)
        await engine.stop()
    return report


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd-turbo"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-cache-dir", default=None)
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument(
        "--controlnets",
        nargs="*",
        default=["none", "canny", "depth", "canny+depth"],
        choices=["none", "canny", "depth", "canny+depth"],
        help="ControlNet settings measured at 1 step on the eager engine (none to skip all)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    scratch = Path(tempfile.mkdtemp(prefix="livediff-bench-"))
    arguments.depth_model = write_depth_model(scratch / "depth", arguments.preset)
    result = asyncio.run(main(arguments))
    print_table(result)
    label = result["machine"].get("gpu", "cpu").lower().replace(" ", "-")
    name = f"gpu_engine-{arguments.preset}-{arguments.size}-{label}.json"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
