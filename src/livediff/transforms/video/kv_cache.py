"""One session's rolling self-attention cache for block-causal generation.

Invariants (each method keeps them):

* ``keys[i]`` / ``values[i]`` hold, for transformer block ``i``, the self-attention keys and values
  of every cached frame, shape ``(1, frames * frame_tokens, heads, head_dim)``, oldest first.
  Keys are stored after ``norm_k`` and after RoPE at the frame's *absolute* position, so a cached
  key never needs recomputing however the window moves.
* ``chunks`` lists the cached chunks as ``(first absolute frame, frames)``, oldest first; every
  block's tensors hold exactly these frames, in this order.
* With ``keep_sink``, the first chunk ever written (the sink) stays at ``chunks[0]`` for the life
  of the cache; it is never evicted.
* After every write the cache holds at most ``max_frames`` frames: a write evicts whole chunks,
  the oldest non-sink first, until the new chunk fits.
* ``next_frame`` is the absolute position of the next chunk's first frame; it only grows.

A chunk *reads* the cache as it is before its own write (all of it) plus itself; the write then
evicts. So every pass over one chunk (its denoising steps and the write) sees the same context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class WritePlan:
    """What one write does: the token range of cached frames it drops, and the chunks left."""

    frames: int
    evict_start: int
    evict_stop: int
    chunks_after: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class KVCache:
    """A session's self-attention keys and values from earlier chunks (see the module doc)."""

    num_layers: int
    frame_tokens: int
    max_frames: int
    keep_sink: bool = True
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)
    next_frame: int = 0
    pending: WritePlan | None = None

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.frame_tokens < 1:
            raise ValueError("max_frames and frame_tokens must be positive")
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def cached_frames(self) -> int:
        """Frames the cache holds now (sinks included)."""
        return sum(frames for _, frames in self.chunks)

    @property
    def cached_tokens(self) -> int:
        """Tokens per block the cache holds now."""
        return self.cached_frames * self.frame_tokens

    def positions(self) -> list[int]:
        """The absolute frame positions of the cached frames, oldest first."""
        return [start + offset for start, frames in self.chunks for offset in range(frames)]

    def reset(self) -> None:
        """Forget everything: the next chunk starts at frame 0 and becomes the sink."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.chunks = []
        self.next_frame = 0
        self.pending = None

    def plan_write(self, frames: int) -> WritePlan:
        """Which chunks a write of ``frames`` new frames evicts (the oldest non-sink first)."""
        kept = [*self.chunks, (self.next_frame, frames)]
        protected = 1 if self.keep_sink else 0
        evicted = 0
        while sum(f for _, f in kept) > self.max_frames:
            if len(kept) <= protected + 1:
                raise ValueError(
                    f"a chunk of {frames} frames does not fit a cache of {self.max_frames} "
                    f"frames beside its {self.cached_frames if protected else 0} sink frames"
                )
            evicted += kept.pop(protected)[1]
        sink_frames = self.chunks[0][1] if (self.keep_sink and self.chunks) else 0
        start = sink_frames * self.frame_tokens
        return WritePlan(frames, start, start + evicted * self.frame_tokens, tuple(kept))

    def begin_write(self, frames: int) -> None:
        """Plan a write of the next chunk; :meth:`store` then takes each block's keys/values."""
        if self.pending is not None:
            raise RuntimeError("a write is already in progress")
        self.pending = self.plan_write(frames)

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one block's new keys/values (``(1, tokens, heads, dim)``), evicting as planned."""
        plan = self.pending
        if plan is None:
            raise RuntimeError("store() outside begin_write()/commit()")
        if keys.shape[1] != plan.frames * self.frame_tokens:
            raise ValueError(f"expected {plan.frames * self.frame_tokens} tokens, got {keys.shape}")
        self.keys[layer] = _append(self.keys[layer], keys, plan)
        self.values[layer] = _append(self.values[layer], values, plan)

    def commit(self) -> None:
        """Finish the write: every block has stored; the bookkeeping moves on by one chunk."""
        plan = self.pending
        if plan is None:
            raise RuntimeError("commit() without begin_write()")
        self.pending = None
        self.chunks = list(plan.chunks_after)
        self.next_frame += plan.frames
        expected = self.cached_tokens
        for layer_keys in self.keys:
            if layer_keys is None or layer_keys.shape[1] != expected:
                raise RuntimeError("a block did not store its keys in this write")

    def abort(self) -> None:
        """Drop a write that failed midway: the cache is unusable, so it starts over."""
        self.reset()


def _append(old: torch.Tensor | None, new: torch.Tensor, plan: WritePlan) -> torch.Tensor:
    if old is None:
        return new
    kept = (old[:, : plan.evict_start], old[:, plan.evict_stop :], new)
    return torch.cat([part for part in kept if part.shape[1]], dim=1)
