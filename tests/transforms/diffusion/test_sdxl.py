"""The SDXL family on the tiny random SDXL model: one-step img2img equals diffusers'
``StableDiffusionXLImg2ImgPipeline`` on the same components; the family comes from the configs;
sessions, guidance, ControlNets, the feature bank and compiled buckets run with its added
conditioning (pooled text embeddings and time ids)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from livediff.config import DEFAULT_SDXL_VAE, DEFAULT_VAE
from livediff.testing.models import ModelFolders
from livediff.testing.reference import diffusers_sdxl_img2img
from livediff.transforms.diffusion.models import (
    ModelChoice,
    UnsupportedModelError,
    family_vae,
    is_sdxl,
)
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import (
    Stream,
    camera_frames,
    ready,
    spec,
    tiny_settings,
    write_controlnet,
)

ATOL = 1e-5


@pytest.mark.parametrize(
    ("cfg_type", "guidance_scale", "negative"),
    [("none", 1.0, None), ("full", 3.0, "blurry"), ("full", 3.0, None)],
    ids=["no-guidance", "full-cfg", "full-cfg-empty-negative-is-zeros"],
)
def test_one_step_img2img_equals_diffusers_sdxl(
    make_sdxl: Callable[..., DiffusionTransform],
    cfg_type: str,
    guidance_scale: float,
    negative: str | None,
) -> None:
    transform = make_sdxl()
    assert transform._unet_batch().bundle.sdxl
    image = camera_frames(1)[0]
    stream = Stream(
        transform,
        prompt="a red fox in the snow",
        negative_prompt=negative or "",
        seed=7,
        strength=0.5,
        cfg_type=cfg_type,
        guidance_scale=guidance_scale,
    )
    ours = stream.feed(image)

    pipe = diffusers_sdxl_img2img(transform._unet_batch().bundle)
    reference = pipe(
        prompt="a red fox in the snow",
        negative_prompt=negative,
        image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
        num_inference_steps=2,  # trailing [999, 499]; strength 0.5 keeps the step at t=499
        strength=0.5,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)

    assert ours.shape == reference.shape == (1, 64, 64, 3)
    assert reference.std() > 0.1
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def test_sessions_batched_equal_each_alone(make_sdxl: Callable[..., DiffusionTransform]) -> None:
    """Several SDXL sessions in one UNet call, each with its own prompt, steps and guidance:
    each row carries its own pooled embedding and time ids."""
    transform = make_sdxl()
    settings: list[dict[str, Any]] = [
        {"prompt": "a watercolor", "t_index_list": [20, 35]},
        {"prompt": "a charcoal sketch", "cfg_type": "initialize", "guidance_scale": 2.0},
        {"prompt": [["neon", 1.0], ["fog", 0.5]], "cached_attention": {"max_frames": 2}},
    ]
    clips = [camera_frames(4, seed=number) for number in range(len(settings))]
    alone = [Stream(transform, seed=4, **values) for values in settings]
    together = [Stream(transform, seed=4, **values) for values in settings]
    for number in range(4):
        expected = [stream.feed(clips[i][number]) for i, stream in enumerate(alone)]
        outputs = transform.process(
            [stream.job(clips[i][number]) for i, stream in enumerate(together)]
        )
        for output, wanted in zip(outputs, expected, strict=True):
            assert (output is None) == (wanted is None)
            if wanted is not None:
                torch.testing.assert_close(output, wanted, atol=ATOL, rtol=0)


def test_an_sdxl_controlnet_steers_and_an_sd_one_is_refused(
    make_sdxl: Callable[..., DiffusionTransform],
    tiny_model: ModelFolders,
    tmp_path: Path,
) -> None:
    from diffusers import UNet2DConditionModel

    transform = make_sdxl()
    unet = transform._unet_batch().bundle.uncompiled_unet
    sdxl_controlnet = write_controlnet(tmp_path / "sdxl-cn", unet, seed=1)
    sd_unet = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")
    sd_controlnet = write_controlnet(tmp_path / "sd-cn", sd_unet, seed=1)
    frames = camera_frames(3)
    plain = Stream(transform, seed=3)
    steered = Stream(transform, seed=3, controlnets=[spec(sdxl_controlnet)])
    transform.validate_params(steered.params)
    ready(transform, sdxl_controlnet)
    outputs = [(plain.feed(frame), steered.feed(frame)) for frame in frames]
    assert not torch.allclose(outputs[-1][0], outputs[-1][1], atol=1e-4)
    wrong = Stream(transform, seed=3).params.model_copy(
        update={
            "controlnets": [
                Stream(transform, controlnets=[spec(sd_controlnet)]).params.controlnets[0]
            ]
        }
    )
    with pytest.raises(ValidationError) as refused:
        transform.validate_params(wrong)
    error = refused.value.errors()[0]
    assert error["loc"] == ("controlnets", 0, "model_id")
    assert "another model family" in error["msg"]


def test_compiled_buckets_carry_the_added_conditioning_without_recompiling(
    make_sdxl: Callable[..., DiffusionTransform],
) -> None:
    from tests.transforms.diffusion.test_shapes import COMPILED, compiled_graphs

    torch._dynamo.reset()
    try:
        # the frame graph with SDXL's added conditioning, compiled at the one bucket served
        transform = make_sdxl(**{**COMPILED, "frame_graph": True, "batch_buckets": [2]})
        after_load = compiled_graphs()
        eager = make_sdxl()
        frames = camera_frames(3, seed=2)
        compiled_streams = [Stream(transform, seed=5), Stream(transform, seed=6, prompt="fog")]
        eager_streams = [Stream(eager, seed=5), Stream(eager, seed=6, prompt="fog")]
        for frame in frames:
            outputs = transform.process([stream.job(frame) for stream in compiled_streams])
            expected = eager.process([stream.job(frame) for stream in eager_streams])
            for output, wanted in zip(outputs, expected, strict=True):
                torch.testing.assert_close(output, wanted, atol=ATOL, rtol=0)
        assert compiled_graphs() == after_load, "an SDXL batch recompiled"
        assert transform._unet_batch().paths == {"frame": len(frames)}
    finally:
        torch._dynamo.reset()


def test_the_family_comes_from_the_configs(
    tiny_sdxl: ModelFolders, tiny_model: ModelFolders, tmp_path: Path
) -> None:
    assert is_sdxl(tiny_sdxl.model) and not is_sdxl(tiny_model.model)
    assert family_vae(DEFAULT_VAE, tiny_sdxl.model) == DEFAULT_SDXL_VAE
    assert family_vae(DEFAULT_VAE, tiny_model.model) == DEFAULT_VAE
    assert family_vae("./my-vae", tiny_sdxl.model) == "./my-vae"  # a named VAE is kept
    renamed = tmp_path / "sd-turbo-not-really"  # a misleading name changes nothing
    shutil.copytree(tiny_sdxl.model, renamed)
    assert is_sdxl(renamed)


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_refiners_and_other_added_conditioning_are_refused_with_a_reason(
    tiny_sdxl: ModelFolders, tmp_path: Path
) -> None:
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl.model, refiner)
    edit_json(refiner / "model_index.json", requires_aesthetics_score=True)
    with pytest.raises(UnsupportedModelError, match="refiner"):
        DiffusionTransform(tiny_settings(ModelFolders(refiner, tiny_sdxl.taesd))).load()
    other = tmp_path / "other"
    shutil.copytree(tiny_sdxl.model, other)
    edit_json(other / "unet" / "config.json", addition_embed_type="image")
    with pytest.raises(UnsupportedModelError, match="added conditioning 'image'"):
        DiffusionTransform(tiny_settings(ModelFolders(other, tiny_sdxl.taesd))).load()


def test_an_sdxl_folder_without_its_second_tokenizer_says_how_to_fetch_it(
    tiny_sdxl: ModelFolders, tmp_path: Path
) -> None:
    from livediff.transforms.diffusion.models import ModelUnavailableError, locate

    broken = tmp_path / "no-tokenizer-2"
    shutil.copytree(tiny_sdxl.model, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelUnavailableError, match=r"tokenizer_2.*prepare-models"):
        locate(ModelChoice(str(broken), str(tiny_sdxl.taesd)))
