"""Prompt embeddings: one text-encoder pass per distinct text, kept in a small LRU cache.

A session's prompt (or weighted blend of prompts) is turned into one embedding when its params
change, never per frame; sessions with the same text share the cached pass.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class PromptEncoder:
    """Text -> (1, tokens, width) embedding, as diffusers' ``encode_prompt`` computes it."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int,
    ) -> None:
        self._tokenizer = tokenizer
        self._text_encoder = text_encoder
        self._device = device
        self._dtype = dtype
        self._cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, text: str) -> torch.Tensor:
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

    def blend(self, weighted: tuple[tuple[str, float], ...]) -> torch.Tensor:
        """The weight-normalised sum of the embeddings of several texts."""
        if len(weighted) == 1:
            return self.encode(weighted[0][0])
        total = sum(weight for _, weight in weighted)
        blended = torch.zeros_like(self.encode(weighted[0][0]))
        for text, weight in weighted:
            blended.add_(self.encode(text), alpha=weight / total)
        return blended

    @torch.inference_mode()
    def _run(self, text: str) -> torch.Tensor:
        tokens = self._tokenizer(
            text,
            padding="max_length",
            max_length=self._tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self._text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self._device)
        ids = tokens.input_ids.to(self._device)
        hidden: torch.Tensor = self._text_encoder(ids, attention_mask=mask)[0]
        return hidden.to(self._dtype)
