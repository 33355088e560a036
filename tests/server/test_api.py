"""The /v1 API: params updates (HTTP and data channel), stats, metrics, bad input, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from livediff.testing.peers import (
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)
from livediff.testing.servers import LiveServer
from tests.server.streaming import publish, sample_offer, wait_until


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


async def test_params_patch_merges_validates_and_applies(server: LiveServer) -> None:
    async with publish(server.url, params={"width": 128, "height": 128}) as client:
        path = f"/v1/sessions/{client.session_id}/params"
        async with httpx.AsyncClient(base_url=server.url) as http:
            merged = await http.patch(path, json={"delay_ms": 5})
            assert merged.status_code == 200
            assert merged.json() == {"width": 128, "height": 128, "delay_ms": 5.0}
            bad = await http.patch(path, json={"delay_ms": -1})
            assert bad.status_code == 422
            assert bad.json()["detail"][0]["loc"] == ["body", "delay_ms"]
            unknown = await http.patch(path, json={"colour": "red"})
            assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == [
                "body",
                "colour",
            ]
            assert (await http.patch(path, content=b"delay_ms=3")).status_code == 415
            broken = await http.patch(
                path, content=b"{", headers={"content-type": "application/json"}
            )
            assert broken.status_code == 400 and "not valid JSON" in broken.json()["detail"]
            info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
        assert info["params"]["delay_ms"] == 5.0  # the refused updates changed nothing


async def test_params_over_the_data_channel(server: LiveServer) -> None:
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(128, 128))
    channel = pc.createDataChannel("params")
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", lambda message: replies.put_nowait(json.loads(message)))
    offer = await local_offer(pc)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            created = await http.post("/v1/sessions", json={"sdp": offer, "type": "offer"})
            await accept_answer(pc, created.json()["sdp"])
            await asyncio.wait_for(opened.wait(), 20)
            channel.send(json.dumps({"delay_ms": 7}))
            ok = await asyncio.wait_for(replies.get(), 10)
            channel.send(json.dumps({"width": 3}))
            refused = await asyncio.wait_for(replies.get(), 10)
            channel.send("not json")
            garbled = await asyncio.wait_for(replies.get(), 10)
            info = (await http.get(f"/v1/sessions/{created.json()['session_id']}")).json()
    finally:
        await pc.close()
    assert ok == {"type": "params", "params": {"width": 512, "height": 512, "delay_ms": 7.0}}
    assert refused["type"] == "error" and refused["status"] == 422
    assert refused["detail"][0]["loc"] == ["width"]
    assert garbled["status"] == 400
    assert info["params"]["delay_ms"] == 7.0


async def test_stats_metrics_and_delete_release_everything(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        async with publish(server.url, params={"width": 128, "height": 128}) as client:
            await client.video.wait_for(30, timeout=30)
            listed = (await http.get("/v1/sessions")).json()
            one = (await http.get(f"/v1/sessions/{client.session_id}")).json()
            during = (await http.get("/metrics")).text
            assert (await http.get("/health")).json() == {"status": "OK"}
            assert client.response.headers["location"] == f"/v1/sessions/{client.session_id}"
            deleted = await http.delete(f"/v1/sessions/{client.session_id}")
            after = (await http.get("/metrics")).text
            gone = await http.get(f"/v1/sessions/{client.session_id}")
        assert (await http.get("/health")).json() == {"status": "IDLE"}
    assert [s["session_id"] for s in listed] == [client.session_id]
    assert one["state"] == "live" and one["frames_in"] >= 30 and one["frames_out"] >= 29
    assert one["fps_in"] > 10 and one["fps_out"] > 10
    assert 0 < one["latency_ms"]["p50"] <= one["latency_ms"]["p95"] <= one["latency_ms"]["p99"]
    assert metric(during, "livediff_sessions_active") == 1
    assert metric(during, "livediff_frames_received_total") >= 30
    assert metric(during, "livediff_frames_processed_total") >= 29
    assert metric(during, "livediff_frame_latency_seconds_count") >= 29
    assert "livediff_frames_dropped_total" in during
    assert deleted.status_code == 204
    assert metric(after, "livediff_sessions_active") == 0
    assert gone.status_code == 404
    await wait_until(lambda: not server.service.engine.worker.attached)


async def test_bad_requests_get_clear_errors(server: LiveServer) -> None:
    offer = await sample_offer()
    async with httpx.AsyncClient(base_url=server.url) as http:
        malformed = await http.post("/v1/sessions", json={"sdp": "hello", "type": "offer"})
        no_video = await http.post(
            "/v1/sessions", json={"sdp": "v=0\r\ns=-\r\nt=0 0\r\n", "type": "offer"}
        )
        missing = await http.post("/v1/sessions", json={"type": "offer"})
        wrong_type = await http.post(
            "/v1/sessions", content=offer, headers={"content-type": "application/sdp"}
        )
        huge = await http.post("/v1/sessions", json={"sdp": "v=0" + "x" * (1 << 20)})
        bad_params = await http.post(
            "/v1/sessions", json={"sdp": offer, "type": "offer", "params": {"width": 100}}
        )
        unknown = await http.get("/v1/sessions/nope")
        unknown_delete = await http.delete("/v1/sessions/nope")
        unknown_patch = await http.patch("/v1/sessions/nope/params", json={})
    assert malformed.status_code == 400 and "v=0" in malformed.json()["detail"]
    assert no_video.status_code == 400 and "no video m-line" in no_video.json()["detail"]
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "sdp"]
    assert wrong_type.status_code == 415 and "application/json" in wrong_type.json()["detail"]
    assert huge.status_code == 413
    assert bad_params.status_code == 422
    assert bad_params.json()["detail"][0]["loc"] == ["body", "params", "width"]
    assert {r.status_code for r in (unknown, unknown_delete, unknown_patch)} == {404}
    assert server.service.records == {}


async def test_a_streamed_body_over_the_limit_gets_413(server: LiveServer) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 65536  # 1.25 MiB in all, without a Content-Length

    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post(
            "/v1/sessions", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


async def test_over_capacity_gets_503_with_retry_after(serve: Callable[..., LiveServer]) -> None:
    small = serve(max_sessions=1, retry_after_s=7)
    offer = await sample_offer()
    async with (
        publish(small.url, params={"width": 128, "height": 128}),
        httpx.AsyncClient(base_url=small.url) as http,
    ):
        refused = await http.post("/v1/sessions", json={"sdp": offer, "type": "offer"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "7"
    assert "session slots" in refused.json()["detail"]


async def test_a_token_guards_the_session_endpoints(serve: Callable[..., LiveServer]) -> None:
    guarded = serve(token="s3cret")
    async with httpx.AsyncClient(base_url=guarded.url) as http:
        anonymous = await http.post(
            "/v1/sessions", json={"sdp": await sample_offer(), "type": "offer"}
        )
        wrong = await http.get("/v1/sessions", headers={"authorization": "Bearer nope"})
        health = await http.get("/health")
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert health.status_code == 200
    async with publish(
        guarded.url,
        params={"width": 128, "height": 128},
        headers={"authorization": "Bearer s3cret"},
    ) as client:
        await client.video.wait_for(3, timeout=30)


async def test_a_closed_peer_ends_its_session(server: LiveServer) -> None:
    async with publish(server.url, params={"width": 128, "height": 128}) as client:
        await client.video.wait_for(3, timeout=30)
        assert len(server.service.records) == 1
    await wait_until(lambda: not server.service.records, timeout=15)


async def test_a_vanished_peer_is_cleaned_up(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)  # 6 missed checks: ~1.2 s
    async with publish(server.url, params={"width": 128, "height": 128}) as client:
        await client.video.wait_for(3, timeout=30)
        # The client goes silent: its ICE stops answering, without any DTLS goodbye.
        for transceiver in client.pc.getTransceivers():
            await transceiver.receiver.transport.transport.stop()
        await wait_until(lambda: not server.service.records, timeout=20)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "livediff_sessions_active") == 0


async def test_the_pipeline_and_openapi_are_described(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        pipeline = (await http.get("/v1/pipeline")).json()
        schema = (await http.get("/openapi.json")).json()
    assert pipeline["name"] == "passthrough"
    assert pipeline["defaults"] == {"width": 512, "height": 512, "delay_ms": 0.0}
    assert set(pipeline["params_schema"]["properties"]) == {"width", "height", "delay_ms"}
    for path in (
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/params",
        "/whip",
        "/whip/{session_id}",
        "/whep/{session_id}",
        "/health",
        "/metrics",
    ):
        assert path in schema["paths"], path
