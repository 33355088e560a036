"""Why the engine refused a request; each face maps these to its own answer (HTTP status, a
data-channel message, an ai-runner error record)."""

from __future__ import annotations


class EngineUnavailableError(Exception):
    """No session can be opened now: the model is loading or failed, or every slot is taken.

    ``reason`` is a short name of the cause (``loading``, ``sessions_full``, ``worker_error``)
    that metrics count refusals by.
    """

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class UnknownSessionError(LookupError):
    """No open session has this id."""


class ModelInUseError(Exception):
    """A params change would reload the model that other sessions are using."""
