"""The runner contract's HTTP face: health values, version, hardware, and refusals in the one
error shape go-livepeer reads (``{"detail": {"msg": ...}}`` with 400/401/422/500)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from livediff.config import Settings
from livediff.testing.trickle_server import FakeTrickleServer
from tests.livepeer.native.conftest import FAST, RunnerServer, start_runner, until
from tests.server.faulty import GatedLoadTransform

GATED = "tests.server.faulty:GatedLoadTransform"
BROKEN = "tests.livepeer.airunner.transforms:BrokenLoadTransform"


def request_body(channels: Any, **extra: Any) -> dict[str, Any]:
    body = {
        "subscribe_url": channels.subscribe_url,
        "publish_url": channels.publish_url,
        "control_url": channels.control_url,
        "events_url": channels.events_url,
        "model_id": "livediff",
        "params": {"width": 128, "height": 128},
        "gateway_request_id": "req-9",
    }
    return {**body, **extra}


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"msg"}, body
    assert fragment in body["detail"]["msg"], body


async def test_loading_answers_loading_and_refuses_streams(
    client: httpx.AsyncClient, trickle: FakeTrickleServer
) -> None:
    GatedLoadTransform.gate.clear()
    runner = await asyncio.to_thread(start_runner_loading, GATED)
    try:
        assert (await client.get(f"{runner.url}/health")).json() == {"status": "LOADING"}
        assert (await client.get(f"{runner.url}/ready")).status_code == 503
        channels = trickle.create_stream("early")
        response = await client.post(
            f"{runner.url}/live-video-to-video", json=request_body(channels)
        )
        assert_error(response, 500, "still loading")
        GatedLoadTransform.gate.set()
        await until(lambda: runner.runner.health() == "IDLE", what="IDLE once loaded")
        assert (await client.get(f"{runner.url}/health")).json() == {"status": "IDLE"}
        assert (await client.get(f"{runner.url}/ready")).status_code == 200
    finally:
        GatedLoadTransform.gate.set()
        runner.stop()


def start_runner_loading(pipeline: str) -> RunnerServer:
    """A runner whose transform may still be loading (not waited for)."""
    return start_runner(Settings(pipeline=pipeline, **FAST), wait_for_model=False)


async def test_a_transform_that_cannot_load_is_error(client: httpx.AsyncClient) -> None:
    runner = await asyncio.to_thread(start_runner_loading, BROKEN)
    try:
        await until(lambda: runner.runner.health() == "ERROR", what="ERROR")
        assert (await client.get(f"{runner.url}/health")).json() == {"status": "ERROR"}
    finally:
        runner.stop()


async def test_version_and_hardware_name_the_pipeline_and_model(
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VERSION", "1.2.3")
    runner = runner_factory(pipeline="passthrough")
    version = (await client.get(f"{runner.url}/version")).json()
    assert version == {
        "pipeline": "live-video-to-video",
        "model_id": "livediff",
        "version": "1.2.3",
    }
    hardware = (await client.get(f"{runner.url}/hardware/info")).json()
    assert hardware["pipeline"] == "live-video-to-video" and hardware["model_id"] == "livediff"
    assert isinstance(hardware["gpu_info"], dict)
    for gpu in hardware["gpu_info"].values():
        assert {"id", "name", "memory_total", "memory_free", "major", "minor"} <= set(gpu)


async def test_refusals_take_go_livepeers_error_shape(
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
    trickle: FakeTrickleServer,
) -> None:
    runner = runner_factory(pipeline="passthrough", runner_auth_token="s3cret")
    url = f"{runner.url}/live-video-to-video"
    channels = trickle.create_stream("refused")
    good = {"Authorization": "Bearer s3cret"}

    assert_error(await client.post(url, json=request_body(channels)), 401, "Invalid bearer token")
    wrong_model = request_body(channels, model_id="comfyui")
    assert_error(await client.post(url, json=wrong_model, headers=good), 400, "comfyui")
    bad_params = request_body(channels, params={"width": 100, "prompt": "x"})
    response = await client.post(url, json=bad_params, headers=good)
    assert_error(response, 422, "width")
    assert "prompt" in response.json()["detail"]["msg"]
    missing = {"publish_url": channels.publish_url}
    assert_error(await client.post(url, json=missing, headers=good), 422, "subscribe_url")
    not_json = await client.post(url, content=b"{", headers={**good, "Content-Type": "x/json"})
    assert not_json.status_code == 422 and "msg" in not_json.json()["detail"]
    assert runner.runner.health() == "IDLE"
    assert runner.runner.streams.started == 0


async def test_a_stream_request_is_answered_at_once_and_ai_runner_fields_are_taken(
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
    trickle: FakeTrickleServer,
) -> None:
    runner = runner_factory(pipeline="passthrough")
    channels = trickle.create_stream("accepted")
    body = request_body(channels, params={"width": 128, "height": 128, "show_reloading_frame": 1})
    response = await client.post(f"{runner.url}/live-video-to-video/", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["publish_url"] == channels.publish_url and answer["request_id"] == "req-9"
    assert (await client.get(f"{runner.url}/health")).json() == {"status": "OK"}
    trickle.delete_channel("accepted")  # no input ever came: the stream ends
    await until(lambda: runner.runner.health() == "IDLE", what="IDLE after the channels closed")
