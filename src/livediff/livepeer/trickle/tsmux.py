"""MPEG-TS out: H.264 access units and passed-through audio PES payloads, each written at once.

libavformat's muxer interleaves its streams by DTS, so with audio in the container it holds a
video frame back until an audio packet at least as late is muxed; passed-through audio comes in
bursts (FFmpeg packs about 350 ms of audio per PES packet), which would hold video frames for
that long. This muxer writes every packet the moment it is given one and leaves ordering to the
receiver's demuxer, as MPEG-TS allows. It writes what a receiver needs and nothing more: a PAT
and a PMT at the start of every segment, one PES packet per access unit (with its
``PES_packet_length`` when it fits, so that demuxers can hand it on at its last byte), an access
unit delimiter in front of each H.264 access unit, the PCR in the first TS packet of each video
PES packet, random-access flags on IDR frames, and continuity counters that run on across
segments so that the concatenated channel is one clean stream.

Pure Python, no I/O; the egress's encoder thread calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

from livediff.livepeer.trickle.ts import ElementaryStream

PACKET_SIZE = 188
PAYLOAD_SIZE = 184
PAT_PID = 0x0000
PMT_PID = 0x1000
VIDEO_PID = 0x0100
AUDIO_PID = 0x0101
PROGRAM = 1
H264_STREAM_TYPE = 0x1B
VIDEO_STREAM_ID = 0xE0
#: H.264 access unit delimiter (primary_pic_type 7: any slice type).
ACCESS_UNIT_DELIMITER = b"\x00\x00\x00\x01\x09\xf0"
#: How far the PCR runs ahead of the DTS of the frame it travels with, in 90 kHz ticks.
PCR_LEAD = 9000
MAX_PES_LENGTH = 0xFFFF
TIMESTAMP_MASK = (1 << 33) - 1


def crc32_mpeg2(data: bytes) -> int:
    """CRC-32/MPEG-2 of a PSI section (polynomial 0x04C11DB7, no reflection, no final XOR)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc << 8) ^ _CRC_TABLE[((crc >> 24) ^ byte) & 0xFF]
        crc &= 0xFFFFFFFF
    return crc


def _crc_table() -> list[int]:
    table = []
    for index in range(256):
        crc = index << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


@dataclass(frozen=True, slots=True)
class AudioTrack:
    """The passed-through audio stream: its PMT entry and PES stream id, from the input."""

    stream_type: int
    descriptors: bytes
    stream_id: int

    @classmethod
    def from_input(cls, stream: ElementaryStream, stream_id: int) -> AudioTrack:
        return cls(stream.stream_type, stream.descriptors, stream_id)


class TsMuxer:
    """One output stream of MPEG-TS segments: H.264 video, and audio when there is a track."""

    def __init__(self) -> None:
        self._counters: dict[int, int] = {}
        self.audio: AudioTrack | None = None

    def segment_start(self) -> bytes:
        """The PAT and PMT that open every segment."""
        return self._section_packet(PAT_PID, self._pat()) + self._section_packet(
            PMT_PID, self._pmt()
        )

    def video(self, access_unit: bytes, pts: int, dts: int, *, key: bool) -> bytes:
        """One H.264 access unit (Annex B) as TS packets, PCR in the first."""
        if not access_unit.startswith(ACCESS_UNIT_DELIMITER):
            access_unit = ACCESS_UNIT_DELIMITER + access_unit
        pes = pes_packet(VIDEO_STREAM_ID, access_unit, pts, dts)
        pcr = max(0, dts - PCR_LEAD) * 300
        return self._packetize(VIDEO_PID, pes, pcr=pcr, random_access=key)

    def audio_pes(self, payload: bytes, pts: int | None, dts: int | None) -> bytes:
        """One passed-through audio PES payload; nothing when there is no audio track."""
        if self.audio is None:
            return b""
        pes = pes_packet(self.audio.stream_id, payload, pts, dts)
        return self._packetize(AUDIO_PID, pes)

    # -- tables ---------------------------------------------------------------------------
    def _pat(self) -> bytes:
        program = PROGRAM.to_bytes(2, "big") + (0xE000 | PMT_PID).to_bytes(2, "big")
        return psi_section(0x00, PROGRAM, program)

    def _pmt(self) -> bytes:
        body = (0xE000 | VIDEO_PID).to_bytes(2, "big") + (0xF000).to_bytes(2, "big")
        body += es_entry(H264_STREAM_TYPE, VIDEO_PID, b"")
        if self.audio is not None:
            body += es_entry(self.audio.stream_type, AUDIO_PID, self.audio.descriptors)
        return psi_section(0x02, PROGRAM, body)

    def _section_packet(self, pid: int, section: bytes) -> bytes:
        payload = b"\x00" + section  # pointer_field 0: the section starts right away
        header = self._header(pid, unit_start=True, adaptation=False)
        return header + payload + b"\xff" * (PAYLOAD_SIZE - len(payload))

    # -- packets --------------------------------------------------------------------------
    def _packetize(
        self, pid: int, pes: bytes, *, pcr: int | None = None, random_access: bool = False
    ) -> bytes:
        out = bytearray()
        offset, first = 0, True
        while offset < len(pes):
            fields = adaptation_fields(pcr if first else None, random_access and first)
            room = PAYLOAD_SIZE - (len(fields) + 1 if fields is not None else 0)
            chunk = pes[offset : offset + room]
            offset += len(chunk)
            stuffing = room - len(chunk)
            adaptation = adaptation_field(fields, stuffing)
            out += self._header(pid, unit_start=first, adaptation=adaptation is not None)
            out += (adaptation or b"") + chunk
            first = False
        return bytes(out)

    def _header(self, pid: int, *, unit_start: bool, adaptation: bool) -> bytes:
        counter = (self._counters.get(pid, -1) + 1) & 0x0F
        self._counters[pid] = counter
        control = 0x30 if adaptation else 0x10
        return bytes(
            [0x47, (0x40 if unit_start else 0) | (pid >> 8), pid & 0xFF, control | counter]
        )


def adaptation_fields(pcr: int | None, random_access: bool) -> bytes | None:
    """The flags byte and optional fields of an adaptation field; None when there are none."""
    if pcr is None and not random_access:
        return None
    flags = (0x40 if random_access else 0) | (0x10 if pcr is not None else 0)
    return bytes([flags]) + (encode_pcr(pcr) if pcr is not None else b"")


def adaptation_field(fields: bytes | None, stuffing: int) -> bytes | None:
    """The whole adaptation field (length byte first), padded by ``stuffing`` bytes."""
    if fields is None and stuffing == 0:
        return None
    if fields is None:
        if stuffing == 1:
            return b"\x00"  # an empty field: its length byte is the one stuffing byte
        fields, stuffing = b"\x00", stuffing - 2  # the length byte and a flags byte of 0
    body = fields + b"\xff" * stuffing
    return bytes([len(body)]) + body


def encode_pcr(pcr: int) -> bytes:
    """A 27 MHz PCR as its 33-bit base (90 kHz), 6 reserved bits and 9-bit extension."""
    base, extension = (pcr // 300) & TIMESTAMP_MASK, pcr % 300
    return bytes(
        [
            (base >> 25) & 0xFF,
            (base >> 17) & 0xFF,
            (base >> 9) & 0xFF,
            (base >> 1) & 0xFF,
            ((base & 1) << 7) | 0x7E | (extension >> 8),
            extension & 0xFF,
        ]
    )


def encode_timestamp(prefix: int, value: int) -> bytes:
    """A 33-bit PTS/DTS in 5 bytes with its 4-bit prefix and marker bits."""
    value &= TIMESTAMP_MASK
    return bytes(
        [
            (prefix << 4) | (((value >> 30) & 0x07) << 1) | 1,
            (value >> 22) & 0xFF,
            (((value >> 15) & 0x7F) << 1) | 1,
            (value >> 7) & 0xFF,
            ((value & 0x7F) << 1) | 1,
        ]
    )


def pes_packet(stream_id: int, payload: bytes, pts: int | None, dts: int | None) -> bytes:
    """A PES packet with PTS (and DTS when it differs); its length field 0 when too long."""
    if pts is None:
        flags, timestamps = 0x00, b""
    elif dts is None or dts == pts:
        flags, timestamps = 0x80, encode_timestamp(0x2, pts)
    else:
        flags, timestamps = 0xC0, encode_timestamp(0x3, pts) + encode_timestamp(0x1, dts)
    header = bytes([0x84, flags, len(timestamps)]) + timestamps  # data_alignment_indicator set
    length = len(header) + len(payload)
    declared = length if length <= MAX_PES_LENGTH else 0
    return b"\x00\x00\x01" + bytes([stream_id]) + declared.to_bytes(2, "big") + header + payload


def psi_section(table_id: int, table_id_extension: int, body: bytes) -> bytes:
    """A long-form PSI section (version 0, current, one section) with its CRC."""
    length = 5 + len(body) + 4  # the header after the length field, the body, the CRC
    section = bytes([table_id, 0xB0 | (length >> 8), length & 0xFF])
    section += table_id_extension.to_bytes(2, "big") + bytes([0xC1, 0x00, 0x00]) + body
    return section + crc32_mpeg2(section).to_bytes(4, "big")


def es_entry(stream_type: int, pid: int, descriptors: bytes) -> bytes:
    """A PMT elementary stream entry."""
    return (
        bytes([stream_type])
        + (0xE000 | pid).to_bytes(2, "big")
        + (0xF000 | len(descriptors)).to_bytes(2, "big")
        + descriptors
    )
