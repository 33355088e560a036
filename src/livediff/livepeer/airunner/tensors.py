"""ai-runner's tensor contract: (1, H, W, 3) float32 RGB in [0, 1], on the stream's device.

Conversions run on the worker thread (they may copy to or from the device).
"""

from __future__ import annotations

from typing import cast

import torch

from livediff.engine.core import warmup_card
from livediff.frames import Image, is_tensor
from livediff.pixels import to_rgb_array

CHANNELS = 3


def to_runner_tensor(image: Image, device: torch.device) -> torch.Tensor:
    """A new (1, H, W, 3) float32 tensor in [0, 1] on ``device`` holding ``image``.

    Always a new tensor (never the transform's own buffer nor the input): ai-runner keeps the output
    while the next frame is computed, and its encoder scales by 255 without clamping.
    """
    if is_tensor(image):
        tensor = cast(torch.Tensor, image)
    else:
        rgb = torch.from_numpy(to_rgb_array(image)).to(device)  # uint8 upload, converted there
        tensor = rgb.to(torch.float32).div_(255)
    if tensor.dim() == CHANNELS:
        tensor = tensor.unsqueeze(0)
    _check_shape(tensor)
    converted = tensor.to(device=device, dtype=torch.float32)
    if converted is tensor:
        return converted.clamp(0.0, 1.0)
    return converted.clamp_(0.0, 1.0)


def _check_shape(tensor: torch.Tensor) -> None:
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[0] != 1 or shape[3] != CHANNELS:
        raise ValueError(f"expected an RGB image of shape (1, H, W, 3), got {shape}")


def warmup_tensor(width: int, height: int, device: str) -> torch.Tensor:
    """The engine's warm-up card as ai-runner delivers frames: (1, H, W, 3) float32 in [0, 1]."""
    card = torch.from_numpy(warmup_card(width, height)).to(device)
    return card.to(torch.float32).div_(255).unsqueeze(0)


def release_device_memory(device: str) -> None:
    """Return cached GPU memory to the driver (after the models are gone)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
