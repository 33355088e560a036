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
   until the worker's CUDA stream is done with it (:func:`adopt`). *Before* means before any
   op: ``Session.next_job`` adopts a frame before it scales a large one down.
2. A CUDA tensor the worker hands to another thread or CUDA stream (ai-runner's output) travels
   with an event recorded on the worker's CUDA stream after the kernels that wrote it
   (:func:`mark_ready`); the consumer makes its own CUDA stream wait for that event and records
   that CUDA stream on the tensor before reading it (:func:`wait_ready`).
3. A pinned staging buffer is leased (:class:`PinnedPool`): it is filled again only after it
   was given back *and* the event of the last copy that used it has completed. An upload gives
   it back once its copy is queued; a download only after its pixels were read on the host
   (:meth:`BatchDownloads.finish`), so a buffer never carries two frames at once, however many
   outputs of one size a batch has. Filling one buffer overlaps the copy out of another.
4. A host array read after a device-to-host copy is read after that copy's event completed
   (:func:`download`, :meth:`BatchDownloads.finish`): one wait per batch, nothing else
   synchronises the device.

Constants (colour matrices, kernels, row indices) come from :func:`constant`: made once per
value and device from pinned memory, so building them never waits for the device.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import av
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from livediff.frames import Image, RgbArray, image_size

_T = TypeVar("_T")

#: AVColorRange value for full-range ("JPEG") YUV.
FULL_RANGE = 2
#: AVColorSpace value for BT.709.
BT709 = 1
#: Pinned buffers a thread keeps when no worker configured its pool (tests, tools).
DEFAULT_PINNED_BUFFERS = 8
#: Most unleased buffers of one shape with copies still queued (past it, the oldest is waited
#: for); leased ones (the downloads of the batches in flight, at most batches_in_flight x
#: max_batch) never count.
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
class CopyEvent(Protocol):
    """What the pool needs of a copy's event: ``torch.cuda.Event``, or on the host a
    :class:`HostEvent` (tests may pass a double that completes later)."""

    def record(self, stream: Any = None) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class HostEvent:
    """The event of a copy between host buffers: complete once queued (a CPU copy is done when
    ``copy_`` returns), so the pool's rules read the same on the CPU as on a GPU."""

    def record(self, stream: Any = None) -> None:
        """Nothing to record: the copy has already happened."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        """Nothing to wait for."""


def _cuda_event() -> CopyEvent:
    return cast(CopyEvent, torch.cuda.Event())  # type: ignore[no-untyped-call]


class PinnedLease:
    """One staging buffer, leased to a copy (and, for a download, to the reader of its
    pixels) until :meth:`release`; ``copied`` is the event of the last copy that used it."""

    __slots__ = ("buffer", "copied", "leased")

    def __init__(self, buffer: torch.Tensor, copied: CopyEvent) -> None:
        self.buffer = buffer
        self.copied = copied
        self.leased = False

    def release(self) -> None:
        """The holder is done with the buffer; it is reused once ``copied`` has completed."""
        self.leased = False


class PinnedPool:
    """Pinned host buffers for copies to and from one thread's CUDA streams.

    Buffers are kept per (direction, shape), at most ``capacity`` keys (least recently used
    go). A buffer is taken as a lease: an upload gives it back as soon as its copy is queued,
    a batch of downloads when its pixels have been read (:meth:`BatchDownloads.finish`). A
    buffer is handed out again only when it is not leased and its last copy has completed
    (rules 3 and 4), so a batch with more outputs of one size than the pool holds gets new
    buffers instead of someone else's.

    ``device_type`` "cpu" keeps plain host buffers with :class:`HostEvent` s (the same rules,
    for tests and tools); ``new_event`` replaces the event type (a test's fake device).
    """

    def __init__(
        self,
        capacity: int,
        device_type: str = "cuda",
        new_event: Callable[[], CopyEvent] | None = None,
    ) -> None:
        self.capacity = capacity
        self._pinned = device_type == "cuda"
        default_event = _cuda_event if self._pinned else HostEvent
        self._new_event: Callable[[], CopyEvent] = new_event or default_event
        self._rings: OrderedDict[tuple[str, tuple[int, ...]], _Ring] = OrderedDict()

    def take(self, direction: str, shape: tuple[int, ...]) -> PinnedLease:
        """A uint8 buffer of ``shape`` no copy or reader still uses, leased to the caller."""
        key = (direction, shape)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(shape, self._pinned, self._new_event)
            if len(self._rings) > self.capacity:
                self._rings.popitem(last=False)
        self._rings.move_to_end(key)
        return ring.take()

    def new_event(self) -> CopyEvent:
        """An event of the kind this pool's copies record."""
        return self._new_event()

    def buffers(self, direction: str, shape: tuple[int, ...]) -> int:
        """How many buffers the pool holds for this key (for tests and diagnostics)."""
        ring = self._rings.get((direction, shape))
        return 0 if ring is None else len(ring.slots)


class _Ring:
    """The buffers of one key, least recently taken first.

    A free buffer (not leased, its copy complete) is reused; else a new one is made, unless
    ``MAX_IN_FLIGHT`` unleased buffers still have copies queued, and then the oldest of them
    is waited for. Leased buffers never count against that bound and are never waited for:
    there are at most as many as the batches in flight have outputs of this size
    (``batches_in_flight x max_batch``)."""

    def __init__(
        self, shape: tuple[int, ...], pinned: bool, new_event: Callable[[], CopyEvent]
    ) -> None:
        self._shape = shape
        self._pinned = pinned
        self._new_event = new_event
        self.slots: list[PinnedLease] = []

    def take(self) -> PinnedLease:
        found = next((s for s in self.slots if not s.leased and s.copied.query()), None)
        if found is None:
            found = self._new_or_oldest_idle()
        self.slots.remove(found)
        self.slots.append(found)
        found.leased = True
        return found

    def _new_or_oldest_idle(self) -> PinnedLease:
        idle = [slot for slot in self.slots if not slot.leased]
        if len(idle) < MAX_IN_FLIGHT:
            buffer = torch.empty(self._shape, dtype=torch.uint8, pin_memory=self._pinned)
            slot = PinnedLease(buffer, self._new_event())
            self.slots.append(slot)
            return slot
        idle[0].copied.synchronize()  # the last copy that used this buffer has finished
        return idle[0]


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
class _Constant:
    """A constant on its device, with the event of its upload and the CUDA stream it was
    queued on (None on the CPU)."""

    __slots__ = ("cuda_stream", "ready", "tensor")

    def __init__(self, values: Any, device: torch.device, dtype: torch.dtype) -> None:
        host = torch.tensor(values, dtype=dtype)
        self.ready: CopyEvent | None = None
        self.cuda_stream: torch.cuda.Stream | None = None
        if device.type != "cuda":
            self.tensor = host.to(device)
            return
        # pinned and non_blocking: queued on this thread's CUDA stream, no wait for the device
        self.tensor = host.pin_memory().to(device, non_blocking=True)
        self.cuda_stream = torch.cuda.current_stream(device)
        self.ready = _cuda_event()
        self.ready.record(self.cuda_stream)

    def ordered(self) -> torch.Tensor:
        """The tensor, safe to read on this thread's CUDA stream (rule 1 for a tensor made on
        another one: wait for its upload on the GPU, and keep its memory until this CUDA
        stream's work on it is done)."""
        if self.cuda_stream is None or self.ready is None:
            return self.tensor
        current = torch.cuda.current_stream(self.tensor.device)
        if current != self.cuda_stream:
            current.wait_event(cast(torch.cuda.Event, self.ready))
            self.tensor.record_stream(current)
        return self.tensor


class DeviceConstants:
    """Small constant tensors (colour matrices, kernels, ControlNet row indices and scales),
    one per (values, device, dtype), made once and then reused.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory and so waits for every
    kernel queued on the CUDA stream: a host wait per call. A cached constant is made once,
    from pinned memory without a wait, and a batch that needs the same values again finds it
    here. At most ``capacity`` are kept (least recently used go); ``misses`` counts the ones
    made.
    """

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self.misses = 0
        self._entries: OrderedDict[tuple[Any, ...], _Constant] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, values: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``values`` (numbers or nested sequences of them) as a tensor on ``device``."""
        key = (_frozen(values), device, dtype)
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                found = self._entries[key] = _Constant(values, device, dtype)
                self.misses += 1
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
        return found.ordered()


def _frozen(values: Any) -> Any:
    """``values`` with every sequence a tuple (hashable, equal for equal numbers)."""
    if isinstance(values, list | tuple):
        return tuple(_frozen(value) for value in values)
    return values


#: The process's constants (keyed by device, so every worker shares it safely).
constants = DeviceConstants()


def constant(values: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once per (values, device, dtype) and reused
    (see :class:`DeviceConstants`). Read-only: every caller shares it."""
    return constants.get(values, device, dtype)


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
    lease = pinned_pool().take("upload", shape)
    copy_yuv420_planes(frame, lease.buffer.numpy())
    return _to_device(lease, device, cuda_stream)


def upload_array(
    array: npt.NDArray[np.uint8], device: torch.device, cuda_stream: torch.cuda.Stream | None = None
) -> torch.Tensor:
    """A uint8 array as a tensor on ``device`` (queued on ``cuda_stream``, not waited for)."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(array))
    lease = pinned_pool().take("upload", tuple(array.shape))
    lease.buffer.numpy()[...] = array
    return _to_device(lease, device, cuda_stream)


def _to_device(
    lease: PinnedLease, device: torch.device, cuda_stream: torch.cuda.Stream | None = None
) -> torch.Tensor:
    """Queue the copy of a filled upload buffer and give the buffer back (rule 3: the pool
    hands it out again only after this copy's event)."""
    target = cuda_stream if cuda_stream is not None else torch.cuda.current_stream(device)
    with torch.cuda.stream(target):
        on_device = torch.empty(lease.buffer.shape, dtype=torch.uint8, device=device)
        on_device.copy_(lease.buffer, non_blocking=True)
        lease.copied.record(target)
    lease.release()
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
    weights = constant(RGB_TO_YUV_BT601, rgb.device, torch.float32)
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
    """A uint8 tensor on the host, as an array of its own (rule 4: one wait, for this copy's
    event)."""
    return _downloaded(pixels, np.array)


def _downloaded(pixels: torch.Tensor, read: Callable[[npt.NDArray[np.uint8]], _T]) -> _T:
    """``read(host pixels)``: from CUDA through a pinned buffer leased until ``read`` returns
    (``read`` copies what it keeps: ``np.array``, ``av.VideoFrame.from_ndarray``)."""
    if pixels.device.type != "cuda":
        return read(np.ascontiguousarray(pixels.numpy()))
    lease = pinned_pool().take("download", tuple(pixels.shape))
    try:
        lease.buffer.copy_(pixels, non_blocking=True)
        lease.copied.record()
        lease.copied.synchronize()
        return read(cast(npt.NDArray[np.uint8], lease.buffer.numpy()))
    finally:
        lease.release()


def _rgb_uint8(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 4:
        tensor = tensor[0]
    return (tensor.clamp(0, 1) * 255).round_().to(torch.uint8)


def tensor_to_rgb_array(tensor: torch.Tensor) -> RgbArray:
    """uint8 RGB (H, W, 3) of a float [0, 1] tensor, a copy of its own on the host."""
    return download(_rgb_uint8(tensor))


def tensor_to_video_frame(tensor: torch.Tensor) -> av.VideoFrame:
    """A CUDA tensor of even size becomes yuv420p on the device; others become rgb24."""
    width, height = image_size(tensor)
    if tensor.device.type == "cuda" and width % 2 == 0 and height % 2 == 0:
        return _downloaded(rgb_to_yuv420(tensor), _video_frame("yuv420p"))
    return _downloaded(_rgb_uint8(tensor), _video_frame("rgb24"))


def _video_frame(pixel_format: str) -> Callable[[npt.NDArray[np.uint8]], av.VideoFrame]:
    def read(pixels: npt.NDArray[np.uint8]) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(pixels, format=pixel_format)  # copies the pixels

    return read


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
    """A batch's outputs on their way back: yuv420p planes copied into leased pinned buffers,
    and one event after everything the batch queued (compute and copies alike).

    The buffers stay leased until :meth:`finish` has read them (or, should it never run, until
    this object is collected: the pool then reuses them only after their copies completed),
    so no other copy can land in a buffer before its pixels reached their session.
    """

    def __init__(
        self,
        images: list[Image | None],
        pending: list[tuple[int, PinnedLease]],
        done: CopyEvent | None,
    ) -> None:
        """``done``: recorded after everything the batch queued (None: nothing to wait for)."""
        self.images = images
        self.pending = pending
        self.done = done
        self._release = weakref.finalize(self, _release_all, [lease for _, lease in pending])

    def finish(self) -> list[Image | None]:
        """Wait once (rule 4), then make the video frames (``from_ndarray`` copies the pixels
        out of the pinned buffers), then give the buffers back."""
        if self.done is not None:
            self.done.synchronize()
        images = list(self.images)
        try:
            for index, lease in self.pending:
                images[index] = av.VideoFrame.from_ndarray(lease.buffer.numpy(), format="yuv420p")
        finally:
            self._release()
        return images


def _release_all(leases: list[PinnedLease]) -> None:
    for lease in leases:
        lease.release()


def start_downloads(images: list[Image | None], wanted: list[bool]) -> BatchDownloads:
    """Queue the download of every CUDA tensor output of even size whose consumer ``wanted``
    video frames, as yuv420p made on the device (half the bytes of RGB)."""
    chosen = [
        index
        for index, (image, wants) in enumerate(zip(images, wanted, strict=True))
        if wants and _downloadable(image)
    ]
    return queue_downloads(images, chosen, pinned_pool())


def _downloadable(image: Image | None) -> bool:
    if not (isinstance(image, torch.Tensor) and image.is_cuda):
        return False
    width, height = image_size(image)
    return width % 2 == 0 and height % 2 == 0


def queue_downloads(
    images: list[Image | None], chosen: list[int], pool: PinnedPool
) -> BatchDownloads:
    """For each chosen output (a tensor of even size): yuv420p planes made where it is, a
    buffer leased from ``pool``, the copy queued and its event recorded. Nothing waits here;
    the device part of :func:`start_downloads`, apart so that a CPU pool can run it."""
    pending: list[tuple[int, PinnedLease]] = []
    for index in chosen:
        image = images[index]
        assert isinstance(image, torch.Tensor)
        planes = rgb_to_yuv420(image)
        lease = pool.take("download", tuple(planes.shape))
        lease.buffer.copy_(planes, non_blocking=True)
        lease.copied.record()
        pending.append((index, lease))
    return BatchDownloads(images, pending, _batch_done(images, pending, pool))


def _batch_done(
    images: list[Image | None], pending: list[tuple[int, PinnedLease]], pool: PinnedPool
) -> CopyEvent | None:
    """The event :meth:`BatchDownloads.finish` waits for: on the CUDA stream of the outputs'
    device when any output is a CUDA tensor (so the worker's ``finished`` counts the GPU's
    time), else after the pool's copies when there are any."""
    devices = {
        image.device for image in images if isinstance(image, torch.Tensor) and image.is_cuda
    }
    if not devices and not pending:
        return None
    done = pool.new_event()
    done.record(torch.cuda.current_stream(next(iter(devices))) if devices else None)
    return done
