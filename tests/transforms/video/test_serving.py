"""``--pipeline video`` served: a real WebRTC session against a real server on the tiny Wan
model (a folder in diffusers' layout). Frames flow; a prompt change and reset_cache apply
mid-stream; bad params are 422s naming the field; two sessions at once keep their own caches;
the studio's schema (``GET /v1/pipeline``) lists the params."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from livediff.testing.servers import LiveServer
from livediff.testing.video_models import write_tiny_wan_folder
from livediff.transforms.video.transform import VideoTransform
from tests.server.streaming import publish

SIZE = 64
PARAMS = {"max_cache_frames": 4, "denoising_step_list": [500]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-wan-serving") / "model"
    write_tiny_wan_folder(folder, seed=0)
    return Path(folder)


def options(folder: Path) -> dict[str, Any]:
    size = {"width": SIZE, "height": SIZE}
    return {"pipeline": "video", "model": str(folder), "device": "cpu", **size}


async def video_state(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    info = (await http.get(f"/v1/sessions/{session_id}")).json()
    assert info["pipeline"] == "video"
    state: dict[str, Any] = info["pipeline_state"]["video"]
    return state


async def test_frames_flow_and_a_prompt_change_and_reset_apply_mid_stream(
    serve: Callable[..., LiveServer], tiny_folder: Path
) -> None:
    server = serve(**options(tiny_folder))
    assert isinstance(server.service.engine.transform, VideoTransform)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        schema = (await http.get("/v1/pipeline")).json()
        assert schema["name"] == "video"
        for name in (
            "prompt",
            "denoising_step_list",
            "noise_scale",
            "noise_controller",
            "seed",
            "reset_cache",
            "chunk_frames",
            "max_cache_frames",
        ):
            assert name in schema["params_schema"]["properties"]
        async with publish(server.url, size=SIZE, params=PARAMS) as client:
            await client.video.wait_for(6, timeout=90)
            url = f"/v1/sessions/{client.session_id}"
            first = await video_state(http, client.session_id)
            assert first["chunks"] >= 1 and first["first_frame_latency_ms"] > 0
            changed = await http.patch(f"{url}/params", json={"prompt": "a snowy night"})
            assert changed.status_code == 200, changed.text
            await client.video.wait_for(len(client.video.frames) + 6, timeout=90)
            assert (await video_state(http, client.session_id))["recaches"] >= 1
            reset = await http.patch(f"{url}/params", json={"reset_cache": True})
            assert reset.status_code == 200, reset.text
            await client.video.wait_for(len(client.video.frames) + 6, timeout=90)
            info = (await http.get(url)).json()
            assert info["pipeline_state"]["video"]["cache_resets"] == 1
            assert info["params"]["prompt"] == "a snowy night"
            assert "reset_cache" not in info["params"]  # one-shot: not kept
            refused = await http.patch(f"{url}/params", json={"denoising_step_list": [250, 750]})
            assert refused.status_code == 422
            assert refused.json()["detail"][0]["loc"][-1] == "denoising_step_list"
            final = (await http.get(url)).json()
    assert final["errors"] == 0 and final["frames_out"] >= 18


async def test_two_sessions_stream_at_once_with_their_own_caches(
    serve: Callable[..., LiveServer], tiny_folder: Path
) -> None:
    server = serve(**options(tiny_folder))
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        publish(server.url, size=SIZE, params={**PARAMS, "prompt": "fox"}) as one,
        publish(server.url, size=SIZE, params={**PARAMS, "prompt": "sea", "seed": 3}) as two,
    ):
        await one.video.wait_for(6, timeout=90)
        await two.video.wait_for(6, timeout=90)
        patched = await http.patch(
            f"/v1/sessions/{one.session_id}/params", json={"reset_cache": True}
        )
        assert patched.status_code == 200
        await one.video.wait_for(len(one.video.frames) + 6, timeout=90)
        await two.video.wait_for(len(two.video.frames) + 6, timeout=90)
        states = [await video_state(http, c.session_id) for c in (one, two)]
    assert states[0]["cache_resets"] == 1 and states[1]["cache_resets"] == 0
    assert states[0]["chunks"] >= 2 and states[1]["chunks"] >= 2
