"""The temporal tools served live: a real WebRTC session against a real server on the tiny
model turns each tool on and off through params PATCH; frames keep flowing, the model is
neither reloaded nor recompiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from torch._dynamo.utils import counters

from livediff.testing.models import ModelFolders, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.server.streaming import publish
from tests.transforms.diffusion.conftest import SIZE


def feedback(kind: str, strength: float) -> dict[str, Any]:
    return {"processors": [{"type": kind, "params": {"feedback_strength": strength}}]}


CHANGES: list[dict[str, Any]] = [
    {"image_postprocessing": feedback("feedback", 0.5)},
    {"image_preprocessing": feedback("feedback", 0.3), "do_add_noise": False},
    {"latent_preprocessing": feedback("latent_feedback", 0.4)},
    {"latent_postprocessing": feedback("latent_feedback", 0.2)},
    {"motion_noise": {"enabled": True, "min_strength": 0.3, "max_strength": 0.8}},
    {"cached_attention": {"max_frames": 2}},
    {"cached_attention": {"max_frames": 4, "interval": 2}},
    {
        "image_postprocessing": None,
        "image_preprocessing": {"enabled": False, "processors": []},
        "latent_preprocessing": None,
        "latent_postprocessing": None,
        "motion_noise": {"enabled": False},
        "cached_attention": None,
        "do_add_noise": True,
    },
]


async def test_temporal_tools_turn_on_and_off_mid_stream_without_reload_or_recompile(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders
) -> None:
    server = serve(**tiny_options(tiny_model, SIZE))
    transform = server.service.engine.transform
    assert isinstance(transform, DiffusionTransform)
    unet_batch = transform._unet_batch()
    graphs = sum(counters["stats"].values())
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        schema = (await http.get("/v1/pipeline")).json()["params_schema"]
        for name in (
            "image_preprocessing",
            "latent_postprocessing",
            "motion_noise",
            "cached_attention",
        ):
            assert name in schema["properties"]
        params = {"t_index_list": [20, 35], "seed": 4}
        async with publish(server.url, size=SIZE, params=params) as client:
            await client.video.wait_for(4, timeout=60)
            url = f"/v1/sessions/{client.session_id}"
            for change in CHANGES:
                patched = await http.patch(f"{url}/params", json=change)
                assert patched.status_code == 200, patched.text
                count = len(client.video.frames)
                await client.video.wait_for(count + 4, timeout=60)
                info = (await http.get(url)).json()
                assert info["params"]["t_index_list"] == [20, 35]
                reported = info["pipeline_state"]["temporal"]  # the session says what acts on it
                assert (
                    reported
                    == DiffusionTransform.describe_session(
                        transform.params_model(**info["params"])
                    )["temporal"]
                )
            refused = await http.patch(
                f"{url}/params", json={"image_postprocessing": feedback("feedback", 2.0)}
            )
            assert refused.status_code == 422
            location = refused.json()["detail"][0]["loc"]
            assert location[-5:] == [
                "image_postprocessing",
                "processors",
                0,
                "params",
                "feedback_strength",
            ]
            final = (await http.get(url)).json()
    assert final["params"]["image_postprocessing"] == {"enabled": True, "processors": []}
    assert final["params"]["motion_noise"]["enabled"] is False
    assert final["params"]["cached_attention"]["enabled"] is False
    assert final["pipeline_state"] == {"temporal": []}
    assert final["errors"] == 0 and final["frames_out"] >= 4 * (len(CHANGES) + 1)
    loads = server.service.engine.metrics.registry.get_sample_value("livediff_model_loads_total")
    assert loads == 1 and transform._unet_batch() is unet_batch  # never reloaded
    assert sum(counters["stats"].values()) == graphs  # nothing compiled
