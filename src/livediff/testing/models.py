"""Model configurations (published sd-turbo / TAESD ones and tiny ones) and random-weight builders.

No weights can be downloaded where the tests and benchmarks run, but a random-initialised model
with the published configuration costs the same FLOPs as the real one (see "Models without their
weights" in docs/diffusion.md), and a tiny one exercises the same code in milliseconds.
:func:`write_model_folder` saves such a model in diffusers layout (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) plus a separate Tiny AutoEncoder folder, so tests load it
through the same path a user's ``--model`` takes (:func:`tiny_options` are the settings that serve
it); :func:`build_components` makes the same objects in memory (for benchmarks).

The configs are plain data; torch, diffusers and transformers are imported only by the builders.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- sd-turbo (stabilityai/sd-turbo), as published ---------------------------------------------
SD_TURBO_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    # diffusers reads these as head counts (head size 64), as in the published config
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD_TURBO_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "vocab_size": 49408,
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD_TURBO_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
SD_TURBO_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
# -- TAESD (madebyollin/taesd), as published -----------------------------------------------------
TAESD: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
}

# -- tiny: the same architecture families, a few hundred thousand parameters -------------------
TINY_UNET: dict[str, Any] = {
    **SD_TURBO_UNET,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": [2, 4],
    "norm_num_groups": 8,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    **SD_TURBO_TEXT_ENCODER,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 1000,
    "projection_dim": 16,
}
TINY_VAE: dict[str, Any] = {
    **SD_TURBO_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TAESD: dict[str, Any] = {
    **TAESD,
    "encoder_block_out_channels": [8, 8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8, 8],
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
}


# -- sdxl-turbo (stabilityai/sdxl-turbo), as published --------------------------------------------
SDXL_TURBO_UNET: dict[str, Any] = {
    **SD_TURBO_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    # six time ids of 256 each, and text encoder 2's 1280-wide pooled projection
    "projection_class_embeddings_input_dim": 2816,
}
#: Text encoder 1: CLIP ViT-L/14's text tower.
SDXL_TEXT_ENCODER: dict[str, Any] = {
    **SD_TURBO_TEXT_ENCODER,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
#: Text encoder 2: OpenCLIP ViT-bigG/14's text tower, with its projection.
SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    **SD_TURBO_TEXT_ENCODER,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
}
SDXL_VAE: dict[str, Any] = {**SD_TURBO_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TURBO_SCHEDULER: dict[str, Any] = {
    **SD_TURBO_SCHEDULER,
    "_class_name": "EulerAncestralDiscreteScheduler",
}
# -- tiny SDXL: the same architecture, text encoders of 16 and 16 (+16 projected) --------------
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
}
TINY_VAE_SDXL: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.13025}


@dataclass(frozen=True)
class Preset:
    """Configs of every component of one model family (``text_encoder_2``: the SDXL
    family's second text encoder, with its projection)."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    taesd: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None


PRESETS: dict[str, Preset] = {
    "sd-turbo": Preset(
        SD_TURBO_UNET, SD_TURBO_TEXT_ENCODER, SD_TURBO_VAE, TAESD, SD_TURBO_SCHEDULER
    ),
    "tiny": Preset(TINY_UNET, TINY_TEXT_ENCODER, TINY_VAE, TINY_TAESD, SD_TURBO_SCHEDULER),
    "sdxl-turbo": Preset(
        SDXL_TURBO_UNET,
        SDXL_TEXT_ENCODER,
        SDXL_VAE,
        TAESD,
        SDXL_TURBO_SCHEDULER,
        SDXL_TEXT_ENCODER_2,
    ),
    # Euler (not ancestral) so that one step is deterministic against diffusers' pipeline
    "tiny-sdxl": Preset(
        TINY_SDXL_UNET,
        TINY_TEXT_ENCODER,
        TINY_VAE_SDXL,
        TINY_TAESD,
        SD_TURBO_SCHEDULER,
        TINY_TEXT_ENCODER,
    ),
}


@dataclass(frozen=True)
class ModelFolders:
    """Where :func:`write_model_folder` wrote: ``model`` is for --model, ``taesd`` for --vae."""

    model: Path
    taesd: Path


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# -- tokenizer ---------------------------------------------------------------------------------
def byte_symbols() -> list[str]:
    """One printable character per byte value, the byte-level BPE convention CLIP uses."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def tokenizer_vocabulary() -> dict[str, int]:
    """A minimal CLIP vocabulary: every byte symbol, alone and word-final, plus the specials."""
    symbols = byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """A CLIPTokenizer folder as the hub has it: vocab.json, merges.txt, tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocabulary()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# -- random-weight components ----------------------------------------------------------------
def build_components(name: str, *, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Random-initialised unet, text_encoder, tokenizer, vae, taesd and scheduler for a preset.

    ``device`` is where the weights are initialised (on a GPU this takes seconds, not minutes);
    the tokenizer is written to and read from a temporary folder.
    """
    import tempfile

    import torch

    diffusers = importlib.import_module("diffusers")
    transformers = importlib.import_module("transformers")

    chosen = preset(name)
    torch.manual_seed(seed)
    with torch.device(device):
        components: dict[str, Any] = {
            "unet": diffusers.UNet2DConditionModel(**chosen.unet),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**chosen.text_encoder)
            ),
            "vae": diffusers.AutoencoderKL(**chosen.vae),
            "taesd": diffusers.AutoencoderTiny(**chosen.taesd),
        }
        if chosen.text_encoder_2 is not None:
            components["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**chosen.text_encoder_2)
            )
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tokenizer(Path(scratch) / "tokenizer")
        components["tokenizer"] = transformers.CLIPTokenizer.from_pretrained(folder)
        if chosen.text_encoder_2 is not None:
            components["tokenizer_2"] = components["tokenizer"]
    scheduler_class = getattr(diffusers, chosen.scheduler["_class_name"])
    components["scheduler"] = scheduler_class.from_config(chosen.scheduler)
    for module in ("unet", "text_encoder", "text_encoder_2", "vae", "taesd"):
        if module in components:
            components[module].eval()
    if name.startswith("tiny"):
        spread_decoder_output(components["taesd"], components["taesd"].decoder.layers[-1])
        spread_decoder_output(components["vae"], components["vae"].decoder.conv_out)
    return components


def spread_decoder_output(vae: Any, last_conv: Any, *, seed: int = 0) -> None:
    """Rescale a random decoder's last convolution so that its images spread over [-1, 1].

    A random-initialised decoder puts nearly every pixel below -1 (black once clamped), which
    would hide the differences the tests look for; this re-centres its output at 0 with a
    spread of 0.5. Deterministic for a given seed.
    """
    import torch

    captured: list[torch.Tensor] = []
    hook = last_conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
        hook.remove()
        conv = captured[0]
        # the decoder maps its last convolution to pixels affinely: images = gain * conv + offset
        gain = float(images.std() / conv.std())
        offset = float(images.mean()) - gain * float(conv.mean())
        factor = 0.5 / gain / float(conv.std())
        last_conv.weight.mul_(factor)
        last_conv.bias.sub_(float(conv.mean())).mul_(factor).add_(-offset / gain)


def write_model_folder(folder: Path | str, name: str = "tiny", *, seed: int = 0) -> ModelFolders:
    """Save a random-weight model in diffusers layout under ``folder``/model and a Tiny
    AutoEncoder under ``folder``/taesd (as madebyollin/taesd is laid out)."""
    root = Path(folder)
    model_dir, taesd_dir = root / "model", root / "taesd"
    components = build_components(name, seed=seed)
    sdxl = "text_encoder_2" in components
    parts = ["unet", "text_encoder", "vae", "scheduler"] + (["text_encoder_2"] if sdxl else [])
    for part in parts:
        components[part].save_pretrained(model_dir / part)
    for tokenizer in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        write_tokenizer(model_dir / tokenizer)
    components["taesd"].save_pretrained(taesd_dir)
    _drop_config_keys(taesd_dir / "config.json", "block_out_channels")
    index = _sdxl_model_index() if sdxl else _model_index()
    (model_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return ModelFolders(model=model_dir, taesd=taesd_dir)


def tiny_options(folders: ModelFolders, size: int = 64) -> dict[str, Any]:
    """``Settings`` fields that serve the model in ``folders`` on the CPU at ``size`` x ``size``."""
    return {
        "pipeline": "diffusion",
        "model": str(folders.model),
        "vae": str(folders.taesd),
        "device": "cpu",
        "width": size,
        "height": size,
    }


def _drop_config_keys(path: Path, *keys: str) -> None:
    """Remove keys diffusers adds on save but the published config does not have."""
    config = json.loads(path.read_text())
    for key in keys:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _sdxl_model_index() -> dict[str, Any]:
    """An SDXL pipeline's index, as sdxl-turbo's (an empty negative prompt is zeros)."""
    return {
        **_model_index(),
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "image_encoder": [None, None],
    }


def parameter_count(module: Any) -> int:
    """Number of parameters of a torch module."""
    return int(sum(parameter.numel() for parameter in module.parameters()))
