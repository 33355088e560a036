"""Checks on an SDP offer, so that a bad one gets a reason instead of a traceback."""

from __future__ import annotations

from dataclasses import dataclass

from aiortc import RTCRtpReceiver
from aiortc import sdp as aiortc_sdp

SUPPORTED_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class OfferError(ValueError):
    """The offer cannot be answered; the message says why (HTTP 400)."""


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


def parse_offer(text: str) -> Offer:
    """Parse and check an offer; raises :class:`OfferError` with the reason."""
    if not text.strip():
        raise OfferError("the SDP offer is empty")
    if not text.lstrip().startswith("v=0"):
        raise OfferError("malformed SDP: an SDP description starts with 'v=0'")
    normalised = text.replace("\r\n", "\n").replace("\n", "\r\n")
    try:
        description = aiortc_sdp.SessionDescription.parse(normalised)
    except (AssertionError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise OfferError(f"malformed SDP: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
    videos = [m for m in description.media if m.kind == "video"]
    audios = [m for m in description.media if m.kind == "audio"]
    if not videos:
        raise OfferError("the offer has no video m-line (m=video)")
    if len(videos) > 1 or len(audios) > 1:
        raise OfferError("the offer may carry at most one video and one audio m-line")
    for media in (*videos, *audios):
        _check_media(media)
    return Offer(
        sdp=normalised,
        video=MediaLine("video", videos[0].direction or "sendrecv"),
        audio=MediaLine("audio", audios[0].direction or "sendrecv") if audios else None,
        has_data_channel=any(m.kind == "application" for m in description.media),
    )


def _check_media(media: aiortc_sdp.MediaDescription) -> None:
    if media.direction not in (None, *SUPPORTED_DIRECTIONS):
        raise OfferError(f"unknown direction {media.direction!r} on the {media.kind} m-line")
    if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
        raise OfferError(f"the {media.kind} m-line lacks a=ice-ufrag / a=ice-pwd")
    if media.dtls is None or not media.dtls.fingerprints:
        raise OfferError(f"the {media.kind} m-line lacks a=fingerprint (DTLS)")
    capabilities = RTCRtpReceiver.getCapabilities(media.kind)
    supported = {c.mimeType.lower() for c in capabilities.codecs} if capabilities else set()
    offered = [c.mimeType for c in media.rtp.codecs if c.mimeType.lower() != f"{media.kind}/rtx"]
    if not any(name.lower() in supported for name in offered):
        names = ", ".join(sorted(n.split("/")[1] for n in supported if not n.endswith("/rtx")))
        raise OfferError(
            f"no {media.kind} codec in common: the offer has {offered or 'none'}, "
            f"livediff takes {names}"
        )
