"""The KV cache's preallocated buffers: allocated once, written in place, attended as a view.

A chunk's keys are staged in the buffer's free frame slots and the chunk attends to one view of
the buffer; a cached frame keeps its slot; an evicted frame's slot goes to a later chunk. These
tests check that the buffers do not move across many writes (evictions included), that the view
holds exactly the kept frames' keys and the chunk's own, unmasked in the steady state, and that
mixed chunk sizes (holes in the view, a mask; a buffer that must grow) still equal the one-pass
reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from livediff.transforms.video.causal import forward_block_causal, forward_chunk, new_cache
from livediff.transforms.video.kv_cache import Context, KVCache

from .test_causal import HEIGHT, TOLERANCE, WIDTH, inputs, per_frame, stream

TOKENS = (HEIGHT // 2) * (WIDTH // 2)


class RecordingCache(KVCache):
    """A cache that remembers the context each block's last pass attended to."""

    seen: dict[int, Context]

    def stage(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Context:
        context = super().stage(layer, keys, values)
        self.seen[layer] = context
        return context


def recording_cache(model: Any, max_frames: int) -> RecordingCache:
    plain = new_cache(model, HEIGHT, WIDTH, max_frames)
    cache = RecordingCache(plain.num_layers, plain.frame_tokens, max_frames)
    cache.seen = {}
    return cache


def frame_keys(context: Context, slot: int) -> torch.Tensor:
    return context.keys[:, slot * TOKENS : (slot + 1) * TOKENS]


def test_the_buffers_are_allocated_once_and_attended_in_place(transformer: Any) -> None:
    """Twelve chunks through a 4-frame cache (evicting from the fifth on): each block's buffers
    keep their storage; every pass attends to a view of them with no mask; the view holds exactly
    the kept frames' keys (block 0's equal to an unbounded cache's, frame by frame: block 0's keys
    depend only on the frame, its timestep and its position) and the chunk's own."""
    sizes = [2] + [1] * 11
    latents, timesteps, text = inputs(sum(sizes), len(sizes), seed=11)
    cache = recording_cache(transformer, max_frames=4)
    unbounded = new_cache(transformer, HEIGHT, WIDTH, max_frames=64)
    stream(transformer, latents, timesteps, text, sizes, cache=unbounded)
    storage: list[int] = []
    start = 0
    for index, frames in enumerate(sizes):
        chunk = latents[:, :, start : start + frames]
        held = list(cache.layout.chunks)
        forward_chunk(transformer, chunk, timesteps[:, index], text, [cache])  # a read pass
        forward_chunk(transformer, chunk, timesteps[:, index], text, [cache], write=True)
        start += frames
        pointers = [b.data_ptr() for b in [*cache.keys, *cache.values] if b is not None]
        storage = storage or pointers
        assert pointers == storage  # the same buffers, written in place
        context = cache.seen[0]
        assert context.mask is None and context.keys.data_ptr() == storage[0]  # a view
        assert context.keys.shape[1] == (sum(c.frames for c in held) + frames) * TOKENS
        reference = unbounded.cached_keys(0)[0]
        for kept in held:
            for offset, slot in enumerate(kept.slots):
                position = kept.start + offset
                expected = reference[:, position * TOKENS : (position + 1) * TOKENS]
                assert (frame_keys(context, slot) - expected).abs().max() < TOLERANCE
        staged = cache.layout.chunks[-1].slots  # the written chunk kept the slots it was staged in
        own = unbounded.cached_keys(0)[0][:, (start - frames) * TOKENS : start * TOKENS]
        ours = torch.cat([frame_keys(context, slot) for slot in staged], dim=1)
        assert (ours - own).abs().max() < TOLERANCE
    assert cache.chunks == [(0, 2), (11, 1), (12, 1)] and len(storage) == 2 * cache.num_layers
    # the steady state: the chunk's view covers the whole cache plus itself, every chunk alike
    assert cache.seen[0].keys.shape[1] == 5 * TOKENS
    assert cache.keys[0] is not None and cache.keys[0].shape[1] == (4 + 2) * TOKENS


def test_mixed_chunk_sizes_mask_the_holes_and_grow_the_buffer(transformer: Any) -> None:
    """Sizes 1, 2, 1, 1, 3, 1 through a 5-frame cache: the 3-frame chunk needs more room than
    the first chunk left (the buffer grows once), and evicting the 2-frame chunk leaves holes in
    the view that a mask covers. Streaming still equals the windowed one-pass reference."""
    sizes = [1, 2, 1, 1, 3, 1]
    latents, timesteps, text = inputs(sum(sizes), len(sizes), seed=12)
    cache = recording_cache(transformer, max_frames=5)
    streamed = stream(transformer, latents, timesteps, text, sizes, cache=cache)
    frame_t = per_frame(timesteps, sizes)
    windowed = forward_block_causal(transformer, latents, frame_t, text, sizes, max_frames=5)
    assert (streamed - windowed).abs().max() < TOLERANCE
    assert cache.chunks == [(0, 1), (5, 3), (8, 1)]
    assert [c.slots for c in cache.layout.chunks] == [(0,), (5, 6, 7), (1,)]
    mask = cache.seen[0].mask
    assert mask is not None
    # the last chunk went to slot 1; slots 2-3 (the evicted 2-frame chunk's) are holes
    expected = [True, True, False, False, True, True, True, True]
    assert mask.view(8, TOKENS).all(dim=1).tolist() == expected
    assert not mask.view(8, TOKENS)[2:4].any()
    assert cache.keys[0] is not None and cache.keys[0].shape[1] == 8 * TOKENS


def test_a_write_reads_what_it_staged_and_refuses_a_changed_chunk() -> None:
    """The bookkeeping alone, on synthetic keys: the slots a chunk is staged in are those it
    keeps; a different chunk shape within a write is refused; reset makes every slot scratch."""
    cache = KVCache(num_layers=1, frame_tokens=2, max_frames=3)
    keys = torch.arange(8.0).view(1, 4, 1, 2)
    cache.begin_write(2)
    context = cache.stage(0, keys, keys + 100)
    assert torch.equal(context.keys, keys) and torch.equal(context.values, keys + 100)
    cache.commit()
    assert cache.chunks == [(0, 2)] and cache.layout.chunks[0].slots == (0, 1)
    cache.begin_write(1)
    with pytest.raises(RuntimeError, match="shape changed"):
        cache.stage(0, keys, keys)
    cache.abort()
    assert cache.chunks == [] and cache.next_frame == 0
    with pytest.raises(ValueError, match="whole frames"):
        cache.stage(0, keys[:, :3], keys[:, :3])
