"""ControlNet in the stream batch: what diffusers computes, live changes, guidance windows,
ControlNets joining mid-stream, and the 422s of what cannot be served.

The ControlNets are tiny random ones built from the tiny UNet (``ControlNetModel.from_unet``)
with their zero convolutions randomised, so that they do change the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
from pydantic import ValidationError
from torch._dynamo.utils import counters

from livediff.pixels.device import constants
from livediff.testing.models import ModelFolders, build_components, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.server.streaming import publish
from tests.transforms.diffusion.conftest import (
    SIZE,
    Stream,
    camera_frames,
    ready,
    spec,
    write_controlnet,
    write_depth_model,
)


@pytest.fixture
def transform(make_transform: Callable[..., DiffusionTransform]) -> DiffusionTransform:
    return make_transform()


def reference_pipe(transform: DiffusionTransform, folders: list[str]) -> Any:
    bundle = transform._unet_batch().bundle
    models = [ControlNetModel.from_pretrained(folder) for folder in folders]
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        controlnet=models if len(models) > 1 else models[0],
        scheduler=bundle.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("count", [1, 2], ids=["one", "multi"])
def test_one_step_equals_diffusers_controlnet_img2img(
    transform: DiffusionTransform, controlnets: list[str], count: int
) -> None:
    chosen = controlnets[:count]
    scales = [0.8, 0.5][:count]
    entries = [
        spec(model_id, conditioning_scale=scale)
        for model_id, scale in zip(chosen, scales, strict=True)
    ]
    stream = Stream(transform, prompt="a red fox", seed=7, strength=0.5, controlnets=entries)
    image = camera_frames(1)[0]
    ready(transform, *chosen)
    ours = stream.feed(image)

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    reference = reference_pipe(transform, chosen)(
        prompt="a red fox",
        image=pixels,
        control_image=pixels if count == 1 else [pixels] * count,
        controlnet_conditioning_scale=scales[0] if count == 1 else scales,
        num_inference_steps=2,
        strength=0.5,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)
    plain = Stream(transform, prompt="a red fox", seed=7, strength=0.5).feed(image)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the ControlNets do steer it
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=0)


def test_scale_zero_is_no_controlnet_and_a_scale_change_needs_no_reload(
    transform: DiffusionTransform, controlnets: list[str]
) -> None:
    image = camera_frames(1)[0]
    plain = Stream(transform, seed=3).feed(image)
    stream = Stream(transform, seed=3, controlnets=[spec(controlnets[0], conditioning_scale=0.0)])
    ready(transform, controlnets[0])
    model = transform.unet_batch
    torch.testing.assert_close(stream.feed(image), plain, atol=1e-6, rtol=0)
    stream.update(controlnets=[spec(controlnets[0], conditioning_scale=1.0)])
    steered = stream.feed(image)
    assert not torch.allclose(steered, plain, atol=1e-3)
    stream.update(controlnets=[spec(controlnets[0], enabled=False)])
    torch.testing.assert_close(stream.feed(image), plain, atol=1e-6, rtol=0)
    assert transform.unet_batch is model  # no reload


@contextmanager
def controlnet_rows(transform: DiffusionTransform, model_id: str) -> Iterator[list[int]]:
    """Record how many UNet rows go through the ControlNet in each call inside the block."""
    pool = transform._unet_batch().controlnets
    assert pool is not None
    forward = pool.get(model_id)
    assert forward is not None
    rows: list[int] = []

    def counting(*inputs: torch.Tensor) -> Any:
        rows.append(inputs[0].shape[0])
        return forward(*inputs)

    pool._ready[model_id] = counting
    try:
        yield rows
    finally:
        pool._ready[model_id] = forward


@pytest.mark.parametrize(
    ("t_index_list", "window", "rows"),
    [
        ([10, 30], (0.0, 1.0), 2),
        ([10, 30], (0.5, 1.0), 1),
        ([5, 20, 35, 45], (0.0, 0.5), 2),
        ([5, 20, 35, 45], (0.25, 0.75), 2),
        ([5, 20, 35, 45], (0.5, 0.5), 0),
    ],
)
def test_guidance_start_and_end_pick_the_denoising_steps(
    transform: DiffusionTransform,
    controlnets: list[str],
    t_index_list: list[int],
    window: tuple[float, float],
    rows: int,
) -> None:
    start, end = window
    entry = spec(controlnets[0], control_guidance_start=start, control_guidance_end=end)
    stream = Stream(transform, t_index_list=t_index_list, controlnets=[entry])
    frames = camera_frames(len(t_index_list) + 2)
    stream.feed(frames[0])
    ready(transform, controlnets[0])
    with controlnet_rows(transform, controlnets[0]) as calls:
        for frame in frames[1:]:
            stream.feed(frame)
    assert calls == ([rows] * (len(frames) - 1) if rows else [])


def test_full_guidance_rows_share_their_frames_control_image(
    transform: DiffusionTransform, controlnets: list[str]
) -> None:
    stream = Stream(
        transform,
        t_index_list=[10, 30],
        cfg_type="full",
        guidance_scale=2.0,
        controlnets=[spec(controlnets[0])],
    )
    frames = camera_frames(4)
    stream.feed(frames[0])
    ready(transform, controlnets[0])
    with controlnet_rows(transform, controlnets[0]) as calls:
        stream.feed(frames[1])
    assert calls == [4]  # 2 steps, each with its negative row
    images = stream.state.controls
    assert len(images) == 1 and next(iter(images.values())).shape[0] == 2


def test_a_controlnet_for_another_family_is_refused(
    transform: DiffusionTransform, tmp_path: Path
) -> None:
    other = build_components("tiny")["unet"]
    config = dict(other.config)
    config["cross_attention_dim"] = other.config.cross_attention_dim * 2
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    folder = write_controlnet(tmp_path / "wide", wider, 5)
    stream = Stream(transform)
    new = stream.params.model_copy(update={"controlnets": []})
    transform.validate_params(new)
    bad = type(stream.params).model_validate(
        {**stream.params.model_dump(), "controlnets": [spec(folder)]}
    )
    with pytest.raises(ValidationError) as refused:
        transform.validate_params(bad)
    error = refused.value.errors()[0]
    assert error["loc"] == ("controlnets", 0, "model_id")
    assert "cross_attention_dim" in error["msg"]


def test_a_controlnet_not_downloaded_offline_names_the_fetch_command(
    transform: DiffusionTransform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    stream = Stream(transform)
    bad = type(stream.params).model_validate(
        {**stream.params.model_dump(), "controlnets": [spec("someone/controlnet-canny")]}
    )
    with pytest.raises(ValidationError) as refused:
        transform.validate_params(bad)
    error = refused.value.errors()[0]
    assert error["loc"] == ("controlnets", 0, "model_id")
    assert "prepare-models" in error["msg"]


async def test_adding_a_controlnet_mid_stream_keeps_frames_flowing(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders, controlnets: list[str]
) -> None:
    options = tiny_options(tiny_model, SIZE)
    allowed = [options["model"], options["vae"], *controlnets]
    server = serve(**options, allow_models=allowed)
    async with (
        publish(server.url, size=SIZE) as client,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        await client.video.wait_for(10, timeout=60)
        url = f"/v1/sessions/{client.session_id}/params"
        added_at = time.perf_counter()
        entry = {"model_id": controlnets[0], "preprocessor": "canny"}
        answer = await http.patch(url, json={"controlnets": [entry]})
        assert answer.status_code == 200, answer.text
        count = len(client.video.frames)
        await client.video.wait_for(count + 20, timeout=60)
        refused = await http.patch(url, json={"controlnets": [{**entry, "preprocessor": "sobel"}]})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"][-1] == "preprocessor"
        bad_params = {**entry, "preprocessor_params": {"low_threshold": 999}}
        refused = await http.patch(url, json={"controlnets": [bad_params]})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"][-2:] == ["preprocessor_params", "low_threshold"]
        info = (await http.get(f"/v1/sessions/{client.session_id}")).json()
    arrivals = [frame.at for frame in client.video.frames if frame.at >= added_at]
    longest_gap = max(b - a for a, b in pairwise(arrivals))
    assert info["params"]["controlnets"][0]["model_id"] == controlnets[0]
    assert longest_gap < 1.0, f"the stream stalled {longest_gap:.2f} s while the ControlNet loaded"


@contextmanager
def tensors_from_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every ``torch.tensor`` call inside the block (on a GPU, with ``device=cuda``, a
    copy from pageable memory that waits for the CUDA stream)."""
    made: list[str] = []
    original = torch.tensor

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(repr(args[0])[:60] if args else repr(kwargs)[:60])
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "tensor", recording)
        yield made


def test_a_steady_batch_with_controlnets_makes_no_constants(
    make_transform: Callable[..., DiffusionTransform],
    controlnets: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row indices and scales, the depth model's mean and std, the Canny kernels: made on the
    first batch, found in the device constants on the next (no host copy, so no host wait)."""
    depth = write_depth_model(tmp_path / "depth")
    transform = make_transform(depth_model=str(depth))
    canny = spec(controlnets[0], preprocessor="canny", conditioning_scale=0.7)
    depth_entry = spec(
        controlnets[1], preprocessor="depth", preprocessor_params={"detect_resolution": 140}
    )
    streams = [
        Stream(transform, t_index_list=[10, 30], controlnets=[canny]),
        Stream(
            transform,
            cfg_type="full",
            guidance_scale=2.0,
            controlnets=[
                depth_entry,
                spec(controlnets[0], conditioning_scale=0.3),
            ],
        ),
    ]
    frames = camera_frames(4)
    transform.process([stream.job(frames[0]) for stream in streams])
    ready(transform, *controlnets)
    transform.process([stream.job(frames[1]) for stream in streams])  # makes the constants
    misses = constants.misses
    with tensors_from_host(monkeypatch) as made:
        for frame in frames[2:]:
            transform.process([stream.job(frame) for stream in streams])
    assert made == []
    assert constants.misses == misses


def test_a_controlnet_loaded_inside_a_batch_runs_eager_until_params_name_it(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """Under --compile, a ControlNet that loads while serving (no params check before it, as
    after an idle release) runs eager on the real rows: nothing compiles inside a batch. The
    next check of params naming it plans it, and it runs padded to the bucket from then on."""
    from tests.transforms.diffusion.test_compiled_controlnets import planned_call, rows_run

    torch._dynamo.reset()
    try:
        transform = make_transform(
            compile=True, compile_backend="eager", batch_buckets=[4], frame_graph=False
        )
        stream = Stream(transform, t_index_list=[5, 20, 35], controlnets=[spec(controlnets[0])])
        frames = camera_frames(4)
        stream.feed(frames[0])
        ready(transform, controlnets[0])
        graphs = int(counters["stats"]["unique_graphs"])
        with controlnet_rows(transform, controlnets[0]) as rows:
            outputs = [stream.feed(frame) for frame in frames[1:]]
        assert rows == [3, 3, 3]  # 3 steps: not padded to the bucket of 4
        assert int(counters["stats"]["unique_graphs"]) == graphs, "compiled while serving"
        assert all(isinstance(output, torch.Tensor) for output in outputs[1:])
        transform.validate_params(stream.params)  # the engine's check, between batches
        graphs = int(counters["stats"]["unique_graphs"])
        with rows_run(planned_call(transform, controlnets[0])) as padded:
            stream.feed(frames[0])
        assert padded == [4]
        assert int(counters["stats"]["unique_graphs"]) == graphs, "compiled while serving"
    finally:
        torch._dynamo.reset()
