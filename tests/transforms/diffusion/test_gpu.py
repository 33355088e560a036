"""The diffusion transform's CUDA branches (marked ``gpu``: skipped with the reason elsewhere).

Run on a GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

from collections.abc import Callable

import av
import pytest
import torch
from torch._dynamo.utils import counters

from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import Stream, camera_frames

pytestmark = pytest.mark.gpu


def yuv(frame: object) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")


def test_a_steady_state_batch_never_waits_for_the_device(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(device="cuda")
    frames = [yuv(frame) for frame in camera_frames(6)]
    streams = [
        Stream(transform, t_index_list=[20, 35]),
        Stream(transform, cfg_type="self", guidance_scale=1.5),
    ]
    cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(cuda_stream):
        for frame in frames[:3]:  # fills the stream batches, caches prompts, noise, tables
            transform.process([s.job(frame) for s in streams])
        torch.cuda.set_sync_debug_mode("error")
        try:
            for frame in frames[3:]:
                outputs = transform.process([s.job(frame) for s in streams])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cuda_stream.synchronize()
    assert all(isinstance(output, torch.Tensor) and output.is_cuda for output in outputs)


@pytest.mark.slow
def test_cuda_graph_buckets_compile_once(make_transform: Callable[..., DiffusionTransform]) -> None:
    torch._dynamo.reset()
    transform = make_transform(
        device="cuda", compile=True, compile_mode="reduce-overhead", batch_buckets=[1, 2]
    )
    graphs = int(counters["stats"]["unique_graphs"])
    frames = [yuv(frame) for frame in camera_frames(4)]
    streams = [Stream(transform, t_index_list=[30]), Stream(transform, t_index_list=[10, 30])]
    for frame in frames:
        transform.process([s.job(frame) for s in streams])
    assert int(counters["stats"]["unique_graphs"]) == graphs
