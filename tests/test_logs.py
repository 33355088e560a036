"""Structured logs: JSON lines (ts, level, logger, msg, session_id) or text."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
from collections.abc import Iterator

import pytest

from livediff.logs import log_handler, session_context


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger("livediff.test-logs")
    handler = log_handler("json", stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_lines_name_the_session_from_the_context_or_extra(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    async def in_a_task() -> None:
        logger.info("from a task started in the session")

    logger.info("no session %d", 1)
    with session_context("abc123"):
        logger.warning("inside")
        task = asyncio.ensure_future(in_a_task())  # copies the context
    await task
    logger.error("a worker line", extra={"session_id": "ffee"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    outside, inside, tasked, worker, failed = lines(stream)
    assert outside["msg"] == "no session 1" and "session_id" not in outside
    assert outside["level"] == "info" and outside["logger"] == "livediff.test-logs"
    assert datetime.datetime.fromisoformat(outside["ts"]).tzinfo is not None
    assert (inside["session_id"], inside["level"]) == ("abc123", "warning")
    assert tasked["session_id"] == "abc123"
    assert worker["session_id"] == "ffee"
    assert "ValueError: boom" in failed["exc"] and "session_id" not in failed


def test_text_lines_keep_the_classic_form() -> None:
    stream = io.StringIO()
    handler = log_handler("text", stream)
    record = logging.LogRecord("livediff.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    handler.handle(record)
    assert stream.getvalue().rstrip().endswith("INFO livediff.x: hello you")
