"""LivediffPipeline on the diffusion transform with a tiny random-weight model (CPU, 64 x 64).

ai-runner's own params class keeps streams at 384 x 384 or more, which costs seconds per frame
for a CPU; these tests call the pipeline's ai-runner methods directly at 64 x 64 instead (the
process loop around them is covered with the passthrough and gain transforms).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from runner.live.pipelines.loader import parse_pipeline_params
from runner.live.trickle import VideoOutput

from livediff.config import Settings
from livediff.livepeer.airunner.main import build_spec, spec_or_exit
from livediff.livepeer.airunner.params import LivediffParams
from livediff.livepeer.airunner.pipeline import LivediffPipeline
from livediff.testing.lora import write_lora
from livediff.testing.models import TINY_UNET, ModelFolders, write_model_folder
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.state import SessionCache
from tests.livepeer.airunner.conftest import TIME_BASE, video_frame

SIZE = 64
PARAMS = {"width": SIZE, "height": SIZE, "prompt": "a red fox in the snow", "seed": 7}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelFolders, ModelFolders]:
    """Two tiny models with different random weights (the second one for a model change)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return write_model_folder(root / "a", seed=0), write_model_folder(root / "b", seed=1)


@pytest.fixture
async def pipeline(
    models: tuple[ModelFolders, ModelFolders],
) -> AsyncIterator[LivediffPipeline]:
    first, second = models
    settings = Settings(
        pipeline="diffusion",
        model=str(first.model),
        vae=str(first.taesd),
        device="cpu",
        width=SIZE,
        height=SIZE,
        # streams may switch to the second model, and one test names a model that cannot load
        allow_models=[str(second.model), str(second.taesd), "/nowhere/no-model"],
    )
    built = LivediffPipeline(settings)
    await built.initialize(**PARAMS)
    yield built
    await built.stop()


def camera(seed: int = 0) -> torch.Tensor:
    return torch.rand((1, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(seed))


async def roundtrip(pipeline: LivediffPipeline, image: torch.Tensor, index: int) -> VideoOutput:
    await pipeline.put_video_frame(video_frame(image, index), "stream-1")
    return await asyncio.wait_for(pipeline.get_processed_video_frame(), 60)


async def test_frames_keep_timestamps_shape_and_unit_range(pipeline: LivediffPipeline) -> None:
    for index in range(3):
        image = camera(index)
        out = await roundtrip(pipeline, image, index)
        assert (out.timestamp, out.time_base) == (index * 3000, TIME_BASE)
        assert out.request_id == "stream-1"
        assert out.tensor.shape == (1, SIZE, SIZE, 3) and out.tensor.dtype == torch.float32
        assert out.tensor.device == image.device
        assert float(out.tensor.min()) >= 0.0 and float(out.tensor.max()) <= 1.0
        assert not torch.allclose(out.tensor, image, atol=0.05)  # the model did restyle it


def model_loads(pipeline: LivediffPipeline) -> float:
    """Model loads the engine counted (its livediff_model_loads_total metric)."""
    registry = pipeline.streams.engine.metrics.registry
    return float(registry.get_sample_value("livediff_model_loads_total") or 0.0)


async def test_a_prompt_update_applies_in_place(pipeline: LivediffPipeline) -> None:
    transform = pipeline.streams.engine.transform
    unet_batch, loads = transform.unet_batch, model_loads(pipeline)
    image = camera(3)
    before = await roundtrip(pipeline, image, 1)
    again = await roundtrip(pipeline, image, 2)
    assert torch.equal(before.tensor, again.tensor)  # same frame, same params: same output

    assert await pipeline.update_params(**{**PARAMS, "prompt": "a blue whale"}) is None
    after = await roundtrip(pipeline, image, 3)
    assert not torch.equal(after.tensor, again.tensor)
    assert transform.unet_batch is unet_batch and model_loads(pipeline) == loads  # no reload


#: Livepeer's StreamDiffusion temporal params as a Livepeer client sends them (full param sets).
TEMPORAL = {
    "cached_attention": {"enabled": True, "max_frames": 2, "interval": 1},
    "image_postprocessing": {
        "enabled": True,
        "processors": [{"type": "feedback", "enabled": True, "params": {"feedback_strength": 0.3}}],
    },
    "latent_preprocessing": {
        "processors": [{"type": "latent_feedback", "params": {"feedback_strength": 0.2}}]
    },
    "image_preprocessing": None,
    "do_add_noise": True,
}


async def test_temporal_tools_in_livepeers_shape_apply_in_place(
    pipeline: LivediffPipeline,
) -> None:
    transform = pipeline.streams.engine.transform
    unet_batch, loads = transform.unet_batch, model_loads(pipeline)
    image = camera(8)
    plain = await roundtrip(pipeline, image, 1)
    assert await pipeline.update_params(**{**PARAMS, **TEMPORAL}) is None
    outputs = [await roundtrip(pipeline, image, index) for index in range(2, 5)]
    assert not torch.equal(outputs[-1].tensor, plain.tensor)
    stream = pipeline.streams.switch.current
    assert stream is not None
    state = stream.session.transform_state
    assert isinstance(state, SessionCache) and state.bank is not None and state.bank.frames == 2
    assert pipeline.stats()["pipeline_state"]["temporal"] == [
        "latent_preprocessing.latent_feedback",  # in the order a frame meets them
        "image_postprocessing.feedback",
        "cached_attention.max_frames=2",
    ]
    assert await pipeline.update_params(**PARAMS) is None  # a full set without them: all off
    await roundtrip(pipeline, image, 5)
    assert state.bank is None
    assert transform.unet_batch is unet_batch and model_loads(pipeline) == loads  # no reload


async def test_loras_and_the_safety_filter_in_livepeers_shape_apply_in_place(
    models: tuple[ModelFolders, ModelFolders], tmp_path: Path
) -> None:
    """lora_dict (weights live, no reload Task) and use_safety_checker through ai-runner's
    params update, as a Livepeer client sends them."""
    first = models[0]
    lora = str(write_lora(tmp_path / "lora", TINY_UNET, seed=3))
    settings = Settings(
        pipeline="diffusion",
        model=str(first.model),
        vae=str(first.taesd),
        device="cpu",
        width=SIZE,
        height=SIZE,
        allow_models=[lora],
    )
    built = LivediffPipeline(settings)
    await built.initialize(**PARAMS)
    try:
        image = camera(9)
        plain = await roundtrip(built, image, 1)
        assert await built.update_params(**{**PARAMS, "lora_dict": {lora: 0.8}}) is None
        outputs = [await roundtrip(built, image, index) for index in range(2, 5)]
        assert not torch.equal(outputs[-1].tensor, plain.tensor)  # fused within a few frames
        refused = {**PARAMS, "safety_checker_threshold": 1.5, "use_safety_checker": True}
        with pytest.raises(ValidationError):
            await built.update_params(**refused)
        assert await built.update_params(**{**PARAMS, "lora_dict": None}) is None
        again = [await roundtrip(built, image, index) for index in range(5, 8)]
        assert torch.equal(again[-1].tensor, plain.tensor)  # unfused bit for bit
        assert model_loads(built) == 1
    finally:
        await built.stop()


async def test_a_model_change_returns_a_task_that_reloads(
    pipeline: LivediffPipeline, models: tuple[ModelFolders, ModelFolders]
) -> None:
    transform = pipeline.streams.engine.transform
    loads = model_loads(pipeline)
    image = camera(4)
    before = await roundtrip(pipeline, image, 1)

    task = await pipeline.update_params(**{**PARAMS, "model": str(models[1].model)})
    assert isinstance(task, asyncio.Task)
    await task
    assert model_loads(pipeline) == loads + 1
    assert transform.choice.model == str(models[1].model)
    after = await roundtrip(pipeline, image, 2)
    assert not torch.allclose(after.tensor, before.tensor, atol=0.01)


async def test_a_model_that_cannot_load_is_reported_and_the_stream_goes_on(
    pipeline: LivediffPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    image = camera(5)
    before = await roundtrip(pipeline, image, 1)
    missing = {**PARAMS, "model": "/nowhere/no-model"}
    task = await pipeline.update_params(**missing)
    assert isinstance(task, asyncio.Task)
    with caplog.at_level(logging.ERROR, logger="livediff.livepeer.airunner.streams"):
        await task  # completes: a failed Task would make ai-runner restart the process
    refused = [r for r in caplog.records if getattr(r, "report_error", False)]
    assert refused and "/nowhere/no-model" in refused[0].getMessage()
    assert pipeline.stats()["params"]["model"] != missing["model"]
    after = await roundtrip(pipeline, image, 2)
    assert torch.equal(after.tensor, before.tensor)


async def test_stop_releases_the_model(
    pipeline: LivediffPipeline, worker_threads: Callable[[], int]
) -> None:
    await roundtrip(pipeline, camera(6), 1)
    unet_batch = weakref.ref(pipeline.streams.engine.transform.unet_batch)
    threads = worker_threads()
    await pipeline.stop()
    gc.collect()
    assert unet_batch() is None, "the diffusion model (UNet, VAE, text encoder) is still held"
    assert worker_threads() == threads - 1


def test_the_runner_spec_for_diffusion_starts_from_serves_defaults(
    models: tuple[ModelFolders, ModelFolders], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = models
    monkeypatch.setenv("LIVEDIFF_PIPELINE", "diffusion")
    monkeypatch.setenv("LIVEDIFF_MODEL", str(first.model))
    monkeypatch.setenv("LIVEDIFF_VAE", str(first.taesd))
    monkeypatch.setenv("LIVEDIFF_DEVICE", "cpu")
    spec = build_spec()
    assert spec.params_cls == "livediff.livepeer.airunner.params:LivediffParams"
    initial = spec.initial_params
    assert (initial["model"], initial["vae"]) == (str(first.model), str(first.taesd))
    assert (initial["width"], initial["height"]) == (512, 512)
    parsed = parse_pipeline_params(spec, initial)
    assert isinstance(parsed, LivediffParams)
    assert parsed.prompt == DiffusionParams().prompt


def test_a_missing_model_stops_the_runner_saying_how_to_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEDIFF_PIPELINE", "diffusion")
    monkeypatch.setenv("LIVEDIFF_DEVICE", "cpu")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))  # empty, and serving is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exited:
        spec_or_exit()
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "'stabilityai/sd-turbo' is not downloaded" in message
    assert "PREPARE_MODELS=1" in message
