"""Wan's 3-D RoPE for the causal path: cached fp32 tables, rotary at positions, re-basing.

Wan splits each head's ``head_dim`` into a time, a row and a column part (``rope.t_dim``,
``h_dim``, ``w_dim``) and rotates interleaved pairs of each part by ``angle * position`` along its
axis; the angles are the model's own ``rope.freqs_cos`` / ``freqs_sin`` rows (``max_seq_len`` of
them). Here those rows are kept once per rope module and device, as float32:

* the *time* table ``(max_seq_len, t_dim)``, indexed by a frame's absolute position;
* a *grid* table ``(rows * columns, h_dim + w_dim)`` per latent grid, the same for every frame.

:func:`rotary` assembles ``(cos, sin)`` for frames at given positions from slices of these (no
index tensor, so no host-to-device copy) and remembers the last few results, so the passes over
one chunk (its denoising steps and its cache write) build it once. Invariant: the result equals,
bit for bit, what the rope module's own ``forward`` gives for those frames (cast to float32).

:func:`shift_rotation` is the rotation that moves a key stored after RoPE at position ``p`` to
``p - offset``: rotations of one pair compose by adding angles, so rotating the time part by
``-offset`` (and the row/column parts by nothing) is the same as having applied RoPE at
``p - offset``. Values carry no RoPE and never move.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Rotary = tuple[torch.Tensor, torch.Tensor]

#: Assembled rotaries remembered per rope module (a few chunks' worth: sessions batched
#: differently from one call to the next each have their own).
ROTARY_MEMORY = 8


@dataclass(slots=True)
class _Tables:
    """One rope module's float32 tables on one device, and the rotaries last built from them."""

    device: torch.device
    time_cos: torch.Tensor
    time_sin: torch.Tensor
    grids: dict[tuple[int, int], Rotary] = field(default_factory=dict)
    built: OrderedDict[tuple[Any, ...], Rotary] = field(default_factory=OrderedDict)


_tables: weakref.WeakKeyDictionary[Any, _Tables] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate ``x`` ``(batch, tokens, heads, dim)`` by Wan's interleaved-pair RoPE (in float32)."""
    cos, sin = rotary[0][..., 0::2], rotary[1][..., 1::2]
    x1, x2 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def rotary(rope: Any, positions: Sequence[Sequence[int]], rows: int, columns: int) -> Rotary:
    """Wan's RoPE ``(cos, sin)`` for frames at the given absolute positions (one row of
    positions per session) on a ``rows`` x ``columns`` token grid: float32
    ``(sessions, frames * rows * columns, 1, head_dim)``, frame-major like Wan's tokens."""
    key = (tuple(tuple(row) for row in positions), rows, columns)
    if not key[0] or len({len(row) for row in key[0]}) != 1 or not key[0][0]:
        raise ValueError("every session needs the same, non-zero number of frame positions")
    top = max(max(row) for row in key[0])
    if top >= rope.max_seq_len or min(min(row) for row in key[0]) < 0:
        raise ValueError(f"frame position {top} is past the RoPE table ({rope.max_seq_len})")
    tables = _tables_of(rope)
    with _tables_lock:
        found = tables.built.get(key)
        if found is not None:
            tables.built.move_to_end(key)
            return found
    made = _assemble(rope, tables, key[0], rows, columns)
    with _tables_lock:
        tables.built[key] = made
        while len(tables.built) > ROTARY_MEMORY:
            tables.built.popitem(last=False)
    return made


def shift_rotation(rope: Any, offset: int) -> Rotary:
    """``(cos, sin)`` ``(1, 1, 1, head_dim)`` that turn a key RoPE'd at ``p`` into the key at
    ``p - offset``: the time part rotated by ``-offset`` frames, the row/column parts unchanged."""
    if not 0 <= offset < rope.max_seq_len:
        raise ValueError(f"a shift of {offset} frames is outside the RoPE table")
    tables = _tables_of(rope)
    unchanged = rope.attention_head_dim - rope.t_dim
    ones = torch.ones(unchanged, device=tables.device)
    cos = torch.cat((tables.time_cos[offset], ones))
    sin = torch.cat((-tables.time_sin[offset], torch.zeros_like(ones)))  # sin(-a) = -sin(a)
    return cos.view(1, 1, 1, -1), sin.view(1, 1, 1, -1)


def _tables_of(rope: Any) -> _Tables:
    """The rope module's cached tables, (re)built when missing or when the module moved."""
    device = rope.freqs_cos.device
    with _tables_lock:
        found = _tables.get(rope)
        if found is not None and found.device == device:
            return found
    cos, sin = (table[:, : rope.t_dim].float() for table in (rope.freqs_cos, rope.freqs_sin))
    made = _Tables(device, cos.contiguous(), sin.contiguous())
    with _tables_lock:
        _tables[rope] = made
    return made


def _grid(rope: Any, tables: _Tables, rows: int, columns: int) -> Rotary:
    """The row/column part of every token of one frame, ``(rows * columns, h_dim + w_dim)``."""
    with _tables_lock:
        found = tables.grids.get((rows, columns))
    if found is not None:
        return found
    t_dim, h_dim = rope.t_dim, rope.h_dim

    def spread(table: torch.Tensor) -> torch.Tensor:
        along_rows = table[:rows, t_dim : t_dim + h_dim].float().view(rows, 1, h_dim)
        along_columns = table[:columns, t_dim + h_dim :].float().view(1, columns, -1)
        both = (along_rows.expand(rows, columns, -1), along_columns.expand(rows, columns, -1))
        return torch.cat(both, dim=-1).reshape(rows * columns, -1)

    made = (spread(rope.freqs_cos), spread(rope.freqs_sin))
    with _tables_lock:
        tables.grids[(rows, columns)] = made
    return made


def _assemble(
    rope: Any, tables: _Tables, positions: tuple[tuple[int, ...], ...], rows: int, columns: int
) -> Rotary:
    grid = _grid(rope, tables, rows, columns)
    tokens = rows * columns

    def build(time_table: torch.Tensor, grid_table: torch.Tensor) -> torch.Tensor:
        times = torch.stack([_rows_at(time_table, row) for row in positions])
        frames = times.shape[1]
        per_token = times.unsqueeze(2).expand(-1, -1, tokens, -1)
        spatial = grid_table.view(1, 1, tokens, -1).expand(len(positions), frames, -1, -1)
        return torch.cat((per_token, spatial), dim=-1).flatten(1, 2).unsqueeze(2)

    return build(tables.time_cos, grid[0]), build(tables.time_sin, grid[1])


def _rows_at(table: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """``table``'s rows at ``positions``, as slices of its consecutive runs (no index tensor)."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][1] == position:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    parts = [table[start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
