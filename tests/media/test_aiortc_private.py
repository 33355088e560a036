"""Every aiortc private name that livediff uses is still there, and still means the same.

When an aiortc release renames or drops one, these fail and name it: :func:`check` first (it
reads aiortc's classes), then each accessor on real aiortc objects (peer connections that
negotiate, then connect over loopback and carry video and a data channel).
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.codecs.h264 import H264Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcdtlstransport import RTCCertificate
from aiortc.rtcsctptransport import RTCSctpTransport
from aiortc.rtp import RtpPacket
from OpenSSL import SSL

from livediff.config import Settings
from livediff.encoding import EncoderSettings
from livediff.media import aiortc_private
from livediff.media.codecs import ConfiguredVp8Encoder
from livediff.media.jitter import MarkerJitterBuffer
from livediff.testing.peers import NumberedVideoTrack, client_peer, local_offer

CONNECT_S = 20


def test_the_installed_aiortc_has_every_private_name() -> None:
    aiortc_private.check()  # raises AiortcPrivateError naming each missing one


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (H264Encoder, "_split_bitstream", "H264Encoder._split_bitstream"),
        (JitterBuffer, "_remove_frame", "JitterBuffer._remove_frame"),
        (RTCCertificate, "_create_ssl_context", "RTCCertificate._create_ssl_context"),
    ],
)
def test_check_names_a_method_that_is_gone(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, named: str
) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(aiortc_private.AiortcPrivateError, match=re.escape(named)) as refused:
        aiortc_private.check()
    assert refused.value.missing == [named]


def test_check_names_an_attribute_that_no_method_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance attribute counts as gone when no method of its class names it any more."""

    def add(self: JitterBuffer, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        return False, None  # an add that never calls _remove_frame

    def init(self: RTCRtpTransceiver, *args: Any, **kwargs: Any) -> None:
        """A transceiver that keeps its codecs elsewhere."""

    monkeypatch.setattr(JitterBuffer, "add", add)
    monkeypatch.setattr(RTCRtpTransceiver, "__init__", init)
    with pytest.raises(aiortc_private.AiortcPrivateError) as refused:
        aiortc_private.check()
    assert refused.value.missing == [
        "JitterBuffer.add calling _remove_frame",
        "RTCRtpTransceiver._codecs",
    ]
    assert "aiortc 1." in str(refused.value) and "pyproject.toml" in str(refused.value)


def test_an_accessor_names_what_it_misses() -> None:
    with pytest.raises(
        aiortc_private.AiortcPrivateError, match=re.escape("RTCRtpReceiver._RTCRtp")
    ):
        aiortc_private.jitter_buffer_of(object())  # type: ignore[arg-type]
    with pytest.raises(
        aiortc_private.AiortcPrivateError, match=re.escape("RTCSctpTransport._data_chan")
    ):
        aiortc_private.sctp_pending(object())  # type: ignore[arg-type]


# -- receiving --------------------------------------------------------------------------


def rtp(seq: int, timestamp: int, data: bytes, marker: bool = False) -> RtpPacket:
    packet = RtpPacket(sequence_number=seq, timestamp=timestamp, marker=int(marker))
    aiortc_private.set_depayloaded(packet, data)
    return packet


def test_a_stock_jitter_buffer_keeps_what_the_accessors_read() -> None:
    buffer = JitterBuffer(capacity=16, is_video=True)
    assert aiortc_private.jitter_ring(buffer) == (None, [None] * 16)
    first, second = rtp(100, 3000, b"ab"), rtp(101, 3000, b"cd")
    buffer.add(first)
    buffer.add(second)
    origin, ring = aiortc_private.jitter_ring(buffer)
    assert origin == 100 and ring[100 % 16] is first and ring[101 % 16] is second
    assert aiortc_private.depayloaded(first) == b"ab"
    assert aiortc_private.depayloaded(RtpPacket()) == b""  # not depayloaded yet
    assert aiortc_private.stock_remove_frame(buffer, 101) is None  # no next frame yet
    released = buffer.add(rtp(102, 6000, b"ef"))[1]  # the next frame begins
    assert released is not None and (released.data, released.timestamp) == (b"abcd", 3000)
    assert aiortc_private.jitter_ring(buffer)[0] == 102


def test_stock_remove_frame_is_what_add_calls() -> None:
    """A subclass's _remove_frame is the one add() uses; the stock one releases a frame when
    the next begins, as aiortc's own buffer does."""
    calls: list[int] = []

    class Watched(JitterBuffer):
        def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
            calls.append(sequence_number)
            return aiortc_private.stock_remove_frame(self, sequence_number)

    buffer = Watched(capacity=16, is_video=True)
    assert buffer.add(rtp(7, 90, b"x"))[1] is None
    frame = buffer.add(rtp(8, 180, b"y"))[1]
    assert calls == [7, 8] and frame is not None and (frame.data, frame.timestamp) == (b"x", 90)


async def test_a_real_receivers_jitter_buffer_can_be_replaced() -> None:
    pc = client_peer()
    try:
        for kind in ("video", "audio"):
            receiver = pc.addTransceiver(kind).receiver
            stock = aiortc_private.jitter_buffer_of(receiver)
            assert type(stock) is JitterBuffer
            mine = MarkerJitterBuffer(capacity=stock.capacity)
            aiortc_private.install_jitter_buffer(receiver, mine)
            assert aiortc_private.jitter_buffer_of(receiver) is mine
    finally:
        await pc.close()


# -- sending ----------------------------------------------------------------------------


def test_h264_packetize_splits_an_annex_b_access_unit() -> None:
    sps = b"\x67" + bytes(range(1, 12))
    idr = b"\x65" + bytes(3000)
    payloads = aiortc_private.h264_packetize(b"\x00\x00\x00\x01" + sps + b"\x00\x00\x01" + idr)
    assert payloads[0] == sps  # a lone small NAL unit goes as it is (RFC 6184 5.6)
    fragments = payloads[1:]
    assert len(fragments) > 1 and all(p[0] & 0x1F == 28 for p in fragments)  # FU-A
    assert fragments[0][1] & 0x80 and fragments[-1][1] & 0x40  # start and end bits
    assert b"".join(p[2:] for p in fragments) == idr[1:]
    assert aiortc_private.h264_packetize(b"") == []


def test_vp8_packetize_writes_the_picture_id() -> None:
    payloads = aiortc_private.vp8_packetize(bytes(3000), 1234)
    assert len(payloads) > 1
    first, *rest = payloads
    assert first[0] == 0x90  # X (extensions) and S (start of partition), RFC 7741 4.2
    assert first[2:4] == struct.pack("!H", 0x8000 | 1234)  # M bit and the 15-bit picture id
    assert all(p[0] == 0x80 for p in rest)
    assert b"".join(p[4:] for p in payloads) == bytes(3000)


async def negotiate(sender: RTCPeerConnection, receiver: RTCPeerConnection) -> None:
    """Offer from ``sender``, answer from ``receiver`` (which starts the connection)."""
    offer = RTCSessionDescription(sdp=await local_offer(sender), type="offer")
    await receiver.setRemoteDescription(offer)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)


async def test_negotiated_codecs_and_the_sender_encoder_on_a_real_negotiation() -> None:
    sender, receiver = client_peer(), client_peer()
    try:
        transceiver = sender.addTransceiver(NumberedVideoTrack(64, 64), direction="sendonly")
        assert aiortc_private.negotiated_codecs(transceiver) == []  # none before negotiation
        await negotiate(sender, receiver)
        codecs = aiortc_private.negotiated_codecs(transceiver)
        assert codecs[0].mimeType == "video/VP8"
        assert {c.mimeType for c in codecs} >= {"video/VP8", "video/H264", "video/rtx"}
        assert aiortc_private.sender_encoder(transceiver.sender) is None  # made on frame one
        encoder = ConfiguredVp8Encoder(EncoderSettings.from_settings(Settings()))
        aiortc_private.install_sender_encoder(transceiver.sender, encoder)
        assert aiortc_private.sender_encoder(transceiver.sender) is encoder
    finally:
        await asyncio.gather(sender.close(), receiver.close())


# -- a real connection: video through the marker buffer, DTLS, SCTP ------------------------


class CountingVp8Encoder(ConfiguredVp8Encoder):
    """livediff's VP8 encoder, counting the frames that aiortc's sender gives it."""

    encoded = 0

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        self.encoded += 1
        return super().encode(frame, force_keyframe)


class CountingMarkerBuffer(MarkerJitterBuffer):
    """The marker-aware buffer, counting the frames that it released by their marker."""

    by_marker = 0

    def _frame_ended_by_marker(self) -> JitterFrame | None:
        frame = super()._frame_ended_by_marker()
        self.by_marker += frame is not None
        return frame


class Pair:
    """Two peer connections about to connect: video one way, and a data channel."""

    def __init__(self) -> None:
        self.sender, self.receiver = client_peer(), client_peer()
        self.sent = self.sender.addTransceiver(NumberedVideoTrack(64, 64), direction="sendonly")
        self.received = self.receiver.addTransceiver("video", direction="recvonly")
        self.buffer = CountingMarkerBuffer()
        aiortc_private.install_jitter_buffer(self.received.receiver, self.buffer)
        self.encoder = CountingVp8Encoder(EncoderSettings.from_settings(Settings()))
        self.channel: RTCDataChannel = self.sender.createDataChannel("params")
        self.opened = asyncio.Event()
        self.channel.on("open", self.opened.set)

    async def connect(self) -> None:
        await negotiate(self.sender, self.receiver)
        aiortc_private.install_sender_encoder(self.sent.sender, self.encoder)
        await asyncio.wait_for(self.opened.wait(), CONNECT_S)

    async def read_frames(self, count: int) -> None:
        """Read ``count`` decoded frames from the receiver's track."""
        track: MediaStreamTrack = self.received.receiver.track
        for _ in range(count):
            await asyncio.wait_for(track.recv(), CONNECT_S)

    async def close(self) -> None:
        await asyncio.gather(self.sender.close(), self.receiver.close())


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    made = Pair()
    try:
        yield made
    finally:
        await made.close()


async def test_dtls_accessors_and_the_ssl_context_hook_on_a_real_handshake(pair: Pair) -> None:
    contexts: list[SSL.Context] = []
    hook: Callable[[SSL.Context], None] = contexts.append
    transport = pair.sent.sender.transport
    assert aiortc_private.dtls_ssl_connection(transport) is None  # before it starts
    aiortc_private.add_ssl_context_hook(hook)
    aiortc_private.add_ssl_context_hook(hook)  # a second add is ignored
    assert aiortc_private.ssl_context_hooks().count(hook) == 1
    try:
        await pair.connect()
    finally:
        aiortc_private.remove_ssl_context_hook(hook)
    assert hook not in aiortc_private.ssl_context_hooks()
    connection = aiortc_private.dtls_ssl_connection(transport)
    assert isinstance(connection, SSL.Connection)
    assert connection.get_context() in contexts  # the hook saw the context in use


async def test_video_flows_through_the_installed_encoder_and_marker_buffer(pair: Pair) -> None:
    await pair.connect()
    await pair.read_frames(5)
    assert pair.encoder.encoded >= 5  # aiortc's sender used the installed encoder
    assert pair.buffer.by_marker >= 5  # ... and the receiver the marker-aware buffer
    assert aiortc_private.jitter_buffer_of(pair.received.receiver) is pair.buffer


async def test_sctp_pending_sees_a_message_until_it_is_acknowledged(pair: Pair) -> None:
    await pair.connect()
    association = pair.channel.transport
    assert isinstance(association, RTCSctpTransport)
    async with asyncio.timeout(CONNECT_S):
        while aiortc_private.sctp_pending(association):  # the channel's opening handshake
            await asyncio.sleep(0.01)
        pair.channel.send("ended")
        assert aiortc_private.sctp_pending(association)
        while aiortc_private.sctp_pending(association):
            await asyncio.sleep(0.01)
