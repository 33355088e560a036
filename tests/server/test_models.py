"""One model serves every session: only a session alone may change it; a bad one is refused."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from livediff.testing.servers import LiveServer
from tests.server.faulty import ModelSwitchTransform
from tests.server.streaming import publish, sample_offer

PIPELINE = "tests.server.faulty:ModelSwitchTransform"
#: The models these tests switch to (the transform's default, "a", is allowed by itself).
ALLOWED = ["b", "c", "missing"]
SMALL = {"width": 128, "height": 128}


def transform_of(server: LiveServer) -> ModelSwitchTransform:
    transform = server.service.engine.transform
    assert isinstance(transform, ModelSwitchTransform)
    return transform


async def test_a_session_alone_may_change_the_model(serve: Callable[..., LiveServer]) -> None:
    server = serve(pipeline=PIPELINE, allow_models=ALLOWED)
    async with (
        publish(server.url, params=SMALL) as client,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        path = f"/v1/sessions/{client.session_id}/params"
        changed = await http.patch(path, json={"model": "b"})
        refused = await http.patch(path, json={"model": "missing"})
    assert changed.status_code == 200 and changed.json()["model"] == "b"
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "model"]
    assert transform_of(server).loaded == "b" and transform_of(server).reloads == 1


async def test_a_shared_model_is_not_changed_under_other_sessions(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(pipeline=PIPELINE, allow_models=ALLOWED)
    new_offer = await sample_offer()
    async with (
        publish(server.url, params=SMALL) as first,
        publish(server.url, params=SMALL),
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        patch = await http.patch(f"/v1/sessions/{first.session_id}/params", json={"model": "b"})
        opened = await http.post("/v1/sessions", json={"sdp": new_offer, "params": {"model": "c"}})
        info = (await http.get(f"/v1/sessions/{first.session_id}")).json()
    assert patch.status_code == 409 and "other session" in patch.json()["detail"]
    assert opened.status_code == 409
    assert info["params"]["model"] == "a" and transform_of(server).reloads == 0


async def test_a_new_session_naming_a_missing_model_gets_422_and_leaves_nothing(
    serve: Callable[..., LiveServer],
) -> None:
    server = serve(pipeline=PIPELINE, allow_models=ALLOWED)
    async with httpx.AsyncClient(base_url=server.url) as http:
        refused = await http.post(
            "/v1/sessions", json={"sdp": await sample_offer(), "params": {"model": "missing"}}
        )
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "params", "model"]
    assert server.service.records == {} and not server.service.engine.worker.attached
    assert server.service.engine.health() == "IDLE"
