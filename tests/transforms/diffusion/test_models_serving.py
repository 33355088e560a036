"""The models people bring, served live: a real WebRTC session against a real server running
the tiny SDXL model changes its LoRA weights, turns the safety filter on and off and switches
prompts through params PATCH; frames keep flowing, the model is neither reloaded nor
recompiled, flagged frames are counted, and a LoRA of another family is a 422 on its entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from torch._dynamo.utils import counters

from livediff.testing.lora import write_lora
from livediff.testing.models import TINY_SDXL_UNET, TINY_UNET, ModelFolders, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.server.streaming import publish
from tests.transforms.diffusion.conftest import SIZE


def changes(lora: str) -> list[dict[str, Any]]:
    """The PATCHes, in order, each applied while frames flow."""
    return [
        {"lora_dict": {lora: 0.7}},
        {"lora_dict": {lora: 1.4}, "prompt": "a charcoal sketch"},
        {"use_safety_checker": True, "safety_checker_threshold": 0.5},  # flags every frame
        {"safety_checker_threshold": 1.0},  # flags none
        {"use_safety_checker": False, "lora_dict": None},
    ]


async def test_loras_safety_and_prompts_change_mid_stream_on_sdxl(
    serve: Callable[..., LiveServer],
    tiny_sdxl: ModelFolders,
    classifier: str,
    tmp_path: Path,
) -> None:
    lora = str(write_lora(tmp_path / "sdxl-lora", TINY_SDXL_UNET, seed=2))
    sd_lora = str(write_lora(tmp_path / "sd-lora", TINY_UNET, seed=2))
    server = serve(
        **tiny_options(tiny_sdxl, SIZE), safety_model=classifier, allow_models=[lora, sd_lora]
    )
    transform = server.service.engine.transform
    assert isinstance(transform, DiffusionTransform)
    unet_batch = transform._unet_batch()
    assert unet_batch.bundle.sdxl
    graphs = sum(counters["stats"].values())
    registry = server.service.engine.metrics.registry
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        publish(server.url, size=SIZE, params={"seed": 4}) as client,
    ):
        await client.video.wait_for(4, timeout=60)
        url = f"/v1/sessions/{client.session_id}"
        for change in changes(lora):
            patched = await http.patch(f"{url}/params", json=change)
            assert patched.status_code == 200, patched.text
            count = len(client.video.frames)
            await client.video.wait_for(count + 4, timeout=60)
        filtered = registry.get_sample_value("livediff_frames_filtered_total")
        refused = await http.patch(f"{url}/params", json={"lora_dict": {sd_lora: 1.0}})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"][-2:] == ["lora_dict", sd_lora]
        count = len(client.video.frames)
        await client.video.wait_for(count + 2, timeout=60)  # the stream goes on
        final = (await http.get(url)).json()
    # the frames after the PATCH: those in flight when it landed kept the filter off
    assert filtered is not None and filtered >= 2
    assert final["params"]["lora_dict"] is None and final["params"]["use_safety_checker"] is False
    assert final["errors"] == 0
    loads = registry.get_sample_value("livediff_model_loads_total")
    assert loads == 1 and transform._unet_batch() is unet_batch  # never reloaded
    assert sum(counters["stats"].values()) == graphs  # nothing compiled
