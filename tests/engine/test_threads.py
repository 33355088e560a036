"""The engine's two sides: worker-side methods refuse the event loop's thread, loop-side ones
refuse other threads, and what both read of the loaded model changes in one step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from pydantic import ValidationError, model_validator

from livediff.config import Settings
from livediff.engine import Engine
from livediff.engine.threads import ThreadOwner, WrongThreadError, _checks_enabled
from livediff.transforms.passthrough import PassthroughParams, PassthroughTransform
from tests.server.faulty import ModelSwitchTransform

SIZE = 64


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def passthrough_engine() -> Engine:
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1)
    return Engine(settings, PassthroughTransform(settings))


async def test_a_worker_side_method_called_on_the_event_loop_fails() -> None:
    async with running(passthrough_engine()) as engine:
        session = await engine.open_session(engine.validate({}))
        with pytest.raises(WrongThreadError, match=r"WorkerSide\.apply runs on the worker"):
            engine.worker_side.apply(session, {"width": 128}, others=0)
        with pytest.raises(WrongThreadError, match="worker thread only"):
            engine.worker.attach_here(session)
        assert session.params.width == SIZE  # refused before it changed anything
        applied = await engine.on_worker(
            lambda: engine.worker_side.apply(session, {"width": 128}, others=0)
        )
        assert applied.width == 128 and session.params is applied


async def test_a_loop_side_method_called_from_another_thread_fails() -> None:
    async with running(passthrough_engine()) as engine:
        session = await engine.open_session(engine.validate({}))

        def from_another_thread() -> None:
            asyncio.run(engine.update_params(session.id, {"delay_ms": 5}))

        with pytest.raises(WrongThreadError, match="event loop thread only"):
            await asyncio.to_thread(from_another_thread)
        assert session.params.delay_ms == 0
        await engine.update_params(session.id, {"delay_ms": 5})  # on the loop: fine
        assert session.params.delay_ms == 5


async def test_defaults_and_loaded_params_change_together_on_a_reload() -> None:
    """A reader on another thread never sees one load's defaults with another's params."""
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1, allow_models=["b"])
    async with running(Engine(settings, ModelSwitchTransform(settings))) as engine:
        first = engine.worker_side.snapshot
        assert getattr(first.loaded_for, "model", None) == "a"
        session = await engine.open_session(engine.validate({}))
        mixed: list[object] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                snapshot = engine.worker_side.snapshot
                loaded = getattr(snapshot.loaded_for, "model", None)
                if snapshot.defaults["model"] != loaded:
                    mixed.append(snapshot)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for model in ["b", "a"] * 10:
                await engine.update_params(session.id, {"model": model})
                assert engine.defaults["model"] == model
        finally:
            done.set()
            reader.join(10)
        assert not mixed
        assert engine.worker_side.snapshot is not first
        with pytest.raises(TypeError):
            engine.defaults["model"] = "c"  # type: ignore[index]


def test_an_owner_refuses_other_threads_once_claimed() -> None:
    strict, lenient = ThreadOwner("worker", strict=True), ThreadOwner("loop", strict=False)
    with pytest.raises(WrongThreadError):
        strict.assert_current()  # no worker thread yet: nobody may run its methods
    lenient.assert_current()  # not started: one thread uses it
    claimed = threading.Thread(target=lambda: (strict.claim(), lenient.claim()))
    claimed.start()
    claimed.join()
    for owner in (strict, lenient):
        assert not owner.is_current()
        with pytest.raises(WrongThreadError):
            owner.assert_current()


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("on", True), ("0", False), ("off", False)]
)
def test_the_checks_follow_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("LIVEDIFF_THREAD_CHECKS", value)
    assert _checks_enabled() is expected
    monkeypatch.delenv("LIVEDIFF_THREAD_CHECKS")
    assert _checks_enabled() is __debug__


class RangeParams(PassthroughParams):
    """Two bounds that must stay ordered (a check across fields)."""

    low: int = 5
    high: int = 10

    @model_validator(mode="after")
    def _ordered(self) -> RangeParams:
        if self.low > self.high:
            raise ValueError("low must not be above high")
        return self


class RangeTransform(PassthroughTransform):
    params_model = RangeParams  # type: ignore[assignment]


async def test_updates_sent_back_to_back_are_validated_over_the_params_in_force() -> None:
    """The second update is valid only once the first has landed (low 1, then high 3): the
    loop must not refuse it over params that are still on their way to the worker."""
    settings = Settings(width=SIZE, height=SIZE, warmup_frames=1)
    async with running(Engine(settings, RangeTransform(settings))) as engine:
        session = await engine.open_session(engine.validate({}))
        await asyncio.gather(
            engine.update_params(session.id, {"low": 1}),
            engine.update_params(session.id, {"high": 3}),
        )
        assert (session.params.low, session.params.high) == (1, 3)  # type: ignore[attr-defined]
        with pytest.raises(ValidationError, match="low must not be above high"):
            await engine.update_params(session.id, {"low": 4})  # refused by the worker
        assert session.params.low == 1  # type: ignore[attr-defined]
