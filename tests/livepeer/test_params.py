"""The params every Livepeer door reads: Livepeer's own fields are stripped, and only bad input
is a refusal; an exception that means a bug in livediff propagates (a 500 and a traceback), so it
is never reported as "params refused". Real engine (passthrough), real session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from livediff.config import Settings
from livediff.engine import Engine
from livediff.livepeer.native.contract import NativeRunner, RunnerRefusal
from livediff.livepeer.native.schemas import LiveVideoToVideoRequest
from livediff.livepeer.params import LIVEPEER_ONLY_FIELDS, transform_values
from livediff.livepeer.trickle_stream import StreamChannels, TrickleStream
from livediff.transforms import TransformParams

SETTINGS = Settings(pipeline="passthrough", width=64, height=64)


def test_livepeer_only_fields_never_reach_the_transform() -> None:
    raw = {"show_reloading_frame": True, "delay_ms": 5}
    assert transform_values(raw) == {"delay_ms": 5}
    assert "show_reloading_frame" in LIVEPEER_ONLY_FIELDS


def test_livepeers_model_id_is_the_diffusion_models_field() -> None:
    from livediff.transforms.diffusion.params import DiffusionParams

    sent = {"model_id": "stabilityai/sdxl-turbo", "prompt": "flowers"}
    assert transform_values(sent) == {"model": "stabilityai/sdxl-turbo", "prompt": "flowers"}
    both = transform_values({"model": "a/b", "model_id": "stabilityai/sd-turbo"})
    assert both == {"model": "stabilityai/sd-turbo"}  # Livepeer's name wins at its doors
    assert DiffusionParams.model_validate(transform_values(sent)).model == sent["model_id"]


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    running = Engine(SETTINGS)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def open_stream(engine: Engine) -> tuple[TrickleStream, TransformParams]:
    params = engine.validate({})
    channels = StreamChannels("http://127.0.0.1:9/in", "http://127.0.0.1:9/out")
    stream = TrickleStream(engine, "s1", channels, params, SETTINGS)
    stream.session = await engine.open_session(params, session_id="s1")
    return stream, params


async def test_bad_params_are_refused_and_the_stream_keeps_its_own(engine: Engine) -> None:
    stream, params = await open_stream(engine)
    assert stream.session is not None
    await stream.apply_params(stream.session, {"delay_ms": -1, "show_reloading_frame": True})
    assert stream.params == params
    assert stream.status.last_error is not None
    assert stream.status.last_error.startswith("params refused: delay_ms:")
    await stream.apply_params(stream.session, {"delay_ms": 3})
    assert stream.params.model_dump()["delay_ms"] == 3


async def test_a_bug_while_applying_params_is_not_a_refusal(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, _ = await open_stream(engine)
    assert stream.session is not None

    async def broken_update(*_args: object, **_kwargs: object) -> TransformParams:
        raise KeyError("a bug in livediff")

    monkeypatch.setattr(engine, "update_params", broken_update)
    with pytest.raises(KeyError, match="a bug in livediff"):
        await stream.apply_params(stream.session, {"delay_ms": 3})
    assert stream.status.last_error is None


async def test_the_native_door_refuses_bad_params_only(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = NativeRunner(SETTINGS)
    await runner.engine.start()
    try:
        request = LiveVideoToVideoRequest(
            subscribe_url="http://127.0.0.1:9/in",
            publish_url="http://127.0.0.1:9/out",
            params={"delay_ms": 5000},
        )
        with pytest.raises(RunnerRefusal) as refused:
            runner.check(request, None)
        assert refused.value.status == 422 and "delay_ms" in refused.value.message

        def broken_validate(*_args: object, **_kwargs: object) -> TransformParams:
            raise ValueError("a bug in livediff")

        monkeypatch.setattr(runner.engine, "validate", broken_validate)
        with pytest.raises(ValueError, match="a bug in livediff"):
            runner.check(request, None)
    finally:
        await runner.stop()
