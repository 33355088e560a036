"""Why a DTLS handshake failed, which aiortc does not say: chiefly FFmpeg's P-224 certificate.

The failure (issue 13)
    FFmpeg 8 built with GnuTLS (such as the FFmpeg 8.1 inside PyAV 18.1's wheels) makes
    its WHIP certificate in ``tls_gnutls.c`` with ``gnutls_sec_param_to_pk_bits(GNUTLS_PK_ECDSA,
    GNUTLS_SEC_PARAM_MEDIUM)``, i.e. an ECDSA key on **secp224r1** (P-224). RFC 8422 deprecates
    that curve for TLS and RFC 8827 section 6.5 asks WebRTC for P-256. aiortc's OpenSSL (the one
    in the ``cryptography`` wheel, 4.0 with cryptography 50) no longer knows P-224 as a TLS group,
    so it refuses the certificate with "wrong curve" and a fatal illegal_parameter alert, in
    either DTLS role: FFmpeg then logs "A TLS fatal alert has been received." and "DTLS session
    failed". Nothing in the SDP answer can change that (FFmpeg's ``whip_flags=dtls_active`` fails
    the same way); the publisher has to bring a P-256 certificate (FFmpeg's ``cert_file`` and
    ``key_file`` options), or an FFmpeg built with OpenSSL, whose backend uses prime256v1.

What aiortc does wrong
    ``RTCDtlsTransport._recv_next`` feeds each handshake datagram to ``SSL.Connection.recv`` and
    turns the ``SSL.Error`` it raises, reason and all, into ``data = b""``. The next
    ``do_handshake`` then fails with an empty error queue, so aiortc logs "DTLS handshake failed
    (error [])" and the connection goes "failed" with no cause anywhere.

Evidence (aiortc 1.16.0, pyOpenSSL 26.4.0, cryptography 50.0.2 / OpenSSL 4.0.3, PyAV 18.1.0 /
FFmpeg 8.1.2 with GnuTLS, on loopback)
    - FFmpeg's Certificate message (CN=lavf): public key on curve OID 1.3.132.0.33, secp224r1;
    - aiortc's ClientHello offers the groups x25519, secp256r1, x448, secp384r1, secp521r1;
    - on FFmpeg's ServerKeyExchange (aiortc as DTLS client), or on its CertificateVerify with
      ``whip_flags=dtls_active`` (aiortc as server), OpenSSL raises
      ``Error([('SSL routines', '', 'wrong curve')])`` and writes alert 2/47;
    - ``SSL_CTX_set1_curves_list`` refuses "P-224" on this OpenSSL, so the group cannot be
      allowed back from here;
    - the same FFmpeg with ``cert_file``/``key_file`` holding a P-256 key connects and streams.

What this module does
    :func:`install` (which the service calls when it starts) adds an info callback, a public
    pyOpenSSL hook, to every SSL context aiortc makes, through
    :func:`livediff.media.aiortc_private.add_ssl_context_hook` (aiortc makes them in a private
    method). When a fatal alert goes out or comes in during a handshake it records why, naming
    the curve when the remote certificate is on one that OpenSSL will not take.
    :func:`failure_reason` gives that text for a peer connection, so the peer's end carries it.
    It changes no handshake.

When to remove it
    When aiortc reports the OpenSSL reason of a failed handshake itself, and the FFmpeg bundled
    by PyAV makes P-256 certificates with GnuTLS (ossrs/ffmpeg-webrtc pull request 70 makes
    tls_gnutls.c use P-256). Until then, removing it only loses the explanation.
"""

from __future__ import annotations

import logging
import weakref

from aiortc import RTCPeerConnection
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from livediff.media import aiortc_private

logger = logging.getLogger(__name__)

#: ECDSA curves that OpenSSL accepts for a DTLS 1.2 peer certificate (RFC 8422 section 5.1.1).
ACCEPTED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
ALERTS = {
    10: "unexpected_message",
    20: "bad_record_mac",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    47: "illegal_parameter",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    110: "unsupported_extension",
}
FATAL = 2

_reasons: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()


def install() -> None:
    """Watch every DTLS handshake aiortc starts from now on (safe to call more than once).
    On an aiortc that makes its SSL contexts elsewhere, DTLS failures just have no reason."""
    try:
        aiortc_private.add_ssl_context_hook(_watch)
    except aiortc_private.AiortcPrivateError as exc:
        logger.warning("DTLS failures will have no reason: %s", exc)


def installed() -> bool:
    """Whether :func:`install` ran (and aiortc let it watch its handshakes)."""
    return _watch in aiortc_private.ssl_context_hooks()


def _watch(context: SSL.Context) -> None:
    """Have OpenSSL report each alert of handshakes made with ``context``."""
    context.set_info_callback(_on_info)


def failure_reason(pc: RTCPeerConnection) -> str | None:
    """Why a DTLS handshake of ``pc`` failed, when a fatal alert was seen; otherwise None."""
    transports = [t.sender.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for transport in transports:
        try:
            connection = aiortc_private.dtls_ssl_connection(transport)
        except aiortc_private.AiortcPrivateError as exc:  # diagnostics only: the peer goes on
            logger.warning("cannot tell why DTLS failed: %s", exc)
            return None
        if connection is not None and connection in _reasons:
            return _reasons[connection]
    return None


def _on_info(connection: SSL.Connection, where: int, ret: int) -> None:
    if not where & SSL.SSL_CB_ALERT or ret >> 8 != FATAL or connection in _reasons:
        return
    try:
        _reasons[connection] = _explain(connection, sent=bool(where & SSL.SSL_CB_WRITE), ret=ret)
    except Exception:  # an exception must not cross into OpenSSL's C callback
        logger.debug("could not explain a DTLS alert", exc_info=True)


def _explain(connection: SSL.Connection, *, sent: bool, ret: int) -> str:
    alert = ALERTS.get(ret & 0xFF, f"alert {ret & 0xFF}")
    certificate = connection.get_peer_certificate(as_cryptography=True)
    key = certificate.public_key() if certificate is not None else None
    if sent and isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve.name
        if curve not in ACCEPTED_CURVES:
            return (
                f"the remote DTLS certificate's ECDSA key is on {curve}, which OpenSSL refuses "
                f"in DTLS 1.2 (fatal {alert} alert); FFmpeg built with GnuTLS makes such keys "
                "for WHIP: give it a P-256 certificate (its cert_file and key_file options)"
            )
    if sent:
        return f"DTLS handshake aborted by livediff (fatal {alert} alert)"
    return f"DTLS handshake refused by the remote peer (fatal {alert} alert)"
