"""ControlNet batches under ``--compile``: planned in the shape buckets off the serving path.

A session's params naming a ControlNet are checked on the worker thread between batches
(``validate_params``, as the engine does before they apply); a planning pool loads the
ControlNet there and compiles it, with the UNet's variant with residuals, at every bucket. The
tests compile with the ``eager``/``aot_eager`` backends (dynamo traces, guards and recompiles as
under inductor; aot_eager also runs AOTAutograd's functionalised graph), so that they count
compiles and compare outputs on the CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import ControlNetModel
from pydantic import ValidationError

from livediff.transforms.diffusion.control import ControlNetPool, controlnet_forward
from livediff.transforms.diffusion.shapes import PaddedCall
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import (
    Stream,
    camera_frames,
    ready,
    spec,
    write_controlnet,
)
from tests.transforms.diffusion.test_shapes import compiled_graphs

BUCKETS = [1, 4]


def compiled_transform(
    make_transform: Callable[..., DiffusionTransform], backend: str, buckets: list[int]
) -> DiffusionTransform:
    return make_transform(
        compile=True, compile_backend=backend, batch_buckets=buckets, frame_graph=False
    )


def pool_of(transform: DiffusionTransform) -> ControlNetPool:
    pool = transform._unet_batch().controlnets
    assert pool is not None
    return pool


@contextmanager
def rows_run(call: PaddedCall) -> Iterator[list[int]]:
    """The rows (padded: a bucket) of every run of ``call``'s forward inside the block."""
    forward = call.forward
    rows: list[int] = []

    def counting(*inputs: torch.Tensor) -> Any:
        rows.append(inputs[0].shape[0])
        return forward(*inputs)

    call.forward = counting
    try:
        yield rows
    finally:
        call.forward = forward


def planned_call(transform: DiffusionTransform, model_id: str) -> PaddedCall:
    call = pool_of(transform)._ready[model_id]
    assert isinstance(call, PaddedCall), "the ControlNet is not planned"
    return call


@pytest.mark.usefixtures("fresh_dynamo")
def test_params_naming_a_controlnet_plan_it_and_serving_compiles_nothing(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """Planning happens when the params are checked; then sessions joining and leaving (1 to 4
    UNet rows), scale changes and a second ControlNet pick planned buckets: nothing compiles
    while serving, and the ControlNets and the UNet with residuals run padded."""
    transform = compiled_transform(make_transform, "eager", BUCKETS)
    unet_batch = transform._unet_batch()
    after_load = compiled_graphs()
    first = Stream(transform, t_index_list=[5, 20, 35], controlnets=[spec(controlnets[0])])
    transform.validate_params(first.params)
    after_plan = compiled_graphs()
    assert after_plan > after_load, "naming a ControlNet planned nothing"
    frames = camera_frames(3, seed=4)
    second = Stream(transform, controlnets=[spec(controlnets[0], conditioning_scale=0.4)])
    transform.validate_params(second.params)  # planned already: compiles nothing
    assert compiled_graphs() == after_plan
    with (
        rows_run(planned_call(transform, controlnets[0])) as controlnet_rows,
        rows_run(unet_batch._control_unet_call) as unet_rows,
    ):
        for streams in ([first], [first, second], [second], [first]):  # 3, 4, 1, 3 rows
            for frame in frames:
                transform.process([stream.job(frame) for stream in streams])
        first.update(controlnets=[spec(controlnets[0], conditioning_scale=1.5)])
        transform.validate_params(first.params)
        transform.process([first.job(frames[0])])
    assert compiled_graphs() == after_plan, "a ControlNet batch compiled while serving"
    assert set(controlnet_rows) == {1, 4} and set(unet_rows) == {1, 4}

    both = [spec(controlnets[0]), spec(controlnets[1], conditioning_scale=0.7)]
    second.update(controlnets=both)
    # plans the second ControlNet (of the same architecture: dynamo lifts its weights as
    # inputs, so its graphs are the first one's, run and recorded for it at every bucket)
    transform.validate_params(second.params)
    after_second = compiled_graphs()
    with rows_run(planned_call(transform, controlnets[1])) as added_rows:
        for frame in frames:
            outputs = transform.process([first.job(frame), second.job(frame)])
    assert compiled_graphs() == after_second, "a second ControlNet compiled while serving"
    assert added_rows == [1] * len(frames)  # the second session's one step, bucket 1
    assert all(isinstance(output, torch.Tensor) for output in outputs)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_controlnet_batches_equal_the_eager_path(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """aot_eager: the padded, compiled ControlNets and UNet variant give the eager outputs."""
    eager = make_transform()
    planned = compiled_transform(make_transform, "aot_eager", [4])
    looks: list[dict[str, Any]] = [
        {"t_index_list": [5, 20, 35], "controlnets": [spec(controlnets[0])]},  # 3 rows, of 4
        {  # with the first: 5 UNet rows, in pieces of 4 and 1 (padded to 4)
            "t_index_list": [20, 35],
            "seed": 5,
            "controlnets": [spec(controlnets[0], conditioning_scale=0.6), spec(controlnets[1])],
        },
    ]
    runs = []
    for transform in (eager, planned):
        streams = [Stream(transform, **look) for look in looks]
        for stream in streams:
            transform.validate_params(stream.params)
        ready(transform, *controlnets)  # the eager pool loads them in the background
        frames = camera_frames(4, seed=6)
        runs.append(
            [transform.process([stream.job(frame) for stream in streams]) for frame in frames]
        )
    assert isinstance(pool_of(planned)._ready[controlnets[1]], PaddedCall)
    assert planned._unet_batch()._residuals_planned
    assert pool_of(eager)._planned == set()
    assert_same_outputs(*runs)


def assert_same_outputs(expected: list[list[Any]], got: list[list[Any]]) -> None:
    """Frame by frame, session by session: the same outputs (None while filling)."""
    for expected_outputs, got_outputs in zip(expected, got, strict=True):
        for wanted, output in zip(expected_outputs, got_outputs, strict=True):
            if wanted is None:
                assert output is None
                continue
            torch.testing.assert_close(output, wanted, atol=2e-4, rtol=0)
    assert all(output is not None for output in expected[-1])


@pytest.mark.usefixtures("fresh_dynamo")
def test_an_sdxl_controlnet_batch_compiles_with_the_added_conditioning(
    make_sdxl: Callable[..., DiffusionTransform], tmp_path: Path
) -> None:
    """SDXL: the pooled text embeddings and time ids go into the planned ControlNet and UNet
    variant before the residuals; outputs equal the eager path, serving compiles nothing."""
    eager = make_sdxl()
    planned = make_sdxl(compile=True, compile_backend="eager", batch_buckets=[4], frame_graph=False)
    unet = eager._unet_batch().bundle.uncompiled_unet
    folder = write_controlnet(tmp_path / "sdxl-cn", unet, seed=1)
    runs, graphs = [], 0
    for transform in (eager, planned):
        streams = [
            Stream(transform, seed=3, t_index_list=[10, 30], controlnets=[spec(folder)]),
            Stream(transform, seed=4, prompt="fog", controlnets=[spec(folder)]),
        ]
        for stream in streams:
            transform.validate_params(stream.params)
        ready(transform, folder)
        graphs = compiled_graphs()
        frames = camera_frames(3, seed=8)
        runs.append(
            [transform.process([stream.job(frame) for stream in streams]) for frame in frames]
        )
    assert compiled_graphs() == graphs, "an SDXL ControlNet batch compiled while serving"
    assert isinstance(pool_of(planned)._ready[folder], PaddedCall)
    assert_same_outputs(*runs)


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_controlnet_that_cannot_load_is_refused_at_its_params(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str], tmp_path: Path
) -> None:
    """A planning pool loads at the check: a broken ControlNet is a 422 on its model_id."""
    transform = compiled_transform(make_transform, "eager", [1])
    broken = tmp_path / "broken"
    broken.mkdir()
    source = Path(controlnets[0])
    (broken / "config.json").write_text((source / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    stream = Stream(transform)
    params = type(stream.params).model_validate(
        {**stream.params.model_dump(), "controlnets": [spec(controlnets[0]), spec(str(broken))]}
    )
    with pytest.raises(ValidationError) as refused:
        transform.validate_params(params)
    error = refused.value.errors()[0]
    assert error["loc"] == ("controlnets", 1, "model_id")
    assert "could not load it" in error["msg"]
    assert isinstance(pool_of(transform)._ready[controlnets[0]], PaddedCall)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("part", ["controlnet", "unet with residuals"])
def test_no_graph_breaks_in_the_controlnet_path(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str], part: str
) -> None:
    bundle = make_transform()._unet_batch().bundle
    controlnet = ControlNetModel.from_pretrained(controlnets[0]).eval()  # type: ignore[no-untyped-call]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([250.0, 750.0])
    e = torch.randn(2, 77, bundle.unet.config.cross_attention_dim, generator=generator)
    cond = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        if part == "controlnet":
            explained = torch._dynamo.explain(controlnet_forward(controlnet))(x, t, e, cond)
        else:
            residuals = controlnet_forward(controlnet)(x, t, e, cond)
            explained = torch._dynamo.explain(bundle.unet)(
                x,
                t,
                encoder_hidden_states=e,
                down_block_additional_residuals=residuals[:-1],
                mid_block_additional_residual=residuals[-1],
            )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_controlnet_freed_when_idle_is_planned_again_when_params_name_it(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """An idle release drops the planned call; the ControlNet then loads inside a batch and
    runs eager there (no compile in the batch), until the next check of params plans it."""
    transform = compiled_transform(make_transform, "eager", [2])
    stream = Stream(transform, t_index_list=[10, 30], controlnets=[spec(controlnets[0])])
    transform.validate_params(stream.params)
    pool = pool_of(transform)
    pool.release_idle(-1.0)  # unused for longer than -1 s: every ControlNet
    assert controlnets[0] not in pool._ready and pool._planned == set()
    frames = camera_frames(3, seed=9)
    graphs = compiled_graphs()
    stream.feed(frames[0])  # starts the load in the background
    ready(transform, controlnets[0])
    assert not isinstance(pool._ready[controlnets[0]], PaddedCall)
    stream.feed(frames[1])
    assert compiled_graphs() == graphs, "a ControlNet that joined a batch compiled there"
    transform.validate_params(stream.params)
    with rows_run(planned_call(transform, controlnets[0])) as rows:
        stream.feed(frames[2])
    assert rows == [2]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_dynamo")
def test_planned_controlnet_batches_replay_graphs_recorded_when_planned(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str]
) -> None:
    """reduce-overhead (CUDA graph trees): every graph of a ControlNet batch (the ControlNets,
    the UNet with residuals) is recorded when its params are checked; serving replays them,
    with no compile, no warm-up run and no recording, as sessions join and leave."""
    from tests.transforms.diffusion.test_gpu import cuda_graph_work, yuv

    transform = make_transform(
        device="cuda", compile=True, compile_mode="reduce-overhead", batch_buckets=[1, 2, 4]
    )
    streams = [
        Stream(transform, t_index_list=[5, 20, 35], controlnets=[spec(controlnets[0])]),
        Stream(
            transform,
            t_index_list=[30],
            controlnets=[spec(controlnets[0], conditioning_scale=0.5), spec(controlnets[1])],
        ),
    ]
    for stream in streams:
        transform.validate_params(stream.params)
    graphs = compiled_graphs()
    frames = [yuv(frame) for frame in camera_frames(4)]
    outputs: list[Any] = []
    with cuda_graph_work() as seen:
        for count in (1, 2, 1):  # 3 UNet rows, then 4, then 3 again
            for frame in frames:
                outputs = transform.process([stream.job(frame) for stream in streams[:count]])
    assert compiled_graphs() == graphs
    assert seen == {"recorded": 0, "warm-up": 0}
    assert all(isinstance(output, torch.Tensor) and output.is_cuda for output in outputs)
