"""``VideoTransform``: the causal video pipeline (``livediff serve --pipeline video``).

Video-to-video restyling with a causal Wan 2.1 transformer, chunk by chunk, on the engine the
diffusion pipeline uses (same faces, params channel and metrics). Per session (see
:mod:`.session`): input frames buffer until one chunk is complete; the chunk is encoded with the
streaming VAE, noised to the session's noise scale (the motion-aware controller's when on),
denoised in the distilled steps reading the session's rolling KV cache (:func:`generate_chunk`,
which writes the chunk into the cache by the session's ``cache_write``: the clean chunk in one
more pass, or the last step's pass), decoded, and its frames released one per input frame.
Sessions whose chunks are ready in the same call and match in shape, VAE phase, step count and
cache write share one encode, one transformer call per step and one decode, each with its own
caches, noise and prompt.

A prompt change re-caches: the cached keys/values of the chunks the cache keeps (the latents and
timestep that wrote each, clean or last step, are kept beside it) are recomputed under the new
prompt, at their own positions, so the next chunk reads a context consistent with the new text
(LongLive's KV re-cache; bounded by ``max_cache_frames / chunk_frames`` transformer passes).
``reset_cache`` clears the KV and VAE
caches instead. A stream about to pass the end of Wan's RoPE table (1024 latent frames) is
re-based instead of restarted: its non-sink cached frames move back to just after the sink, their
keys rotated by the same offset, so it goes on with its sink and context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic_core import ValidationError

from livediff.config import Settings
from livediff.frames import Image
from livediff.pixels import resize, to_rgb_array
from livediff.transforms.base import Job, Transform
from livediff.transforms.video import models
from livediff.transforms.video.causal import forward_chunk, new_cache, rebase_cache
from livediff.transforms.video.checkpoint import (
    HUB_FILE,
    CheckpointUnavailableError,
    locate_checkpoint,
)
from livediff.transforms.video.kv_cache import KVCache
from livediff.transforms.video.models import VideoModel, VideoModelUnavailableError
from livediff.transforms.video.params import CacheWrite, VideoParams
from livediff.transforms.video.schedule import ChunkSchedule, generate_chunk, stack_timesteps
from livediff.transforms.video.session import (
    KeptChunk,
    VideoSession,
    controlled_noise,
    from_pixels,
    motion,
    to_pixels,
)
from livediff.transforms.video.text import WAN_TEXT_TOKENS, PromptEncoder
from livediff.transforms.video.vae_stream import (
    decode_chunk,
    denormalize_latents,
    encode_chunk,
    new_stream_state,
    normalize_latents,
)

logger = logging.getLogger(__name__)

VideoJob = Job[VideoParams, VideoSession, None]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPATIAL = 8

#: Open sessions, for :meth:`VideoTransform.describe_session` (which is handed only params).
_open: dict[int, VideoSession] = {}
_open_lock = threading.Lock()


@dataclass(slots=True)
class _Chunk:
    """One session's chunk on its way through a batch."""

    state: VideoSession
    frames: torch.Tensor
    timesteps: list[float]
    noise_scale: float
    cache_write: CacheWrite


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_text_device(name: str, device: torch.device) -> torch.device:
    """Where UMT5 runs: 'auto' is the model's device, 'cpu' host memory."""
    return device if name == "auto" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA (Wan's dtype), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class VideoTransform(Transform[VideoParams, VideoSession, None]):
    """Causal video-to-video restyling (Wan 2.1 made causal), several sessions batched."""

    name = "video"
    params_model = VideoParams

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._device = resolve_device(settings.device)
        self._dtype = resolve_dtype(settings.dtype, self._device)
        self._text_device = resolve_text_device(settings.video_text_device, self._device)
        self.model_name = models.video_model(settings.model)
        self.model: VideoModel | None = None
        self.prompts: PromptEncoder | None = None
        self.check_available(settings)

    @classmethod
    def check_available(cls, settings: Settings) -> None:
        """A folder or checkpoint file must exist now; a hub id or hub file not yet fetched is
        fetched while loading."""
        model = models.video_model(settings.model)
        try:
            models.locate(model, settings.model_dir)
        except VideoModelUnavailableError:
            if model.startswith((".", "/", "~")):
                raise
            logger.info("%s is not downloaded yet: it is fetched while loading", model)
        checkpoint = settings.video_checkpoint
        if checkpoint is None:
            return
        try:
            locate_checkpoint(checkpoint, settings.model_dir)
        except CheckpointUnavailableError:
            if HUB_FILE.match(checkpoint) is None:
                raise
            logger.info("%s is not downloaded yet: it is fetched while loading", checkpoint)

    @property
    def device(self) -> str:
        return str(self._device)

    @classmethod
    def default_params(cls, settings: Settings) -> dict[str, Any]:
        return {**super().default_params(settings), "model": models.video_model(settings.model)}

    @classmethod
    def model_ids(cls, params: VideoParams) -> dict[tuple[str | int, ...], str]:
        return {("model",): params.model}

    @classmethod
    def describe_session(cls, params: VideoParams) -> dict[str, Any]:
        """The session's chunk stats (chunk and first-frame latency, ...); None until a frame
        with these params has been processed."""
        with _open_lock:
            found = [s for s in _open.values() if s.params is params]
        return {"video": found[0].stats.report() if found else None}

    def loaded_params(self) -> dict[str, Any]:
        return {"model": self.model_name}

    # -- loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        self._load(self.model_name)

    def _load(self, name: str) -> None:
        folder = models.locate(name, self.settings.model_dir, download=True)
        checkpoint = self._checkpoint_for(name)
        fields = VideoParams.model_fields
        estimate = models.memory_estimate(
            folder,
            self.settings.width,
            self.settings.height,
            fields["max_cache_frames"].default,
            fields["chunk_frames"].default,
            text_on_device=self._text_device == self._device,
        )
        models.check_memory(estimate, self.settings.max_sessions, self._device)
        self.close()
        loaded = models.load(
            folder, self._device, self._dtype, checkpoint=checkpoint, text_device=self._text_device
        )
        self._serve_model(loaded, name)
        logger.info(
            "video model %s%s loaded on %s (%s; UMT5 on %s)",
            name,
            "" if checkpoint is None else f" with {checkpoint}",
            self._device,
            self._dtype,
            self._text_device,
        )

    def _serve_model(self, model: VideoModel, name: str) -> None:
        """Serve ``model`` (loaded on this transform's device) under ``name``, with a prompt
        encoder over its UMT5 and tokenizer."""
        tokens = min(int(model.tokenizer.model_max_length), WAN_TEXT_TOKENS)
        self.prompts = PromptEncoder(
            model.text_encoder, model.tokenizer, tokens, device=self._device, dtype=self._dtype
        )
        self.model = model
        self.model_name = name

    def _checkpoint_for(self, name: str) -> Path | None:
        """The configured causal checkpoint (fetched if needed) when ``name`` is the configured
        model it was trained over; another model a session names loads without it."""
        spec = self.settings.video_checkpoint
        if spec is None or name != models.video_model(self.settings.model):
            return None
        return locate_checkpoint(spec, self.settings.model_dir, download=True)

    def requires_reload(self, old: VideoParams, new: VideoParams) -> bool:
        return new.model not in (old.model, self.model_name)

    def reload(self, params: VideoParams) -> None:
        try:
            models.locate(params.model, self.settings.model_dir, download=True)
        except VideoModelUnavailableError as exc:
            raise _field_error("model", params.model, str(exc)) from exc
        self._load(params.model)

    def close(self) -> None:
        self.model = None
        self.prompts = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()

    def _model(self) -> VideoModel:
        if self.model is None:
            raise RuntimeError("the video model is not loaded")
        return self.model

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, params: VideoParams) -> VideoSession:
        if params.model != self.model_name:
            raise RuntimeError("open_session with another model than the loaded one (reload first)")
        model = self._model()
        state = VideoSession(
            cache=self._new_cache(params),
            vae=new_stream_state(model.vae),
            generator=torch.Generator(self._device),
            layout=_layout(params),
        )
        with _open_lock:
            _open[id(state)] = state
        return state

    def close_session(self, state: VideoSession) -> None:
        with _open_lock:
            _open.pop(id(state), None)
        state.inputs.clear()
        state.outputs.clear()
        state.kept.clear()
        state.cache.reset()

    def _new_cache(self, params: VideoParams) -> KVCache:
        height, width = params.height // SPATIAL, params.width // SPATIAL
        return new_cache(self._model().transformer, height, width, params.max_cache_frames)

    # -- frames -----------------------------------------------------------------------------------
    @torch.no_grad()
    def process(self, jobs: Sequence[VideoJob]) -> list[Image | None]:
        """Buffer each job's frame; run the chunks now complete (batched); release one frame
        per job (None until the session's first chunk has decoded)."""
        for job in jobs:
            self._follow(job.state, job.params)
            image = to_rgb_array(resize(job.frame.image, job.params.width, job.params.height))
            job.state.push(from_pixels(image, self._device, self._dtype), job.params.chunk_frames)
        ready = [self._take(job) for job in jobs if job.state.ready(job.params.chunk_frames)]
        for group in _groups(ready).values():
            self._run(group)
        return [job.state.next_output() for job in jobs]

    def _follow(self, state: VideoSession, params: VideoParams) -> None:
        """Apply params that changed since the session's last frame: a new size or cache bound
        (new caches), ``reset_cache`` (once per update that carries it: the flag is not kept in
        the session's params), the seed (and the noise restarts with a new stream), the prompt."""
        if params is state.params:
            return
        if _layout(params) != state.layout:
            state.inputs.clear()
            state.cache = self._new_cache(params)
            state.reset(new_stream_state(self._model().vae))
            state.layout = _layout(params)
        elif params.reset_cache:
            state.reset(new_stream_state(self._model().vae))
        restarted = not state.cache.chunks and state.vae.frames_encoded == 0
        if restarted or state.params is None or params.seed != state.params.seed:
            state.generator.manual_seed(params.seed)  # a new stream starts its noise over
        prompt = params.weighted_prompts()
        if prompt != state.prompt_key and state.cache.chunks:
            self._recache(state, prompt)
        state.prompt_key = prompt
        state.params = params

    def _recache(self, state: VideoSession, prompt: tuple[tuple[str, float], ...]) -> None:
        """Recompute the kept chunks' keys/values under ``prompt``, each at its own positions
        and reading the chunks before it, as when it was first written."""
        old = state.cache
        if any(start not in state.kept for start, _ in old.chunks):
            state.reset(new_stream_state(self._model().vae))  # cannot happen; stay consistent
            return
        fresh = KVCache(old.num_layers, old.frame_tokens, old.max_frames, old.keep_sink)
        text = self._text(prompt)
        transformer = self._model().transformer
        for start, _ in old.chunks:
            fresh.next_frame = start
            kept = state.kept[start]
            forward_chunk(transformer, kept.latents, kept.timestep, text, [fresh], write=True)
        fresh.next_frame = old.next_frame
        state.cache = fresh
        with state.stats.lock:
            state.stats.recaches += 1

    def _text(self, prompt: tuple[tuple[str, float], ...]) -> torch.Tensor:
        if self.prompts is None:
            raise RuntimeError("the video model is not loaded")
        return self.prompts.embed(prompt)

    def _take(self, job: VideoJob) -> _Chunk:
        """The session's buffered chunk with its noise scale (the controller's when on)."""
        state, params = job.state, job.params
        frames = state.take_chunk()
        moved = motion(state.last_frame, frames)
        controller = params.noise_controller
        scale = controlled_noise(controller, params.noise_scale, state.noise_scale, moved)
        state.noise_scale, state.last_frame = scale, frames[:, -1]
        steps = ChunkSchedule(tuple(float(s) for s in params.denoising_step_list))
        return _Chunk(state, frames, steps.timesteps(scale), scale, params.cache_write)

    def _run(self, group: list[_Chunk]) -> None:
        """Encode, denoise (reading and writing each session's cache), decode and queue one
        chunk per session, in one batch."""
        started = time.perf_counter()
        model = self._model()
        states = [chunk.state for chunk in group]
        latent_frames = (group[0].frames.shape[1] + 3) // 4  # 1 + 4k -> k + 1; 4k -> k
        for state in states:
            self._make_room(state, latent_frames)
        frames = torch.stack([chunk.frames for chunk in group])
        vae_states = [state.vae for state in states]
        latents = normalize_latents(model.vae, encode_chunk(model.vae, frames, vae_states))
        starts = [state.cache.next_frame for state in states]
        generated = generate_chunk(
            model.transformer,
            latents,
            torch.cat([self._text(state.prompt_key) for state in states]),
            [state.cache for state in states],
            timesteps=stack_timesteps([c.timesteps for c in group], self._device),
            generators=[state.generator for state in states],
            cache_write=group[0].cache_write,
        )
        decoded = decode_chunk(model.vae, denormalize_latents(model.vae, generated.x0), vae_states)
        for row, chunk in enumerate(group):
            written = KeptChunk(
                generated.cached[row : row + 1], generated.cached_timestep[row : row + 1]
            )
            _keep(chunk.state, starts[row], written)
            assert chunk.state.params is not None
            chunk.state.release(to_pixels(decoded[row]), chunk.state.params.chunk_frames)
        seconds = time.perf_counter() - started
        for chunk in group:
            chunk.state.stats.on_chunk(seconds, chunk.noise_scale)

    def _make_room(self, state: VideoSession, latent_frames: int) -> None:
        """Re-base the KV cache of a stream whose next chunk would pass the end of Wan's RoPE
        table: the non-sink frames move down to just after the sink, their keys rotated by the
        same offset (:func:`rebase_cache`), and the kept chunks follow their new positions. Only
        a table too short for the cache bound itself restarts the KV cache."""
        transformer, cache = self._model().transformer, state.cache
        table = transformer.rope.max_seq_len
        if cache.next_frame + latent_frames <= table:
            return
        starts = [start for start, _ in cache.chunks]
        rebase_cache(transformer, cache)
        moved = zip(starts, cache.chunks, strict=True)
        state.kept = {new: state.kept[old] for old, (new, _) in moved if old in state.kept}
        if cache.next_frame + latent_frames > table:
            cache.reset()
            state.kept.clear()


def _keep(state: VideoSession, start: int, written: KeptChunk) -> None:
    """Remember what wrote a chunk while the cache keeps it (for re-caching)."""
    state.kept[start] = written
    cached = {first for first, _ in state.cache.chunks}
    for first in [s for s in state.kept if s not in cached]:
        del state.kept[first]


def _layout(params: VideoParams) -> tuple[int, int, int]:
    """What a session's caches are shaped by: a change means new caches."""
    return params.width, params.height, params.max_cache_frames


def _groups(chunks: list[_Chunk]) -> dict[tuple[Any, ...], list[_Chunk]]:
    """Chunks that can share a batch: same shape, same VAE phase, same number of steps, same
    cache write."""
    groups: dict[tuple[Any, ...], list[_Chunk]] = defaultdict(list)
    for chunk in chunks:
        first = chunk.state.vae.frames_encoded == 0
        key = (tuple(chunk.frames.shape), first, len(chunk.timesteps), chunk.cache_write)
        groups[key].append(chunk)
    return groups


def _field_error(field: str, value: object, message: str) -> ValidationError:
    """A pydantic ValidationError on ``field`` (the server answers it with a 422)."""
    return ValidationError.from_exception_data(
        "VideoParams",
        [{"type": "value_error", "loc": (field,), "input": value, "ctx": {"error": message}}],
    )
