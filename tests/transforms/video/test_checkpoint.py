"""The original Wan / Self-Forcing key names convert to diffusers' and load strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from livediff.testing.video_models import TINY_WAN_TRANSFORMER, build_wan_transformer
from livediff.transforms.video.checkpoint import (
    CheckpointKeyError,
    convert_state_dict,
    load_transformer_weights,
    read_checkpoint,
)


def original_state_dict(model: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model``'s weights under the original Wan module's names, written out by hand from the
    modules (not by renaming diffusers' keys), as a Self-Forcing generator saves them."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, linear: Any) -> None:
        out[f"{prefix}{name}.weight"] = linear.weight.detach().clone()
        out[f"{prefix}{name}.bias"] = linear.bias.detach().clone()

    put("patch_embedding", model.patch_embedding)
    cond = model.condition_embedder
    put("text_embedding.0", cond.text_embedder.linear_1)
    put("text_embedding.2", cond.text_embedder.linear_2)
    put("time_embedding.0", cond.time_embedder.linear_1)
    put("time_embedding.2", cond.time_embedder.linear_2)
    put("time_projection.1", cond.time_proj)
    put("head.head", model.proj_out)
    out[f"{prefix}head.modulation"] = model.scale_shift_table.detach().clone()
    for n, block in enumerate(model.blocks):
        for original, attn in (("self_attn", block.attn1), ("cross_attn", block.attn2)):
            for short, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
                put(f"blocks.{n}.{original}.{short}", linear)
            put(f"blocks.{n}.{original}.o", attn.to_out[0])
            out[f"{prefix}blocks.{n}.{original}.norm_q.weight"] = (
                attn.norm_q.weight.detach().clone()
            )
            out[f"{prefix}blocks.{n}.{original}.norm_k.weight"] = (
                attn.norm_k.weight.detach().clone()
            )
        put(f"blocks.{n}.norm3", block.norm2)
        put(f"blocks.{n}.ffn.0", block.ffn.net[0].proj)
        put(f"blocks.{n}.ffn.2", block.ffn.net[2])
        out[f"{prefix}blocks.{n}.modulation"] = block.scale_shift_table.detach().clone()
    return out


def sample_output(model: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((1, TINY_WAN_TRANSFORMER["in_channels"], 2, 4, 4), generator=gen)
    text = torch.randn((1, 8, TINY_WAN_TRANSFORMER["text_dim"]), generator=gen)
    return model(latents, torch.tensor([400.0]), text).sample  # type: ignore[no-any-return]


@pytest.mark.parametrize("prefix", ["", "model.", "generator.model."])
def test_original_keys_round_trip_into_diffusers(transformer: Any, prefix: str) -> None:
    original = original_state_dict(transformer, prefix)
    assert f"{prefix}blocks.0.self_attn.q.weight" in original
    assert len(original) == len(transformer.state_dict())
    fresh = build_wan_transformer(TINY_WAN_TRANSFORMER, seed=7)
    assert (sample_output(fresh) - sample_output(transformer)).abs().max() > 1e-3
    load_transformer_weights(fresh, {"generator_ema": original} if prefix else original)
    assert torch.equal(sample_output(fresh), sample_output(transformer))


def test_a_saved_training_checkpoint_reads_and_loads(transformer: Any, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"generator": original_state_dict(transformer, "model.")}, path)
    fresh = build_wan_transformer(TINY_WAN_TRANSFORMER, seed=8)
    load_transformer_weights(fresh, read_checkpoint(path))
    assert torch.equal(sample_output(fresh), sample_output(transformer))


def test_unknown_keys_are_refused_not_dropped(transformer: Any) -> None:
    original = original_state_dict(transformer)
    original["img_emb.proj.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="img_emb"):
        convert_state_dict(original)
    missing = original_state_dict(transformer)
    del missing["blocks.1.ffn.2.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        load_transformer_weights(build_wan_transformer(TINY_WAN_TRANSFORMER), missing)
