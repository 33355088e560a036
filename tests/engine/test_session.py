"""A session hands the worker its frames in order: a tensor from another CUDA stream is adopted
before anything reads it, the scaling down of a large frame included (rule 1 of
livediff.pixels.device)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from livediff.engine import Metrics, Session, SessionStats
from livediff.frames import Frame
from livediff.pixels import device
from livediff.transforms.base import TransformParams


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device: enough for the session to take the CUDA
    path, whose device calls the test replaces with recorders."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def make_session(max_input_pixels: int | None) -> Session:
    return Session(
        "s",
        TransformParams(width=64, height=64),
        SessionStats(Metrics(), 5.0),
        error_limit=5,
        max_input_pixels=max_input_pixels,
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the device side did, in order: 'adopt' and 'resize' (the real resize runs)."""
    seen: list[str] = []
    resize = device.resize_tensor

    def adopt(tensor: torch.Tensor) -> None:
        seen.append("adopt")

    def recorded_resize(tensor: torch.Tensor, width: int, height: int) -> Any:
        seen.append("resize")
        return resize(tensor, width, height)

    monkeypatch.setattr(device, "adopt", adopt)
    monkeypatch.setattr(device, "resize_tensor", recorded_resize)
    return seen


def test_a_large_tensor_frame_is_adopted_before_it_is_scaled_down(calls: list[str]) -> None:
    session = make_session(max_input_pixels=32 * 32)
    image = torch.rand(1, 128, 128, 3).as_subclass(FakeCudaTensor)
    session.submit(Frame(image, pts=1))
    job = session.next_job()
    assert job is not None and calls == ["adopt", "resize"]
    assert tuple(job.frame.image.shape) == (1, 32, 32, 3)


def test_every_tensor_frame_is_adopted_and_host_frames_need_nothing(calls: list[str]) -> None:
    session = make_session(max_input_pixels=None)
    session.submit(Frame(torch.rand(1, 16, 16, 3).as_subclass(FakeCudaTensor), pts=1))
    assert session.next_job() is not None and calls == ["adopt"]
    session.submit(Frame(torch.rand(1, 16, 16, 3), pts=2))  # a CPU tensor: no other stream
    assert session.next_job() is not None and calls == ["adopt"]


@pytest.mark.gpu
def test_on_a_gpu_the_scaled_frame_holds_what_the_other_cuda_stream_wrote() -> None:
    """The producer (the default CUDA stream, as ai-runner's) is still busy when the worker
    takes the frame; without the adoption the resize would read the zeros."""
    produced = torch.zeros(1, 256, 256, 3, device="cuda")
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time on the default CUDA stream
    produced.fill_(0.5)
    session = make_session(max_input_pixels=64 * 64)
    worker_cuda_stream = torch.cuda.Stream()
    with torch.cuda.stream(worker_cuda_stream):
        session.submit(Frame(produced, pts=1))
        job = session.next_job()
        assert job is not None and isinstance(job.frame.image, torch.Tensor)
        scaled = job.frame.image.sum()
        worker_cuda_stream.synchronize()
    assert float(scaled) == pytest.approx(0.5 * 64 * 64 * 3)
