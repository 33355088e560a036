"""The loaded model: UNet, VAE (Tiny or full), text encoder, tokenizer and scheduler, made ready
for the device (dtype, channels_last, SDPA attention, optionally ``torch.compile``)."""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.transforms.diffusion import fp8
from livediff.transforms.diffusion.feature_bank import BankSwitch, install_feature_bank
from livediff.transforms.diffusion.fp8 import Fp8Report
from livediff.transforms.diffusion.ip_adapter import IPAdapterSwitch, install_ip_adapter
from livediff.transforms.diffusion.models import ModelChoice, ModelPaths, UnsupportedModelError
from livediff.transforms.diffusion.prompts import TextEncoder

logger = logging.getLogger(__name__)

VAE_CLASSES = ("AutoencoderTiny", "AutoencoderKL")


@dataclass
class ModelBundle:
    """The components the UNet batch runs."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    #: SDXL's second text encoder (OpenCLIP ViT-bigG, with a projection) and its tokenizer.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    #: SDXL: an empty negative prompt is zeros (the pipeline's ``force_zeros_for_empty_prompt``).
    zeros_for_empty_prompt: bool = False
    #: The UNet as diffusers built it, when ``unet`` is its compiled wrapper (same weights).
    eager_unet: Any = None
    #: The switch of the feature bank's self-attention layers (installed before compiling).
    bank: BankSwitch | None = None
    #: The switch of the IP-Adapter's cross-attention layers (installed before compiling).
    ip_switch: IPAdapterSwitch | None = None
    #: What ``unet_quantization: fp8`` converted (None: the UNet is as loaded; see fp8.py).
    fp8: Fp8Report | None = None

    @property
    def uncompiled_unet(self) -> Any:
        """The UNet to call with inputs no compiled plan covers (ControlNet residuals): run
        eager, never compiled while serving."""
        return self.unet if self.eager_unet is None else self.eager_unet

    @property
    def sdxl(self) -> bool:
        """The SDXL family: two text encoders, pooled text embeddings and size conditioning
        (``time_ids``) as the UNet's added conditioning."""
        return bool(self.unet.config.get("addition_embed_type") == TEXT_TIME)

    @property
    def text_encoders(self) -> list[TextEncoder]:
        encoders = [TextEncoder(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            encoders.append(TextEncoder(self.tokenizer_2, self.text_encoder_2))
        return encoders

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
    """Load every component from local folders, on the CPU, in ``dtype`` (see :func:`prepare`).

    The family comes from the model's own configs (:func:`check_family`), never its name."""
    diffusers, transformers = _diffusers(), _transformers()
    index = json.loads((paths.model / "model_index.json").read_text())
    check_family(
        json.loads((paths.model / "unet" / "config.json").read_text()), index, choice.model
    )
    unet = diffusers.UNet2DConditionModel.from_pretrained(paths.model / "unet", torch_dtype=dtype)
    text_encoder = transformers.CLIPTextModel.from_pretrained(paths.model / "text_encoder")
    bundle = ModelBundle(
        unet=unet,
        vae=load_vae(paths.vae, dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(paths.model / "tokenizer"),
        scheduler=load_scheduler(paths.model / "scheduler"),
    )
    if bundle.sdxl:
        bundle.text_encoder_2 = transformers.CLIPTextModelWithProjection.from_pretrained(
            paths.model / "text_encoder_2"
        ).to(dtype)
        bundle.tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(paths.model / "tokenizer_2")
        bundle.zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
    return bundle


#: ``addition_embed_type`` of an SDXL UNet: pooled text embeddings and size conditioning.
TEXT_TIME = "text_time"
#: SDXL's size conditioning: original size, crop top-left, target size (height, width each).
TIME_IDS = 6


def check_family(unet_config: Any, index: dict[str, Any], name: str) -> None:
    """Refuse what this transform cannot run, from the configs: another added conditioning
    than SDXL's, and SDXL refiners (aesthetic-score conditioning, no text encoder 1)."""
    added = unet_config.get("addition_embed_type")
    if added not in (None, TEXT_TIME):
        raise UnsupportedModelError(
            f"model {name!r} needs added conditioning {added!r}; this transform runs the SD 1.5 /"
            " SD 2.1 / sd-turbo and SDXL / sdxl-turbo families"
        )
    if added == TEXT_TIME and index.get("requires_aesthetics_score", False):
        raise UnsupportedModelError(
            f"model {name!r} is an SDXL refiner (aesthetic-score conditioning); use a base or"
            " turbo model of the SDXL family (e.g. stabilityai/sdxl-turbo)"
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


@dataclass(frozen=True)
class CompileOptions:
    """How ``torch.compile`` runs: mode and backend, graphs kept per function, and where its
    caches live (``cache_dir``: a restart or a new container finds what was compiled before)."""

    mode: str
    backend: str = "inductor"
    cache_size: int = 64
    cache_dir: Path | None = None


def prepare(
    bundle: ModelBundle,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile_options: CompileOptions | None = None,
    vae_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    unet_quantization: str = "none",
) -> ModelBundle:
    """Move to ``device`` for inference: eval, no grads, SDPA attention, channels_last weights
    (faster convolutions with cuDNN and with oneDNN on the CPU alike), FP8 layers in the UNet
    when ``unet_quantization`` is 'fp8' (:mod:`.fp8`, before compiling, so the compiled plans
    hold them), and ``torch.compile`` of the UNet and the VAE halves with ``compile_options``.
    The UNet and text encoder take ``dtype``; the VAE takes ``vae_dtype`` (default: see
    :func:`choose_vae_dtype`)."""
    vae_target = vae_dtype or choose_vae_dtype(bundle.vae, dtype, device)
    modules = [(bundle.unet, dtype), (bundle.text_encoder, dtype), (bundle.vae, vae_target)]
    if bundle.text_encoder_2 is not None:
        modules.append((bundle.text_encoder_2, dtype))
    for module, target in modules:
        if next(module.parameters()).dtype != target:
            module.to(dtype=target)
        module.to(device=device)
        module.eval()
        module.requires_grad_(False)
    _use_sdpa(bundle.unet)
    bundle.bank = install_feature_bank(bundle.unet)
    bundle.ip_switch = install_ip_adapter(bundle.unet)
    if channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
        bundle.vae.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # off while serving: each new shape would be timed again (a stall); the planned ones
        # are tuned at load (shapes.cudnn_autotuning) and their choices cached
        torch.backends.cudnn.benchmark = False
    if unet_quantization == "fp8":
        fp8.check_available(device)
        bundle.fp8 = fp8.convert_unet(bundle.unet)
    if compile_options is not None:
        compile_modules(bundle, compile_options)
    return bundle


def choose_vae_dtype(vae: Any, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE's dtype: ``dtype``, except for a VAE that overflows in float16 (the SD full VAE,
    ``force_upcast``) under float16: bfloat16 where the device has it (same range as float32,
    about 3.6 TFLOP a 512x512 frame at bf16 speed), else float32."""
    if dtype != torch.float16 or not vae.config.get("force_upcast", False):
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _use_sdpa(unet: Any) -> None:
    processors = importlib.import_module("diffusers.models.attention_processor")
    unet.set_attn_processor(processors.AttnProcessor2_0())


def compile_modules(bundle: ModelBundle, options: CompileOptions) -> None:
    """``torch.compile`` the UNet and both VAE halves in place, with static shapes.

    Every call comes padded to one of the planned batch sizes (the shape buckets, see
    ``shapes.PaddedCall``), so each bucket compiles once, at load, and a session joining or
    leaving picks another bucket instead of recompiling; ``dynamic=False`` keeps torch from
    turning the batch size symbolic (a recompile, under max-autotune minutes on a GPU).
    """
    import torch._dynamo

    use_cache_dir(options.cache_dir)
    torch._dynamo.config.cache_size_limit = max(
        torch._dynamo.config.cache_size_limit, options.cache_size
    )
    logger.info(
        "compiling the UNet and the VAE with torch.compile(mode=%r, backend=%r)",
        options.mode,
        options.backend,
    )
    bundle.eager_unet = bundle.unet
    bundle.unet = compiled(bundle.unet, options)
    bundle.vae.encoder = compiled(bundle.vae.encoder, options)
    bundle.vae.decoder = compiled(bundle.vae.decoder, options)


def compiled(module: torch.nn.Module | Callable[..., Any], options: CompileOptions) -> Any:
    """``torch.compile(module)`` the way every planned module or function compiles (the UNet,
    the VAE halves, a ControlNet, a frame graph): ``options``' backend (and mode, for
    inductor) and static shapes (``dynamic=False``: every call comes padded to a bucket)."""
    settings: dict[str, Any] = {"dynamic": False, "backend": options.backend}
    if options.backend == "inductor":
        settings["mode"] = options.mode
    return torch.compile(module, **settings)


def use_cache_dir(folder: Path | None) -> None:
    """Point inductor's and Triton's on-disk caches (FX graphs, kernels, autotuning) at
    ``folder``, unless the environment already chose (the orchestrator image does)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True


def uses_cuda_graphs(device: torch.device, compile_mode: str | None) -> bool:
    """True when compiled functions replay CUDA graphs (their outputs are reused buffers)."""
    return device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")
