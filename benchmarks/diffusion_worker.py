"""Diffusion worker throughput: livediff's stream engine against diffusers' img2img pipeline.

Both run in this process, on the same components (UNet, Tiny AutoEncoder, CLIP text encoder,
scheduler), at the same resolution, number of denoising steps and batch (sessions), fed the
same yuv420p frames a WebRTC decoder hands over, with the result brought back to the host as
a video frame. The headline is the ratio of frames per second.

- livediff: one ``UNetBatch.process`` call per batch, B sessions with their own prompt and
  noise; N steps run as a stream batch (N UNet rows per session, one UNet call); per-stage
  times (upload + colour conversion, VAE encode, UNet, VAE decode, download) from CUDA events
  on the GPU, the clock on the CPU.
- diffusers: ``AutoPipelineForImage2Image`` with ``num_inference_steps = 2 N, strength = 0.5``
  (N UNet calls of batch B), no CFG (sd-turbo), output as a tensor brought to the host.

Models are random-weight builds of the published configs (``--preset sd-turbo``: the real
sd-turbo UNet + TAESD + CLIP architecture, so the speed is the real one) or the tiny test
preset; ``--model``/``--vae`` take real weights instead where they are on disk.

Like every benchmark here it prints a table and writes ``benchmarks/results/<name>.json``
(machine, config, results) and ``<name>.png`` (fps of both sides, livediff's stages per batch),
the name made of the preset, the size and the device.

    python benchmarks/diffusion_worker.py                        # CPU, tiny, ~1 minute
    livediff bench worker                                        # the same, from a checkout
    python benchmarks/diffusion_worker.py --preset sd-turbo --size 512 --steps 1 2 4 \
        --batch 1 4 --compile off on --frames 100                # the GPU run (docs/diffusion.md)
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import diffusers
import numpy as np
import torch
from common import Column, Table, load_json, machine, pyplot, save_json, save_plot

from livediff.frames import Frame
from livediff.pixels import to_video_frame
from livediff.testing.models import build_components, parameter_count
from livediff.testing.reference import diffusers_img2img
from livediff.transforms.base import Job
from livediff.transforms.diffusion.bundle import (
    ModelBundle,
    compile_modules,
    load_bundle,
    prepare,
    uses_cuda_graphs,
)
from livediff.transforms.diffusion.models import ModelChoice, locate
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import resolve_device, resolve_dtype
from livediff.transforms.diffusion.unet_batch import UNetBatch

STAGES = ("upload", "encode", "unet", "decode", "download")
NEGATIVE_PROMPT = "blurry, low quality"


@dataclass(frozen=True)
class Case:
    """One configuration measured on both sides."""

    steps: int
    batch: int
    cfg: str

    def guidance(self, args: argparse.Namespace) -> float:
        return 1.0 if self.cfg == "none" else float(args.guidance)


class StageClock:
    """Times named stages: CUDA events on the GPU (read after the run), the clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._events: list[tuple[str, Any, Any]] = []

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.cuda:
                started = time.perf_counter()
                result = function(*args, **kwargs)
                self.seconds[name].append(time.perf_counter() - started)
                return result
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = function(*args, **kwargs)
            end.record()
            self._events.append((name, start, end))
            return result

        return timed

    def per_iteration_ms(self, iterations: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.seconds[name].append(start.elapsed_time(end) / 1000)
            self._events.clear()
        return {name: round(sum(self.seconds[name]) * 1000 / iterations, 3) for name in STAGES}

    def reset(self) -> None:
        self.seconds.clear()
        self._events.clear()


def camera_frames(size: tuple[int, int], count: int = 4) -> list[av.VideoFrame]:
    """Distinct yuv420p frames, as a WebRTC decoder delivers them (``count`` 1: a still camera)."""
    width, height = size
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(count):
        tint = rng.uniform(0.3, 1.0, 3)
        base = np.stack([cols / width, rows / height, (cols + rows) / (width + height)], -1)
        rgb = np.clip(base * tint * 255 + rng.normal(0, 12, (height, width, 3)), 0, 255)
        frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
        frames.append(frame.reformat(format="yuv420p"))
    return frames


def t_index_list(steps: int) -> list[int]:
    if steps == 1:
        return [25]
    return [round(15 + i * 30 / (steps - 1)) for i in range(steps)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- livediff ---------------------------------------------------------------------------------
def run_livediff(engine: Any, args: argparse.Namespace, case: Case) -> dict[str, Any]:
    size = (args.width, args.height)
    frames = camera_frames(size, 1 if args.still else 4)
    sessions = []
    for number in range(case.batch):
        params = DiffusionParams.model_validate(
            {
                "width": size[0],
                "height": size[1],
                "prompt": f"a watercolour painting, variation {number}",
                "negative_prompt": NEGATIVE_PROMPT,
                "seed": number,
                "t_index_list": t_index_list(case.steps),
                "cfg_type": case.cfg,
                "guidance_scale": case.guidance(args),
                "similarity_threshold": args.similarity,
            }
        )
        sessions.append((params, engine.open_session()))
    clock = StageClock(engine.device)
    original = (engine.upload, engine.encode, engine.unet, engine.decode)
    engine.upload = clock.wrap("upload", engine.upload)  # type: ignore[method-assign]
    engine.encode = clock.wrap("encode", engine.encode)  # type: ignore[method-assign]
    engine.unet = clock.wrap("unet", engine.unet)  # type: ignore[method-assign]
    engine.decode = clock.wrap("decode", engine.decode)  # type: ignore[method-assign]
    download = clock.wrap("download", to_video_frame)

    skipped = 0  # frames the similarity filter skipped (the engine marks their jobs)

    def one_batch(iteration: int) -> None:
        nonlocal skipped
        jobs = [
            Job(str(k), Frame(frames[(iteration + k) % len(frames)], pts=iteration), p, s)
            for k, (p, s) in enumerate(sessions)
        ]
        for image in engine.process(jobs):
            if image is not None:
                download(image)
        skipped += sum(bool(getattr(job, "skipped", False)) for job in jobs)

    try:
        started = time.perf_counter()
        for iteration in range(args.warmup + case.steps):  # compile/autotune + fill the batch
            one_batch(iteration)
        synchronize(engine.device)
        warmup_s = time.perf_counter() - started
        clock.reset()
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        started = time.perf_counter()
        for iteration in range(args.frames):
            one_batch(iteration)
        synchronize(engine.device)
        elapsed = time.perf_counter() - started
    finally:
        engine.upload, engine.encode, engine.unet, engine.decode = original  # type: ignore[method-assign]
        for _, state in sessions:
            state.release()
    return {
        "fps": round(args.frames * case.batch / elapsed, 2),
        "ms_per_batch": round(elapsed * 1000 / args.frames, 3),
        "stages_ms_per_batch": clock.per_iteration_ms(args.frames),
        "warmup_s": round(warmup_s, 2),
        "skipped_frames": skipped,
        **peak_memory(engine.device),
    }


# -- diffusers ----------------------------------------------------------------------------------
def run_diffusers(
    pipe: Any, device: torch.device, dtype: torch.dtype, args: argparse.Namespace, case: Case
) -> dict[str, Any]:
    """diffusers' img2img; any guidance is its standard CFG (a negative row per image)."""
    frames = camera_frames((args.width, args.height), 1 if args.still else 4)
    batch = case.batch
    prompts = [f"a watercolour painting, variation {number}" for number in range(batch)]
    generator = torch.Generator(device).manual_seed(0)

    def one_batch(iteration: int) -> None:
        chosen = [frames[(iteration + k) % len(frames)] for k in range(batch)]
        rgb = [frame.to_ndarray(format="rgb24") for frame in chosen]
        image = torch.from_numpy(np.stack(rgb)).to(device).permute(0, 3, 1, 2).to(dtype) / 255
        out = pipe(
            prompt=prompts,
            negative_prompt=[NEGATIVE_PROMPT] * batch if case.cfg != "none" else None,
            image=image,
            num_inference_steps=2 * case.steps,
            strength=0.5,
            guidance_scale=case.guidance(args) if case.cfg != "none" else 0.0,
            generator=generator,
            output_type="pt",
        ).images
        (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    iterations = max(3, args.frames // args.baseline_divisor)
    for iteration in range(args.warmup):
        one_batch(iteration)
    synchronize(device)
    started = time.perf_counter()
    for iteration in range(iterations):
        one_batch(iteration)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {
        "fps": round(iterations * batch / elapsed, 2),
        "ms_per_batch": round(elapsed * 1000 / iterations, 3),
        "iterations": iterations,
    }


# -- setup and report ---------------------------------------------------------------------------
def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def build_bundle(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    if args.model:
        choice = ModelChoice(args.model, args.vae or "madebyollin/taesd")
        bundle = load_bundle(locate(choice), choice, dtype)
        return prepare(bundle, device, dtype, channels_last=args.channels_last)
    parts = build_components(args.preset, device=str(device))
    vae = parts["vae"] if args.vae == "full" else parts["taesd"]
    bundle = ModelBundle(
        parts["unet"], vae, parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    )
    return prepare(bundle, device, dtype, channels_last=args.channels_last)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure(engine: Any, pipe: Any, args: argparse.Namespace, case: Case) -> dict[str, Any]:
    """``--repeats`` alternating runs of both sides; the best run of each is reported (on a
    shared machine the fastest run is the one least disturbed by others)."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        ours.append(run_livediff(engine, args, case))
        if pipe is not None:
            theirs.append(run_diffusers(pipe, engine.device, engine.dtype, args, case))
    run: dict[str, Any] = {"steps": case.steps, "batch": case.batch, "cfg": case.cfg}
    run["livediff"] = best_run(ours)
    if theirs:
        run["diffusers"] = best_run(theirs)
        run["speedup"] = round(run["livediff"]["fps"] / run["diffusers"]["fps"], 2)
    return run


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(runs, key=lambda run: float(run["fps"]))
    return {**best, "fps_all_repeats": [run["fps"] for run in runs]}


def cases(args: argparse.Namespace) -> list[Case]:
    return [
        Case(steps, batch, cfg) for steps in args.steps for batch in args.batch for cfg in args.cfg
    ]


def run_all(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the setup both sides ran with, one result per case)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    bundle = build_bundle(args, device, dtype)
    pipe = diffusers_img2img(bundle) if args.baseline else None
    runs: list[dict[str, Any]] = []
    for compiled in args.compile:
        if compiled == "on":
            compile_modules(bundle, args.compile_mode)
        engine = UNetBatch(
            bundle,
            device,
            dtype,
            cuda_graphs=compiled == "on" and uses_cuda_graphs(device, args.compile_mode),
            channels_last=args.channels_last,
        )
        baseline = pipe if compiled == "off" else None
        for case in cases(args):
            run = measure(engine, baseline, args, case)
            run["compile"] = compiled
            print(TABLE.row(table_row(run)), flush=True)
            runs.append(run)
    config = {
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": args.model or f"random-weight {args.preset} (published config)",
        "vae": args.vae or ("TAESD" if not args.model else "madebyollin/taesd"),
        "unet_parameters_m": round(parameter_count(bundle.unet) / 1e6, 1),
        "width": args.width,
        "height": args.height,
        "dtype": str(dtype).removeprefix("torch."),
        "compile_mode": args.compile_mode if "on" in args.compile else None,
        "frames": args.frames,
        "repeats": args.repeats,
        "channels_last": args.channels_last,
        "guidance_scale": args.guidance if args.cfg != ["none"] else None,
        "similarity_threshold": args.similarity,
        "still_camera": args.still,
    }
    return config, runs


TABLE = Table(
    [
        Column("steps", "steps", "d"),
        Column("batch", "batch", "d"),
        Column("cfg", "cfg"),
        Column("compile", "compile"),
        Column("livediff fps", "livediff_fps", ".2f"),
        Column("diffusers fps", "diffusers_fps", ".2f"),
        Column("speedup", "speedup", ".2f"),
        Column("ms/batch", "ms_per_batch", ".2f"),
        *(Column(f"{stage} ms", stage, ".2f") for stage in STAGES),
    ]
)


def table_row(run: dict[str, Any]) -> dict[str, Any]:
    ours = run["livediff"]
    return {
        **run,
        "livediff_fps": ours["fps"],
        "diffusers_fps": run.get("diffusers", {}).get("fps", "-"),
        "speedup": run.get("speedup", "-"),
        "ms_per_batch": ours["ms_per_batch"],
        **ours["stages_ms_per_batch"],
    }


def case_label(run: dict[str, Any]) -> str:
    label = f"{run['steps']} step{'s' if run['steps'] > 1 else ''}\nbatch {run['batch']}"
    if run["cfg"] != "none":
        label += f"\ncfg {run['cfg']}"
    return label + ("\ncompiled" if run["compile"] == "on" else "")


def plot(
    runs: list[dict[str, Any]], config: dict[str, Any], info: dict[str, Any], name: str
) -> None:
    plt = pyplot()
    figure, (rates, stages) = plt.subplots(1, 2, figsize=(12, 4.4))
    xs = range(len(runs))
    ours = [run["livediff"]["fps"] for run in runs]
    theirs = [run.get("diffusers", {}).get("fps", 0.0) for run in runs]
    rates.bar([x - 0.2 for x in xs], ours, 0.4, color="tab:blue", label="livediff stream engine")
    rates.bar([x + 0.2 for x in xs], theirs, 0.4, color="tab:orange", label="diffusers img2img")
    for x, run in zip(xs, runs, strict=True):
        top = max(run["livediff"]["fps"], run.get("diffusers", {}).get("fps", 0.0))
        if "speedup" in run:
            rates.text(x, top * 1.02, f"x{run['speedup']:.2f}", ha="center", fontsize=7)
    rates.set_ylim(top=max(ours + theirs) * 1.25)
    rates.set_ylabel("frames per second (all sessions)")
    rates.set_title("Throughput, same components, same run")
    rates.legend(loc="upper left", fontsize=7)
    colours = ("#a0cbe8", "#f28e2b", "#59a14f", "#e15759", "#b07aa1")
    bottom = [0.0] * len(runs)
    for stage, colour in zip(STAGES, colours, strict=True):
        heights = [run["livediff"]["stages_ms_per_batch"][stage] for run in runs]
        stages.bar(xs, heights, 0.6, bottom=bottom, color=colour, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    stages.set_ylabel("ms per batch (livediff)")
    stages.set_title("livediff: where a batch's time goes")
    stages.legend(loc="upper left", fontsize=7, ncols=len(STAGES))
    stages.set_ylim(top=max(bottom) * 1.2)
    for axes in (rates, stages):
        axes.set_xticks(list(xs), [case_label(run) for run in runs], fontsize=7)
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle(
        f"Diffusion worker: {config['model']}, {config['width']}x{config['height']},"
        f" {config['dtype']}, {config['device']}",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    save_plot(figure, name, info)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd-turbo"])
    parser.add_argument("--model", help="real weights: hub id or folder (instead of --preset)")
    parser.add_argument("--vae", help="'full' for the model's VAE; default TAESD")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"]
    )
    parser.add_argument("--size", type=int, help="width = height (default 512 GPU, 128 CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument(
        "--cfg", nargs="+", default=["none"], choices=["none", "self", "initialize", "full"]
    )
    parser.add_argument("--guidance", type=float, default=1.2, help="guidance with --cfg != none")
    parser.add_argument("--similarity", type=float, default=0.0, help="similarity_threshold")
    parser.add_argument("--still", action="store_true", help="a still camera (one frame)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile-mode", default="max-autotune")
    parser.add_argument("--frames", type=int, default=30, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; best kept")
    parser.add_argument("--baseline-divisor", type=int, default=3, help="baseline runs frames/N")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--name", help="result name (default: from preset, size and device)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (512 if resolve_device(args.device).type == "cuda" else 128)
    args.width = args.height = size
    return args


def result_name(args: argparse.Namespace) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(resolve_device(args.device)).lower()).strip("-")
    return f"diffusion_worker-{args.preset if not args.model else 'model'}-{args.width}-{slug}"


def main() -> None:
    args = parse_args()
    name = args.name or result_name(args)
    if args.replot:
        saved = load_json(name)
        plot(saved["results"], saved["config"], saved["machine"], name)
        return
    print("livediff's stream engine against diffusers' img2img; stage ms are livediff's per batch")
    print(TABLE.header(), flush=True)
    config, runs = run_all(args)
    info = machine()
    path = save_json(name, info, config, runs, benchmark="diffusion_worker")
    plot(runs, config, info, name)
    best = max(runs, key=lambda run: run["livediff"]["fps"])
    print(
        f"best: {best['livediff']['fps']} fps ({best['steps']} steps, batch {best['batch']},"
        f" compile {best['compile']}); saved {path} and {path.with_suffix('.png').name}"
    )


if __name__ == "__main__":
    main()
