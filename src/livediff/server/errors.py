"""The one table from exceptions to HTTP status, used by the routes' error handlers and by the
params data channel, so a refusal reads the same whichever way the request came."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from livediff.engine import EngineUnavailableError, ModelInUseError, UnknownSessionError
from livediff.media.sdp import OfferError


class RateLimitedError(Exception):
    """A client opened sessions or viewers faster than ``session_rate_per_min`` allows."""

    reason = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ViewersFullError(Exception):
    """A session already has ``max_viewers`` WHEP viewers."""

    reason = "viewers_full"


#: Exception class -> HTTP status. Order matters only for subclasses (the first match wins).
STATUS_FOR: dict[type[Exception], int] = {
    OfferError: 400,
    UnknownSessionError: 404,
    ModelInUseError: 409,
    ValidationError: 422,
    RateLimitedError: 429,
    EngineUnavailableError: 503,
    ViewersFullError: 503,
}

#: Exception class -> the ``reason`` label of ``livediff_requests_rejected_total``, for those
#: that carry no ``reason`` attribute of their own.
REASON_FOR: dict[type[Exception], str] = {
    UnknownSessionError: "unknown_session",
    ModelInUseError: "model_in_use",
    ValidationError: "invalid_params",
}


def status_for(exc: Exception) -> int | None:
    """The HTTP status that answers ``exc``; None for an exception that is a bug (500)."""
    for kind, status in STATUS_FOR.items():
        if isinstance(exc, kind):
            return status
    return None


def reason_for(exc: Exception) -> str:
    """A short name of why ``exc`` refused a request (a metrics label)."""
    own = getattr(exc, "reason", None)
    if isinstance(own, str):
        return own
    return next((name for kind, name in REASON_FOR.items() if isinstance(exc, kind)), "refused")


def error_detail(exc: Exception, loc_prefix: tuple[str, ...] = ()) -> Any:
    """The ``detail`` of an error body: pydantic's field errors (``loc`` under ``loc_prefix``)
    for a ValidationError, else the exception's message."""
    if isinstance(exc, ValidationError):
        return [
            {**error, "loc": [*loc_prefix, *error["loc"]]}
            for error in exc.errors(include_url=False, include_context=False)
        ]
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)
