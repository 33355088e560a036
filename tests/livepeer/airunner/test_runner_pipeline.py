"""LivediffPipeline under ai-runner's process loop: frames, params, reloads, shedding, stop."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable

import pytest
import torch
from pydantic import ValidationError

from livediff.livepeer.airunner.pipeline import LivediffPipeline
from livediff.livepeer.airunner.streams import PipelineStoppedError
from tests.livepeer.airunner.conftest import SIZE, TIME_BASE, Driven, until, video_frame

GAIN = "tests.livepeer.airunner.transforms:GainTransform"
Drive = Callable[..., Awaitable[Driven]]


def card(seed: int) -> torch.Tensor:
    """A random (1, SIZE, SIZE, 3) float32 frame in [0, 1], as ai-runner's decoder makes it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, SIZE, SIZE, 3), generator=generator)


async def test_passthrough_frames_keep_timestamps_shape_range_and_stream_id(drive: Drive) -> None:
    driven = await drive("passthrough")
    await driven.start_stream("stream-a", {"width": SIZE, "height": SIZE})
    for index in range(4):
        sent = video_frame(card(index), index + 10)
        out = await driven.roundtrip(sent)
        assert out.request_id == "stream-a"
        assert (out.timestamp, out.time_base) == (sent.timestamp, TIME_BASE)
        assert out.tensor.shape == (1, SIZE, SIZE, 3) and out.tensor.dtype == torch.float32
        assert torch.equal(out.tensor, sent.tensor)
        assert out.tensor is not sent.tensor  # a new tensor, not the input's buffer
        assert {"pre_process_frame", "post_process_frame"} <= out.log_timestamps.keys()
    assert driven.driver.errors == []


async def test_outputs_are_clamped_to_the_unit_range(drive: Drive) -> None:
    driven = await drive(GAIN)
    await driven.start_stream("s", {"width": SIZE, "height": SIZE, "gain": 3.0})
    sent = video_frame(card(1), 1)
    out = await driven.roundtrip(sent)
    assert float(out.tensor.min()) >= 0.0 and float(out.tensor.max()) == 1.0
    assert torch.allclose(out.tensor, (sent.tensor * 3.0).clamp(0, 1))


async def test_an_update_in_place_returns_none_and_changes_the_next_output(drive: Drive) -> None:
    driven = await drive(GAIN)
    params = {"width": SIZE, "height": SIZE, "gain": 1.0}
    await driven.start_stream("s", params)
    frame = card(2)
    before = await driven.roundtrip(video_frame(frame, 1))
    assert torch.allclose(before.tensor, frame)

    assert await driven.pipeline.update_params(**{**params, "gain": 0.5}) is None
    after = await driven.roundtrip(video_frame(frame, 2))
    assert torch.allclose(after.tensor, frame * 0.5)

    driven.driver.update_params({**params, "gain": 0.25})  # the same through ai-runner's loop
    await driven.params_applied({"gain": 0.25})
    through_loop = await driven.roundtrip(video_frame(frame, 3))
    assert torch.allclose(through_loop.tensor, frame * 0.25)
    assert driven.driver.reloads == 0
    assert driven.pipeline.streams.engine.transform.reloads == []


async def test_a_model_change_returns_a_task_that_reloads(drive: Drive) -> None:
    driven = await drive(GAIN)
    params = {"width": SIZE, "height": SIZE, "model": "dim"}
    await driven.start_stream("s", params)
    transform = driven.pipeline.streams.engine.transform

    task = await driven.pipeline.update_params(**{**params, "model": "bright"})
    assert isinstance(task, asyncio.Task)
    await task
    assert transform.reloads == ["bright"]
    frame = card(3)
    out = await driven.roundtrip(video_frame(frame, 1))
    assert torch.allclose(out.tensor, (frame + 0.25).clamp(0, 1))


async def test_frames_during_a_reload_become_loading_frames(drive: Drive) -> None:
    driven = await drive(GAIN)
    params = {"width": SIZE, "height": SIZE, "model": "dim"}
    await driven.start_stream("s", params)
    transform = driven.pipeline.streams.engine.transform
    transform.reload_gate.clear()  # hold the reload until the test has looked

    driven.driver.update_params({**params, "model": "bright"})
    await until(lambda: driven.driver.reloads == 1, what="the runtime to await the reload")
    assert not driven.driver.ready.is_set()
    driven.driver.send_input(video_frame(card(4), 1))
    loading = await driven.driver.recv_output()
    assert loading.is_loading_frame and loading.timestamp == 3000
    assert transform.reloads == []

    transform.reload_gate.set()
    await driven.params_applied({"model": "bright"})
    frame = card(5)
    out = await driven.roundtrip(video_frame(frame, 2))
    assert torch.allclose(out.tensor, (frame + 0.25).clamp(0, 1))
    assert transform.reloads == ["bright"]
    assert driven.driver.errors == []


async def test_invalid_params_are_refused_and_change_nothing(drive: Drive) -> None:
    driven = await drive(GAIN)
    params = {"width": SIZE, "height": SIZE, "gain": 2.0}
    await driven.start_stream("s", params)
    with pytest.raises(ValidationError, match="gain"):
        await driven.pipeline.update_params(**{**params, "gain": 99})
    with pytest.raises(ValidationError, match="colour"):
        await driven.pipeline.update_params(**{**params, "colour": "red"})

    driven.driver.update_params({**params, "gain": -1})
    await until(lambda: len(driven.driver.errors) == 1, what="the refused update")
    assert "Error updating params" in driven.driver.errors[0]
    assert "gain" in driven.driver.errors[0]
    frame = card(6)
    out = await driven.roundtrip(video_frame(frame, 1))
    assert torch.allclose(out.tensor, (frame * 2.0).clamp(0, 1))


async def test_a_slow_pipeline_sheds_frames_instead_of_queueing_them(drive: Drive) -> None:
    driven = await drive("passthrough")
    await driven.start_stream("s", {"width": SIZE, "height": SIZE, "delay_ms": 150.0})
    sent = [video_frame(card(i % 4), i) for i in range(40)]
    last = sent[-1].timestamp

    async def collect() -> list[int]:
        received: list[int] = []
        while not received or received[-1] != last:
            received.append((await driven.driver.recv_output(30)).timestamp)
        return received

    collector = asyncio.create_task(collect())
    for frame in sent[:-1]:
        driven.driver.send_input(frame)  # never blocks: the runtime's queue drops when full
        await asyncio.sleep(0.01)
    while not driven.driver.send_input(sent[-1]):
        await asyncio.sleep(0.01)
    received = await collector

    assert received == sorted(set(received))  # in order, none twice
    assert len(received) < len(sent) / 2
    stats = driven.pipeline.stats()
    registry = driven.pipeline.streams.engine.metrics.registry
    shed = registry.get_sample_value("livediff_frames_dropped_total", {"stage": "input"})
    assert shed is not None and shed > 0
    assert stats["frames_in"] == stats["frames_processed"] + shed
    assert len(received) <= stats["frames_processed"]


async def test_a_new_stream_id_gets_a_fresh_session(drive: Drive) -> None:
    driven = await drive("passthrough")
    params = {"width": SIZE, "height": SIZE}
    await driven.start_stream("first", params)
    await driven.roundtrip(video_frame(card(7), 1))
    await driven.roundtrip(video_frame(card(7), 2))
    await driven.start_stream("second", params)
    out = await driven.roundtrip(video_frame(card(8), 3))
    assert out.request_id == "second"
    stats = driven.pipeline.stats()
    assert (stats["request_id"], stats["frames_in"]) == ("second", 1)


async def test_a_failing_transform_ends_the_session_and_the_stream_recovers(drive: Drive) -> None:
    driven = await drive(GAIN, LIVEDIFF_TRANSFORM_ERROR_LIMIT="2")
    params = {"width": SIZE, "height": SIZE, "gain": 0.5}
    await driven.start_stream("s", params)
    good = await driven.roundtrip(video_frame(card(10), 1))

    driven.driver.update_params({**params, "fail": True})
    await driven.params_applied({"fail": True})
    shown = await driven.roundtrip(video_frame(card(11), 2))
    assert torch.equal(shown.tensor, good.tensor)  # the last good frame, at the new timestamp
    driven.driver.send_input(video_frame(card(12), 3))
    await until(lambda: any("ended" in error for error in driven.driver.errors), what="the end")
    assert "Error processing output frame: stream s ended" in driven.driver.errors[0]
    assert "2 frames in a row" in driven.driver.errors[0]

    driven.driver.update_params(params)
    await driven.params_applied({"fail": False})
    frame = card(13)
    out = await driven.roundtrip(video_frame(frame, 4))  # a fresh session for the same stream
    assert out.request_id == "s" and torch.allclose(out.tensor, frame * 0.5)
    assert driven.pipeline.stats()["frames_in"] == 1


async def test_stop_ends_the_worker_and_lets_go_of_the_transform(
    drive: Drive, worker_threads: Callable[[], int]
) -> None:
    baseline = worker_threads()
    driven = await drive(GAIN)
    await driven.start_stream("s", {"width": SIZE, "height": SIZE})
    await driven.roundtrip(video_frame(card(9), 1))
    pipeline: LivediffPipeline = driven.pipeline
    transform_ref = weakref.ref(pipeline.streams.engine.transform)
    assert worker_threads() == baseline + 1

    await driven.stop()  # ai-runner stops the loops, then calls pipeline.stop()
    assert worker_threads() == baseline
    gc.collect()
    assert transform_ref() is None, "something still holds the transform (and its models)"
    with pytest.raises(PipelineStoppedError):
        await pipeline.put_video_frame(video_frame(card(9), 2), "s")


async def test_a_transform_that_cannot_load_fails_initialize_and_leaves_no_thread(
    monkeypatch: pytest.MonkeyPatch, worker_threads: Callable[[], int]
) -> None:
    baseline = worker_threads()
    monkeypatch.setenv(
        "LIVEDIFF_PIPELINE", "tests.livepeer.airunner.transforms:BrokenLoadTransform"
    )
    pipeline = LivediffPipeline()
    with pytest.raises(RuntimeError, match="weights not found"):
        await pipeline.initialize(width=SIZE, height=SIZE)
    assert worker_threads() == baseline
    with pytest.raises(PipelineStoppedError):
        await pipeline.get_processed_video_frame()
