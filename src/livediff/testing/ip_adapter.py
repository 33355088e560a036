"""Random IP-Adapters in h94's layout, for tests and benchmarks (no hub here).

:func:`write_ip_adapter` saves what ``h94/IP-Adapter`` holds for a UNet's family: the adapter
file (``models/ip-adapter_sd15.bin`` for the SD family, ``sdxl_models/ip-adapter_sdxl.bin`` for
SDXL: ``image_proj`` with a plain projection to 4 tokens and ``ip_adapter`` with each
cross-attention's ``to_k_ip`` / ``to_v_ip``) and a tiny random CLIP image encoder beside it
(``image_encoder/``). :func:`style_data_url` is a random style image as a ``data:`` URL.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

#: The tiny image encoder's projected embedding width.
EMBED = 12
#: Image tokens a plain IP-Adapter makes.
TOKENS = 4
#: Where h94 keeps each family's adapter (by "is SDXL").
FILES = {False: ("models", "ip-adapter_sd15.bin"), True: ("sdxl_models", "ip-adapter_sdxl.bin")}


def write_ip_adapter(folder: Path, unet: Any, *, seed: int, width: int | None = None) -> str:
    """A random IP-Adapter for ``unet`` in h94's layout under ``folder``; ``width`` other than
    the UNet's cross-attention width makes one of another family. Returns the folder."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cross = width or int(unet.config.cross_attention_dim)
    image_proj = {
        "proj.weight": torch.randn(TOKENS * cross, EMBED) * 0.3,
        "proj.bias": torch.randn(TOKENS * cross) * 0.1,
        "norm.weight": 1 + torch.randn(cross) * 0.1,
        "norm.bias": torch.randn(cross) * 0.1,
    }
    layers: dict[str, torch.Tensor] = {}
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(names):
        out = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
        for part in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{part}.weight"] = torch.randn(out, cross) * 0.5
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    subfolder, name = (
        ("sdxl_models", "ip-adapter_sdxl.bin") if sdxl else ("models", "ip-adapter_sd15.bin")
    )
    family = Path(folder) / subfolder
    family.mkdir(parents=True)
    torch.save({"image_proj": image_proj, "ip_adapter": layers}, family / name)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=EMBED,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(family / "image_encoder")
    return str(folder)


def style_png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A random RGB picture, PNG-encoded."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def style_data_url(seed: int) -> str:
    """:func:`style_png` as a ``data:image/png;base64,`` URL."""
    return "data:image/png;base64," + base64.b64encode(style_png(seed)).decode()
