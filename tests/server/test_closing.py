"""A session that is closing, or has just ended, as concurrent requests see it (issue 19).

Closing is one state change of the session's record (open -> closing -> ended), so every request
that races a close gets one of the statuses the API documents: never a 500, never a reset
connection. A DELETE of a session that ended on its own (its publisher closed the peer
connection first, as RFC 9725 clients do) succeeds and keeps the reason it ended for.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from aiortc import RTCPeerConnection

from livediff.testing.peers import (
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)
from livediff.testing.servers import LiveServer
from tests.server.streaming import publish, wait_until

SDP = {"content-type": "application/sdp"}
FRAGMENT = {"content-type": "application/trickle-ice-sdpfrag"}
CANDIDATE = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
#: What the API documents for each request of the burst (README, HTTP API and its errors).
DOCUMENTED = {
    "DELETE /whip": {200, 404},
    "PATCH /whip": {204, 404},
    "POST /whep": {201, 404},
    "GET /v1/sessions": {200, 404},
}
#: Requests fired after the DELETE, one every millisecond, in this order, round after round.
BURST = ["DELETE /whip", "PATCH /whip", "POST /whep", "GET /v1/sessions"] * 6
PEER_CLOSED = "peer connection closed"


@dataclass
class Outcome:
    request: str
    status: int | None  # None: no answer (connection reset or closed)
    error: str = ""

    @property
    def documented(self) -> bool:
        return self.status in DOCUMENTED[self.request]


@asynccontextmanager
async def whip_session(url: str) -> AsyncIterator[tuple[RTCPeerConnection, str]]:
    """A WHIP publisher (send-only numbered video) whose session is live; yields its peer and
    the session's id."""
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(128, 128), direction="sendonly")
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            offer = await local_offer(pc)
            answer = await http.post("/whip?width=128&height=128", content=offer, headers=SDP)
            assert answer.status_code == 201, answer.text
            await accept_answer(pc, answer.text)
            session_id = answer.headers["location"].rsplit("/", 1)[1]
            await wait_for_state(http, session_id, "live")
        yield pc, session_id
    finally:
        await pc.close()


async def wait_for_state(http: httpx.AsyncClient, session_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (await http.get(f"/v1/sessions/{session_id}")).json().get("state") != state:
            await asyncio.sleep(0.05)


async def viewer_offers(count: int, stack: AsyncExitStack) -> list[str]:
    """Real WHEP offers (recvonly video) from peers that stay open until ``stack`` closes."""
    offers = []
    for _ in range(count):
        pc = client_peer()
        stack.push_async_callback(pc.close)
        pc.addTransceiver("video", direction="recvonly")
        offers.append(await local_offer(pc))
    return offers


async def send(http: httpx.AsyncClient, request: str, session_id: str, offer: str) -> Outcome:
    try:
        if request == "DELETE /whip":
            response = await http.delete(f"/whip/{session_id}")
        elif request == "PATCH /whip":
            response = await http.patch(f"/whip/{session_id}", content=CANDIDATE, headers=FRAGMENT)
        elif request == "POST /whep":
            response = await http.post(f"/whep/{session_id}", content=offer, headers=SDP)
        else:
            response = await http.get(f"/v1/sessions/{session_id}")
    except httpx.TransportError as exc:
        return Outcome(request, None, repr(exc))
    return Outcome(request, response.status_code, response.text[:200])


async def burst(http: httpx.AsyncClient, session_id: str, offers: list[str]) -> list[Outcome]:
    """A DELETE, then BURST's requests 1 ms apart, all in flight together."""
    requests = ["DELETE /whip", *BURST]
    pending = []
    for index, request in enumerate(requests):
        offer = offers[index % len(offers)]
        pending.append(asyncio.ensure_future(send(http, request, session_id, offer)))
        await asyncio.sleep(0.001)
    return list(await asyncio.gather(*pending))


def summary(outcomes: list[Outcome]) -> str:
    bad = [outcome for outcome in outcomes if not outcome.documented]
    failed = [o for o in bad if o.status is None or o.status >= 500]
    seen = Counter(f"{o.request} -> {o.status}" for o in outcomes)
    return (
        f"{len(failed)} of {len(outcomes)} requests got 5xx or no answer, {len(bad)} an"
        f" undocumented status; {dict(seen)}; first bad: {[vars(o) for o in bad[:3]]}"
    )


async def test_requests_racing_a_close_get_documented_answers(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(session_rate_per_min=0, max_viewers=64)
    outcomes: list[Outcome] = []
    # Few connections, so requests queue on kept-alive ones: a reset would cost those behind.
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with (
        AsyncExitStack() as viewers,
        httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http,
    ):
        offers = await viewer_offers(4, viewers)
        for peer_closes_first in (False, True) * 3:
            async with whip_session(server.url) as (pc, session_id):
                if peer_closes_first:  # RFC 9725: close the peer connection, then DELETE
                    await pc.close()
                outcomes += await burst(http, session_id, offers)
    assert all(outcome.documented for outcome in outcomes), summary(outcomes)
    await wait_until(lambda: not server.service.records and not server.service.engine.sessions)
    registry = server.service.engine.metrics.registry
    assert registry.get_sample_value("livediff_viewers_active") == 0


async def test_delete_after_the_whip_peer_closed_succeeds_and_keeps_the_reason(
    server: LiveServer,
) -> None:
    async with (
        whip_session(server.url) as (pc, session_id),
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await pc.close()  # DTLS close_notify: the session ends at once
        await wait_until(lambda: session_id not in server.service.records)
        deleted = await http.delete(f"/whip/{session_id}")
        again = await http.delete(f"/whip/{session_id}")
        info = await http.get(f"/v1/sessions/{session_id}")
        trickle = await http.patch(f"/whip/{session_id}", content=CANDIDATE, headers=FRAGMENT)
    assert deleted.status_code == 200, deleted.text
    assert again.status_code == 200, again.text
    assert info.status_code == 200 and info.json()["state"] == "closed"
    assert info.json()["end_reason"] == PEER_CLOSED
    assert trickle.status_code == 404 and PEER_CLOSED in trickle.json()["detail"]
    unknown = await http_delete(server.url, "/whip/0123456789abcdef")
    assert unknown.status_code == 404 and "no session" in unknown.json()["detail"]


async def test_delete_after_the_api_peer_closed_succeeds_and_keeps_the_reason(
    server: LiveServer,
) -> None:
    async with (
        publish(server.url, size=128) as publisher,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await wait_for_state(http, publisher.session_id, "live")
        await publisher.pc.close()
        await wait_for_state(http, publisher.session_id, "closed")  # closing, or ended
        location = f"/v1/sessions/{publisher.session_id}"
        deleted = await http.delete(location)
        info = await http.get(location)
    assert deleted.status_code == 204, deleted.text
    assert info.status_code == 200 and info.json()["end_reason"] == PEER_CLOSED
    assert not server.service.records


async def test_a_client_delete_forgets_the_session(server: LiveServer) -> None:
    async with whip_session(server.url) as (_, session_id):
        deleted = await http_delete(server.url, f"/whip/{session_id}")
        again = await http_delete(server.url, f"/whip/{session_id}")
    assert deleted.status_code == 200 and again.status_code == 404
    assert not server.service.records and not server.service.ended.get(session_id)


async def http_delete(url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as http:
        return await http.delete(path)
