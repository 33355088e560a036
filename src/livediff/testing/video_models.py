"""Wan 2.1 configurations (the published T2V 1.3B ones and tiny ones) and random-weight builders.

Like :mod:`livediff.testing.models` for the SD family: no weights can be downloaded where the
tests and benchmarks run, but a random-initialised model with the published configuration costs
the same FLOPs as the real one, and a tiny one exercises the same code in milliseconds.

The configs are plain data (diffusers' ``config.json`` fields, without the ``_class_name`` and
``_diffusers_version`` entries); torch and diffusers are imported only by the builders.
"""

from __future__ import annotations

import importlib
from typing import Any

# -- Wan 2.1 T2V 1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), as published --------------------------
WAN21_T2V_1_3B_TRANSFORMER: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
#: The UMT5-XXL encoder (transformers' ``UMT5EncoderModel``); prompts are padded to 512 tokens.
WAN21_UMT5_TEXT_ENCODER: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
}
WAN21_TEXT_TOKENS = 512
#: Wan's VAE: 4 video frames per latent frame (after the first frame alone), 8x8 pixels per latent.
WAN_TEMPORAL_COMPRESSION = 4
WAN_SPATIAL_COMPRESSION = 8

# -- tiny ones, for tests: the same architecture in a few ten thousand parameters -----------------
TINY_WAN_TRANSFORMER: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 12,  # split by Wan's RoPE into 4 (time) + 4 (rows) + 4 (columns)
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 48,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
TINY_WAN_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [0.1, -0.2, 0.3, 0.0],
    "latents_std": [1.5, 0.8, 1.2, 2.0],
}
TINY_TEXT_TOKENS = 8


def build_wan_transformer(config: dict[str, Any], seed: int = 0, dtype: Any = None) -> Any:
    """A ``WanTransformer3DModel`` of ``config`` with seeded random weights, in eval mode.

    Wan's output projection and modulation tables start near zero in training checkpoints; here
    every weight is random so that outputs depend on every input."""
    import torch

    torch.manual_seed(seed)
    model = importlib.import_module("diffusers").WanTransformer3DModel(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1 and not parameter.any():
                parameter.normal_(0.0, 0.02)
    model.eval()
    return model if dtype is None else model.to(dtype)


def build_wan_vae(config: dict[str, Any], seed: int = 0, dtype: Any = None) -> Any:
    """An ``AutoencoderKLWan`` of ``config`` with seeded random weights, in eval mode."""
    import torch

    torch.manual_seed(seed)
    vae = importlib.import_module("diffusers").AutoencoderKLWan(**config)
    vae.eval()
    return vae if dtype is None else vae.to(dtype)


def count_parameters(model: Any) -> int:
    """Parameters in ``model`` (for the tests' size budget and the benchmark's report)."""
    return sum(int(parameter.numel()) for parameter in model.parameters())


#: A tiny UMT5 encoder whose width is the tiny transformer's ``text_dim``.
TINY_UMT5_TEXT_ENCODER: dict[str, Any] = {
    **WAN21_UMT5_TEXT_ENCODER,
    "d_model": TINY_WAN_TRANSFORMER["text_dim"],
    "d_ff": 32,
    "d_kv": 8,
    "num_heads": 2,
    "num_layers": 2,
    "vocab_size": 64,
}
#: The tiny tokenizer's characters (each one token; anything else is <unk>).
TINY_TOKENIZER_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def build_tiny_tokenizer(max_tokens: int = TINY_TEXT_TOKENS) -> Any:
    """A character-level fast tokenizer (pad 0, eos 1, unk 2; ``</s>`` appended), standing in
    for UMT5's SentencePiece one so that different prompts give different tokens."""
    tokenizers = importlib.import_module("tokenizers")
    transformers = importlib.import_module("transformers")
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate([*specials, *TINY_TOKENIZER_CHARACTERS])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex("."), behavior="isolated"
    )
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_tokens,
    )


def build_umt5_encoder(config: dict[str, Any], seed: int = 0) -> Any:
    """A ``UMT5EncoderModel`` of ``config`` with seeded random weights, in eval mode."""
    import torch

    transformers = importlib.import_module("transformers")
    torch.manual_seed(seed)
    encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(**config))
    encoder.eval()
    return encoder


def write_tiny_wan_folder(folder: Any, seed: int = 0) -> Any:
    """A tiny random Wan 2.1 T2V model written as ``WanPipeline.save_pretrained`` writes one
    (transformer, VAE, UMT5 encoder, tokenizer, scheduler): what ``--model <folder>`` loads."""
    diffusers = importlib.import_module("diffusers")
    pipeline = diffusers.WanPipeline(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=build_umt5_encoder(TINY_UMT5_TEXT_ENCODER, seed),
        transformer=build_wan_transformer(TINY_WAN_TRANSFORMER, seed),
        vae=build_wan_vae(TINY_WAN_VAE, seed),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipeline.save_pretrained(folder)
    return folder
