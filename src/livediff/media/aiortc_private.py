"""Every use livediff makes of aiortc's private names, in one place.

aiortc has no public way to do a few things livediff needs: give a receiver a marker-aware
jitter buffer, give a sender a configured encoder, reuse aiortc's RTP packetisers, see whether
SCTP still holds a message, and explain a failed DTLS handshake. Those reach into aiortc's
internals, which any release may rename without notice (pyproject.toml pins
``aiortc>=1.13,<1.17``). Nothing else in livediff names an aiortc private attribute: it calls the
small functions below, each saying why livediff needs it and where aiortc keeps it.

Versions checked
    Every name below was read in aiortc 1.13.0, 1.14.0 and 1.15.0 (aiortc's git tags) and in
    1.16.0 (the installed release): all four keep each one, with the same meaning.

On another release
    :func:`check` looks for every name without building anything and raises
    :class:`AiortcPrivateError` naming each one that is gone; ``tests/media/test_aiortc_private``
    runs it and exercises every accessor on real aiortc objects. The accessors raise the same
    error, with the name, instead of an AttributeError deep inside a session.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import CodeType, FunctionType
from typing import Any, cast

from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtcsctptransport import RTCSctpTransport
from aiortc.rtp import RtpPacket
from OpenSSL import SSL

#: The aiortc releases whose source was read for every name in this module.
CHECKED_VERSIONS = ("1.13.0", "1.14.0", "1.15.0", "1.16.0")

# -- where aiortc keeps things ------------------------------------------------------------
# Each name: where aiortc 1.13.0 to 1.16.0 keeps it (all four read; a mangled name is what
# ``self.__name`` becomes inside the class), and why livediff reaches for it.

#: rtcrtpreceiver.py, ``RTCRtpReceiver.__init__``: ``self.__jitter_buffer`` (capacity 512 for
#: video); ``_handle_rtp_packet`` adds every packet to it. livediff swaps in a buffer that
#: releases a frame on its marker packet, one frame interval sooner (media/jitter.py).
RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
#: rtcrtpreceiver.py, ``_handle_rtp_packet``: ``packet._data = depayload(codec, payload)``,
#: set before the packet goes to the jitter buffer; the marker-aware buffer joins these bytes.
PACKET_DATA = "_data"
#: jitterbuffer.py (the same file in all four): ``_packets``, the ring indexed by sequence
#: number modulo the capacity, and ``_origin``, the sequence number at its start; the
#: marker-aware buffer reads both to see whether the oldest frame is complete.
JITTER_PACKETS = "_packets"
JITTER_ORIGIN = "_origin"
#: jitterbuffer.py: ``add`` ends with ``return pli_flag, self._remove_frame(sequence_number)``;
#: the marker-aware buffer overrides it, and falls back to the stock one.
JITTER_REMOVE_FRAME = "_remove_frame"
#: rtcrtpsender.py, ``RTCRtpSender.__init__``: ``self.__encoder = None``; ``_next_encoded_frame``
#: makes one with ``get_encoder(codec)`` only while it is None. livediff puts its encoder there,
#: configured from Settings (aiortc's own has its bitrates as module constants).
SENDER_ENCODER = "_RTCRtpSender__encoder"
#: rtcrtptransceiver.py, ``RTCRtpTransceiver.__init__``: ``self._codecs = []``, which
#: RTCPeerConnection fills in negotiation (the first is the one sent); livediff builds the
#: encoder for the codec actually negotiated.
TRANSCEIVER_CODECS = "_codecs"
#: codecs/h264.py: ``H264Encoder._split_bitstream`` (static: Annex B to NAL units) and
#: ``H264Encoder._packetize`` (class method: NAL units to RFC 6184 payloads); codecs/vpx.py:
#: ``Vp8Encoder._packetize(buffer, picture_id)`` (class method: RFC 7741 payloads). livediff's
#: encoders use aiortc's packetisation rather than a copy of it.
H264_PACKETIZE = "_packetize"
H264_SPLIT_BITSTREAM = "_split_bitstream"
VP8_PACKETIZE = "_packetize"
#: rtcsctptransport.py, ``RTCSctpTransport.__init__``: the deques of data-channel messages not
#: yet chunked, chunks not yet sent and chunks sent but not acknowledged; livediff waits for
#: them to empty so that a session's "ended" message is delivered before the peer closes.
SCTP_QUEUES = ("_data_channel_queue", "_outbound_queue", "_sent_queue")
#: rtcdtlstransport.py: ``RTCCertificate._create_ssl_context(srtp_profiles)``, the one place
#: aiortc makes an SSL context (called from ``RTCDtlsTransport.start``); livediff's DTLS
#: diagnostics add an info callback to each context (media/dtls_compat.py).
CERTIFICATE_CREATE_SSL_CONTEXT = "_create_ssl_context"
#: rtcdtlstransport.py, ``RTCDtlsTransport.__init__``: ``self._ssl = None``, the pyOpenSSL
#: connection from ``start``; the diagnostics find the reason recorded for it.
DTLS_SSL = "_ssl"

_MISSING = object()


class AiortcPrivateError(RuntimeError):
    """The installed aiortc lacks a private name that livediff relies on."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"aiortc {_installed_version()} lacks {', '.join(missing)}, which livediff uses "
            f"(checked on aiortc {', '.join(CHECKED_VERSIONS)}): install an aiortc release "
            "supported by livediff (see pyproject.toml), or update "
            "livediff.media.aiortc_private"
        )


# -- receiving: the jitter buffer ---------------------------------------------------------


def jitter_buffer_of(receiver: RTCRtpReceiver) -> JitterBuffer:
    """The receiver's jitter buffer, which livediff swaps for its marker-aware one."""
    buffer = getattr(receiver, RECEIVER_JITTER_BUFFER, None)
    if not isinstance(buffer, JitterBuffer):
        raise AiortcPrivateError([f"RTCRtpReceiver.{RECEIVER_JITTER_BUFFER}"])
    return buffer


def install_jitter_buffer(receiver: RTCRtpReceiver, buffer: JitterBuffer) -> None:
    """Make ``buffer`` the receiver's jitter buffer: aiortc exposes no setter, and the stock
    buffer releases a frame only when the next one begins (see :mod:`livediff.media.jitter`)."""
    jitter_buffer_of(receiver)  # refuses a receiver that keeps its buffer elsewhere
    setattr(receiver, RECEIVER_JITTER_BUFFER, buffer)


def jitter_ring(buffer: JitterBuffer) -> tuple[int | None, list[RtpPacket | None]]:
    """(sequence number at the ring's start, the ring itself) of a jitter buffer. The ring is
    aiortc's own list, indexed by sequence number modulo the capacity: read it, never change
    it. The marker-aware buffer reads it to find a frame whose last packet has arrived."""
    origin = getattr(buffer, JITTER_ORIGIN, _MISSING)
    packets = getattr(buffer, JITTER_PACKETS, _MISSING)
    if origin is _MISSING or packets is _MISSING:
        raise AiortcPrivateError(
            [f"JitterBuffer.{JITTER_ORIGIN}", f"JitterBuffer.{JITTER_PACKETS}"]
        )
    return cast(int | None, origin), cast(list[RtpPacket | None], packets)


def stock_remove_frame(buffer: JitterBuffer, sequence_number: int) -> JitterFrame | None:
    """aiortc's own frame release (``JitterBuffer._remove_frame``), for a subclass that
    overrides it (``add`` calls it by that name) and falls back to it."""
    remove_frame = _class_attribute(JitterBuffer, JITTER_REMOVE_FRAME)
    return cast(JitterFrame | None, remove_frame(buffer, sequence_number))


def depayloaded(packet: RtpPacket) -> bytes:
    """The bytes RTCRtpReceiver depayloaded from ``packet`` (b"" before it did), which a
    jitter buffer joins into a frame."""
    data = getattr(packet, PACKET_DATA, b"")
    return data if isinstance(data, bytes) else b""


def set_depayloaded(packet: RtpPacket, data: bytes) -> None:
    """Store ``data`` where RTCRtpReceiver stores a packet's depayloaded bytes (as the
    receiver does before handing the packet to its jitter buffer)."""
    setattr(packet, PACKET_DATA, data)


# -- sending: the encoder and the packetisers -----------------------------------------------


def sender_encoder(sender: RTCRtpSender) -> Encoder | None:
    """The sender's encoder; None until the first frame makes one (or one was installed)."""
    encoder = getattr(sender, SENDER_ENCODER, _MISSING)
    if encoder is _MISSING:
        raise AiortcPrivateError([f"RTCRtpSender.{SENDER_ENCODER}"])
    return cast(Encoder | None, encoder)


def install_sender_encoder(sender: RTCRtpSender, encoder: Encoder) -> None:
    """Make ``encoder`` the sender's: aiortc would otherwise build its own on the first frame,
    with bitrates and keyframe policy fixed as module constants."""
    sender_encoder(sender)  # refuses a sender that keeps its encoder elsewhere
    setattr(sender, SENDER_ENCODER, encoder)


def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list[RTCRtpCodecParameters]:
    """The codecs negotiation left the transceiver (first = the one sent); empty before."""
    codecs = getattr(transceiver, TRANSCEIVER_CODECS, _MISSING)
    if not isinstance(codecs, list):
        raise AiortcPrivateError([f"RTCRtpTransceiver.{TRANSCEIVER_CODECS}"])
    return cast(list[RTCRtpCodecParameters], codecs)


def h264_packetize(data: bytes) -> list[bytes]:
    """RTP payloads (RFC 6184: single NAL, STAP-A, FU-A) for one Annex B access unit; aiortc's
    H264Encoder has them, but only as private methods of an encoder livediff replaces."""
    split = _class_attribute(H264Encoder, H264_SPLIT_BITSTREAM)
    packetize = _class_attribute(H264Encoder, H264_PACKETIZE)
    return cast(list[bytes], packetize(split(data)))


def vp8_packetize(data: bytes, picture_id: int) -> list[bytes]:
    """RTP payloads (RFC 7741) for one VP8 frame with ``picture_id`` (15 bits); aiortc's
    Vp8Encoder has them, but only as a private method of an encoder livediff replaces."""
    packetize = _class_attribute(Vp8Encoder, VP8_PACKETIZE)
    return cast(list[bytes], packetize(data, picture_id))


def _class_attribute(owner: type, name: str) -> Callable[..., Any]:
    """``owner.name``, a method of aiortc's that livediff calls."""
    method = getattr(owner, name, None)
    if not callable(method):
        raise AiortcPrivateError([f"{owner.__name__}.{name}"])
    return cast(Callable[..., Any], method)


# -- data channels ------------------------------------------------------------------------


def sctp_pending(association: RTCSctpTransport) -> bool:
    """Whether the association still holds data: queued, in flight or not yet acknowledged.
    aiortc tells only how much a channel has not yet handed to SCTP (bufferedAmount); livediff
    waits for the peer to acknowledge its last message before closing."""
    queues = [getattr(association, name, _MISSING) for name in SCTP_QUEUES]
    missing = [
        f"RTCSctpTransport.{n}" for n, q in zip(SCTP_QUEUES, queues, strict=True) if q is _MISSING
    ]
    if missing:
        raise AiortcPrivateError(missing)
    return any(queues)


# -- DTLS -----------------------------------------------------------------------------------


def dtls_ssl_connection(transport: RTCDtlsTransport) -> SSL.Connection | None:
    """The transport's pyOpenSSL connection (None before it starts), whose failed handshake
    livediff explains: aiortc logs no reason."""
    connection = getattr(transport, DTLS_SSL, _MISSING)
    if connection is _MISSING:
        raise AiortcPrivateError([f"RTCDtlsTransport.{DTLS_SSL}"])
    return cast(SSL.Connection | None, connection)


#: Called with every SSL context aiortc makes for a DTLS transport, in the order added.
SslContextHook = Callable[[SSL.Context], None]
_ssl_context_hooks: list[SslContextHook] = []
_WRAPPED = "_livediff_wrapped"


def add_ssl_context_hook(hook: SslContextHook) -> None:
    """Call ``hook`` on each SSL context aiortc makes from now on (adding it again does
    nothing). ``RTCCertificate._create_ssl_context`` is the one place aiortc makes them, and
    livediff's DTLS diagnostics need an info callback on each (a public pyOpenSSL hook)."""
    _wrap_create_ssl_context()
    if hook not in _ssl_context_hooks:
        _ssl_context_hooks.append(hook)


def ssl_context_hooks() -> tuple[SslContextHook, ...]:
    """The hooks called on each new SSL context, in order."""
    return tuple(_ssl_context_hooks)


def remove_ssl_context_hook(hook: SslContextHook) -> None:
    """Stop calling ``hook`` on new SSL contexts (a hook never added is ignored)."""
    if hook in _ssl_context_hooks:
        _ssl_context_hooks.remove(hook)


def _wrap_create_ssl_context() -> None:
    """Wrap aiortc's context factory once, so that it runs the hooks on each new context."""
    original = getattr(RTCCertificate, CERTIFICATE_CREATE_SSL_CONTEXT, None)
    if not callable(original):
        raise AiortcPrivateError([f"RTCCertificate.{CERTIFICATE_CREATE_SSL_CONTEXT}"])
    if getattr(original, _WRAPPED, False):
        return

    def create_ssl_context(self: RTCCertificate, *args: Any, **kwargs: Any) -> SSL.Context:
        context: SSL.Context = original(self, *args, **kwargs)
        for hook in list(_ssl_context_hooks):
            hook(context)
        return context

    setattr(create_ssl_context, _WRAPPED, True)
    setattr(RTCCertificate, CERTIFICATE_CREATE_SSL_CONTEXT, create_ssl_context)


# -- the check ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Requirement:
    """A private name and how to see, without building anything, that aiortc still has it."""

    name: str
    present: Callable[[], bool]


def _method(owner: type, name: str) -> Callable[[], bool]:
    return lambda: callable(getattr(owner, name, None))


def _set_by(owner: type, attribute: str) -> Callable[[], bool]:
    """The attribute is an instance attribute that some method of ``owner`` names."""
    return lambda: any(attribute in names for names in _code_names(owner))


def _called_by(owner: type, method: str, name: str) -> Callable[[], bool]:
    """``owner.method`` (looked up when the check runs) calls or reads ``name``."""
    return lambda: name in _names_in(getattr(getattr(owner, method, None), "__code__", None))


def _code_names(owner: type) -> Iterator[tuple[str, ...]]:
    """The attribute and global names that each function defined in ``owner`` uses."""
    for value in vars(owner).values():
        function = value
        if isinstance(value, staticmethod | classmethod):
            function = value.__func__
        elif isinstance(value, property):
            function = value.fget
        if isinstance(function, FunctionType):
            yield _names_in(function.__code__)


def _names_in(code: CodeType | None) -> tuple[str, ...]:
    """co_names of ``code`` and of the functions and comprehensions nested in it."""
    if code is None:
        return ()
    nested = (const for const in code.co_consts if isinstance(const, CodeType))
    return code.co_names + tuple(name for inner in nested for name in _names_in(inner))


REQUIREMENTS = (
    _Requirement(
        f"RTCRtpReceiver.{RECEIVER_JITTER_BUFFER}", _set_by(RTCRtpReceiver, RECEIVER_JITTER_BUFFER)
    ),
    _Requirement(
        f"RtpPacket.{PACKET_DATA} (set by RTCRtpReceiver)", _set_by(RTCRtpReceiver, PACKET_DATA)
    ),
    _Requirement(f"JitterBuffer.{JITTER_ORIGIN}", _set_by(JitterBuffer, JITTER_ORIGIN)),
    _Requirement(f"JitterBuffer.{JITTER_PACKETS}", _set_by(JitterBuffer, JITTER_PACKETS)),
    _Requirement(f"JitterBuffer.{JITTER_REMOVE_FRAME}", _method(JitterBuffer, JITTER_REMOVE_FRAME)),
    _Requirement(
        f"JitterBuffer.add calling {JITTER_REMOVE_FRAME}",
        _called_by(JitterBuffer, "add", JITTER_REMOVE_FRAME),
    ),
    _Requirement(f"RTCRtpSender.{SENDER_ENCODER}", _set_by(RTCRtpSender, SENDER_ENCODER)),
    _Requirement(
        f"RTCRtpTransceiver.{TRANSCEIVER_CODECS}", _set_by(RTCRtpTransceiver, TRANSCEIVER_CODECS)
    ),
    _Requirement(f"H264Encoder.{H264_PACKETIZE}", _method(H264Encoder, H264_PACKETIZE)),
    _Requirement(f"H264Encoder.{H264_SPLIT_BITSTREAM}", _method(H264Encoder, H264_SPLIT_BITSTREAM)),
    _Requirement(f"Vp8Encoder.{VP8_PACKETIZE}", _method(Vp8Encoder, VP8_PACKETIZE)),
    *(_Requirement(f"RTCSctpTransport.{q}", _set_by(RTCSctpTransport, q)) for q in SCTP_QUEUES),
    _Requirement(
        f"RTCCertificate.{CERTIFICATE_CREATE_SSL_CONTEXT}",
        _method(RTCCertificate, CERTIFICATE_CREATE_SSL_CONTEXT),
    ),
    _Requirement(f"RTCDtlsTransport.{DTLS_SSL}", _set_by(RTCDtlsTransport, DTLS_SSL)),
)


def missing_names() -> list[str]:
    """Each private name of :data:`REQUIREMENTS` that the installed aiortc lacks."""
    return [requirement.name for requirement in REQUIREMENTS if not requirement.present()]


def check() -> None:
    """Raise :class:`AiortcPrivateError` naming every private name that the installed aiortc
    lacks; return quietly when it has them all."""
    missing = missing_names()
    if missing:
        raise AiortcPrivateError(missing)


def _installed_version() -> str:
    try:
        return importlib.metadata.version("aiortc")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
