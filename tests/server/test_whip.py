"""WHIP ingest (RFC 9725) and WHEP viewers, with real aiortc peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from aiortc import RTCPeerConnection

from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)
from livediff.testing.servers import LiveServer
from tests.server.streaming import wait_until

SDP = {"content-type": "application/sdp"}
FRAGMENT = {"content-type": "application/trickle-ice-sdpfrag"}


@asynccontextmanager
async def whip_publisher(
    url: str, query: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[RTCPeerConnection, httpx.Response]]:
    """A WHIP client like OBS: send-only video, offer posted as application/sdp."""
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(128, 128), direction="sendonly")
    offer = await local_offer(pc)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post(
            f"/whip{query}", content=offer, headers={**SDP, **(headers or {})}
        )
    try:
        if response.status_code == 201:
            await accept_answer(pc, response.text)
        yield pc, response
    finally:
        await pc.close()


@asynccontextmanager
async def whep_viewer(url: str, session_id: str) -> AsyncIterator[tuple[FrameRecorder, str]]:
    pc = client_peer()
    recorder = FrameRecorder()
    tasks: list[asyncio.Task[None]] = []
    pc.addTransceiver("video", direction="recvonly")
    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(recorder.consume(track))))
    offer = await local_offer(pc)
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post(f"/whep/{session_id}", content=offer, headers=SDP)
    assert response.status_code == 201, response.text
    await accept_answer(pc, response.text)
    try:
        yield recorder, response.headers["location"]
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()


async def test_whip_publish_trickle_and_delete(serve: Callable[..., LiveServer]) -> None:
    server = serve(ice_servers=["stun:stun.example.org:3478"])
    async with whip_publisher(server.url, "?width=128&height=128&delay_ms=2") as (_, answer):
        assert answer.status_code == 201
        assert answer.headers["content-type"] == "application/sdp"
        location, etag = answer.headers["location"], answer.headers["etag"]
        assert location.startswith("/whip/") and etag.startswith('"')
        assert answer.headers["link"] == '<stun:stun.example.org:3478>; rel="ice-server"'
        session_id = location.rsplit("/", 1)[1]
        assert server.service.get(session_id).session.params.model_dump() == {
            "width": 128,
            "height": 128,
            "delay_ms": 2.0,
        }
        candidate = "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host"
        async with httpx.AsyncClient(base_url=server.url) as http:
            trickled = await http.patch(
                location,
                content=f"a=mid:0\r\n{candidate}\r\n",
                headers={**FRAGMENT, "if-match": etag},
            )
            stale = await http.patch(
                location, content=candidate, headers={**FRAGMENT, "if-match": '"x"'}
            )
            restart = await http.patch(
                location,
                content="a=ice-ufrag:new1\r\na=ice-pwd:newpasswordnewpassword12\r\n",
                headers={**FRAGMENT, "if-match": "*"},
            )
            wrong_type = await http.patch(location, content=candidate, headers=SDP)
            options = await http.options(location)
            deleted = await http.delete(location)
            again = await http.delete(location)
        assert trickled.status_code == 204
        assert stale.status_code == 412
        assert restart.status_code == 422 and "ICE restart" in restart.json()["detail"]
        assert wrong_type.status_code == 415
        assert options.status_code == 204 and "PATCH" in options.headers["allow"]
        assert deleted.status_code == 200 and again.status_code == 404
        assert server.service.records == {}


async def test_whip_preflight_and_bad_offers(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        preflight = await http.options("/whip")
        not_sdp = await http.post("/whip", content="v=0", headers={"content-type": "text/plain"})
        garbage = await http.post("/whip", content="nonsense", headers=SDP)
        bad_query = await http.post("/whip?width=3", content="v=0\r\n", headers=SDP)
    assert preflight.status_code == 204 and preflight.headers["accept-post"] == "application/sdp"
    assert not_sdp.status_code == 415
    assert garbage.status_code == 400 and "v=0" in garbage.json()["detail"]
    assert bad_query.status_code in (400, 422)


async def test_whip_wants_the_token_when_one_is_set(serve: Callable[..., LiveServer]) -> None:
    guarded = serve(token="t0ken")
    async with whip_publisher(guarded.url) as (_, refused):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
    async with whip_publisher(guarded.url, headers={"authorization": "Bearer t0ken"}) as (_, ok):
        assert ok.status_code == 201


async def test_several_whep_viewers_watch_one_whip_session(server: LiveServer) -> None:
    async with whip_publisher(server.url, "?width=128&height=128") as (_, answer):
        session_id = answer.headers["location"].rsplit("/", 1)[1]
        async with (
            whep_viewer(server.url, session_id) as (first, first_location),
            whep_viewer(server.url, session_id) as (second, _),
        ):
            await first.wait_for(10, timeout=30)
            await second.wait_for(10, timeout=30)
            assert len(server.service.get(session_id).viewers) == 2
            async with httpx.AsyncClient(base_url=server.url) as http:
                left = await http.delete(first_location)
                unknown = await http.delete(f"/whep/{session_id}/nobody")
                missing = await http.post("/whep/nope", content="v=0\r\n", headers=SDP)
            assert left.status_code == 200 and unknown.status_code == 404
            assert missing.status_code == 404
            await wait_until(lambda: len(server.service.get(session_id).viewers) == 1)
    for recorder in (first, second):
        numbers = [f.number for f in recorder.frames if f.number is not None]
        assert len(numbers) >= 10 and numbers == sorted(numbers)
        assert {(f.width, f.height) for f in recorder.frames} == {(128, 128)}


async def test_a_whep_offer_must_receive_video(server: LiveServer) -> None:
    async with whip_publisher(server.url, "?width=128&height=128") as (_, answer):
        session_id = answer.headers["location"].rsplit("/", 1)[1]
        pc = client_peer()
        add_camera(pc, NumberedVideoTrack(64, 64), direction="sendonly")
        offer = await local_offer(pc)
        await pc.close()
        async with httpx.AsyncClient(base_url=server.url) as http:
            refused = await http.post(f"/whep/{session_id}", content=offer, headers=SDP)
    assert refused.status_code == 400 and "must receive video" in refused.json()["detail"]


def obs_shaped(offer: str) -> str:
    """Rewrite an aiortc offer the way OBS 30's WHIP output (libdatachannel) lays one out:
    ICE credentials, fingerprint and setup at session level only, an LS group, ice2 options."""
    session_level = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:")
    lines = offer.strip().splitlines()
    moved = list(dict.fromkeys(line for line in lines if line.startswith(session_level)))
    kept = [line for line in lines if not line.startswith(session_level)]
    first_media = next(i for i, line in enumerate(kept) if line.startswith("m="))
    extra = ["a=group:LS 0 1", "a=msid-semantic:WMS *", *moved, "a=ice-options:ice2,trickle"]
    return "\r\n".join(kept[:first_media] + extra + kept[first_media:]) + "\r\n"


async def test_an_obs_shaped_h264_offer_with_audio_publishes(server: LiveServer) -> None:
    from aiortc.mediastreams import AudioStreamTrack

    pc = client_peer()
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    add_camera(pc, NumberedVideoTrack(128, 128), direction="sendonly", codec="h264")
    offer = obs_shaped(await local_offer(pc))
    assert "m=audio" in offer.split("m=video")[0] and "a=ice-ufrag" not in offer.split("m=")[1]
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.post(
                "/whip", content=offer, headers={**SDP, "authorization": "Bearer ignored"}
            )
        assert answer.status_code == 201, answer.text
        assert "H264" in answer.text and "a=recvonly" in answer.text
        await accept_answer(pc, answer.text)
        session_id = answer.headers["location"].rsplit("/", 1)[1]
        record = server.service.get(session_id)
        await wait_until(lambda: record.session.stats.frames_processed >= 10, timeout=30)
    finally:
        await pc.close()
