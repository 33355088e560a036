"""Frame sizes read before decoding (issue 19): against real encoders' output (PyAV's libvpx and
libx264, in the profiles, chroma formats, bit depths and field modes they make), checked against
what FFmpeg's decoders report for the same bytes; then the guard that refuses what is too big."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from livediff.media import aiortc_private
from livediff.media.frame_size import (
    OVERSIZE,
    REFUSE_AFTER_FRAMES,
    UNREADABLE,
    DecodeSizeGuard,
    FrameHeaderError,
    FrameSize,
    frame_size,
    h264_frame_size,
    sps_frame_size,
    vp8_frame_size,
)
from livediff.media.jitter import MarkerJitterBuffer

X264 = {"preset": "veryfast", "tune": "zerolatency"}


def encode(
    codec: str, width: int, height: int, pixel_format: str = "yuv420p", **options: str
) -> list[bytes]:
    """Three frames of noise through ``codec``: a key frame, then inter frames."""
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = width, height, pixel_format
    context.time_base = Fraction(1, 30)
    context.options = options
    rng = np.random.default_rng(width * height)
    packets = []
    for index in range(3):
        rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pixel_format)
        frame.pts = index
        packets += context.encode(frame)
    packets += context.encode(None)
    return [bytes(packet) for packet in packets]


def decoded(decoder: str, data: bytes) -> FrameSize:
    """What FFmpeg's decoder makes of a key frame: the shown and the coded size."""
    context = av.CodecContext.create(decoder, "r")
    [frame] = context.decode(av.Packet(data)) + context.decode(None)
    return FrameSize(frame.width, frame.height, context.coded_width, context.coded_height)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (176, 144), (321, 241), (640, 360)])
def test_vp8_key_frames_give_the_size_libvpx_decodes(width: int, height: int) -> None:
    key, *inter = encode("libvpx", width, height)
    size = vp8_frame_size(key)
    assert size == FrameSize(width, height, width, height)
    assert (size.width, size.height) == (decoded("libvpx", key).width, decoded("vp8", key).height)
    assert inter and all(vp8_frame_size(frame) is None for frame in inter)


H264_CASES = [
    # (width, height, pixel format, x264 options): what each one exercises
    (64, 64, "yuv420p", {"preset": "ultrafast"}),  # constrained baseline: no chroma fields
    (176, 144, "yuv420p", X264),  # high profile, poc type 2, no cropping
    (1920, 1080, "yuv420p", X264),  # cropping: 1088 coded rows, 1080 shown
    (320, 240, "yuv420p", {"preset": "veryfast", "bf": "2"}),  # B-frames: poc type 0
    (322, 242, "yuv422p", X264),  # High 4:2:2: chroma_format_idc 2, crop unit 2x1
    (321, 241, "yuv444p", X264),  # High 4:4:4: odd sizes, crop unit 1x1
    (200, 120, "gray", X264),  # 4:0:0: chroma_format_idc 0
    (176, 144, "yuv420p10le", X264),  # High 10: bit depths present
    (320, 240, "yuv420p", {**X264, "x264-params": "interlaced=1"}),  # fields: 2 rows a map unit
    (320, 180, "yuv420p", {**X264, "x264-params": "cqm=jvt"}),  # scaling matrices in the SPS
]


@pytest.mark.parametrize(("width", "height", "pixel_format", "options"), H264_CASES)
def test_h264_sps_gives_the_size_ffmpeg_decodes(
    width: int, height: int, pixel_format: str, options: dict[str, str]
) -> None:
    key, *inter = encode("libx264", width, height, pixel_format, **options)
    size = h264_frame_size(key)
    assert size is not None
    assert size == decoded("h264", key)
    assert (size.width, size.height) == (width, height)
    assert size.coded_width % 16 == 0 and size.coded_height % 16 == 0
    assert inter and all(h264_frame_size(unit) is None for unit in inter)  # no SPS in them


def test_cropping_cannot_hide_the_coded_size() -> None:
    """An SPS of 8192x8192 macroblocks cropped to 16x16 allocates 8192x8192 all the same."""
    sps = sps_nal(width_mbs=512, height_units=512, crop=(0, 4088, 0, 4088))
    size = sps_frame_size(sps)
    assert (size.width, size.height) == (16, 16)
    assert size.coded_pixels == 8192 * 8192
    assert str(size) == "16x16 (coded 8192x8192)"


class BitWriter:
    """Writes an RBSP the way an encoder does: fields, Exp-Golomb codes, stop bit."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, count: int, value: int) -> BitWriter:
        self.bits += [(value >> shift) & 1 for shift in reversed(range(count))]
        return self

    def ue(self, value: int) -> BitWriter:
        code = value + 1
        return self.u(code.bit_length() - 1, 0).u(code.bit_length(), code)

    def se(self, value: int) -> BitWriter:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self) -> bytes:
        bits = [*self.bits, 1]
        bits += [0] * (-len(bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def with_emulation_prevention(rbsp: bytes) -> bytes:
    """A 03 after every two zero bytes that precede a byte of 00 to 03 (H.264 7.4.1)."""
    out = bytearray()
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def sps_nal(
    *,
    width_mbs: int,
    height_units: int,
    crop: tuple[int, int, int, int] = (0, 0, 0, 0),
    poc_cycle: list[int] | None = None,
) -> bytes:
    """A main-profile SPS (poc type 1 when ``poc_cycle`` is given), emulation prevented."""
    bits = BitWriter().u(8, 77).u(8, 0).u(8, 40).ue(0).ue(0)  # profile, flags, level, id, ...
    if poc_cycle is None:
        bits.ue(2)
    else:
        bits.ue(1).u(1, 0).se(-3).se(2).ue(len(poc_cycle))
        for offset in poc_cycle:
            bits.se(offset)
    bits.ue(1).u(1, 0).ue(width_mbs - 1).ue(height_units - 1).u(1, 1).u(1, 1)
    bits.u(1, int(any(crop)))
    if any(crop):
        for value in crop:
            bits.ue(value)
    return b"\x67" + with_emulation_prevention(bits.rbsp())


def test_poc_type_1_and_emulation_prevention() -> None:
    """What x264 never writes: a picture order count cycle, and sizes whose long runs of zero
    bits need emulation prevention bytes in the NAL unit."""
    nal = sps_nal(width_mbs=1 << 30, height_units=3, poc_cycle=[1, -1, 40])
    assert b"\x00\x00\x03" in nal  # 30 zero bits in a row in the width's code
    size = sps_frame_size(nal)
    assert (size.coded_width, size.coded_height) == (16 << 30, 48)
    annex_b = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x00\x01" + nal + b"\x00\x00\x01\x68\xce"
    assert h264_frame_size(annex_b) == size


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"\x10\x02", "no frame tag"),
        (b"\x10\x02\x00\x9d\x01", "has no size"),
        (b"\x10\x02\x00\x9d\x01\x2b\x40\x01\xf0\x00", "not 9d 01 2a"),
        (b"\x10\x02\x00\x9d\x01\x2a\x00\x00\xf0\x00", "0x240 pixels"),
    ],
)
def test_broken_vp8_key_frames_are_unreadable(frame: bytes, problem: str) -> None:
    with pytest.raises(FrameHeaderError, match=problem):
        vp8_frame_size(frame)


def test_truncated_and_nonsense_sps_are_unreadable() -> None:
    whole = sps_nal(width_mbs=20, height_units=15)
    with pytest.raises(FrameHeaderError, match="ends before"):
        sps_frame_size(whole[:5])
    with pytest.raises(FrameHeaderError, match="Exp-Golomb"):
        sps_frame_size(b"\x67\x4d\x00\x28" + b"\x00" * 8 + b"\x80")
    with pytest.raises(FrameHeaderError, match="cycle of 300"):
        sps_frame_size(sps_nal(width_mbs=20, height_units=15, poc_cycle=[0] * 300))
    with pytest.raises(FrameHeaderError, match="no frame size from AV1"):
        frame_size("AV1", b"\x00")


# -- the guard ------------------------------------------------------------------------------


class Recorded:
    def __init__(self, max_pixels: int) -> None:
        self.drops: list[str] = []
        self.refusals: list[str] = []
        self.guard = DecodeSizeGuard(max_pixels, self.drops.append, self.refusals.append)
        self.guard.use_codecs({96: "VP8", 102: "H264"})


def test_the_guard_drops_a_stream_over_the_limit_and_refuses_it_when_it_persists() -> None:
    large_key, *large_inter = encode("libvpx", 320, 240)
    small_key, *small_inter = encode("libvpx", 160, 120)
    seen = Recorded(max_pixels=160 * 120)
    assert seen.guard.admit(96, small_key) and seen.guard.admit(96, small_inter[0])
    assert not seen.guard.admit(96, large_key)
    assert not seen.guard.admit(96, large_inter[0])  # part of the refused picture
    assert seen.drops == [OVERSIZE, OVERSIZE] and seen.refusals == []
    assert seen.guard.admit(96, small_key)  # a key frame within the limit: decoded again
    for index in range(REFUSE_AFTER_FRAMES):
        assert not seen.guard.admit(96, large_inter[0] if index else large_key)
    assert len(seen.drops) == 2 + REFUSE_AFTER_FRAMES
    [reason] = seen.refusals
    assert "320x240" in reason and "76800 pixels" in reason and "limit of 19200" in reason
    seen.guard.admit(96, large_key)
    assert len(seen.refusals) == 1  # told once


def test_the_guard_refuses_unreadable_sizes_and_unknown_payload_types() -> None:
    seen = Recorded(max_pixels=4096 * 2304)
    [key] = encode("libx264", 64, 64, **X264)[:1]
    assert seen.guard.admit(102, key)
    assert key[4] == 0x67  # the SPS comes first: cut it after its level byte
    assert not seen.guard.admit(102, key[:9])
    assert not seen.guard.admit(97, key)  # a payload type the negotiation did not give
    assert seen.drops == [UNREADABLE, UNREADABLE]


def test_the_marker_buffer_never_releases_a_frame_the_guard_refuses() -> None:
    large_key = encode("libvpx", 320, 240)[0]
    small_key = encode("libvpx", 160, 120)[0]
    seen = Recorded(max_pixels=160 * 120)
    buffer = MarkerJitterBuffer(capacity=128, guard=seen.guard)
    released = []
    for number, data in enumerate([large_key, small_key]):
        halves = [data[: len(data) // 2], data[len(data) // 2 :]]
        for part, piece in enumerate(halves):
            packet = av_packet(2 * number + part, 3000 * (number + 1), part == 1, piece)
            released.append(buffer.add(packet)[1])
    assert [frame is not None for frame in released] == [False, False, False, True]
    assert released[3] is not None and released[3].data == small_key
    assert seen.drops == [OVERSIZE]


def av_packet(sequence: int, timestamp: int, marker: bool, data: bytes) -> object:
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(payload_type=96, sequence_number=sequence, timestamp=timestamp)
    packet.marker = int(marker)
    aiortc_private.set_depayloaded(packet, data)
    return packet
