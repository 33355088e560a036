"""Transforms for server tests, loaded by 'module:Class' like any user's plug-in."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_core import ValidationError

from livediff.frames import Image
from livediff.pixels import resize
from livediff.transforms.base import Job, Transform, TransformParams


class FlakyTransform(Transform):
    """Passes frames through but raises on every other call, like a model with a bad input path."""

    name = "flaky"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        self.calls += 1
        if self.calls % 2 == 0:
            raise RuntimeError("flaky model")
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]


class GatedLoadTransform(Transform):
    """Its load() waits until the test opens the gate, so LOADING can be observed."""

    name = "gated"
    gate = threading.Event()

    def load(self) -> None:
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [job.frame.image for job in jobs]


class ModelParams(TransformParams):
    model: str = "a"


class ModelSwitchTransform(Transform):
    """Holds one 'model' for every session, like the diffusion transform; 'missing' cannot load."""

    name = "model-switch"
    params_model = ModelParams

    @classmethod
    def model_ids(cls, params: TransformParams) -> dict[tuple[str | int, ...], str]:
        return {("model",): str(getattr(params, "model", ""))}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.loaded = "a"
        self.reloads = 0

    def loaded_params(self) -> dict[str, object]:
        return {"model": self.loaded}

    def requires_reload(self, old: TransformParams, new: TransformParams) -> bool:
        wanted = getattr(new, "model", self.loaded)
        return bool(wanted != getattr(old, "model", None) and wanted != self.loaded)

    def reload(self, params: TransformParams) -> None:
        wanted = getattr(params, "model", self.loaded)
        if wanted == "missing":
            raise ValidationError.from_exception_data(
                "ModelParams",
                [
                    {
                        "type": "value_error",
                        "loc": ("model",),
                        "input": wanted,
                        "ctx": {"error": "no such model"},
                    }
                ],
            )
        self.loaded, self.reloads = wanted, self.reloads + 1

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        return [job.frame.image for job in jobs]


Fault = Literal["raise", "sleep", "oom", "cuda_oom", "die", "hang"]


class WorkerKilled(BaseException):
    """Not an Exception: it escapes the per-frame isolation and ends the worker thread."""


class FaultyParams(TransformParams):
    leak_mb: float = Field(
        0.0, ge=0, le=4096, description="Fake memory each frame takes and keeps (of budget_mb)."
    )


class FaultyTransform(Transform):
    """Passes frames through, and misbehaves on command.

    Test servers run in the test's process, so commands are class attributes: ``arm(fault,
    frames)`` makes the next ``frames`` calls of process() raise (``raise``), sleep
    ``sleep_s`` (``sleep``), exhaust the fake memory budget (``oom``: MemoryError), raise
    torch's CUDA OutOfMemoryError (``cuda_oom``), kill the worker thread (``die``) or block
    until ``reset()`` (``hang``: a call that never returns, as far as the engine can tell;
    ``hung`` counts the calls blocked now). From any client, params ``leak_mb`` spends the
    fake budget frame by frame. Every load but the first instance's first (a restart, or a new
    instance replacing a hung one) waits for ``reload_gate`` and raises when ``fail_reloads``
    is set. ``reset()`` puts the commands back and releases every blocked call (tests call it
    as they begin and end, so no thread outlives them).
    """

    name = "faulty"
    params_model = FaultyParams
    budget_mb: ClassVar[float] = 100.0
    sleep_s: ClassVar[float] = 0.5
    fail_reloads: ClassVar[bool] = False
    reload_gate: ClassVar[threading.Event] = threading.Event()
    hung: ClassVar[int] = 0
    built: ClassVar[int] = 0
    _release: ClassVar[threading.Event] = threading.Event()
    _armed: ClassVar[list[Fault]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.used_mb = 0.0
        self.loads = 0
        self.closes = 0
        with FaultyTransform._lock:
            FaultyTransform.built += 1
            self.replacement = FaultyTransform.built > 1

    @classmethod
    def arm(cls, fault: Fault, frames: int = 1) -> None:
        with cls._lock:
            if fault == "hang":
                cls._release.clear()
            cls._armed.extend([fault] * frames)

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls._armed.clear()
        cls.fail_reloads = False
        cls.reload_gate.set()
        cls._release.set()
        FaultyTransform.built = 0

    @classmethod
    def _next_fault(cls) -> Fault | None:
        with cls._lock:
            return cls._armed.pop(0) if cls._armed else None

    def load(self) -> None:
        self.loads += 1
        if self.loads == 1 and not self.replacement:
            return
        if not self.reload_gate.wait(30):
            raise TimeoutError("the test never opened the reload gate")
        if self.fail_reloads:
            raise OSError("the weights are gone (injected)")

    def close(self) -> None:
        self.closes += 1
        self.used_mb = 0.0

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        self._misbehave(self._next_fault())
        for job in jobs:
            self._spend(float(getattr(job.params, "leak_mb", 0.0)))
        return [resize(job.frame.image, job.params.width, job.params.height) for job in jobs]

    def _misbehave(self, fault: Fault | None) -> None:
        if fault == "raise":
            raise RuntimeError("injected failure")
        if fault == "sleep":
            time.sleep(self.sleep_s)
        if fault == "oom":
            self._spend(self.budget_mb + 1)
        if fault == "cuda_oom":
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        if fault == "die":
            raise WorkerKilled
        if fault == "hang":
            self._block()

    @staticmethod
    def _block() -> None:
        with FaultyTransform._lock:  # the counter of every subclass is this class's
            FaultyTransform.hung += 1
        try:
            FaultyTransform._release.wait()
        finally:
            with FaultyTransform._lock:
                FaultyTransform.hung -= 1

    def _spend(self, megabytes: float) -> None:
        self.used_mb += megabytes
        if self.used_mb > self.budget_mb:
            raise MemoryError(f"the fake memory budget of {self.budget_mb:g} MB is exhausted")


class AcceleratorTransform(FaultyTransform):
    """A FaultyTransform that says it runs on an accelerator (``mps``; it never touches one),
    as a transform on a GPU would: a hang there is one the process cannot recover from."""

    name = "faulty-accelerator"

    @property
    def device(self) -> str:
        return "mps"


class HangingAcceleratorTransform(AcceleratorTransform):
    """Every process() after the warm-up's blocks (``hang``) until ``reset()``, which only a
    test in the same process calls: for a ``livediff serve`` subprocess, whose exit ends it."""

    name = "hanging-accelerator"

    def process(self, jobs: Sequence[Job]) -> list[Image | None]:
        if any(job.session_id != "warm-up" for job in jobs):
            self._misbehave("hang")
        return super().process(jobs)
