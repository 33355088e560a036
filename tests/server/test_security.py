"""Let no one in uninvited (issue 12): the bearer token on every session route, CORS only for
configured origins, static files only from web/, and model ids only from the allow-list."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from livediff.testing.servers import LiveServer
from tests.server.streaming import sample_offer

SDP = {"content-type": "application/sdp"}
JSON = {"content-type": "application/json"}
#: Every route that reads or changes a session, with a body of the right type.
GUARDED = [
    ("POST", "/v1/sessions", JSON, b"{}"),
    ("GET", "/v1/sessions", {}, b""),
    ("GET", "/v1/sessions/{id}", {}, b""),
    ("PATCH", "/v1/sessions/{id}/params", JSON, b"{}"),
    ("DELETE", "/v1/sessions/{id}", {}, b""),
    ("POST", "/whip", SDP, b"v=0\r\n"),
    ("PATCH", "/whip/{id}", {"content-type": "application/trickle-ice-sdpfrag"}, b""),
    ("DELETE", "/whip/{id}", {}, b""),
    ("POST", "/whep/{id}", SDP, b"v=0\r\n"),
    ("PATCH", "/whep/{id}/v", {"content-type": "application/trickle-ice-sdpfrag"}, b""),
    ("DELETE", "/whep/{id}/v", {}, b""),
    ("GET", "/v1/debug/stats", {}, b""),
]


async def test_every_session_route_wants_the_token(serve: Callable[..., LiveServer]) -> None:
    server = serve(token="s3cret", debug_endpoints=True)
    good = {"authorization": "Bearer s3cret"}
    async with httpx.AsyncClient(base_url=server.url) as http:
        opened = await http.post("/v1/sessions", json={"sdp": await sample_offer()}, headers=good)
        session_id = opened.json()["session_id"]
        for method, path, headers, body in GUARDED:
            url = path.format(id=session_id)
            for given in ({}, {"authorization": "Bearer s3cre"}, {"authorization": "s3cret"}):
                refused = await http.request(
                    method, url, headers={**headers, **given}, content=body
                )
                assert refused.status_code == 401, (method, path, given)
                assert refused.headers["www-authenticate"].startswith("Bearer")
        stats = await http.get("/v1/debug/stats", headers=good)
        public = [await http.get(path) for path in ("/health", "/metrics", "/v1/pipeline", "/")]
        assert (await http.get(f"/v1/sessions/{session_id}", headers=good)).status_code == 200
        await http.delete(f"/v1/sessions/{session_id}", headers=good)
    assert opened.status_code == 201 and stats.status_code == 200
    assert stats.json()["sessions"] == 1 and stats.json()["open_fds"] > 0
    assert [response.status_code for response in public] == [200, 200, 200, 200]


async def test_debug_stats_exist_only_when_asked_for(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/v1/debug/stats")).status_code == 404


async def test_cors_answers_only_configured_origins(serve: Callable[..., LiveServer]) -> None:
    allowed, other = "https://studio.example", "https://evil.example"
    open_server = serve(cors_origins=[allowed])
    closed_server = serve()
    preflight = {"access-control-request-method": "POST"}
    async with httpx.AsyncClient() as http:
        ok = await http.options(
            f"{open_server.url}/v1/sessions", headers={**preflight, "origin": allowed}
        )
        evil = await http.options(
            f"{open_server.url}/v1/sessions", headers={**preflight, "origin": other}
        )
        evil_get = await http.get(f"{open_server.url}/v1/pipeline", headers={"origin": other})
        none = await http.get(f"{closed_server.url}/v1/pipeline", headers={"origin": allowed})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
    assert "access-control-allow-origin" not in evil.headers
    assert "access-control-allow-origin" not in evil_get.headers
    assert "access-control-allow-origin" not in none.headers


TRAVERSALS = [
    "/../secret.txt",
    "/..%2fsecret.txt",
    "/..%2Fsecret.txt",
    "/%2e%2e/secret.txt",
    "/%2e%2e%2fsecret.txt",
    "/js/..%2f..%2fsecret.txt",
    "/js/../../secret.txt",
    "/..%5csecret.txt",
    "/..\\secret.txt",
    "/%252e%252e%252fsecret.txt",
    "//..//secret.txt",
    "/" + "%2e%2e/" * 8 + "etc/passwd",
]


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client normalises its dots or escapes)."""
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_static_files_never_leave_the_web_folder(
    serve: Callable[..., LiveServer], tmp_path: Path
) -> None:
    web = tmp_path / "web"
    (web / "js").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>studio</title>")
    (tmp_path / "secret.txt").write_text("the secret")
    server = serve(web_dir=str(web))
    assert raw_get(server.url, "/")[0] == 200
    for path in TRAVERSALS:
        status, body = raw_get(server.url, path)
        assert b"the secret" not in body and b"root:" not in body, path
        assert status in (400, 404), (path, status)


@pytest.fixture
def model_server(serve: Callable[..., LiveServer]) -> Callable[..., LiveServer]:
    def start(**overrides: object) -> LiveServer:
        return serve(pipeline="tests.server.faulty:ModelSwitchTransform", **overrides)

    return start


async def test_models_off_the_allow_list_get_422_saying_how_to_allow_them(
    model_server: Callable[..., LiveServer],
) -> None:
    strict = model_server()
    offer = await sample_offer()
    async with httpx.AsyncClient(base_url=strict.url) as http:
        refused = await http.post(
            "/v1/sessions", json={"sdp": offer, "params": {"model": "/etc/passwd"}}
        )
        opened = await http.post("/v1/sessions", json={"sdp": offer})
        path = f"/v1/sessions/{opened.json()['session_id']}/params"
        patched = await http.patch(path, json={"model": "../../elsewhere"})
        whip = await http.post("/whip?model=other/model", content=offer, headers=SDP)
        await http.delete(f"/v1/sessions/{opened.json()['session_id']}")
    [error] = refused.json()["detail"]
    assert refused.status_code == 422 and error["loc"] == ["body", "params", "model"]
    assert error["type"] == "model_not_allowed"
    assert "--allow-model /etc/passwd" in error["msg"] and "LIVEDIFF_ALLOW_MODELS" in error["msg"]
    assert patched.status_code == 422 and patched.json()["detail"][0]["loc"] == ["body", "model"]
    assert whip.status_code == 422 and whip.json()["detail"][0]["loc"] == ["query", "model"]
    transform = strict.service.engine.transform
    assert getattr(transform, "reloads", None) == 0  # nothing reached the loader
    allowing = model_server(allow_models=["other/model"])
    async with httpx.AsyncClient(base_url=allowing.url) as http:
        accepted = await http.post(
            "/v1/sessions", json={"sdp": offer, "params": {"model": "other/model"}}
        )
    assert accepted.status_code == 201


def test_the_diffusion_transform_names_its_model_ids() -> None:
    from livediff.transforms.diffusion.params import DiffusionParams
    from livediff.transforms.diffusion.transform import DiffusionTransform

    ids = DiffusionTransform.model_ids(DiffusionParams(model="a/b", vae="c/d"))
    assert ids == {("model",): "a/b", ("vae",): "c/d"}
    full = DiffusionTransform.model_ids(DiffusionParams(model="a/b", vae="full"))
    assert full == {("model",): "a/b"}  # the model's own VAE names no other files
    controlled = DiffusionParams.model_validate(
        {"controlnets": [{"model_id": "lllyasviel/canny"}, {"model_id": "/srv/depth"}]}
    )
    assert DiffusionTransform.model_ids(controlled) == {
        ("model",): controlled.model,
        ("vae",): controlled.vae,
        ("controlnets", 0, "model_id"): "lllyasviel/canny",
        ("controlnets", 1, "model_id"): "/srv/depth",
    }
