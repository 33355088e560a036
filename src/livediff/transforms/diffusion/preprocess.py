"""Control images for ControlNets, made on the worker's device, batched across sessions.

``canny`` (OpenCV's Canny: kornia's ridges, a sync-free hysteresis), ``depth`` (Depth Anything V2
Small through transformers, loaded on first use like the other models) and ``passthrough`` (the
frame itself). Input and output are (B, 3, H, W) float32 RGB in [0, 1] on the device: no PIL,
no host round trip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from livediff.config import Settings
from livediff.transforms.diffusion.models import locate_depth_model

#: ImageNet statistics Depth Anything was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Lowest Canny threshold passed to kornia (which refuses 0) on its [0, 1] scale.
MIN_THRESHOLD = 1e-6


class Preprocessors:
    """Frames -> control images, by preprocessor name (worker thread)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, settings: Settings) -> None:
        self.device = device
        self.dtype = dtype
        self.settings = settings
        self._depth: Any = None

    def __call__(self, kind: str, images: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        if kind == "canny":
            return canny(images, float(params["low_threshold"]), float(params["high_threshold"]))
        if kind == "depth":
            return self.depth(images, int(params["detect_resolution"]))
        if kind == "passthrough":
            return images.clamp(0, 1)
        raise ValueError(f"unknown preprocessor {kind!r}")

    @torch.inference_mode()
    def depth(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """Depth maps (near = bright), each normalised to [0, 1], at the frames' size."""
        model = self._depth_model()
        height, width = images.shape[-2:]
        sized = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", antialias=True
        )
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        normalised = ((sized - mean) / std).to(next(model.parameters()).dtype)
        depth = model(pixel_values=normalised).predicted_depth.to(torch.float32)[:, None]
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        lowest = depth.amin(dim=(2, 3), keepdim=True)
        highest = depth.amax(dim=(2, 3), keepdim=True)
        span = highest - lowest
        scaled = (depth - lowest) / torch.where(span > 0, span, torch.ones_like(span))
        return scaled.expand(-1, 3, -1, -1).contiguous()

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
    call: no blur first, the unnormalised 3x3 Sobel magnitude (kornia's on [0, 1] is OpenCV's
    on 0-255 divided by 255). kornia finds and classifies the ridges; :func:`hysteresis` keeps
    the weak ones connected to strong ones without kornia's loop, which reads the device once
    per pixel of the longest weak chain (hundreds of syncs a 512x512 frame).
    """
    import kornia

    low_scaled = max(low / 255, MIN_THRESHOLD)  # kornia wants a positive low threshold
    high_scaled = max(high / 255, low_scaled)
    _, classes = kornia.filters.canny(
        images.to(torch.float32),
        low_threshold=low_scaled,
        high_threshold=high_scaled,
        kernel_size=1,
        hysteresis=False,
    )
    return hysteresis(classes).expand(-1, 3, -1, -1).contiguous()


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
