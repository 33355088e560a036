"""The feature bank (``cached_attention``) against a reference written here: the same UNet with
each self-attention's keys and values extended by hand with the cached frames' keys and values
(plain matmul-softmax attention, no SDPA, no mask), for 1 to 4 cached frames, two sessions
batched whose banks differ; and the bank's life in the UNet batch (refresh interval,
max_frames, on and off, each session its own)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from livediff.transforms.diffusion.feature_bank import BankCall, BankRows, FeatureBankHistory
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.diffusion.unet_batch import UNetBatch
from tests.transforms.diffusion.conftest import Stream, camera_frames

ATOL = 1e-5
#: Per layer, one frame's (keys, values), each (rows, tokens, dim).
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


class Reference:
    """Self-attention by its definition: ``softmax(q k^T / sqrt(d)) v`` per head, with
    ``extra[layer]`` (keys, values) appended after the frame's own when given; records every
    layer's own keys and values."""

    def __init__(self, layer: int, extra: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layer = layer
        self.extra = extra
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
        self.seen = (key.clone(), value.clone())
        if self.layer in self.extra:
            extra_keys, extra_values = self.extra[self.layer]
            key = torch.cat((key, extra_keys.expand(key.shape[0], -1, -1)), dim=1)
            value = torch.cat((value, extra_values.expand(value.shape[0], -1, -1)), dim=1)
        heads = attn.heads
        split = [
            part.unflatten(-1, (heads, part.shape[-1] // heads)).transpose(1, 2)
            for part in (query, key, value)
        ]
        weights = (split[0] @ split[1].transpose(-1, -2)) / split[0].shape[-1] ** 0.5
        out = (weights.softmax(dim=-1) @ split[2]).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def self_attention_names(unet: Any) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


def reference_unet(unet: Any) -> tuple[Any, list[Reference]]:
    """A copy of ``unet`` whose self-attentions are :class:`Reference` (cross-attention as
    diffusers has it)."""
    copied = copy.deepcopy(unet)
    processors = dict(copied.attn_processors)
    references = [Reference(layer, {}) for layer in range(len(self_attention_names(copied)))]
    for name, reference in zip(self_attention_names(copied), references, strict=True):
        processors[name] = reference
    copied.set_attn_processor(processors)
    return copied, references


def run(unet: Any, x_t: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return unet(x_t, t, encoder_hidden_states=e, return_dict=False)[0]  # type: ignore[no-any-return]


@pytest.fixture
def unet_batch(make_transform: Callable[..., DiffusionTransform]) -> UNetBatch:
    return make_transform()._unet_batch()


def inputs(unet_batch: UNetBatch, rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random latents, timesteps and prompt embeddings for ``rows`` UNet rows."""
    generator = torch.Generator().manual_seed(seed)
    shape = unet_batch.latent_shape(DiffusionParams(width=64, height=64))
    x_t = torch.randn((rows, shape.channels, shape.height, shape.width), generator=generator)
    timesteps = torch.randint(0, 1000, (rows,), generator=generator)
    width = unet_batch.bundle.text_encoder.config.hidden_size
    embeddings = torch.randn((rows, 7, width), generator=generator)
    return x_t, timesteps, embeddings


def earlier_frames(unet: Any, references: list[Reference], frames: int, seed: int) -> list[LayerKV]:
    """The keys and values of ``frames`` earlier frames (one row each), oldest first."""
    recorded = []
    for number in range(frames):
        for reference in references:
            reference.extra = {}
        run(unet, *inputs_like(unet, seed * 10 + number))
        recorded.append([reference.seen for reference in references])
    return recorded  # type: ignore[return-value]


def inputs_like(unet: Any, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((1, unet.config.in_channels, 8, 8), generator=generator)
    e = torch.randn((1, 7, unet.config.cross_attention_dim), generator=generator)
    return x_t, torch.randint(0, 1000, (1,), generator=generator), e


def history_of(frames: list[LayerKV], keep: int) -> FeatureBankHistory:
    """A one-step bank that took ``frames`` in order (oldest first)."""
    history = FeatureBankHistory(steps=1)
    for layers in frames:
        history.push([key for key, _ in layers], [value for _, value in layers], keep)
    return history


def hand_extended(frames: list[LayerKV], layers: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per layer, every frame's keys and values side by side (the reference's extra)."""
    return {
        layer: (
            torch.cat([kv[layer][0] for kv in frames], dim=1),
            torch.cat([kv[layer][1] for kv in frames], dim=1),
        )
        for layer in range(layers)
    }


@pytest.mark.parametrize(("first", "second"), [(1, 1), (2, 1), (4, 3), (3, 4), (4, 0)])
def test_two_sessions_batched_equal_the_unet_extended_by_hand(
    unet_batch: UNetBatch, first: int, second: int
) -> None:
    unet = unet_batch.bundle.uncompiled_unet
    reference, layers = reference_unet(unet)
    banks = [
        earlier_frames(reference, layers, frames, seed)
        for frames, seed in ((first, 1), (second, 2))
    ]
    x_t, timesteps, embeddings = inputs(unet_batch, 2, seed=3)
    sessions = [
        BankRows(1, (0,), history_of(bank, 4) if bank else None, False, 1, 4) for bank in banks
    ]
    with torch.inference_mode():
        output = unet_batch.unet(x_t, timesteps, embeddings, None, BankCall(sessions, x_t.device))
    for row, bank in enumerate(banks):
        extra = hand_extended(bank, len(layers)) if bank else {}
        for layer in layers:
            layer.extra = extra  # type: ignore[assignment]
        expected = run(
            reference, x_t[row : row + 1], timesteps[row : row + 1], embeddings[row : row + 1]
        )
        torch.testing.assert_close(output[row : row + 1], expected, atol=ATOL, rtol=0)


def test_each_row_reads_the_bank_of_its_own_step(unet_batch: UNetBatch) -> None:
    """A session of two steps (plus a guidance row repeating step 0): row j reads step j."""
    unet = unet_batch.bundle.uncompiled_unet
    reference, layers = reference_unet(unet)
    steps = [earlier_frames(reference, layers, 2, seed) for seed in (5, 6)]
    history = FeatureBankHistory(steps=2)
    for number in range(2):
        per_step = [steps[0][number], steps[1][number]]
        history.push(
            [torch.cat([kv[layer][0] for kv in per_step]) for layer in range(len(layers))],
            [torch.cat([kv[layer][1] for kv in per_step]) for layer in range(len(layers))],
            keep=2,
        )
    x_t, timesteps, embeddings = inputs(unet_batch, 3, seed=7)
    call = BankCall([BankRows(3, (0, 1, 0), history, False, 2, 2)], x_t.device)
    with torch.inference_mode():
        output = unet_batch.unet(x_t, timesteps, embeddings, None, call)
    for row, step in enumerate((0, 1, 0)):
        extra = hand_extended(steps[step], len(layers))
        for layer in layers:
            layer.extra = extra  # type: ignore[assignment]
        expected = run(
            reference, x_t[row : row + 1], timesteps[row : row + 1], embeddings[row : row + 1]
        )
        torch.testing.assert_close(output[row : row + 1], expected, atol=ATOL, rtol=0)


def test_a_refresh_stores_copies_of_the_newest_frames_own_keys_and_values(
    unet_batch: UNetBatch,
) -> None:
    unet = unet_batch.bundle.uncompiled_unet
    reference, layers = reference_unet(unet)
    old = earlier_frames(reference, layers, 2, seed=8)
    history = history_of(old, keep=2)
    x_t, timesteps, embeddings = inputs(unet_batch, 2, seed=9)  # the session's two step rows
    call = BankCall([BankRows(2, (0, 0), history, True, 1, 2)], x_t.device)
    with torch.inference_mode():
        unet_batch.unet(x_t, timesteps, embeddings, None, call)
        call.store()
    for layer in layers:
        layer.extra = hand_extended(old, len(layers))  # type: ignore[assignment]
    run(reference, x_t[:1], timesteps[:1], embeddings[:1])  # the first (conditional) row
    assert history.frames == 2 and history.since_refresh == 0
    for number, layer in enumerate(layers):
        assert layer.seen is not None
        newest, kept = history.keys[number].tensor_split(2, dim=1)
        torch.testing.assert_close(newest, layer.seen[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(kept, old[1][number][0], atol=0, rtol=0)  # oldest left
        newest_values = history.values[number].tensor_split(2, dim=1)[0]
        torch.testing.assert_close(newest_values, layer.seen[1], atol=ATOL, rtol=0)


def test_trim_keeps_the_newest_frames() -> None:
    frames = [
        [(torch.full((1, 3, 2), float(n)), torch.full((1, 3, 2), -float(n)))] for n in range(4)
    ]
    history = history_of(frames, keep=4)
    assert [float(v) for v in history.keys[0][0, ::3, 0]] == [3.0, 2.0, 1.0, 0.0]
    history.trim(2)
    assert history.frames == 2
    assert [float(v) for v in history.keys[0][0, ::3, 0]] == [3.0, 2.0]
    assert [float(v) for v in history.values[0][0, ::3, 0]] == [-3.0, -2.0]


BANK = {"cached_attention": {"enabled": True, "max_frames": 2, "interval": 1}}


def test_the_bank_off_is_todays_output_and_on_changes_it(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    frames = camera_frames(4)
    today = Stream(transform, seed=3)
    off = Stream(transform, seed=3, cached_attention={"enabled": False, "max_frames": 4})
    on = Stream(transform, seed=3, **BANK)
    outputs = [(today.feed(f), off.feed(f), on.feed(f)) for f in frames]
    assert all(torch.equal(plain, unused) for plain, unused, _ in outputs)
    assert off.state.bank is None
    assert torch.equal(outputs[0][2], outputs[0][0])  # an empty bank changes nothing
    # (the tiny random UNet's self-attention moves its output by about 1e-5)
    assert not torch.equal(outputs[-1][2], outputs[-1][0])
    assert on.state.bank is not None and on.state.bank.frames == 2


def test_sessions_batched_equal_each_alone_with_their_own_banks(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    settings: list[dict[str, Any]] = [
        BANK,
        {},
        {"cached_attention": {"max_frames": 4, "interval": 2}, "t_index_list": [20, 35]},
        {"cached_attention": {"max_frames": 3}, "cfg_type": "full", "guidance_scale": 2.0},
    ]
    clips = [camera_frames(6, seed=number) for number in range(len(settings))]
    alone = [Stream(transform, seed=4, **values) for values in settings]
    together = [Stream(transform, seed=4, **values) for values in settings]
    for number in range(6):
        expected = [stream.feed(clips[i][number]) for i, stream in enumerate(alone)]
        outputs = transform.process(
            [stream.job(clips[i][number]) for i, stream in enumerate(together)]
        )
        for output, wanted in zip(outputs, expected, strict=True):
            assert (output is None) == (wanted is None)
            if wanted is not None:
                torch.testing.assert_close(output, wanted, atol=ATOL, rtol=0)
    banks = [stream.state.bank for stream in together]
    assert banks[1] is None
    assert [bank.frames for bank in banks if bank is not None] == [2, 3, 3]
    assert banks[2] is not None and banks[2].keys[0].shape[0] == 2  # one bank per step


def test_interval_max_frames_and_off_apply_live(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    stream = Stream(transform, seed=3, cached_attention={"max_frames": 4, "interval": 3})
    held = []
    for frame in camera_frames(7):
        stream.feed(frame)
        assert stream.state.bank is not None
        held.append(stream.state.bank.frames)
    assert held == [1, 1, 1, 2, 2, 2, 3]  # frames 1, 4 and 7 refresh
    old = stream.params
    stream.update(cached_attention={"max_frames": 1, "interval": 3})
    assert not transform.requires_reload(old, stream.params)
    stream.feed(camera_frames(1, seed=9)[0])
    assert stream.state.bank is not None and stream.state.bank.frames == 1
    stream.update(cached_attention={"enabled": False})
    stream.feed(camera_frames(1, seed=9)[0])
    assert stream.state.bank is None


@pytest.mark.parametrize("clears", [False, True])
def test_a_new_prompt_clears_the_history_only_when_asked(
    make_transform: Callable[..., DiffusionTransform], clears: bool
) -> None:
    transform = make_transform()
    stream = Stream(transform, seed=3, prompt_clears_history=clears, **BANK)
    frames = camera_frames(3)
    stream.feed(frames[0])
    stream.feed(frames[1])
    stream.update(seed=5)  # not the prompt: the history stays
    stream.feed(frames[2])
    assert stream.state.bank is not None and stream.state.bank.frames == 2
    stream.update(prompt="a charcoal sketch")
    stream.feed(frames[2])
    assert stream.state.bank is not None
    assert stream.state.bank.frames == (1 if clears else 2)


@pytest.mark.parametrize(
    ("values", "location"),
    [
        ({"cached_attention": {"max_frames": 5}}, "cached_attention.max_frames"),
        ({"cached_attention": {"max_frames": 0}}, "cached_attention.max_frames"),
        ({"cached_attention": {"interval": 1441}}, "cached_attention.interval"),
        ({"cached_attention": {"interval_sec": 1.0}}, "cached_attention.interval_sec"),
        ({"cached_attention": {"enabled": "yes please"}}, "cached_attention.enabled"),
        ({"prompt_clears_history": "sometimes"}, "prompt_clears_history"),
    ],
)
def test_bad_bank_params_are_refused_naming_the_field(
    values: dict[str, Any], location: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        DiffusionParams.model_validate(values)
    assert [".".join(map(str, error["loc"])) for error in refused.value.errors()] == [location]


def test_livepeer_shapes_of_the_bank_are_read() -> None:
    assert DiffusionParams().cached_attention.enabled is False
    assert DiffusionParams(cached_attention=None).cached_attention.enabled is False
    sent = DiffusionParams.model_validate({"cached_attention": {"max_frames": 2, "interval": 4}})
    assert sent.cached_attention.model_dump() == {"enabled": True, "max_frames": 2, "interval": 4}
    legacy = DiffusionParams.model_validate(
        {"use_cached_attn": True, "cache_maxframes": 3, "cache_interval": 8}
    )
    assert legacy.cached_attention.model_dump() == {"enabled": True, "max_frames": 3, "interval": 8}
    assert DiffusionParams.model_validate(sent.model_dump(mode="json")) == sent
    assert sent.temporal_tools() == ["cached_attention.max_frames=2"]
