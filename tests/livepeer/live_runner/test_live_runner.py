"""livediff as a go-livepeer Live Runner, end to end, against the orchestrator double.

``livediff serve`` with the Live Runner settings registers itself, heartbeats past several TTLs,
registers again when the orchestrator forgets it, serves WHIP and trickle sessions reserved
through the orchestrator's proxy, closes them when the orchestrator releases them, refuses
sessions it did not reserve, and keeps serving while the orchestrator refuses or talks nonsense.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from livediff.config import Settings
from livediff.testing.live_orchestrator import LiveOrchestratorDouble, Reservation
from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)
from livediff.testing.servers import LiveServer, free_port, serve_app, start_server
from livediff.testing.trickle import ClipPublisher, OutputReader, encode_clip

SECRET = "orch-s3cret"
SIZE = 128


def live_runner_settings(orchestrator: str, port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pipeline": "passthrough",
        "width": SIZE,
        "height": SIZE,
        "max_sessions": 2,
        "live_runner_orch": orchestrator,
        "live_runner_secret": SECRET,
        "live_runner_url": f"http://127.0.0.1:{port}",
        "live_runner_retry_max_s": 0.5,
        "trickle_retry_delay_s": 0.1,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def orchestrator() -> Iterator[LiveOrchestratorDouble]:
    double = LiveOrchestratorDouble(
        SECRET, heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0, keepalive_s=0.5
    )
    with double:
        yield double


@pytest.fixture
def runner(orchestrator: LiveOrchestratorDouble) -> Iterator[LiveServer]:
    port = free_port()
    server = start_server(live_runner_settings(orchestrator.url, port), port=port)
    try:
        yield server
    finally:
        server.stop()


def registered(orchestrator: LiveOrchestratorDouble) -> str:
    """The id of the one ready runner (waits for it)."""

    def ready_id() -> str | None:
        ready = [rid for rid, runner in orchestrator.runners.items() if runner.ready]
        return ready[0] if ready else None

    return orchestrator.wait_for(ready_id, timeout_s=10.0)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def until(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


async def test_registers_ready_and_heartbeats_past_several_ttls(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    runner_id = registered(orchestrator)
    body = orchestrator.runner(runner_id).body
    assert body["app"] == "live-video-to-video/livediff"
    assert body["runner_url"] == runner.url and body["mode"] == "persistent"
    assert body["capacity"] == 2 and body["status"] == "ready"
    metadata = json.loads(body["metadata"])
    assert metadata["pipeline"] == "passthrough" and SECRET not in body["metadata"]
    await asyncio.sleep(2.5)  # 2.5 TTLs
    assert orchestrator.runner(runner_id).ready
    assert orchestrator.heartbeats(runner_id) >= 6
    listed = orchestrator.discovery()[0]["runners"]
    assert [entry["app"] for entry in listed] == ["live-video-to-video/livediff"]


async def test_registers_again_when_the_orchestrator_forgets_it(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    first = registered(orchestrator)
    assert orchestrator.forget(first)
    second = registered(orchestrator)
    assert second != first
    door = runner.app.state.live_runner
    assert door.registrar.registrations == 2
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{runner.url}/ready")).status_code == 200


async def whip_publish(
    client: httpx.AsyncClient, reservation: Reservation
) -> tuple[Any, FrameRecorder, httpx.Response]:
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(SIZE, SIZE))
    recorder = FrameRecorder()
    consuming: list[asyncio.Future[None]] = []

    @pc.on("track")
    def on_track(track: Any) -> None:
        consuming.append(asyncio.ensure_future(recorder.consume(track)))

    offer = await local_offer(pc)
    response = await client.post(
        f"{reservation.app_url}/whip",
        content=offer,
        headers={"Content-Type": "application/sdp"},
    )
    assert response.status_code == 201, response.text
    await accept_answer(pc, response.text)
    return pc, recorder, response


async def test_a_whip_session_through_the_proxy_is_closed_by_the_release(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    runner_id = registered(orchestrator)
    reservation = orchestrator.reserve(runner_id)
    async with httpx.AsyncClient(timeout=10.0) as client:
        pc, recorder, response = await whip_publish(client, reservation)
        try:
            location = response.headers["Location"]
            prefix = f"/apps/{runner_id}/session/{reservation.session_id}/app/whip/"
            assert location.startswith(prefix), location  # comes back through the proxy
            await recorder.wait_for(10, timeout=20.0)
            service = runner.service
            assert len(service.open_records()) == 1
            assert reservation.session_id in orchestrator.runner(runner_id).body["session_ids"]
            orchestrator.release(runner_id, reservation.session_id)
            await until(lambda: not service.open_records(), what="the release to close it")
        finally:
            await pc.close()


async def test_a_trickle_stream_through_the_orchestrators_channels(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    runner_id = registered(orchestrator)
    reservation = orchestrator.reserve(runner_id)
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.post(
            f"{reservation.app_url}/v1/trickle", json={"params": {"width": SIZE, "height": SIZE}}
        )
        assert response.status_code == 200, response.text
        urls = response.json()
        assert set(urls) == {"session_id", "input", "output", "control", "events"}
        channel = f"{reservation.session_id}-input"
        await until(lambda: orchestrator.trickle.in_flight("GET", channel), what="the GET")
        reader = OutputReader(client, urls["output"])
        reading = asyncio.ensure_future(reader.read())
        publisher = ClipPublisher(client, urls["input"], 30)
        clip = encode_clip(45, (SIZE, SIZE), fps=30, gop_s=1.0)
        await publisher.publish(clip)
        await until(lambda: len(reader.frames) >= 30, timeout_s=20.0, what="frames back")
        door = runner.app.state.live_runner
        assert reservation.session_id in door.streams
        orchestrator.release(runner_id, reservation.session_id)
        await until(lambda: not door.streams, what="the release to end the stream")
        await publisher.close()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


async def test_a_session_the_orchestrator_did_not_reserve_is_refused(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    registered(orchestrator)
    forged = {
        "Livepeer-Session-Id": "forged",
        "Livepeer-Session-Token": "x",
        "Livepeer-Session-Control": f"{orchestrator.url}/runner/r/session/forged",
    }
    async with httpx.AsyncClient(timeout=10.0) as client:
        refused = await client.post(f"{runner.url}/v1/trickle", json={}, headers=forged)
        assert refused.status_code == 403 and "forged" in refused.json()["detail"]
        whip = await client.post(
            f"{runner.url}/whip",
            content="v=0",
            headers={**forged, "Content-Type": "application/sdp"},
        )
        assert whip.status_code == 403
        direct = await client.post(f"{runner.url}/v1/trickle", json={})
        assert direct.status_code == 400 and "proxy" in direct.json()["detail"]
        assert (await client.get(f"{runner.url}/health")).status_code == 200


async def test_bad_trickle_params_are_a_422_and_nothing_is_started(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    runner_id = registered(orchestrator)
    reservation = orchestrator.reserve(runner_id)
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.post(
            f"{reservation.app_url}/v1/trickle", json={"params": {"delay_ms": -5}}
        )
    assert response.status_code == 422 and "delay_ms" in response.json()["detail"]
    assert not runner.app.state.live_runner.streams
    assert not orchestrator.runner(runner_id).channels.get(reservation.session_id)


def test_a_wrong_secret_is_logged_and_the_service_keeps_serving(
    orchestrator: LiveOrchestratorDouble, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = live_runner_settings(orchestrator.url, port, live_runner_secret="wrong")
    server = start_server(settings, port=port)
    try:
        door = server.app.state.live_runner
        wait_until(lambda: door.registrar.state == "refused", "the refusal")
        assert not orchestrator.runners
        assert httpx.get(f"{server.url}/health").json() == {"status": "IDLE"}
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and "401" in refused[0]  # once per state, not per try
    finally:
        server.stop()


def test_malformed_heartbeat_replies_do_not_stop_the_service() -> None:
    nonsense = FastAPI()

    @nonsense.post("/runners/heartbeat")
    async def heartbeat() -> PlainTextResponse:
        return PlainTextResponse('{"runner_id": "r", "heartbeat_interval": "soon"}')

    orchestrator = serve_app(nonsense, name="nonsense")
    port = free_port()
    server = start_server(live_runner_settings(orchestrator.url, port), port=port)
    try:
        door = server.app.state.live_runner
        wait_until(lambda: door.registrar.state == "unreachable", "the malformed reply")
        assert httpx.get(f"{server.url}/ready").status_code == 200
    finally:
        server.stop()
        orchestrator.stop()


def test_sigterm_unregisters(orchestrator: LiveOrchestratorDouble) -> None:
    port = free_port()
    env = {
        **os.environ,
        "LIVEDIFF_LIVE_RUNNER_ORCH": orchestrator.url,
        "LIVEDIFF_LIVE_RUNNER_SECRET": SECRET,
        "LIVEDIFF_LIVE_RUNNER_URL": f"http://127.0.0.1:{port}",
    }
    command = [sys.executable, "-m", "livediff", "serve", "--port", str(port), "--width", "64"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        runner_id = registered(orchestrator)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status tells it
    assert process.returncode in (0, -signal.SIGTERM), output.decode()
    unregistered = orchestrator.calls(f"/runners/{runner_id}/unregister", "POST")
    assert [call.status for call in unregistered] == [204]
    assert runner_id not in orchestrator.runners


async def test_the_studio_and_api_work_under_the_proxys_prefix(
    orchestrator: LiveOrchestratorDouble, runner: LiveServer
) -> None:
    reservation = orchestrator.reserve(registered(orchestrator))
    async with httpx.AsyncClient(timeout=10.0, follow_redirects=True) as client:
        page = await client.get(reservation.app_url)
        assert page.status_code == 200 and str(page.url).endswith("/app/")
        assert 'src="js/app.js"' in page.text  # relative: stays under the prefix
        script = await client.get(f"{reservation.app_url}/js/api.js")
        assert "pageBase" in script.text
        pipeline = await client.get(f"{reservation.app_url}/v1/pipeline")
        assert pipeline.status_code == 200 and pipeline.json()["name"] == "passthrough"
