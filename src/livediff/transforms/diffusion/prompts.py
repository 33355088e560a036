"""Prompt embeddings: one text-encoder pass per distinct text, kept in a small LRU cache.

A session's prompt (or weighted blend of prompts) is turned into one embedding when its params
change, never per frame; sessions with the same text share the cached pass.

The SD family has one CLIP text encoder: its last hidden state is the embedding. The SDXL family
has two (CLIP ViT-L and OpenCLIP ViT-bigG with a projection): the embedding is both encoders'
penultimate hidden states side by side, and the second one's projected pooled output goes to the
UNet as ``text_embeds`` (what diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes);
an empty negative prompt is zeros when the model asks for it (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PromptEmbedding:
    """What the UNet reads of a prompt: ``hidden`` (1, tokens, width) for cross-attention, and
    for SDXL ``pooled`` (1, width_2), the second encoder's projected pooled output."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def scaled_add(self, other: PromptEmbedding, weight: float) -> PromptEmbedding:
        """``self + weight * other`` (both parts)."""
        pooled = None
        if self.pooled is not None and other.pooled is not None:
            pooled = self.pooled + other.pooled * weight
        return PromptEmbedding(self.hidden + other.hidden * weight, pooled)

    def zeros(self) -> PromptEmbedding:
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return PromptEmbedding(torch.zeros_like(self.hidden), pooled)


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer and its text encoder."""

    tokenizer: Any
    model: Any


class PromptEncoder:
    """Text -> :class:`PromptEmbedding`, as diffusers' ``encode_prompt`` computes it."""

    def __init__(
        self,
        encoders: Sequence[TextEncoder],
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int,
        *,
        zeros_for_empty: bool = False,
    ) -> None:
        """One encoder: the SD family; two: SDXL (``zeros_for_empty``: the model's
        ``force_zeros_for_empty_prompt``, for negative prompts)."""
        self._encoders = list(encoders)
        self._device = device
        self._dtype = dtype
        self._cache_size = cache_size
        self._zeros_for_empty = zeros_for_empty
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()

    @property
    def sdxl(self) -> bool:
        return len(self._encoders) == 2

    def encode(self, text: str) -> PromptEmbedding:
        """The embedding of ``text`` (from the cache when it was asked for recently)."""
        found = self._cache.get(text)
        if found is not None:
            self._cache.move_to_end(text)
            return found
        found = self._run(text)
        self._cache[text] = found
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found

    def negative(self, text: str) -> PromptEmbedding:
        """A negative prompt's embedding: zeros for an empty one when the model asks."""
        embedding = self.encode(text)
        return embedding.zeros() if self._zeros_for_empty and not text else embedding

    def blend(self, weighted: tuple[tuple[str, float], ...]) -> PromptEmbedding:
        """The weight-normalised sum of the embeddings of several texts."""
        if len(weighted) == 1:
            return self.encode(weighted[0][0])
        total = sum(weight for _, weight in weighted)
        blended = self.encode(weighted[0][0]).zeros()
        for text, weight in weighted:
            blended = blended.scaled_add(self.encode(text), weight / total)
        return blended

    @torch.inference_mode()
    def _run(self, text: str) -> PromptEmbedding:
        if not self.sdxl:
            outputs = self._encoder_outputs(self._encoders[0], text, hidden_states=False)
            return PromptEmbedding(outputs[0].to(self._dtype))
        hidden, pooled = [], None
        for encoder in self._encoders:
            outputs = self._encoder_outputs(encoder, text, hidden_states=True)
            hidden.append(outputs.hidden_states[-2])
            pooled = outputs[0]  # the last encoder's projected pooled output
        assert pooled is not None
        return PromptEmbedding(torch.cat(hidden, dim=-1).to(self._dtype), pooled.to(self._dtype))

    def _encoder_outputs(self, encoder: TextEncoder, text: str, *, hidden_states: bool) -> Any:
        tokens = encoder.tokenizer(
            text,
            padding="max_length",
            max_length=encoder.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(encoder.model.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self._device)
        ids = tokens.input_ids.to(self._device)
        return encoder.model(ids, attention_mask=mask, output_hidden_states=hidden_states)
