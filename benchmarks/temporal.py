"""Flicker: how much the restyled video changes from frame to frame, per temporal setting.

A test clip made from a real photograph (Grace Hopper's portrait, which matplotlib ships as
sample data): a slow pan and zoom (``--frames``) and then the same picture held still
(``--still``), at ``--size``. It plays through the real engine (an :class:`Engine` with the
diffusion transform, loaded the way ``livediff serve --pipeline diffusion`` loads it), one
session per setting, every frame waited for before the next goes in, so that every input frame
gets its own output. Per setting (see benchmarks/README.md, "temporal", for the definitions):

- flicker ratio: the output's mean frame-to-frame change over the input's, over the moving
  segment and over the whole clip (1 = the output moves as much as the input; above 1 it
  flickers);
- the output's mean frame-to-frame change on the still segment (where the input changes by
  its camera noise only), absolute and relative to 'off', and its flicker ratio there;
- how far the setting moves the picture from 'off' (mean difference to off's output);
- ms per frame through the engine, and its ratio to 'off'.

Settings are params of the diffusion transform (Livepeer's shapes). Each is validated with the
transform's params model first; one it refuses (a feature that has not landed yet) is skipped
with the reason, printed and recorded, so the script keeps working as features land.

The default model is the tiny random-weight test model (written to a temporary folder and
loaded from there like any other): it shows the mechanism, not the look. ``--preset sd-turbo``
writes random weights of sd-turbo's published architecture instead (its costs are the real
ones, its pictures are not: for a GPU without the weights). ``--model`` takes a hub id or a
folder with real weights (``--model stabilityai/sd-turbo``): real flicker.

    livediff bench temporal                                  # CPU: tiny model, 128 px, ~2.5 min
    livediff bench temporal --model stabilityai/sd-turbo --size 512 --steps 1
    livediff bench temporal --preset sd-turbo --size 512            # costs, no weights needed
    livediff bench temporal --settings off img-post-0.3 --frames 12 --still 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import av
import common
import numpy as np
import torch
from common import Column, Table, jsonable, machine, pyplot, save_plot
from PIL import Image as PILImage
from pydantic import ValidationError

from livediff.config import DEFAULT_VAE, Settings
from livediff.engine import Engine, Session
from livediff.engine.errors import EngineUnavailableError
from livediff.engine.slot import SlotClosedError
from livediff.frames import Frame, RgbArray
from livediff.pixels import to_rgb_array
from livediff.testing.models import write_model_folder
from livediff.transforms.diffusion.transform import DiffusionTransform, resolve_device

#: t_index_list for 1, 2 and 4 steps (sd-turbo style, as gpu_engine.py)
STEP_INDICES = {1: [25], 2: [25, 37], 4: [25, 31, 37, 43]}
PROMPT = "an oil painting of a woman in uniform, thick brush strokes"
#: The ControlNet model id a TemporalNet setting uses with random weights: a random ControlNet
#: of the UNet's shape, added to the engine's pool (as gpu_engine.py does).
RANDOM_TEMPORALNET = "random-temporalnet"


# -- settings ------------------------------------------------------------------------------------
def feedback(kind: str, strength: float) -> dict[str, Any]:
    """A processor block in Livepeer's shape: one enabled feedback processor."""
    return {
        "processors": [{"type": kind, "enabled": True, "params": {"feedback_strength": strength}}]
    }


def bank(frames: int) -> dict[str, Any]:
    return {"cached_attention": {"enabled": True, "max_frames": frames, "interval": 1}}


TEMPORALNET = "temporalnet"


def settings_table() -> dict[str, dict[str, Any]]:
    """Every setting: its name and the params it adds to the base params ('off' adds none)."""
    image_pre = {
        f"img-pre-{s}": {"image_preprocessing": feedback("feedback", s)} for s in (0.3, 0.6)
    }
    image_post = {
        f"img-post-{s}": {"image_postprocessing": feedback("feedback", s)} for s in (0.3, 0.6)
    }
    latent = {
        "latent-pre-0.3": {"latent_preprocessing": feedback("latent_feedback", 0.3)},
        "latent-post-0.3": {"latent_postprocessing": feedback("latent_feedback", 0.3)},
    }
    return {
        "off": {},
        **image_pre,
        **image_post,
        **latent,
        "no-add-noise": {"do_add_noise": False},
        "motion-noise": {"motion_noise": {"enabled": True}},
        "bank-1": bank(1),
        "bank-2": bank(2),
        "bank-4": bank(4),
        TEMPORALNET: {},  # its controlnets entry depends on the model (see temporalnet_patch)
        "img-post-0.3+latent-pre-0.3": {
            **image_post["img-post-0.3"],
            **latent["latent-pre-0.3"],
        },
        "no-add-noise+img-post-0.3": {"do_add_noise": False, **image_post["img-post-0.3"]},
        "motion-noise+latent-pre-0.3": {
            "motion_noise": {"enabled": True},
            **latent["latent-pre-0.3"],
        },
        "bank-2+img-post-0.3": {**bank(2), **image_post["img-post-0.3"]},
    }


SETTINGS = settings_table()


def temporalnet_patch(args: argparse.Namespace) -> dict[str, Any] | None:
    """The TemporalNet setting's params; None when no TemporalNet model is at hand."""
    model_id = args.temporalnet_model or (RANDOM_TEMPORALNET if args.model is None else None)
    if model_id is None:
        return None
    return {"controlnets": [{"model_id": model_id, "preprocessor": "temporal_net"}]}


@dataclass
class Setting:
    name: str
    patch: dict[str, Any]
    skipped: str | None = None  # why it was not run
    applied: dict[str, Any] = field(default_factory=dict)  # the patched fields, validated


def base_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "width": args.size,
        "height": args.size,
        "prompt": PROMPT,
        "seed": 2,
        "t_index_list": STEP_INDICES[args.steps],
        "cfg_type": "none",
        "guidance_scale": 1.0,
    }


def refusal(exc: ValidationError) -> str:
    """The params model's refusal in one line: 'field.path: message; ...'."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "refused by the params model: " + "; ".join(parts)


def chosen_settings(args: argparse.Namespace) -> list[Setting]:
    """The settings asked for, each validated by the transform's params model ('off' first:
    the others are compared with it)."""
    names = ["off", *(name for name in dict.fromkeys(args.settings or SETTINGS) if name != "off")]
    base = base_params(args)
    model = DiffusionTransform.params_model
    chosen = []
    for name in names:
        patch = SETTINGS[name]
        setting = Setting(name, patch)
        if name == TEMPORALNET:
            found = temporalnet_patch(args)
            if found is None:
                setting.skipped = "no TemporalNet model: give --temporalnet-model"
                chosen.append(setting)
                continue
            setting.patch = found
        try:
            validated = model.model_validate({**base, **setting.patch})
        except ValidationError as exc:
            setting.skipped = refusal(exc)
        else:
            setting.applied = validated.model_dump(include=set(setting.patch), mode="json")
        chosen.append(setting)
    return chosen


# -- the clip ------------------------------------------------------------------------------------
def photograph() -> PILImage.Image:
    """Grace Hopper's portrait (512 x 600), shipped with matplotlib as sample data."""
    try:
        from matplotlib import cbook
    except ImportError as exc:
        raise SystemExit("the clip needs matplotlib: pip install -e '.[bench]'") from exc
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return PILImage.open(path).convert("RGB")


def smooth(u: float) -> float:
    """Ease in and out (0 -> 0, 1 -> 1, no jump in speed at either end)."""
    return 0.5 - 0.5 * float(np.cos(np.pi * u))


def crop_box(photo_size: tuple[int, int], u: float) -> tuple[float, float, float, float]:
    """The square of the photograph seen at ``u`` (0 = start, 1 = end of the pan and zoom):
    from 90% of the short side centred a little up and left, to 60% centred on the face."""
    width, height = photo_size
    short = min(width, height)
    e = smooth(u)
    side = short * (0.9 - 0.3 * e)
    cx = width * (0.45 + 0.07 * e)
    cy = height * (0.42 - 0.08 * e)
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return left, top, left + side, top + side


def make_clip(size: int, moving: int, still: int, noise: float) -> list[av.VideoFrame]:
    """``moving`` frames of the pan and zoom, then ``still`` frames of where it ended, as
    yuv420p video frames (what a WebRTC decoder hands the engine). Sub-pixel crops, bilinear,
    then Gaussian camera noise of ``noise`` uint8 levels (std) drawn anew for every frame
    (seeded), so that a still scene is still the way a camera's is."""
    photo = photograph()
    rng = np.random.default_rng(0)
    positions = [t / moving for t in range(moving)] + [1.0] * still
    frames = []
    for u in positions:
        view = photo.transform(
            (size, size),
            PILImage.Transform.EXTENT,
            crop_box(photo.size, u),
            PILImage.Resampling.BILINEAR,
        )
        exact = np.asarray(view, dtype=np.float64)
        if noise > 0:
            exact = exact + rng.normal(0.0, noise, exact.shape)
        rgb = np.clip(np.rint(exact), 0, 255).astype(np.uint8)
        frames.append(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
    return frames


# -- metrics -------------------------------------------------------------------------------------
def changes(frames: list[RgbArray]) -> list[float]:
    """Mean |frame_t - frame_{t-1}| over pixels and channels, uint8 RGB scaled to [0, 1], for
    t = 1 .. n-1 (entry t-1 is the change into frame t)."""
    out = []
    for before, after in pairwise(frames):
        delta = np.abs(after.astype(np.float32) - before.astype(np.float32))
        out.append(float(delta.mean()) / 255.0)
    return out


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def flicker_fields(
    inputs: list[float], outputs: list[float], moving: int
) -> dict[str, float | None]:
    """Flicker ratios and the still segment's change. ``inputs``/``outputs`` are
    :func:`changes` of the clip and of the output; the moving segment's changes are into frames
    1 .. moving-1, the still segment's into frames moving+1 .. n-1 (where the input changes
    by its camera noise only)."""
    in_moving, out_moving = mean(inputs[: moving - 1]), mean(outputs[: moving - 1])
    in_all, out_all = mean(inputs), mean(outputs)
    in_still, still = mean(inputs[moving:]), outputs[moving:]
    return {
        "flicker_ratio_moving": round(out_moving / in_moving, 4) if in_moving else None,
        "flicker_ratio_all": round(out_all / in_all, 4) if in_all else None,
        "output_change_moving": round(out_moving, 6),
        "input_change_moving": round(in_moving, 6),
        "output_change_still": round(mean(still), 6) if still else None,
        "input_change_still": round(in_still, 6) if still else None,
        "flicker_ratio_still": round(mean(still) / in_still, 4) if still and in_still else None,
    }


# -- the engine ----------------------------------------------------------------------------------
def engine_settings(args: argparse.Namespace, model: str, vae: str) -> Settings:
    return Settings(
        pipeline="diffusion",
        model=model,
        vae=vae,
        device=args.device,
        dtype=args.dtype,
        width=args.size,
        height=args.size,
        max_sessions=1,
        max_batch=1,
        compile=args.compile,
        allow_models=[RANDOM_TEMPORALNET] if args.model is None else [],
        transform_error_limit=1,  # a setting the transform fails on ends at once, and says why
        warmup_frames=4,
    )


def add_random_temporalnet(engine: Engine) -> None:
    """Worker thread: a random ControlNet of the loaded UNet's shape as the TemporalNet of a
    random-weight model (its output is as meaningless as the model's; its cost is the real
    one)."""
    from diffusers import ControlNetModel

    unet_batch = engine.transform.unet_batch  # type: ignore[attr-defined]
    controlnet = ControlNetModel.from_unet(unet_batch.bundle.unet)
    for name, parameter in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            torch.nn.init.normal_(parameter, std=0.02)
    controlnet.to(unet_batch.device, unet_batch.dtype).eval().requires_grad_(False)
    unet_batch.controlnets.add(RANDOM_TEMPORALNET, controlnet)
    # it cannot be loaded again once freed: keep it however long the other settings play
    unet_batch.controlnet_idle_s = float("inf")


def spread_encoder_output(engine: Engine, clip: list[RgbArray]) -> None:
    """Worker thread, random weights only: rescale the TAESD encoder's last convolution so
    that the clip's latents spread with mean 0 and std 1. As built, the random encoder squeezes
    every picture into nearly the same latent (std 0.03), so the output would hardly follow the
    input at all and every flicker ratio would read about 0.001; the decoder is spread the same
    way by livediff.testing.models. Real models need none of this."""
    unet_batch = engine.transform.unet_batch  # type: ignore[attr-defined]
    vae = unet_batch.bundle.vae
    last = vae.encoder.layers[-1]
    pixels = torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)
    pixels = pixels.to(unet_batch.device, next(vae.parameters()).dtype) / 127.5 - 1
    with torch.no_grad():
        latents = vae.encoder(pixels)
        factor = 1.0 / float(latents.std())
        last.weight.mul_(factor)
        last.bias.sub_(float(latents.mean())).mul_(factor)


class SettingFailedError(Exception):
    """The engine could not play the clip with a setting; the message says why."""


@dataclass
class Played:
    """One play of the clip: its outputs, in order, and each input frame's slice of the wall
    time (from its submission to the next frame's; the slices add up to the whole play)."""

    outputs: list[RgbArray]
    slices_ms: list[float]

    @property
    def ms_per_frame(self) -> float:
        return sum(self.slices_ms) / len(self.outputs)


async def play(
    engine: Engine, params: dict[str, Any], clip: list[av.VideoFrame], steps: int
) -> Played:
    """The clip through one new session, in order, each frame's output waited for before the
    next frame goes in. With N denoising steps (a stream batch) the output of frame k comes
    with input k + N - 1: the last frame is repeated N - 1 times so every frame gets its own."""
    opened: list[Session] = []

    def ended(_reason: str) -> None:
        for session in opened:
            session.close_outputs()

    try:
        validated = engine.validate(params)
    except ValidationError as exc:
        raise SettingFailedError(refusal(exc)) from None
    session = await engine.open_session(validated, adapt_output=to_rgb_array, on_end=ended)
    opened.append(session)
    try:
        played = await play_in(session, clip + [clip[-1]] * (steps - 1), steps - 1)
    finally:
        dropped, errors = session.stats.frames_dropped, session.stats.errors
        await engine.close_session(session.id, "measured")
    if errors:
        raise SettingFailedError(f"the transform failed on {errors} frame(s)")
    if dropped:
        raise SettingFailedError(f"{dropped} frame(s) dropped")
    return played


async def play_in(session: Session, feed: list[av.VideoFrame], fill: int) -> Played:
    """``feed`` through ``session``, one frame at a time; the first ``fill`` frames have no
    output (they fill the stream batch)."""
    slot = session.subscribe(asyncio.get_running_loop())
    outputs: list[RgbArray] = []
    marks: list[float] = []
    try:
        for index, frame in enumerate(feed):
            if session.end_reason is not None:
                raise SettingFailedError(f"session ended: {session.end_reason}")
            marks.append(time.perf_counter())
            session.submit(Frame(image=frame, pts=index))
            if index < fill:  # taken by the worker before the next goes in: none is dropped
                while session.input.ready():
                    await asyncio.sleep(0.0005)
                continue
            out = await slot.get()
            assert isinstance(out.image, np.ndarray)
            outputs.append(out.image)
        marks.append(time.perf_counter())
    except SlotClosedError:
        raise SettingFailedError(f"session ended: {session.end_reason}") from None
    finally:
        session.unsubscribe(slot)
    slices = [(after - before) * 1000 for before, after in pairwise(marks)]
    # the fill frames' slices (steps > 1) belong to the frames whose outputs they start
    return Played(outputs, [sum(slices[: fill + 1]), *slices[fill + 1 :]])


# -- the run -------------------------------------------------------------------------------------
TABLE = Table(
    [
        Column("setting", "setting", width=28),
        Column("flicker moving", "flicker_ratio_moving", ".3f"),
        Column("flicker all", "flicker_ratio_all", ".3f"),
        Column("flicker still", "flicker_ratio_still", ".3f"),
        Column("still change", "output_change_still", ".5f"),
        Column("still vs off", "still_vs_off", ".3f"),
        Column("diff to off", "difference_to_off", ".4f"),
        Column("ms/frame", "ms_per_frame", ".1f"),
        Column("ms vs off", "ms_vs_off", ".3f"),
        Column("note", "note"),
    ]
)


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the table prints it: '-' for what is not defined."""
    cells = {key: "-" if value is None else value for key, value in row.items()}
    return {**cells, "note": row.get("note", "")}


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 4)


def model_paths(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """(model, vae) to load: ``--model``'s, or random weights of ``--preset`` written under
    ``scratch`` (loaded from there like any model folder)."""
    if args.model is None:
        folders = write_model_folder(scratch / args.preset, args.preset, seed=0)
        return str(folders.model), args.vae or str(folders.taesd)
    return args.model, args.vae or DEFAULT_VAE


def load_label(model: str) -> str:
    """What a result file is named after: 'stabilityai/sd-turbo' -> 'sd-turbo'."""
    label = re.sub(r"[^a-z0-9.]+", "-", Path(model.rstrip("/")).name.lower()).strip("-")
    return label or "model"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "cpu"


#: Called with the rows measured so far after each play (the device run saves them at once).
Progress = Callable[[list[dict[str, Any]]], None]


async def measure_all(
    args: argparse.Namespace,
    settings: list[Setting],
    model: str,
    vae: str,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting's row (skipped and failed ones with their reason), and what the run used.
    The settings are played ``--repeats`` times round after round; the metrics come from the
    first round (every round gives the same frames: ``repeat_identical`` says so), the ms from
    the fastest (on a shared machine, the one least disturbed)."""
    clip = make_clip(args.size, args.frames, args.still, args.noise)
    clip_rgb = [to_rgb_array(frame) for frame in clip]  # what the engine sees
    input_changes = changes(clip_rgb)
    options = engine_settings(args, model, vae)
    engine = Engine(options, DiffusionTransform(options))
    loading = time.perf_counter()
    try:
        await engine.start()
    except BaseException:
        await engine.stop()
        raise
    load_s = time.perf_counter() - loading
    base = base_params(args)
    plays: dict[str, list[Played]] = {}
    failures: dict[str, str] = {}
    try:
        if args.model is None:
            await engine.on_worker(lambda: spread_encoder_output(engine, clip_rgb))
        temporalnet = any(s.name == TEMPORALNET and s.skipped is None for s in settings)
        if temporalnet and args.model is None:
            await engine.on_worker(lambda: add_random_temporalnet(engine))
        # a short throw-away play first: what a first session costs is not any setting's
        await play(engine, base, clip[: min(len(clip), 4)], args.steps)
        for round_ in range(1, args.repeats + 1):
            for setting in settings:
                if setting.skipped is not None or setting.name in failures:
                    continue
                try:
                    played = await asyncio.wait_for(
                        play(engine, {**base, **setting.patch}, clip, args.steps), args.timeout
                    )
                except (SettingFailedError, EngineUnavailableError, TimeoutError) as exc:
                    failures[setting.name] = str(exc) or f"no result within {args.timeout} s"
                    print(f"{setting.name}: failed, {failures[setting.name]}", flush=True)
                    continue
                plays.setdefault(setting.name, []).append(played)
                if progress is not None:
                    progress(result_rows(settings, plays, failures, input_changes, args.frames))
                ms = played.ms_per_frame
                print(
                    f"round {round_}/{args.repeats} {setting.name}: {ms:.1f} ms/frame", flush=True
                )
    finally:
        await engine.stop()
    rows = result_rows(settings, plays, failures, input_changes, args.frames)
    config = {
        "model": args.model or f"random-weight {args.preset} (livediff.testing.models)",
        "vae": args.vae or (f"random {args.preset} TAESD" if args.model is None else DEFAULT_VAE),
        "device": str(resolve_device(args.device)),
        "dtype": args.dtype,
        "compile": args.compile,
        "size": args.size,
        "moving_frames": args.frames,
        "still_frames": args.still,
        "camera_noise_std_uint8": args.noise,
        "steps": args.steps,
        "repeats": args.repeats,
        "base_params": base,
        "clip": "matplotlib sample data grace_hopper.jpg: eased pan and zoom from a 90% to a 60%"
        " square crop of the short side, then held still; bilinear, camera noise, yuv420p",
        "random_encoder_spread": args.model is None,
        "load_s": round(load_s, 2),
    }
    return rows, config


def result_rows(
    settings: list[Setting],
    plays: dict[str, list[Played]],
    failures: dict[str, str],
    input_changes: list[float],
    moving: int,
) -> list[dict[str, Any]]:
    """One row per setting, in the order asked; the ratios to 'off' where 'off' was measured."""
    rows: list[dict[str, Any]] = []
    off = plays.get("off")
    off_row: dict[str, Any] = {}
    for setting in settings:
        row: dict[str, Any] = {"setting": setting.name, "params": setting.patch}
        reason = setting.skipped or failures.get(setting.name)
        if reason is not None or setting.name not in plays:
            kind = "skipped" if setting.skipped else "failed"
            row.update({kind: reason, "note": kind})
            rows.append(row)
            continue
        runs = plays[setting.name]
        first = runs[0]
        row.update(flicker_fields(input_changes, changes(first.outputs), moving))
        fastest = [min(times) for times in zip(*(run.slices_ms for run in runs), strict=True)]
        row["ms_per_frame"] = round(mean(fastest), 3)
        row["ms_per_frame_each_repeat"] = [round(run.ms_per_frame, 3) for run in runs]
        row["ms_p50"] = round(float(np.median(fastest)), 3)
        row["repeat_identical"] = all(
            all(np.array_equal(a, b) for a, b in zip(run.outputs, first.outputs, strict=True))
            for run in runs[1:]
        )
        if setting.name == "off":
            off_row = row
        if off is not None and off_row:
            row["still_vs_off"] = ratio(row["output_change_still"], off_row["output_change_still"])
            row["ms_vs_off"] = ratio(row["ms_per_frame"], off_row["ms_per_frame"])
            row["difference_to_off"] = round(difference(first.outputs, off[0].outputs), 6)
        row["applied"] = setting.applied
        rows.append(row)
    return rows


def difference(outputs: list[RgbArray], reference: list[RgbArray]) -> float:
    """Mean over frames of mean |output_t - reference_t| (uint8 RGB / 255)."""
    return mean(
        [
            float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()) / 255.0
            for a, b in zip(outputs, reference, strict=True)
        ]
    )


def plot(
    rows: list[dict[str, Any]], config: dict[str, Any], info: dict[str, Any], name: str
) -> Path:
    """``<out>/<name>.png``: flicker ratios and ms per frame, one bar (pair) per setting."""
    measured = [row for row in rows if "ms_per_frame" in row]
    plt = pyplot()
    figure, (flicker, cost) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = list(range(len(measured)))
    names = [row["setting"] for row in measured]
    bars = (
        ("flicker_ratio_moving", "moving segment", "tab:blue"),
        ("flicker_ratio_all", "whole clip", "tab:orange"),
        ("flicker_ratio_still", "still segment (camera noise)", "tab:gray"),
    )
    highest = 0.0
    for offset, (key, label, colour) in zip((-0.27, 0.0, 0.27), bars, strict=True):
        values = [row.get(key) or 0.0 for row in measured]
        highest = max([highest, *values])
        flicker.bar([x + offset for x in xs], values, 0.27, color=colour, label=label)
    if highest > 0.5:  # else the line would flatten every bar
        flicker.axhline(1.0, color="0.4", linestyle=":", linewidth=1, label="moves as the input")
    flicker.set_ylabel("flicker ratio (output change / input change)")
    flicker.set_title("Flicker per setting (1 = moves as the input; lower = steadier)")
    flicker.set_ylim(top=max(highest, 0.01) * 1.3)
    flicker.legend(loc="upper left", fontsize=7, ncols=2)
    cost.bar(xs, [row["ms_per_frame"] for row in measured], 0.6, color="tab:green")
    for x, row in zip(xs, measured, strict=True):
        if row.get("ms_vs_off") is not None:
            label = f"x{row['ms_vs_off']:.2f}"
            cost.text(x, row["ms_per_frame"] * 1.01, label, ha="center", fontsize=7)
    cost.set_ylabel("ms per frame through the engine")
    cost.set_title("Cost per setting (x = ratio to off)")
    for axes in (flicker, cost):
        axes.set_xticks(xs, names, rotation=40, ha="right", fontsize=7)
        axes.grid(axis="y", alpha=0.3)
    title = (
        f"Temporal settings: {config['model']}, {config['size']}x{config['size']},"
        f" {config['steps']} step(s), {config['moving_frames']} moving +"
        f" {config['still_frames']} still frames, {config['device']}"
    )
    skipped = [row["setting"] for row in rows if "ms_per_frame" not in row]
    if skipped:
        title += f"\nnot run (see the JSON): {', '.join(skipped)}"
    figure.suptitle(title, fontsize=8)
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    return save_plot(figure, name, info)


def save(
    name: str, info: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]]
) -> Path:
    """``<out>/<name>.json`` in the benchmarks' layout, with the metric's definition."""
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"{name}.json"
    payload = {
        "benchmark": "temporal",
        "machine": info,
        "config": config,
        "results": rows,
        "ratios": {
            row["setting"]: {"ms": row.get("ms_vs_off"), "still_change": row.get("still_vs_off")}
            for row in rows
            if "ms_per_frame" in row
        },
        "definitions": DEFINITIONS,
    }
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    return path


DEFINITIONS = {
    "change": "mean over pixels and channels of |frame_t - frame_{t-1}|, uint8 RGB / 255",
    "flicker_ratio_moving": "mean output change / mean input change, changes into frames"
    " 1 .. moving-1",
    "flicker_ratio_all": "the same over every change of the clip (still frames included)",
    "flicker_ratio_still": "the same over the changes into still frames 2 .. still (the input"
    " changes there by its camera noise only)",
    "output_change_still": "mean output change into still frames 2 .. still",
    "still_vs_off": "output_change_still / off's",
    "difference_to_off": "mean over frames of mean |output_t - off's output_t| / 255",
    "ms_per_frame": "each frame submitted when the last output came back; a frame's slice ="
    " its submission to the next one's; mean over frames of the fastest slice across repeats"
    " (one repeat: the play's wall time / frames)",
    "ms_vs_off": "ms_per_frame / off's",
}


def result_name(args: argparse.Namespace, label: str) -> str:
    return f"temporal-{label}-{args.size}-{device_label(resolve_device(args.device))}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="hub id or folder of real weights (default: random weights of --preset)"
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "sd-turbo"],
        help="random weights without --model: the tiny test model or sd-turbo's architecture",
    )
    parser.add_argument("--vae", help=f"Tiny AutoEncoder or 'full' (default {DEFAULT_VAE})")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"]
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile at load")
    parser.add_argument("--size", type=int, help="width = height (default 512 GPU, 64 CPU)")
    parser.add_argument("--frames", type=int, default=60, help="frames of the pan and zoom")
    parser.add_argument("--still", type=int, help="still frames after it (default frames / 2)")
    parser.add_argument(
        "--noise", type=float, default=2.0, help="camera noise, std in uint8 levels (0: none)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        choices=sorted(STEP_INDICES),
        help="denoising steps (a stream batch; do_add_noise acts between steps, so not at 1)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        metavar="NAME",
        help=f"a subset ('off' is always run first): {', '.join(SETTINGS)}",
    )
    parser.add_argument(
        "--temporalnet-model",
        help=f"ControlNet for the {TEMPORALNET} setting (default with random weights: a random"
        " one of the UNet's shape; none with --model)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds over the settings; fastest ms kept"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setting")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="where results go")
    parser.add_argument("--name", help="result name (default temporal-<model>-<size>-<device>)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 512 if resolve_device(args.device).type == "cuda" else 128
    if args.still is None:
        args.still = args.frames // 2
    if args.size < 64 or args.size % 64:
        parser.error("--size must be a multiple of 64 (the diffusion params' rule)")
    if args.frames < 3 or args.still < 0 or args.repeats < 1:
        parser.error("give --frames 3 or more, --still 0 or more and --repeats 1 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    common.RESULTS = args.out.resolve()  # where save_plot (and save) write
    label = args.preset if args.model is None else load_label(args.model)
    name = args.name or result_name(args, label)
    if args.replot:
        path = common.RESULTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"no saved result {path}; run the benchmark first")
        saved = json.loads(path.read_text())
        print(f"wrote {plot(saved['results'], saved['config'], saved['machine'], name)}")
        return 0
    settings = chosen_settings(args)
    started = time.perf_counter()
    info = machine()

    def save_so_far(rows: list[dict[str, Any]]) -> None:
        save(name, info, {"partial": True, "size": args.size, "steps": args.steps}, rows)

    with tempfile.TemporaryDirectory(prefix="livediff-temporal-") as scratch:
        model, vae = model_paths(args, Path(scratch))
        rows, config = asyncio.run(measure_all(args, settings, model, vae, save_so_far))
    config["run_s"] = round(time.perf_counter() - started, 1)
    path = save(name, info, config, rows)
    png = plot(rows, config, info, name)
    print()
    print(TABLE.render([shown(row) for row in rows]))
    for row in rows:
        if "skipped" in row or "failed" in row:
            print(f"  {row['setting']}: {row.get('skipped') or row.get('failed')}")
    print(f"run {config['run_s']} s; saved {path} and {png.name}")
    return 1 if any("failed" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
