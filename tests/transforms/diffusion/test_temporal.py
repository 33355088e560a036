"""Temporal tools on the tiny model: feedback processors (image and latent, pre and post),
``do_add_noise`` and the motion-aware noise controller; each equals its formula, each session
keeps its own history, and with every tool off the output is today's. The formulas are checked
on the staged path (``frame_graph`` off: its stages can be recorded); test_frame_graph proves
the frame graph equal to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from livediff.pixels.device import constants, to_output_images
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.diffusion.unet_batch import UNetBatch
from tests.transforms.diffusion.conftest import Stream, camera_frames
from tests.transforms.diffusion.test_controlnet import tensors_from_host

ATOL = 1e-5


def block(kind: str, *strengths: float, **extra: Any) -> dict[str, Any]:
    """A processing block of ``kind`` processors with these feedback strengths."""
    processors = [{"type": kind, "params": {"feedback_strength": s}} for s in strengths]
    return {"processors": processors, **extra}


@contextmanager
def recorded(unet_batch: UNetBatch) -> Iterator[dict[str, list[Any]]]:
    """What the UNet batch encodes (images in), decodes (latents in, images out) and gives the
    UNet (x_t, timesteps, output), per call."""
    calls: dict[str, list[Any]] = {"encode": [], "decode_in": [], "decode_out": [], "unet": []}
    encode, decode, unet = unet_batch.encode, unet_batch.decode, unet_batch.unet

    def encode_recorded(images: torch.Tensor) -> torch.Tensor:
        calls["encode"].append(images.clone())
        return encode(images)

    def decode_recorded(latents: torch.Tensor) -> torch.Tensor:
        calls["decode_in"].append(latents.clone())
        decoded = decode(latents)
        calls["decode_out"].append(decoded.clone())
        return decoded

    def unet_recorded(
        x_t: torch.Tensor, timesteps: torch.Tensor, *rest: Any, **named: Any
    ) -> torch.Tensor:
        output = unet(x_t, timesteps, *rest, **named)
        calls["unet"].append((x_t.clone(), timesteps.clone(), output.clone()))
        return output

    unet_batch.encode = encode_recorded  # type: ignore[method-assign]
    unet_batch.decode = decode_recorded  # type: ignore[method-assign]
    unet_batch.unet = unet_recorded  # type: ignore[method-assign,assignment]
    try:
        yield calls
    finally:
        del unet_batch.encode, unet_batch.decode, unet_batch.unet


def blend(current: torch.Tensor, previous: torch.Tensor, strength: float) -> torch.Tensor:
    return (1 - strength) * current + strength * previous


OFF: dict[str, Any] = {
    "image_preprocessing": block("feedback", 0.7, enabled=False),
    "image_postprocessing": {
        "processors": [{"type": "feedback", "enabled": False, "params": {"feedback_strength": 1}}]
    },
    "latent_preprocessing": block("latent_feedback", 0.0),
    "latent_postprocessing": None,
    "motion_noise": {"enabled": False, "min_strength": 0.1, "max_strength": 0.9},
    "cached_attention": {"enabled": False, "max_frames": 3},
}


@pytest.mark.parametrize("t_index_list", [None, [20, 35]])
def test_every_tool_off_is_todays_output_exactly(
    make_transform: Callable[..., DiffusionTransform], t_index_list: list[int] | None
) -> None:
    transform = make_transform()
    frames = camera_frames(5)
    today = Stream(transform, seed=3, t_index_list=t_index_list)
    off = Stream(transform, seed=3, t_index_list=t_index_list, **OFF)
    assert off.params.temporal_tools() == []
    for frame in frames:
        expected, output = today.feed(frame), off.feed(frame)
        assert (expected is None) == (output is None)
        if expected is not None:
            assert torch.equal(output, expected)


def test_image_feedback_pre_and_post_equal_their_formulas(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(frame_graph=False)
    unet_batch = transform._unet_batch()
    frames = camera_frames(4)
    plain = Stream(transform, seed=3)
    pre = Stream(transform, seed=3, image_preprocessing=block("feedback", 0.4))
    post = Stream(transform, seed=3, image_postprocessing=block("feedback", 0.3, 0.5))
    assert pre.params.temporal_tools() == ["image_preprocessing.feedback"]
    for number, frame in enumerate(frames):
        history_pre, history_post = pre.state.previous_image, post.state.previous_image
        with recorded(unet_batch) as plain_calls:
            plain.feed(frame)
        with recorded(unet_batch) as pre_calls:
            pre.feed(frame)
        with recorded(unet_batch) as post_calls:
            output = post.feed(frame)
        if number == 0:  # no history yet: the frame as it is
            assert history_pre is None and history_post is None
            torch.testing.assert_close(pre_calls["encode"][0], plain_calls["encode"][0])
            continue
        assert history_pre is not None and history_post is not None
        # pre: the input, blended with the previous output, is what the VAE encodes
        expected_in = blend(plain_calls["encode"][0], history_pre, 0.4)
        torch.testing.assert_close(pre_calls["encode"][0], expected_in, atol=ATOL, rtol=0)
        # post: the decoded output blended with the previous output, twice (a chain)
        decoded = post_calls["decode_out"][0]
        expected = blend(blend(decoded, history_post, 0.3), history_post, 0.5)
        torch.testing.assert_close(post.state.previous_image, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(output, to_output_images(expected)[0], atol=ATOL, rtol=0)


def test_latent_feedback_pre_and_post_equal_their_formulas(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(frame_graph=False)
    unet_batch = transform._unet_batch()
    frames = camera_frames(4)
    plain = Stream(transform, seed=3)
    pre = Stream(transform, seed=3, latent_preprocessing=block("latent_feedback", 0.6))
    post = Stream(transform, seed=3, latent_postprocessing=block("latent_feedback", 0.25))
    for number, frame in enumerate(frames):
        history_pre, history_post = pre.state.previous_latent, post.state.previous_latent
        with recorded(unet_batch) as plain_calls:
            plain.feed(frame)
        with recorded(unet_batch) as pre_calls:
            pre.feed(frame)
        with recorded(unet_batch) as post_calls:
            post.feed(frame)
        # the latent a session's output came from is its history
        torch.testing.assert_close(pre.state.previous_latent, pre_calls["decode_in"][0])
        torch.testing.assert_close(post.state.previous_latent, post_calls["decode_in"][0])
        if number == 0:
            assert history_pre is None and history_post is None
            continue
        assert history_pre is not None and history_post is not None
        # pre: the UNet's input is the blended input latent, noised: alpha x_0' + beta noise
        table, noise = pre.state.table, pre.state.noise
        assert table is not None and noise is not None
        source = unet_batch.encode(pre_calls["encode"][0])
        x_0 = blend(source, history_pre, 0.6)
        x_t = table.alpha[:1] * x_0 + table.beta[:1] * noise[:1]
        torch.testing.assert_close(pre_calls["unet"][0][0], x_t, atol=ATOL, rtol=0)
        # post: the denoised latent (what the plain session decodes) blended before decoding
        expected = blend(plain_calls["decode_in"][0], history_post, 0.25)
        torch.testing.assert_close(post_calls["decode_in"][0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("do_add_noise", [True, False])
def test_do_add_noise_off_carries_alpha_x0_alone_to_the_next_step(
    make_transform: Callable[..., DiffusionTransform], do_add_noise: bool
) -> None:
    """StreamDiffusion's rule: the newest frame is always noised; between steps, a frame goes
    on as ``alpha_next x0_hat (+ beta_next noise_next only with do_add_noise)``."""
    transform = make_transform(frame_graph=False)
    unet_batch = transform._unet_batch()
    stream = Stream(transform, seed=3, t_index_list=[20, 35], do_add_noise=do_add_noise)
    with recorded(unet_batch) as calls:
        stream.feed(camera_frames(1)[0])
    table, noise = stream.state.table, stream.state.noise
    assert table is not None and noise is not None and stream.state.latents is not None
    x_t, _, output = calls["unet"][0]
    denoised = unet_batch.schedule.denoise(output, x_t, table)  # epsilon model, no guidance
    expected = table.alpha[1:] * denoised[:1]
    if do_add_noise:
        expected = expected + table.beta[1:] * noise[1:]
    torch.testing.assert_close(stream.state.latents, expected, atol=ATOL, rtol=0)
    # the newest frame is noised either way
    source = unet_batch.encode(calls["encode"][0])
    newest = table.alpha[:1] * source + table.beta[:1] * noise[:1]
    torch.testing.assert_close(x_t[:1], newest, atol=ATOL, rtol=0)
    assert stream.state.sources is not None  # residual CFG's x_0 of the frame in flight
    torch.testing.assert_close(stream.state.sources, source, atol=ATOL, rtol=0)
    assert ("do_add_noise=false" in stream.params.temporal_tools()) is not do_add_noise


def motion_timesteps(
    images: list[torch.Tensor], low: float, high: float, sensitivity: float, smoothing: float
) -> list[int]:
    """The controller's timesteps, computed here from the encoded frames (-1..1)."""
    pooled = [torch.nn.functional.avg_pool2d(image, 8) for image in images]
    strength = low
    timesteps = [round(1000 * strength) - 1]
    for before, now in pairwise(pooled):
        moved = float((now - before).abs().mean()) / 2
        target = low + (high - low) * min(1.0, sensitivity * moved)
        strength = smoothing * strength + (1 - smoothing) * target
        timesteps.append(round(1000 * strength) - 1)
    return timesteps


def test_motion_noise_maps_the_inputs_motion_to_the_first_steps_timestep(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(frame_graph=False)
    unet_batch = transform._unet_batch()
    motion = {"enabled": True, "min_strength": 0.2, "max_strength": 0.9, "sensitivity": 4.0}
    motion["smoothing"] = 0.5
    stream = Stream(transform, seed=3, motion_noise=motion)
    frames = camera_frames(4)
    frames = [frames[0], frames[0], frames[1], frames[2], frames[2], frames[3]]
    with recorded(unet_batch) as calls:
        for frame in frames:
            stream.feed(frame)
    images = list(calls["encode"])
    expected = motion_timesteps(images, 0.2, 0.9, 4.0, 0.5)
    timesteps = [int(timestep[0]) for _, timestep, _ in calls["unet"]]
    assert timesteps == expected
    assert timesteps[1] == 199 and max(timesteps) > 199  # still: the minimum; moving: more
    # each row's x_t is noised at its own timestep's level
    schedule = unet_batch.schedule
    for (x_t, _, _), encoded, timestep in zip(calls["unet"], images, timesteps, strict=True):
        table = schedule.table((timestep,))
        assert stream.state.noise is not None
        x_0 = unet_batch.encode(encoded)
        x_expected = table.alpha * x_0 + table.beta * stream.state.noise[:1]
        torch.testing.assert_close(x_t, x_expected, atol=ATOL, rtol=0)
    assert stream.params.temporal_tools() == ["motion_noise"]


def test_motion_noise_with_several_steps_keeps_the_later_steps_and_the_shapes(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(frame_graph=False)
    unet_batch = transform._unet_batch()
    motion = {"enabled": True, "min_strength": 0.1, "max_strength": 0.9}
    stream = Stream(transform, seed=3, t_index_list=[20, 35], motion_noise=motion)
    with recorded(unet_batch) as calls:
        for frame in camera_frames(3):
            stream.feed(frame)
    first = [int(timesteps[0]) for _, timesteps, _ in calls["unet"]]
    assert first[0] == 300  # min 0.1 (t 99) stays above the second step (t 299)
    assert {tuple(x_t.shape) for x_t, _, _ in calls["unet"]} == {(2, 4, 8, 8)}
    assert all(int(timesteps[1]) == 299 for _, timesteps, _ in calls["unet"])


def test_two_sessions_in_one_batch_keep_their_own_history(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    settings: list[dict[str, Any]] = [
        {
            "image_postprocessing": block("feedback", 0.5),
            "latent_preprocessing": block("latent_feedback", 0.3),
        },
        {
            "image_preprocessing": block("feedback", 0.6),
            "latent_postprocessing": block("latent_feedback", 0.4),
            "motion_noise": {"enabled": True, "min_strength": 0.3, "max_strength": 0.8},
        },
    ]
    frames = [camera_frames(5, seed=1), camera_frames(5, seed=2)]
    alone = [Stream(transform, seed=4, **values) for values in settings]
    together = [Stream(transform, seed=4, **values) for values in settings]
    for number in range(5):
        expected = [stream.feed(frames[i][number]) for i, stream in enumerate(alone)]
        jobs = [stream.job(frames[i][number]) for i, stream in enumerate(together)]
        outputs = transform.process(jobs)  # both sessions in one UNet batch
        for output, wanted in zip(outputs, expected, strict=True):
            torch.testing.assert_close(output, wanted, atol=ATOL, rtol=0)
    first, second = (stream.state for stream in together)
    assert first.previous_image is not None and second.previous_image is not None
    assert not torch.allclose(first.previous_image, second.previous_image)
    assert first.motion_strength is None and second.motion_strength is not None


def test_history_is_cleared_by_a_new_size_and_a_model_reload(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    stream = Stream(transform, seed=3, latent_postprocessing=block("latent_feedback", 0.5))
    stream.update(motion_noise={"enabled": True})
    frame = camera_frames(1)[0]
    stream.feed(frame)
    assert stream.state.previous_latent is not None and stream.state.motion_input is not None
    stream.update(width=128)
    stream.feed(frame)
    assert stream.state.previous_latent is not None
    assert stream.state.previous_latent.shape[-1] == 128 // 8  # a new history at the new size
    transform._unet_batch().generation += 1  # what a reload does to every session
    unet_batch = transform._unet_batch()
    unet_batch._follow(stream.state, stream.params)
    assert stream.state.previous_image is None and stream.state.previous_latent is None
    assert stream.state.motion_input is None and stream.state.motion_strength is None


def test_turning_tools_on_and_off_needs_no_reload_and_applies_next_frame(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform()
    frames = camera_frames(6)
    stream = Stream(transform, seed=3)
    plain = Stream(transform, seed=3)
    assert torch.equal(stream.feed(frames[0]), plain.feed(frames[0]))  # a history to blend
    for number, change in enumerate(
        [
            {"image_postprocessing": block("feedback", 0.9)},
            {"image_postprocessing": block("feedback", 0.9, enabled=False)},
            {"motion_noise": {"enabled": True, "min_strength": 0.9, "max_strength": 1.0}},
            {"motion_noise": {"enabled": False}},
        ]
    ):
        old = stream.params
        stream.update(**change)
        assert not transform.requires_reload(old, stream.params)
        output, expected = stream.feed(frames[number + 1]), plain.feed(frames[number + 1])
        same = torch.equal(output, expected)
        assert same is (not stream.params.temporal_tools()), change


@pytest.mark.parametrize(
    ("values", "location"),
    [
        (
            {"image_postprocessing": block("feedback", 1.5)},
            "image_postprocessing.processors.0.params.feedback_strength",
        ),
        (
            {"image_preprocessing": block("feedback", -0.1)},
            "image_preprocessing.processors.0.params.feedback_strength",
        ),
        (
            {"latent_preprocessing": {"processors": [{"type": "blur"}]}},
            "latent_preprocessing.processors.0.type",
        ),
        (
            {"image_preprocessing": {"processors": [{"type": "latent_feedback"}]}},
            "image_preprocessing.processors.0.type",
        ),
        (
            {
                "latent_postprocessing": {
                    "processors": [{"type": "latent_feedback", "params": {"x": 1}}]
                }
            },
            "latent_postprocessing.processors.0.params.x",
        ),
        ({"image_postprocessing": {"order": 1}}, "image_postprocessing.order"),
        ({"motion_noise": {"sensitivity": 0}}, "motion_noise.sensitivity"),
        ({"motion_noise": {"min_strength": 0.8, "max_strength": 0.2}}, "motion_noise"),
        ({"do_add_noise": "sometimes"}, "do_add_noise"),
    ],
)
def test_bad_temporal_params_are_refused_naming_the_field(
    values: dict[str, Any], location: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        DiffusionParams.model_validate(values)
    locations = [".".join(map(str, error["loc"])) for error in refused.value.errors()]
    assert locations == [location]


def test_livepeer_shaped_blocks_round_trip() -> None:
    values = {
        "image_preprocessing": None,
        "latent_postprocessing": {
            "enabled": True,
            "processors": [
                {"type": "latent_feedback", "enabled": True, "params": {"feedback_strength": 0.2}}
            ],
        },
        "image_postprocessing": {"processors": [{"type": "feedback"}]},  # strength 0.5
    }
    params = DiffusionParams.model_validate(values)
    assert params.image_postprocessing.strengths() == (0.5,)
    assert params.latent_postprocessing.strengths() == (0.2,)
    assert params.image_preprocessing.strengths() == ()
    assert DiffusionParams.model_validate(params.model_dump(mode="json")) == params
    assert params.temporal_tools() == [
        "latent_postprocessing.latent_feedback",
        "image_postprocessing.feedback",
    ]


ALL_ON: dict[str, Any] = {
    "image_preprocessing": block("feedback", 0.3),
    "image_postprocessing": block("feedback", 0.2),
    "latent_preprocessing": block("latent_feedback", 0.4),
    "latent_postprocessing": block("latent_feedback", 0.1),
    "motion_noise": {"enabled": True},
    "do_add_noise": False,
    "cached_attention": {"max_frames": 2},
}


def test_a_steady_batch_with_every_tool_on_makes_no_constants(
    make_transform: Callable[..., DiffusionTransform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``torch.tensor`` (a blocking host copy on a GPU) and no new device constant once the
    sessions run: the tools' strengths are kernel scalars, their history device tensors."""
    transform = make_transform()
    streams = [
        Stream(transform, t_index_list=[20, 35], **ALL_ON),
        Stream(transform, cfg_type="self", guidance_scale=1.5, **ALL_ON),
    ]
    frames = camera_frames(5)
    for frame in frames[:2]:
        transform.process([stream.job(frame) for stream in streams])
    misses = constants.misses
    with tensors_from_host(monkeypatch) as made:
        for frame in frames[2:]:
            transform.process([stream.job(frame) for stream in streams])
    assert made == []
    assert constants.misses == misses


@pytest.mark.gpu
def test_a_steady_batch_with_every_tool_on_never_waits_for_the_device(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    from tests.transforms.diffusion.test_gpu import steady_outputs

    transform = make_transform(device="cuda")
    streams = [
        Stream(transform, t_index_list=[20, 35], **ALL_ON),
        Stream(transform, cfg_type="self", guidance_scale=1.5, **ALL_ON),
    ]
    outputs = steady_outputs(transform, streams)
    assert all(isinstance(output, torch.Tensor) and output.is_cuda for output in outputs)


def test_tools_on_and_off_under_compile_never_recompile(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """torch.compile (the eager backend: dynamo guards and recompiles as under inductor): the
    motion controller's timesteps and the feedback blends change values, never shapes."""
    from tests.transforms.diffusion.test_shapes import COMPILED, compiled_graphs

    torch._dynamo.reset()
    try:
        # the staged path (test_frame_graph compiles the frame graph with the tools toggled)
        transform = make_transform(**COMPILED)
        after_load = compiled_graphs()
        frames = camera_frames(4, seed=5)
        streams = [Stream(transform, t_index_list=[20, 35]), Stream(transform)]
        for values in (ALL_ON, OFF, ALL_ON):
            for stream in streams:
                stream.update(**values)
            for frame in frames:
                transform.process([stream.job(frame) for stream in streams])
        assert compiled_graphs() == after_load, "a temporal tool recompiled"
    finally:
        torch._dynamo.reset()


def test_describe_session_names_the_active_tools() -> None:
    params = DiffusionParams.model_validate({**ALL_ON, "image_preprocessing": None})
    assert DiffusionTransform.describe_session(params) == {
        "temporal": [
            "latent_preprocessing.latent_feedback",
            "latent_postprocessing.latent_feedback",
            "image_postprocessing.feedback",
            "cached_attention.max_frames=2",
            "do_add_noise=false",
            "motion_noise",
        ]
    }
    assert DiffusionTransform.describe_session(DiffusionParams()) == {"temporal": []}
