"""Fixtures: a tiny random-weight SD model saved in diffusers layout, and transforms loading it.

The model is written once per test run (a few hundred thousand parameters, about 1.5 MB) and
loaded through the same path a user's ``--model`` folder takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from livediff.config import Settings
from livediff.frames import Frame
from livediff.testing.models import ModelFolders, tiny_options, write_model_folder
from livediff.transforms.base import Job
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform

SIZE = 64


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    """A tiny random model of the SDXL family (two text encoders, added conditioning)."""
    return write_model_folder(tmp_path_factory.mktemp("tiny-sdxl"), "tiny-sdxl", seed=0)


def tiny_settings(folders: ModelFolders, **overrides: Any) -> Settings:
    return Settings(**{**tiny_options(folders, SIZE), **overrides})


def transforms_of(folders: ModelFolders) -> Iterator[Callable[..., DiffusionTransform]]:
    """Factory of loaded DiffusionTransforms on the model in ``folders`` (settings
    overridable); closes them when the test ends."""
    made: list[DiffusionTransform] = []

    def _make(**overrides: Any) -> DiffusionTransform:
        transform = DiffusionTransform(tiny_settings(folders, **overrides))
        transform.load()
        made.append(transform)
        return transform

    yield _make
    for transform in made:
        transform.close()


@pytest.fixture
def make_transform(tiny_model: ModelFolders) -> Iterator[Callable[..., DiffusionTransform]]:
    """Factory: a loaded DiffusionTransform on the tiny model (settings overridable)."""
    yield from transforms_of(tiny_model)


@pytest.fixture
def make_sdxl(tiny_sdxl: ModelFolders) -> Iterator[Callable[..., DiffusionTransform]]:
    """Factory: a loaded DiffusionTransform on the tiny SDXL model."""
    yield from transforms_of(tiny_sdxl)


def camera_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct RGB frames (smooth gradients plus noise), SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    frames = []
    for _ in range(count):
        base = ramp[None, :, None] * rng.uniform(0.2, 1.0, 3) + rng.uniform(-40, 40, 3)
        noisy = base + rng.normal(0, 25, (SIZE, SIZE, 3))
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return frames


class Stream:
    """One session of a transform: open it, feed frames, read outputs."""

    def __init__(self, transform: DiffusionTransform, **params: Any) -> None:
        self.transform = transform
        self.params = params_for(transform, **params)
        self.state = transform.open_session(self.params)
        self.count = 0
        self.skips = 0  # frames the transform marked as skipped (repeated an output)

    def job(self, image: Any) -> Job:
        job = Job("s", Frame(image, pts=self.count), self.params, self.state)
        self.count += 1
        return job

    def feed(self, image: Any) -> Any:
        job = self.job(image)
        output = self.transform.process([job])[0]
        self.skips += job.skipped
        return output

    def update(self, **patch: Any) -> None:
        self.params = DiffusionParams.model_validate({**self.params.model_dump(), **patch})


def params_for(transform: DiffusionTransform, **values: Any) -> DiffusionParams:
    defaults = {**transform.default_params(transform.settings), **transform.loaded_params()}
    return DiffusionParams.model_validate({**defaults, **values})


def write_controlnet(folder: Path, unet: Any, seed: int) -> str:
    """A random ControlNet for ``unet`` saved in diffusers layout; returns its folder.

    Built from the UNet (``ControlNetModel.from_unet``) with its zero convolutions randomised,
    so that it does change the output."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    for name, parameter in controlnet.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            torch.nn.init.normal_(parameter, std=0.3)
    controlnet.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFolders) -> list[str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model.model / "unet")
    root = tmp_path_factory.mktemp("controlnets")
    return [write_controlnet(root / f"cn{seed}", unet, seed) for seed in (1, 2)]


def ready(transform: DiffusionTransform, *model_ids: str) -> None:
    """Wait until the pool has loaded the ControlNets (they load in the background)."""
    pool = transform._unet_batch().controlnets
    assert pool is not None
    deadline = time.monotonic() + 60
    while any(pool.get(model_id) is None for model_id in model_ids):
        assert time.monotonic() < deadline, "the ControlNets never loaded"
        time.sleep(0.02)


def spec(model_id: str, **values: Any) -> dict[str, Any]:
    """A ``controlnets`` entry (passthrough preprocessor unless ``values`` say otherwise)."""
    return {"model_id": model_id, "preprocessor": "passthrough", **values}


def write_depth_model(folder: Path) -> Path:
    """A tiny random Depth Anything (DINOv2 backbone) saved in transformers' layout."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=140,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 32],
        reassemble_factors=[2, 1],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random ViT image classifier (labels nsfw, normal) in transformers' layout; its
    head ignores the image: the nsfw logit is 4, the normal one 0 (score about 0.98)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "nsfw", 1: "normal"},
        label2id={"nsfw": 0, "normal": 1},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([4.0, 0.0]))
    folder = tmp_path_factory.mktemp("nsfw-classifier")
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches and counters empty before and after the test (compile tests count)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
