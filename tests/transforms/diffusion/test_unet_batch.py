"""The UNet batch on the tiny model: stream batch, live params, the similarity filter and
several sessions in one UNet batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import SIZE, Stream, camera_frames


@contextmanager
def unet_calls(transform: DiffusionTransform) -> Iterator[list[int]]:
    """Record the batch size of every UNet call made inside the block."""
    sizes: list[int] = []
    unet = transform._unet_batch().bundle.unet
    hook = unet.register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        hook.remove()


@pytest.mark.parametrize("t_index_list", [[20, 35], [10, 25, 40], [5, 15, 30, 45]])
def test_stream_batch_outputs_each_frame_in_order_once_filled(
    make_transform: Callable[..., DiffusionTransform], t_index_list: list[int]
) -> None:
    transform = make_transform()
    steps = len(t_index_list)
    frames = camera_frames(steps + 2)
    stream = Stream(transform, t_index_list=t_index_list, seed=3)
    with unet_calls(transform) as sizes:
        outputs = [stream.feed(frame) for frame in frames]
    assert sizes == [steps] * len(frames)  # all steps of all frames in flight: one batch
    assert outputs[: steps - 1] == [None] * (steps - 1)  # filling
    for number, output in enumerate(outputs[steps - 1 :]):
        assert output.shape == (1, SIZE, SIZE, 3) and output.dtype == torch.float32
        assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
        assert float(output.std()) > 0.05
        # frame k comes out when frame k + steps - 1 goes in: the same as running frame k
        # alone through every step (a fresh session fed it until its own pipeline is full)
        alone = Stream(transform, t_index_list=t_index_list, seed=3)
        expected = [alone.feed(frames[number]) for _ in range(steps)][-1]
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


def test_params_update_changes_the_next_frame_without_reloading(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    unet_batch = transform._unet_batch()
    unet = unet_batch.bundle.unet
    frame = camera_frames(1)[0]
    stream = Stream(transform, prompt="a castle at dusk", seed=5)
    before = stream.feed(frame)
    assert torch.equal(stream.feed(frame), before)  # same frame, same params: same picture
    passes: list[int] = []
    unet_batch.bundle.text_encoder.register_forward_hook(lambda *_: passes.append(1))

    changes: list[dict[str, Any]] = [
        {"prompt": "a lighthouse in a storm"},
        {"prompt": [["a lighthouse in a storm", 1.0], ["a castle at dusk", 0.5]]},
        {"seed": 6},
        {"seed": [[6, 1.0], [7, 1.0]]},
        {"strength": 0.8},
        {"t_index_list": [12]},
        {"guidance_scale": 2.0, "cfg_type": "self"},
        {"guidance_scale": 2.0, "cfg_type": "initialize", "negative_prompt": "fog"},
    ]
    for change in changes:
        old = stream.params
        stream.update(**change)
        assert not transform.requires_reload(old, stream.params)
        after = stream.feed(frame)
        assert not torch.allclose(after, before, atol=1e-4), change
        before = after
    assert unet_batch.bundle.unet is unet and transform.unet_batch is unet_batch  # no reload
    # each new text went through the text encoder once: the blend of known texts cost nothing
    assert len(passes) == 2
    stream.feed(frame)
    assert len(passes) == 2


def test_only_a_new_model_or_vae_requires_a_reload(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    stream = Stream(transform)
    for change, reload in [({"prompt": "x"}, False), ({"vae": "full"}, True)]:
        new = stream.params.model_copy(update=change)
        assert transform.requires_reload(stream.params, new) is reload


def test_similarity_filter_skips_a_repeated_frame_not_a_changed_one(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(similarity_max_skip=2)
    first, changed = camera_frames(2)
    stream = Stream(transform, similarity_threshold=0.98)
    with unet_calls(transform) as sizes:
        shown = stream.feed(first)
        assert len(sizes) == 1
        assert stream.feed(first.copy()) is shown  # identical: skipped, last output again
        assert len(sizes) == 1
        assert stream.feed(changed) is not shown  # changed: processed
        assert len(sizes) == 2
        # at most similarity_max_skip repeats in a row are skipped
        outputs = [stream.feed(changed) for _ in range(3)]
        assert len(sizes) == 3 and outputs[0] is outputs[1] and outputs[2] is not outputs[1]
        # new params on a still camera: the next frame shows them at once
        stream.update(prompt="something else entirely")
        assert stream.feed(changed) is not outputs[2]
        assert len(sizes) == 4
    assert stream.skips == 3  # each one marked on its job, for the engine to count


def test_similarity_filter_off_processes_every_frame(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    frame = camera_frames(1)[0]
    stream = Stream(transform, similarity_threshold=0.0)
    with unet_calls(transform) as sizes:
        for _ in range(3):
            stream.feed(frame)
    assert len(sizes) == 3


def test_sessions_batched_together_get_what_they_get_alone(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    frames_a, frames_b = camera_frames(3, seed=1), camera_frames(3, seed=2)
    settings_a = {"prompt": "a red fox", "seed": 1, "t_index_list": [15, 35]}
    settings_b = {
        "prompt": [["a blue whale", 1.0], ["an oil painting", 0.5]],
        "seed": 2,
        "strength": 0.6,
        "cfg_type": "full",
        "guidance_scale": 2.5,
        "negative_prompt": "dark",
    }
    together_a, together_b = Stream(transform, **settings_a), Stream(transform, **settings_b)
    with unet_calls(transform) as sizes:
        together = [
            transform.process([together_a.job(a), together_b.job(b)])
            for a, b in zip(frames_a, frames_b, strict=True)
        ]
    assert sizes == [2 + 2] * 3  # one UNet batch: 2 steps of A, a step and its negative of B
    alone_a, alone_b = Stream(transform, **settings_a), Stream(transform, **settings_b)
    for (out_a, out_b), a, b in zip(together, frames_a, frames_b, strict=True):
        expected_a, expected_b = alone_a.feed(a), alone_b.feed(b)
        assert (out_a is None) == (expected_a is None)
        if out_a is not None:
            torch.testing.assert_close(out_a, expected_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_b, expected_b, atol=1e-5, rtol=0)
    assert not torch.allclose(together[-1][0], together[-1][1], atol=1e-3)


def test_sessions_of_different_sizes_run_side_by_side(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    small, large = Stream(transform), Stream(transform, width=128, height=64)
    frame = camera_frames(1)[0]  # 64 x 64: resized on the device for the large one
    out_small, out_large = transform.process([small.job(frame), large.job(frame)])
    assert out_small.shape == (1, 64, 64, 3) and out_large.shape == (1, 64, 128, 3)


def test_full_vae_and_residual_cfg_modes_run(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(vae="full")
    assert type(transform._unet_batch().bundle.vae).__name__ == "AutoencoderKL"
    frames = camera_frames(3)
    results = {}
    for cfg_type in ("none", "self", "initialize", "full"):
        stream = Stream(transform, t_index_list=[20, 40], cfg_type=cfg_type, guidance_scale=1.8)
        outputs = [stream.feed(frame) for frame in frames]
        assert outputs[0] is None and outputs[1] is not None
        results[cfg_type] = outputs[-1]
    for cfg_type in ("self", "initialize", "full"):
        assert not torch.allclose(results[cfg_type], results["none"], atol=1e-4), cfg_type


def test_residual_cfg_keeps_its_noise_in_bfloat16(
    make_transform: Callable[..., DiffusionTransform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Self-CFG's virtual noise ``(x_t - alpha x_0) / beta`` subtracts two nearly equal numbers
    and divides by a small beta (late steps): kept in float32 under a bfloat16 model, it is the
    float32 reference (for the newest frame, exactly the noise that was added)."""
    transform = make_transform(dtype="bfloat16")
    unet_batch = transform._unet_batch()
    table = unet_batch.schedule.table((19, 99))
    assert table.alpha.dtype == table.beta.dtype == torch.float32
    seen: list[tuple[torch.Tensor, ...]] = []
    negative = unet_batch._negative_epsilon

    def recording(entry: Any, output: torch.Tensor) -> torch.Tensor:
        result = negative(entry, output)
        table = entry.state.table
        reference = (entry.x_t.double() - table.alpha.double() * entry.sources.double()) / (
            table.beta.double()
        )
        seen.append((result, reference, entry.state.noise))
        return result

    monkeypatch.setattr(unet_batch, "_negative_epsilon", recording)
    stream = Stream(transform, t_index_list=[40, 49], cfg_type="self", guidance_scale=1.5)
    outputs = [stream.feed(frame) for frame in camera_frames(3)]
    assert outputs[-1] is not None and bool(torch.isfinite(outputs[-1]).all())
    for result, reference, noise in seen:
        assert result.dtype == torch.float32
        torch.testing.assert_close(result[:1].double(), noise[:1].double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(result.double(), reference, atol=1e-4, rtol=0)
