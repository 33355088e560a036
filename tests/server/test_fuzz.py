"""Hostile requests (issue 12): fuzzed calls of every operation in the OpenAPI schema, mutated
SDP offers and hostile params never get a 5xx, every refusal says what is wrong, and the server
stays healthy afterwards.

One passthrough server (uvicorn on 127.0.0.1) serves the whole module. Fuzzed offers that are
answered open real sessions (about 30 ms each, never connected), which are deleted at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from livediff.config import Settings
from livediff.media.peer import _encode_reply, _params_reply
from livediff.server.app import create_app
from livediff.server.http import json_depth, load_json
from livediff.testing.peers import NumberedVideoTrack, accept_answer, add_camera, client_peer
from livediff.testing.peers import local_offer as make_offer
from livediff.testing.servers import LiveServer, start_server
from tests.strategies import RealOffers, deep_json, mutated_offers, params_bodies, real_offers

#: Examples per fuzz test: the whole module runs in about 30 s on two cores.
EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JSON = {"content-type": "application/json"}
SDP = {"content-type": "application/sdp"}
#: A request that takes longer than this counts as a hang.
HANG_S = 10.0
MAX_DEPTH = 32


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    # Fuzzing opens hundreds of sessions a minute from one address: no rate limit here.
    server = start_server(
        Settings(max_sessions=64, connect_timeout_s=300, max_json_depth=32, session_rate_per_min=0)
    )
    try:
        yield server
        assert_healthy(server.url)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def offers() -> RealOffers:
    return asyncio.run(real_offers())


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=HANG_S) as client:
        yield client


@pytest.fixture(scope="module")
def session_id(http: httpx.Client, offers: RealOffers) -> str:
    """A session (never connected) whose params and viewers the fuzz tests change."""
    opened = http.post("/v1/sessions", json={"sdp": offers.camera})
    assert opened.status_code == 201, opened.text
    return str(opened.json()["session_id"])


def assert_healthy(url: str) -> None:
    health = httpx.get(f"{url}/health", timeout=HANG_S)
    assert health.status_code == 200 and health.json()["status"] in ("OK", "IDLE")


def strict_json(response: httpx.Response) -> Any:
    """The body, refusing NaN and Infinity (which JSON lacks and browsers cannot parse)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-finite number {constant} in {response.text[:200]}")

    return json.loads(response.text, parse_constant=refuse)


def assert_refusal_explains(response: httpx.Response) -> None:
    """A 4xx body names what is wrong: a sentence, or pydantic's errors with their field."""
    detail = strict_json(response)["detail"]
    if isinstance(detail, str):
        assert len(detail) > 10, detail
    else:
        assert detail and all(error["loc"] and error["msg"] for error in detail), detail


def close_opened(http: httpx.Client, response: httpx.Response) -> None:
    """Delete what a fuzzed request opened (a session or a viewer), so slots stay free."""
    if response.status_code == 201:
        assert http.delete(response.headers["location"]).status_code in (200, 204)


# -- (a) every operation of the OpenAPI schema ----------------------------------------------


#: The schema that /openapi.json serves (built without starting anything); the cases run
#: against the live server.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
schemathesis.serializer.alias("application/sdp", "text/plain")
schemathesis.serializer.alias("application/trickle-ice-sdpfrag", "text/plain")


@schema.parametrize()
@settings(max_examples=50, deadline=None, database=None)
def test_no_operation_answers_a_server_error(case: schemathesis.Case, live: LiveServer) -> None:
    response = case.call(base_url=live.url, timeout=HANG_S)
    case.validate_response(response, checks=[not_a_server_error])


# -- (b) mutated offers -----------------------------------------------------------------------


@FUZZ
@given(data=st.data(), route=st.sampled_from(["/whip", "/v1/sessions"]))
def test_a_mutated_offer_is_answered_or_refused_with_a_reason(
    http: httpx.Client, offers: RealOffers, data: st.DataObject, route: str
) -> None:
    offer = data.draw(mutated_offers(offers.publishers), label="offer")
    if route == "/whip":
        response = http.post(route, content=offer.encode(), headers=SDP)
    else:
        response = http.post(route, json={"sdp": offer})
    close_opened(http, response)
    assert response.status_code in (201, 400), response.text
    if response.status_code == 400:
        assert_refusal_explains(response)


@FUZZ
@given(data=st.data())
def test_a_mutated_viewer_offer_is_answered_or_refused_with_a_reason(
    http: httpx.Client, offers: RealOffers, session_id: str, data: st.DataObject
) -> None:
    offer = data.draw(mutated_offers((offers.viewer,)), label="offer")
    response = http.post(f"/whep/{session_id}", content=offer.encode(), headers=SDP)
    close_opened(http, response)
    assert response.status_code in (201, 400), response.text
    if response.status_code == 400:
        assert_refusal_explains(response)


# -- (b) hostile params -------------------------------------------------------------------------


@FUZZ
@given(body=params_bodies())
def test_hostile_params_are_refused_with_a_reason(
    http: httpx.Client, session_id: str, body: str
) -> None:
    response = http.patch(f"/v1/sessions/{session_id}/params", content=body, headers=JSON)
    assert response.status_code in (200, 400, 413, 422), response.text
    if response.status_code != 200:
        assert_refusal_explains(response)
    elif json_depth(body) > MAX_DEPTH:
        pytest.fail("a body nested deeper than max_json_depth was accepted")


@FUZZ
@given(data=st.data(), params=params_bodies())
def test_hostile_initial_params_are_refused_with_a_reason(
    http: httpx.Client, offers: RealOffers, data: st.DataObject, params: str
) -> None:
    offer = data.draw(st.sampled_from(offers.publishers))
    body = f'{{"sdp": {json.dumps(offer)}, "params": {params}}}'
    response = http.post("/v1/sessions", content=body, headers=JSON)
    close_opened(http, response)
    assert response.status_code in (201, 400, 413, 422), response.text
    if response.status_code != 201:
        assert_refusal_explains(response)


@pytest.mark.parametrize(
    ("value", "echoed"),
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e400", "Infinity")],
)
def test_a_non_finite_number_is_a_422_on_its_field(
    http: httpx.Client, offers: RealOffers, session_id: str, value: str, echoed: str
) -> None:
    patched = http.patch(
        f"/v1/sessions/{session_id}/params", content=f'{{"delay_ms": {value}}}', headers=JSON
    )
    opened = http.post(
        "/v1/sessions",
        content=f'{{"sdp": {json.dumps(offers.camera)}, "params": {{"width": {value}}}}}',
        headers=JSON,
    )
    close_opened(http, opened)
    for response, loc in ((patched, ["body", "delay_ms"]), (opened, ["body", "params", "width"])):
        assert response.status_code == 422, response.text
        [error] = strict_json(response)["detail"]
        assert error["loc"] == loc and error["msg"] == "Input should be a finite number"
        assert error["input"] == echoed


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 50_000])
def test_json_nested_deeper_than_the_limit_is_a_400_naming_it(
    http: httpx.Client, offers: RealOffers, session_id: str, depth: int
) -> None:
    deep = "[" * depth + "]" * depth
    patched = http.patch(
        f"/v1/sessions/{session_id}/params", content=f'{{"delay_ms": {deep}}}', headers=JSON
    )
    opened = http.post(
        "/v1/sessions",
        content=f'{{"sdp": {json.dumps(offers.camera)}, "params": {{"a": {deep}}}}}',
        headers=JSON,
    )
    for response, levels in ((patched, depth + 1), (opened, depth + 2)):
        assert response.status_code == 400, response.text
        detail = strict_json(response)["detail"]
        assert f"{levels} levels deep" in detail and f"at most {MAX_DEPTH}" in detail


def test_json_within_the_limit_is_parsed(http: httpx.Client, session_id: str) -> None:
    nested = '{"delay_ms": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    response = http.patch(f"/v1/sessions/{session_id}/params", content=nested, headers=JSON)
    assert response.status_code == 422  # parsed, then refused by the params model
    assert strict_json(response)["detail"][0]["loc"] == ["body", "delay_ms"]


# -- the JSON depth scan ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[", "]"]', 1),
        ('["\\"[[", {"}": "{"}]', 2),
        ('"\\\\"', 0),
        ('"unterminated [[[[', 0),
    ],
)
def test_the_depth_scan_ignores_brackets_in_strings(text: str, depth: int) -> None:
    assert json_depth(text) == depth


@settings(max_examples=100, deadline=None, database=None)
@given(
    value=st.recursive(
        st.none() | st.floats() | st.text(alphabet='[]{}"\\,: ab'),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(alphabet='[]{}"\\ ab'), children, max_size=3)
        ),
    )
)
def test_the_depth_scan_agrees_with_the_parser(value: Any) -> None:
    def depth_of(item: Any) -> int:
        if isinstance(item, list):
            return 1 + max(map(depth_of, item), default=0)
        if isinstance(item, dict):
            return 1 + max(map(depth_of, item.values()), default=0)
        return 0

    text = json.dumps(value)
    assert json_depth(text) == depth_of(value)
    parsed = load_json(text.encode("utf-16"), max_depth=64)
    assert json.dumps(parsed) == json.dumps(json.loads(text))  # as text: NaN != NaN as values


@settings(FUZZ, max_examples=50)
@given(text=deep_json())
def test_load_json_never_recurses_out(text: str) -> None:
    try:
        load_json(text.encode(), max_depth=MAX_DEPTH)
    except ValueError as exc:
        assert json_depth(text) > MAX_DEPTH and "levels deep" in str(exc)


# -- the params data channel ------------------------------------------------------------------


async def test_the_data_channel_answers_hostile_messages_in_strict_json(
    live: LiveServer,
) -> None:
    """One real session: NaN and deep nesting over the params channel get error replies that
    browsers can parse, and the session goes on."""
    pc = client_peer()
    add_camera(pc, NumberedVideoTrack(64, 64))
    channel = pc.createDataChannel("params")
    replies: asyncio.Queue[str] = asyncio.Queue()
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", replies.put_nowait)
    try:
        async with httpx.AsyncClient(base_url=live.url, timeout=HANG_S) as client:
            created = await client.post("/v1/sessions", json={"sdp": await make_offer(pc)})
            await accept_answer(pc, created.json()["sdp"])
            await asyncio.wait_for(opened.wait(), 20)
            answers = []
            for message in (
                '{"delay_ms": NaN}',
                '{"delay_ms": 1e400}',
                '{"delay_ms": ' + "[" * 100_000 + "]" * 100_000 + "}",
                '{"delay_ms": ' + "[" * 300 + "]" * 300 + "}",
                '{"delay_ms": 3}',
            ):
                channel.send(message)
                answers.append(await asyncio.wait_for(replies.get(), 10))
            info = await client.get(f"/v1/sessions/{created.json()['session_id']}")
            await client.delete(f"/v1/sessions/{created.json()['session_id']}")
    finally:
        await pc.close()

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-finite {constant} in a reply")

    nan, inf, deepest, deep, ok = (json.loads(a, parse_constant=refuse) for a in answers)
    assert nan["status"] == 422 and nan["detail"][0]["loc"] == ["delay_ms"]
    assert nan["detail"][0]["input"] == "NaN" and inf["detail"][0]["input"] == "Infinity"
    assert deepest["status"] == 400 and deep["status"] in (400, 422)
    assert ok["type"] == "params" and info.json()["params"]["delay_ms"] == 3.0
    assert_healthy(live.url)


async def test_a_params_reply_that_cannot_be_encoded_becomes_an_error() -> None:
    async def echo(patch: dict[str, Any]) -> dict[str, Any]:
        return {"type": "error", "status": 422, "detail": [{"input": patch}]}

    reply = await _params_reply(echo, '{"a": ' + "[" * 400 + "]" * 400 + "}")
    assert json.loads(_encode_reply(reply))["status"] == 400
