"""Offer checks give a reason for every refusal."""

from __future__ import annotations

import pytest

from livediff.media.sdp import OfferError, parse_offer
from livediff.testing.peers import NumberedVideoTrack, add_camera, client_peer, local_offer


async def browser_like_offer(direction: str = "sendrecv") -> str:
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(64, 64), direction=direction)
    try:
        return await local_offer(pc)
    finally:
        await pc.close()


async def test_a_real_offer_is_accepted() -> None:
    offer = parse_offer(await browser_like_offer())
    assert offer.video.direction == "sendrecv" and offer.sends_video and offer.receives_video
    assert offer.audio is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("hello", "starts with 'v=0'"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "no video m-line"),
        ("v=0\r\nm=video abc UDP/TLS/RTP/SAVPF x\r\n", "malformed SDP"),
    ],
)
def test_broken_offers_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(OfferError, match=reason):
        parse_offer(text)


async def test_an_offer_without_ice_credentials_is_refused() -> None:
    text = await browser_like_offer()
    stripped = "\r\n".join(line for line in text.splitlines() if not line.startswith("a=ice-"))
    with pytest.raises(OfferError, match="ice-ufrag"):
        parse_offer(stripped)


async def test_an_offer_without_a_common_codec_is_refused() -> None:
    text = await browser_like_offer()
    swapped = text.replace("VP8/90000", "AV1/90000").replace("H264/90000", "AV1/90000")
    with pytest.raises(OfferError, match="no video codec in common"):
        parse_offer(swapped)
