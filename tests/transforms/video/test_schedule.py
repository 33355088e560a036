"""The few-step flow-matching denoising of a chunk, and its cache write (clean, or by the last
step)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from livediff.testing.video_models import TINY_TEXT_TOKENS, TINY_WAN_TRANSFORMER
from livediff.transforms.video.causal import forward_chunk, new_cache
from livediff.transforms.video.schedule import (
    ChunkSchedule,
    add_noise,
    denoise,
    generate_chunk,
    stack_timesteps,
    warp_timestep,
)

CHANNELS = TINY_WAN_TRANSFORMER["in_channels"]


def test_warped_steps_follow_the_shifted_flow_schedule() -> None:
    assert warp_timestep(1000, 5.0) == pytest.approx(1000)
    assert warp_timestep(500, 5.0) == pytest.approx(1000 * 2.5 / 3)
    assert warp_timestep(250, 1.0) == pytest.approx(250)
    schedule = ChunkSchedule((1000.0, 750.0, 500.0, 250.0), shift=5.0)
    assert schedule.timesteps() == pytest.approx([1000, 1000 * 3.75 / 4, 1000 * 2.5 / 3, 625])
    # video-to-video at noise scale 0.9: start there, keep the steps below it
    assert schedule.timesteps(0.9) == pytest.approx([900, 1000 * 2.5 / 3, 625])
    with pytest.raises(ValueError, match="descending"):
        ChunkSchedule((500.0, 750.0))


def test_denoising_with_an_exact_flow_recovers_the_clean_latents() -> None:
    """A model that knows the answer predicts the exact flow ``(x_t - x0) / sigma``: every step
    then lands on x0, and the first call sees the input noised to the first level."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn((2, CHANNELS, 2, 4, 4), generator=gen)
    start = torch.randn((2, CHANNELS, 2, 4, 4), generator=gen)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def oracle(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        seen.append((x_t, timestep))
        return (x_t - target) / (timestep / 1000).view(-1, 1, 1, 1, 1)

    timesteps = stack_timesteps([[800.0, 500.0, 200.0], [900.0, 600.0, 100.0]], torch.device("cpu"))
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x0 = denoise(oracle, start, timesteps, generators).x0
    assert (x0 - target).abs().max() < 1e-5
    assert [t.tolist() for _, t in seen] == [[800, 900], [500, 600], [200, 100]]
    first_noise = torch.stack(
        [torch.randn(start.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    )
    expected = add_noise(start, first_noise, timesteps[0])
    assert (seen[0][0] - expected).abs().max() < 1e-6
    assert (seen[0][0] - start).abs().max() > 0.1  # the input was noised


def test_a_chunk_is_cached_from_its_clean_result(transformer: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    text = torch.randn((1, TINY_TEXT_TOKENS, TINY_WAN_TRANSFORMER["text_dim"]), generator=gen)
    cache = new_cache(transformer, 4, 4, max_frames=6)
    schedule = ChunkSchedule((1000.0, 500.0))
    for _ in range(2):
        latents = torch.randn((1, CHANNELS, 2, 4, 4), generator=gen)
        before = copy.deepcopy(cache)
        timesteps = stack_timesteps([schedule.timesteps(0.8)], torch.device("cpu"))
        x0 = generate_chunk(
            transformer,
            latents,
            text,
            [cache],
            timesteps=timesteps,
            generators=[torch.Generator().manual_seed(9)],
        ).x0
        forward_chunk(transformer, x0, torch.zeros(1), text, [before], write=True)
        assert cache.chunks == before.chunks
        for layer in range(cache.num_layers):
            ours, clean = cache.cached_keys(layer)[0], before.cached_keys(layer)[0]
            assert (ours - clean).abs().max() < 1e-6
    assert cache.chunks == [(0, 2), (2, 2)]


def test_the_last_step_writes_the_cache_one_pass_fewer(transformer: Any) -> None:
    """``cache_write="last_step"``: each chunk costs one transformer call fewer than ``"clean"``
    (the first chunk's result is the same: the writing pass reads the cache as it was before), and
    the cache holds the keys of the last step's own input at its timestep, not the clean
    chunk's."""
    gen = torch.Generator().manual_seed(4)
    text = torch.randn((1, TINY_TEXT_TOKENS, TINY_WAN_TRANSFORMER["text_dim"]), generator=gen)
    chunks = [torch.randn((1, CHANNELS, 2, 4, 4), generator=gen) for _ in range(2)]
    timesteps = stack_timesteps(
        [ChunkSchedule((1000.0, 250.0)).timesteps(0.8)], torch.device("cpu")
    )
    assert timesteps[:, 0].tolist() == pytest.approx([800, 625])  # two steps
    inputs: list[torch.Tensor] = []
    hook = transformer.patch_embedding.register_forward_hook(
        lambda _m, args, _o: inputs.append(args[0].clone())
    )
    caches = {rule: new_cache(transformer, 4, 4, max_frames=6) for rule in ("clean", "last_step")}
    try:
        for latents in chunks:
            outputs = {}
            for rule, cache in caches.items():
                before, inputs[:] = copy.deepcopy(cache), []
                outputs[rule] = generate_chunk(
                    transformer,
                    latents,
                    text,
                    [cache],
                    timesteps=timesteps,
                    generators=[torch.Generator().manual_seed(9)],
                    cache_write=rule,  # type: ignore[arg-type]
                )
                assert len(inputs) == (3 if rule == "clean" else 2)  # 2 steps (+ the clean write)
                written = outputs[rule]
                assert torch.equal(written.cached, inputs[-1])  # the last call's input
                forward_chunk(
                    transformer, written.cached, written.cached_timestep, text, [before], write=True
                )
                for layer in range(cache.num_layers):
                    ours, expected = cache.cached_keys(layer)[0], before.cached_keys(layer)[0]
                    assert (ours - expected).abs().max() < 1e-6
            last = outputs["last_step"]
            assert last.cached_timestep.tolist() == pytest.approx([timesteps[-1, 0].item()])
            assert not torch.equal(last.cached, last.x0)
            # the first chunk reads an empty cache either way: the same result
            if latents is chunks[0]:
                assert torch.equal(outputs["clean"].x0, last.x0)
    finally:
        hook.remove()
    clean_keys = caches["clean"].cached_keys(1)[0]
    last_keys = caches["last_step"].cached_keys(1)[0]
    assert (clean_keys - last_keys).abs().max() > 1e-3  # the rules cache different keys
    assert caches["clean"].chunks == caches["last_step"].chunks == [(0, 2), (2, 2)]
