"""Finding, checking and loading a Wan 2.1 model in diffusers' layout (``--pipeline video``).

A model is a folder as ``WanPipeline.save_pretrained`` writes it (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) or a hub id of one
(``livediff prepare-models --pipeline video`` fetches it). The transformer, VAE, UMT5 encoder and
tokenizer are loaded through diffusers' and transformers' own classes.

Before loading, :func:`memory_estimate` sizes the model in bf16 from its configs (the
transformer's and UMT5's parameter counts, the VAE's file size) plus the KV cache of one session,
and :func:`check_memory` refuses with a clear message when the device lacks it. UMT5-XXL (11.4 GB
in bf16, the largest part) may stay on the CPU (``--video-text-device cpu``): prompts are encoded
once per text, and only their embeddings move to the device; the estimate then leaves it out of
the device's share.

A causal checkpoint (``--video-checkpoint``, :mod:`.checkpoint`) replaces the transformer's
weights after the base folder's load, before anything moves to the device (strict: every
parameter replaced, none left over).

Invariant: whatever :func:`load` returns has the transformer and VAE on the serving device in the
serving dtype, and the text encoder on ``text_device`` in that dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.config import DEFAULT_MODEL
from livediff.transforms.video.checkpoint import load_transformer_weights, read_checkpoint

#: The components ``--pipeline video`` loads, by the folder diffusers saves each in.
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
GB = 1024**3
BF16_BYTES = 2
#: Wan's VAE: pixels per latent pixel; the transformer's patch adds 2 x 2 more.
SPATIAL = 8


class VideoModelUnavailableError(LookupError):
    """The model folder or hub id cannot be found (or lacks a component)."""


class VideoMemoryError(RuntimeError):
    """The device has too little memory for the model and its per-session cache."""


def video_model(configured: str) -> str:
    """The model ``--pipeline video`` serves: the configured one, or the Wan default when the
    configured one is the diffusion pipeline's default."""
    from livediff.transforms.video.params import DEFAULT_VIDEO_MODEL

    return DEFAULT_VIDEO_MODEL if configured == DEFAULT_MODEL else configured


def locate(model: str, model_dir: str | None, download: bool = False) -> Path:
    """The model's folder: ``model`` itself when it is a folder, else the hub snapshot (fetched
    when ``download``); raises :class:`VideoModelUnavailableError` saying how to get it."""
    folder = Path(model).expanduser()
    if folder.is_dir() or model.startswith((".", "/", "~")):
        return _checked(folder, model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(model, cache_dir=model_dir, local_files_only=not download)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise VideoModelUnavailableError(
            f"video model {model!r} is not available here ({exc}); fetch it with"
            f" `livediff prepare-models --pipeline video --model {model}`"
        ) from exc
    return _checked(Path(path), model)


def _checked(folder: Path, model: str) -> Path:
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise VideoModelUnavailableError(
            f"video model {model!r} {what}: a Wan 2.1 model in diffusers' layout"
            " (WanPipeline.save_pretrained) has transformer/, vae/, text_encoder/ and tokenizer/"
        )
    return folder


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes the model needs in bf16 on the device, its KV cache per session, and the text
    encoder's bytes in host memory (0 unless it runs on the CPU)."""

    weights: int
    cache_per_session: int
    host_text_encoder: int = 0

    def total(self, sessions: int) -> int:
        return self.weights + sessions * self.cache_per_session


def _config(folder: Path, component: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((folder / component / "config.json").read_text())
    return loaded


def transformer_parameters(config: dict[str, Any]) -> int:
    """Wan's transformer parameters from its config (projections and FFN; norms left out)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    per_block = 8 * dim * dim + 2 * dim * config["ffn_dim"]
    text = config["text_dim"] * dim + dim * dim
    patch = config["in_channels"] * dim * 4 + dim * config["out_channels"] * 4
    return int(config["num_layers"] * per_block + text + patch)


def umt5_parameters(config: dict[str, Any]) -> int:
    """UMT5 encoder parameters from its config (embedding, attention, gated FFN)."""
    d_model, inner = config["d_model"], config["num_heads"] * config["d_kv"]
    per_layer = 4 * d_model * inner + 3 * d_model * config["d_ff"]
    return int(config["vocab_size"] * d_model + config["num_layers"] * per_layer)


def memory_estimate(
    folder: Path,
    width: int,
    height: int,
    max_cache_frames: int,
    chunk_frames: int,
    *,
    text_on_device: bool = True,
) -> MemoryEstimate:
    """The model in bf16 (transformer and UMT5 from their configs, the VAE from its files) and
    one session's KV cache: ``2 x layers x frames x frame_tokens x dim`` bf16 values, where a
    cache's buffers hold ``max_cache_frames`` plus its first chunk (``chunk_frames + 1`` latent
    frames, see :mod:`.kv_cache`). With ``text_on_device`` False, UMT5 is counted in host memory
    instead of the device's."""
    transformer = _config(folder, "transformer")
    text_encoder = BF16_BYTES * umt5_parameters(_config(folder, "text_encoder"))
    vae_bytes = sum(f.stat().st_size for f in (folder / "vae").glob("*.safetensors"))
    weights = BF16_BYTES * transformer_parameters(transformer) + vae_bytes
    dim = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    tokens = (height // (SPATIAL * 2)) * (width // (SPATIAL * 2))
    buffer_frames = max_cache_frames + chunk_frames + 1
    cache = 2 * transformer["num_layers"] * buffer_frames * tokens * dim * BF16_BYTES
    if text_on_device:
        return MemoryEstimate(weights + text_encoder, cache)
    return MemoryEstimate(weights, cache, host_text_encoder=text_encoder)


def check_memory(estimate: MemoryEstimate, sessions: int, device: torch.device) -> None:
    """Refuse (before loading) when ``device`` has less free memory than the model needs with
    ``sessions`` sessions' caches; the CPU is not checked."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    needed = estimate.total(sessions)
    if needed > free:
        text = (
            f"; UMT5 ({estimate.host_text_encoder / GB:.1f} GiB) stays on the CPU"
            if estimate.host_text_encoder
            else "; --video-text-device cpu keeps UMT5 off it"
        )
        raise VideoMemoryError(
            f"the video model needs {needed / GB:.1f} GiB on {device} (weights in bf16"
            f" {estimate.weights / GB:.1f} GiB + KV cache {estimate.cache_per_session / GB:.2f}"
            f" GiB per session x {sessions}) but {free / GB:.1f} GiB is free{text}; lower"
            " --max-sessions, the size or max_cache_frames, or use a larger GPU"
        )


@dataclass(slots=True)
class VideoModel:
    """The loaded components, on the device."""

    folder: Path
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any


def load(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    checkpoint: Path | None = None,
    text_device: torch.device | None = None,
) -> VideoModel:
    """The transformer (its weights replaced by ``checkpoint``'s when given), VAE, UMT5 encoder
    and tokenizer of ``folder``, in eval mode, in ``dtype``: all on ``device`` but the encoder,
    on ``text_device`` (default ``device``)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    def ready(module: Any, on: torch.device = device) -> Any:
        return module.to(device=on, dtype=dtype).eval().requires_grad_(False)

    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")  # type: ignore[no-untyped-call]
    if checkpoint is not None:
        load_transformer_weights(transformer, read_checkpoint(checkpoint))
    encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder")
    return VideoModel(
        folder=folder,
        transformer=ready(transformer),
        vae=ready(AutoencoderKLWan.from_pretrained(folder, subfolder="vae")),  # type: ignore[no-untyped-call]
        text_encoder=ready(encoder, device if text_device is None else text_device),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
    )
