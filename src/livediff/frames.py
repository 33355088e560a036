"""The one frame type: pixels + pts + time_base + the stage timestamps.

Pixels travel in whichever form their source produced, so that nothing is converted twice:
- ``av.VideoFrame`` (any pixel format; WebRTC ingest gives yuv420p),
- ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, RGB,
- ``torch.Tensor`` of shape (H, W, 3) or (1, H, W, 3), float in [0, 1], RGB, on any device
  (the ai-runner contract).

A transform reads the form it likes with the helpers below and may return any of them; the
consumer of a session (WebRTC egress, ai-runner adapter) converts once, on the worker thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import av
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

RgbArray: TypeAlias = npt.NDArray[np.uint8]
Image: TypeAlias = "av.VideoFrame | RgbArray | torch.Tensor"

#: RTP video clock: what aiortc's decoders stamp on frames.
VIDEO_TIME_BASE = Fraction(1, 90_000)


def now() -> float:
    """The clock every stage timestamp uses (monotonic seconds)."""
    return time.perf_counter()


@dataclass(slots=True)
class StageTimes:
    """When the frame passed each stage, in :func:`now` seconds; 0.0 = not yet."""

    received: float = 0.0
    queued: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    sent: float = 0.0


@dataclass(slots=True)
class Frame:
    """One video frame on its way through the engine."""

    image: Image
    pts: int
    time_base: Fraction = VIDEO_TIME_BASE
    times: StageTimes = field(default_factory=StageTimes)

    @property
    def seconds(self) -> float:
        """Presentation time in seconds."""
        return float(self.pts * self.time_base)

    def with_image(self, image: Image) -> Frame:
        """The same frame (pts, time_base, a copy of the stage times) carrying other pixels."""
        return Frame(image=image, pts=self.pts, time_base=self.time_base, times=replace(self.times))


def is_tensor(image: object) -> bool:
    """True for a ``torch.Tensor``, without importing torch."""
    return type(image).__module__.startswith("torch")


def image_size(image: Image) -> tuple[int, int]:
    """(width, height) of any supported image."""
    if isinstance(image, av.VideoFrame):
        return image.width, image.height
    shape = tuple(image.shape)
    if len(shape) == 4:
        shape = shape[1:]
    return int(shape[1]), int(shape[0])


def to_rgb_array(image: Image) -> RgbArray:
    """RGB uint8 (H, W, 3) on the host. Runs a colour conversion or a device copy: worker only."""
    if isinstance(image, av.VideoFrame):
        return cast(RgbArray, image.to_ndarray(format="rgb24"))
    if isinstance(image, np.ndarray):
        return image
    return _tensor_to_rgb(image, borrow=False)


#: Pinned download buffers a thread keeps (one per output size in use).
PINNED_BUFFERS_PER_THREAD = 4
_pinned = threading.local()


def _tensor_to_rgb(tensor: Any, *, borrow: bool) -> RgbArray:
    """uint8 RGB of a float [0, 1] tensor, converted where the tensor is (see _download)."""
    import torch

    if tensor.dim() == 4:
        tensor = tensor[0]
    pixels = (tensor.clamp(0, 1) * 255).round_().to(torch.uint8)
    return _download(pixels, borrow=borrow)


def tensor_to_yuv420(tensor: Any) -> Any:
    """yuv420p planes of a float [0, 1] RGB tensor (H, W even), in PyAV's array layout
    (H * 3 / 2, W) uint8, computed where the tensor is.

    BT.601, limited range (what decoders assume for untagged video, as libswscale makes it);
    chroma is the mean of each 2x2 block.
    """
    import torch
    import torch.nn.functional as F

    rgb = (tensor if tensor.dim() == 4 else tensor[None]).clamp(0, 1).permute(0, 3, 1, 2)
    rgb = rgb.to(torch.float32)
    height, width = rgb.shape[-2:]
    weights = rgb.new_tensor(_BT601)  # rows: Y, Cb, Cr
    luma = torch.einsum("c,nchw->hw", weights[0], rgb) * 219 + 16
    blocks = F.avg_pool2d(rgb, 2)[0]
    chroma = torch.einsum("kc,chw->khw", weights[1:], blocks) * 224 + 128
    planes = torch.cat((luma.reshape(-1), chroma.reshape(-1)))
    return planes.round_().clamp_(0, 255).to(torch.uint8).view(height * 3 // 2, width)


#: RGB -> (Y, Cb, Cr) weights of BT.601 (Y in [0, 1], Cb/Cr in [-0.5, 0.5]).
_BT601 = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


def _download(pixels: Any, *, borrow: bool) -> npt.NDArray[np.uint8]:
    """A uint8 tensor on the host as a numpy array.

    A CUDA tensor comes back in one ``non_blocking`` copy into a pinned buffer (one per thread
    and shape, reused), then the current stream (the worker's) is synchronised. With ``borrow``
    the result may be that buffer, valid until the thread's next download.
    """
    import torch

    if pixels.device.type != "cuda":
        return np.ascontiguousarray(pixels.numpy())
    host = _pinned_buffer(tuple(pixels.shape))
    host.copy_(pixels, non_blocking=True)
    torch.cuda.current_stream(pixels.device).synchronize()
    array = cast(npt.NDArray[np.uint8], host.numpy())
    return array if borrow else array.copy()


def _pinned_buffer(shape: tuple[int, ...]) -> Any:
    import torch

    buffers: dict[tuple[int, ...], Any] = _pinned.__dict__.setdefault("buffers", {})
    if shape not in buffers:
        if len(buffers) >= PINNED_BUFFERS_PER_THREAD:
            buffers.pop(next(iter(buffers)))
        buffers[shape] = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    return buffers[shape]


def to_video_frame(image: Image) -> av.VideoFrame:
    """An ``av.VideoFrame`` of the image; an existing one is returned as it is.

    A CUDA tensor of even size becomes yuv420p on the device (half the bytes to copy back, and
    no colour conversion left for the encoders' threads); other tensors become rgb24.
    """
    if isinstance(image, av.VideoFrame):
        return image
    if isinstance(image, np.ndarray):
        return av.VideoFrame.from_ndarray(image, format="rgb24")
    # from_ndarray copies the pixels, so the thread's pinned buffer can be lent
    width, height = image_size(image)
    if image.device.type == "cuda" and width % 2 == 0 and height % 2 == 0:
        planes = _download(tensor_to_yuv420(image), borrow=True)
        return av.VideoFrame.from_ndarray(planes, format="yuv420p")
    return av.VideoFrame.from_ndarray(_tensor_to_rgb(image, borrow=True), format="rgb24")


def resize(image: Image, width: int, height: int) -> Image:
    """The image at width x height, in its own form; unchanged when the size already fits."""
    if image_size(image) == (width, height):
        return image
    if isinstance(image, av.VideoFrame):
        return image.reformat(width=width, height=height)
    if isinstance(image, np.ndarray):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        resized = frame.reformat(width=width, height=height, format="rgb24")
        return cast(RgbArray, resized.to_ndarray())
    return cast("torch.Tensor", _resize_tensor(image, width, height))


def _resize_tensor(tensor: Any, width: int, height: int) -> Any:
    import torch.nn.functional as F

    batched = tensor if tensor.dim() == 4 else tensor[None]
    chw = batched.permute(0, 3, 1, 2)
    out = F.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False)
    out = out.permute(0, 2, 3, 1)
    return out if tensor.dim() == 4 else out[0]
