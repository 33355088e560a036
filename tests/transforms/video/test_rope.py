"""Wan's RoPE on the causal path: cached float32 tables, and re-basing a long stream.

The tables equal the model's own ``rope`` output bit for bit. A rebase moves the cache's non-sink
frames down to just after the sink and rotates their keys by the same offset on the time axis:
(a) the rotated keys equal keys computed from scratch at the new positions; (b) with one block,
the next chunk then equals the window recomputed from scratch at the new positions, and without a
sink a rebase changes nothing at any depth; (c) a ``VideoTransform`` stream runs far past a small
table with its sink and no cache restart."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from livediff.config import Settings
from livediff.frames import Frame
from livediff.testing.video_models import write_tiny_wan_folder
from livediff.transforms import Job, resolve_transform
from livediff.transforms.video.causal import (
    forward_block_causal,
    forward_chunk,
    new_cache,
    rebase_cache,
    rotary_at,
)
from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.params import VideoParams
from livediff.transforms.video.transform import VideoTransform

from .test_causal import HEIGHT, TOLERANCE, WIDTH, inputs, stream

TOKENS = (HEIGHT // 2) * (WIDTH // 2)  # tokens a latent frame
SMALL_TABLE = 6  # latent frames of RoPE in the transform-level test's model
SIZE = 32


def models_own_rotary(model: Any, positions: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """What ``model.rope`` gives for frames 0..top, picked at ``positions`` (the uncached way)."""
    top = max(max(row) for row in positions) + 1
    cos, sin = model.rope(torch.empty((1, 1, top, HEIGHT, WIDTH)))
    index = torch.tensor(positions)
    return tuple(
        t.view(top, -1, t.shape[-1])[index].flatten(1, 2).unsqueeze(2).float() for t in (cos, sin)
    )


def test_the_cached_tables_equal_the_models_own_rope(transformer: Any) -> None:
    for positions in ([[0, 1, 2]], [[3, 7, 8], [0, 1, 2]], [[1023]]):
        ours = rotary_at(transformer, positions, HEIGHT, WIDTH)
        theirs = models_own_rotary(transformer, positions)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert ours[0].dtype == torch.float32
        assert rotary_at(transformer, positions, HEIGHT, WIDTH) is ours  # built once
    with pytest.raises(ValueError, match="past the RoPE table"):
        rotary_at(transformer, [[1022, 1023, 1024]], HEIGHT, WIDTH)


def one_frame_chunks(
    model: Any, cache_frames: int, chunks: int, seed: int, **cache: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
    """Inputs for ``chunks`` one-frame chunks; all but the last streamed through a cache of
    ``cache_frames`` (the last is left for the test to run)."""
    latents, timesteps, text = inputs(chunks, chunks, seed=seed)
    rolled = new_cache(model, HEIGHT, WIDTH, max_frames=cache_frames, **cache)
    sizes = [1] * (chunks - 1)
    stream(model, latents[:, :, :-1], timesteps, text, sizes, cache=rolled)
    return latents, timesteps, text, rolled


def write_at(model: Any, cache: KVCache, latents: torch.Tensor, t: torch.Tensor, text: Any) -> None:
    forward_chunk(model, latents, t, text, [cache], write=True)


def test_rebased_keys_equal_keys_computed_at_the_new_positions(transformer: Any) -> None:
    """Frames 0 (sink), 4, 5 cached; the rebase moves 4, 5 to 1, 2. Block 0's keys depend only
    on the frame, its timestep and its position, so writing the same frames at 0, 1, 2 into a
    fresh cache gives them; deeper blocks' keys also carry the context each frame saw, so there
    the rebase changes only the time part of each key, by a rotation (norms kept)."""
    latents, timesteps, text, rolled = one_frame_chunks(transformer, 3, 7, seed=21)
    before = [rolled.cached_keys(layer) for layer in range(rolled.num_layers)]
    assert rebase_cache(transformer, rolled) == 3
    assert rolled.chunks == [(0, 1), (1, 1), (2, 1)] and rolled.next_frame == 3
    fresh = new_cache(transformer, HEIGHT, WIDTH, max_frames=8)
    for frame in (0, 4, 5):
        write_at(transformer, fresh, latents[:, :, frame : frame + 1], timesteps[:, frame], text)
    rebased_keys, rebased_values = rolled.cached_keys(0)
    scratch_keys, scratch_values = fresh.cached_keys(0)
    assert (rebased_keys - scratch_keys).abs().max() < TOLERANCE
    assert torch.equal(rebased_values, before[0][1])  # values carry no position
    assert (rebased_values - scratch_values).abs().max() < TOLERANCE
    assert (before[0][0] - scratch_keys).abs().max() > 1e-3  # the rotation is real
    t_dim = transformer.rope.t_dim
    for layer, (keys, values) in enumerate(before):
        moved = rolled.cached_keys(layer)[0]
        assert torch.equal(moved[:, :TOKENS], keys[:, :TOKENS])  # the sink does not move
        assert torch.equal(moved[..., t_dim:], keys[..., t_dim:])  # rows and columns untouched
        norms = [k[..., :t_dim].reshape(*k.shape[:-1], -1, 2).norm(dim=-1) for k in (moved, keys)]
        assert (norms[0] - norms[1]).abs().max() < TOLERANCE  # time pairs rotated, not scaled
        assert torch.equal(rolled.cached_keys(layer)[1], values)


def test_after_a_rebase_one_block_equals_the_window_at_the_new_positions(
    one_layer_transformer: Any,
) -> None:
    """One block: after the rebase the next chunk (frame 6) sees the sink at 0 and frames 4, 5
    at 1, 2, and sits at 3 itself; the window recomputed from scratch at those positions gives
    the same output. Without the rebase (positions 0, 4, 5, 6) the output differs: the sink is
    nearer now."""
    model = one_layer_transformer
    latents, timesteps, text, rolled = one_frame_chunks(model, 3, 7, seed=22)
    unmoved_cache = copy.deepcopy(rolled)
    assert rebase_cache(model, rolled) == 3
    after = forward_chunk(model, latents[:, :, 6:], timesteps[:, 6], text, [rolled], write=True)
    window = [0, 4, 5, 6]
    chunk_latents, chunk_t = latents[:, :, window], timesteps[:, window]
    recomputed = forward_block_causal(
        model, chunk_latents, chunk_t, text, [1] * 4, positions=[0, 1, 2, 3]
    )
    assert (recomputed[:, :, -1:] - after).abs().max() < TOLERANCE
    unmoved = forward_chunk(model, latents[:, :, 6:], timesteps[:, 6], text, [unmoved_cache])
    assert (unmoved - after).abs().max() > 1e-3
    assert rolled.chunks == [(0, 1), (2, 1), (3, 1)] and rolled.next_frame == 4


def test_without_a_sink_a_rebase_changes_nothing_at_any_depth(transformer: Any) -> None:
    """Without a sink every cached frame moves, so every position difference is kept: the
    stream rebased twice equals the stream never rebased, chunk for chunk, through both blocks
    (a kept frame's deeper keys included)."""
    latents, timesteps, text = inputs(10, 10, seed=23)
    plain, rebased = (new_cache(transformer, HEIGHT, WIDTH, 3, keep_sink=False) for _ in "ab")
    offsets = []
    for index in range(10):
        if index in (5, 8):
            offsets.append(rebase_cache(transformer, rebased))
        chunk, t = latents[:, :, index : index + 1], timesteps[:, index]
        ours = forward_chunk(transformer, chunk, t, text, [rebased], write=True)
        theirs = forward_chunk(transformer, chunk, t, text, [plain], write=True)
        assert (ours - theirs).abs().max() < TOLERANCE
    assert offsets == [2, 3] and rebased.positions() == [2, 3, 4]
    assert plain.positions() == [7, 8, 9]
    empty = new_cache(transformer, HEIGHT, WIDTH, 3, keep_sink=False)
    empty.next_frame = transformer.rope.max_seq_len  # nothing cached: only the position moves
    assert rebase_cache(transformer, empty) == transformer.rope.max_seq_len
    assert empty.next_frame == 0


@pytest.fixture(scope="module")
def small_table_transform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VideoTransform]:
    """The tiny model with a RoPE table of ``SMALL_TABLE`` latent frames (its config changed
    before loading), loaded the way ``--model <folder>`` loads it."""
    folder = Path(tmp_path_factory.mktemp("tiny-wan-short-rope")) / "model"
    write_tiny_wan_folder(folder, seed=0)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "rope_max_seq_len": SMALL_TABLE}))
    settings = Settings(pipeline="video", model=str(folder), device="cpu", width=64, height=64)
    found = resolve_transform("video")(settings)
    assert isinstance(found, VideoTransform)
    found.load()
    yield found
    found.close()


def frame(index: int) -> Frame:
    rng = np.random.default_rng(index)
    return Frame(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), pts=index)


def test_a_stream_runs_far_past_a_small_table_with_its_sink(
    small_table_transform: VideoTransform,
) -> None:
    """13 chunks (2 + 12 latent frames) on a 6-frame table: the cache is re-based whenever the
    next chunk would pass it, never restarted; the sink stays; frames keep coming one per input;
    the kept chunks follow their new positions, so a prompt change re-caches them."""
    transform = small_table_transform
    assert transform._model().transformer.rope.max_seq_len == SMALL_TABLE
    start = {**VideoTransform.default_params(transform.settings), **transform.loaded_params()}
    size = {"width": SIZE, "height": SIZE, "chunk_frames": 1, "max_cache_frames": 4}
    params = VideoParams.model_validate({**start, **size})
    state = transform.open_session(params)
    shown, next_frames = [], []
    for index in range(5 + 4 * 12):
        chunks = state.stats.chunks
        shown.append(transform.process([Job("s", frame(index), params, state)])[0] is not None)
        if state.stats.chunks > chunks:
            next_frames.append(state.cache.next_frame)
    assert state.stats.chunks == 13 and shown == [False] * 4 + [True] * (len(shown) - 4)
    report = VideoTransform.describe_session(params)["video"]
    assert report is not None and report["cache_resets"] == 0
    assert state.cache.chunks[0] == (0, 2)  # the sink (the first chunk's 1 + 1 latent frames)
    # after the table fills (next frame 6), every other chunk is re-based by 2 (sink 0-1, the
    # kept frames 4, 5 move to 2, 3), then written at 4; 14 latent frames through 6 positions
    assert next_frames == [2, 3, 4, 5, 6, 5, 6, 5, 6, 5, 6, 5, 6]
    assert max(state.cache.positions()) < SMALL_TABLE
    assert sorted(state.kept) == [first for first, _ in state.cache.chunks]
    changed = params.model_copy(update={"prompt": "night"})
    transform.process([Job("s", frame(99), changed, state)])
    assert state.stats.recaches == 1 and state.stats.resets == 0
    assert state.cache.chunks[0] == (0, 2)
    transform.close_session(state)
