"""The shape plan: padded buckets, compiled once at load, never again while serving.

torch.compile runs here with the ``eager`` backend (Settings.compile_backend): dynamo traces,
guards and recompiles exactly as under inductor, so shapes, graph breaks and recompiles are
checked in seconds on the CPU; only code generation is skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from livediff.testing.models import ModelFolders, tiny_options
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.shapes import PaddedCall
from livediff.transforms.diffusion.transform import DiffusionTransform
from livediff.transforms.diffusion.unet_batch import UNetBatch
from tests.server.streaming import publish
from tests.transforms.diffusion.conftest import SIZE, Stream, camera_frames

BUCKETS = [1, 2, 4, 8]
#: The staged calls compiled in BUCKETS (test_frame_graph compiles the frame graph).
COMPILED = {
    "compile": True,
    "compile_backend": "eager",
    "batch_buckets": BUCKETS,
    "frame_graph": False,
}


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    return int(counters["stats"]["unique_graphs"])


def test_buckets_and_pieces() -> None:
    call = PaddedCall(lambda x: x, BUCKETS, static_buffers=False, name="identity")
    assert [call.bucket(rows) for rows in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert call.pieces(19) == [(0, 8), (8, 16), (16, 19)]


def test_padding_never_changes_the_real_rows(make_transform: Callable[..., Any]) -> None:
    unet = make_transform()._unet_batch().bundle.unet
    seen: list[int] = []

    def forward(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return unet(x, t, encoder_hidden_states=e, return_dict=False)[0]  # type: ignore[no-any-return]

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, 8, 8, generator=generator)
    t = torch.linspace(100, 900, 11)
    e = torch.randn(11, 77, unet.config.cross_attention_dim, generator=generator)
    padded = PaddedCall(forward, [1, 2, 4], static_buffers=True, name="unet")
    with torch.inference_mode():
        expected = forward(x, t, e)
        got = padded(x, t, e)
        buffer = padded._buffers[(0, 4, (4, 8, 8), x.dtype, x.device, torch.contiguous_format)]
        address = buffer.data_ptr()
        padded(x, t, e)
    assert seen == [11, 4, 4, 4, 4, 4, 4]  # 11 rows: pieces of 4, 4 and 3 (padded to 4)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (
        padded._buffers[(0, 4, (4, 8, 8), x.dtype, x.device, torch.contiguous_format)].data_ptr()
        == address
    )


@pytest.mark.parametrize("static_buffers", [True, False], ids=["static", "passed"])
def test_a_memory_format_gives_the_forward_one_layout_whatever_the_rows_come_in(
    static_buffers: bool,
) -> None:
    """Rows gathered from a batch keep their source's layout; compiled code guards on strides,
    so a call with a memory format hands its forward every image input in that one layout
    (and keeps one static buffer per input and bucket)."""
    layouts: list[tuple[bool, bool]] = []

    def forward(x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        channels_last = torch.channels_last
        layouts.append(
            (
                x.is_contiguous(memory_format=channels_last),
                cond.is_contiguous(memory_format=channels_last),
            )
        )
        return x * t.view(-1, 1, 1, 1)

    call = PaddedCall(
        forward,
        [2, 4],
        static_buffers=static_buffers,
        name="controlnet",
        memory_format=torch.channels_last,
    )
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    cond = torch.rand(4, 3, 16, 16, generator=generator)
    t = torch.arange(1.0, 5.0)
    for rows in (x, x.contiguous(memory_format=torch.channels_last), x[:3]):
        count = rows.shape[0]
        got = call(rows, cond[:count], t[:count])
        torch.testing.assert_close(got, rows * t[:count].view(-1, 1, 1, 1))
    assert layouts == [(True, True)] * 3
    if static_buffers:
        assert len(call._buffers) == 3  # x, cond and t at bucket 4, one layout each


@pytest.mark.parametrize("module", ["unet", "vae.encoder", "vae.decoder"])
def test_no_graph_breaks_in_the_compiled_modules(
    make_transform: Callable[..., DiffusionTransform], module: str
) -> None:
    bundle = make_transform()._unet_batch().bundle
    generator = torch.Generator().manual_seed(2)
    if module == "unet":
        target: Any = bundle.unet
        inputs: tuple[Any, ...] = (
            torch.randn(2, 4, 8, 8, generator=generator),
            torch.tensor([250.0, 750.0]),
            torch.randn(2, 77, bundle.unet.config.cross_attention_dim, generator=generator),
        )
    elif module == "vae.encoder":
        target, inputs = bundle.vae.encoder, (torch.randn(2, 3, SIZE, SIZE, generator=generator),)
    else:
        target, inputs = bundle.vae.decoder, (torch.randn(2, 4, 8, 8, generator=generator),)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(target)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.fixture
def compiled(make_transform: Callable[..., DiffusionTransform]) -> Iterator[DiffusionTransform]:
    torch._dynamo.reset()
    yield make_transform(**COMPILED)
    torch._dynamo.reset()


def test_every_bucket_runs_twice_at_load_with_cudnn_tuning_on_only_then(
    make_transform: Callable[..., DiffusionTransform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA graph trees warm a function up on its first call and record on the second: each
    bucket of the UNet and both VAE halves runs twice at load, so no graph is recorded (and
    no device sync taken) on a served batch; cuDNN's autotuner is on only meanwhile. (The
    staged calls: test_frame_graph checks the frame graphs' planning.)"""
    calls: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for name in ("_unet_forward", "_encode_forward", "_decode_forward"):
        forward = getattr(UNetBatch, name)

        def counting(
            self: UNetBatch, *inputs: torch.Tensor, _f: Any = forward, _n: str = name
        ) -> Any:
            calls[_n].append((inputs[0].shape[0], torch.backends.cudnn.benchmark))
            return _f(self, *inputs)

        monkeypatch.setattr(UNetBatch, name, counting)
    torch._dynamo.reset()
    try:
        transform = make_transform(**COMPILED)
        assert sorted(calls) == ["_decode_forward", "_encode_forward", "_unet_forward"]
        for name, made in calls.items():
            assert Counter(rows for rows, _ in made) == dict.fromkeys(BUCKETS, 2), name
            assert all(tuning for _, tuning in made), f"{name} planned without cuDNN tuning"
        assert not torch.backends.cudnn.benchmark  # off while serving
        calls.clear()
        Stream(transform).feed(camera_frames(1)[0])
        assert [rows for rows, _ in calls["_unet_forward"]] == [1]
        assert not any(tuning for made in calls.values() for _, tuning in made)
    finally:
        torch._dynamo.reset()


def test_sessions_coming_and_going_pick_buckets_and_never_recompile(
    compiled: DiffusionTransform,
) -> None:
    after_load = compiled_graphs()
    assert after_load >= 3 * len(BUCKETS)  # every bucket of the UNet and both VAE halves
    frames = camera_frames(4, seed=3)
    looks: list[dict[str, Any]] = [
        {"prompt": "a castle", "t_index_list": [30]},
        {
            "prompt": "a lighthouse",
            "t_index_list": [10, 30],
            "cfg_type": "self",
            "guidance_scale": 1.5,
        },
        {"prompt": "fog", "t_index_list": [5, 20, 35], "cfg_type": "full", "guidance_scale": 2.0},
        {
            "prompt": "a neon city",
            "t_index_list": [5, 15, 25, 45],
            "cfg_type": "initialize",
            "guidance_scale": 2.0,
        },
    ]
    streams: list[Stream] = []
    for look in looks:  # a session joins, with its own prompt, steps and CFG type
        streams.append(Stream(compiled, **look))
        for frame in frames:
            jobs = [stream.job(frame) for stream in streams]
            compiled.process(jobs)
    while streams:  # and they leave again
        streams.pop().state.release()
        for stream in streams:
            stream.feed(frames[0])
    assert compiled_graphs() == after_load, "a session joining or leaving recompiled"


async def test_a_joining_session_does_not_stall_the_running_one(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders
) -> None:
    server = serve(**tiny_options(tiny_model, SIZE), **COMPILED)
    graphs = compiled_graphs()
    params = {"t_index_list": [20, 35]}
    async with publish(server.url, size=SIZE, params=params) as running:
        await running.video.wait_for(10, timeout=60)
        joined_at = time.perf_counter()
        answers: list[float] = []
        async with publish(
            server.url, size=SIZE, params={"cfg_type": "full", "guidance_scale": 2.0}
        ) as second:
            answers.append(time.perf_counter() - joined_at)
            started = time.perf_counter()
            async with publish(
                server.url, size=SIZE, params={"t_index_list": [5, 15, 30, 45]}
            ) as third:
                answers.append(time.perf_counter() - started)
                count = len(running.video.frames)
                await running.video.wait_for(count + 10, timeout=60)
                await second.video.wait_for(5, timeout=60)
                await third.video.wait_for(5, timeout=60)
        await asyncio.sleep(0.5)  # and both leave
        count = len(running.video.frames)
        await running.video.wait_for(count + 5, timeout=60)
    arrivals = [frame.at for frame in running.video.frames if frame.at >= joined_at]
    longest_gap = float(np.max(np.diff(arrivals)))
    print(
        f"joiners answered in {answers} s; longest gap of the running session {longest_gap:.3f} s"
    )
    assert compiled_graphs() == graphs, "a session joining or leaving recompiled"
    # a recompile of even this tiny model takes seconds; frames keep coming every few 100 ms
    assert longest_gap < 2.0 and max(answers) < 5.0
