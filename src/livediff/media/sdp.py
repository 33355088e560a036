"""Checks on an SDP offer, so that a bad one gets a reason instead of a traceback.

aiortc's parser trusts its input: a line it cannot read raises whatever Python raises there (an
AttributeError for an attribute without its value, StopIteration for an ``a=fmtp`` whose payload
type has no ``a=rtpmap``, a bare AssertionError for a malformed ``m=`` line, ...). Every such
failure becomes an :class:`OfferError` naming the first line that aiortc cannot read, and the
checks below refuse what aiortc would parse but then fail to answer (an m-line without a direction
or a unique ``a=mid``, a BUNDLE group naming no m-line, an unknown media kind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import takewhile

from aiortc import RTCRtpReceiver
from aiortc import sdp as aiortc_sdp

SUPPORTED_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
#: DTLS fingerprint algorithms aiortc verifies, with their digest size in bytes.
FINGERPRINT_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
#: Attributes that aiortc reads only with a value (``a=name:value``).
VALUED_ATTRIBUTES = frozenset(
    {
        "candidate",
        "extmap",
        "fingerprint",
        "fmtp",
        "group",
        "max-message-size",
        "msid-semantic",
        "rtcp",
        "rtcp-fb",
        "rtpmap",
        "sctp-port",
        "sctpmap",
        "setup",
        "ssrc",
        "ssrc-group",
    }
)
#: What some lines must look like, for the reason given when aiortc cannot read one.
LINE_FORMS = {
    "m=": "m=<audio|video|application> <port> <protocol> <formats> (payload types 0-255,"
    " not 72-76)",
    "c=": "c=IN IP4 <address> or c=IN IP6 <address>",
    "a=candidate:": "a=candidate:<foundation> <component> <transport> <priority> <address>"
    " <port> typ <type>",
    "a=rtpmap:": "a=rtpmap:<payload type> <codec>/<clock rate>[/<channels>]",
    "a=fmtp:": "a=fmtp:<payload type> <parameters>",
    "a=fingerprint:": "a=fingerprint:<algorithm> <hex bytes AB:CD:...>",
    "a=extmap:": "a=extmap:<id>[/<direction>] <uri>",
    "a=rtcp:": "a=rtcp:<port> [IN IP4 <address>]",
    "a=ssrc:": "a=ssrc:<ssrc> <attribute>:<value>",
    "a=setup:": "a=setup:actpass, a=setup:active or a=setup:passive",
}
#: Lines searched for the one that broke a parse (each is parsed on its own); offers from
#: browsers have a few hundred.
MAX_SEARCHED_LINES = 2000
_FINGERPRINT_VALUE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")


class OfferError(ValueError):
    """The offer cannot be answered; the message says why (HTTP 400)."""

    reason = "bad_offer"


class OfferTooLargeError(OfferError):
    """The offer is larger, or has more m-lines, than the server takes (HTTP 400)."""

    reason = "offer_too_large"


@dataclass(frozen=True, slots=True)
class OfferLimits:
    """How large an offer may be (``max_sdp_bytes``, ``max_sdp_media``), checked before it is
    parsed."""

    max_bytes: int = 64 * 1024
    max_media: int = 3


@dataclass(frozen=True, slots=True)
class MediaLine:
    kind: str
    direction: str


@dataclass(frozen=True, slots=True)
class Offer:
    sdp: str
    video: MediaLine
    audio: MediaLine | None
    has_data_channel: bool

    @property
    def sends_video(self) -> bool:
        return self.video.direction in ("sendrecv", "sendonly")

    @property
    def receives_video(self) -> bool:
        return self.video.direction in ("sendrecv", "recvonly")


def parse_offer(text: str, limits: OfferLimits | None = None) -> Offer:
    """Parse and check an offer; raises :class:`OfferError` with the reason. With ``limits``
    (the server always gives its own), a larger offer is refused before it is parsed."""
    if not text.strip():
        raise OfferError("the SDP offer is empty")
    if not text.lstrip().startswith("v=0"):
        raise OfferError("malformed SDP: an SDP description starts with 'v=0'")
    if limits is not None:
        check_size(text, limits)
    normalised = text.replace("\r\n", "\n").replace("\n", "\r\n")
    description = _parse(normalised)
    videos = [m for m in description.media if m.kind == "video"]
    audios = [m for m in description.media if m.kind == "audio"]
    applications = [m for m in description.media if m.kind == "application"]
    if not videos:
        raise OfferError("the offer has no video m-line (m=video)")
    if len(videos) > 1 or len(audios) > 1 or len(applications) > 1:
        raise OfferError(
            "the offer may carry at most one video, one audio and one application m-line"
        )
    _check_media_lines(description)
    for media in description.media:
        _check_transport(media)
    for media in (*videos, *audios):
        _check_codecs(media)
    return Offer(
        sdp=normalised,
        video=MediaLine("video", str(videos[0].direction)),
        audio=MediaLine("audio", str(audios[0].direction)) if audios else None,
        has_data_channel=bool(applications),
    )


def check_size(text: str, limits: OfferLimits) -> None:
    """Refuse an offer over the byte or m-line limit before anything parses it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise OfferTooLargeError(
            f"the SDP offer is {size} bytes; at most {limits.max_bytes} are accepted"
            " (max_sdp_bytes)"
        )
    media = sum(1 for line in text.splitlines() if line.startswith("m="))
    if media > limits.max_media:
        raise OfferTooLargeError(
            f"the SDP offer has {media} m-lines; at most {limits.max_media} are accepted"
            " (max_sdp_media: one video, and optionally one audio and one application)"
        )


def _parse(sdp: str) -> aiortc_sdp.SessionDescription:
    try:
        return aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the text provokes
        raise OfferError(_malformed(sdp, exc)) from exc


def _malformed(sdp: str, exc: Exception) -> str:
    """The reason for a parse failure: the first line aiortc cannot read, and what is wrong."""
    found = _first_unreadable_line(sdp.splitlines())
    if found is None:
        return f"malformed SDP: {_describe(exc)}"
    number, line, error = found
    shown = line if len(line) <= 80 else line[:77] + "..."
    return f"malformed SDP: line {number} ({shown!r}) {_line_problem(line, error)}"


def _first_unreadable_line(lines: list[str]) -> tuple[int, str, Exception] | None:
    """(number, line, error) of the first line that aiortc refuses with only what that line
    depends on (its m-line; for an a=fmtp also the a=rtpmap of its payload type), or None."""
    searched = lines[:MAX_SEARCHED_LINES]
    m_line: str | None = None
    rtpmaps: dict[str, list[str]] = {}
    for index, line in enumerate(searched):
        context: list[str] = []
        if line.startswith("m="):
            m_line = line
            rtpmaps = {}
            group = takewhile(lambda later: not later.startswith("m="), searched[index + 1 :])
            for later in group:
                if later.startswith("a=rtpmap:") and _refusal(["v=0", line, later]) is None:
                    rtpmaps.setdefault(_payload_type(later), []).append(later)
        elif m_line is not None:
            context = [m_line]
            if line.startswith("a=fmtp:"):
                context += rtpmaps.get(_payload_type(line), [])
        error = _refusal(["v=0", *context, line])
        if error is not None:
            return index + 1, line, error
    return None


def _refusal(lines: list[str]) -> Exception | None:
    try:
        aiortc_sdp.SessionDescription.parse("\r\n".join(lines))
    except Exception as exc:  # anything the parser raises means it cannot read these lines
        return exc
    return None


def _payload_type(line: str) -> str:
    return line.partition(":")[2].partition(" ")[0]


def _line_problem(line: str, error: Exception) -> str:
    if line.startswith("a="):
        name, value = aiortc_sdp.parse_attr(line)
        if name in VALUED_ATTRIBUTES and not (value or "").strip():
            return f"needs a value: a={name}:<value>"
        if name == "fmtp" and isinstance(error, StopIteration):
            return "names a payload type that has no a=rtpmap line in its m-line"
    form = next((form for prefix, form in LINE_FORMS.items() if line.startswith(prefix)), None)
    if form is not None:
        return f"cannot be read ({_describe(error)}); the form is {form}"
    return f"cannot be read: {_describe(error)}"


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_media_lines(description: aiortc_sdp.SessionDescription) -> None:
    """What aiortc's answer needs: known kinds, directions, rtcp-mux, one a=mid per m-line and
    a BUNDLE group of those mids."""
    mids: set[str] = set()
    for media in description.media:
        if media.kind not in ("audio", "video", "application"):
            raise OfferError(
                f"m={media.kind} is not supported: an offer has m=video, and may add m=audio"
                " and m=application (the params data channel)"
            )
        if media.kind != "application":
            _check_rtp_line(media)
        mid = media.rtp.muxId
        if not mid:
            raise OfferError(f"the {media.kind} m-line lacks a=mid (each m-line needs one)")
        if mid in mids:
            raise OfferError(f"a=mid:{mid} is on two m-lines (each needs its own)")
        mids.add(mid)
        if media.msid is not None and " " in media.msid and len(media.msid.split()) < 2:
            raise OfferError(f"the {media.kind} m-line's a=msid must read <stream id> <track id>")
    for group in description.group:
        unknown = [str(item) for item in group.items if str(item) not in mids]
        if group.semantic == "BUNDLE" and unknown:
            raise OfferError(
                f"a=group:BUNDLE names {', '.join(unknown)}, which no m-line has as its a=mid"
            )


def _check_rtp_line(media: aiortc_sdp.MediaDescription) -> None:
    if media.direction not in SUPPORTED_DIRECTIONS:
        raise OfferError(
            f"the {media.kind} m-line has no direction: add a=sendrecv, a=sendonly,"
            " a=recvonly or a=inactive"
        )
    if not media.rtcp_mux:
        raise OfferError(f"the {media.kind} m-line lacks a=rtcp-mux (RTP and RTCP share a port)")


def _check_transport(media: aiortc_sdp.MediaDescription) -> None:
    """ICE credentials and a DTLS fingerprint that aiortc can verify, on every m-line."""
    if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
        raise OfferError(f"the {media.kind} m-line lacks a=ice-ufrag / a=ice-pwd")
    if media.dtls is None:
        raise OfferError(
            f"the {media.kind} m-line lacks a=setup (actpass, active or passive) for DTLS"
        )
    if not media.dtls.fingerprints:
        raise OfferError(f"the {media.kind} m-line lacks a=fingerprint (DTLS)")
    usable = False
    for fingerprint in media.dtls.fingerprints:
        size = FINGERPRINT_BYTES.get(fingerprint.algorithm.lower())
        if size is None:
            continue
        if not _FINGERPRINT_VALUE.fullmatch(fingerprint.value) or len(fingerprint.value) != (
            3 * size - 1
        ):
            raise OfferError(
                f"a=fingerprint:{fingerprint.algorithm} on the {media.kind} m-line must be"
                f" {size} hex bytes separated by colons (AB:CD:...)"
            )
        usable = True
    if not usable:
        raise OfferError(
            f"no a=fingerprint on the {media.kind} m-line uses an algorithm livediff checks"
            f" ({', '.join(FINGERPRINT_BYTES)})"
        )


def _check_codecs(media: aiortc_sdp.MediaDescription) -> None:
    capabilities = RTCRtpReceiver.getCapabilities(media.kind)
    supported = {c.mimeType.lower() for c in capabilities.codecs} if capabilities else set()
    offered = [c.mimeType for c in media.rtp.codecs if c.mimeType.lower() != f"{media.kind}/rtx"]
    if not any(name.lower() in supported for name in offered):
        names = ", ".join(sorted(n.split("/")[1] for n in supported if not n.endswith("/rtx")))
        raise OfferError(
            f"no {media.kind} codec in common: the offer has {offered or 'none'}, "
            f"livediff takes {names}"
        )
