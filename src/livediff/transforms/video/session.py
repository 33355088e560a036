"""One video session's state: its input buffer, caches, noise, prompt and released frames.

Buffering (bounded, at the source rate):

* input frames arrive one per :meth:`VideoTransform.process` call; the session buffers them
  until it holds one chunk (``4k`` frames, the first chunk after a start or a reset
  ``1 + 4k``), then the chunk is computed in that same call. At most one chunk waits:
  beyond it (only after ``chunk_frames`` shrinks) the oldest frames are dropped, newest wins;
* while a chunk computes the worker is busy, so frames arriving meanwhile wait in the engine's
  input slot, where the newest replaces the older (counted as dropped by the engine);
* a decoded chunk's frames are released one per later input frame, so the output advances at
  the input's rate with a constant delay of one chunk; at most two chunks of output wait
  (the oldest dropped beyond, newest wins).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from livediff.frames import RgbArray, now
from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.params import NoiseController, VideoParams
from livediff.transforms.video.vae_stream import FRAMES_PER_LATENT, VAEStreamState


@dataclass(slots=True)
class ChunkStats:
    """What a session reports of its chunks (thread-safe: the worker writes, the API reads)."""

    chunks: int = 0
    last_chunk_ms: float = 0.0
    mean_chunk_ms: float = 0.0
    first_frame_ms: float | None = None
    frames_dropped: int = 0
    recaches: int = 0
    resets: int = 0
    noise_scale: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_chunk(self, seconds: float, noise_scale: float) -> None:
        with self.lock:
            self.chunks += 1
            self.last_chunk_ms = seconds * 1000
            self.mean_chunk_ms += (self.last_chunk_ms - self.mean_chunk_ms) / self.chunks
            self.noise_scale = noise_scale

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {
                "chunks": self.chunks,
                "chunk_latency_ms": round(self.last_chunk_ms, 2),
                "mean_chunk_latency_ms": round(self.mean_chunk_ms, 2),
                "first_frame_latency_ms": (
                    None if self.first_frame_ms is None else round(self.first_frame_ms, 2)
                ),
                "input_frames_dropped": self.frames_dropped,
                "recaches": self.recaches,
                "cache_resets": self.resets,
                "noise_scale": round(self.noise_scale, 4),
            }


@dataclass(frozen=True, slots=True)
class KeptChunk:
    """What wrote a chunk into the KV cache: the latents ``(1, C, F, h, w)`` and the timestep
    ``(1,)`` of that pass (the clean chunk at 0, or the last step's input at its timestep), so
    that a re-cache under a new prompt rewrites the chunk the same way."""

    latents: torch.Tensor
    timestep: torch.Tensor


@dataclass(slots=True)
class VideoSession:
    """A session's state (made by ``VideoTransform.open_session``)."""

    cache: KVCache
    vae: VAEStreamState
    generator: torch.Generator
    #: What wrote each chunk the KV cache keeps, by its first absolute frame (for re-caching).
    kept: dict[int, KeptChunk] = field(default_factory=dict)
    inputs: deque[torch.Tensor] = field(default_factory=deque)
    outputs: deque[RgbArray] = field(default_factory=deque)
    params: VideoParams | None = None
    prompt_key: tuple[tuple[str, float], ...] = ()
    layout: tuple[int, int, int] = (0, 0, 0)
    noise_scale: float | None = None
    last_frame: torch.Tensor | None = None
    opened_at: float = field(default_factory=now)
    first_input_at: float | None = None
    stats: ChunkStats = field(default_factory=ChunkStats)

    def chunk_inputs(self, chunk_frames: int) -> int:
        """Input frames of the next chunk: ``1 + 4k`` after a start or reset (``k + 1`` latent
        frames: the first frame makes one alone), else ``4k``. A chunk decodes to as many frames
        as it took, and the first one's ``1 + 4k`` release one per input frame until the next
        chunk's ``4k`` are in, so the output never stalls after the first frame."""
        first = 1 if self.vae.frames_encoded == 0 else 0
        return first + FRAMES_PER_LATENT * chunk_frames

    def push(self, frame: torch.Tensor, chunk_frames: int) -> None:
        """Buffer one input frame ``(3, H, W)``; beyond one chunk the oldest is dropped."""
        if self.first_input_at is None:
            self.first_input_at = now()
        self.inputs.append(frame)
        while len(self.inputs) > self.chunk_inputs(chunk_frames):
            self.inputs.popleft()
            with self.stats.lock:
                self.stats.frames_dropped += 1

    def ready(self, chunk_frames: int) -> bool:
        return len(self.inputs) >= self.chunk_inputs(chunk_frames)

    def take_chunk(self) -> torch.Tensor:
        """The buffered chunk as ``(3, T, H, W)``; the buffer empties."""
        frames = torch.stack(list(self.inputs), dim=1)
        self.inputs.clear()
        return frames

    def release(self, frames: list[RgbArray], chunk_frames: int) -> None:
        """Queue a decoded chunk's frames; at most two chunks wait (newest wins)."""
        self.outputs.extend(frames)
        limit = 2 * FRAMES_PER_LATENT * chunk_frames + 1
        while len(self.outputs) > limit:
            self.outputs.popleft()

    def next_output(self) -> RgbArray | None:
        """The next frame to show, one per input frame (None before the first chunk decodes)."""
        if not self.outputs:
            return None
        if self.stats.first_frame_ms is None and self.first_input_at is not None:
            with self.stats.lock:
                self.stats.first_frame_ms = (now() - self.first_input_at) * 1000
        return self.outputs.popleft()

    def reset(self, vae: VAEStreamState) -> None:
        """Clear the KV and VAE caches (the next chunk starts a new stream; the sink with it)."""
        self.cache.reset()
        self.vae = vae
        self.kept.clear()
        self.last_frame = None
        self.noise_scale = None
        with self.stats.lock:
            self.stats.resets += 1


def motion(previous: torch.Tensor | None, frames: torch.Tensor) -> float:
    """RMS frame-to-frame difference over a chunk ``(3, T, H, W)`` in [-1, 1] (the first frame
    compared with ``previous``, the last frame of the chunk before; 0 with nothing to compare)."""
    sequence = frames if previous is None else torch.cat((previous.unsqueeze(1), frames), 1)
    if sequence.shape[1] < 2:
        return 0.0
    steps = sequence[:, 1:].float() - sequence[:, :-1].float()
    return float(steps.pow(2).mean(dim=(0, 2, 3)).sqrt().max())


def controlled_noise(
    controller: NoiseController, base: float, previous: float | None, moved: float
) -> float:
    """The chunk's noise scale: ``base`` when the controller is off; else StreamDiffusionV2's
    rule (``compute_noise_scale_and_step``): the target ``base - max_drop * min(1, moved /
    motion_scale)``, smoothed with the previous chunk's level, ``base`` standing for it on a
    stream's first chunk."""
    if not controller.enabled:
        return base
    amount = min(1.0, moved / controller.motion_scale)
    target = base - controller.max_drop * amount
    before = base if previous is None else previous
    return (1 - controller.smoothing) * target + controller.smoothing * before


def to_pixels(frames: torch.Tensor) -> list[RgbArray]:
    """Decoded frames ``(3, T, H, W)`` in [-1, 1] as RGB arrays, one per frame: converted to
    uint8 on the device and downloaded in one copy (one wait per chunk, not one per frame)."""
    scaled = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    host = scaled.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (T, H, W, 3)
    return [np.ascontiguousarray(frame) for frame in host]


def from_pixels(image: RgbArray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An RGB array as ``(3, H, W)`` in [-1, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return (tensor.permute(2, 0, 1).to(dtype) / 127.5 - 1).contiguous()
