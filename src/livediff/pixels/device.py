"""Pixels onto the device and back: one copy each way, colour conversion and resize there.

A WebRTC frame arrives as yuv420p. Its planes are copied straight from PyAV's buffers into a
pinned host buffer (1.5 bytes a pixel instead of 3 for RGB, and no intermediate array), go to
the device ``non_blocking`` on the worker's CUDA stream, and the YUV -> RGB conversion and the
resize to the session's size run there. RGB arrays take the same pinned route; tensors (the
ai-runner path) are used where they already are. Outputs come back the same way reversed:
RGB -> yuv420p on the device, one copy into a pinned buffer. On the CPU the same code runs
without pinning.

The ordering rule (every tensor that crosses a CUDA stream or a thread):

1. A tensor made on another stream (ai-runner's frames, copied on the default stream) is
   *adopted* before the worker reads it: the worker's stream waits for the producer's (on the
   GPU; the host does not block) and ``record_stream`` keeps its memory from being reused until
   the worker's stream is done with it (:func:`adopt`).
2. A CUDA tensor the worker hands to another thread or stream (ai-runner's output) travels with
   an event recorded on the worker's stream after the kernels that wrote it
   (:func:`mark_ready`); the consumer makes its own stream wait for that event and records its
   stream on the tensor before reading it (:func:`wait_ready`).
3. A pinned staging buffer is refilled only after the event of the last copy that used it has
   completed (:class:`PinnedPool`); each shape has two buffers used in turn, so filling one
   overlaps the copy out of the other.
4. A host array read after a device-to-host copy is read after that copy's event completed
   (:func:`download`): one wait per download, nothing else synchronises the device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import av
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from livediff.frames import Image, RgbArray, image_size

#: AVColorRange value for full-range ("JPEG") YUV.
FULL_RANGE = 2
#: AVColorSpace value for BT.709.
BT709 = 1
#: Pinned buffers a thread keeps when no worker configured its pool (tests, tools).
DEFAULT_PINNED_BUFFERS = 8

#: (R from V, G from U, G from V, B from U) for the colour matrices in use.
YUV_TO_RGB = {
    "bt601": (1.402, -0.344136, -0.714136, 1.772),
    "bt709": (1.5748, -0.187324, -0.468124, 1.8556),
}
#: RGB -> (Y, Cb, Cr) weights of BT.601 (Y in [0, 1], Cb/Cr in [-0.5, 0.5]).
RGB_TO_YUV_BT601 = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)


# -- pinned staging --------------------------------------------------------------------------
class PinnedPool:
    """Pinned host buffers for copies to and from one thread's device stream.

    Buffers are kept per (direction, shape), two per key used in turn, each with the event of
    the last copy that used it; at most ``capacity`` keys are kept (least recently used go).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rings: OrderedDict[tuple[str, tuple[int, ...]], _Ring] = OrderedDict()

    def take(self, direction: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
        """A free pinned uint8 buffer of ``shape`` and the event to record after the copy."""
        key = (direction, shape)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(shape)
            if len(self._rings) > self.capacity:
                self._rings.popitem(last=False)
        self._rings.move_to_end(key)
        return ring.next()


class _Ring:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self._slots = [
            (torch.empty(shape, dtype=torch.uint8, pin_memory=True), torch.cuda.Event())  # type: ignore[no-untyped-call]
            for _ in range(2)
        ]
        self._turn = 0

    def next(self) -> tuple[torch.Tensor, Any]:
        buffer, event = self._slots[self._turn]
        self._turn = 1 - self._turn
        event.synchronize()  # the last copy that used this buffer has finished
        return buffer, event


_local = threading.local()


def pinned_pool() -> PinnedPool:
    """This thread's pool (the worker sets its size from Settings with :func:`pinned_scope`)."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = PinnedPool(DEFAULT_PINNED_BUFFERS)
    return cast(PinnedPool, pool)


@contextmanager
def pinned_scope(capacity: int) -> Iterator[PinnedPool]:
    """Give this thread a pool of ``capacity`` keys for as long as the block runs."""
    _local.pool = PinnedPool(capacity)
    try:
        yield _local.pool
    finally:
        _local.pool = None


# -- constants on the device ------------------------------------------------------------------
_constants: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_constants_lock = threading.Lock()


def constant(name: str, values: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once per (name, device, dtype) and reused."""
    key = (name, device, dtype)
    with _constants_lock:
        found = _constants.get(key)
        if found is None:
            found = _constants[key] = torch.tensor(values, dtype=dtype, device=device)
    return found


# -- host -> device ---------------------------------------------------------------------------
class FrameUploader:
    """Any supported image -> (1, 3, height, width) tensor in [-1, 1] on the device."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype

    def __call__(self, image: Image, width: int, height: int) -> torch.Tensor:
        rgb = self.rgb(image)
        if rgb.shape[-2:] != (height, width):
            rgb = F.interpolate(
                rgb, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        return (rgb * 2 - 1).to(self.dtype)

    def rgb(self, image: Image) -> torch.Tensor:
        """(1, 3, H, W) float32 in [0, 1] on the device, at the image's own size."""
        if isinstance(image, av.VideoFrame):
            return self._video_frame(image)
        if isinstance(image, np.ndarray):
            return _uint8_hwc_to_float(upload_array(image, self.device))
        tensor = image if image.dim() == 4 else image[None]
        if tensor.is_cuda:
            adopt(tensor)
        tensor = tensor.to(self.device, torch.float32, non_blocking=True)
        return tensor.permute(0, 3, 1, 2).clamp(0, 1)

    def _video_frame(self, frame: av.VideoFrame) -> torch.Tensor:
        name = frame.format.name
        if name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0:
            planes = upload_yuv420(frame, self.device)
            full_range = name == "yuvj420p" or frame.color_range == FULL_RANGE
            matrix = "bt709" if frame.colorspace == BT709 else "bt601"
            return yuv420_to_rgb(planes, frame.width, frame.height, full_range, matrix)
        rgb = cast(RgbArray, frame.to_ndarray(format="rgb24"))
        return _uint8_hwc_to_float(upload_array(rgb, self.device))


def copy_yuv420_planes(frame: av.VideoFrame, out: npt.NDArray[np.uint8]) -> None:
    """Copy a yuv420p frame's planes into ``out`` (PyAV's array layout, (H * 3 / 2, W)),
    reading PyAV's buffers directly (row padding skipped): the only host copy of the frame."""
    width, height = frame.width, frame.height
    sizes = ((width, height), (width // 2, height // 2), (width // 2, height // 2))
    flat = out.reshape(-1)
    offset = 0
    for plane, (plane_width, plane_height) in zip(frame.planes, sizes, strict=True):
        stride = plane.line_size
        rows = np.frombuffer(memoryview(plane), dtype=np.uint8, count=stride * plane_height)
        size = plane_width * plane_height
        target = flat[offset : offset + size].reshape(plane_height, plane_width)
        target[...] = rows.reshape(plane_height, stride)[:, :plane_width]
        offset += size


def upload_yuv420(frame: av.VideoFrame, device: torch.device) -> torch.Tensor:
    """A yuv420p frame's planes as a (H * 3 / 2, W) uint8 tensor on ``device`` (queued)."""
    shape = (frame.height * 3 // 2, frame.width)
    if device.type != "cuda":
        host = np.empty(shape, dtype=np.uint8)
        copy_yuv420_planes(frame, host)
        return torch.from_numpy(host)
    pinned, copied = pinned_pool().take("upload", shape)
    copy_yuv420_planes(frame, pinned.numpy())
    return _to_device(pinned, copied, device)


def upload_array(array: npt.NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """A uint8 array as a tensor on ``device`` (queued, not waited for)."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(array))
    pinned, copied = pinned_pool().take("upload", tuple(array.shape))
    pinned.numpy()[...] = array
    return _to_device(pinned, copied, device)


def _to_device(pinned: torch.Tensor, copied: Any, device: torch.device) -> torch.Tensor:
    on_device = torch.empty(pinned.shape, dtype=torch.uint8, device=device)
    on_device.copy_(pinned, non_blocking=True)
    copied.record()
    return on_device


def adopt(tensor: torch.Tensor) -> None:
    """Rule 1: make a CUDA tensor from another stream safe to read on this thread's stream."""
    current = torch.cuda.current_stream(tensor.device)
    producer = torch.cuda.default_stream(tensor.device)
    if current != producer:
        current.wait_stream(producer)
        tensor.record_stream(current)


def _uint8_hwc_to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.permute(2, 0, 1)[None].to(torch.float32).div_(255)


# -- colour -----------------------------------------------------------------------------------
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
    r_v, g_u, g_v, b_u = YUV_TO_RGB[matrix]
    rgb = torch.cat((luma + r_v * cr, luma + g_u * cb + g_v * cr, luma + b_u * cb), dim=1)
    return rgb.clamp_(0, 1)


def rgb_to_yuv420(tensor: torch.Tensor) -> torch.Tensor:
    """yuv420p planes of a float [0, 1] RGB tensor (H, W even), in PyAV's array layout
    (H * 3 / 2, W) uint8, computed where the tensor is.

    BT.601, limited range (what decoders assume for untagged video, as libswscale makes it);
    chroma is the mean of each 2x2 block.
    """
    rgb = (tensor if tensor.dim() == 4 else tensor[None]).clamp(0, 1).permute(0, 3, 1, 2)
    rgb = rgb.to(torch.float32)
    height, width = rgb.shape[-2:]
    weights = constant("rgb_to_yuv_bt601", RGB_TO_YUV_BT601, rgb.device, torch.float32)
    luma = torch.einsum("c,nchw->hw", weights[0], rgb) * 219 + 16
    blocks = F.avg_pool2d(rgb, 2)[0]
    chroma = torch.einsum("kc,chw->khw", weights[1:], blocks) * 224 + 128
    planes = torch.cat((luma.reshape(-1), chroma.reshape(-1)))
    return planes.round_().clamp_(0, 255).to(torch.uint8).view(height * 3 // 2, width)


def to_output_images(decoded: torch.Tensor) -> list[torch.Tensor]:
    """VAE output (B, 3, H, W) in [-1, 1] -> B float32 images (1, H, W, 3) in [0, 1], the
    frame contract (and ai-runner's: the same dtype as its input tensors)."""
    images = (decoded.to(torch.float32) / 2 + 0.5).clamp_(0, 1).permute(0, 2, 3, 1)
    return list(images.tensor_split(images.shape[0]))


def resize_tensor(tensor: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A (H, W, 3) or (1, H, W, 3) RGB tensor resized bilinearly where it is."""
    batched = tensor if tensor.dim() == 4 else tensor[None]
    chw = batched.permute(0, 3, 1, 2)
    out = F.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False)
    out = out.permute(0, 2, 3, 1)
    return out if tensor.dim() == 4 else out[0]


# -- device -> host ---------------------------------------------------------------------------
def download(pixels: torch.Tensor) -> npt.NDArray[np.uint8]:
    """A uint8 tensor on the host (rule 4: one wait, for this copy's event).

    From CUDA the result is the thread's pinned buffer, valid until the second next download
    of the same shape (callers copy it: ``av.VideoFrame.from_ndarray`` does).
    """
    if pixels.device.type != "cuda":
        return np.ascontiguousarray(pixels.numpy())
    host, copied = pinned_pool().take("download", tuple(pixels.shape))
    host.copy_(pixels, non_blocking=True)
    copied.record()
    copied.synchronize()
    return cast(npt.NDArray[np.uint8], host.numpy())


def _rgb_uint8(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 4:
        tensor = tensor[0]
    return (tensor.clamp(0, 1) * 255).round_().to(torch.uint8)


def tensor_to_rgb_array(tensor: torch.Tensor) -> RgbArray:
    """uint8 RGB (H, W, 3) of a float [0, 1] tensor, a copy of its own on the host."""
    return download(_rgb_uint8(tensor)).copy()


def tensor_to_video_frame(tensor: torch.Tensor) -> av.VideoFrame:
    """A CUDA tensor of even size becomes yuv420p on the device; others become rgb24."""
    width, height = image_size(tensor)
    if tensor.device.type == "cuda" and width % 2 == 0 and height % 2 == 0:
        return av.VideoFrame.from_ndarray(download(rgb_to_yuv420(tensor)), format="yuv420p")
    return av.VideoFrame.from_ndarray(download(_rgb_uint8(tensor)), format="rgb24")


# -- hand-offs across streams and threads -----------------------------------------------------
def mark_ready(image: Image) -> Any:
    """Rule 2, producer side: an event recorded on this thread's stream after the kernels that
    wrote a CUDA tensor ``image``; None for anything else (nothing to wait for)."""
    if not isinstance(image, torch.Tensor) or not image.is_cuda:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(image.device))
    return event


def wait_ready(image: Image, ready: Any) -> None:
    """Rule 2, consumer side: this thread's stream waits for ``ready`` (on the GPU) and the
    tensor's memory stays reserved until the work this stream queues on it is done."""
    if ready is None or not isinstance(image, torch.Tensor) or not image.is_cuda:
        return
    stream = torch.cuda.current_stream(image.device)
    stream.wait_event(ready)
    image.record_stream(stream)
