"""How large a peer's video is, read from the bitstream before anything decodes it.

aiortc's decoders allocate their pictures at whatever size the peer's stream declares, long
before livediff scales a frame down to ``max_input_pixels``: a hostile peer could make the server
allocate 8K (or VP8's largest, 16383x16383) pictures for every frame. The size is in the first
bytes of every frame that can change it, so it is read there, on the event loop, from each
complete frame the marker-aware jitter buffer (:mod:`livediff.media.jitter`) releases, and a
frame over ``max_decode_pixels`` never reaches the decoder (:class:`DecodeSizeGuard`).

Two readers, each checked against real encoders' output (``tests/media/test_frame_size.py``):

- VP8 (RFC 6386 9.1): a key frame (bit 0 of the 3-byte frame tag clear) carries the start code
  ``9d 01 2a`` and then 14-bit width and height (the top 2 bits of each are an upscaling hint);
  inter frames carry no size and keep the key frame's.
- H.264 (ITU-T H.264 7.3.2.1.1): the sequence parameter set (NAL unit type 7) has the size in
  16x16 macroblocks, in Exp-Golomb codes behind fields whose presence depends on the profile
  (chroma format, bit depths, scaling matrices) and the picture order count type; the decoder
  allocates the coded size (interlaced streams count map units of two macroblock rows), and the
  frame cropping in the SPS only says which part of it is shown. The NAL unit's emulation
  prevention bytes (``00 00 03``) are removed before it is read.

The limit applies to the coded size, what a decoder allocates: cropping cannot hide a large
picture. A key frame whose size cannot be read is refused too, as the decoder would refuse it
(libvpx and FFmpeg check the same start code and fields).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Frames dropped in a row after which the session is ended: a second of video at 30 fps. A
#: sender that lowers its resolution sends a key frame within the limit at once (a new size
#: always begins with one), so only a peer that keeps sending too large a picture gets there.
REFUSE_AFTER_FRAMES = 30
#: The drop stages (``livediff_frames_dropped_total{stage}``) of this module.
OVERSIZE = "oversize"
UNREADABLE = "size_unreadable"

_START_CODE = b"\x00\x00\x01"
_EMULATION_PREVENTION = b"\x00\x00\x03"
_NAL_SPS = 7
#: Longest SPS read: real ones are tens of bytes; any size field sits in the first few hundred.
_SPS_MAX_BYTES = 4096
#: profile_idc values whose SPS has chroma_format_idc, bit depths and scaling matrices.
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
#: (SubWidthC, SubHeightC) by chroma_format_idc (Table 6-1); 4:0:0 and separate planes: 1, 1.
_CHROMA_SUBSAMPLING = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}


class FrameHeaderError(ValueError):
    """A frame's size header cannot be read (truncated, or not what the codec requires)."""


@dataclass(frozen=True, slots=True)
class FrameSize:
    """The shown size of a stream's pictures and the coded size a decoder allocates."""

    width: int
    height: int
    coded_width: int
    coded_height: int

    @property
    def coded_pixels(self) -> int:
        return self.coded_width * self.coded_height

    def __str__(self) -> str:
        coded = f"{self.coded_width}x{self.coded_height}"
        shown = f"{self.width}x{self.height}"
        return shown if shown == coded else f"{shown} (coded {coded})"


def frame_size(codec: str, frame: bytes) -> FrameSize | None:
    """The size ``frame`` (a complete depayloaded frame of ``codec``, aiortc's codec name:
    ``VP8`` or ``H264``) declares; None when it declares none (it keeps the last one)."""
    if codec == "VP8":
        return vp8_frame_size(frame)
    if codec == "H264":
        return h264_frame_size(frame)
    raise FrameHeaderError(f"livediff reads no frame size from {codec or 'an unknown'} video")


# -- VP8 ------------------------------------------------------------------------------------


def vp8_frame_size(frame: bytes) -> FrameSize | None:
    """A VP8 key frame's size (RFC 6386 9.1); None for an inter frame."""
    if len(frame) < 3:
        raise FrameHeaderError(f"a VP8 frame of {len(frame)} bytes has no frame tag")
    if frame[0] & 1:  # frame type 1: an inter frame
        return None
    if len(frame) < 10:
        raise FrameHeaderError(f"a VP8 key frame of {len(frame)} bytes has no size")
    if frame[3:6] != b"\x9d\x01\x2a":
        raise FrameHeaderError(f"a VP8 key frame starts {frame[3:6].hex(' ')}, not 9d 01 2a")
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    if not width or not height:
        raise FrameHeaderError(f"a VP8 key frame of {width}x{height} pixels")
    return FrameSize(width, height, width, height)


# -- H.264 ----------------------------------------------------------------------------------


def h264_frame_size(access_unit: bytes) -> FrameSize | None:
    """The largest coded size of the SPSs in an Annex B access unit; None without an SPS."""
    sizes = [sps_frame_size(nal) for nal in _sps_units(access_unit)]
    return max(sizes, key=lambda size: size.coded_pixels, default=None)


def _sps_units(access_unit: bytes) -> Iterator[bytes]:
    """The SPS NAL units (header byte included) of an Annex B byte stream."""
    start = access_unit.find(_START_CODE)
    while start != -1:
        begin = start + len(_START_CODE)
        end = access_unit.find(_START_CODE, begin)
        if begin < len(access_unit) and access_unit[begin] & 0x1F == _NAL_SPS:
            yield access_unit[begin : len(access_unit) if end == -1 else end]
        start = end


def sps_frame_size(nal: bytes) -> FrameSize:
    """The size an SPS NAL unit (its one-byte header first) declares."""
    bits = _Bits(_rbsp(nal[1:_SPS_MAX_BYTES]))
    profile_idc = bits.read(8)
    bits.read(16)  # constraint_set flags, level_idc
    if bits.ue() > 31:
        raise FrameHeaderError("an SPS id over 31")
    chroma_format_idc, separate_planes = _chroma_format(bits, profile_idc)
    bits.ue()  # log2_max_frame_num_minus4
    _skip_pic_order_count(bits)
    bits.ue()  # max_num_ref_frames
    bits.read(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.read(1)
    if not frame_mbs_only:
        bits.read(1)  # mb_adaptive_frame_field_flag
    bits.read(1)  # direct_8x8_inference_flag
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.read(1) else (0, 0, 0, 0)
    coded_width = 16 * width_mbs
    coded_height = 16 * height_map_units * (2 - frame_mbs_only)
    chroma_array_type = 0 if separate_planes else chroma_format_idc
    sub_width, sub_height = _CHROMA_SUBSAMPLING[chroma_array_type]
    unit_x, unit_y = sub_width, sub_height * (2 - frame_mbs_only)
    return _cropped(coded_width, coded_height, crop, unit_x, unit_y)


def _chroma_format(bits: _Bits, profile_idc: int) -> tuple[int, bool]:
    """(chroma_format_idc, separate_colour_plane_flag), past the bit depths and scaling
    matrices that only the high profiles' SPSs carry."""
    if profile_idc not in _HIGH_PROFILES:
        return 1, False
    chroma_format_idc = bits.ue()
    if chroma_format_idc > 3:
        raise FrameHeaderError(f"chroma_format_idc {chroma_format_idc}")
    separate_planes = chroma_format_idc == 3 and bool(bits.read(1))
    bits.ue()  # bit_depth_luma_minus8
    bits.ue()  # bit_depth_chroma_minus8
    bits.read(1)  # qpprime_y_zero_transform_bypass_flag
    if bits.read(1):  # seq_scaling_matrix_present_flag
        for index in range(8 if chroma_format_idc != 3 else 12):
            if bits.read(1):  # seq_scaling_list_present_flag
                _skip_scaling_list(bits, 16 if index < 6 else 64)
    return chroma_format_idc, separate_planes


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = following = 8
    for _ in range(size):
        if following:
            following = (last + bits.se() + 256) % 256
        last = following or last


def _skip_pic_order_count(bits: _Bits) -> None:
    kind = bits.ue()  # pic_order_cnt_type
    if kind == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif kind == 1:
        bits.read(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()  # num_ref_frames_in_pic_order_cnt_cycle
        if cycle > 255:
            raise FrameHeaderError(f"a picture order count cycle of {cycle} frames")
        for _ in range(cycle):
            bits.se()  # offset_for_ref_frame
    elif kind != 2:
        raise FrameHeaderError(f"pic_order_cnt_type {kind}")


def _cropped(
    width: int, height: int, crop: tuple[int, int, int, int], unit_x: int, unit_y: int
) -> FrameSize:
    """The size shown after the SPS's frame cropping; cropping that leaves nothing is ignored,
    as FFmpeg ignores it, and the whole coded picture is shown."""
    left, right, top, bottom = crop
    shown_width = width - unit_x * (left + right)
    shown_height = height - unit_y * (top + bottom)
    if shown_width <= 0 or shown_height <= 0:
        return FrameSize(width, height, width, height)
    return FrameSize(shown_width, shown_height, width, height)


def _rbsp(payload: bytes) -> bytes:
    """A NAL unit's payload without its emulation prevention bytes (each 03 after 00 00)."""
    return payload.replace(_EMULATION_PREVENTION, _EMULATION_PREVENTION[:2])


class _Bits:
    """Reads an RBSP most significant bit first: fixed-width fields and Exp-Golomb codes."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8

    def read(self, count: int) -> int:
        if count > self._left:
            raise FrameHeaderError("the SPS ends before its frame size")
        self._left -= count
        return (self._value >> self._left) & ((1 << count) - 1)

    def ue(self) -> int:
        """An unsigned Exp-Golomb code (at most 32 bits of value, as the standard allows)."""
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros > 32:
                raise FrameHeaderError("an Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.read(zeros)

    def se(self) -> int:
        """A signed Exp-Golomb code: 1, -1, 2, -2, ... for 1, 2, 3, 4, ..."""
        code = self.ue()
        return (code + 1) // 2 if code % 2 else -(code // 2)


# -- the guard ------------------------------------------------------------------------------


class DecodeSizeGuard:
    """Lets a receiver's frames through to its decoder only while the stream's coded size is
    within ``max_pixels``.

    A key frame (VP8) or access unit with an SPS (H.264) over the limit, or one whose size
    cannot be read, is dropped, and so is every frame after it until one declares a size within
    the limit (they would be decoded as parts of the refused picture). Each drop is reported to
    ``on_drop(stage)`` (``oversize`` or ``size_unreadable``); after
    :data:`REFUSE_AFTER_FRAMES` in a row, ``on_refused(reason)`` is called once, with the size
    and the limit. Runs on the event loop, where aiortc hands packets to the jitter buffer.
    """

    def __init__(
        self,
        max_pixels: int,
        on_drop: Callable[[str], None],
        on_refused: Callable[[str], None],
        *,
        name: str = "a peer",
    ) -> None:
        self.max_pixels = max_pixels
        #: aiortc's codec name (``VP8``, ``H264``) of each payload type the peer sends, from
        #: negotiation (:meth:`use_codecs`).
        self.codecs: dict[int, str] = {}
        self._on_drop = on_drop
        self._on_refused = on_refused
        self._name = name
        self._blocked: tuple[str, str] | None = None  # (stage, what is wrong) while dropping
        self._dropped = 0
        self._refused = False

    def use_codecs(self, codecs: dict[int, str]) -> None:
        """The negotiated payload types and their codec names."""
        self.codecs = dict(codecs)

    def admit(self, payload_type: int, frame: bytes) -> bool:
        """Whether ``frame`` (complete and depayloaded, of ``payload_type``) may be decoded."""
        codec = self.codecs.get(payload_type, f"payload type {payload_type}")
        try:
            size = frame_size(codec, frame)
        except FrameHeaderError as exc:
            return self._drop(UNREADABLE, f"sends {codec} frames whose size is unreadable ({exc})")
        if size is None:
            return self._blocked is None or self._drop(*self._blocked)
        if size.coded_pixels > self.max_pixels:
            return self._drop(
                OVERSIZE,
                f"sends {size} video, {size.coded_pixels} pixels to decode, over the limit of"
                f" {self.max_pixels} (max_decode_pixels)",
            )
        if self._blocked is not None:
            logger.info("%s sends %s video again, within the limit", self._name, size)
        self._blocked, self._dropped = None, 0
        return True

    def _drop(self, stage: str, problem: str) -> bool:
        if self._blocked is None:
            logger.warning("%s %s: its frames are not decoded", self._name, problem)
        self._blocked = (stage, problem)
        self._dropped += 1
        self._on_drop(stage)
        if self._dropped >= REFUSE_AFTER_FRAMES and not self._refused:
            self._refused = True
            self._on_refused(f"the peer {problem}")
        return False
