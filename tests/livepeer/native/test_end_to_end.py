"""The native runner end to end: a gateway's numbered clip in, the runner's output read back.

The "orchestrator" (the trickle server double) makes the stream's four channels, the test calls
``POST /live-video-to-video`` with them, publishes an H.264 (+ Opus) MPEG-TS clip in real time on
the input channel, and reads the output and events channels, as a gateway would.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from livediff.testing.models import ModelFolders, write_model_folder
from livediff.testing.trickle import (
    Clip,
    ClipPublisher,
    EventReader,
    OutputReader,
    control_message,
    encode_clip,
    send_json,
)
from livediff.testing.trickle_server import FakeTrickleServer, StreamChannels
from tests.livepeer.native.conftest import RunnerServer, health, stream_threads, until

FPS = 30
SIZE = 256
FAILING = "tests.livepeer.native.transforms:FailingTransform"


def stream_request(channels: StreamChannels, request_id: str, **params: Any) -> dict[str, Any]:
    return {
        "subscribe_url": channels.subscribe_url,
        "publish_url": channels.publish_url,
        "control_url": channels.control_url,
        "events_url": channels.events_url,
        "model_id": "livediff",
        "params": params,
        "gateway_request_id": request_id,
        "manifest_id": "manifest-1",
        "stream_id": f"stream-{request_id}",
    }


class Gateway:
    """The gateway's side of one stream: input publisher, output, events and control."""

    def __init__(
        self, client: httpx.AsyncClient, trickle: FakeTrickleServer, stream_id: str
    ) -> None:
        self.client = client
        self.trickle = trickle
        self.channels = trickle.create_stream(stream_id)
        self.publisher = ClipPublisher(client, self.channels.subscribe_url, FPS)
        self.output = OutputReader(client, self.channels.publish_url)
        self.events = EventReader(client, self.channels.events_url)
        self.control = control_message(client, self.channels.control_url)
        self.reading = asyncio.ensure_future(self.output.read())
        self.listening = asyncio.ensure_future(self.events.read())

    async def start(self, runner: RunnerServer, **params: Any) -> None:
        body = stream_request(self.channels, self.channels.names[0], **params)
        response = await self.client.post(f"{runner.url}/live-video-to-video", json=body)
        assert response.status_code == 200, response.text
        await until(lambda: self.events.of_type("status"), what="the first status event")
        # the runner reads from the live edge: publish once its GET waits for the next segment
        input_channel = self.channels.names[0]
        await until(lambda: self.trickle.in_flight("GET", input_channel), what="the runner's GET")

    async def finish(self) -> None:
        """Close the input as the orchestrator does (its other channels go with it)."""
        await self.publisher.close()
        await self.control.close()
        self.trickle.delete_channel(self.channels.names[0])
        await asyncio.wait_for(asyncio.gather(self.reading, self.listening), 20)

    def latencies_ms(self, clip: Clip) -> list[float]:
        """Each output frame's arrival less its input frame's last byte going out."""
        sent = self.publisher.sent
        found = []
        for frame in self.output.frames:
            number = clip.numbers_by_pts.get(frame.pts)
            if number is not None and number in sent:
                found.append((frame.arrived - sent[number]) * 1000)
        return found

    def input_numbers(self, clip: Clip) -> list[int | None]:
        """The input frame each output frame came from (by the pts it carries)."""
        return [clip.numbers_by_pts.get(frame.pts) for frame in self.output.frames]

    def errors(self) -> list[str]:
        return [str(body["event"]["message"]) for _, body in self.events.of_type("error")]


async def stream_ended(runner: RunnerServer, client: httpx.AsyncClient) -> None:
    await until(lambda: runner.runner.health() == "IDLE", what="IDLE after the stream ended")
    assert await health(client, runner) == "IDLE"
    await until(lambda: not stream_threads(), what="the stream's threads to end")
    await until(lambda: not len(runner.runner.tasks), what="the stream's task to end")


async def test_passthrough_keeps_every_frame_in_order_fast_and_leaks_nothing(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
) -> None:
    runner = runner_factory(pipeline="passthrough", keyframe_interval_s=1.0)
    tasks_before = runner.loop_tasks()
    gateway = Gateway(client, trickle, "pass")
    await gateway.start(runner, width=SIZE, height=SIZE)
    assert await health(client, runner) == "OK"
    clip = encode_clip(90, (SIZE, SIZE), fps=FPS, gop_s=1.0, audio=True)
    await gateway.publisher.publish(clip)
    await asyncio.sleep(0.3)
    await gateway.finish()

    numbers = [frame.number for frame in gateway.output.frames]
    assert gateway.input_numbers(clip) == numbers  # each frame's pixels are its input's
    assert numbers == sorted(set(numbers)), numbers  # in order, none twice
    # newest-wins slots may shed a frame when this shared machine stalls, never more than a few
    assert len(numbers) >= 85 and numbers[0] == 0 and numbers[-1] == 89, numbers
    assert all((f.width, f.height) == (SIZE, SIZE) for f in gateway.output.frames)
    assert len(gateway.output.segments) >= 3 and all(gateway.output.segment_starts_with_key)
    assert set(gateway.output.keyframes.values()) == {1}  # one segment per GOP
    assert gateway.output.audio_packets > 0  # the audio came through
    latency = gateway.latencies_ms(clip)
    assert len(latency) == len(numbers) and statistics.median(latency) < 150, latency
    await stream_ended(runner, client)
    assert runner.loop_tasks() <= tasks_before
    print(f"\npassthrough latency ms: p50 {statistics.median(latency):.1f} max {max(latency):.1f}")


async def test_events_come_at_the_interval_in_ai_runners_shape(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
) -> None:
    runner = runner_factory(pipeline="passthrough", runner_status_interval_s=0.3)
    gateway = Gateway(client, trickle, "events")
    await gateway.start(runner, width=128, height=128)
    await gateway.publisher.publish(encode_clip(45, (128, 128), fps=FPS))
    await gateway.finish()
    statuses = gateway.events.of_type("status")
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(statuses)]
    assert len(statuses) >= 4 and max(gaps) < 0.3 + 0.9, gaps  # slack for a busy machine
    event = statuses[1][1]
    assert event["queue_event_type"] == "ai_stream_events"
    status = event["event"]
    assert status["pipeline"] == "livediff" and status["state"] in ("ONLINE", "DEGRADED_INPUT")
    assert {"last_input_time", "fps"} <= set(status["input_status"])
    assert {"last_output_time", "fps", "last_params", "restart_count"} <= set(
        status["inference_status"]
    )
    assert {"start_time", "timestamp", "last_status_timestamp"} <= set(status)
    assert statuses[0][1]["event"]["inference_status"]["last_params"]["width"] == 128
    traces = {body["event"]["type"] for _, body in gateway.events.events}
    assert {"runner_receive_stream_request", "runner_receive_first_ingest_segment"} <= traces
    assert "runner_send_first_processed_segment" in traces
    await stream_ended(runner, client)


async def test_control_updates_change_params_and_refusals_are_error_events(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
) -> None:
    runner = runner_factory(pipeline="passthrough", keyframe_interval_s=1.0)
    gateway = Gateway(client, trickle, "control")
    await gateway.start(runner, width=SIZE, height=SIZE)
    clip = encode_clip(120, (SIZE, SIZE), fps=FPS, gop_s=1.0)
    publishing = asyncio.ensure_future(gateway.publisher.publish(clip))
    await until(lambda: len(gateway.output.frames) >= 20, what="frames before the update")
    send_json(gateway.control, {"keep": "alive"})
    send_json(gateway.control, {"width": 13})
    await until(gateway.errors, what="the refused update's error event")
    send_json(gateway.control, {"width": 128, "height": 128})
    await publishing
    await asyncio.sleep(0.3)
    await gateway.finish()

    assert len(gateway.errors()) == 1 and "width" in gateway.errors()[0]
    sizes = [(frame.width, frame.height) for frame in gateway.output.frames]
    first_small = sizes.index((128, 128))
    assert set(sizes[:first_small]) == {(SIZE, SIZE)} and set(sizes[first_small:]) == {(128, 128)}
    numbers = [n for n in gateway.input_numbers(clip) if n is not None]
    assert numbers == sorted(numbers) and len(numbers) >= 110  # the stream went on throughout
    applied = [
        body["event"]["inference_status"]["last_params"]
        for _, body in gateway.events.of_type("status")
        if body["event"]["inference_status"]["last_params"]
    ]
    assert applied[-1]["width"] == 128 and applied[-1]["delay_ms"] == 0.0
    await stream_ended(runner, client)


async def test_a_new_stream_replaces_the_running_one(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
) -> None:
    runner = runner_factory(pipeline="passthrough")
    first = Gateway(client, trickle, "first")
    await first.start(runner, width=128, height=128)
    publishing = asyncio.ensure_future(first.publisher.publish(encode_clip(60, (128, 128))))
    await until(lambda: len(first.output.frames) >= 10, what="the first stream's frames")
    second = Gateway(client, trickle, "second")
    await second.start(runner, width=128, height=128)
    await until(first.reading.done, what="the first stream's output to end")
    await second.publisher.publish(encode_clip(30, (128, 128)))
    await asyncio.sleep(0.3)
    await publishing
    await first.finish()
    await second.finish()
    assert 10 <= len(first.output.frames) < 60
    second_numbers = [frame.number for frame in second.output.frames]
    assert second_numbers == sorted(set(second_numbers)) and len(second_numbers) >= 27
    await stream_ended(runner, client)


async def test_a_silent_input_and_a_broken_transform_end_the_stream(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
) -> None:
    runner = runner_factory(pipeline=FAILING, runner_input_timeout_s=1.0, transform_error_limit=3)
    quiet = Gateway(client, trickle, "quiet")
    await quiet.start(runner, width=128, height=128)
    await quiet.publisher.publish(encode_clip(10, (128, 128)))  # then nothing, channels open
    await until(lambda: runner.runner.health() == "IDLE", timeout=10, what="the timeout")
    await asyncio.sleep(0.3)
    assert quiet.events.of_type("status")[-1][1]["event"]["state"] == "OFFLINE"  # its last word
    await quiet.finish()
    assert 8 <= len(quiet.output.frames) <= 10
    broken = Gateway(client, trickle, "broken")
    await broken.start(runner, width=128, height=128, fail=True)
    await broken.publisher.publish(encode_clip(15, (128, 128)))
    await until(lambda: runner.runner.health() == "IDLE", what="the failed stream to end")
    await broken.finish()
    assert any("the transform failed" in message for message in broken.errors())
    assert broken.events.of_type("status")[-1][1]["event"]["state"] == "ERROR"
    await stream_ended(runner, client)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


async def test_the_tiny_diffusion_model_restyles_the_stream_and_takes_prompts(
    trickle: FakeTrickleServer,
    runner_factory: Callable[..., RunnerServer],
    client: httpx.AsyncClient,
    tiny_model: ModelFolders,
) -> None:
    runner = runner_factory(
        pipeline="diffusion",
        model=str(tiny_model.model),
        vae=str(tiny_model.taesd),
        device="cpu",
        width=128,
        height=128,
    )
    gateway = Gateway(client, trickle, "diffusion")
    await gateway.start(runner, prompt="a red square", seed=1)
    clip = encode_clip(60, (128, 128), fps=FPS)
    publishing = asyncio.ensure_future(gateway.publisher.publish(clip))
    await until(lambda: len(gateway.output.frames) >= 5, timeout=20, what="restyled frames")
    temporal = {  # Livepeer's StreamDiffusion shapes
        "cached_attention": {"enabled": True, "max_frames": 2, "interval": 1},
        "image_postprocessing": {
            "processors": [{"type": "feedback", "params": {"feedback_strength": 0.3}}]
        },
    }
    send_json(gateway.control, {"prompt": "a blue circle", "seed": 7, **temporal})
    await publishing
    await asyncio.sleep(0.5)
    await gateway.finish()

    numbers = [n for n in gateway.input_numbers(clip) if n is not None]
    assert len(numbers) == len(gateway.output.frames) >= 10  # every output is an input's
    assert numbers == sorted(set(numbers))  # in order, none twice (slow frames are dropped)
    assert all((f.width, f.height) == (128, 128) for f in gateway.output.frames)
    assert all(frame.number is None for frame in gateway.output.frames)  # restyled pixels
    prompts = [
        body["event"]["inference_status"]["last_params"]["prompt"]
        for _, body in gateway.events.of_type("status")
        if body["event"]["inference_status"]["last_params"]
    ]
    assert prompts[0] == "a red square" and prompts[-1] == "a blue circle"
    last = [
        body["event"]["inference_status"]["last_params"]
        for _, body in gateway.events.of_type("status")
        if body["event"]["inference_status"]["last_params"]
    ][-1]
    assert last["cached_attention"] == temporal["cached_attention"]
    assert last["image_postprocessing"]["processors"][0]["params"]["feedback_strength"] == 0.3
    assert not gateway.errors()
    await stream_ended(runner, client)
