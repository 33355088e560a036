"""The shape plan: every UNet and VAE call runs at one of a few planned batch sizes.

A live server's batch changes whenever a session joins or leaves, changes its step count or its
CFG type. Compiled code (``torch.compile``, CUDA graphs) is specialised to shapes, and a new
shape means a recompile that freezes every stream (under max-autotune, minutes on a GPU). So
calls are padded up to a *bucket* (``Settings.batch_buckets``, e.g. 1, 2, 4, 8 rows), and a
batch larger than the largest bucket runs in pieces of that size. Each bucket compiles, and
records its CUDA graph, at load (:meth:`PaddedCall.precompile`); serving only picks one.

CUDA graphs (cudagraph trees, under ``reduce-overhead`` and ``max-autotune``) run a function's
first call as a warm-up and record on the second, so each bucket runs twice at load, each time
as a new step (``cudagraph_mark_step_begin``). What a call returns is copied out of the graph's
buffers at once (:meth:`PaddedCall._ours`), so no graph's output is alive when the next compiled
call starts: every graph is a root of the tree, recorded once per bucket, and any order of
encode, UNet and decode buckets a batch takes replays graphs recorded at load.

cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is on only while the buckets are planned
(:func:`cudnn_autotuning`): with it on, every convolution shape not seen before is timed
again, which in eager code (any batch size) would stall a batch whenever a session joins.

The padded inputs are kept in static buffers, one per bucket and input: CUDA graphs replay from
fixed addresses, so the rows are copied into the same tensors call after call (and marked as
static addresses for the graph), instead of fresh tensors that the graph would copy again.
Padding rows are independent samples (no op mixes rows: group norm and attention work per
sample), so they never change the real rows; their results are dropped. Padding rows hold zeros
(a new buffer) or the rows of an earlier call, never read back.

A module planned after load (a ControlNet a session adds) is compiled as the UNet was
(:func:`compiled`: the same backend and mode, static shapes) and planned in the same buckets.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

Forward = Callable[..., Any]
#: Runs of each bucket at load: cudagraph trees warm a function up on its first call and
#: record its graph on the second.
PLANNING_RUNS = 2


@contextmanager
def cudnn_autotuning() -> Iterator[None]:
    """cuDNN's autotuner on for the block (the planned shapes are timed and their choices
    cached), off after it: other shapes take cuDNN's heuristics instead of a timing run."""
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


class PaddedCall:
    """``forward(*inputs)`` on inputs whose first dimension is padded to a planned bucket."""

    def __init__(
        self,
        forward: Forward,
        buckets: Sequence[int] | None,
        *,
        static_buffers: bool,
        name: str,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        """``buckets`` None: no plan (eager code runs any shape as well as another), calls
        pass straight through. ``memory_format``: the 4-D inputs are put in it first (compiled
        code guards on strides, and rows gathered from a batch keep their source's layout)."""
        self.forward = forward
        self.buckets = sorted(set(buckets or ()))
        self.static_buffers = static_buffers
        self.name = name
        self.memory_format = memory_format
        self._buffers: dict[tuple[object, ...], torch.Tensor] = {}

    def bucket(self, rows: int) -> int:
        """The smallest planned size that holds ``rows`` (at most the largest bucket)."""
        index = bisect.bisect_left(self.buckets, min(rows, self.buckets[-1]))
        return self.buckets[index]

    def pieces(self, rows: int) -> list[tuple[int, int]]:
        """(start, stop) of the pieces a batch of ``rows`` runs in."""
        largest = self.buckets[-1]
        return [(start, min(start + largest, rows)) for start in range(0, rows, largest)]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """The forward's output (a tensor, or a tuple of tensors) for the real rows only."""
        if self.memory_format is not None:
            inputs = tuple(self._in_format(tensor) for tensor in inputs)
        if not self.buckets:
            return self.forward(*inputs)
        rows = inputs[0].shape[0]
        pieces = []
        for start, stop in self.pieces(rows):
            size = self.bucket(stop - start)
            padded = [self._padded(slot, t[start:stop], size) for slot, t in enumerate(inputs)]
            pieces.append(self._ours(self.forward(*padded), stop - start))
        if len(pieces) == 1:
            return pieces[0]
        if isinstance(pieces[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))
        return torch.cat(pieces)

    def _in_format(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 4 or self.memory_format is None:
            return tensor
        return tensor.contiguous(memory_format=self.memory_format)

    def _ours(self, result: Any, count: int) -> Any:
        """The first ``count`` rows of ``result``; copied when a graph's outputs are reused
        buffers (its next replay overwrites them)."""
        if isinstance(result, tuple):
            return tuple(self._ours(part, count) for part in result)
        rows = result[:count]
        return rows.clone() if self.static_buffers else rows

    def _padded(self, slot: int, rows: torch.Tensor, size: int) -> torch.Tensor:
        count = rows.shape[0]
        if count == size and not self.static_buffers:
            return rows
        key = (slot, size, tuple(rows.shape[1:]), rows.dtype, rows.device, _layout(rows))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _new_buffer(rows, size)
            if self.static_buffers:
                torch._dynamo.mark_static_address(buffer)
        buffer[:count].copy_(rows)
        return buffer

    def precompile(self, *examples: torch.Tensor) -> None:
        """Run every bucket :data:`PLANNING_RUNS` times with inputs shaped like ``examples``
        (one row each), each run a new CUDA-graph step: the compile, the autotuning, the
        warm-up and the CUDA graph recording of each bucket happen now."""
        for size in self.buckets:
            inputs = [
                example[:1]
                .expand(size, *example.shape[1:])
                .contiguous(memory_format=_layout(example))
                for example in examples
            ]
            for _ in range(PLANNING_RUNS):
                if self.static_buffers:  # CUDA graphs: a new step, as each served batch is
                    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
                self(*inputs)


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _new_buffer(rows: torch.Tensor, size: int) -> torch.Tensor:
    shape = (size, *rows.shape[1:])
    return torch.zeros(shape, dtype=rows.dtype, device=rows.device).contiguous(
        memory_format=_layout(rows)
    )
