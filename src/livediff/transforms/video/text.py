"""Prompt embeddings with Wan's UMT5 encoder, computed once per prompt and cached.

As ``WanPipeline`` encodes a prompt: tokens padded to ``max_tokens``, the encoder's last hidden
state, every position past the prompt's own tokens zeroed. A weighted prompt
``[[text, weight], ...]`` is the weighted sum of its texts' embeddings (weights summing to 1).

The encoder may run on another device than the transformer (UMT5-XXL on the CPU,
``--video-text-device cpu``): the embedding is made where the encoder is, then moved once to the
transformer's device and dtype, and cached there. Invariant: :meth:`PromptEncoder.embed` returns a
tensor on ``device`` in ``dtype``, whatever device the encoder runs on; the copy is issued on
the calling thread's current stream, the stream that then reads it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

#: Wan's text length (UMT5 tokens per prompt).
WAN_TEXT_TOKENS = 512


class PromptEncoder:
    """Embeddings ``(1, max_tokens, dim)`` by weighted prompt, least recently used evicted."""

    def __init__(
        self,
        encoder: Any,
        tokenizer: Any,
        max_tokens: int = WAN_TEXT_TOKENS,
        size: int = 32,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.size = size
        #: Where and in what dtype the embeddings are returned (the transformer's).
        self.device: torch.device = encoder.device if device is None else device
        self.dtype: torch.dtype = encoder.dtype if dtype is None else dtype
        self.encoded = 0  #: encoder calls so far (one per text not already cached)
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompts: OrderedDict[tuple[tuple[str, float], ...], torch.Tensor] = OrderedDict()

    def embed(self, prompts: Sequence[tuple[str, float]]) -> torch.Tensor:
        """The blended embedding of ``prompts`` on ``device`` in ``dtype`` (cached by the exact
        pairs)."""
        key = tuple(prompts)
        found = self._prompts.get(key)
        if found is None:
            parts = [weight * self._text(text).float() for text, weight in key]
            blended = torch.stack(parts).sum(0)
            found = blended.to(device=self.device, dtype=self.dtype)
            _put(self._prompts, key, found, self.size)
        self._prompts.move_to_end(key)
        return found

    def _text(self, text: str) -> torch.Tensor:
        found = self._texts.get(text)
        if found is None:
            found = self._encode(text)
            _put(self._texts, text, found, self.size)
        self._texts.move_to_end(text)
        return found

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [text],
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.encoder.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden: torch.Tensor = self.encoder(ids, mask).last_hidden_state
        self.encoded += 1
        masked: torch.Tensor = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return masked


def _put(cache: OrderedDict[Any, torch.Tensor], key: Any, value: torch.Tensor, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
