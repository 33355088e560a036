"""MPEG-TS in: PES packets of the video and audio streams, each released when its last byte is in.

libavformat's MPEG-TS demuxer (and the H.264 parser behind it) hands a video frame on only
when the *next* frame starts: muxers write video PES packets with no length (FFmpeg always
does), so the end of one is first seen as the start of the next, a frame interval late. This
demuxer is fed the bytes as they stream in and decides that a PES packet is complete as soon as
one of these holds, in this order:

1. its ``PES_packet_length`` is set and that many bytes are in;
2. the TS packet just read carried payload *and* adaptation-field stuffing: muxers pad only
   the last TS packet of a PES packet (it is the one whose payload does not fill it);
3. the next PES packet of the same stream starts (the fallback libavformat always uses: one
   frame late, for the rare frame whose last TS packet is exactly full);
4. the input segment ends (a trickle segment holds whole GOPs).

It reads the PAT and PMT to find the streams, and returns the packets of the first video and
the first audio stream with their stream id, PTS/DTS (90 kHz) and the time their last byte
arrived: video to decode, audio to pass through unchanged (:mod:`livediff.livepeer.trickle.tsmux`
writes its payloads back out). Pure Python, no I/O: it runs on the ingest's decoder thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

#: MPEG-TS timestamps (PTS, DTS, PCR base) count this clock; every Livepeer door uses it.
TS_CLOCK_HZ = 90_000
TS_TIME_BASE = Fraction(1, TS_CLOCK_HZ)
PACKET_SIZE = 188
SYNC_BYTE = 0x47
PAT_PID = 0x0000
NULL_PID = 0x1FFF
PES_START = b"\x00\x00\x01"
#: PES stream ids without the optional header (program stream map, padding, private 2, ECM,
#: EMM, directory, DSMCC, H.222.1 type E).
NO_OPTIONAL_HEADER = frozenset({0xBC, 0xBE, 0xBF, 0xF0, 0xF1, 0xFF, 0xF2, 0xF8})

#: PMT stream types of the video codecs livediff decodes, by the name PyAV knows them by.
VIDEO_STREAM_TYPES = {0x1B: "h264", 0x24: "hevc", 0x02: "mpeg2video"}
#: PMT stream types that carry audio (0x06 is private data: audio when registered as Opus).
AUDIO_STREAM_TYPES = {0x03: "mp2", 0x04: "mp2", 0x0F: "aac", 0x11: "aac_latm", 0x81: "ac3"}
PRIVATE_DATA = 0x06
REGISTRATION_DESCRIPTOR = 0x05


@dataclass(frozen=True, slots=True)
class ElementaryStream:
    """One stream the PMT lists."""

    pid: int
    stream_type: int
    codec: str | None  # PyAV's codec name for video and audio streams we know, else None
    descriptors: bytes = b""  # its ES descriptors, as the PMT carries them

    @property
    def is_video(self) -> bool:
        return self.stream_type in VIDEO_STREAM_TYPES

    @property
    def is_audio(self) -> bool:
        return self.stream_type in AUDIO_STREAM_TYPES or self.codec == "opus"


@dataclass(frozen=True, slots=True)
class Pes:
    """One complete PES packet: for video an access unit (a frame), for audio a few frames."""

    pid: int
    stream_id: int
    data: bytes
    pts: int | None
    dts: int | None
    #: When its last byte arrived (the clock the caller fed in).
    arrived: float


@dataclass(slots=True)
class _Assembly:
    """A PES packet being put together from TS packet payloads."""

    declared: int  # total PES bytes from PES_packet_length, 0 when unbounded
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    arrived: float = 0.0

    def add(self, payload: bytes, arrived: float) -> None:
        self.chunks.append(payload)
        self.size += len(payload)
        self.arrived = arrived

    @property
    def full(self) -> bool:
        return bool(self.declared) and self.size >= self.declared


@dataclass(slots=True)
class _Section:
    """A PSI section (PAT/PMT) being put together; sections may span TS packets."""

    data: bytearray = field(default_factory=bytearray)

    def start(self, payload: bytes) -> None:
        pointer = payload[0] if payload else 0
        self.data = bytearray(payload[1 + pointer :])

    def add(self, payload: bytes) -> None:
        if self.data:
            self.data += payload

    def complete(self) -> bytes | None:
        if len(self.data) < 3:
            return None
        length = 3 + (((self.data[1] & 0x0F) << 8) | self.data[2])
        if len(self.data) < length:
            return None
        section, self.data = bytes(self.data[:length]), bytearray()
        return section


@dataclass(frozen=True, slots=True)
class _TsPacket:
    pid: int
    unit_start: bool
    payload: bytes
    stuffed: bool  # carries payload and adaptation-field stuffing: the last of its PES packet


class TsDemuxer:
    """Feed MPEG-TS bytes in any pieces; get complete PES packets of the first video and the
    first audio stream back."""

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of a TS packet cut by the end of the last piece
        self._pmt_pids: set[int] = set()
        self._sections: dict[int, _Section] = {}
        self.streams: dict[int, ElementaryStream] = {}
        self.video: ElementaryStream | None = None
        self.audio: ElementaryStream | None = None
        self._assemblies: dict[int, _Assembly] = {}
        self.bytes_skipped = 0  # bytes dropped while looking for the sync byte

    def feed(self, data: bytes, arrived: float) -> list[Pes]:
        """The PES packets ``data`` completes (``arrived``: when it arrived)."""
        self._pending += data
        released: list[Pes] = []
        offset = 0
        while len(self._pending) - offset >= PACKET_SIZE:
            if self._pending[offset] != SYNC_BYTE:
                offset += 1
                self.bytes_skipped += 1
                continue
            packet = parse_packet(bytes(self._pending[offset : offset + PACKET_SIZE]))
            offset += PACKET_SIZE
            if packet is not None:
                released.extend(self._route(packet, arrived))
        del self._pending[:offset]
        return released

    def flush(self) -> list[Pes]:
        """At the end of a segment (or the stream): the packets being assembled are complete."""
        released: list[Pes] = []
        for pid in list(self._assemblies):
            released.extend(self._release(pid))
        return sorted(released, key=lambda pes: pes.pid != self._video_pid())

    def _video_pid(self) -> int | None:
        return self.video.pid if self.video is not None else None

    # -- routing --------------------------------------------------------------------------
    def _route(self, packet: _TsPacket, arrived: float) -> list[Pes]:
        if packet.pid == PAT_PID or packet.pid in self._pmt_pids:
            self._read_section(packet)
            return []
        if not any(s is not None and s.pid == packet.pid for s in (self.video, self.audio)):
            return []
        return self._payload(packet, arrived)

    def _payload(self, packet: _TsPacket, arrived: float) -> list[Pes]:
        released: list[Pes] = []
        if packet.unit_start:
            released.extend(self._release(packet.pid))
            self._assemblies[packet.pid] = _Assembly(declared=declared_size(packet.payload))
        assembly = self._assemblies.get(packet.pid)
        if assembly is None:  # joined in the middle of a PES packet: wait for a start
            return released
        assembly.add(packet.payload, arrived)
        if assembly.full or packet.stuffed:
            released.extend(self._release(packet.pid))
        return released

    def _release(self, pid: int) -> list[Pes]:
        assembly = self._assemblies.pop(pid, None)
        if assembly is None or not assembly.size:
            return []
        parsed = parse_pes(b"".join(assembly.chunks))
        if parsed is None:
            return []
        stream_id, data, pts, dts = parsed
        return [Pes(pid, stream_id, data, pts, dts if dts is not None else pts, assembly.arrived)]

    # -- program tables -------------------------------------------------------------------
    def _read_section(self, packet: _TsPacket) -> None:
        section = self._sections.setdefault(packet.pid, _Section())
        if packet.unit_start:
            section.start(packet.payload)
        else:
            section.add(packet.payload)
        complete = section.complete()
        if complete is None:
            return
        if packet.pid == PAT_PID:
            self._pmt_pids = set(parse_pat(complete))
        else:
            self._read_pmt(complete)

    def _read_pmt(self, section: bytes) -> None:
        streams = parse_pmt(section)
        if not streams:
            return
        self.streams = {stream.pid: stream for stream in streams}
        self.video = next((stream for stream in streams if stream.is_video), None)
        self.audio = next((stream for stream in streams if stream.is_audio), None)
        wanted = {s.pid for s in (self.video, self.audio) if s is not None}
        for pid in set(self._assemblies) - wanted:
            del self._assemblies[pid]


def parse_packet(raw: bytes) -> _TsPacket | None:
    """One 188-byte TS packet; None for null packets and packets without payload."""
    pid = ((raw[1] & 0x1F) << 8) | raw[2]
    control = (raw[3] >> 4) & 0x3
    if pid == NULL_PID or not control & 0x1:
        return None
    offset, stuffed = 4, False
    if control & 0x2:
        length = raw[4]
        stuffed = has_stuffing(raw[5 : 5 + length], length)
        offset = 5 + length
    if offset >= PACKET_SIZE:
        return None
    return _TsPacket(pid, bool(raw[1] & 0x40), raw[offset:], stuffed)


def has_stuffing(field_bytes: bytes, length: int) -> bool:
    """Whether an adaptation field (its bytes after the length byte) ends in stuffing bytes."""
    if length == 0:  # an empty adaptation field is itself one stuffing byte
        return True
    flags = field_bytes[0]
    used = 1
    used += 6 if flags & 0x10 else 0  # PCR
    used += 6 if flags & 0x08 else 0  # OPCR
    used += 1 if flags & 0x04 else 0  # splice countdown
    if flags & 0x02 and used < length:  # transport private data
        used += 1 + field_bytes[used]
    if flags & 0x01 and used < length:  # adaptation field extension
        used += 1 + field_bytes[used]
    return length > used


def declared_size(payload: bytes) -> int:
    """A PES packet's total size from its header's PES_packet_length; 0 when unbounded."""
    if len(payload) < 6 or not payload.startswith(PES_START):
        return 0
    length = (payload[4] << 8) | payload[5]
    return 6 + length if length else 0


def parse_pes(packet: bytes) -> tuple[int, bytes, int | None, int | None] | None:
    """(stream id, elementary stream data, PTS, DTS) of a PES packet; None if it is not one."""
    if len(packet) < 9 or not packet.startswith(PES_START):
        return None
    stream_id = packet[3]
    if stream_id in NO_OPTIONAL_HEADER:
        return stream_id, packet[6:], None, None
    flags = packet[7] >> 6
    start = 9 + packet[8]
    pts = read_timestamp(packet, 9) if flags & 0x2 else None
    dts = read_timestamp(packet, 14) if flags == 0x3 else None
    return stream_id, packet[start:], pts, dts


def read_timestamp(data: bytes, at: int) -> int | None:
    """A 33-bit PTS/DTS written in 5 bytes with marker bits."""
    if len(data) < at + 5:
        return None
    high = (data[at] >> 1) & 0x07
    middle = ((data[at + 1] << 8) | data[at + 2]) >> 1
    low = ((data[at + 3] << 8) | data[at + 4]) >> 1
    return (high << 30) | (middle << 15) | low


def parse_pat(section: bytes) -> list[int]:
    """The PMT PIDs a PAT section lists (network PIDs, program 0, left out)."""
    if section[0] != 0x00:
        return []
    pids = []
    for at in range(8, len(section) - 4, 4):
        program = (section[at] << 8) | section[at + 1]
        if program:
            pids.append(((section[at + 2] & 0x1F) << 8) | section[at + 3])
    return pids


def parse_pmt(section: bytes) -> list[ElementaryStream]:
    """The elementary streams a PMT section lists."""
    if section[0] != 0x02 or len(section) < 16:
        return []
    info_length = ((section[10] & 0x0F) << 8) | section[11]
    at, end = 12 + info_length, len(section) - 4
    streams = []
    while at + 5 <= end:
        stream_type = section[at]
        pid = ((section[at + 1] & 0x1F) << 8) | section[at + 2]
        es_length = ((section[at + 3] & 0x0F) << 8) | section[at + 4]
        descriptors = section[at + 5 : at + 5 + es_length]
        codec = codec_of(stream_type, descriptors)
        streams.append(ElementaryStream(pid, stream_type, codec, bytes(descriptors)))
        at += 5 + es_length
    return streams


def codec_of(stream_type: int, descriptors: bytes) -> str | None:
    if stream_type in VIDEO_STREAM_TYPES:
        return VIDEO_STREAM_TYPES[stream_type]
    if stream_type in AUDIO_STREAM_TYPES:
        return AUDIO_STREAM_TYPES[stream_type]
    if stream_type == PRIVATE_DATA and registered_as(descriptors) == b"Opus":
        return "opus"
    return None


def registered_as(descriptors: bytes) -> bytes | None:
    """The format identifier of a registration descriptor among ``descriptors``."""
    at = 0
    while at + 2 <= len(descriptors):
        tag, length = descriptors[at], descriptors[at + 1]
        if tag == REGISTRATION_DESCRIPTOR and length >= 4:
            return descriptors[at + 2 : at + 6]
        at += 2 + length
    return None
