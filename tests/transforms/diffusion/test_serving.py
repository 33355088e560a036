"""The diffusion pipeline served end to end: a real aiortc peer, uvicorn, /v1/sessions, codecs,
and a tiny model loaded from a local diffusers folder as ``--model`` would load it."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from livediff.testing.models import ModelFolders, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.server.streaming import publish
from tests.transforms.diffusion.conftest import SIZE


async def test_a_webrtc_session_is_restyled_live_and_takes_params_without_reloading(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders
) -> None:
    server = serve(**tiny_options(tiny_model, SIZE), allow_models=["./no/such/model"])
    transform = server.service.engine.transform
    assert isinstance(transform, DiffusionTransform)
    unet_batch = transform._unet_batch()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        pipeline = (await http.get("/v1/pipeline")).json()
        assert pipeline["name"] == "diffusion"
        assert pipeline["defaults"]["model"] == str(tiny_model.model)
        assert "t_index_list" in pipeline["params_schema"]["properties"]

        params = {"prompt": "a watercolour harbour", "t_index_list": [20, 35], "seed": 4}
        async with publish(server.url, size=SIZE, params=params) as client:
            await client.video.wait_for(8, timeout=60)
            url = f"/v1/sessions/{client.session_id}"
            processed_before = (await http.get(url)).json()["frames_processed"]

            patched = await http.patch(f"{url}/params", json={"prompt": "a neon city"})
            assert patched.status_code == 200, patched.text
            assert patched.json()["prompt"] == "a neon city"
            assert patched.json()["t_index_list"] == [20, 35]  # merged, not replaced
            count = len(client.video.frames)
            await client.video.wait_for(count + 8, timeout=60)

            refused = await http.patch(f"{url}/params", json={"t_index_list": [30, 10]})
            assert refused.status_code == 422
            assert refused.json()["detail"][0]["loc"][-1] == "t_index_list"
            missing = await http.patch(f"{url}/params", json={"model": "./no/such/model"})
            assert missing.status_code == 422, missing.text
            assert missing.json()["detail"][0]["loc"][-1] == "model"
            assert "neither a folder nor a hub id" in missing.json()["detail"][0]["msg"]

            info = (await http.get(url)).json()
    frames = client.video.frames
    assert {(frame.width, frame.height) for frame in frames} == {(SIZE, SIZE)}
    # the numbers drawn into the camera frames do not survive the model
    assert sum(frame.number is not None for frame in frames) <= len(frames) // 4
    assert info["frames_processed"] > processed_before  # the model went on after the update
    assert info["params"]["prompt"] == "a neon city" and info["params"]["model"] == str(
        tiny_model.model
    )
    assert info["frames_out"] >= 16 and info["errors"] == 0
    loads = server.service.engine.metrics.registry.get_sample_value("livediff_model_loads_total")
    assert loads == 1 and transform._unet_batch() is unet_batch  # never reloaded
