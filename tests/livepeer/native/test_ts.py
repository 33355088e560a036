"""MPEG-TS framing: frames released at their last byte coming in, written at once going out."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import pytest

from livediff.livepeer.trickle.ts import PACKET_SIZE, TsDemuxer, has_stuffing, parse_pes
from livediff.livepeer.trickle.tsmux import (
    AUDIO_PID,
    VIDEO_PID,
    AudioTrack,
    TsMuxer,
    crc32_mpeg2,
    pes_packet,
)
from livediff.testing.framecode import read_frame_number
from livediff.testing.trickle import encode_clip, is_idr

TB = Fraction(1, 90_000)


def clip_bytes(frames: int, audio: bool = False) -> tuple[bytes, list[int]]:
    """A clip's bytes and the offset just past each frame's last byte (as FFmpeg muxed it)."""
    clip = encode_clip(frames, (128, 128), gop_s=10.0, audio=audio)
    data, ends = bytearray(), []
    for segment in clip.segments:
        for piece in segment.pieces:
            data += piece.data
            ends.extend([len(data)] * len(piece.completes))
    return bytes(data), ends


def test_each_frame_is_released_by_its_own_last_ts_packet() -> None:
    data, ends = clip_bytes(20)
    demuxer = TsDemuxer()
    released_at: list[int] = []
    for offset in range(0, len(data), PACKET_SIZE):
        for pes in demuxer.feed(data[offset : offset + PACKET_SIZE], float(offset)):
            if pes.pid == demuxer.video.pid:  # type: ignore[union-attr]
                released_at.append(offset + PACKET_SIZE)
    last = demuxer.flush()
    released_at.extend([len(data)] * len(last))
    assert released_at == ends  # never later than the packet that completes the frame
    assert demuxer.video is not None and demuxer.video.codec == "h264"


def test_pieces_of_any_size_give_the_same_frames_decodable_in_order() -> None:
    data, _ = clip_bytes(12, audio=True)
    demuxer = TsDemuxer()
    packets = []
    for offset in range(0, len(data), 1000):  # cuts through TS packets
        packets.extend(demuxer.feed(data[offset : offset + 1000], 0.0))
    packets.extend(demuxer.flush())
    assert demuxer.audio is not None and demuxer.audio.codec == "opus"
    decoder = av.CodecContext.create("h264", "r")
    numbers = []
    for pes in packets:
        if pes.pid == demuxer.video.pid:  # type: ignore[union-attr]
            packet = av.Packet(pes.data)
            packet.pts, packet.time_base = pes.pts, TB
            numbers.extend(read_frame_number(frame) for frame in decoder.decode(packet))
    assert numbers == list(range(12))
    assert any(pes.pid == demuxer.audio.pid for pes in packets)


def ts_packet(pid: int, payload: bytes, *, start: bool, stuffing: int = 0) -> bytes:
    """A hand-made TS packet; ``stuffing`` bytes of adaptation field padding before payload."""
    header = bytes([0x47, (0x40 if start else 0) | (pid >> 8), pid & 0xFF])
    if stuffing:
        field = bytes([stuffing - 1]) + (
            b"\x00" + b"\xff" * (stuffing - 2) if stuffing > 1 else b""
        )
        return header + bytes([0x30]) + field + payload
    return header + bytes([0x10]) + payload


def program_tables() -> bytes:
    muxer = TsMuxer()
    return muxer.segment_start()


def test_a_pes_packet_ends_by_its_length_by_stuffing_or_by_the_next_start() -> None:
    demuxer = TsDemuxer()
    assert demuxer.feed(program_tables(), 0.0) == []
    assert demuxer.video is not None and demuxer.video.pid == VIDEO_PID
    unbounded = b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05" + b"\x21\x00\x01\x00\x01"
    first = unbounded + b"A" * (184 - len(unbounded))
    assert demuxer.feed(ts_packet(VIDEO_PID, first, start=True), 1.0) == []
    # exactly full and no stuffing: not known to be complete until the next one starts
    assert demuxer.feed(ts_packet(VIDEO_PID, b"B" * 184, start=False), 2.0) == []
    second = unbounded + b"C" * 10
    released = demuxer.feed(
        ts_packet(VIDEO_PID, second, start=True, stuffing=184 - len(second)), 3.0
    )
    assert [pes.data[-1:] for pes in released] == [b"B", b"C"]
    assert [pes.arrived for pes in released] == [2.0, 3.0]  # each at its own last byte
    bounded = pes_packet(0xE0, b"D" * 400, 90, None)
    pieces = [bounded[i : i + 184] for i in range(0, len(bounded), 184)]
    for index, piece in enumerate(pieces[:-1]):
        assert demuxer.feed(ts_packet(VIDEO_PID, piece, start=index == 0), 4.0) == []
    tail = pieces[-1]
    out = demuxer.feed(ts_packet(VIDEO_PID, tail, start=False, stuffing=184 - len(tail)), 5.0)
    assert [len(pes.data) for pes in out] == [400] and out[0].pts == 90


def test_adaptation_fields_with_pcr_are_not_stuffing() -> None:
    pcr_only = bytes([0x10]) + b"\x00" * 6
    assert not has_stuffing(pcr_only, len(pcr_only))
    assert has_stuffing(pcr_only + b"\xff", len(pcr_only) + 1)
    assert has_stuffing(b"", 0)  # an empty field is one stuffing byte


def test_the_muxer_writes_a_stream_libavformat_reads_with_audio_passed_through() -> None:
    data, _ = clip_bytes(30, audio=True)
    demuxer = TsDemuxer()
    packets = demuxer.feed(data, 0.0) + demuxer.flush()
    assert demuxer.audio is not None
    audio_pes = [pes for pes in packets if pes.pid == demuxer.audio.pid]
    muxer = TsMuxer()
    muxer.audio = AudioTrack.from_input(demuxer.audio, audio_pes[0].stream_id)
    out = bytearray(muxer.segment_start())
    decoder = av.CodecContext.create("h264", "r")
    encoder = h264_encoder()
    for pes in packets:
        if pes.pid == demuxer.audio.pid:
            out += muxer.audio_pes(pes.data, pes.pts, pes.dts)
            continue
        packet = av.Packet(pes.data)
        packet.pts, packet.time_base = pes.pts, TB
        for frame in decoder.decode(packet):
            frame.pts, frame.time_base = pes.pts, TB
            for encoded in encoder.encode(frame):
                out += muxer.video(
                    bytes(encoded), encoded.pts, encoded.dts, key=encoded.is_keyframe
                )
    assert len(out) % PACKET_SIZE == 0
    numbers, samples = read_back(bytes(out))
    assert numbers == list(range(30))
    assert samples > 0


def h264_encoder() -> av.video.codeccontext.VideoCodecContext:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width = encoder.height = 128
    encoder.pix_fmt, encoder.time_base, encoder.max_b_frames = "yuv420p", TB, 0
    encoder.options = {"preset": "superfast", "tune": "zerolatency"}
    return encoder


def read_back(data: bytes) -> tuple[list[int | None], int]:
    container = av.open(io.BytesIO(data), format="mpegts")
    numbers: list[int | None] = []
    samples = 0
    for packet in container.demux():
        if packet.size == 0:
            continue
        for frame in packet.decode():
            if isinstance(frame, av.VideoFrame):
                numbers.append(read_frame_number(frame))
            else:
                samples += frame.samples
    container.close()
    return numbers, samples


def test_continuity_counters_run_on_across_segments_and_pes_lengths_are_set() -> None:
    muxer = TsMuxer()
    access_unit = b"\x00\x00\x00\x01\x65" + b"\x11" * 5000
    data = muxer.segment_start() + muxer.video(access_unit, 9000, 9000, key=True)
    data += muxer.segment_start() + muxer.video(access_unit, 12000, 12000, key=True)
    counters: dict[int, list[int]] = {}
    for offset in range(0, len(data), PACKET_SIZE):
        packet = data[offset : offset + PACKET_SIZE]
        pid = ((packet[1] & 0x1F) << 8) | packet[2]
        counters.setdefault(pid, []).append(packet[3] & 0x0F)
    for seen in counters.values():
        assert seen == [index % 16 for index in range(len(seen))]
    released = TsDemuxer().feed(data, 0.0)
    assert [pes.pts for pes in released] == [9000, 12000]
    assert all(pes.data.startswith(b"\x00\x00\x00\x01\x09\xf0") for pes in released)  # AUD
    assert is_idr(released[0].data)


def test_long_access_units_get_an_unbounded_pes_and_still_come_out() -> None:
    big = pes_packet(0xE0, b"\x00" * 70_000, 1, None)
    assert big[4:6] == b"\x00\x00"
    parsed = parse_pes(big)
    assert parsed is not None and len(parsed[1]) == 70_000


@pytest.mark.parametrize(("data", "crc"), [(b"123456789", 0x0376E6E7), (b"", 0xFFFFFFFF)])
def test_crc32_mpeg2(data: bytes, crc: int) -> None:
    assert crc32_mpeg2(data) == crc


def test_the_audio_track_is_only_written_when_the_input_had_one() -> None:
    muxer = TsMuxer()
    assert muxer.audio_pes(b"abc", 1, 1) == b""
    demuxer = TsDemuxer()
    demuxer.feed(muxer.segment_start(), 0.0)
    assert list(demuxer.streams) == [VIDEO_PID] and demuxer.audio is None
    muxer.audio = AudioTrack(stream_type=0x0F, descriptors=b"", stream_id=0xC0)
    demuxer.feed(muxer.segment_start(), 0.0)
    assert demuxer.audio is not None and demuxer.audio.pid == AUDIO_PID
    assert demuxer.audio.codec == "aac"
