"""TemporalNet's control images: the session's previous output (and, for TemporalNet2, the
input's optical flow as colours), made on the worker's device, batched across sessions.

``temporal_net`` (TemporalNet, 3 channels): a frame's control image is its session's previous
output; the first frame of a session (or of a new size) has none and uses itself.

``temporal_net_tensorrt`` (Livepeer's name for TemporalNet2, a ControlNet with
``conditioning_channels: 6``): ``[previous output, flow colours]``, where the flow runs from the
session's previous input frame to the new one (:func:`dense_flow`: pyramidal Lucas-Kanade in
pure torch), is multiplied by ``flow_strength`` and drawn with the Middlebury colour wheel
(:func:`flow_colours`, what torchvision's ``flow_to_image`` draws, /255: [0, 1]). The first
frame: ``[the frame itself, zeros]``. The colour coding scales each flow by its longest vector,
so ``flow_strength`` only changes the colours at 0 (no flow: white) and barely elsewhere.

Every step stays on the device with no host wait: the colour wheel is a device constant
(:func:`livediff.pixels.device.constant`) and :func:`flow_colours` picks its entries with
``remainder`` where torchvision's masked assignment would read the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from livediff.pixels.device import constant
from livediff.transforms.diffusion.control_params import TEMPORAL_NET

if TYPE_CHECKING:
    from livediff.transforms.diffusion.state import SessionCache

#: Preprocessor params carrying each frame's history (tuples, one item per frame, None: none):
#: the session's previous output (1, 3, H, W) in [0, 1], and its previous input frame.
PREVIOUS = "previous"
FLOW_FROM = "flow_from"
#: The flow's pyramid: levels (each half the size of the one below) and Lucas-Kanade steps
#: per level, fixed so that nothing waits for the device; the coarsest level (1/8 size) catches
#: motion of about 8 times the window's reach.
FLOW_LEVELS = 4
FLOW_STEPS = 3
#: Side of the window whose gradients each pixel's 2x2 system sums (odd).
FLOW_WINDOW = 5
#: Added to the system's diagonal: flat regions (no gradient) get no flow instead of noise.
FLOW_DAMPING = 1e-4
#: Longest side the flow runs at; larger frames are scaled down for it and the flow scaled back.
FLOW_MAX_SIDE = 256
#: The Middlebury colour wheel (Baker et al., ICCV 2007) torchvision's ``flow_to_image`` uses:
#: (segment length, start colour, end colour) from red through yellow, green, cyan, blue and
#: magenta back to red.
WHEEL_SEGMENTS = (
    (15, (255, 0, 0), (255, 255, 0)),
    (6, (255, 255, 0), (0, 255, 0)),
    (4, (0, 255, 0), (0, 255, 255)),
    (11, (0, 255, 255), (0, 0, 255)),
    (13, (0, 0, 255), (255, 0, 255)),
    (6, (255, 0, 255), (255, 0, 0)),
)


def colour_wheel() -> tuple[tuple[float, float, float], ...]:
    """The 55 colours of the wheel, as torchvision's ``_make_colorwheel`` makes them."""
    colours: list[tuple[float, float, float]] = []
    for length, start, end in WHEEL_SEGMENTS:
        for step in range(length):
            ramp = float(math.floor(255 * step / length))
            red, green, blue = (
                a if a == b else (ramp if b > a else 255 - ramp)
                for a, b in zip(start, end, strict=True)
            )
            colours.append((float(red), float(green), float(blue)))
    return tuple(colours)


def flow_colours(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow -> (B, 3, H, W) colours in [0, 1]: each frame's flow as torchvision's
    ``flow_to_image(flow[i:i + 1]) / 255`` (each scaled by its own longest vector)."""
    flow = flow.to(torch.float32)
    longest = torch.sum(flow.pow(2), dim=1).sqrt().amax(dim=(1, 2)).view(-1, 1, 1, 1)
    normalised = flow / (longest + torch.finfo(torch.float32).eps)
    wheel = constant(colour_wheel(), flow.device, torch.float32)
    count = wheel.shape[0]
    norm = torch.sum(normalised.pow(2), dim=1).sqrt()
    angle = torch.atan2(-normalised[:, 1], -normalised[:, 0]) / torch.pi
    position = (angle + 1) / 2 * (count - 1)
    first = torch.floor(position).to(torch.long)
    second = torch.remainder(first + 1, count)
    share = (position - first)[:, None]
    low = wheel[first].permute(0, 3, 1, 2) / 255.0
    high = wheel[second].permute(0, 3, 1, 2) / 255.0
    colour = 1 - norm[:, None] * (1 - ((1 - share) * low + share * high))
    return torch.floor(255 * colour).clamp(0, 255) / 255


def dense_flow(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Optical flow (B, 2, H, W), in pixels (x, y), from ``before`` to ``after`` ((B, 3, H, W) in
    [0, 1]): pyramidal Lucas-Kanade with warping, coarse to fine, a fixed number of levels and
    steps (no host wait); ``after`` at ``x + flow(x)`` matches ``before`` at ``x``."""
    height, width = after.shape[-2:]
    scale = min(1.0, FLOW_MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    first, second = (_grey(image.to(torch.float32), size) for image in (before, after))
    pyramid = [(first, second)]
    for _ in range(FLOW_LEVELS - 1):
        if min(pyramid[-1][0].shape[-2:]) < 2 * FLOW_WINDOW:
            break
        pyramid.append((F.avg_pool2d(pyramid[-1][0], 2), F.avg_pool2d(pyramid[-1][1], 2)))
    flow = first.new_zeros((first.shape[0], 2, *pyramid[-1][0].shape[-2:]))
    for level, (low, high) in enumerate(reversed(pyramid)):
        if level:
            flow = F.interpolate(flow, size=low.shape[-2:], mode="bilinear") * 2
        for _ in range(FLOW_STEPS):
            flow = flow + _lucas_kanade(low, _warp(high, flow))
    if size != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear")
        ratio = constant((width / size[1], height / size[0]), flow.device, torch.float32)
        flow = flow * ratio.view(1, 2, 1, 1)
    return flow


def _grey(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) mean of the channels at ``size``."""
    grey = images.mean(dim=1, keepdim=True)
    if grey.shape[-2:] == size:
        return grey
    return F.interpolate(grey, size=size, mode="bilinear", antialias=True)


def _warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``images`` sampled at ``x + flow(x)`` (border pixels repeat)."""
    batch, _, height, width = images.shape
    ys = torch.linspace(-1, 1, height, device=images.device)
    xs = torch.linspace(-1, 1, width, device=images.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(batch, -1, -1, -1)
    steps = torch.stack(
        (flow[:, 0] * (2 / max(width - 1, 1)), flow[:, 1] * (2 / max(height - 1, 1))), dim=-1
    )
    return F.grid_sample(
        images, grid + steps, mode="bilinear", padding_mode="border", align_corners=True
    )


def _lucas_kanade(before: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """One Lucas-Kanade step: the flow update (B, 2, h, w) that best explains ``warped`` -
    ``before`` in each window, from the mean image's gradients (damped 2x2 solves)."""
    mean = (before + warped) / 2
    padded = F.pad(mean, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    gt = warped - before

    def window(values: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(
            values, FLOW_WINDOW, stride=1, padding=FLOW_WINDOW // 2, count_include_pad=False
        )

    xx, yy, xy = window(gx * gx) + FLOW_DAMPING, window(gy * gy) + FLOW_DAMPING, window(gx * gy)
    xt, yt = window(gx * gt), window(gy * gt)
    det = xx * yy - xy * xy
    return torch.cat(((xy * yt - yy * xt) / det, (xy * xt - xx * yt) / det), dim=1)


def previous_outputs(frames: torch.Tensor, previous: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Each frame's previous output where its session has one of the frame's size, else the
    frame itself: TemporalNet's control images (B, 3, H, W) in [0, 1]."""
    rows = frames.tensor_split(len(frames))
    chosen = [
        row if before is None or before.shape != row.shape else before.to(row.dtype)
        for row, before in zip(rows, previous, strict=True)
    ]
    return torch.cat(chosen).clamp(0, 1)


def temporal_net2(
    frames: torch.Tensor,
    previous: Sequence[torch.Tensor | None],
    flow_from: Sequence[torch.Tensor | None],
    strength: float,
) -> torch.Tensor:
    """TemporalNet2's 6-channel control images: [previous output, flow colours]; frames with
    no previous input (of their size) get zeros for the flow, and the flow runs once, on the
    rest."""
    rows = frames.tensor_split(len(frames))
    moving = [
        index
        for index, (row, before) in enumerate(zip(rows, flow_from, strict=True))
        if before is not None and before.shape == row.shape
    ]
    colours = [torch.zeros_like(row) for row in rows]
    if moving:
        before = torch.cat([flow_from[index] for index in moving])  # type: ignore[misc]
        after = torch.cat([rows[index] for index in moving])
        flow = dense_flow(before, after) * strength
        for index, colour in zip(moving, flow_colours(flow).tensor_split(len(moving)), strict=True):
            colours[index] = colour.to(frames.dtype)
    return torch.cat((previous_outputs(frames, previous), torch.cat(colours)), dim=1)


def history(kind: str, states: Sequence[SessionCache]) -> dict[str, Any]:
    """The preprocessor params that carry each session's history for ``kind`` (none for a
    kind that is not TemporalNet's): its previous output in [0, 1], and for TemporalNet2 its
    previous input frame."""
    if kind not in TEMPORAL_NET:
        return {}
    found: dict[str, Any] = {
        PREVIOUS: tuple(
            None if state.previous_image is None else (state.previous_image.float() + 1) / 2
            for state in states
        )
    }
    if kind == "temporal_net_tensorrt":
        found[FLOW_FROM] = tuple(state.flow_input for state in states)
    return found
