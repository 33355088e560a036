"""The marker-aware jitter buffer releases a frame with its last packet, not one frame later."""

from __future__ import annotations

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from livediff.media import aiortc_private
from livediff.media.jitter import MarkerJitterBuffer, use_marker_jitter_buffer


def packet(seq: int, timestamp: int, marker: bool, data: bytes) -> RtpPacket:
    rtp = RtpPacket(sequence_number=seq, timestamp=timestamp, marker=int(marker))
    aiortc_private.set_depayloaded(rtp, data)  # as aiortc's receiver does after depayloading
    return rtp


def frame_packets(first_seq: int, timestamp: int, parts: list[bytes]) -> list[RtpPacket]:
    last = len(parts) - 1
    return [packet(first_seq + i, timestamp, i == last, part) for i, part in enumerate(parts)]


def test_stock_buffer_waits_for_the_next_frame() -> None:
    stock = JitterBuffer(capacity=128, is_video=True)
    results = [stock.add(p)[1] for p in frame_packets(100, 3000, [b"a", b"b"])]
    assert results == [None, None]


def test_marker_releases_the_frame_on_its_last_packet() -> None:
    buffer = MarkerJitterBuffer(capacity=128)
    results = [buffer.add(p)[1] for p in frame_packets(100, 3000, [b"a", b"b", b"c"])]
    assert results[:2] == [None, None]
    released = results[2]
    assert released is not None and released.data == b"abc" and released.timestamp == 3000
    second = [buffer.add(p)[1] for p in frame_packets(103, 6000, [b"d", b"e"])]
    assert second[1] is not None and second[1].data == b"de"


def test_out_of_order_packets_wait_until_the_frame_is_contiguous() -> None:
    buffer = MarkerJitterBuffer(capacity=128)
    first, middle, last = frame_packets(200, 9000, [b"x", b"y", b"z"])
    assert buffer.add(first)[1] is None
    assert buffer.add(last)[1] is None  # marker seen, but the middle packet is missing
    released = buffer.add(middle)[1]
    assert released is not None and released.data == b"xyz"


def test_a_frame_without_marker_is_still_released_by_the_next_one() -> None:
    buffer = MarkerJitterBuffer(capacity=128)
    assert buffer.add(packet(10, 100, False, b"p"))[1] is None
    released = buffer.add(packet(11, 200, False, b"q"))[1]
    assert released is not None and released.data == b"p"


def test_use_marker_jitter_buffer_replaces_a_receivers_buffer() -> None:
    class _Transport:
        state = "new"

    receiver = RTCRtpReceiver("video", _Transport())  # type: ignore[arg-type]
    stock = aiortc_private.jitter_buffer_of(receiver)
    use_marker_jitter_buffer(receiver)
    installed = aiortc_private.jitter_buffer_of(receiver)
    assert isinstance(installed, MarkerJitterBuffer) and installed.capacity == stock.capacity
    use_marker_jitter_buffer(receiver)  # a second call keeps the buffer (and what it holds)
    assert aiortc_private.jitter_buffer_of(receiver) is installed
