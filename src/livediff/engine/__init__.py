"""The engine: one facade (:class:`Engine`) over sessions, newest-wins slots, the worker thread
and statistics. Every face (server, runner) adapts an :class:`Engine`; none builds its parts."""

from livediff.engine.core import Engine, Health
from livediff.engine.errors import EngineUnavailableError, ModelInUseError, UnknownSessionError
from livediff.engine.session import Session
from livediff.engine.slot import AsyncSlot, Slot, SlotClosedError
from livediff.engine.stats import Metrics, SessionStats
from livediff.engine.tasks import TaskSet, gather_logged
from livediff.engine.worker import Worker, WorkerState

__all__ = [
    "AsyncSlot",
    "Engine",
    "EngineUnavailableError",
    "Health",
    "Metrics",
    "ModelInUseError",
    "Session",
    "SessionStats",
    "Slot",
    "SlotClosedError",
    "TaskSet",
    "UnknownSessionError",
    "Worker",
    "WorkerState",
    "gather_logged",
]
