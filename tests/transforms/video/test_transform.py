"""``VideoTransform`` on a tiny random Wan 2.1 model written in diffusers' layout and loaded
through the path a user's ``--model <folder>`` takes: latency (a chunk's frames come out once the
chunk is complete, then one per input frame), sessions batched equal each alone, reset_cache and
a prompt change mid-stream, the cache written by the last step, the noise controller's mapping,
UMT5 on the CPU, params refused on the field, memory and model checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from livediff.config import Settings
from livediff.frames import Frame
from livediff.testing.video_models import (
    WAN21_T2V_1_3B_TRANSFORMER,
    WAN21_UMT5_TEXT_ENCODER,
    write_tiny_wan_folder,
)
from livediff.transforms import Job, resolve_transform
from livediff.transforms.video import models
from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.params import NoiseController, VideoParams
from livediff.transforms.video.session import VideoSession, controlled_noise
from livediff.transforms.video.text import PromptEncoder
from livediff.transforms.video.transform import VideoTransform

SIZE = 32


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-wan") / "model"
    write_tiny_wan_folder(folder, seed=0)
    return Path(folder)


@pytest.fixture(scope="module")
def transform(tiny_folder: Path) -> Iterator[VideoTransform]:
    settings = Settings(pipeline="video", model=str(tiny_folder), device="cpu", width=64, height=64)
    found = resolve_transform("video")(settings)
    assert isinstance(found, VideoTransform)
    found.load()
    yield found
    found.close()


def params_for(transform: VideoTransform, **values: Any) -> VideoParams:
    start = {**VideoTransform.default_params(transform.settings), **transform.loaded_params()}
    size = {"width": SIZE, "height": SIZE, "max_cache_frames": 4}
    return VideoParams.model_validate({**start, **size, **values})


def cached_keys(cache: KVCache) -> list[torch.Tensor]:
    """Every block's cached keys, oldest frame first."""
    return [cache.cached_keys(layer)[0] for layer in range(cache.num_layers)]


def frame(index: int) -> Frame:
    rng = np.random.default_rng(index)
    return Frame(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), pts=index)


def feed(
    transform: VideoTransform, sessions: list[tuple[VideoSession, VideoParams]], index: int
) -> list[Any]:
    jobs: list[Job[VideoParams, VideoSession, None]] = [
        Job(f"s{row}", frame(index + row), p, s) for row, (s, p) in enumerate(sessions)
    ]
    return transform.process(jobs)


def test_a_chunks_frames_come_out_once_it_is_complete_then_one_per_input(
    transform: VideoTransform,
) -> None:
    params = params_for(transform, chunk_frames=2, max_cache_frames=5)
    state = transform.open_session(params)
    shown = [feed(transform, [(state, params)], i)[0] is not None for i in range(21)]
    # the first chunk is 1 + 8 frames: nothing until its ninth frame, then one frame per input
    assert shown == [False] * 8 + [True] * 13
    assert state.stats.chunks == 2  # frames 0-8, then 9-16; 17-20 wait for the next chunk
    assert len(state.inputs) == 4 and len(state.outputs) == 4  # half a chunk in, half out
    report = VideoTransform.describe_session(params)["video"]
    assert report["chunks"] == 2 and report["first_frame_latency_ms"] > 0
    assert report["chunk_latency_ms"] > 0
    transform.close_session(state)
    assert VideoTransform.describe_session(params) == {"video": None}


def test_outputs_are_restyled_at_the_session_size(transform: VideoTransform) -> None:
    params = params_for(transform)
    state = transform.open_session(params)
    outs = [feed(transform, [(state, params)], i)[0] for i in range(5)]
    out = outs[-1]
    assert isinstance(out, np.ndarray)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    source = frame(0).image
    assert isinstance(source, np.ndarray)
    assert np.abs(out.astype(int) - source.astype(int)).mean() > 5  # not passed through
    transform.close_session(state)


def test_two_sessions_batched_equal_each_alone(transform: VideoTransform) -> None:
    first = params_for(transform, prompt="a red fox", seed=1)
    second = params_for(transform, prompt=[["blue sea", 2.0], ["storm", 1.0]], seed=7)
    batches: list[int] = []
    hook = transform._model().transformer.patch_embedding.register_forward_hook(
        lambda _m, args, _o: batches.append(args[0].shape[0])
    )
    try:
        pair = [(transform.open_session(p), p) for p in (first, second)]
        together = [feed(transform, pair, 10 * i) for i in range(9)]
    finally:
        hook.remove()
    assert set(batches) == {2}  # every transformer call served both sessions
    assert pair[0][0].cache.keys[0] is not pair[1][0].cache.keys[0]
    for row, p in enumerate((first, second)):
        alone = transform.open_session(p)
        outs = [feed(transform, [(alone, p)], 10 * i + row)[0] for i in range(9)]
        for step, out in enumerate(outs):
            if out is None:
                assert together[step][row] is None
                continue
            difference = np.abs(out.astype(int) - together[step][row].astype(int)).max()
            assert difference <= 1, f"session {row} frame {step}"
        batched_keys = cached_keys(pair[row][0].cache)[1]
        torch.testing.assert_close(cached_keys(alone.cache)[1], batched_keys, atol=1e-4, rtol=0)
    assert not torch.allclose(cached_keys(pair[0][0].cache)[1], cached_keys(pair[1][0].cache)[1])


def test_reset_cache_mid_stream_starts_a_new_stream_once(transform: VideoTransform) -> None:
    params = params_for(transform)
    state = transform.open_session(params)
    for i in range(9):
        feed(transform, [(state, params)], 100 + i)
    assert state.cache.next_frame == 3 and state.cache.chunks == [(0, 2), (2, 1)]
    reset = params.model_copy(update={"reset_cache": True})
    fresh = transform.open_session(params)
    for i in range(200, 205):  # a new first chunk: 1 + 4 frames
        restarted = feed(transform, [(state, reset)], i)[0]
        alone = feed(transform, [(fresh, params)], i)[0]
        if i == 200:
            assert state.cache.chunks == [] and state.vae.frames_encoded == 0
    assert state.cache.chunks == [(0, 2)] and state.stats.resets == 1
    assert np.array_equal(restarted, alone)  # the same stream as a new session's
    assert all(np.array_equal(a, b) for a, b in zip(state.outputs, fresh.outputs, strict=True))
    assert state.stats.resets == 1
    kept = VideoParams.model_validate({**reset.model_dump(), "prompt": "night"})
    assert kept.reset_cache is False  # the flag is not carried into the next update
    feed(transform, [(state, kept)], 201)
    assert state.stats.resets == 1


def test_a_prompt_change_recaches_the_kept_chunks(transform: VideoTransform) -> None:
    params = params_for(transform, prompt="sunny day")
    state = transform.open_session(params)
    for i in range(9):
        feed(transform, [(state, params)], 300 + i)
    before = state.cache
    chunks, keys = list(before.chunks), cached_keys(before)
    assert transform.prompts is not None
    encoded = transform.prompts.encoded
    changed = params.model_copy(update={"prompt": "snowy night"})
    feed(transform, [(state, changed)], 309)
    assert transform.prompts.encoded == encoded + 1 and state.stats.recaches == 1
    assert state.cache is not before and state.cache.chunks == chunks
    assert state.cache.next_frame == before.next_frame
    # block 0 attends before any cross-attention: its keys cannot depend on the text; block 1's do
    torch.testing.assert_close(cached_keys(state.cache)[0], keys[0])
    assert not torch.allclose(cached_keys(state.cache)[1], keys[1])
    feed(transform, [(state, params)], 310)  # back: the embedding is cached, not encoded again
    assert transform.prompts.encoded == encoded + 1 and state.stats.recaches == 2


@pytest.mark.parametrize(
    ("values", "loc"),
    [
        ({"denoising_step_list": [250, 750]}, ("denoising_step_list",)),
        ({"denoising_step_list": [900, 700, 500, 300, 100]}, ("denoising_step_list",)),
        ({"denoising_step_list": [1001]}, ("denoising_step_list", 0)),
        ({"width": 40}, ("width",)),
        ({"height": 2048}, ("height",)),
        ({"chunk_frames": 4}, ("chunk_frames",)),
        ({"chunk_frames": 3, "max_cache_frames": 6}, ("max_cache_frames",)),
        ({"noise_scale": 0}, ("noise_scale",)),
        ({"prompt": [["a", 0.0]]}, ("prompt",)),
        (
            {"noise_scale": 0.1, "noise_controller": {"enabled": True, "max_drop": 0.1}},
            ("noise_controller",),
        ),
        ({"noise_controller": {"max_drop": 1.0}}, ("noise_controller", "max_drop")),
        ({"cache_write": "first_step"}, ("cache_write",)),
        ({"seed": -1}, ("seed",)),
        ({"steps": 2}, ("steps",)),
    ],
)
def test_bad_params_name_the_field(values: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        VideoParams.model_validate(values)
    assert caught.value.errors()[0]["loc"] == loc


@pytest.mark.parametrize(
    ("moved", "previous", "expected"),
    [
        # StreamDiffusionV2's compute_noise_scale_and_step at its defaults (noise_scale 0.7):
        # (0.7 - 0.1 * min(1, moved / 0.2)) * 0.9 + previous * 0.1, previous 0.7 at the start
        (0.0, None, 0.7),
        (0.05, None, (0.7 - 0.025) * 0.9 + 0.07),
        (0.1, None, 0.655),
        (0.2, None, 0.61),
        (0.5, None, 0.61),  # capped at full motion
        (0.1, 0.61, 0.585 + 0.061),
        (0.0, 0.5, 0.63 + 0.05),
    ],
)
def test_the_noise_controller_maps_motion_as_streamdiffusionv2(
    moved: float, previous: float | None, expected: float
) -> None:
    on = VideoParams.model_validate({"noise_controller": {"enabled": True}}).noise_controller
    assert controlled_noise(on, 0.7, previous, moved) == pytest.approx(expected)
    assert controlled_noise(NoiseController(), 0.7, previous, moved) == 0.7  # off: the base


def test_the_last_step_writes_the_cache_and_recaches_coherently(
    transform: VideoTransform,
) -> None:
    """``cache_write="last_step"``: one transformer call fewer per chunk; the kept chunks are the
    last steps' inputs at their timesteps, so a prompt change and back rebuilds the same cache."""
    calls: list[int] = []
    hook = transform._model().transformer.patch_embedding.register_forward_hook(
        lambda _m, args, _o: calls.append(args[0].shape[0])
    )
    counts = {}
    try:
        for rule in ("clean", "last_step"):
            params = params_for(transform, prompt="sunny day", cache_write=rule)
            state = transform.open_session(params)
            calls.clear()
            for i in range(9):  # two chunks: 1 + 4 frames, then 4
                feed(transform, [(state, params)], 400 + i)
            counts[rule] = len(calls)
    finally:
        hook.remove()
    steps = len(params.denoising_step_list)
    assert counts == {"clean": 2 * (steps + 1), "last_step": 2 * steps}
    assert all(kept.timestep.item() > 0 for kept in state.kept.values())
    keys = cached_keys(state.cache)
    other = params.model_copy(update={"prompt": "snowy night"})
    feed(transform, [(state, other)], 409)
    assert not torch.allclose(cached_keys(state.cache)[1], keys[1])
    feed(transform, [(state, params)], 410)  # back: the same writes under the same text
    assert state.stats.recaches == 2
    for rebuilt, original in zip(cached_keys(state.cache), keys, strict=True):
        torch.testing.assert_close(rebuilt, original, atol=1e-5, rtol=0)


def test_umt5_on_the_cpu_hands_embeddings_to_the_transformer_device(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``video_text_device=cpu`` with the model on another device (the meta device stands in
    for a GPU here): UMT5 stays on the CPU, the transformer and VAE move, and a prompt's
    embedding arrives on the transformer's device in its dtype."""
    settings = Settings(
        pipeline="video",
        model=str(tiny_folder),
        device="meta",
        dtype="bfloat16",
        video_text_device="cpu",
    )
    moved = VideoTransform(settings)
    moved.load()
    model = moved._model()
    assert model.text_encoder.device == torch.device("cpu")
    assert model.text_encoder.dtype == torch.bfloat16
    assert next(model.transformer.parameters()).device == torch.device("meta")
    assert next(model.vae.parameters()).device == torch.device("meta")
    embedding = moved._text((("a red fox", 1.0),))
    assert embedding.device == torch.device("meta") and embedding.dtype == torch.bfloat16
    assert moved.prompts is not None and moved.prompts.encoded == 1
    moved._text((("a red fox", 1.0),))
    assert moved.prompts.encoded == 1  # once per text


def test_the_embedding_is_the_encoders_output_moved_and_cast(transform: VideoTransform) -> None:
    model = transform._model()
    prompts = PromptEncoder(model.text_encoder, model.tokenizer, 8, dtype=torch.bfloat16)
    on_cpu = PromptEncoder(model.text_encoder, model.tokenizer, 8)
    embedding = prompts.embed((("snow", 1.0),))
    assert embedding.dtype == torch.bfloat16
    assert torch.equal(embedding, on_cpu.embed((("snow", 1.0),)).to(torch.bfloat16))


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="does not exist"):
        VideoTransform(Settings(pipeline="video", model=str(tmp_path / "none"), device="cpu"))
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(LookupError, match="lacks vae, text_encoder, tokenizer"):
        models.locate(str(tmp_path / "half"), None)
    with pytest.raises(LookupError, match="prepare-models --pipeline video"):
        models.locate("nobody/no-such-wan-model", str(tmp_path / "cache"))


def test_memory_is_estimated_from_the_config_and_checked_before_load(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 1.3e9 < models.transformer_parameters(WAN21_T2V_1_3B_TRANSFORMER) < 1.45e9
    estimate = models.memory_estimate(tiny_folder, 832, 480, 21, 3)
    dim = 2 * 12  # the tiny transformer: 2 heads of 12
    # the buffers hold 21 cached frames plus a first chunk of 3 + 1
    assert estimate.cache_per_session == 2 * 2 * (21 + 4) * (30 * 52) * dim * 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device: (estimate.weights, 10**12))
    with pytest.raises(models.VideoMemoryError, match=r"KV cache .* per session x 2"):
        models.check_memory(estimate, 2, torch.device("cuda"))
    models.check_memory(estimate, 0, torch.device("cuda"))  # the weights alone fit
    # UMT5 on the CPU: its bf16 bytes leave the device's share for host memory
    umt5 = 2 * models.umt5_parameters(WAN21_UMT5_TEXT_ENCODER)
    assert 11.0e9 < umt5 < 11.8e9  # UMT5-XXL, the largest part
    host = models.memory_estimate(tiny_folder, 832, 480, 21, 3, text_on_device=False)
    text = estimate.weights - host.weights
    assert text > 0 and host.host_text_encoder == text
    assert host.cache_per_session == estimate.cache_per_session
    with pytest.raises(models.VideoMemoryError, match=r"UMT5 \(.* GiB\) stays on the CPU"):
        models.check_memory(host, 1, torch.device("cuda"))
    models.check_memory(host, 0, torch.device("cuda"))
