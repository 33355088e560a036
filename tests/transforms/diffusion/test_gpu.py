"""The diffusion transform's CUDA branches (marked ``gpu``: skipped with the reason elsewhere).

Run on a GPU machine with ``python -m pytest -m gpu``.

"Never waits for the device" is checked with ``torch.cuda.set_sync_debug_mode("error")``, which
raises on the synchronising CUDA calls PyTorch itself makes (a blocking copy, ``.item()``, a
stream or device synchronize). It cannot see ``torch.cuda.Event.synchronize`` (the pinned
pool's wait for a buffer's last copy, the worker's one wait per batch) nor a pinned host
allocation; those are counted by the CPU tests of the pool (tests/pixels/test_staging.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import pytest
import torch
from torch._dynamo.utils import counters

from livediff.pixels.device import constants
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.transforms.diffusion.conftest import (
    Stream,
    camera_frames,
    ready,
    spec,
    write_depth_model,
)

pytestmark = pytest.mark.gpu


def yuv(frame: object) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")


def steady_outputs(transform: DiffusionTransform, streams: list[Stream]) -> list[Any]:
    """Three batches to fill the stream batches and the caches (prompts, noise, tables, device
    constants), then three more with any synchronising CUDA call raising; their outputs."""
    frames = [yuv(frame) for frame in camera_frames(6)]
    cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(cuda_stream):
        for frame in frames[:3]:
            transform.process([s.job(frame) for s in streams])
        misses = constants.misses
        torch.cuda.set_sync_debug_mode("error")
        try:
            for frame in frames[3:]:
                outputs = transform.process([s.job(frame) for s in streams])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cuda_stream.synchronize()
    assert constants.misses == misses  # no constant made (nor copied from the host) again
    return outputs


def test_a_steady_state_batch_never_waits_for_the_device(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    transform = make_transform(device="cuda")
    streams = [
        Stream(transform, t_index_list=[20, 35]),
        Stream(transform, cfg_type="self", guidance_scale=1.5),
    ]
    outputs = steady_outputs(transform, streams)
    assert all(isinstance(output, torch.Tensor) and output.is_cuda for output in outputs)


def test_a_steady_state_batch_with_controlnets_never_waits_for_the_device(
    make_transform: Callable[..., DiffusionTransform], controlnets: list[str], tmp_path: Path
) -> None:
    """Canny, depth and passthrough ControlNets: their row indices and scales, the depth
    model's mean and std and the Canny kernels are device constants, made once."""
    depth = write_depth_model(tmp_path / "depth")
    transform = make_transform(device="cuda", depth_model=str(depth))
    canny = spec(controlnets[0], preprocessor="canny", conditioning_scale=0.8)
    depth_entry = spec(
        controlnets[1], preprocessor="depth", preprocessor_params={"detect_resolution": 140}
    )
    streams = [
        Stream(transform, t_index_list=[20, 35], controlnets=[canny]),
        Stream(transform, cfg_type="full", guidance_scale=1.5, controlnets=[depth_entry]),
        Stream(transform, controlnets=[spec(controlnets[0], conditioning_scale=0.5), canny]),
    ]
    transform.process([s.job(yuv(camera_frames(1)[0])) for s in streams])  # starts the loads
    ready(transform, *controlnets)
    outputs = steady_outputs(transform, streams)
    assert all(isinstance(output, torch.Tensor) and output.is_cuda for output in outputs)


@contextmanager
def cuda_graph_work() -> Iterator[dict[str, int]]:
    """Count the CUDA graph trees' recordings and warm-up (eager) runs inside the block."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    seen = {"recorded": 0, "warm-up": 0, "replayed": 0}
    record, warm_up = CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.run_eager
    replay = CUDAGraphTreeManager.execute_node

    def recording(self: Any, *args: Any) -> Any:
        seen["recorded"] += 1
        return record(self, *args)

    def warming_up(self: Any, *args: Any) -> Any:
        seen["warm-up"] += 1
        return warm_up(self, *args)

    def replaying(self: Any, *args: Any) -> Any:
        seen["replayed"] += 1
        return replay(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CUDAGraphTreeManager, "record_function", recording)
        patch.setattr(CUDAGraphTreeManager, "run_eager", warming_up)
        patch.setattr(CUDAGraphTreeManager, "execute_node", replaying)
        yield seen


@pytest.mark.slow
def test_cuda_graphs_are_recorded_at_load_never_while_serving(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """Sessions joining with other step counts and CFG types take other combinations of
    encode, UNet and decode buckets (and pieces of the largest): all replay graphs recorded
    at load, with no compile, no warm-up run and no recording."""
    torch._dynamo.reset()
    transform = make_transform(
        device="cuda", compile=True, compile_mode="reduce-overhead", batch_buckets=[1, 2, 4]
    )
    graphs = int(counters["stats"]["unique_graphs"])
    frames = [yuv(frame) for frame in camera_frames(4)]
    looks: list[dict[str, Any]] = [
        {"t_index_list": [30]},
        {"t_index_list": [10, 30]},
        {"t_index_list": [5, 20, 35], "cfg_type": "full", "guidance_scale": 2.0},
    ]
    streams: list[Stream] = []
    with cuda_graph_work() as seen:
        for look in looks:  # 1, then 3, then 9 UNet rows (a piece of 4, 4 and 1)
            streams.append(Stream(transform, **look))
            for frame in frames:
                transform.process([s.job(frame) for s in streams])
    assert int(counters["stats"]["unique_graphs"]) == graphs
    assert seen["recorded"] == 0 and seen["warm-up"] == 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_frame_graph_batch_replays_one_cuda_graph(
    make_transform: Callable[..., DiffusionTransform],
) -> None:
    """1 to 4 one-step sessions (buckets 1, 2, 4), with temporal tools and guidance on and
    off: each batch is ONE graph replay (encode, steps, UNet and decode inside), nothing is
    compiled, warmed up or recorded while serving."""
    torch._dynamo.reset()
    transform = make_transform(
        device="cuda", compile=True, compile_mode="reduce-overhead", batch_buckets=[1, 2, 4]
    )
    graphs = int(counters["stats"]["unique_graphs"])
    frames = [yuv(frame) for frame in camera_frames(3)]
    looks: list[dict[str, Any]] = [
        {},
        {"guidance_scale": 1.5, "do_add_noise": False},
        {"motion_noise": {"enabled": True}},
        {"seed": 5, "prompt": "ink"},
    ]
    streams: list[Stream] = []
    batches = 0
    with cuda_graph_work() as seen:
        for look in looks:
            streams.append(Stream(transform, t_index_list=[30], **look))
            for frame in frames:
                transform.process([s.job(frame) for s in streams])
                batches += 1
    assert int(counters["stats"]["unique_graphs"]) == graphs
    assert seen == {"recorded": 0, "warm-up": 0, "replayed": batches}
    assert transform._unet_batch().paths == {"frame": batches}
    torch._dynamo.reset()
