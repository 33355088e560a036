"""The frame graph: a plain batch as one function, equal to the staged path frame for frame.

The staged path's formulas are proven against diffusers and by hand (test_equivalence,
test_temporal, with ``frame_graph`` off); here the frame graph is proven equal to it, session
by session, for every setting it takes as values (steps, guidance of each kind, delta,
do_add_noise, every feedback processor, the motion controller, SDXL's added conditioning),
with sessions of different settings in one batch. Under ``--compile`` (the ``eager`` and
``aot_eager`` backends, which trace, guard and recompile as inductor does) its planned
variants compile at load and serving compiles nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from livediff.transforms.diffusion.frame_graph import FrameForward, FrameVariant, chained_weight
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.diffusion.unet_batch import _Entry
from tests.transforms.diffusion.conftest import SIZE, Stream, camera_frames, params_for, ready, spec
from tests.transforms.diffusion.test_compiled_controlnets import rows_run
from tests.transforms.diffusion.test_shapes import compiled_graphs


def block(kind: str, *strengths: float) -> dict[str, Any]:
    """An enabled processing block of ``kind`` processors with these feedback strengths."""
    processors = [{"type": kind, "params": {"feedback_strength": s}} for s in strengths]
    return {"enabled": True, "processors": processors}


FEEDBACK = {
    "image_preprocessing": block("feedback", 0.3, 0.2),
    "image_postprocessing": block("feedback", 0.25),
    "latent_preprocessing": block("latent_feedback", 0.4),
    "latent_postprocessing": block("latent_feedback", 0.15),
}
MOTION = {"motion_noise": {"enabled": True, "sensitivity": 4.0}}

#: Batches of sessions (each a look) that share a variant: the frame graph takes them.
BATCHES: dict[str, list[dict[str, Any]]] = {
    "one-step": [{"t_index_list": [30]}, {"t_index_list": [20], "seed": 7, "prompt": "ink"}],
    "self-guided-steps": [
        {"t_index_list": [10, 25, 40], "guidance_scale": 1.6, "delta": 0.7},
        {"t_index_list": [5, 20, 35], "seed": 3, "do_add_noise": False},  # unguided
        {"t_index_list": [15, 30, 45], "cfg_type": "none", "guidance_scale": 3.0},
    ],
    "initialize": [
        {"t_index_list": [10, 30], "cfg_type": "initialize", "guidance_scale": 1.8},
        {
            "t_index_list": [20, 40],
            "cfg_type": "initialize",
            "guidance_scale": 2.5,
            "delta": 0.5,
            "negative_prompt": "blurry",
        },
    ],
    "full": [
        {
            "t_index_list": [10, 30],
            "cfg_type": "full",
            "guidance_scale": 2.0,
            "do_add_noise": False,
        },
        {"t_index_list": [25, 35], "cfg_type": "full", "guidance_scale": 1.3, "seed": 11},
    ],
    "temporal": [
        {"t_index_list": [20, 35], **FEEDBACK, **MOTION},
        {"t_index_list": [10, 30], "guidance_scale": 1.4, **FEEDBACK},
    ],
}


def run_batch(
    transform: DiffusionTransform, looks: list[dict[str, Any]], frames: int = 5
) -> list[list[Any]]:
    """Each look's session fed the same camera frames together, one batch a frame."""
    streams = [Stream(transform, **look) for look in looks]
    outputs: list[list[Any]] = [[] for _ in streams]
    for frame in camera_frames(frames, seed=2):
        for index, output in enumerate(transform.process([s.job(frame) for s in streams])):
            outputs[index].append(output)
    return outputs


def assert_same_outputs(got: list[list[Any]], want: list[list[Any]], atol: float) -> None:
    for session, (ours, theirs) in enumerate(zip(got, want, strict=True)):
        for number, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert (a is None) == (b is None), f"session {session} frame {number}: filling differs"
            if a is not None:
                torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_the_frame_graph_equals_the_staged_path(
    make_transform: Callable[..., DiffusionTransform], batch: str
) -> None:
    staged = make_transform(frame_graph=False)
    framed = make_transform()
    want = run_batch(staged, BATCHES[batch])
    got = run_batch(framed, BATCHES[batch])
    assert_same_outputs(got, want, atol=2e-5)
    assert dict(framed._unet_batch().paths) == {"frame": 5}
    assert dict(staged._unet_batch().paths) == {"staged": 5}


def test_sdxl_takes_the_frame_graph_with_its_added_conditioning(
    make_sdxl: Callable[..., DiffusionTransform],
) -> None:
    looks: list[dict[str, Any]] = [
        {"t_index_list": [20, 35], "cfg_type": "full", "guidance_scale": 1.5},
        {"t_index_list": [10, 30], "cfg_type": "full", "guidance_scale": 2.0, "width": 64},
    ]
    want = run_batch(make_sdxl(frame_graph=False), looks, frames=3)
    framed = make_sdxl()
    assert_same_outputs(run_batch(framed, looks, frames=3), want, atol=2e-5)
    assert dict(framed._unet_batch().paths) == {"frame": 3}


def test_a_batch_the_frame_graph_cannot_take_runs_staged_and_right(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """Sessions of two variants in one group, or one with a ControlNet or the feature bank:
    staged, with the staged path's outputs."""
    mixed: list[dict[str, Any]] = [
        {"t_index_list": [30]},
        {"t_index_list": [10, 30], "cfg_type": "full", "guidance_scale": 2.0},
    ]
    tools: list[dict[str, Any]] = [
        {"t_index_list": [30], "controlnets": [spec(controlnets[0])]},
        {"t_index_list": [30], "cached_attention": {"enabled": True, "max_frames": 2}},
    ]
    for looks in (mixed, tools):
        staged, framed = make_transform(frame_graph=False), make_transform()
        for transform in (staged, framed):
            transform.validate_params(params_for(transform, controlnets=[spec(controlnets[0])]))
            ready(transform, controlnets[0])  # loads in the background: before the first frame
        want = run_batch(staged, looks, frames=3)
        assert_same_outputs(run_batch(framed, looks, frames=3), want, atol=0)
        assert dict(framed._unet_batch().paths) == {"staged": 3}


def test_a_session_moves_between_paths_keeping_its_stream_batch(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """A session alone (frame graph), then beside one of another variant (staged), then alone
    again: its frames in flight and its history carry over either way."""
    staged, framed = make_transform(frame_graph=False), make_transform()
    look = {"t_index_list": [10, 25, 40], **FEEDBACK}
    other = {"t_index_list": [30], "cfg_type": "full", "guidance_scale": 2.0}
    outputs = []
    for transform in (staged, framed):
        main, guest = Stream(transform, **look), Stream(transform, **other)
        seen = []
        for number, frame in enumerate(camera_frames(7, seed=5)):
            streams = [main, guest] if 2 <= number < 5 else [main]
            seen.append(transform.process([s.job(frame) for s in streams])[0])
        outputs.append(seen)
    assert_same_outputs([outputs[1]], [outputs[0]], atol=2e-5)
    assert dict(framed._unet_batch().paths) == {"frame": 4, "staged": 3}


def test_chained_feedback_is_one_blend() -> None:
    current, previous = torch.randn(2, 4), torch.randn(2, 4)
    chained = current
    for strength in (0.3, 0.2, 0.5):
        chained = chained * (1 - strength) + previous * strength
    weight = chained_weight((0.3, 0.2, 0.5))
    torch.testing.assert_close(current * (1 - weight) + previous * weight, chained)
    assert chained_weight(()) == 0.0


def test_variants_follow_the_guidance_rows() -> None:
    def variant(**values: Any) -> FrameVariant:
        params = DiffusionParams(**values)
        return FrameVariant.of(params, len(params.steps()))

    assert variant(t_index_list=[10, 20]) == FrameVariant(2, "residual")
    assert variant(cfg_type="full", guidance_scale=1.0) == FrameVariant(1, "residual")
    assert variant(cfg_type="full", guidance_scale=2.0, t_index_list=[1, 2]).negative_rows == 2
    assert variant(cfg_type="initialize", guidance_scale=2.0).negative_rows == 1


# -- under --compile ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "look"),
    [
        (FrameVariant(1, "residual"), {"t_index_list": [30], **FEEDBACK}),
        (FrameVariant(2, "full"), {"t_index_list": [10, 30], "cfg_type": "full", **MOTION}),
    ],
    ids=["1-step-self", "2-step-full"],
)
def test_a_frame_graph_is_one_graph_with_no_breaks(
    make_transform: Callable[..., DiffusionTransform],
    variant: FrameVariant,
    look: dict[str, Any],
) -> None:
    """ONE CUDA graph per bucket needs dynamo to capture the whole frame in one graph: a
    break would split it (and run the code between in eager Python)."""
    transform = make_transform()
    unet_batch = transform._unet_batch()
    assert unet_batch.frames is not None
    stream = Stream(transform, guidance_scale=2.0, **look)
    stream.feed(camera_frames(1)[0])  # a history for the feedback and the motion controller
    unet_batch._follow(stream.state, stream.params)
    image = torch.zeros((1, 3, SIZE, SIZE))
    row = unet_batch._frame_row(_Entry(0, stream.state, stream.params, image))
    inputs = unet_batch.frames.inputs(variant, [row])
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            explained = torch._dynamo.explain(unet_batch._frame_forward(variant))(*inputs)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_planned_frame_graphs_compile_at_load_and_serving_compiles_nothing(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """1- and 2-step variants planned at buckets 1 and 4: sessions joining and leaving (1 to 5
    frames), turning temporal tools and guidance on and off, run padded frame graphs with no
    compile; a 3-step batch (not planned) runs staged, compiled at load too."""
    transform = make_transform(
        compile=True, compile_backend="eager", batch_buckets=[1, 4], frame_graph_steps=[1, 2]
    )
    frames = transform._unet_batch().frames
    assert frames is not None
    assert set(frames.planned) == {FrameVariant(1, "residual"), FrameVariant(2, "residual")}
    after_load = compiled_graphs()
    one = frames.call(FrameVariant(1, "residual"))
    two = frames.call(FrameVariant(2, "residual"))
    assert one is not None and two is not None
    pictures = camera_frames(3, seed=8)
    with rows_run(one) as one_sizes, rows_run(two) as two_sizes:  # rows: frames here
        streams = [Stream(transform, t_index_list=[30])]
        for count in range(2, 6):  # 1 to 5 frames a batch: buckets 1, 4 and pieces of 4 + 1
            for picture in pictures:
                transform.process([s.job(picture) for s in streams])
            streams.append(Stream(transform, t_index_list=[20 + count], seed=count))
        toggled = Stream(transform, t_index_list=[20, 35])
        for look in ({**FEEDBACK, **MOTION}, {"guidance_scale": 1.5, "do_add_noise": False}, {}):
            toggled.update(**look)
            for picture in pictures:
                transform.process([toggled.job(picture)])
        unplanned = Stream(transform, t_index_list=[10, 20, 30])
        for picture in pictures:
            transform.process([unplanned.job(picture)])
    assert compiled_graphs() == after_load, "a frame graph compiled while serving"
    assert set(one_sizes) == {1, 4} and set(two_sizes) == {1}
    assert transform._unet_batch().paths["staged"] == len(pictures)


@pytest.mark.usefixtures("fresh_dynamo")
def test_every_planned_bucket_runs_twice_at_load_with_cudnn_tuning_on_only_then(
    make_transform: Callable[..., DiffusionTransform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the staged calls (test_shapes): each planned variant's frame graph (1 step, with
    self and with full guidance) runs twice per bucket at load (CUDA graph trees warm up, then
    record), cuDNN's autotuner on only then; a served batch of a planned variant runs ONE frame
    graph call."""
    made: list[tuple[FrameVariant, int, bool]] = []
    forward = FrameForward.__call__

    def counting(self: FrameForward, *inputs: torch.Tensor) -> Any:
        made.append((self.variant, inputs[0].shape[0], torch.backends.cudnn.benchmark))
        return forward(self, *inputs)

    monkeypatch.setattr(FrameForward, "__call__", counting)
    transform = make_transform(
        compile=True,
        compile_backend="eager",
        batch_buckets=[1, 4],
        frame_graph_steps=[1],
        frame_graph_guidance=["self", "full"],
    )
    planned = Counter((variant.negatives, frames) for variant, frames, _ in made)
    assert planned == {(kind, frames): 2 for kind in ("residual", "full") for frames in (1, 4)}
    assert all(tuning for *_, tuning in made)
    assert not torch.backends.cudnn.benchmark
    made.clear()
    guided = {"cfg_type": "full", "guidance_scale": 1.8}
    streams = [Stream(transform, t_index_list=[25], seed=seed, **guided) for seed in range(3)]
    transform.process([stream.job(camera_frames(1)[0]) for stream in streams])
    assert made == [(FrameVariant(1, "full"), 4, False)]


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_compiled_frame_graph_equals_the_eager_one(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """aot_eager (AOTAutograd's functionalised graph) at bucket 4: three sessions of one
    variant padded to four frames give the eager frame graph's outputs."""
    looks: list[dict[str, Any]] = [
        {"t_index_list": [20, 35], **FEEDBACK},
        {"t_index_list": [10, 30], "guidance_scale": 1.6, **MOTION},
        {"t_index_list": [15, 40], "seed": 9, "do_add_noise": False},
    ]
    want = run_batch(make_transform(), looks, frames=4)
    planned = make_transform(
        compile=True, compile_backend="aot_eager", batch_buckets=[4], frame_graph_steps=[2]
    )
    assert_same_outputs(run_batch(planned, looks, frames=4), want, atol=1e-4)
    assert dict(planned._unet_batch().paths) == {"frame": 4}
