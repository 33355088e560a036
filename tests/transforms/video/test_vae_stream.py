"""The streaming VAE: chunk by chunk with the causal cache equals the VAE over the whole clip."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from livediff.transforms.video.vae_stream import (
    decode_chunk,
    denormalize_latents,
    encode_chunk,
    new_stream_state,
    normalize_latents,
)

SIZE = 32  # pixels; 4x4 latents
CHUNKS = [5, 4, 8]  # frames: the first chunk 1 + 4, then 4k


def clip(rows: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((rows, 3, frames, SIZE, SIZE), generator=gen) * 2 - 1


def test_chunked_encode_equals_the_whole_clip(vae: Any) -> None:
    video = clip(1, sum(CHUNKS), seed=0)
    state = new_stream_state(vae)
    parts, start = [], 0
    for frames in CHUNKS:
        parts.append(encode_chunk(vae, video[:, :, start : start + frames], [state]))
        start += frames
    assert [p.shape[2] for p in parts] == [2, 1, 2]
    whole = vae.encode(video).latent_dist.mean
    assert (torch.cat(parts, dim=2) - whole).abs().max() < 1e-5
    assert state.frames_encoded == sum(CHUNKS)


def test_chunked_decode_equals_the_whole_clip_and_starts_after_one_chunk(vae: Any) -> None:
    latents = torch.randn(
        (1, vae.config.z_dim, 5, 4, 4), generator=torch.Generator().manual_seed(1)
    )
    state = new_stream_state(vae)
    parts = [decode_chunk(vae, latents[:, :, a:b], [state]) for a, b in ((0, 1), (1, 3), (3, 5))]
    assert [p.shape[2] for p in parts] == [1, 8, 8]  # the first frame comes out on its own
    whole = vae.decode(latents).sample
    assert (torch.cat(parts, dim=2) - whole).abs().max() < 1e-5
    assert whole.std() > 0.05


def test_sessions_in_one_call_equal_each_alone(vae: Any) -> None:
    video = clip(2, 9, seed=2)
    alone = [new_stream_state(vae) for _ in range(2)]
    together = [new_stream_state(vae) for _ in range(2)]
    for a, b in ((0, 5), (5, 9)):
        batched = encode_chunk(vae, video[:, :, a:b], together)
        for row in range(2):
            single = encode_chunk(vae, video[row : row + 1, :, a:b], [alone[row]])
            assert (batched[row : row + 1] - single).abs().max() < 1e-5
            decoded = decode_chunk(vae, single, [alone[row]])
            batched_decoded = decode_chunk(vae, batched[row : row + 1], [together[row]])
            assert (decoded - batched_decoded).abs().max() < 1e-5


def test_refuses_chunks_off_the_frame_grid_and_mixed_phases(vae: Any) -> None:
    state = new_stream_state(vae)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_chunk(vae, clip(1, 4, seed=3), [state])
    encode_chunk(vae, clip(1, 1, seed=3), [state])
    with pytest.raises(ValueError, match="4k"):
        encode_chunk(vae, clip(1, 3, seed=3), [state])
    with pytest.raises(ValueError, match="first chunk"):
        encode_chunk(vae, clip(2, 4, seed=3), [state, new_stream_state(vae)])


def test_latent_normalisation_round_trips(vae: Any) -> None:
    latents = torch.randn((1, vae.config.z_dim, 2, 4, 4))
    normal = normalize_latents(vae, latents)
    assert (denormalize_latents(vae, normal) - latents).abs().max() < 1e-6
    expected = (latents[:, 1] - vae.config.latents_mean[1]) / vae.config.latents_std[1]
    assert (normal[:, 1] - expected).abs().max() < 1e-6
