"""Random LoRAs in diffusers' own format, for tests and benchmarks (no hub here).

:func:`write_lora` saves what ``StableDiffusionPipeline.save_lora_weights`` saves for a peft
LoRA trained on a UNet of ``unet_config``: ``pytorch_lora_weights.safetensors`` with keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the peft config (rank, alpha) in its
metadata, so diffusers' ``load_lora_weights`` and livediff read the same file.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The UNet modules a LoRA trains by default here: attention projections and the resnets'
#: first convolutions (so Linear and Conv2d updates are both exercised).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1")


def write_lora(
    folder: Path,
    unet_config: dict[str, Any],
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.2,
    targets: Sequence[str] = TARGETS,
) -> Path:
    """A random LoRA for UNets of ``unet_config`` saved in ``folder``; returns the folder."""
    import torch

    diffusers = importlib.import_module("diffusers")
    peft = importlib.import_module("peft")
    peft_utils = importlib.import_module("peft.utils")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    unet.add_adapter(config)
    layers = peft_utils.get_peft_model_state_dict(unet)
    with torch.no_grad():
        for tensor in layers.values():
            tensor.normal_(0.0, std)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    return folder
