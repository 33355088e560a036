"""Control images for ControlNets, made on the worker's device, batched across sessions.

``canny`` (kornia's Canny on the GPU-friendly batched tensors), ``depth`` (Depth Anything V2
Small through transformers, loaded on first use like the other models) and ``passthrough`` (the
frame itself). Input and output are (B, 3, H, W) float32 RGB in [0, 1] on the device: no PIL,
no host round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from livediff.config import Settings
from livediff.transforms.diffusion.models import locate_depth_model

#: ImageNet statistics Depth Anything was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Canny edges (white on black, 3 channels) with thresholds on the 0-255 scale."""
    import kornia

    _, edges = kornia.filters.canny(
        images.to(torch.float32), low_threshold=low / 255, high_threshold=high / 255
    )
    return edges.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
