"""Block-causal generation on diffusers' ``WanTransformer3DModel`` weights.

The model's own modules do the work: its patch embedding, time/text embedder, RoPE tables,
transformer blocks (norms, modulation, cross-attention to the text, feed-forward) and output
head. Only the blocks' *self-attention* is replaced, for the duration of one call, by
:class:`_CausalSelfAttention`, which attends either

* to a per-session :class:`~livediff.transforms.video.kv_cache.KVCache` of earlier chunks plus the
  chunk itself (:func:`forward_chunk`, the streaming path), or
* under an explicit boolean mask over the whole sequence (:func:`forward_block_causal`, the
  one-pass reference: each chunk sees its window of earlier chunks and itself).

Invariants:

* Tokens are frame-major (frame, row, column), as Wan's patch embedding flattens them; the
  temporal patch size is 1, so one latent frame is ``frame_tokens`` tokens.
* RoPE is applied at each frame's absolute position (``KVCache.next_frame`` onwards; tables
  from :mod:`.rope`); keys are cached after RoPE. Attention logits depend only on position
  differences, so a chunk's output depends on *which* frames it sees and their positions, never
  on how they were batched, nor on where in the cache's buffers their keys sit.
* Streaming chunk by chunk equals :func:`forward_block_causal` with the same chunk sizes, cache
  bound and sink rule (``tests/transforms/video/test_causal.py``).
* Several sessions run in one call when their chunks have the same shape; each reads and writes
  only its own cache: the projections, norms and feed-forward are batched, and each session's
  attention reads its own cache's buffers in place (no padding, no copy of the context).
* :func:`rebase_cache` moves a long stream's non-sink frames back to just after the sink before
  the RoPE table ends, rotating their cached keys by the same offset (:mod:`.rope`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.rope import Rotary, apply_rotary, rotary, shift_rotation


def frame_tokens(model: Any, height: int, width: int) -> int:
    """Tokens per latent frame of ``height`` x ``width`` latents (Wan: 2x2 patches)."""
    p_t, p_h, p_w = model.config.patch_size
    if p_t != 1:
        raise ValueError("block-causal generation needs a temporal patch size of 1")
    if height % p_h or width % p_w:
        raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size")
    return int((height // p_h) * (width // p_w))


def new_cache(
    model: Any, height: int, width: int, max_frames: int, keep_sink: bool = True
) -> KVCache:
    """An empty cache for one session generating ``height`` x ``width`` latent frames."""
    return KVCache(
        num_layers=len(model.blocks),
        frame_tokens=frame_tokens(model, height, width),
        max_frames=max_frames,
        keep_sink=keep_sink,
    )


def rotary_at(model: Any, positions: Sequence[Sequence[int]], height: int, width: int) -> Rotary:
    """Wan's RoPE (cos, sin) for frames at the given absolute positions, one row per session:
    float32 ``(sessions, frames * frame_tokens, 1, dim)`` from the model's own ``rope`` table
    (kept in float32 on the device by :func:`.rope.rotary`; a position past it is refused)."""
    frame_tokens(model, height, width)  # refuses a size the patches do not divide
    _, p_h, p_w = model.config.patch_size
    return rotary(model.rope, positions, height // p_h, width // p_w)


def rebase_cache(model: Any, cache: KVCache) -> int:
    """Move ``cache``'s non-sink frames (and its next position) down to just after the sink,
    rotating their cached keys back by the same offset on Wan's time axis; returns the offset.

    Each moved key then equals the key at its new position, so what later chunks compute from
    the moved frames is unchanged; only the sink comes nearer (see ``KVCache.rebase``).
    """
    offset = cache.rebase_offset()

    @functools.cache
    def rotation() -> Rotary:  # built only if there are keys to move
        return shift_rotation(model.rope, offset)

    cache.rebase(offset, lambda keys: apply_rotary(keys, rotation()))
    return offset


@dataclass(slots=True)
class _Cached:
    """Attend to each session's cache plus the chunk (a cache in a write keeps the chunk)."""

    caches: Sequence[KVCache]


@dataclass(slots=True)
class _Masked:
    """Attend over the whole sequence under ``mask`` (``(tokens, tokens)``, True = may attend)."""

    mask: torch.Tensor


class _CausalSelfAttention:
    """A self-attention processor for one Wan block: Wan's projections, norms and output, our
    keys (cached or masked). Installed only inside :func:`_installed`."""

    def __init__(self, layer: int, mode: _Cached | _Masked, backend: Any) -> None:
        self.layer = layer
        self.mode = mode
        self.backend = backend

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Rotary | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or rotary_emb is None:
            raise RuntimeError("the causal processor serves self-attention with RoPE only")
        if getattr(attn, "fused_projections", False):
            raise RuntimeError("fused QKV projections are not supported by the causal path")
        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        query, key = apply_rotary(query, rotary_emb), apply_rotary(key, rotary_emb)
        if isinstance(self.mode, _Masked):
            out = self._attend(query, key, value, self.mode.mask)
        else:
            out = self._attend_cached(query, key, value, self.mode)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        out: torch.Tensor = dispatch_attention_fn(
            query, key, value, attn_mask=mask, backend=self.backend
        )
        return out

    def _attend_cached(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mode: _Cached
    ) -> torch.Tensor:
        """Each session's rows attend to its cache's buffers, where the chunk's own keys/values
        are staged first (and stay, on a write): no padding across sessions, no copy of the
        context; a mask only where mixed chunk sizes left scratch slots in the view."""
        outs = []
        for row, cache in enumerate(mode.caches):
            rows = slice(row, row + 1)
            context = cache.stage(self.layer, key[rows], value[rows])
            outs.append(self._attend(query[rows], context.keys, context.values, context.mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@contextmanager
def _installed(model: Any, mode: _Cached | _Masked) -> Iterator[None]:
    """Swap every block's self-attention processor for a causal one; restore them after."""
    originals = [block.attn1.processor for block in model.blocks]
    try:
        for layer, (block, original) in enumerate(zip(model.blocks, originals, strict=True)):
            backend = getattr(original, "_attention_backend", None)
            block.attn1.processor = _CausalSelfAttention(layer, mode, backend)
        yield
    finally:
        for block, original in zip(model.blocks, originals, strict=True):
            block.attn1.processor = original


def _embed(
    model: Any, timestep: torch.Tensor, text: torch.Tensor, tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's time and text embeddings: one timestep per row ``(B,)`` or per frame ``(B, F)``
    (then spread over each frame's tokens, the per-token form Wan's blocks accept)."""
    if timestep.ndim == 1:
        temb, proj, text_emb, _ = model.condition_embedder(timestep, text, None)
        return temb, proj.unflatten(1, (6, -1)), text_emb
    frames = timestep.shape[1]
    temb, proj, text_emb, _ = model.condition_embedder(
        timestep.flatten(), text, None, timestep_seq_len=frames
    )
    temb = temb.repeat_interleave(tokens, dim=1)
    proj = proj.repeat_interleave(tokens, dim=1).unflatten(2, (6, -1))
    return temb, proj, text_emb


def _head(model: Any, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Wan's output norm, modulation and projection (as its forward does them)."""
    table = model.scale_shift_table
    if temb.ndim == 3:
        shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    return model.proj_out(hidden)  # type: ignore[no-any-return]


def _unpatchify(model: Any, hidden: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    batch, _, frames, height, width = shape
    p_t, p_h, p_w = model.config.patch_size
    hidden = hidden.reshape(batch, frames, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _run(
    model: Any,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    *,
    rotary: Rotary,
    mode: _Cached | _Masked,
) -> torch.Tensor:
    """Wan's forward with causal self-attention: embed, blocks, head, unpatchify."""
    tokens = frame_tokens(model, latents.shape[3], latents.shape[4])
    hidden = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
    temb, proj, text_emb = _embed(model, timestep, text, tokens)
    rotary = (rotary[0].to(hidden.device), rotary[1].to(hidden.device))
    with _installed(model, mode):
        for block in model.blocks:
            hidden = block(hidden, text_emb, proj, rotary)
    return _unpatchify(model, _head(model, hidden, temb), latents.shape)


def forward_chunk(
    model: Any,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    caches: Sequence[KVCache],
    *,
    write: bool = False,
) -> torch.Tensor:
    """The model's output (Wan: the flow) for one chunk per session, attending to each session's
    cache and the chunk itself.

    ``latents`` ``(sessions, channels, frames, height, width)``, ``timestep`` ``(sessions,)``,
    ``text`` ``(sessions, text_tokens, text_dim)``; row ``i`` is ``caches[i]``'s session. Session
    ``i``'s frames sit at absolute positions ``caches[i].next_frame`` onwards. With ``write``, each
    block's keys/values of the chunk are stored in its session's cache (evicting as the cache's
    bound says) and the caches move on by one chunk; without, the caches are left as they were.
    """
    if latents.shape[0] != len(caches) or timestep.shape != (len(caches),):
        raise ValueError("one latent row and one timestep per cache")
    frames, height, width = latents.shape[2:]
    positions = [range(c.next_frame, c.next_frame + frames) for c in caches]
    rotary = rotary_at(model, positions, height, width)
    if not write:
        return _run(model, latents, timestep, text, rotary=rotary, mode=_Cached(caches))
    for cache in caches:
        cache.plan_write(frames)  # refuses a chunk that does not fit before any cache changes
    for cache in caches:
        cache.begin_write(frames)
    try:
        out = _run(model, latents, timestep, text, rotary=rotary, mode=_Cached(caches))
    except BaseException:
        for cache in caches:
            cache.abort()
        raise
    for cache in caches:
        cache.commit()
    return out


def chunk_windows(
    chunk_frames: Sequence[int], max_frames: int | None = None, keep_sink: bool = True
) -> list[list[int]]:
    """For each chunk, the earlier chunks it attends to under the cache rule (its own excluded).

    The rule, stated on chunk indices: a chunk sees what the cache held before it was written;
    after each write the oldest non-sink chunks leave until at most ``max_frames`` frames remain
    (no bound: every earlier chunk stays).
    """
    windows: list[list[int]] = []
    held: list[int] = []
    for index, _ in enumerate(chunk_frames):
        windows.append(list(held))
        held.append(index)
        first_evictable = 1 if keep_sink else 0
        while max_frames is not None and sum(chunk_frames[i] for i in held) > max_frames:
            if len(held) <= first_evictable + 1:
                raise ValueError("a chunk does not fit the cache beside the sink")
            held.pop(first_evictable)
    return windows


def block_causal_mask(
    chunk_frames: Sequence[int],
    tokens: int,
    max_frames: int | None = None,
    keep_sink: bool = True,
) -> torch.Tensor:
    """The boolean ``(tokens_total, tokens_total)`` mask (True = may attend) under which one pass
    over the whole sequence gives each chunk exactly what streaming with the cache gives it."""
    bounds = [0]
    for frames in chunk_frames:
        bounds.append(bounds[-1] + frames * tokens)
    mask = torch.zeros((bounds[-1], bounds[-1]), dtype=torch.bool)
    for index, window in enumerate(chunk_windows(chunk_frames, max_frames, keep_sink)):
        rows = slice(bounds[index], bounds[index + 1])
        for seen in [*window, index]:
            mask[rows, bounds[seen] : bounds[seen + 1]] = True
    return mask


def forward_block_causal(
    model: Any,
    latents: torch.Tensor,
    frame_timesteps: torch.Tensor,
    text: torch.Tensor,
    chunk_frames: Sequence[int],
    *,
    max_frames: int | None = None,
    keep_sink: bool = True,
    positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """The reference: one pass over ``latents`` ``(B, C, frames, H, W)`` split into chunks of
    ``chunk_frames``, each chunk attending to its window (:func:`chunk_windows`) and itself.

    ``frame_timesteps`` ``(B, frames)``; ``positions`` are the frames' absolute positions
    (default ``0..frames-1``), the same for every row.
    """
    frames, height, width = latents.shape[2:]
    if sum(chunk_frames) != frames or frame_timesteps.shape != (*latents.shape[:1], frames):
        raise ValueError("chunk sizes and per-frame timesteps must cover the latent frames")
    tokens = frame_tokens(model, height, width)
    mask = block_causal_mask(chunk_frames, tokens, max_frames, keep_sink).to(latents.device)
    where = list(range(frames)) if positions is None else list(positions)
    rotary = rotary_at(model, [where] * latents.shape[0], height, width)
    return _run(model, latents, frame_timesteps, text, rotary=rotary, mode=_Masked(mask))
