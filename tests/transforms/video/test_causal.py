"""Block-causal generation: streaming with the KV cache equals one pass under the mask."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from livediff.testing.video_models import TINY_TEXT_TOKENS, TINY_WAN_TRANSFORMER
from livediff.transforms.video.causal import (
    block_causal_mask,
    chunk_windows,
    forward_block_causal,
    forward_chunk,
    new_cache,
)
from livediff.transforms.video.kv_cache import KVCache

HEIGHT = WIDTH = 4  # latent size: 2x2 patches, 4 tokens a frame
CHANNELS = TINY_WAN_TRANSFORMER["in_channels"]
TOLERANCE = 1e-5


def inputs(frames: int, chunks: int, seed: int, rows: int = 1) -> tuple[torch.Tensor, ...]:
    """Latents, one timestep per chunk (rows x chunks) and text for ``rows`` sessions."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((rows, CHANNELS, frames, HEIGHT, WIDTH), generator=gen)
    timesteps = torch.rand((rows, chunks), generator=gen) * 1000
    text_dim = TINY_WAN_TRANSFORMER["text_dim"]
    text = torch.randn((rows, TINY_TEXT_TOKENS, text_dim), generator=gen)
    return latents, timesteps, text


def per_frame(timesteps: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    return torch.cat([timesteps[:, [i]].expand(-1, n) for i, n in enumerate(sizes)], dim=1)


def stream(
    model: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    sizes: Sequence[int],
    *,
    cache: KVCache,
) -> torch.Tensor:
    """Each chunk through :func:`forward_chunk`, writing the cache; the outputs concatenated."""
    outs, start = [], 0
    for index, frames in enumerate(sizes):
        chunk = latents[:, :, start : start + frames]
        outs.append(forward_chunk(model, chunk, timesteps[:, index], text, [cache], write=True))
        start += frames
    return torch.cat(outs, dim=2)


def test_one_chunk_without_context_is_the_models_own_forward(transformer: Any) -> None:
    latents, timesteps, text = inputs(frames=3, chunks=1, seed=0, rows=2)
    caches = [new_cache(transformer, HEIGHT, WIDTH, max_frames=8) for _ in range(2)]
    ours = forward_chunk(transformer, latents, timesteps[:, 0], text, caches)
    theirs = transformer(latents, timesteps[:, 0], text).sample
    assert (ours - theirs).abs().max() < TOLERANCE
    assert all(c.cached_frames == 0 and c.next_frame == 0 for c in caches)


def test_streaming_with_the_cache_equals_one_block_causal_pass(transformer: Any) -> None:
    sizes = [2, 1, 1, 2, 1]
    latents, timesteps, text = inputs(sum(sizes), len(sizes), seed=1)
    cache = new_cache(transformer, HEIGHT, WIDTH, max_frames=64)
    streamed = stream(transformer, latents, timesteps, text, sizes, cache=cache)
    reference = forward_block_causal(transformer, latents, per_frame(timesteps, sizes), text, sizes)
    assert (streamed - reference).abs().max() < TOLERANCE
    # the context matters: the last chunk alone (no cache) is far from it
    alone = transformer(latents[:, :, -1:], timesteps[:, -1], text).sample
    assert (alone - streamed[:, :, -1:]).abs().max() > 1e-2
    assert cache.chunks == [(0, 2), (2, 1), (3, 1), (4, 2), (6, 1)]
    assert cache.next_frame == 7


def test_after_the_cache_rolls_streaming_equals_the_windowed_pass(transformer: Any) -> None:
    sizes = [2, 1, 1, 1, 1, 1]
    latents, timesteps, text = inputs(sum(sizes), len(sizes), seed=2)
    cache = new_cache(transformer, HEIGHT, WIDTH, max_frames=4)
    streamed = stream(transformer, latents, timesteps, text, sizes, cache=cache)
    frame_t = per_frame(timesteps, sizes)
    windowed = forward_block_causal(transformer, latents, frame_t, text, sizes, max_frames=4)
    assert (streamed - windowed).abs().max() < TOLERANCE
    unbounded = forward_block_causal(transformer, latents, frame_t, text, sizes)
    assert (streamed - unbounded).abs().max() > 1e-3  # eviction did change what chunks saw
    # the sink (frames 0-1) stays; the oldest others left; positions stay absolute
    assert cache.chunks == [(0, 2), (5, 1), (6, 1)]
    assert cache.positions() == [0, 1, 5, 6]
    layers = range(cache.num_layers)
    assert all(cache.cached_keys(layer)[0].shape[1] == 4 * 4 for layer in layers)


def test_the_window_rule_keeps_the_sink_and_evicts_the_oldest() -> None:
    assert chunk_windows([2, 1, 1, 1, 1, 1], max_frames=4) == [
        [],
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 2, 3],
        [0, 3, 4],
    ]
    assert chunk_windows([1, 1, 1, 1], max_frames=2, keep_sink=False) == [[], [0], [0, 1], [1, 2]]
    assert chunk_windows([1, 1, 1]) == [[], [0], [0, 1]]
    mask = block_causal_mask([1, 2], tokens=2)
    expected = torch.tensor(
        [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1, 1]] * 4, dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_one_layer_window_recomputed_from_scratch_equals_the_rolled_stream(
    one_layer_transformer: Any,
) -> None:
    """With one block, a cached chunk's keys depend on that chunk alone, so the rolled window
    (sinks + kept chunks at their absolute positions) recomputed from scratch under a plain
    block-causal mask gives the newest chunk exactly the streamed output. (With more blocks a
    kept chunk's deeper keys also carry what it saw of evicted chunks; the windowed one-pass
    reference above covers that case.)"""
    model = one_layer_transformer
    sizes = [1, 1, 1, 1, 1, 1]
    latents, timesteps, text = inputs(sum(sizes), len(sizes), seed=3)
    cache = new_cache(model, HEIGHT, WIDTH, max_frames=3)
    streamed = stream(model, latents, timesteps, text, sizes, cache=cache)
    window = [0, 3, 4, 5]  # the sink, the chunks the cache kept before the last, the last
    recomputed = forward_block_causal(
        model, latents[:, :, window], timesteps[:, window], text, [1, 1, 1, 1], positions=window
    )
    assert (recomputed[:, :, -1:] - streamed[:, :, -1:]).abs().max() < TOLERANCE
    shifted = forward_block_causal(
        model, latents[:, :, window], timesteps[:, window], text, [1, 1, 1, 1]
    )
    assert (shifted[:, :, -1:] - streamed[:, :, -1:]).abs().max() > 1e-3  # positions matter


def test_sessions_in_one_call_equal_each_alone(transformer: Any) -> None:
    """Two sessions with their own caches (of different lengths, so padded and masked), their own
    timesteps and prompts: batched calls give each what it gets alone."""
    latents, timesteps, text = inputs(frames=6, chunks=3, seed=4, rows=2)
    alone = [new_cache(transformer, HEIGHT, WIDTH, max_frames=8) for _ in range(2)]
    # session 1 starts a chunk earlier than session 0
    forward_chunk(
        transformer, latents[1:, :, :2], timesteps[1:, 0], text[1:], [alone[1]], write=True
    )
    batched = copy.deepcopy(alone)
    for step in range(2):
        frames = slice(2 + 2 * step, 4 + 2 * step)
        chunk, t = latents[:, :, frames], timesteps[:, step + 1]
        together = forward_chunk(transformer, chunk, t, text, batched, write=True)
        for row in range(2):
            rows = slice(row, row + 1)
            single = forward_chunk(
                transformer, chunk[rows], t[rows], text[rows], [alone[row]], write=True
            )
            assert (together[rows] - single).abs().max() < TOLERANCE
    for a, b in zip(alone, batched, strict=True):
        assert a.chunks == b.chunks and a.next_frame == b.next_frame
        for layer in range(a.num_layers):
            for ours, theirs in zip(a.cached_keys(layer), b.cached_keys(layer), strict=True):
                assert (ours - theirs).abs().max() < TOLERANCE


def test_a_read_leaves_the_cache_and_a_failed_write_resets_it(transformer: Any) -> None:
    latents, timesteps, text = inputs(frames=2, chunks=2, seed=5)
    cache = new_cache(transformer, HEIGHT, WIDTH, max_frames=4)
    forward_chunk(transformer, latents[:, :, :1], timesteps[:, 0], text, [cache], write=True)
    before = [cache.cached_keys(layer) for layer in range(cache.num_layers)]
    forward_chunk(transformer, latents[:, :, 1:], timesteps[:, 1], text, [cache])
    assert cache.chunks == [(0, 1)] and cache.next_frame == 1
    for layer, kept in enumerate(before):
        assert all(map(torch.equal, kept, cache.cached_keys(layer)))
    too_long = torch.zeros(1, CHANNELS, 4, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="does not fit"):
        forward_chunk(transformer, too_long, timesteps[:, 1], text, [cache], write=True)
    assert cache.chunks == [(0, 1)]  # a refused chunk changes nothing
    wrong_text = text[:, :, :3]
    with pytest.raises(RuntimeError, match="shapes"):
        forward_chunk(
            transformer, latents[:, :, 1:], timesteps[:, 1], wrong_text, [cache], write=True
        )
    assert cache.chunks == [] and cache.next_frame == 0 and cache.pending is None
