"""One session's rolling self-attention cache for block-causal generation, in preallocated buffers.

Layout: for transformer block ``i``, ``keys[i]`` / ``values[i]`` are one buffer each,
``(1, capacity * frame_tokens, heads, head_dim)``, allocated at the first chunk (when the dtype,
device and heads are known) with room for ``max_frames`` cached frames plus that chunk, and then
written in place. The buffer is a row of *frame slots*; a cached frame lives in one slot for its
whole life. A chunk's own keys/values are *staged* in the lowest free slots on every pass over
it, so the chunk attends to one view of the buffer, ``[0, span)`` (its cached frames and itself),
with no concatenation; its write keeps those slots, and the slots of the chunks it evicts become
the next chunk's. Attention does not depend on the order of the keys (RoPE is applied per key),
so slots need no order. With chunks of one size (the sink aside) the view has no holes: no mask,
and the same shape every chunk once the cache is full. Only mixed chunk sizes leave holes, which
a mask covers.

Invariants (each method keeps them):

* ``layout.chunks`` lists the cached chunks oldest first, each with its absolute first position,
  frame count and slots; no two frames share a slot. A slot no chunk lists is scratch (a chunk's
  staged keys, or an evicted frame's).
* Keys are stored after ``norm_k`` and after RoPE at the frame's absolute position, so a cached
  key never changes while the window moves (only :meth:`KVCache.rebase` rotates it, together
  with its position).
* With ``keep_sink``, the first chunk ever written (the sink) stays first for the life of the
  cache; it is never evicted and never moves.
* After every write the cache holds at most ``max_frames`` frames: a write evicts whole chunks,
  the oldest non-sink first, until the new chunk fits.
* ``next_frame`` is the absolute position of the next chunk's first frame; it grows by each
  write, and drops only at a rebase, by the same offset as every non-sink position.
* The bookkeeping (``layout``: chunks and ``next_frame``) changes in one assignment.

A chunk *reads* the cache as it is before its own write (all of it) plus itself; the write then
evicts. So every pass over one chunk (its denoising steps and the write) sees the same context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class CachedChunk:
    """A chunk the cache holds: its first absolute position, frame count and buffer slots."""

    start: int
    frames: int
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """The cache's bookkeeping, replaced whole on every change."""

    chunks: tuple[CachedChunk, ...] = ()
    next_frame: int = 0

    def occupied(self) -> set[int]:
        return {slot for chunk in self.chunks for slot in chunk.slots}


@dataclass(frozen=True, slots=True)
class WritePlan:
    """What one write does: the slots the new chunk takes, and the chunks held after it."""

    frames: int
    slots: tuple[int, ...]
    chunks_after: tuple[CachedChunk, ...]


@dataclass(frozen=True, slots=True)
class Context:
    """What a chunk attends to: a view of the buffers over its cached frames and itself, and a
    ``(1, 1, 1, tokens)`` mask (True = attend) when the view has scratch slots in it."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None


@dataclass(slots=True)
class _Staging:
    """Where a chunk of ``frames`` goes in the buffer under ``layout`` (memo for its passes)."""

    layout: Layout
    frames: int
    slots: tuple[int, ...]
    span: int
    holes: bool
    mask: torch.Tensor | None = None


@dataclass(slots=True)
class KVCache:
    """A session's self-attention keys and values from earlier chunks (see the module doc)."""

    num_layers: int
    frame_tokens: int
    max_frames: int
    keep_sink: bool = True
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    layout: Layout = field(default_factory=Layout)
    pending: WritePlan | None = None
    stored: list[bool] = field(default_factory=list, init=False, repr=False)
    staging: _Staging | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.frame_tokens < 1:
            raise ValueError("max_frames and frame_tokens must be positive")
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """The cached chunks as ``(first absolute frame, frames)``, oldest first."""
        return [(chunk.start, chunk.frames) for chunk in self.layout.chunks]

    @property
    def next_frame(self) -> int:
        return self.layout.next_frame

    @next_frame.setter
    def next_frame(self, position: int) -> None:
        if self.pending is not None:
            raise RuntimeError("the next position cannot move during a write")
        self.layout = Layout(self.layout.chunks, position)

    @property
    def cached_frames(self) -> int:
        """Frames the cache holds now (sinks included)."""
        return sum(chunk.frames for chunk in self.layout.chunks)

    def positions(self) -> list[int]:
        """The absolute frame positions of the cached frames, oldest first."""
        return [c.start + offset for c in self.layout.chunks for offset in range(c.frames)]

    def cached_keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s cached keys and values, oldest frame first (a copy, for inspection:
        attention reads the buffers in place)."""
        keys, values = self.keys[layer], self.values[layer]
        slots = [slot for chunk in self.layout.chunks for slot in chunk.slots]
        if keys is None or values is None or not slots:
            raise RuntimeError(f"block {layer} holds no cached frames")
        return _gather(keys, slots, self.frame_tokens), _gather(values, slots, self.frame_tokens)

    def reset(self) -> None:
        """Forget everything: the next chunk starts at frame 0 and becomes the sink (the buffers
        stay allocated: every slot is scratch again)."""
        self.layout = Layout()
        self.pending = None
        self.staging = None

    def plan_write(self, frames: int) -> WritePlan:
        """Which chunks a write of ``frames`` new frames evicts (the oldest non-sink first) and
        which slots it takes (those its passes staged it in)."""
        slots = self._staging_for(frames).slots
        kept = [*self.layout.chunks, CachedChunk(self.next_frame, frames, slots)]
        protected = 1 if self.keep_sink else 0
        while sum(chunk.frames for chunk in kept) > self.max_frames:
            if len(kept) <= protected + 1:
                raise ValueError(
                    f"a chunk of {frames} frames does not fit a cache of {self.max_frames} "
                    f"frames beside its {self.cached_frames if protected else 0} sink frames"
                )
            kept.pop(protected)
        return WritePlan(frames, slots, tuple(kept))

    def begin_write(self, frames: int) -> None:
        """Plan a write of the next chunk; each block's :meth:`stage` then stores its part."""
        if self.pending is not None:
            raise RuntimeError("a write is already in progress")
        self.pending = self.plan_write(frames)
        self.stored = [False] * self.num_layers

    def stage(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Context:
        """Put block ``layer``'s keys/values of the chunk (``(1, tokens, heads, dim)``) in their
        slots and return what the chunk attends to. During a write this is the block's store."""
        if keys.shape[1] % self.frame_tokens or keys.shape != values.shape:
            raise ValueError(
                f"expected whole frames of {self.frame_tokens} tokens, got {keys.shape}"
            )
        staging = self._staging_for(keys.shape[1] // self.frame_tokens)
        if self.pending is not None and self.pending.slots != staging.slots:
            raise RuntimeError("the chunk's shape changed during its write")
        key_buffer = self._buffer(self.keys, layer, keys, staging.span)
        value_buffer = self._buffer(self.values, layer, values, staging.span)
        tokens = self.frame_tokens
        for first, (start, stop) in _runs(staging.slots):
            chunk_part = slice(first * tokens, (first + stop - start) * tokens)
            key_buffer[:, start * tokens : stop * tokens].copy_(keys[:, chunk_part])
            value_buffer[:, start * tokens : stop * tokens].copy_(values[:, chunk_part])
        if self.pending is not None:
            self.stored[layer] = True
        span = staging.span * tokens
        mask = self._mask(staging, keys.device) if staging.holes else None
        return Context(key_buffer[:, :span], value_buffer[:, :span], mask)

    def commit(self) -> None:
        """Finish the write: every block has stored; the bookkeeping moves on by one chunk."""
        plan = self.pending
        if plan is None:
            raise RuntimeError("commit() without begin_write()")
        self.pending = None
        if not all(self.stored):
            self.reset()
            raise RuntimeError("a block did not store its keys in this write")
        self.layout = Layout(plan.chunks_after, self.next_frame + plan.frames)

    def abort(self) -> None:
        """Drop a write that failed midway: the cache is unusable, so it starts over."""
        self.reset()

    def rebase_offset(self) -> int:
        """How far :meth:`rebase` moves the non-sink frames: down to right after the sink (to
        position 0 without a sink)."""
        chunks = self.layout.chunks
        sink = chunks[:1] if self.keep_sink else ()
        floor = sink[0].start + sink[0].frames if sink else 0
        movable = chunks[len(sink) :]
        return (movable[0].start if movable else self.next_frame) - floor

    def rebase(self, offset: int, rotate_back: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move every non-sink frame and ``next_frame`` down by ``offset`` positions.

        ``rotate_back`` turns keys RoPE'd at ``p`` into keys at ``p - offset`` (values carry no
        position). Invariant: afterwards each moved key equals the key its frame would have had
        at its new position, so attention between moved frames, and from later chunks to them,
        is unchanged; only their distance to the sink shrinks.
        """
        if self.pending is not None:
            raise RuntimeError("a rebase cannot happen during a write")
        if not 0 <= offset <= self.rebase_offset():
            raise ValueError(f"a rebase by {offset} frames would pass the sink or go negative")
        if offset == 0:
            return
        sink = self.layout.chunks[:1] if self.keep_sink else ()
        movable = self.layout.chunks[len(sink) :]
        runs = _runs(sorted(slot for chunk in movable for slot in chunk.slots))
        tokens = self.frame_tokens
        for buffer in (found for found in self.keys if found is not None):
            for _, (start, stop) in runs:
                part = buffer[:, start * tokens : stop * tokens]
                part.copy_(rotate_back(part))
        moved = tuple(CachedChunk(c.start - offset, c.frames, c.slots) for c in movable)
        self.layout = Layout((*sink, *moved), self.next_frame - offset)

    def _staging_for(self, frames: int) -> _Staging:
        """The lowest free slots for a chunk of ``frames`` and the span it attends over."""
        found = self.staging
        if found is not None and found.layout is self.layout and found.frames == frames:
            return found
        occupied = self.layout.occupied()
        free = (slot for slot in range(len(occupied) + frames) if slot not in occupied)
        slots = tuple(next(free) for _ in range(frames))
        span = max([*occupied, *slots]) + 1
        made = _Staging(self.layout, frames, slots, span, span > len(occupied) + frames)
        self.staging = made
        return made

    def _buffer(
        self, buffers: list[torch.Tensor | None], layer: int, new: torch.Tensor, span: int
    ) -> torch.Tensor:
        """Block ``layer``'s buffer, allocated at the first chunk (``max_frames`` plus that
        chunk's frames); grown (copied) only if a chunk larger than the first needs more."""
        found = buffers[layer]
        if found is not None and (found.dtype, found.device) != (new.dtype, new.device):
            raise RuntimeError(f"the cache holds {found.dtype} on {found.device}, not {new.dtype}")
        if found is not None and found.shape[1] >= span * self.frame_tokens:
            return found
        frames = self.max_frames + new.shape[1] // self.frame_tokens
        capacity = max(span, frames) * self.frame_tokens
        grown = new.new_zeros((1, capacity, *new.shape[2:]))
        if found is not None:
            grown[:, : found.shape[1]].copy_(found)
        buffers[layer] = grown
        return grown

    def _mask(self, staging: _Staging, device: torch.device) -> torch.Tensor:
        """True over the slots the chunk attends to (cached and staged), filled slice by slice on
        the device (no host-to-device copy); made once per chunk."""
        if staging.mask is None:
            tokens = self.frame_tokens
            mask = torch.zeros((1, 1, 1, staging.span * tokens), dtype=torch.bool, device=device)
            valid = sorted([*staging.layout.occupied(), *staging.slots])
            for _, (start, stop) in _runs(valid):
                mask[..., start * tokens : stop * tokens] = True
            staging.mask = mask
        return staging.mask


def _runs(slots: tuple[int, ...] | list[int]) -> list[tuple[int, tuple[int, int]]]:
    """Consecutive runs of ``slots``: ``(index in slots of the run's first, (first, stop))``."""
    runs: list[tuple[int, tuple[int, int]]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][1][1] == slot:
            runs[-1] = (runs[-1][0], (runs[-1][1][0], slot + 1))
        else:
            runs.append((index, (slot, slot + 1)))
    return runs


def _gather(buffer: torch.Tensor, slots: list[int], tokens: int) -> torch.Tensor:
    parts = [buffer[:, start * tokens : stop * tokens] for _, (start, stop) in _runs(slots)]
    return torch.cat(parts, dim=1)
