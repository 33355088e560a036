"""Frame numbers drawn into the pixels, readable after a lossy codec round trip.

The code is two rows of 16 square cells along the top of the picture: the first row holds the
number's bits (most significant first, white = 1), the second the same bits inverted, so a
misread cell is caught. Cells are big and flat (32 px at 512 wide), which VP8 and H.264 keep
intact at any sane bitrate. Reading looks only at the luma of each cell's middle.
"""

from __future__ import annotations

import av
import numpy as np
import numpy.typing as npt

BITS = 16
LIMIT = 1 << BITS
BLACK, WHITE = 16, 235


def cell_size(width: int) -> int:
    return width // BITS


class Scene:
    """A moving picture (diagonal bands drifting right) to give the codec real work."""

    PERIOD = 151  # pixels after which the band pattern repeats horizontally

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        ys, xs = np.mgrid[0:height, 0 : width + self.PERIOD]
        bands = (np.sin((xs + ys) * (2 * np.pi / self.PERIOD)) + 1.0) * 0.5
        self._pattern = (40 + bands * 150).astype(np.uint8)

    def luma(self, number: int) -> npt.NDArray[np.uint8]:
        shift = (number * 5) % self.PERIOD
        window: npt.NDArray[np.uint8] = self._pattern[:, shift : shift + self.width].copy()
        return window


def draw_code(luma: npt.NDArray[np.uint8], number: int) -> None:
    """Draw ``number`` (mod 2**16) into the top rows of a luma plane, in place."""
    size = cell_size(luma.shape[1])
    value = number % LIMIT
    for bit in range(BITS):
        on = (value >> (BITS - 1 - bit)) & 1
        x0 = bit * size
        luma[0:size, x0 : x0 + size] = WHITE if on else BLACK
        luma[size : 2 * size, x0 : x0 + size] = BLACK if on else WHITE


def read_code(luma: npt.NDArray[np.uint8]) -> int | None:
    """The number drawn by :func:`draw_code`, or None when the code does not check out."""
    size = cell_size(luma.shape[1])
    if size < 4 or luma.shape[0] < 2 * size:
        return None
    inner = slice(size // 4, size - size // 4)
    value = 0
    for bit in range(BITS):
        x0 = bit * size
        cell = luma[0:size, x0 : x0 + size][inner, inner]
        check = luma[size : 2 * size, x0 : x0 + size][inner, inner]
        on, check_on = cell.mean() > 128, check.mean() > 128
        if on == check_on:
            return None
        value = (value << 1) | int(on)
    return value


def numbered_frame(number: int, scene: Scene) -> av.VideoFrame:
    """A yuv420p frame of ``scene`` with ``number`` drawn in it."""
    luma = scene.luma(number)
    draw_code(luma, number)
    chroma = np.full((scene.height // 2, scene.width), 128, dtype=np.uint8)
    return av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")


def frame_luma(frame: av.VideoFrame) -> npt.NDArray[np.uint8]:
    """The luma plane of a frame (converted to yuv420p if it is in another format)."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), dtype=np.uint8)
    return rows.reshape(plane.height, plane.line_size)[:, : plane.width]


def read_frame_number(frame: av.VideoFrame) -> int | None:
    return read_code(frame_luma(frame))
