"""Pixels onto the device and back: one copy each way, colour conversion and resize on the device.

A WebRTC frame arrives as yuv420p. Its planes go host -> pinned buffer -> device as they are
(1.5 bytes a pixel instead of 3 for RGB), ``non_blocking`` on the worker's CUDA stream, and the
YUV -> RGB conversion and the resize to the session's size run there. RGB arrays take the same
pinned route; tensors (the ai-runner path) are used where they already are. On the CPU the same
code runs without pinning.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import av
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from livediff.frames import Image, RgbArray

#: Pinned staging buffers kept (one per frame shape seen recently).
MAX_STAGING_BUFFERS = 8
#: AVColorRange value for full-range ("JPEG") YUV.
FULL_RANGE = 2
#: AVColorSpace value for BT.709.
BT709 = 1

#: (R from V, G from U, G from V, B from U) for the colour matrices in use.
_COEFFICIENTS = {
    "bt601": (1.402, -0.344136, -0.714136, 1.772),
    "bt709": (1.5748, -0.187324, -0.468124, 1.8556),
}


class HostStaging:
    """Pinned host buffers, one per shape, reused frame after frame for host -> device copies."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._buffers: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.cuda.Event]] = (
            OrderedDict()
        )

    def upload(self, array: npt.NDArray[np.uint8]) -> torch.Tensor:
        """``array`` as a uint8 tensor on the device (the copy is queued, not waited for)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self._device.type != "cuda":
            return host
        pinned, copied = self._buffer(tuple(host.shape))
        copied.synchronize()  # the previous copy out of this buffer has finished
        pinned.copy_(host)
        on_device = torch.empty(host.shape, dtype=torch.uint8, device=self._device)
        on_device.copy_(pinned, non_blocking=True)
        copied.record()
        return on_device

    def _buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.cuda.Event]:
        found = self._buffers.get(shape)
        if found is not None:
            self._buffers.move_to_end(shape)
            return found
        pinned = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        found = self._buffers[shape] = (pinned, event)
        if len(self._buffers) > MAX_STAGING_BUFFERS:
            self._buffers.popitem(last=False)
        return found


class FrameUploader:
    """Any supported image -> (1, 3, height, width) tensor in [-1, 1] on the device."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._staging = HostStaging(device)

    def __call__(self, image: Image, width: int, height: int) -> torch.Tensor:
        rgb = self._rgb(image)
        if rgb.shape[-2:] != (height, width):
            rgb = F.interpolate(
                rgb, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        return (rgb * 2 - 1).to(self.dtype)

    def _rgb(self, image: Image) -> torch.Tensor:
        """(1, 3, H, W) float32 in [0, 1] on the device, at the image's own size."""
        if isinstance(image, av.VideoFrame):
            return self._video_frame(image)
        if isinstance(image, np.ndarray):
            return _uint8_hwc_to_float(self._staging.upload(image))
        tensor = image if image.dim() == 4 else image[None]
        if tensor.is_cuda:
            _adopt(tensor)
        tensor = tensor.to(self.device, torch.float32, non_blocking=True)
        return tensor.permute(0, 3, 1, 2).clamp(0, 1)

    def _video_frame(self, frame: av.VideoFrame) -> torch.Tensor:
        name = frame.format.name
        if name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0:
            planes = self._staging.upload(cast(RgbArray, frame.to_ndarray()))
            full_range = name == "yuvj420p" or frame.color_range == FULL_RANGE
            matrix = "bt709" if frame.colorspace == BT709 else "bt601"
            return yuv420_to_rgb(planes, frame.width, frame.height, full_range, matrix)
        rgb = cast(RgbArray, frame.to_ndarray(format="rgb24"))
        return _uint8_hwc_to_float(self._staging.upload(rgb))


def _adopt(tensor: torch.Tensor) -> None:
    """Make a CUDA tensor made on another stream (ai-runner copies frames on the default one)
    safe to read on this thread's stream: wait for that stream's work (on the GPU, the host
    does not block) and keep the memory from being reused until this stream is done with it."""
    current = torch.cuda.current_stream(tensor.device)
    producer = torch.cuda.default_stream(tensor.device)
    if current != producer:
        current.wait_stream(producer)
        tensor.record_stream(current)


def _uint8_hwc_to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.permute(2, 0, 1)[None].to(torch.float32).div_(255)


def yuv420_to_rgb(
    planes: torch.Tensor, width: int, height: int, full_range: bool, matrix: str = "bt601"
) -> torch.Tensor:
    """PyAV's yuv420p array layout, shape (height * 3 / 2, width) uint8, -> (1, 3, H, W) RGB.

    Chroma is upsampled bilinearly; the result is in [0, 1].
    """
    flat = planes.reshape(-1).to(torch.float32)
    luma_size, chroma_size = width * height, (width // 2) * (height // 2)
    luma = flat[:luma_size].view(1, 1, height, width)
    chroma = flat[luma_size : luma_size + 2 * chroma_size].view(1, 2, height // 2, width // 2)
    chroma = F.interpolate(chroma, size=(height, width), mode="bilinear", align_corners=False)
    if full_range:
        luma, chroma = luma / 255, (chroma - 128) / 255
    else:
        luma, chroma = (luma - 16) / 219, (chroma - 128) / 224
    cb, cr = chroma[:, 0:1], chroma[:, 1:2]
    r_v, g_u, g_v, b_u = _COEFFICIENTS[matrix]
    rgb = torch.cat((luma + r_v * cr, luma + g_u * cb + g_v * cr, luma + b_u * cb), dim=1)
    return rgb.clamp_(0, 1)


def to_output_images(decoded: torch.Tensor) -> list[torch.Tensor]:
    """VAE output (B, 3, H, W) in [-1, 1] -> B float32 images (1, H, W, 3) in [0, 1], the
    frame contract (and ai-runner's: the same dtype as its input tensors)."""
    images = (decoded.to(torch.float32) / 2 + 0.5).clamp_(0, 1).permute(0, 2, 3, 1)
    return list(images.tensor_split(images.shape[0]))
