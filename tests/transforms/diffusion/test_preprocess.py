"""Control images on the device: canny against OpenCV, depth through a tiny random Depth
Anything built from a config, passthrough, batching, and the missing-model errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from livediff.config import Settings
from livediff.transforms.diffusion.models import (
    ModelUnavailableError,
    locate_controlnet,
    locate_depth_model,
)
from livediff.transforms.diffusion.preprocess import Preprocessors

SIZE = 96


def scene() -> np.ndarray:
    """Shapes with clear edges on a soft gradient, as RGB uint8."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([cols * 0.6, rows * 0.6, np.full_like(cols, 40.0)], -1)
    image[20:60, 15:50] = (230, 40, 40)
    image[(rows - 65) ** 2 + (cols - 65) ** 2 < 18**2] = (30, 200, 90)
    return image.astype(np.uint8)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def within_a_pixel(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in every direction (a 3x3 dilation)."""
    grown = F.max_pool2d(torch.from_numpy(mask).float()[None, None], 3, stride=1, padding=1)
    return np.asarray(grown[0, 0].numpy() > 0)


@pytest.fixture
def preprocessors(tmp_path: Path) -> Preprocessors:
    return Preprocessors(torch.device("cpu"), torch.float32, Settings(model_dir=str(tmp_path)))


def test_canny_on_the_device_matches_opencv_within_a_pixel(preprocessors: Preprocessors) -> None:
    cv2 = pytest.importorskip("cv2")
    image = scene()
    ours = preprocessors("canny", as_tensor(image), {"low_threshold": 50, "high_threshold": 150})
    assert ours.shape == (1, 3, SIZE, SIZE) and 0 <= float(ours.min()) <= float(ours.max()) <= 1
    edges = ours[0, 0].numpy() > 0.5
    reference = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150) > 0
    near_ours, near_reference = within_a_pixel(edges), within_a_pixel(reference)
    recall = (reference & near_ours).sum() / reference.sum()
    precision = (edges & near_reference).sum() / edges.sum()
    # stated tolerance: 80 % of either's edge pixels lie within one pixel of the other's
    assert recall >= 0.8 and precision >= 0.8, (recall, precision)


def test_higher_thresholds_keep_fewer_edges(preprocessors: Preprocessors) -> None:
    frame = as_tensor(scene())
    many = preprocessors("canny", frame, {"low_threshold": 20, "high_threshold": 60})
    few = preprocessors("canny", frame, {"low_threshold": 150, "high_threshold": 250})
    assert float(few.sum()) < float(many.sum())


def test_passthrough_and_batches(preprocessors: Preprocessors) -> None:
    frames = torch.rand(3, 3, SIZE, SIZE)
    assert torch.equal(preprocessors("passthrough", frames, {}), frames)
    params = {"low_threshold": 100, "high_threshold": 200}
    batched = preprocessors("canny", frames, params)
    alone = torch.cat([preprocessors("canny", frame[None], params) for frame in frames])
    assert torch.allclose(batched, alone)
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocessors("sobel", frames, {})


def write_depth_model(folder: Path) -> Path:
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


def test_depth_runs_through_depth_anything(tmp_path: Path) -> None:
    folder = write_depth_model(tmp_path / "depth")
    settings = Settings(depth_model=str(folder), model_dir=str(tmp_path))
    preprocessors = Preprocessors(torch.device("cpu"), torch.float32, settings)
    frames = torch.stack([as_tensor(scene())[0], torch.rand(3, SIZE, SIZE)])
    depth = preprocessors("depth", frames, {"detect_resolution": 140})
    assert depth.shape == (2, 3, SIZE, SIZE) and depth.device.type == "cpu"
    assert float(depth.min()) >= 0 and float(depth.max()) <= 1
    assert torch.equal(depth[:, 0], depth[:, 2])  # grey: one map in three channels
    for image in depth:  # each map spans its own [0, 1]
        assert float(image.min()) == pytest.approx(0, abs=1e-3)
        assert float(image.max()) == pytest.approx(1, abs=1e-3)
    preprocessors.close()


def test_missing_models_offline_name_the_fetch_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="prepare-models --controlnet owner/cn"):
        locate_controlnet("owner/cn", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="prepare-models --depth-model owner/depth"):
        locate_depth_model("owner/depth", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="neither a folder nor a hub id"):
        locate_controlnet("./nowhere", str(tmp_path))
