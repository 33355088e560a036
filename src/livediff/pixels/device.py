"""Pixels onto the device and back: one copy each way, colour conversion and resize there.

A WebRTC frame arrives as yuv420p. Its planes are copied straight from PyAV's buffers into a
pinned host buffer (1.5 bytes a pixel instead of 3 for RGB, and no intermediate array), go to
the device ``non_blocking`` on the worker's CUDA stream, and the YUV -> RGB conversion and the
resize to the session's size run there. RGB arrays take the same pinned route; tensors (the
ai-runner path) are used where they already are. Outputs come back the same way reversed:
RGB -> yuv420p on the device, one copy into a pinned buffer. On the CPU the same code runs
without pinning.

The ordering rule (every tensor that crosses a CUDA stream or a thread):

1. A tensor made on another CUDA stream (ai-runner's frames, copied on the default one) is
   *adopted* before the worker reads it: the worker's CUDA stream waits for the producer's (on
   the GPU; the host does not block) and ``record_stream`` keeps its memory from being reused
   until the worker's CUDA stream is done with it (:func:`adopt`).
2. A CUDA tensor the worker hands to another thread or CUDA stream (ai-runner's output) travels
   with an event recorded on the worker's CUDA stream after the kernels that wrote it
   (:func:`mark_ready`); the consumer makes its own CUDA stream wait for that event and records
   that CUDA stream on the tensor before reading it (:func:`wait_ready`).
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
from dataclasses import dataclass
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
#: Most buffers of one shape in flight at once (more outputs of one size per batch wait).
MAX_IN_FLIGHT = 8

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
    """Pinned host buffers for copies to and from one thread's CUDA stream.

    Buffers are kept per (direction, shape), two per key used in turn, each with the event of
    the last copy that used it; at most ``capacity`` keys are kept (least recently used go).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rings: OrderedDict[tuple[str, tuple[int, ...]], _Ring] = OrderedDict()

    def take(self, direction: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.cuda.Event]:
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
    """The buffers of one key, used in turn; a new one is added (up to ``MAX_IN_FLIGHT``)
    rather than waiting when the next one's copy is still queued (a batch of several outputs
    of one size)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._slots: list[tuple[torch.Tensor, torch.cuda.Event]] = [self._new() for _ in range(2)]
        self._turn = 0

    def _new(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        buffer = torch.empty(self._shape, dtype=torch.uint8, pin_memory=True)
        return buffer, torch.cuda.Event()  # type: ignore[no-untyped-call]

    def next(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        buffer, event = self._slots[self._turn]
        busy = not event.query()  # type: ignore[no-untyped-call]
        if busy and len(self._slots) < MAX_IN_FLIGHT:
            self._slots.insert(self._turn, self._new())
            buffer, event = self._slots[self._turn]
        self._turn = (self._turn + 1) % len(self._slots)
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
@dataclass
class StagedUpload:
    """Pixels already copied (or being copied) onto the device on the uploader's CUDA copy
    stream."""

    planes: torch.Tensor
    ready: torch.cuda.Event  # the copy's event: the compute CUDA stream waits for it (rule 2)
    width: int
    height: int
    yuv: bool
    full_range: bool = False
    matrix: str = "bt601"


class FrameUploader:
    """Any supported image -> (1, 3, height, width) tensor in [-1, 1] on the device.

    :meth:`stage` starts the copy of the next batch's pixels on a CUDA copy stream of its own,
    so that it overlaps the batch in flight; the call then only converts on the compute CUDA
    stream.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._cuda_copy_stream: torch.cuda.Stream | None = None

    def stage(self, image: Image) -> StagedUpload | None:
        """Queue ``image``'s copy to the device on the CUDA copy stream; None where there is
        nothing to overlap (the CPU, or a tensor already on the device)."""
        if self.device.type != "cuda" or not isinstance(image, av.VideoFrame | np.ndarray):
            return None
        if self._cuda_copy_stream is None:
            self._cuda_copy_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        cuda_copy_stream = self._cuda_copy_stream
        if isinstance(image, np.ndarray):
            planes = upload_array(image, self.device, cuda_copy_stream)
            return StagedUpload(
                planes, planes_ready(cuda_copy_stream), image.shape[1], image.shape[0], yuv=False
            )
        if not _is_even_yuv420(image):
            rgb = cast(RgbArray, image.to_ndarray(format="rgb24"))
            planes = upload_array(rgb, self.device, cuda_copy_stream)
            return StagedUpload(
                planes, planes_ready(cuda_copy_stream), image.width, image.height, yuv=False
            )
        planes = upload_yuv420(image, self.device, cuda_copy_stream)
        full_range, matrix = _colour(image)
        return StagedUpload(
            planes,
            planes_ready(cuda_copy_stream),
            image.width,
            image.height,
            True,
            full_range,
            matrix,
        )

    def __call__(
        self, image: Image, width: int, height: int, staged: StagedUpload | None = None
    ) -> torch.Tensor:
        rgb = self.rgb(image) if staged is None else self._staged_rgb(staged)
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

    def _staged_rgb(self, staged: StagedUpload) -> torch.Tensor:
        compute_cuda_stream = torch.cuda.current_stream(self.device)
        compute_cuda_stream.wait_event(staged.ready)
        staged.planes.record_stream(compute_cuda_stream)
        if not staged.yuv:
            return _uint8_hwc_to_float(staged.planes)
        return yuv420_to_rgb(
            staged.planes, staged.width, staged.height, staged.full_range, staged.matrix
        )

    def _video_frame(self, frame: av.VideoFrame) -> torch.Tensor:
        if _is_even_yuv420(frame):
            planes = upload_yuv420(frame, self.device)
            full_range, matrix = _colour(frame)
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


def _is_even_yuv420(frame: av.VideoFrame) -> bool:
    name = frame.format.name
    return name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0


def _colour(frame: av.VideoFrame) -> tuple[bool, str]:
    """(full range, matrix) of a yuv frame, as its tags say (untagged: limited BT.601)."""
    full_range = frame.format.name == "yuvj420p" or frame.color_range == FULL_RANGE
    return full_range, "bt709" if frame.colorspace == BT709 else "bt601"


def planes_ready(cuda_stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``cuda_stream`` now (after the copies queued on it)."""
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(cuda_stream)
    return event


def upload_yuv420(
    frame: av.VideoFrame, device: torch.device, cuda_stream: torch.cuda.Stream | None = None
) -> torch.Tensor:
    """A yuv420p frame's planes as a (H * 3 / 2, W) uint8 tensor on ``device`` (queued on
    ``cuda_stream``, default the current one)."""
    shape = (frame.height * 3 // 2, frame.width)
    if device.type != "cuda":
        host = np.empty(shape, dtype=np.uint8)
        copy_yuv420_planes(frame, host)
        return torch.from_numpy(host)
    pinned, copied = pinned_pool().take("upload", shape)
    copy_yuv420_planes(frame, pinned.numpy())
    return _to_device(pinned, copied, device, cuda_stream)


def upload_array(
    array: npt.NDArray[np.uint8], device: torch.device, cuda_stream: torch.cuda.Stream | None = None
) -> torch.Tensor:
    """A uint8 array as a tensor on ``device`` (queued on ``cuda_stream``, not waited for)."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(array))
    pinned, copied = pinned_pool().take("upload", tuple(array.shape))
    pinned.numpy()[...] = array
    return _to_device(pinned, copied, device, cuda_stream)


def _to_device(
    pinned: torch.Tensor,
    copied: torch.cuda.Event,
    device: torch.device,
    cuda_stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    target = cuda_stream if cuda_stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(target):
        on_device = torch.empty(pinned.shape, dtype=torch.uint8, device=device)
        on_device.copy_(pinned, non_blocking=True)
        copied.record(target)
    return on_device


def adopt(tensor: torch.Tensor) -> None:
    """Rule 1: make a CUDA tensor from another CUDA stream safe to read on this thread's."""
    this_cuda_stream = torch.cuda.current_stream(tensor.device)
    producer_cuda_stream = torch.cuda.default_stream(tensor.device)
    if this_cuda_stream != producer_cuda_stream:
        this_cuda_stream.wait_stream(producer_cuda_stream)
        tensor.record_stream(this_cuda_stream)


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


# -- hand-offs across CUDA streams and threads ------------------------------------------------
def mark_ready(image: Image) -> torch.cuda.Event | None:
    """Rule 2, producer side: an event recorded on this thread's CUDA stream after the kernels that
    wrote a CUDA tensor ``image``; None for anything else (nothing to wait for)."""
    if not isinstance(image, torch.Tensor) or not image.is_cuda:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(image.device))
    return event


def wait_ready(image: Image, ready: torch.cuda.Event | None) -> None:
    """Rule 2, consumer side: this thread's CUDA stream waits for ``ready`` (on the GPU) and the
    tensor's memory stays reserved until the work this CUDA stream queues on it is done."""
    if ready is None or not isinstance(image, torch.Tensor) or not image.is_cuda:
        return
    cuda_stream = torch.cuda.current_stream(image.device)
    cuda_stream.wait_event(ready)
    image.record_stream(cuda_stream)


class BatchDownloads:
    """A batch's outputs on their way back: yuv420p planes copied into pinned buffers, and one
    event after everything the batch queued (compute and copies alike)."""

    def __init__(self, images: list[Image | None], pending: list[tuple[int, torch.Tensor]]) -> None:
        self.images = images
        self.pending = pending
        self.done: torch.cuda.Event | None = None
        devices = {
            image.device for image in images if isinstance(image, torch.Tensor) and image.is_cuda
        }
        if devices:
            self.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.done.record(torch.cuda.current_stream(next(iter(devices))))

    def finish(self) -> list[Image | None]:
        """Wait once (rule 4), then make the video frames (``from_ndarray`` copies the pixels
        out of the pinned buffers, which may then be reused)."""
        if self.done is not None:
            self.done.synchronize()
        images = list(self.images)
        for index, host in self.pending:
            images[index] = av.VideoFrame.from_ndarray(host.numpy(), format="yuv420p")
        return images


def start_downloads(images: list[Image | None], wanted: list[bool]) -> BatchDownloads:
    """Queue the download of every CUDA tensor output of even size whose consumer ``wanted``
    video frames, as yuv420p made on the device (half the bytes of RGB)."""
    pending: list[tuple[int, torch.Tensor]] = []
    for index, (image, wants) in enumerate(zip(images, wanted, strict=True)):
        if not (wants and isinstance(image, torch.Tensor) and image.is_cuda):
            continue
        width, height = image_size(image)
        if width % 2 or height % 2:
            continue
        planes = rgb_to_yuv420(image)
        host, copied = pinned_pool().take("download", tuple(planes.shape))
        host.copy_(planes, non_blocking=True)
        copied.record()
        pending.append((index, host))
    return BatchDownloads(images, pending)
