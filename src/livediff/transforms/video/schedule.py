"""The few-step distilled denoising of one chunk (flow matching, as Wan and Self-Forcing use it).

Conventions (Wan's rectified flow, timesteps in [0, 1000], sigma = timestep / 1000):

* noising: ``x_t = (1 - sigma) * x0 + sigma * noise``;
* the model predicts the flow (velocity) ``noise - x0``, so ``x0 = x_t - sigma * flow``;
* a distilled model is trained on a short ``denoising_step_list`` (e.g. ``[1000, 750, 500, 250]``)
  warped by the scheduler's shift (Self-Forcing's ``warp_denoising_step``, shift 5):
  ``t -> 1000 * shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000``;
* video-to-video: the input chunk's latents are noised to the first step's level (or to
  ``noise_scale``, which then replaces the steps at or above it), then denoised step by step, each
  step predicting ``x0`` and re-noising it with fresh noise to the next level;
* the cache is written once per chunk, by one of two rules (``cache_write``):
  ``"clean"``, the chunk's *clean* result in an extra pass at ``context_timestep`` (0 by default):
  Self-Forcing's rule (its ``context_noise``), the context the distilled models were trained to
  read; or ``"last_step"``, the last denoising step's own pass (its input ``x_t`` at its
  timestep) writes: StreamDiffusionV2's, one transformer pass fewer per chunk, but the cached keys
  are those of a partly noised chunk.

Invariant: whatever the rule, every pass over a chunk reads the cache as it was before the
chunk's write, and :class:`GeneratedChunk` records exactly the input and timestep that wrote it
(so a re-cache under a new prompt rewrites the same thing).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from livediff.transforms.video.causal import forward_chunk
from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.params import CacheWrite

#: ``(x_t, timestep (B,)) -> flow``: one model call over a batch of chunks.
FlowModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_TRAIN_TIMESTEPS = 1000


def warp_timestep(step: float, shift: float) -> float:
    """The scheduler's shifted timestep for a raw step in [0, 1000] (shift 1: unchanged)."""
    s = step / NUM_TRAIN_TIMESTEPS
    return NUM_TRAIN_TIMESTEPS * shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True, slots=True)
class ChunkSchedule:
    """A distilled model's step list (raw, descending, each in (0, 1000]) and how it is used."""

    denoising_step_list: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    warp: bool = True
    context_timestep: float = 0.0

    def __post_init__(self) -> None:
        steps = self.denoising_step_list
        if not steps or any(not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps):
            raise ValueError("denoising steps must lie in (0, 1000]")
        if any(a <= b for a, b in itertools.pairwise(steps)):
            raise ValueError("denoising steps must be strictly descending")

    def timesteps(self, noise_scale: float | None = None) -> list[float]:
        """The model timesteps of one chunk, descending. With ``noise_scale`` in (0, 1], the
        chunk starts at ``1000 * noise_scale`` and continues with the steps below it."""
        warped = [
            warp_timestep(s, self.shift) if self.warp else s for s in self.denoising_step_list
        ]
        if noise_scale is None:
            return warped
        if not 0 < noise_scale <= 1:
            raise ValueError("noise_scale must lie in (0, 1]")
        start = NUM_TRAIN_TIMESTEPS * noise_scale
        return [start, *(t for t in warped if t < start)]


def _sigma(timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = timestep.to(device=like.device, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``, one timestep per row."""
    sigma = _sigma(timestep, x0)
    return ((1 - sigma) * x0.float() + sigma * noise.float()).type_as(x0)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The clean sample a flow prediction implies: ``x_t - sigma * flow``, one timestep per row."""
    return (x_t.float() - _sigma(timestep, x_t) * flow.float()).type_as(x_t)


def session_noise(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Gaussian noise shaped like ``like``, row ``i`` drawn from ``generators[i]`` (so a session's
    noise does not depend on which sessions share its batch)."""
    rows = [
        torch.randn(like.shape[1:], generator=g, device=like.device, dtype=torch.float32)
        for g in generators
    ]
    return torch.stack(rows).to(like.dtype)


@dataclass(frozen=True, slots=True)
class Denoised:
    """A denoising's clean result, and the last step's input and timestep ``(B,)``."""

    x0: torch.Tensor
    last_input: torch.Tensor
    last_timestep: torch.Tensor


def denoise(
    model: FlowModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    generators: Sequence[torch.Generator],
    last_model: FlowModel | None = None,
) -> Denoised:
    """Noise ``latents`` to the first level and denoise through ``timesteps`` ``(steps, B)``
    (descending per row), the last step calling ``last_model`` when given."""
    if timesteps.ndim != 2 or timesteps.shape[1] != latents.shape[0]:
        raise ValueError("timesteps must be (steps, sessions)")
    x_t = add_noise(latents, session_noise(latents, generators), timesteps[0])
    last = len(timesteps) - 1
    for index, timestep in enumerate(timesteps):
        step_model = last_model if index == last and last_model is not None else model
        x0 = flow_to_x0(x_t, step_model(x_t, timestep), timestep)
        if index < last:
            x_t = add_noise(x0, session_noise(x0, generators), timesteps[index + 1])
    return Denoised(x0, x_t, timesteps[last])


@dataclass(frozen=True, slots=True)
class GeneratedChunk:
    """A chunk's clean latents, and what was written into the caches: ``cached`` at
    ``cached_timestep`` ``(B,)`` (the clean latents at the context timestep, or the last
    step's input at its timestep)."""

    x0: torch.Tensor
    cached: torch.Tensor
    cached_timestep: torch.Tensor


def generate_chunk(
    model: object,
    latents: torch.Tensor,
    text: torch.Tensor,
    caches: Sequence[KVCache],
    *,
    timesteps: torch.Tensor,
    generators: Sequence[torch.Generator],
    context_timestep: float = 0.0,
    cache_write: CacheWrite = "clean",
) -> GeneratedChunk:
    """Restyle one chunk per session: denoise it reading each session's cache, and write it into
    the caches by ``cache_write``: ``"clean"``, one more pass over the clean result at
    ``context_timestep``; ``"last_step"``, the last denoising step's pass itself."""

    def flow(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return forward_chunk(model, x_t, timestep, text, caches, write=False)

    def flow_and_write(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return forward_chunk(model, x_t, timestep, text, caches, write=True)

    if cache_write == "last_step":
        done = denoise(flow, latents, timesteps, generators, last_model=flow_and_write)
        return GeneratedChunk(done.x0, done.last_input, done.last_timestep)
    if cache_write != "clean":
        raise ValueError(f"cache_write must be 'clean' or 'last_step', not {cache_write!r}")
    x0 = denoise(flow, latents, timesteps, generators).x0
    context = torch.full((len(caches),), context_timestep, device=x0.device)
    forward_chunk(model, x0, context, text, caches, write=True)
    return GeneratedChunk(x0, x0, context)


def stack_timesteps(per_session: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Sessions' step lists as ``(steps, sessions)``; they must have the same number of steps."""
    if len({len(steps) for steps in per_session}) != 1:
        raise ValueError("sessions batched together need the same number of steps")
    return torch.tensor([list(s) for s in per_session], device=device, dtype=torch.float32).T
