"""The original Wan / Self-Forcing key names convert to diffusers' and load strictly; a causal
checkpoint (a file, or a hub file from the model cache) loads over a Wan folder through the path
``serve --pipeline video --video-checkpoint`` takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from livediff.cli import prepare_video_model
from livediff.config import Settings
from livediff.testing.video_models import (
    TINY_WAN_TRANSFORMER,
    build_wan_transformer,
    write_tiny_wan_folder,
)
from livediff.transforms import resolve_transform
from livediff.transforms.video.checkpoint import (
    CheckpointKeyError,
    CheckpointUnavailableError,
    convert_state_dict,
    load_transformer_weights,
    read_checkpoint,
)
from livediff.transforms.video.transform import VideoTransform


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
    with pytest.raises(CheckpointKeyError, match=r"missing 1 \(blocks\.1\.ffn\.net\.2\.bias\)"):
        load_transformer_weights(build_wan_transformer(TINY_WAN_TRANSFORMER), missing)
    deeper = original_state_dict(build_wan_transformer({**TINY_WAN_TRANSFORMER, "num_layers": 3}))
    with pytest.raises(CheckpointKeyError, match=r"unexpected \d+ \(blocks\.2\.attn1"):
        load_transformer_weights(build_wan_transformer(TINY_WAN_TRANSFORMER), deeper)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "model", seed=0))


@pytest.fixture(scope="module")
def causal() -> Any:
    """The "trained" causal transformer: other weights than the base folder's."""
    return build_wan_transformer(TINY_WAN_TRANSFORMER, seed=11)


def served_transformer(settings: Settings) -> Any:
    """The transformer ``serve`` would run with ``settings`` (constructed, checked, loaded)."""
    transform = resolve_transform("video")(settings)
    assert isinstance(transform, VideoTransform)
    transform.load()
    return transform._model().transformer


def write_checkpoint(model: Any, path: Path) -> Path:
    """``model`` saved as the projects publish it: a training checkpoint in the original names
    (torch), or a flat original-name state dict (safetensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(original_state_dict(model), str(path))
    else:
        torch.save({"generator_ema": original_state_dict(model, "model.")}, path)
    return path


@pytest.mark.parametrize("name", ["model.pt", "causal.safetensors"])
def test_a_causal_checkpoint_replaces_the_served_transformer(
    wan_folder: Path, causal: Any, tmp_path: Path, name: str
) -> None:
    path = write_checkpoint(causal, tmp_path / name)
    base = served_transformer(Settings(pipeline="video", model=str(wan_folder), device="cpu"))
    served = served_transformer(
        Settings(pipeline="video", model=str(wan_folder), device="cpu", video_checkpoint=str(path))
    )
    weights = served.state_dict()
    assert all(torch.equal(weights[key], value) for key, value in causal.state_dict().items())
    assert torch.equal(sample_output(served), sample_output(causal))
    assert not torch.equal(sample_output(base), sample_output(served))  # the base was replaced


def hub_cache_file(cache: Path, repo_id: str, filename: str) -> Path:
    """Where huggingface_hub keeps ``filename`` of ``repo_id`` at main in the cache ``cache``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit / filename


def test_a_hub_checkpoint_comes_from_the_model_cache_offline(
    wan_folder: Path,
    causal: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    spec = "jerryfeng/StreamDiffusionV2:wan_causal_dmd_v2v/model.pt"
    cached = write_checkpoint(causal, hub_cache_file(cache, *spec.split(":")))
    settings = Settings(
        pipeline="video",
        model=str(wan_folder),
        model_dir=str(cache),
        device="cpu",
        video_checkpoint=spec,
    )
    assert prepare_video_model(settings) == 0
    assert f"video checkpoint: {cached}" in capsys.readouterr().out
    assert torch.equal(sample_output(served_transformer(settings)), sample_output(causal))
    # the checkpoint is a server setting, not a model id params may name
    assert VideoTransform.configured_model_ids(settings) == {str(wan_folder)}
    missing = settings.model_copy(update={"video_checkpoint": "gdhe17/Self-Forcing:none.pt"})
    with pytest.raises(CheckpointUnavailableError, match="prepare-models --pipeline video"):
        served_transformer(missing)


def test_a_missing_or_bad_checkpoint_is_a_clear_error(wan_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointUnavailableError, match="no such file"):
        VideoTransform(
            Settings(
                pipeline="video",
                model=str(wan_folder),
                device="cpu",
                video_checkpoint=str(tmp_path / "missing.pt"),
            )
        )
    wrong = tmp_path / "wrong.pt"
    state = original_state_dict(build_wan_transformer(TINY_WAN_TRANSFORMER))
    state["blocks.0.self_attn.qq.weight"] = torch.zeros(1)
    torch.save({"generator": state}, wrong)
    settings = Settings(
        pipeline="video", model=str(wan_folder), device="cpu", video_checkpoint=str(wrong)
    )
    with pytest.raises(CheckpointKeyError, match=r"blocks\.0\.self_attn\.qq\.weight"):
        served_transformer(settings)
