"""Control images for ControlNets, made on the worker's device, batched across sessions.

``canny`` (OpenCV's Canny: Sobel ridges as kornia finds them, a sync-free hysteresis),
``depth`` (Depth Anything V2 Small through transformers, loaded on first use like the other
models), ``passthrough`` (the frame itself), and TemporalNet's ``temporal_net`` and
``temporal_net_tensorrt`` (:mod:`livediff.transforms.diffusion.temporal_net`: the session's
previous output, and a pure-torch pyramidal Lucas-Kanade optical flow). Input and output are
(B, 3, H, W) float32 RGB in [0, 1] on the device (TemporalNet2's output: 6 channels): no PIL,
no host round trip, and no host wait: every constant (the grey weights, the Sobel kernels,
ImageNet's mean and std) comes from the device constants made once
(:func:`livediff.pixels.device.constant`), where ``torch.tensor(values, device=cuda)`` would
wait for the CUDA stream on every batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from livediff.config import Settings
from livediff.pixels.device import constant
from livediff.transforms.diffusion.models import locate_depth_model
from livediff.transforms.diffusion.temporal_net import (
    FLOW_FROM,
    PREVIOUS,
    previous_outputs,
    temporal_net2,
)

#: ImageNet statistics Depth Anything was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Lowest Canny threshold on the [0, 1] scale (as kornia, which refuses 0).
MIN_THRESHOLD = 1e-6
#: Grey from RGB (BT.601 luma, OpenCV's and kornia's weights).
GREY_WEIGHTS = (0.299, 0.587, 0.114)
#: The unnormalised 3x3 Sobel kernels, d/dx then d/dy, as conv2d weights (2, 1, 3, 3).
SOBEL = (
    (((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0)),),
    (((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0)),),
)
#: Inside the gradient magnitude's square root (kornia's eps): a flat pixel's magnitude.
EPS = 1e-6
#: (dy, dx) of the neighbour ahead along each quantised gradient axis (0: along x, 1: the
#: down-right diagonal, 2: along y, 3: the down-left diagonal); the one behind is its negation.
AXIS_STEPS = ((0, 1), (1, 1), (1, 0), (1, -1))


class Preprocessors:
    """Frames -> control images, by preprocessor name (worker thread)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, settings: Settings) -> None:
        self.device = device
        self.dtype = dtype
        self.settings = settings
        self._depth: Any = None

    def __call__(self, kind: str, images: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Control images for ``images``; TemporalNet's kinds also read each frame's history
        from ``params`` (``previous``, ``flow_from``: one tensor or None per frame)."""
        if kind == "canny":
            return canny(images, float(params["low_threshold"]), float(params["high_threshold"]))
        if kind == "depth":
            return self.depth(images, int(params["detect_resolution"]))
        if kind == "passthrough":
            return images.clamp(0, 1)
        if kind == "temporal_net":
            return previous_outputs(images, params.get(PREVIOUS) or [None] * len(images))
        if kind == "temporal_net_tensorrt":
            return self.temporal_net2(images, params)
        raise ValueError(f"unknown preprocessor {kind!r}")

    @torch.inference_mode()
    def depth(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """Depth maps (near = bright), each normalised to [0, 1], at the frames' size."""
        model = self._depth_model()
        height, width = images.shape[-2:]
        sized = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", antialias=True
        )
        mean = constant(IMAGENET_MEAN, images.device, torch.float32).view(1, 3, 1, 1)
        std = constant(IMAGENET_STD, images.device, torch.float32).view(1, 3, 1, 1)
        normalised = ((sized - mean) / std).to(next(model.parameters()).dtype)
        depth = model(pixel_values=normalised).predicted_depth.to(torch.float32)[:, None]
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        lowest = depth.amin(dim=(2, 3), keepdim=True)
        highest = depth.amax(dim=(2, 3), keepdim=True)
        span = highest - lowest
        scaled = (depth - lowest) / torch.where(span > 0, span, torch.ones_like(span))
        return scaled.expand(-1, 3, -1, -1).contiguous()

    @torch.inference_mode()
    def temporal_net2(self, images: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """TemporalNet2's 6-channel control images."""
        count = len(images)
        return temporal_net2(
            images,
            params.get(PREVIOUS) or [None] * count,
            params.get(FLOW_FROM) or [None] * count,
            float(params["flow_strength"]),
        )

    def _depth_model(self) -> Any:
        if self._depth is None:
            transformers = __import__("transformers")
            folder = locate_depth_model(
                self.settings.depth_model, self.settings.model_dir, download=True
            )
            model = transformers.DepthAnythingForDepthEstimation.from_pretrained(folder)
            self._depth = model.to(self.device, self.dtype).eval().requires_grad_(False)
        return self._depth

    def close(self) -> None:
        self._depth = None


def canny(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Canny edges (white on black, 3 channels) with thresholds on the 0-255 scale.

    As OpenCV's ``cv2.Canny(gray, low, high, L2gradient=True)``, which ControlNet annotators
    call: no blur first, the unnormalised 3x3 Sobel magnitude (on [0, 1], OpenCV's on 0-255
    divided by 255). :func:`ridges` classifies the pixels; :func:`hysteresis` keeps the weak ones
    connected to strong ones without a loop that reads the device (kornia's reads it once per
    pixel of the longest weak chain: hundreds of syncs a 512x512 frame).
    """
    low_scaled = max(low / 255, MIN_THRESHOLD)
    high_scaled = max(high / 255, low_scaled)
    classes = ridges(grey(images.to(torch.float32)), low_scaled, high_scaled)
    return hysteresis(classes).expand(-1, 3, -1, -1).contiguous()


def grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma, in the order kornia sums it."""
    weights = constant(GREY_WEIGHTS, images.device, images.dtype)
    red, green, blue = images.unbind(dim=1)
    out = torch.addcmul(red * weights[0], green, weights[1])
    return torch.addcmul(out, blue, weights[2])[:, None]


def ridges(grey: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Canny's classes before hysteresis: 1 (strong), 0.5 (weak) or 0, per pixel of ``grey``
    (B, 1, H, W), thresholds on its scale (strict: above ``low`` is weak).

    Non-maximum suppression as OpenCV's (and kornia's, which this equals exactly): the gradient
    direction is rounded to a multiple of 45 degrees; along x (y) a pixel must beat its left
    (upper) neighbour and at least tie its right (lower) one, so of two equal pixels across a
    step the left (upper) one is kept; along a diagonal it must beat both. The magnitude is
    taken one pixel beyond the image too (zero gradient there), so a flat pixel is never kept.
    """
    kernels = constant(SOBEL, grey.device, grey.dtype)
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    gx, gy = gradients[:, :1], gradients[:, 1:]
    gx_padded, gy_padded = F.pad(gx, (1, 1, 1, 1)), F.pad(gy, (1, 1, 1, 1))
    padded = torch.sqrt(gx_padded * gx_padded + gy_padded * gy_padded + EPS)
    axis = torch.remainder((torch.nan_to_num(torch.atan2(gy, gx)) * (4 / math.pi)).round(), 4)
    height, width = grey.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    magnitude = shifted(0, 0)
    kept = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(AXIS_STEPS):
        ahead, behind = shifted(dy, dx), shifted(-dy, -dx)
        ties_ahead = index in (0, 2)  # right and down accept a tie
        beats_ahead = magnitude >= ahead if ties_ahead else magnitude > ahead
        kept |= (axis == index) & beats_ahead & (magnitude > behind)
    magnitude = magnitude * (kept & (magnitude > padded[..., :1, :1]))
    return ((magnitude > low).to(grey.dtype) + (magnitude > high).to(grey.dtype)) * 0.5


def hysteresis(classes: torch.Tensor) -> torch.Tensor:
    """Strong pixels (1) and the weak ones (0.5) 8-connected to a strong one, as 0/1 maps.

    Labels the weak-or-strong regions by hooking and pointer jumping (Shiloach-Vishkin style): a
    label names a pixel of its own region and only ever decreases, and strong pixels hold the
    smallest labels, so a region with a strong pixel ends up labelled by one. A fixed number of
    rounds, log2 of the pixel count, with no data-dependent loop: nothing waits for the device,
    and torch.compile traces it whole. Long serpentine chains settle in about half as many
    rounds; were one cut short, it would only drop weak pixels, never add any.
    """
    batch, _, height, width = classes.shape
    count = height * width
    dtype = torch.float32 if 2 * count < 2**24 else torch.float64  # labels stay exact
    flat = classes.reshape(batch, count).to(dtype)
    region = flat > 0
    index = torch.arange(count, device=classes.device, dtype=dtype)
    labels = torch.where(region, index + count * (flat < 1), torch.full_like(flat, 2.0 * count))
    for _ in range(max(1, math.ceil(math.log2(count)))):
        labels = _merge(labels, region, count, (batch, 1, height, width))
    return (region & (labels < count)).to(classes.dtype).view_as(classes)


def _merge(
    labels: torch.Tensor, region: torch.Tensor, count: int, shape: tuple[int, int, int, int]
) -> torch.Tensor:
    """One round: each pixel's root takes its smallest neighbour label, then two jumps."""
    smallest = -F.max_pool2d(-labels.view(shape), 3, stride=1, padding=1).view_as(labels)
    smallest = torch.where(region, smallest, labels)
    roots = torch.remainder(labels, count).long()
    labels = torch.minimum(labels.scatter_reduce(1, roots, smallest, "amin"), smallest)
    for _ in range(2):
        roots = torch.remainder(labels, count).long()
        labels = torch.where(region, labels.gather(1, roots), labels)
    return labels
