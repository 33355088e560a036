"""The go-livepeer Live Runner orchestrator double (tests/fakes/live_orchestrator.py), driven
with plain httpx as a runner and its clients would drive the real one."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from livediff.livepeer.trickle import TrickleSubscriber
from livediff.testing.live_orchestrator import (
    LIVEPEER_HEADERS,
    PROXY_METHODS,
    LiveOrchestratorDouble,
    go_duration,
)
from livediff.testing.servers import ThreadedServer, serve_app

SECRET = "orch-secret"
INTERVAL_S, TTL_S = 0.2, 1.0
BASE32 = "[a-z2-7]"
APP = "live-video-to-video/livediff"


# -- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture
def orch() -> Iterator[LiveOrchestratorDouble]:
    """The double with short timings and a public host that differs from the runner-facing one."""
    double = LiveOrchestratorDouble(
        SECRET,
        heartbeat_interval_s=INTERVAL_S,
        heartbeat_ttl_s=TTL_S,
        keepalive_s=0.3,
        public_host="localhost",
    )
    with double:
        yield double


@pytest.fixture(scope="module")
def shared_orch() -> Iterator[LiveOrchestratorDouble]:
    """One double for the tests that register nothing."""
    with LiveOrchestratorDouble(SECRET) as double:
        yield double


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


async def echo(request: Request) -> Response:
    """What the runner was sent: method, path, query, body and the interesting headers."""
    body = await request.body()
    headers = {name: request.headers.get(name) for name in LIVEPEER_HEADERS}
    extra = {name: request.headers.get(name) for name in ("host", "x-forwarded-for", "x-client")}
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body": body.decode(),
            "headers": headers | extra,
        },
        headers={"x-runner": "yes"},
    )


async def events(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(3):
            yield f"data: {index}\n\n".encode()
            await asyncio.sleep(0.2)

    return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def runner_app() -> Iterator[ThreadedServer]:
    """A tiny runner: ``/base/events`` streams SSE, every other path echoes the request."""
    routes = [
        Route("/base/events", events),
        Route("/{path:path}", echo, methods=PROXY_METHODS),
    ]
    served = serve_app(Starlette(routes=routes), name="echo-runner", lifespan="off")
    yield served
    served.stop()


def registration(runner_url: str = "http://127.0.0.1:9", **fields: Any) -> dict[str, Any]:
    return {"runner_url": runner_url, "app": APP} | fields


def bootstrap(http: httpx.Client, orch: LiveOrchestratorDouble, **fields: Any) -> dict[str, Any]:
    response = http.post(
        f"{orch.url}/runners/heartbeat",
        headers={"Authorization": SECRET},
        json=registration(**fields),
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def beat(
    http: httpx.Client, orch: LiveOrchestratorDouble, auth: str, **fields: Any
) -> httpx.Response:
    return http.post(
        f"{orch.url}/runners/heartbeat",
        headers={"Authorization": auth},
        json=registration(**fields),
    )


def reserve(http: httpx.Client, orch: LiveOrchestratorDouble, runner_id: str) -> httpx.Response:
    return http.post(f"{orch.public_url}/apps/{runner_id}/session")


def assert_go_error(response: httpx.Response, status: int, message: str) -> None:
    assert (response.status_code, response.text) == (status, message + "\n")
    assert response.headers["content-type"].startswith("text/plain")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- registration and heartbeats -------------------------------------------------------------------
def test_go_durations() -> None:
    assert [go_duration(s) for s in (5, 20, 0.5, 1.5, 90, 3600, 0)] == [
        "5s",
        "20s",
        "500ms",
        "1.5s",
        "1m30s",
        "1h0m0s",
        "0s",
    ]


def test_bootstrap_reply_and_secrets(orch: LiveOrchestratorDouble, http: httpx.Client) -> None:
    reply = bootstrap(http, orch, runner_id="runner-a")
    assert reply["runner_id"] == "runner-a"
    assert reply["orchestrator"] == orch.url
    assert (reply["heartbeat_interval"], reply["heartbeat_ttl"]) == ("200ms", "1s")
    assert re.fullmatch(f"{BASE32}{{52}}", reply["heartbeat_secret"])
    assert reply["session_ids"] == []
    o2r = reply["o2r"]
    assert set(o2r) == {"name", "channel_name", "url", "mime_type"}  # no internal_url, as in Go
    assert re.fullmatch(f"runner-a-{BASE32}{{16}}-o2r", o2r["channel_name"])
    assert o2r["url"] == f"{orch.trickle.url}/{o2r['channel_name']}"
    assert (o2r["name"], o2r["mime_type"]) == ("o2r", "application/json")
    assert re.fullmatch(f"runner_{BASE32}{{8}}", bootstrap(http, orch)["runner_id"])

    assert_go_error(beat(http, orch, "wrong"), 401, "invalid registration authorization")
    again = beat(http, orch, SECRET, runner_id="runner-a")  # a restarted runner, same id
    assert_go_error(again, 401, "invalid heartbeat authorization")
    follow_up = beat(http, orch, reply["heartbeat_secret"], runner_id="runner-a")
    assert follow_up.status_code == 200
    assert set(follow_up.json()) == {
        "runner_id",
        "orchestrator",
        "heartbeat_interval",
        "heartbeat_ttl",
        "session_ids",
    }
    assert orch.heartbeats("runner-a") == 2
    statuses = [call.status for call in orch.calls("/runners/heartbeat", "POST")]
    assert statuses == [200, 200, 401, 401, 200]


def test_registration_disabled_without_a_secret(http: httpx.Client) -> None:
    with LiveOrchestratorDouble("") as orch:
        response = beat(http, orch, "anything")
    assert_go_error(response, 404, "dynamic live runner registration is disabled")


def test_a_heartbeat_replaces_the_whole_registration(
    orch: LiveOrchestratorDouble, http: httpx.Client
) -> None:
    full = {"capacity": 3, "version": "1.2", "metadata": '{"model":"sd"}', "status": "ready"}
    gpu = {"id": "0", "name": "NVIDIA H100", "vram_mb": 81559}
    reply = bootstrap(http, orch, runner_id="r", gpu=gpu, **full)
    first = orch.runner("r").heartbeat
    assert first["capacity"] == 3 and first["gpu"] == gpu and first["version"] == "1.2"

    assert beat(http, orch, reply["heartbeat_secret"], runner_id="r").status_code == 200
    snapshot = orch.runner("r")
    assert snapshot.capacity == 1
    assert snapshot.heartbeat == {
        "runner_id": "r",
        "runner_url": "http://127.0.0.1:9",
        "mode": "persistent",
        "app": APP,
        "capacity": 1,
        "price_info": {"price": "0"},
    }
    assert snapshot.body == {"runner_id": "r"} | registration()

    beat(http, orch, reply["heartbeat_secret"], runner_id="r", mode="single_shot", gpu=1)
    assert orch.runner("r").heartbeat["gpu"] == {"id": "1"}
    [runner] = http.get(f"{orch.url}/discovery").json()[0]["runners"]
    assert runner["mode"] == "single-shot"
    assert runner["url"] == f"{orch.public_url}/apps/r/app"
    assert_go_error(reserve(http, orch, "r"), 400, "only persistent runners have sessions")


BAD_HEARTBEATS = [
    ({"metadata": "é" * 513}, "metadata must be at most 1024 bytes"),
    ({"metadata": "a \ufffd"}, "metadata must not contain Unicode replacement character U+FFFD"),
    ({"status": "Ready"}, "status must be lowercase and trimmed"),
    ({"status": " ready"}, "status must be lowercase and trimmed"),
    ({"mode": "batch"}, 'mode must be "persistent" or "single-shot"'),
    ({"runner_url": "ftp://runner"}, "invalid runner_url"),
    ({"runner_url": "/relative"}, "invalid runner_url"),
    ({"runner_url": None}, "invalid runner_url"),
    ({"app": ""}, "app must be trimmed"),
    ({"app": " app"}, "app must be trimmed"),
    ({"capacity": -1}, "capacity must be >= 0"),
    (
        {"capacity": "2"},
        "json: cannot unmarshal string into Go struct field "
        "runner.LiveRunnerHeartbeatRequest.capacity of type int",
    ),
    (
        {"capacity": 1.5},
        "json: cannot unmarshal number into Go struct field "
        "runner.LiveRunnerHeartbeatRequest.capacity of type int",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_HEARTBEATS)
def test_bad_heartbeats_are_400s_before_the_secret_is_checked(
    shared_orch: LiveOrchestratorDouble, http: httpx.Client, fields: dict[str, Any], message: str
) -> None:
    response = http.post(
        f"{shared_orch.url}/runners/heartbeat",
        headers={"Authorization": "not the secret"},
        json=registration() | fields,
    )
    assert_go_error(response, 400, message)


def test_heartbeat_bodies_as_go_decodes_them(
    orch: LiveOrchestratorDouble, http: httpx.Client
) -> None:
    url, auth = f"{orch.url}/runners/heartbeat", {"Authorization": SECRET}
    assert_go_error(http.post(url, headers=auth, content=b""), 400, "EOF")
    bad_utf8 = b'{"runner_url":"http://x","app":"a","metadata":"\xff"}'
    assert http.post(url, headers=auth, content=bad_utf8).status_code == 400
    assert bootstrap(http, orch, metadata="é" * 512)  # exactly 1024 bytes
    folded = {"Runner_URL": "http://x", "APP": "a", "unknown": 1, "version": None}
    assert http.post(url, headers=auth, json=folded).status_code == 200


def test_prices_are_checked_as_an_onchain_orchestrator_does(http: httpx.Client) -> None:
    with LiveOrchestratorDouble(SECRET, onchain_prices=True) as orch:
        assert_go_error(beat(http, orch, SECRET), 400, "price_info.price is required")
        euro = beat(http, orch, SECRET, price_info={"price": 1, "currency": "eur"})
        assert_go_error(euro, 400, "price_info.currency must be usd")
        reply = bootstrap(http, orch, price_info={"price": 3.5, "unit": "720P"})
        price = orch.runner(reply["runner_id"]).heartbeat["price_info"]
    assert price == {"price": "3.5", "currency": "usd", "unit": "720p"}


# -- expiry, unregister, forget --------------------------------------------------------------------
def test_heartbeats_keep_a_runner_past_many_ttls_and_the_sweep_makes_it_401(
    orch: LiveOrchestratorDouble, http: httpx.Client
) -> None:
    reply = bootstrap(http, orch, runner_id="r")
    secret = reply["heartbeat_secret"]
    session_id = reserve(http, orch, "r").json()["session_id"]
    deadline = time.monotonic() + 2 * TTL_S
    while time.monotonic() < deadline:
        assert beat(http, orch, secret, runner_id="r").status_code == 200
        time.sleep(INTERVAL_S)
    assert orch.runner("r").session_ids == [session_id]

    orch.wait_for(lambda: "r" not in orch.runners, timeout_s=TTL_S + 1.0)
    assert http.get(f"{orch.url}/discovery").json() == [{"address": orch.public_url}]
    assert_go_error(
        beat(http, orch, secret, runner_id="r"), 401, "invalid registration authorization"
    )
    again = bootstrap(http, orch, runner_id="r")
    assert again["heartbeat_secret"] != secret and again["session_ids"] == []
    app = http.get(f"{orch.url}/apps/r/session/{session_id}/app/")
    assert_go_error(app, 404, "runner session not found")


def test_an_expired_runner_is_404_until_the_sweep(http: httpx.Client) -> None:
    with LiveOrchestratorDouble(SECRET, heartbeat_ttl_s=TTL_S, sweep_interval_s=60) as orch:
        secret = bootstrap(http, orch, runner_id="r")["heartbeat_secret"]
        orch.expire("r")
        assert_go_error(beat(http, orch, secret, runner_id="r"), 404, "runner not found")
        assert_go_error(beat(http, orch, SECRET, runner_id="r"), 404, "runner not found")
        unregister = http.post(
            f"{orch.url}/runners/r/unregister", headers={"Authorization": secret}
        )
        assert_go_error(unregister, 404, "runner not found")
        assert_go_error(reserve(http, orch, "r"), 404, "runner not found")
        assert "runners" not in http.get(f"{orch.url}/discovery").json()[0]
        assert orch.sweep() == ["r"]
        assert beat(http, orch, secret, runner_id="r").status_code == 401
        assert bootstrap(http, orch, runner_id="r")["runner_id"] == "r"


def test_unregister_and_forget(orch: LiveOrchestratorDouble, http: httpx.Client) -> None:
    secret = bootstrap(http, orch, runner_id="r")["heartbeat_secret"]
    url = f"{orch.url}/runners/r/unregister"
    assert_go_error(http.post(url, headers={"Authorization": SECRET}), 401, "invalid authorization")
    missing = http.post(f"{orch.url}/runners/nobody/unregister", headers={"Authorization": secret})
    assert_go_error(missing, 404, "runner not found")
    assert http.post(url, headers={"Authorization": secret}).status_code == 204
    assert orch.runners == {}
    assert beat(http, orch, secret, runner_id="r").status_code == 401

    secret = bootstrap(http, orch, runner_id="r")["heartbeat_secret"]
    assert orch.forget("r") and not orch.forget("r")
    assert beat(http, orch, secret, runner_id="r").status_code == 401
    bootstrap(http, orch, runner_id="a")
    bootstrap(http, orch, runner_id="b")
    orch.restart()
    assert orch.runners == {}


# -- discovery and sessions -----------------------------------------------------------------------
def test_discovery_reserve_and_capacity(orch: LiveOrchestratorDouble, http: httpx.Client) -> None:
    gpu = {"name": "NVIDIA H100", "vram_mb": 81559}
    secret = bootstrap(http, orch, runner_id="r", gpu=gpu, version="1.0", metadata="m")[
        "heartbeat_secret"
    ]
    runner = {
        "url": f"{orch.public_url}/apps/r/session",
        "gpu": gpu,
        "app": APP,
        "version": "1.0",
        "metadata": "m",
        "mode": "persistent",
        "capacity": 1,
        "capacity_used": 0,
        "capacity_available": 1,
    }
    assert http.get(f"{orch.url}/discovery").json() == [
        {"address": orch.public_url, "runners": [runner]}
    ]
    reserved = reserve(http, orch, "r").json()
    session_id = reserved["session_id"]
    assert re.fullmatch(f"session_{BASE32}{{8}}", session_id)
    assert reserved["control_url"] == f"{orch.public_url}/apps/r/session/{session_id}"
    assert reserved["app_url"] == reserved["control_url"] + "/app"
    assert_go_error(reserve(http, orch, "r"), 503, "no capacity available for runner")
    [listed] = http.get(f"{orch.url}/discovery").json()[0]["runners"]
    assert (listed["capacity_used"], listed["capacity_available"]) == (1, 0)
    reply = beat(http, orch, secret, runner_id="r", status="loading", capacity=2)
    assert reply.json()["session_ids"] == [session_id]

    assert "runners" not in http.get(f"{orch.url}/discovery").json()[0]
    assert_go_error(reserve(http, orch, "r"), 404, "runner not found")
    assert_go_error(http.get(reserved["app_url"] + "/"), 404, "runner not found")
    stop = f"{orch.url}/apps/r/session/{session_id}/stop"
    assert http.post(stop).status_code == 204  # releasing works while not ready
    assert http.post(stop).status_code == 204  # an unknown session is a no-op, as in Go
    assert orch.runner("r").session_ids == []
    assert_go_error(reserve(http, orch, "nobody"), 404, "runner not found")
    stop_unknown = http.post(f"{orch.url}/apps/nobody/session/x/stop")
    assert_go_error(stop_unknown, 404, "runner not found")


def test_the_proxy_forwards_to_the_runner_with_the_session_headers(
    orch: LiveOrchestratorDouble, http: httpx.Client, runner_app: ThreadedServer
) -> None:
    bootstrap(http, orch, runner_id="r", runner_url=runner_app.url + "/base")
    reserved = reserve(http, orch, "r").json()
    sid = reserved["session_id"]
    forged = {"Livepeer-Session-Id": "forged", "X-Forwarded-For": "1.2.3.4", "X-Client": "c"}
    response = http.put(f"{reserved['app_url']}/v1/x/?y=1&y=2", content=b"body", headers=forged)
    assert response.status_code == 200 and response.headers["x-runner"] == "yes"
    seen = response.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("PUT", "/base/v1/x/", "y=1&y=2")
    assert seen["body"] == "body"
    assert seen["headers"] == {
        "Livepeer-Runner-Route": "r",
        "Livepeer-Session-Id": sid,
        "Livepeer-Session-Token": orch.session_token("r", sid),
        "Livepeer-Session-Control": f"{orch.url}/runner/r/session/{sid}",
        "host": runner_app.url.removeprefix("http://"),
        "x-forwarded-for": None,
        "x-client": "c",
    }
    assert http.get(reserved["app_url"] + "/").json()["path"] == "/base"  # url.JoinPath

    root = http.get(reserved["app_url"] + "?a=b")
    assert root.status_code == 301
    assert root.headers["location"] == f"/apps/r/session/{sid}/app/?a=b"
    unknown = http.get(f"{orch.url}/apps/r/session/session_nope/app/")
    assert_go_error(unknown, 404, "runner session not found")


def test_the_proxy_streams_and_answers_502_for_a_dead_runner(
    orch: LiveOrchestratorDouble, http: httpx.Client, runner_app: ThreadedServer
) -> None:
    bootstrap(http, orch, runner_id="r", runner_url=runner_app.url + "/base")
    app_url = reserve(http, orch, "r").json()["app_url"]
    started = time.monotonic()
    with http.stream("GET", f"{app_url}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        arrivals = [time.monotonic() - started for _ in response.iter_raw()]
    assert arrivals[0] < 0.3 and arrivals[-1] > 0.35

    bootstrap(http, orch, runner_id="dead", runner_url=f"http://127.0.0.1:{free_port()}")
    dead_url = reserve(http, orch, "dead").json()["app_url"]
    assert http.get(f"{dead_url}/x").status_code == 502


# -- session callbacks: trickle channels and stop --------------------------------------------------
async def test_session_channels(orch: LiveOrchestratorDouble) -> None:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        await check_channels(orch, client)


async def check_channels(orch: LiveOrchestratorDouble, client: httpx.AsyncClient) -> None:
    await client.post(
        f"{orch.url}/runners/heartbeat", headers={"Authorization": SECRET}, json=registration()
    )
    runner_id = next(iter(orch.runners))
    session = orch.reserve(runner_id)
    url = f"{session.session_control}/channels"
    token = {"Livepeer-Session-Token": session.token}
    wanted = [{"name": "events", "mime_type": "application/json"}, {"name": "a/b"}]
    made = await client.post(url, headers=token, json={"channels": wanted})
    assert made.status_code == 200, made.text
    events, slashed = made.json()["channels"]
    channel_name = f"{session.session_id}-events"
    assert events == {
        "name": "events",
        "channel_name": channel_name,
        "url": f"http://localhost:{orch.trickle.url.rsplit(':', 1)[1]}/{channel_name}",
        "internal_url": f"{orch.trickle.url}/{channel_name}",
        "mime_type": "application/json",
    }
    assert (slashed["name"], slashed["mime_type"]) == ("a-b", "application/octet-stream")
    again = await client.post(url, headers=token, json={"channels": [{"name": "events"}]})
    assert again.json()["channels"] == [events]  # idempotent: the first descriptor
    await check_channel_errors(client, url, token)

    published = await client.post(f"{events['internal_url']}/0", content=b'{"hello":1}')
    assert published.status_code == 200
    internal = events["internal_url"]
    subscriber = TrickleSubscriber(client, events["url"], start_seq=0)  # clients get "url"
    segment = await subscriber.next_segment()
    assert segment is not None and await segment.read(1024) == b'{"hello":1}'
    await subscriber.close()

    deleted = await client.request("DELETE", url, headers=token, json={"channels": ["a/b"]})
    assert deleted.json() == {"deleted": ["a/b"]}
    assert (await client.get(f"{slashed['internal_url']}/0")).status_code == 404
    gone = await client.request("DELETE", url, headers=token, json={"channels": ["a-b"]})
    assert_go_error(gone, 404, "trickle channel not found")
    assert orch.runner(runner_id).channels == {session.session_id: ["events"]}
    await asyncio.to_thread(orch.release, runner_id, session.session_id)
    assert (await client.get(f"{internal}/0")).status_code == 404


async def check_channel_errors(client: httpx.AsyncClient, url: str, token: dict[str, str]) -> None:
    bad_name = await client.post(url, headers=token, json={"channels": [{"name": "a b"}]})
    assert_go_error(
        bad_name,
        400,
        "trickle channel name may only contain alphanumerics, underscores, or hyphens",
    )
    many = {"channels": [{"name": f"c{index}"} for index in range(26)]}
    assert_go_error(
        await client.post(url, headers=token, json=many),
        400,
        "channels cannot contain more than 25 entries",
    )
    empty = await client.post(url, headers=token, json={"channels": []})
    assert_go_error(empty, 400, "channels is required")
    wrong = await client.post(url, headers={"Livepeer-Session-Token": "x"}, json=many)
    assert_go_error(wrong, 401, "invalid authorization")
    unknown = url.replace("/session/session_", "/session/nope_")
    assert_go_error(
        await client.post(unknown, headers=token, json=many), 404, "runner session not found"
    )


# -- the O2R channel -------------------------------------------------------------------------------
async def test_o2r_keepalives_and_session_events(orch: LiveOrchestratorDouble) -> None:
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        await check_o2r(orch, client)


async def next_message(subscriber: TrickleSubscriber, *, skip_keepalive: bool = True) -> Any:
    """The next O2R message (None once the channel ended)."""
    while True:
        segment = await asyncio.wait_for(subscriber.next_segment(), 5.0)
        if segment is None:
            return None
        message = json.loads(await segment.read(4096))
        if not (skip_keepalive and message == {"keep": "alive"}):
            return message


async def check_o2r(orch: LiveOrchestratorDouble, client: httpx.AsyncClient) -> None:
    reply = (
        await client.post(
            f"{orch.url}/runners/heartbeat",
            headers={"Authorization": SECRET},
            json=registration(runner_id="r", capacity=2),
        )
    ).json()
    subscriber = TrickleSubscriber(client, reply["o2r"]["url"], start_seq=0)
    assert await next_message(subscriber, skip_keepalive=False) == {"keep": "alive"}

    session = await asyncio.to_thread(orch.reserve, "r")
    reserved = await next_message(subscriber)
    assert (reserved["event"], reserved["session"]) == ("reserved", session.session_id)
    assert reserved["timestamp"].endswith("Z") and datetime.fromisoformat(reserved["timestamp"])

    stop = await client.post(
        f"{session.session_control}/stop", headers={"Livepeer-Session-Token": session.token}
    )
    assert stop.status_code == 204
    released = await next_message(subscriber)
    assert (released["event"], released["session"]) == ("released", session.session_id)

    kept = await asyncio.to_thread(orch.reserve, "r")
    assert (await next_message(subscriber))["session"] == kept.session_id
    unregister = await client.post(
        f"{orch.url}/runners/r/unregister", headers={"Authorization": reply["heartbeat_secret"]}
    )
    assert unregister.status_code == 204
    assert await next_message(subscriber) is None  # closed first: no "released" for `kept`
    written = [message.get("event") for message in orch.o2r_messages("r")]
    assert [event for event in written if event] == ["reserved", "released", "reserved"]
