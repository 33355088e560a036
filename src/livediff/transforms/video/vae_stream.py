"""Chunk-by-chunk encode and decode with diffusers' ``AutoencoderKLWan`` and its own causal cache.

Wan's VAE is causal in time: its encoder and decoder run frame group by frame group, each causal
convolution keeping the last frames of its input in a feature cache (diffusers' ``_feat_map`` /
``_enc_feat_map``, reset by ``clear_cache`` around every whole-clip call). Here each session owns
those caches (:class:`VAEStreamState`) and keeps them between calls, so:

* encode: a session's first chunk is ``1 + 4k`` frames (the first frame alone makes the first
  latent frame), every later chunk ``4k`` frames; ``k`` latent frames come out per ``4k`` frames;
* decode: the first latent frame makes 1 frame, every later one 4; a chunk's frames come out as
  soon as its latents are decoded (the first output frame waits for no more than one chunk);
* concatenating the chunks' outputs equals the VAE over the whole clip (``vae.encode(clip)``'s
  latent mean; ``vae.decode(latents)``), tested in ``tests/transforms/video/test_vae_stream.py``.

Several sessions share a call when their chunks have the same shape and they are at the same
phase (all on their first chunk, or none): their caches are stacked along the batch and split back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

#: One causal convolution's cached frames: nothing yet, Wan's "Rep" marker, or a tensor.
CacheEntry = torch.Tensor | str | None

FRAMES_PER_LATENT = 4


@dataclass(slots=True)
class VAEStreamState:
    """One session's causal VAE caches and how far its streams have got."""

    encoder_cache: list[CacheEntry] = field(default_factory=list)
    decoder_cache: list[CacheEntry] = field(default_factory=list)
    frames_encoded: int = 0
    latents_decoded: int = 0


def new_stream_state(vae: Any) -> VAEStreamState:
    """Empty caches, one entry per causal convolution of the encoder and the decoder."""
    if vae.config.patch_size is not None:
        raise ValueError("streaming supports Wan 2.1's VAE (no patchified input)")
    return VAEStreamState(
        encoder_cache=[None] * _causal_convs(vae.encoder),
        decoder_cache=[None] * _causal_convs(vae.decoder),
    )


def _causal_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def encode_chunk(vae: Any, frames: torch.Tensor, states: Sequence[VAEStreamState]) -> torch.Tensor:
    """Latent means of the next ``frames`` ``(sessions, 3, T, H, W)`` in [-1, 1], one row per
    state; ``T`` is ``1 + 4k`` on a session's first chunk, ``4k`` after."""
    first = _same_phase([s.frames_encoded == 0 for s in states], frames.shape[0])
    count = frames.shape[2]
    groups = _frame_groups(count, first)
    cache = _stack_caches([s.encoder_cache for s in states])
    pieces = []
    for start, stop in groups:
        pieces.append(vae.encoder(frames[:, :, start:stop], feat_cache=cache, feat_idx=[0]))
    _split_caches(cache, [s.encoder_cache for s in states])
    for state in states:
        state.frames_encoded += count
    moments = vae.quant_conv(torch.cat(pieces, dim=2))
    return moments[:, : vae.config.z_dim]  # type: ignore[no-any-return]


def decode_chunk(vae: Any, latents: torch.Tensor, states: Sequence[VAEStreamState]) -> torch.Tensor:
    """Frames in [-1, 1] of the next ``latents`` ``(sessions, z, t, h, w)``: ``1 + 4(t - 1)``
    frames on a session's first chunk, ``4t`` after."""
    first = _same_phase([s.latents_decoded == 0 for s in states], latents.shape[0])
    cache = _stack_caches([s.decoder_cache for s in states])
    x = vae.post_quant_conv(latents)
    pieces = []
    for index in range(x.shape[2]):
        piece = x[:, :, index : index + 1]
        opening = first and index == 0
        pieces.append(vae.decoder(piece, feat_cache=cache, feat_idx=[0], first_chunk=opening))
    _split_caches(cache, [s.decoder_cache for s in states])
    for state in states:
        state.latents_decoded += latents.shape[2]
    return torch.clamp(torch.cat(pieces, dim=2), -1.0, 1.0)


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents to the transformer's scale: ``(z - mean) / std`` per channel (Wan's pipeline)."""
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The transformer's latents back to the VAE's scale: ``z * std + mean``."""
    mean, std = _latent_stats(vae, latents)
    return latents * std + mean


def _latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype)
    return mean.view(shape), std.view(shape)


def _same_phase(firsts: Sequence[bool], rows: int) -> bool:
    if rows != len(firsts):
        raise ValueError("one row per session state")
    if len(set(firsts)) != 1:
        raise ValueError("sessions on their first chunk cannot share a call with later ones")
    return firsts[0]


def _frame_groups(count: int, first: bool) -> list[tuple[int, int]]:
    """The encoder's frame groups: the first frame alone on a first chunk, then fours."""
    start = 1 if first else 0
    if count < start or (count - start) % FRAMES_PER_LATENT:
        rule = "1 + 4k" if first else "4k"
        raise ValueError(f"a {'first ' if first else ''}chunk needs {rule} frames, got {count}")
    groups = [(0, 1)] if first else []
    groups += [(s, s + FRAMES_PER_LATENT) for s in range(start, count, FRAMES_PER_LATENT)]
    return groups


def _stack_caches(caches: Sequence[list[CacheEntry]]) -> list[CacheEntry]:
    """The sessions' caches as one batch: tensors concatenated along the batch, markers shared."""
    stacked: list[CacheEntry] = []
    for entries in zip(*caches, strict=True):
        tensors = [e for e in entries if isinstance(e, torch.Tensor)]
        if len(tensors) == len(entries):
            stacked.append(torch.cat(tensors))
        elif not tensors and len(set(entries)) == 1:
            stacked.append(entries[0])
        else:
            raise ValueError("sessions at different points of their streams cannot share a call")
    return stacked


def _split_caches(stacked: list[CacheEntry], caches: Sequence[list[CacheEntry]]) -> None:
    """Hand each session back its row of every cached tensor (in place)."""
    for index, entry in enumerate(stacked):
        rows: list[CacheEntry] = [entry] * len(caches)
        if isinstance(entry, torch.Tensor):
            rows = [entry[row : row + 1] for row in range(entry.shape[0])]
        for cache, row in zip(caches, rows, strict=True):
            cache[index] = row
