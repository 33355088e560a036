"""parse_offer on broken offers: an Offer or an OfferError with a reason, never anything else.

The regression cases are offers that made aiortc raise where livediff expected an OfferError
(each was a 500 on POST /whip, /v1/sessions or /whep/{id}; issue 12).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livediff.media.sdp import MAX_SEARCHED_LINES, OfferError, parse_offer
from tests.strategies import RealOffers, mutated_offers, real_offers


@pytest.fixture(scope="module")
def offers() -> RealOffers:
    return asyncio.run(real_offers())


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_mutated_offer_parses_or_is_refused_with_a_reason(
    offers: RealOffers, data: st.DataObject
) -> None:
    text = data.draw(mutated_offers((offers.camera, offers.full, offers.viewer)), label="offer")
    try:
        parse_offer(text)
    except OfferError as exc:
        assert len(str(exc)) > 10


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    assert old in text, old
    return text.replace(old, new, count)


def drop(text: str, prefix: str) -> str:
    lines = text.split("\r\n")
    kept = [line for line in lines if not line.startswith(prefix)]
    assert len(kept) < len(lines), prefix
    return "\r\n".join(kept)


# Each case: how the camera offer is broken, and what the refusal must say.
BROKEN = {
    # aiortc's parser raised StopIteration (a RuntimeError once inside a coroutine)
    "fmtp without rtpmap": (
        lambda o: drop(o, "a=rtpmap:98 "),
        "('a=fmtp:98 apt=97') names a payload type that has no a=rtpmap",
    ),
    # ... and AttributeError on an attribute without its value
    "fingerprint without value": (
        lambda o: edit(o, "a=setup:actpass", "a=fingerprint\r\na=setup:actpass"),
        "('a=fingerprint') needs a value",
    ),
    "candidate without value": (
        lambda o: edit(o, "a=end-of-candidates", "a=candidate\r\na=end-of-candidates"),
        "('a=candidate') needs a value",
    ),
    "ssrc without value": (lambda o: edit(o, "a=rtcp-mux", "a=rtcp-mux\r\na=ssrc"), "a=ssrc"),
    "group without value": (lambda o: edit(o, "a=group:BUNDLE 0", "a=group"), "a=group"),
    # ... and a bare AssertionError
    "huge payload type": (
        lambda o: edit(o, " 97 98", " 97 99999999999999999999 98"),
        "the form is m=<audio|video|application>",
    ),
    "broken c= line": (lambda o: edit(o, "c=IN IP4", "c=IN IP7"), "the form is c=IN IP4"),
    # aiortc's createAnswer raised ValueError ('None is not in list')
    "unknown direction": (lambda o: edit(o, "a=sendrecv", "a=sendrecv6226"), "no direction"),
    # ... and AttributeError ('NoneType' object has no attribute 'transport')
    "BUNDLE naming no m-line": (
        lambda o: edit(o, "a=group:BUNDLE 0", "a=group:BUNDLE 7"),
        "BUNDLE names 7",
    ),
    # setLocalDescription raised ValueError ('Media sections in answer do not match offer')
    "no mid": (lambda o: drop(o, "a=mid:"), "lacks a=mid"),
    # setRemoteDescription raised IndexError
    "msid without track": (lambda o: edit(o, "a=msid:", "a=msid: \r\na=x:"), "a=msid must read"),
    # answered, but the session could only fail later (DTLS cannot verify the peer)
    "short fingerprint": (
        lambda o: edit(o, "a=fingerprint:sha-256 ", "a=fingerprint:sha-256 AB:"),
        "must be 32 hex bytes",
    ),
    "unknown fingerprint algorithm": (
        lambda o: edit(o, "a=fingerprint:sha-", "a=fingerprint:md5-", count=-1),
        "no a=fingerprint on the video m-line uses an algorithm",
    ),
    "no setup": (lambda o: drop(o, "a=setup:"), "lacks a=setup"),
    "no rtcp-mux": (lambda o: drop(o, "a=rtcp-mux"), "lacks a=rtcp-mux"),
    "unknown media kind": (
        lambda o: o + "m=text 9 RTP/AVP 0\r\na=mid:9\r\n",
        "m=text is not supported",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_offer_that_aiortc_could_not_take_is_refused_with_a_reason(
    offers: RealOffers, case: str
) -> None:
    breaking, reason = BROKEN[case]
    with pytest.raises(OfferError) as refused:
        parse_offer(breaking(offers.camera))
    assert reason in str(refused.value)


def test_a_line_is_named_by_its_number(offers: RealOffers) -> None:
    lines = offers.camera.split("\r\n")
    index = next(i for i, line in enumerate(lines) if line.startswith("a=rtcp:"))
    lines[index] = "a=rtcp:many"
    with pytest.raises(OfferError, match=rf"line {index + 1} \('a=rtcp:many'\) cannot be read"):
        parse_offer("\r\n".join(lines))


def test_a_huge_offer_is_refused_quickly(offers: RealOffers) -> None:
    """A bad line beyond the searched ones still gets a reason (aiortc's), in bounded time."""
    padding = "\r\n".join(f"a=x-filler:{n}" for n in range(MAX_SEARCHED_LINES * 20))
    broken = edit(offers.camera, "a=rtcp-mux", padding + "\r\na=rtcp-mux\r\na=rtpmap:1")
    with pytest.raises(OfferError, match="malformed SDP: "):
        parse_offer(broken)
