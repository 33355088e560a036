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
from livediff.transforms.diffusion.preprocess import Preprocessors, grey, hysteresis, ridges
from tests.transforms.diffusion.conftest import write_depth_model

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


def noisy_scene(seed: int) -> np.ndarray:
    """The scene with a soft ring (long chains of weak edges), softened and with camera noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    image = scene().astype(np.float64)
    distance = np.hypot(rows - 40, cols - 55)
    image += (40 * np.clip(distance - 25, 0, 1) * (distance < 32))[..., None]
    image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, 1, (0, 1))) / 4
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Shares of the reference's edge pixels within a pixel of ours, and of ours of its."""
    recall = (reference & within_a_pixel(ours)).sum() / reference.sum()
    precision = (ours & within_a_pixel(reference)).sum() / ours.sum()
    return float(recall), float(precision)


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
@pytest.mark.parametrize("thresholds", [(50, 150), (100, 200), (20, 120)])
def test_canny_on_the_device_matches_opencv(
    preprocessors: Preprocessors, seed: int | None, thresholds: tuple[int, int]
) -> None:
    """Against cv2.Canny with the L2 gradient magnitude (kornia's; OpenCV's default L1 one is
    larger, so it keeps more edges at the same thresholds), both fed the same grey frame."""
    cv2 = pytest.importorskip("cv2")
    grey = cv2.cvtColor(scene() if seed is None else noisy_scene(seed), cv2.COLOR_RGB2GRAY)
    frame = as_tensor(np.repeat(grey[..., None], 3, axis=-1))
    low, high = thresholds
    ours = preprocessors("canny", frame, {"low_threshold": low, "high_threshold": high})
    assert ours.shape == (1, 3, SIZE, SIZE) and set(ours.unique().tolist()) <= {0.0, 1.0}
    edges = ours[0, 0].numpy() > 0.5
    reference = cv2.Canny(grey, low, high, L2gradient=True) > 0
    recall, precision = agreement(edges, reference)
    # stated tolerance: 99 % of either's edge pixels within a pixel of the other's, and at
    # most 1 % of the reference's edge pixels differing at all (measured: 100 %, 0 to 1 pixel)
    assert recall >= 0.99 and precision >= 0.99, (recall, precision)
    assert (edges != reference).sum() <= 0.01 * reference.sum()


def test_canny_of_a_colour_frame_matches_opencv_within_a_pixel(
    preprocessors: Preprocessors,
) -> None:
    """Colour frames: our grey (kornia's) is not rounded to 8 bits as OpenCV's is."""
    cv2 = pytest.importorskip("cv2")
    image = scene()
    ours = preprocessors("canny", as_tensor(image), {"low_threshold": 50, "high_threshold": 150})
    reference = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150, L2gradient=True)
    recall, precision = agreement(ours[0, 0].numpy() > 0.5, reference > 0)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hysteresis_equals_kornias_own_loop(seed: int) -> None:
    kornia = pytest.importorskip("kornia")  # a test reference only: serving does not need it

    cv2 = pytest.importorskip("cv2")
    grey = cv2.cvtColor(noisy_scene(seed), cv2.COLOR_RGB2GRAY)
    frame = torch.from_numpy(grey)[None, None].float() / 255
    options = {"low_threshold": 20 / 255, "high_threshold": 120 / 255, "kernel_size": 1}
    _, looped = kornia.filters.canny(frame, **options)
    _, classes = kornia.filters.canny(frame, hysteresis=False, **options)
    assert bool((classes == 0.5).any()) and bool((classes == 1).any())
    assert torch.equal(hysteresis(classes), looped)


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
@pytest.mark.parametrize("thresholds", [(20, 120), (100, 200)])
def test_ridges_equal_kornias_exactly(seed: int | None, thresholds: tuple[int, int]) -> None:
    """Ours (constants cached on the device) against kornia's Canny before hysteresis, which
    builds its Sobel kernel from a host list on every call (a host wait per batch on a GPU)."""
    kornia = pytest.importorskip("kornia")  # a test reference only: serving does not need it

    image = scene() if seed is None else noisy_scene(seed)
    frames = torch.cat([as_tensor(image), as_tensor(image[::-1].copy())])
    low, high = (value / 255 for value in thresholds)
    _, theirs = kornia.filters.canny(
        frames, low_threshold=low, high_threshold=high, kernel_size=1, hysteresis=False
    )
    ours = ridges(grey(frames), low, high)
    assert bool((ours == 1).any())
    assert seed is None or bool((ours == 0.5).any())  # the noisy scenes have weak ridges too
    assert torch.equal(ours, theirs)


def serpentine(height: int, width: int) -> torch.Tensor:
    """One weak chain snaking over every other row: a path of about height * width / 2 pixels."""
    weak = torch.zeros(height, width)
    weak[::2] = 0.5
    weak[1::4, -1] = 0.5
    weak[3::4, 0] = 0.5
    return weak[None, None]


def test_hysteresis_follows_a_long_chain_from_its_one_strong_end() -> None:
    chain = serpentine(128, 128)
    kept = hysteresis(chain)
    assert float(kept.sum()) == 0  # weak pixels alone are never kept
    chain[0, 0, -2, 0] = 1.0  # the far end of a path of 8 255 pixels
    beside = torch.zeros(1, 1, 128, 8)
    beside[0, 0, 10:20, 3] = 0.5  # a weak line touching nothing strong
    kept = hysteresis(torch.cat([chain, beside], dim=-1))
    assert torch.equal(kept[..., :128], (chain > 0).float())
    assert float(kept[..., 128:].sum()) == 0


def test_hysteresis_has_no_data_dependent_loop() -> None:
    """It traces whole (fullgraph): no host reads of device values, so no syncs."""
    classes = torch.randint(0, 3, (2, 1, 32, 40)).float() / 2
    traced = torch.compile(hysteresis, backend="eager", fullgraph=True)
    assert torch.equal(traced(classes), hysteresis(classes))


def test_a_zero_low_threshold_is_accepted(preprocessors: Preprocessors) -> None:
    frame = as_tensor(scene())
    edges = preprocessors("canny", frame, {"low_threshold": 0, "high_threshold": 0})
    some = preprocessors("canny", frame, {"low_threshold": 50, "high_threshold": 150})
    assert float(edges.sum()) >= float(some.sum()) > 0


def test_higher_thresholds_keep_fewer_edges(preprocessors: Preprocessors) -> None:
    frame = as_tensor(noisy_scene(0))  # soft edges: the plain scene's steps pass any threshold
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
