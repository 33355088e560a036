"""The fast path computes what diffusers computes: one-step img2img against diffusers' own
``AutoPipelineForImage2Image`` on the same components, scheduler, timestep and noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from livediff.testing.reference import diffusers_img2img as reference_img2img
from livediff.transforms.diffusion.params import TIMESTEP_GRID, grid_timestep, strength_timestep
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames


def diffusers_img2img(transform: DiffusionTransform) -> Any:
    return reference_img2img(transform._unet_batch().bundle)


@pytest.mark.parametrize(
    ("cfg_type", "guidance_scale"),
    [("none", 1.0), ("full", 3.0)],
    ids=["no-guidance", "full-cfg"],
)
def test_one_step_img2img_equals_diffusers(
    make_transform: Callable[..., DiffusionTransform], cfg_type: str, guidance_scale: float
) -> None:
    transform = make_transform()
    image = camera_frames(1)[0]
    stream = Stream(
        transform,
        prompt="a red fox in the snow",
        negative_prompt="blurry",
        seed=7,
        strength=0.5,
        cfg_type=cfg_type,
        guidance_scale=guidance_scale,
    )
    ours = stream.feed(image)

    pipe = diffusers_img2img(transform)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    reference = pipe(
        prompt="a red fox in the snow",
        negative_prompt="blurry",
        image=torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
        num_inference_steps=2,  # trailing [999, 499]; strength 0.5 keeps the step at t=499
        strength=0.5,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images.permute(0, 2, 3, 1)

    assert ours.shape == reference.shape == (1, 64, 64, 3)
    assert reference.std() > 0.1  # a real picture, not a clamped blank
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def test_step_timesteps_are_diffusers_timesteps(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    scheduler = diffusers_img2img(make_transform()).scheduler
    for steps, strength in [(2, 0.5), (4, 0.75), (4, 0.25), (1, 1.0), (10, 0.3)]:
        scheduler.set_timesteps(steps)
        first = int(scheduler.timesteps[steps - int(steps * strength)])
        assert strength_timestep(strength) == first, (steps, strength)
    scheduler.set_timesteps(TIMESTEP_GRID)
    grid = [int(t) for t in scheduler.timesteps]
    assert [grid_timestep(index) for index in range(TIMESTEP_GRID)] == grid
