"""Which errors while an offer is applied are the offer's fault (400) and which are livediff's.

aiortc refuses a broken offer by raising, from its own code, ValueError, TypeError,
AttributeError, KeyError, IndexError, AssertionError, StopIteration or its OperationError.
Only those become an OfferError; the same types raised by livediff's own code are bugs, which
must stay what they are: a 500 with the traceback in the log, never "offer refused".
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING
from unittest.mock import MagicMock

import httpx
import pytest
from aiortc import RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from livediff.config import Settings
from livediff.engine.session import Session
from livediff.media import peer
from livediff.media.peer import PublisherPeer, _refused_by_aiortc
from livediff.media.sdp import OfferError, parse_offer
from livediff.server.errors import status_for
from livediff.testing.peers import client_peer
from tests.media.test_offer_fuzz import drop, edit
from tests.strategies import RealOffers, real_offers

if TYPE_CHECKING:
    from livediff.testing.servers import LiveServer


@pytest.fixture(scope="module")
def offers() -> RealOffers:
    return asyncio.run(real_offers())


# Each case: how the camera offer is broken (parse_offer would refuse it first; here it goes
# straight to aiortc), and what aiortc's own error says.
AIORTC_REFUSES: dict[str, tuple[Callable[[str], str], str]] = {
    "no ICE credentials": (
        lambda o: drop(o, "a=ice-ufrag"),
        "ICE username fragment or password is missing",  # ValueError
    ),
    "unknown direction": (
        lambda o: edit(o, "a=sendrecv", "a=sendrecv6226"),
        "None is not in list",  # ValueError, from createAnswer
    ),
    "broken c= line": (lambda o: edit(o, "c=IN IP4", "c=IN IP7"), "AssertionError"),
    "fmtp without rtpmap": (lambda o: drop(o, "a=rtpmap:98 "), "StopIteration"),
    "unknown setup role": (lambda o: edit(o, "a=setup:actpass", "a=setup:sideways"), "sideways"),
    "msid without track": (
        lambda o: edit(o, "a=msid:", "a=msid: \r\na=x:"),
        "list index out of range",  # IndexError
    ),
    "no setup": (
        lambda o: drop(o, "a=setup:"),
        "'NoneType' object has no attribute 'role'",  # AttributeError
    ),
}


@pytest.mark.parametrize("case", list(AIORTC_REFUSES))
async def test_what_aiortc_raises_on_a_broken_offer_is_a_refusal(
    offers: RealOffers, case: str
) -> None:
    breaking, reason = AIORTC_REFUSES[case]
    pc = client_peer()
    pc.addTransceiver("video", direction="sendrecv")
    try:
        with pytest.raises(OfferError) as refused, _refused_by_aiortc():
            await pc.setRemoteDescription(RTCSessionDescription(breaking(offers.camera), "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
    finally:
        await pc.close()
    assert str(refused.value).startswith("the offer was refused: ")
    assert reason in str(refused.value)
    assert status_for(refused.value) == 400


def test_a_type_error_of_aiortcs_parser_is_a_refusal() -> None:
    """aiortc's parser calls int() on a missing value: a TypeError, raised in aiortc."""
    text = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=max-message-size\r\n"
    with pytest.raises(OfferError, match=r"refused: int\(\) argument"), _refused_by_aiortc():
        aiortc_sdp.SessionDescription.parse(text)


@pytest.mark.parametrize("kind", [TypeError, AttributeError, ValueError, IndexError])
def test_an_error_raised_by_livediff_is_not_a_refusal(kind: type[Exception]) -> None:
    with pytest.raises(kind) as raised, _refused_by_aiortc():
        raise kind("a bug, not the offer")
    assert not isinstance(raised.value, OfferError)


def a_publisher() -> PublisherPeer:
    session = MagicMock(spec=Session)
    session.id = "0123456789abcdef"
    return PublisherPeer(session, Settings())


async def test_a_type_error_of_livediffs_own_while_aiortc_applies_the_offer_is_no_refusal(
    offers: RealOffers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiortc calls livediff's track handler from inside setRemoteDescription; a TypeError
    raised there (here a call with the wrong arguments) has aiortc's frames above it, but it is
    livediff's bug: it stays a TypeError, which the service answers with a 500."""
    monkeypatch.setattr(peer, "pump_video", len)  # len(track, session) in _on_track
    publisher = a_publisher()
    try:
        with pytest.raises(TypeError) as raised:
            await publisher.accept(parse_offer(offers.camera))
    finally:
        await publisher.close()
    assert status_for(raised.value) is None  # a bug: 500
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert frames[-1].name == "_on_track"
    assert any("/aiortc/" in frame.filename for frame in frames)


async def test_the_service_answers_a_bug_in_offer_handling_with_a_500_and_logs_it(
    offers: RealOffers,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    server: LiveServer,
) -> None:
    """The same bug through POST /v1/sessions: a 500, and the traceback in uvicorn's log."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(caplog.handler)  # uvicorn's loggers do not reach the root one
    monkeypatch.setattr(peer, "pump_video", len)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            answered = await http.post("/v1/sessions", json={"sdp": offers.camera})
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert answered.status_code == 500, answered.text
    assert server.service.records == {}  # the half-opened session was closed
    logged = [r.exc_info for r in caplog.records if r.exc_info is not None]
    assert logged, caplog.records
    kind, _, tb = logged[0]
    assert kind is TypeError and "_on_track" in "".join(traceback.format_tb(tb))
