"""Logging: text or JSON lines, each record tagged with the session it concerns when known.

The session id comes from the record's ``extra={"session_id": ...}`` (threads that serve many
sessions, such as the worker, pass it) or else from :data:`SESSION_ID`, a context variable that
the server sets while it handles a session (:func:`session_context`). Tasks started inside such
a block (a peer's transports, the ingest pump) copy the context, so their records carry the id
as well.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

SESSION_ID: ContextVar[str | None] = ContextVar("livediff_session_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def session_context(session_id: str) -> Iterator[None]:
    """Records logged inside the block (and by tasks started there) name ``session_id``."""
    token = SESSION_ID.set(session_id)
    try:
        yield
    finally:
        SESSION_ID.reset(token)


class SessionIdFilter(logging.Filter):
    """Gives every record a ``session_id`` attribute: its own ``extra``, the context's, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = SESSION_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, msg, and session_id and exc
    when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, str] = {
            "ts": moment.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        session_id = getattr(record, "session_id", None)
        if session_id is not None:
            line["session_id"] = str(session_id)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``log_format`` ('text' or 'json')."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SessionIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """The process's logging: one handler on the root logger (uvicorn's loggers included)."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(log_format)]
    root.setLevel(level.upper())
