"""The loaded model: UNet, VAE (Tiny or full), text encoder, tokenizer and scheduler, made ready
for the device (dtype, channels_last, SDPA attention, optionally ``torch.compile``)."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.transforms.diffusion.models import ModelChoice, ModelPaths, UnsupportedModelError

logger = logging.getLogger(__name__)

VAE_CLASSES = ("AutoencoderTiny", "AutoencoderKL")


@dataclass
class ModelBundle:
    """The components the stream engine runs."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the SD family)."""
        config = self.vae.config
        channels = config.get("block_out_channels") or config.get("decoder_block_out_channels")
        return int(2 ** (len(channels) - 1))

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype  # type: ignore[no-any-return]


def _diffusers() -> Any:
    return importlib.import_module("diffusers")


def _transformers() -> Any:
    return importlib.import_module("transformers")


def load_bundle(paths: ModelPaths, choice: ModelChoice, dtype: torch.dtype) -> ModelBundle:
    """Load every component from local folders, on the CPU, in ``dtype`` (see :func:`prepare`)."""
    diffusers, transformers = _diffusers(), _transformers()
    unet = diffusers.UNet2DConditionModel.from_pretrained(paths.model / "unet", torch_dtype=dtype)
    if unet.config.get("addition_embed_type") is not None:
        raise UnsupportedModelError(
            f"model {choice.model!r} needs added conditioning (SDXL-style UNet); this transform"
            " runs the SD 1.5 / SD 2.1 / sd-turbo family"
        )
    text_encoder = transformers.CLIPTextModel.from_pretrained(paths.model / "text_encoder")
    return ModelBundle(
        unet=unet,
        vae=load_vae(paths.vae, dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(paths.model / "tokenizer"),
        scheduler=load_scheduler(paths.model / "scheduler"),
    )


def load_vae(folder: Path, dtype: torch.dtype) -> Any:
    """An AutoencoderTiny or AutoencoderKL, whichever the folder's config names.

    A VAE that asks for float32 (``force_upcast``: the SD 1.5/2.1 VAE overflows in float16)
    is kept in float32 when ``dtype`` is float16.
    """
    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name", "AutoencoderTiny")
    if class_name not in VAE_CLASSES:
        raise UnsupportedModelError(
            f"{folder} holds a {class_name}; a VAE must be one of {', '.join(VAE_CLASSES)}",
            "vae",
        )
    if dtype == torch.float16 and config.get("force_upcast", False):
        dtype = torch.float32
    return getattr(_diffusers(), class_name).from_pretrained(folder, torch_dtype=dtype)


def load_scheduler(folder: Path) -> Any:
    """The model's own scheduler class and config (only its noise levels are used)."""
    diffusers = _diffusers()
    config = diffusers.DDPMScheduler.load_config(folder)
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        scheduler_class = diffusers.DDPMScheduler
    return scheduler_class.from_config(config)


def prepare(
    bundle: ModelBundle,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile_mode: str | None = None,
    compile_cache_size: int = 64,
    channels_last: bool = True,
) -> ModelBundle:
    """Move to ``device`` for inference: eval, no grads, SDPA attention, channels_last weights
    (faster convolutions with cuDNN and with oneDNN on the CPU alike),
    and ``torch.compile`` of the UNet and the VAE halves when ``compile_mode`` is given.
    Modules in another floating dtype than ``dtype`` are cast (a float32 VAE that asks for it,
    ``force_upcast``, stays float32 under float16)."""
    for module in (bundle.unet, bundle.text_encoder, bundle.vae):
        module_dtype = next(module.parameters()).dtype
        keep_upcast = module is bundle.vae and module.config.get("force_upcast", False)
        if module_dtype != dtype and not (keep_upcast and dtype == torch.float16):
            module.to(dtype=dtype)
        module.to(device=device)
        module.eval()
        module.requires_grad_(False)
    _use_sdpa(bundle.unet)
    if channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
        bundle.vae.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # few shapes, each autotuned once (warm-up)
    if compile_mode is not None:
        compile_modules(bundle, compile_mode, compile_cache_size)
    return bundle


def _use_sdpa(unet: Any) -> None:
    processors = importlib.import_module("diffusers.models.attention_processor")
    unet.set_attn_processor(processors.AttnProcessor2_0())


def compile_modules(bundle: ModelBundle, mode: str, cache_size: int) -> None:
    """``torch.compile`` the UNet and both VAE halves in place (first calls compile);
    ``cache_size`` graphs are kept per function (shapes differ with sizes, steps and CFG)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, cache_size)
    logger.info("compiling the UNet and the VAE with torch.compile(mode=%r)", mode)
    # dynamic=None: the first batch shape compiles static, a second one recompiles with a
    # symbolic batch size that serves every later session count (CUDA graphs still record
    # one graph per concrete shape, which is cheap)
    bundle.unet = torch.compile(bundle.unet, mode=mode, dynamic=None)
    bundle.vae.encoder = torch.compile(bundle.vae.encoder, mode=mode, dynamic=None)
    bundle.vae.decoder = torch.compile(bundle.vae.decoder, mode=mode, dynamic=None)


def uses_cuda_graphs(device: torch.device, compile_mode: str | None) -> bool:
    """True when compiled functions replay CUDA graphs (their outputs are reused buffers)."""
    return device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")
