"""StreamV2V's feature bank (``cached_attention``), per session, in one UNet batch.

Every self-attention layer of the UNet (``attn1`` of each transformer block) also attends to the
keys and values it computed for up to ``max_frames`` earlier frames of the same session, at the
same denoising step: row ``j`` of a session (its frame at step ``j``) extends its keys and values
with the bank of step ``j``. The bank takes the newest keys and values every ``interval`` frames
(the oldest frame leaves). SD's self-attention has no positions, so the order of the extra
tokens does not matter.

Invariants:
- a row attends to its own session's bank only: the extra tokens of a batch are laid out per
  row, and a row whose session holds fewer frames than the batch's longest bank has the rest
  masked out (a session with none attends exactly as without a bank);
- with no session of a batch using the bank, every layer runs the processor it had before
  (:class:`BankedSelfAttention` delegates), so the output is today's, bit for bit;
- the bank holds copies, never views of a batch's tensors.

Shapes: a session's bank for layer ``l`` is (steps, frames x tokens_l, dim_l), newest frame
first. A batch that uses it runs the UNet eager (the compiled UNet is planned for its plain
call), so turning it on or off, or changing ``max_frames``, never compiles anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from livediff.pixels.device import constant
from livediff.transforms.diffusion.layer_call import LayerSwitch


@dataclass
class FeatureBankHistory:
    """One session's bank: per self-attention layer, the keys and values of its earlier
    frames at each denoising step, newest first (worker thread only)."""

    steps: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    #: Frames held (the same in every layer).
    frames: int = 0
    #: Frames the UNet processed since the bank last took one.
    since_refresh: int = 0

    def push(
        self, layer_keys: Sequence[torch.Tensor], layer_values: Sequence[torch.Tensor], keep: int
    ) -> None:
        """Take one frame's keys and values (per layer, (steps, tokens, dim)), keeping at most
        ``keep`` frames."""
        kept = min(self.frames, keep - 1)
        if kept == 0:
            self.keys = [key.clone() for key in layer_keys]
            self.values = [value.clone() for value in layer_values]
        else:
            self.keys = [
                _prepend(new, old, kept) for new, old in zip(layer_keys, self.keys, strict=True)
            ]
            self.values = [
                _prepend(new, old, kept) for new, old in zip(layer_values, self.values, strict=True)
            ]
        self.frames = kept + 1
        self.since_refresh = 0

    def trim(self, keep: int) -> None:
        """Hold at most ``keep`` frames (``max_frames`` went down)."""
        if self.frames <= keep:
            return
        self.keys = [key[:, : keep * _tokens(key, self.frames)] for key in self.keys]
        self.values = [value[:, : keep * _tokens(value, self.frames)] for value in self.values]
        self.frames = keep


def _tokens(bank: torch.Tensor, frames: int) -> int:
    return bank.shape[1] // frames


def _prepend(new: torch.Tensor, old: torch.Tensor, kept: int) -> torch.Tensor:
    return torch.cat((new, old[:, : kept * new.shape[1]]), dim=1)


@dataclass
class BankRows:
    """One session's rows in a UNet call that uses the bank."""

    rows: int
    #: The denoising step of each row (which of the bank's steps it reads).
    row_steps: tuple[int, ...]
    history: FeatureBankHistory | None
    #: Whether this call's keys and values of its first ``steps`` rows go into the bank.
    refresh: bool
    steps: int
    keep: int


class BankCall:
    """What one UNet call's self-attention layers read from and write to the sessions'
    banks: the rows of every session in batch order (sessions without a bank too)."""

    def __init__(self, sessions: Sequence[BankRows], device: torch.device) -> None:
        self.sessions = list(sessions)
        self.device = device
        self.frames = max((_frames(rows) for rows in self.sessions), default=0)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def extend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Layer ``layer``'s keys and values (B, S, D) with each row's bank after its own
        tokens, and the mask that hides the padding (None when every row has as many)."""
        if any(rows.refresh for rows in self.sessions):
            self._keys[layer], self._values[layer] = key, value
        if self.frames == 0:
            return key, value, None
        tokens = key.shape[1]
        extra_keys = self._gather(layer, key, tokens, keys=True)
        extra_values = self._gather(layer, value, tokens, keys=False)
        return (
            torch.cat((key, extra_keys), dim=1),
            torch.cat((value, extra_values), dim=1),
            self._mask(tokens),
        )

    def _gather(self, layer: int, like: torch.Tensor, tokens: int, *, keys: bool) -> torch.Tensor:
        width = self.frames * tokens
        parts = []
        for rows in self.sessions:
            frames = _frames(rows)
            if frames == 0:
                parts.append(like.new_zeros((rows.rows, width, like.shape[2])))
                continue
            assert rows.history is not None
            bank = (rows.history.keys if keys else rows.history.values)[layer]
            part = _select_steps(bank[:, : frames * tokens], rows, self.device)
            if frames < self.frames:
                part = F.pad(part, (0, 0, 0, width - frames * tokens))
            parts.append(part.to(like.dtype))
        return torch.cat(parts)

    def _mask(self, tokens: int) -> torch.Tensor | None:
        """(B, 1, 1, tokens x (1 + frames)) True where a row may look, None if everywhere."""
        counts = [_frames(rows) for rows in self.sessions]
        if all(count == self.frames for count in counts):
            return None
        seen = tuple(
            count
            for rows, count in zip(self.sessions, counts, strict=True)
            for _ in range(rows.rows)
        )
        limits = constant(tuple((1 + count) * tokens for count in seen), self.device, torch.long)
        positions = torch.arange(tokens * (1 + self.frames), device=self.device)
        return (positions[None, :] < limits[:, None])[:, None, None, :]

    def store(self) -> None:
        """After the UNet call: each refreshing session's bank takes its frames' keys and
        values (its first ``steps`` rows: its conditional rows, one per step)."""
        layers = sorted(self._keys)
        offset = 0
        for rows in self.sessions:
            if rows.refresh and rows.history is not None and layers:
                span = slice(offset, offset + rows.steps)
                rows.history.push(
                    [self._keys[layer][span] for layer in layers],
                    [self._values[layer][span] for layer in layers],
                    rows.keep,
                )
            offset += rows.rows
        self._keys.clear()
        self._values.clear()


def _frames(rows: BankRows) -> int:
    return 0 if rows.history is None else min(rows.history.frames, rows.keep)


def _select_steps(bank: torch.Tensor, rows: BankRows, device: torch.device) -> torch.Tensor:
    """The bank's step of each of the session's rows (its guidance rows repeat a step)."""
    if rows.row_steps == tuple(range(bank.shape[0])):
        return bank
    return bank.index_select(0, constant(rows.row_steps, device, torch.long))


class BankSwitch(LayerSwitch[BankCall]):
    """The UNet's banked self-attention layers' switch, and how many there are."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = 0


class BankedSelfAttention:
    """A self-attention processor that reads the feature bank when a call is active and
    otherwise is the processor it replaced."""

    def __init__(self, inner: Any, switch: BankSwitch, layer: int) -> None:
        self.inner = inner
        self.switch = switch
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.switch.call
        if call is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.inner(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return banked_attention(attn, hidden_states, temb, call, self.layer)


def banked_attention(
    attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None, call: BankCall, layer: int
) -> torch.Tensor:
    """diffusers' scaled-dot-product self-attention (``AttnProcessor2_0``), with each row's
    keys and values extended by its session's bank."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = hidden_states.shape if hidden_states.ndim == 4 else None
    if spatial is not None:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    key, value, mask = call.extend(layer, attn.to_k(hidden_states), attn.to_v(hidden_states))
    batch, heads = hidden_states.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query, key, value = (
        part.view(batch, -1, heads, head_dim).transpose(1, 2) for part in (query, key, value)
    )
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if spatial is not None:
        out = out.transpose(-1, -2).reshape(spatial)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor  # type: ignore[no-any-return]


def install_feature_bank(unet: Any) -> BankSwitch:
    """Wrap every self-attention processor of ``unet`` (before it is compiled) and return the
    switch its calls go through; the layers are numbered in the UNet's own order."""
    switch = BankSwitch()
    processors = dict(unet.attn_processors)
    for name, processor in processors.items():
        if _is_self_attention(unet, name):
            processors[name] = BankedSelfAttention(processor, switch, switch.layers)
            switch.layers += 1
    unet.set_attn_processor(processors)
    return switch


def _is_self_attention(unet: Any, name: str) -> bool:
    """``name`` (``...attn1.processor``) is a self-attention of a transformer block."""
    module = unet.get_submodule(name.removesuffix(".processor"))
    attention = importlib.import_module("diffusers.models.attention_processor").Attention
    return isinstance(module, attention) and not module.is_cross_attention
