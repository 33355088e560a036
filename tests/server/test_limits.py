"""Limits (issue 12): offer size, opening rate, viewers per session, input size, params lengths,
and how long an ended session is remembered; each refusal is counted by reason and status."""

from __future__ import annotations

from collections.abc import Callable

import av
import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from livediff.media.sdp import OfferLimits, OfferTooLargeError, parse_offer
from livediff.pixels import fit_within
from livediff.server.limits import RateLimiter
from livediff.server.service import EndedSessions
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.params import MAX_BLEND, DiffusionParams
from tests.server.streaming import sample_offer
from tests.server.test_faults import labelled

SDP = {"content-type": "application/sdp"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_offers_over_the_size_or_m_line_limit_get_400_before_parsing() -> None:
    offer = await sample_offer()
    media = offer[offer.index("m=video") :]
    limits = OfferLimits(max_bytes=len(offer) + 100, max_media=3)
    assert parse_offer(offer, limits).sends_video
    with pytest.raises(OfferTooLargeError, match=r"at most 1000 are accepted \(max_sdp_bytes\)"):
        parse_offer(offer + "a=x\r\n" * 1000, OfferLimits(max_bytes=1000))
    with pytest.raises(OfferTooLargeError, match=r"has 4 m-lines; at most 3 .*max_sdp_media"):
        parse_offer(offer + media * 3, OfferLimits(max_bytes=1 << 20))


async def test_an_oversized_offer_is_a_400_counted_by_reason(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(max_sdp_bytes=2048)
    offer = await sample_offer()
    async with httpx.AsyncClient(base_url=server.url) as http:
        refused = await http.post("/v1/sessions", json={"sdp": offer + "a=x\r\n" * 400})
        whip = await http.post("/whip", content=offer + "a=x\r\n" * 400, headers=SDP)
        text = (await http.get("/metrics")).text
    for response in (refused, whip):
        assert response.status_code == 400 and "max_sdp_bytes" in response.json()["detail"]
    assert (
        labelled(text, "livediff_requests_rejected_total", reason="offer_too_large", status="400")
        == 2
    )


def test_the_rate_limiter_refills_per_client_and_forgets_idle_ones() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=2, max_clients=3, clock=clock)
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(10.0)  # one token every 10 s
    assert limiter.take("b") == 0.0  # another client has its own bucket
    clock.now = 5.0
    assert limiter.take("a") == pytest.approx(5.0)
    clock.now = 10.0
    assert limiter.take("a") == 0.0
    for client in "cdef":
        limiter.take(client)
    assert len(limiter) == 3  # never more than max_clients
    clock.now = 100.0  # every bucket is full again: nothing is worth keeping
    limiter.take("g")
    assert len(limiter) == 1
    assert RateLimiter(per_minute=0, burst=1).take("a") == 0.0  # 0 turns the limit off


async def test_opening_too_fast_gets_429_with_retry_after(serve: Callable[..., LiveServer]) -> None:
    server = serve(session_rate_per_min=1, session_burst=2)
    async with httpx.AsyncClient(base_url=server.url) as http:
        answers = [await http.post("/whip", content="v=0\r\n", headers=SDP) for _ in range(3)]
        viewer = await http.post("/whep/nope", content="v=0\r\n", headers=SDP)
        text = (await http.get("/metrics")).text
    assert [answer.status_code for answer in answers] == [400, 400, 429]
    for refused in (answers[2], viewer):
        assert refused.status_code == 429
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert "session_rate_per_min" in refused.json()["detail"]
    assert (
        labelled(text, "livediff_requests_rejected_total", reason="rate_limited", status="429") == 2
    )


async def test_viewers_per_session_are_limited(serve: Callable[..., LiveServer]) -> None:
    server = serve(max_viewers=1, retry_after_s=3)
    async with httpx.AsyncClient(base_url=server.url) as http:
        opened = await http.post("/v1/sessions", json={"sdp": await sample_offer()})
        session_id = opened.json()["session_id"]
        viewer_offer = await _viewer_offer()
        first = await http.post(f"/whep/{session_id}", content=viewer_offer, headers=SDP)
        during = (await http.get("/metrics")).text
        second = await http.post(f"/whep/{session_id}", content=viewer_offer, headers=SDP)
        await http.delete(first.headers["location"])
        after = (await http.get("/metrics")).text
        await http.delete(f"/v1/sessions/{session_id}")
    assert first.status_code == 201
    assert second.status_code == 503 and second.headers["retry-after"] == "3"
    assert "all 1 viewer slots" in second.json()["detail"]
    assert "livediff_viewers_active 1.0" in during and "livediff_viewers_active 0.0" in after
    assert labelled(after, "livediff_requests_rejected_total", reason="viewers_full", status="503")


async def _viewer_offer() -> str:
    from livediff.testing.peers import client_peer, local_offer

    pc = client_peer()
    pc.addTransceiver("video", direction="recvonly")
    try:
        return await local_offer(pc)
    finally:
        await pc.close()


async def test_full_and_unauthorised_refusals_are_counted(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(max_sessions=1, token="t")
    auth = {"authorization": "Bearer t"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as http:
        offer = await sample_offer()
        opened = await http.post("/v1/sessions", json={"sdp": offer})
        full = await http.post("/v1/sessions", json={"sdp": offer})
        anonymous = await http.get("/v1/sessions", headers={"authorization": ""})
        text = (await http.get("/metrics")).text
        await http.delete(f"/v1/sessions/{opened.json()['session_id']}")
    assert (full.status_code, anonymous.status_code) == (503, 401)
    assert "retry-after" in full.headers
    rejected = "livediff_requests_rejected_total"
    assert labelled(text, rejected, reason="sessions_full", status="503") == 1
    assert labelled(text, rejected, reason="unauthorized", status="401") == 1


def test_larger_input_is_scaled_down_keeping_its_form_and_aspect() -> None:
    big = av.VideoFrame(3840, 2160, "yuv420p")
    fitted = fit_within(big, 1920 * 1080)
    assert isinstance(fitted, av.VideoFrame) and fitted.format.name == "yuv420p"
    assert (fitted.width, fitted.height) == (1920, 1080)
    odd = fit_within(np.zeros((999, 1777, 3), dtype=np.uint8), 100_000)
    assert isinstance(odd, np.ndarray)
    height, width = odd.shape[:2]
    assert width * height <= 100_000 and width % 2 == 0 and height % 2 == 0
    assert abs(width / height - 1777 / 999) < 0.02
    small = av.VideoFrame(640, 480, "yuv420p")
    assert fit_within(small, 1920 * 1080) is small


def test_prompts_and_blends_have_documented_limits() -> None:
    DiffusionParams(prompt="x" * 1000, negative_prompt="y" * 1000)
    for too_long in ({"prompt": "x" * 1001}, {"negative_prompt": "y" * 1001}):
        with pytest.raises(ValidationError, match="at most 1000 characters"):
            DiffusionParams.model_validate(too_long)
    with pytest.raises(ValidationError, match=f"give 1 to {MAX_BLEND}"):
        DiffusionParams(prompt=[("a cat", 1.0)] * (MAX_BLEND + 1))
    with pytest.raises(ValidationError, match="at most 1000 characters"):
        DiffusionParams(prompt=[("x" * 1001, 1.0)])
    with pytest.raises(ValidationError, match="at most 500 characters"):
        DiffusionParams(model="m" * 501)


def test_ended_sessions_are_remembered_for_the_ttl_and_up_to_the_limit() -> None:
    clock = Clock()
    ended = EndedSessions(ttl_s=60, limit=2, clock=clock)
    ended.add("a", {"state": "closed"})
    clock.now = 30
    ended.add("b", {"state": "closed"})
    assert ended.get("a") == {"state": "closed"}
    clock.now = 61
    assert ended.get("a") is None and ended.get("b") is not None
    ended.add("c", {})
    ended.add("d", {})
    assert len(ended) == 2 and ended.get("b") is None  # the oldest went first
    off = EndedSessions(ttl_s=0)
    off.add("a", {})
    assert off.get("a") is None
