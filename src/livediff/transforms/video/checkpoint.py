"""The causal checkpoints StreamDiffusionV2 / Self-Forcing / CausVid publish, in diffusers' names.

Those projects train the original Wan module (``WanModel``/``CausalWanModel``: the causal model has
the same parameters as the bidirectional one) and save its state dict under their wrapper's names:
``{"generator": ..., "generator_ema": ...}`` (or a bare state dict), keys prefixed with the
wrapper's attribute (``model.``, and sometimes ``module.`` / ``_fsdp_wrapped_module.`` /
``model.diffusion_model.``). :func:`convert_state_dict` strips those prefixes and renames each
original Wan key to diffusers' ``WanTransformer3DModel`` name; :func:`load_transformer_weights`
loads the result with ``strict=True``.

Invariants: the rename is one-to-one (two original keys never land on one name), tensors pass
through unchanged (same object, same dtype), and a key no rule knows is refused, never dropped
(an image-to-video checkpoint's ``img_emb`` / ``k_img`` weights, say, are not silently ignored).

Where a checkpoint comes from (``--video-checkpoint`` / ``LIVEDIFF_VIDEO_CHECKPOINT``,
:func:`locate_checkpoint`): a local ``.pt`` / ``.safetensors`` file, or a hub file written
``repo_id:path/in/repo`` and fetched by huggingface_hub into the model cache (so
``HF_HUB_OFFLINE`` applies), e.g. StreamDiffusionV2's ``jerryfeng/StreamDiffusionV2:
wan_causal_dmd_v2v/model.pt`` or Self-Forcing's ``gdhe17/Self-Forcing:checkpoints/
self_forcing_dmd.pt``; both were trained from Wan 2.1 T2V 1.3B, whose diffusers layout
(``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, the default model) is the base they load over.

The original names, and diffusers' (original Wan's ``norm3`` is the cross-attention norm, which
diffusers calls ``norm2``; its ``norm1``/``norm2`` have no weights)::

    patch_embedding.*                         patch_embedding.*
    text_embedding.{0,2}.*                    condition_embedder.text_embedder.linear_{1,2}.*
    time_embedding.{0,2}.*                    condition_embedder.time_embedder.linear_{1,2}.*
    time_projection.1.*                       condition_embedder.time_proj.*
    blocks.N.self_attn.{q,k,v,o}.*            blocks.N.attn1.{to_q,to_k,to_v,to_out.0}.*
    blocks.N.self_attn.norm_{q,k}.weight      blocks.N.attn1.norm_{q,k}.weight
    blocks.N.cross_attn.*                     blocks.N.attn2.* (as self_attn)
    blocks.N.norm3.*                          blocks.N.norm2.*
    blocks.N.ffn.0.*  /  blocks.N.ffn.2.*     blocks.N.ffn.net.0.proj.*  /  blocks.N.ffn.net.2.*
    blocks.N.modulation                       blocks.N.scale_shift_table
    head.head.*  /  head.modulation           proj_out.*  /  scale_shift_table
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: Wrapper prefixes stripped from the front of a key (repeatedly, in any order).
WRAPPER_PREFIXES = (
    "generator.",
    "generator_ema.",
    "module.",
    "_fsdp_wrapped_module.",
    "_orig_mod.",
    "model.diffusion_model.",
    "diffusion_model.",
    "model.",
)
#: Top-level entries of a training checkpoint that hold the generator, in order of preference.
GENERATOR_ENTRIES = ("generator_ema", "generator", "state_dict", "model")

_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_ATTENTIONS = {"self_attn": "attn1", "cross_attn": "attn2"}
_PARAM = r"(weight|bias)"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (rf"^patch_embedding\.{_PARAM}$", r"patch_embedding.\1"),
        (rf"^text_embedding\.0\.{_PARAM}$", r"condition_embedder.text_embedder.linear_1.\1"),
        (rf"^text_embedding\.2\.{_PARAM}$", r"condition_embedder.text_embedder.linear_2.\1"),
        (rf"^time_embedding\.0\.{_PARAM}$", r"condition_embedder.time_embedder.linear_1.\1"),
        (rf"^time_embedding\.2\.{_PARAM}$", r"condition_embedder.time_embedder.linear_2.\1"),
        (rf"^time_projection\.1\.{_PARAM}$", r"condition_embedder.time_proj.\1"),
        (rf"^head\.head\.{_PARAM}$", r"proj_out.\1"),
        (r"^head\.modulation$", "scale_shift_table"),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (rf"^blocks\.(\d+)\.norm3\.{_PARAM}$", r"blocks.\1.norm2.\2"),
        (rf"^blocks\.(\d+)\.ffn\.0\.{_PARAM}$", r"blocks.\1.ffn.net.0.proj.\2"),
        (rf"^blocks\.(\d+)\.ffn\.2\.{_PARAM}$", r"blocks.\1.ffn.net.2.\2"),
    )
)
_ATTENTION_KEY = re.compile(
    rf"^blocks\.(\d+)\.(self_attn|cross_attn)\.(?:(q|k|v|o)\.{_PARAM}|norm_(q|k)\.weight)$"
)


#: ``owner/name:path/in/repo``: a file of a hub repository.
HUB_FILE = re.compile(r"^([\w.-]+/[\w.-]+):(.+)$")
#: The file formats a checkpoint may have.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


class CheckpointKeyError(KeyError):
    """A checkpoint key that no rule maps, two keys that map to one name, or a checkpoint whose
    keys are not the transformer's (the message names the missing and unexpected ones)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointUnavailableError(LookupError):
    """The checkpoint file or hub file cannot be found here."""


def strip_wrapper_prefix(key: str) -> str:
    """``key`` without the training wrappers' prefixes (``generator.model.blocks.0...``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def diffusers_key(original: str) -> str:
    """diffusers' name for one original Wan key (wrapper prefixes allowed)."""
    key = strip_wrapper_prefix(original)
    found = _ATTENTION_KEY.match(key)
    if found:
        block, attention, projection, param, norm = found.groups()
        prefix = f"blocks.{block}.{_ATTENTIONS[attention]}"
        if norm:
            return f"{prefix}.norm_{norm}.weight"
        return f"{prefix}.{_PROJECTIONS[projection]}.{param}"
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise CheckpointKeyError(f"no diffusers name for checkpoint key {original!r}")


def generator_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The generator's state dict in a training checkpoint (EMA weights first), or the
    checkpoint itself when it is already a flat state dict."""
    for entry in GENERATOR_ENTRIES:
        nested = checkpoint.get(entry)
        if isinstance(nested, Mapping):
            return nested
    return checkpoint


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every original key renamed to diffusers' (see the module doc); refuses unknown keys."""
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in generator_state_dict(state_dict).items():
        try:
            name = diffusers_key(key)
        except CheckpointKeyError:
            unknown.append(key)
            continue
        if name in converted:
            raise CheckpointKeyError(f"{key!r} and {sources[name]!r} both map to {name!r}")
        converted[name], sources[name] = tensor, key
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise CheckpointKeyError(f"{len(unknown)} checkpoint keys have no diffusers name: {shown}")
    return converted


def locate_checkpoint(spec: str, model_dir: str | None, download: bool = False) -> Path:
    """The checkpoint file ``spec`` names: a local file, or ``repo_id:path/in/repo`` from the hub
    cache (fetched when ``download``); raises :class:`CheckpointUnavailableError` saying how to
    get it."""
    local = Path(spec).expanduser()
    hub = HUB_FILE.match(spec)
    if local.exists() or hub is None:
        return _checked_file(local, spec)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename = hub.groups()
    try:
        path = hf_hub_download(
            repo_id, filename, cache_dir=model_dir, local_files_only=not download
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointUnavailableError(
            f"video checkpoint {spec!r} is not available here ({exc}); fetch it with"
            f" `livediff prepare-models --pipeline video --video-checkpoint {spec}`"
        ) from exc
    return _checked_file(Path(path), spec)


def _checked_file(path: Path, spec: str) -> Path:
    if not path.is_file():
        raise CheckpointUnavailableError(
            f"video checkpoint {spec!r}: no such file; give a local .pt or .safetensors file or"
            " a hub file as repo_id:path/in/repo"
        )
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointUnavailableError(
            f"video checkpoint {spec!r}: {path.suffix or 'no suffix'} is not a checkpoint format"
            f" ({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    return path


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """A checkpoint file's contents: safetensors, or a torch pickle read with weights only
    (memory-mapped when it is in torch's zip format, so the tensors are paged in as loaded)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    mmap = zipfile.is_zipfile(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def load_transformer_weights(model: torch.nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Load an original-format causal checkpoint into a ``WanTransformer3DModel`` (strict: every
    parameter replaced, none left over; otherwise :class:`CheckpointKeyError` naming them)."""
    converted = convert_state_dict(checkpoint)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise CheckpointKeyError(
            "the checkpoint does not fit the transformer:"
            f" missing {len(missing)} ({', '.join(missing[:8])}),"
            f" unexpected {len(unexpected)} ({', '.join(unexpected[:8])})"
        )
    model.load_state_dict(converted, strict=True)
