"""The engine: sessions, newest-wins slots, the worker thread and statistics."""

from livediff.engine.session import Session
from livediff.engine.slot import AsyncSlot, Slot, SlotClosedError
from livediff.engine.stats import Metrics, SessionStats
from livediff.engine.worker import Worker, WorkerState

__all__ = [
    "AsyncSlot",
    "Metrics",
    "Session",
    "SessionStats",
    "Slot",
    "SlotClosedError",
    "Worker",
    "WorkerState",
]
