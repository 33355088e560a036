"""The safety filter: Livepeer's ``use_safety_checker`` / ``safety_checker_threshold`` on the
tiny model, with a tiny random ViT classifier whose head is set so that it flags every frame
(the threshold then decides)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import httpx
import pytest
import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.pixels.device import constants
from livediff.testing.models import ModelFolders, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.safety import CLIP_MEAN, CLIP_STD, classifier_input, nsfw_scores
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.server.streaming import publish, sample_offer
from tests.transforms.diffusion.conftest import SIZE, Stream, camera_frames
from tests.transforms.diffusion.test_controlnet import tensors_from_host

#: The tiny classifier scores every frame 1 - P(normal) = 0.98: flagged at 0.5, not at 1.
FLAGS = {"use_safety_checker": True, "safety_checker_threshold": 0.5}
PASSES = {"use_safety_checker": True, "safety_checker_threshold": 1.0}


@pytest.fixture
def filtering(
    make_transform: Callable[..., DiffusionTransform], classifier: str
) -> DiffusionTransform:
    return make_transform(safety_model=classifier)


def test_a_flagged_frame_is_replaced_by_the_last_safe_output(
    filtering: DiffusionTransform,
) -> None:
    frames = camera_frames(3)
    plain = Stream(filtering, seed=3)
    safe = Stream(filtering, seed=3, **PASSES)
    expected = [plain.feed(frame) for frame in frames]
    assert not torch.equal(expected[1], expected[0])
    assert torch.equal(safe.feed(frames[0]), expected[0])  # below the threshold: as made
    safe.update(**FLAGS)  # live: the next frame's score reaches the threshold
    job = safe.job(frames[1])
    replaced = filtering.process([job])[0]
    assert job.filtered
    assert torch.equal(replaced, expected[0])  # exactly the last safe output, again


def test_a_flagged_first_frame_is_black(filtering: DiffusionTransform) -> None:
    stream = Stream(filtering, seed=3, **FLAGS)
    job = stream.job(camera_frames(1)[0])
    output = filtering.process([job])[0]
    assert job.filtered and output is not None
    assert torch.equal(output, torch.zeros_like(output))


def test_below_the_threshold_the_output_is_unchanged(filtering: DiffusionTransform) -> None:
    plain = Stream(filtering, seed=3, t_index_list=[20, 35])
    safe = Stream(filtering, seed=3, t_index_list=[20, 35], **PASSES)
    for frame in camera_frames(4):
        expected = plain.feed(frame)
        job = safe.job(frame)
        output = filtering.process([job])[0]
        assert not job.filtered
        assert (output is None) == (expected is None)
        if expected is not None:
            assert torch.equal(output, expected)


def test_off_by_default_for_serve_and_on_with_the_orchestrators_setting(
    make_transform: Callable[..., DiffusionTransform], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LIVEDIFF_SAFETY_CHECKER", raising=False)
    assert DiffusionTransform.default_params(Settings())["use_safety_checker"] is False
    monkeypatch.setenv("LIVEDIFF_SAFETY_CHECKER", "1")  # what the orchestrator image sets
    assert DiffusionTransform.default_params(Settings())["use_safety_checker"] is True
    monkeypatch.delenv("LIVEDIFF_SAFETY_CHECKER")
    # off: the classifier is never even looked for (this one does not exist)
    transform = make_transform(safety_model="./no/such/classifier")
    default = Stream(transform, seed=3)
    assert default.params.use_safety_checker is False
    assert default.params.safety_checker_threshold == 0.5
    explicit = Stream(transform, seed=3, use_safety_checker=False)
    for frame in camera_frames(3):
        assert torch.equal(default.feed(frame), explicit.feed(frame))
    assert transform._unet_batch().safety._classifier is None
    on = make_transform(safety_model="./no/such/classifier", safety_checker=True)
    asking = Stream(on).params
    assert asking.use_safety_checker is True
    # a classifier that cannot be had is refused when the params arrive, naming the field
    with pytest.raises(ValidationError) as refused:
        on.validate_params(asking)
    error = refused.value.errors()[0]
    assert error["loc"] == ("use_safety_checker",)
    assert "no/such/classifier" in error["msg"]


def test_two_sessions_batched_one_filtering_one_not(filtering: DiffusionTransform) -> None:
    frames = camera_frames(3)
    first, second = Stream(filtering, seed=3, **PASSES), Stream(filtering, seed=5)
    twin_first, twin_second = Stream(filtering, seed=3), Stream(filtering, seed=5)
    safe = filtering.process([first.job(frames[0]), second.job(frames[0])])[0]
    filtering.process([twin_first.job(frames[0]), twin_second.job(frames[0])])
    first.update(**FLAGS)
    jobs = [first.job(frames[1]), second.job(frames[1])]
    outputs = filtering.process(jobs)  # one UNet batch, one classifier call (one row)
    expected = filtering.process([twin_first.job(frames[1]), twin_second.job(frames[1])])
    assert [job.filtered for job in jobs] == [True, False]
    assert torch.equal(outputs[0], safe) and not torch.equal(expected[0], safe)
    assert torch.equal(outputs[1], expected[1])  # the other session's frame, untouched


def test_a_steady_filtering_batch_makes_no_constants(
    filtering: DiffusionTransform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classifier's mean and std are device constants; each threshold a kernel scalar."""
    streams = [Stream(filtering, **PASSES), Stream(filtering, **FLAGS)]
    frames = camera_frames(4)
    for frame in frames[:2]:
        filtering.process([stream.job(frame) for stream in streams])
    misses = constants.misses
    with tensors_from_host(monkeypatch) as made:
        for frame in frames[2:]:
            filtering.process([stream.job(frame) for stream in streams])
    assert made == []
    assert constants.misses == misses


def test_livepeers_classifier_is_read_from_its_timm_config() -> None:
    """Freepik/nsfw_image_detector: 448 px, CLIP's mean and std, levels neutral..high; the
    score is Livepeer's P(low) + P(medium) + P(high)."""
    config = SimpleNamespace(
        pretrained_cfg={"input_size": [3, 448, 448], "mean": CLIP_MEAN, "std": CLIP_STD},
        id2label={0: "neutral", 1: "low", 2: "medium", 3: "high"},
    )
    spec = classifier_input(config)
    assert (spec.size, spec.mean, spec.std, spec.safe_index) == ((448, 448), CLIP_MEAN, CLIP_STD, 0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.3]])
    probabilities = torch.softmax(logits, dim=-1)[0]
    assert nsfw_scores(logits, spec.safe_index).item() == pytest.approx(
        float(probabilities[1:].sum())
    )


@pytest.mark.parametrize(
    ("values", "location"),
    [
        ({"safety_checker_threshold": 1.5}, "safety_checker_threshold"),
        ({"use_safety_checker": "maybe"}, "use_safety_checker"),
    ],
)
def test_bad_safety_params_are_refused_naming_the_field(
    values: dict[str, object], location: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        DiffusionParams.model_validate(values)
    assert [error["loc"] for error in refused.value.errors()] == [(location,)]


async def test_served_the_filter_counts_its_frames_and_refuses_a_bad_threshold(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders, classifier: str
) -> None:
    server = serve(**tiny_options(tiny_model, SIZE), safety_model=classifier)
    registry = server.service.engine.metrics.registry
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        refused = await http.post(
            "/v1/sessions",
            json={"sdp": await sample_offer(), "params": {"safety_checker_threshold": 1.5}},
        )
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "params", "safety_checker_threshold"]
        assert registry.get_sample_value("livediff_frames_filtered_total") == 0
        async with publish(server.url, size=SIZE, params=FLAGS) as client:
            await client.video.wait_for(4, timeout=60)
    assert registry.get_sample_value("livediff_frames_filtered_total") >= 4
