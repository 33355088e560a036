"""The control channel: one JSON object per segment, each a full params set for the stream.

go-livepeer writes ``{"keep": "alive"}`` every 10 s to keep the channel open; those are ignored.
Anything else that is not a JSON object is reported as an error event and skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from livediff.livepeer.events import EventPublisher
from livediff.livepeer.trickle import TrickleError, TrickleSubscriber

logger = logging.getLogger(__name__)

KEEPALIVE = {"keep": "alive"}
#: A control message larger than this is refused (params are a few hundred bytes).
MAX_CONTROL_BYTES = 1 << 20

Apply = Callable[[dict[str, Any]], Awaitable[None]]


async def follow_control(
    subscriber: TrickleSubscriber, apply: Apply, events: EventPublisher
) -> None:
    """Apply every params message of the channel until it ends (or keeps failing)."""
    try:
        while (segment := await subscriber.next_segment()) is not None:
            message = await read_message(segment.read(MAX_CONTROL_BYTES), events)
            if message is not None and message != KEEPALIVE:
                logger.info("control message: %s", message)
                await apply(message)
    except TrickleError as exc:
        events.error(f"the control channel failed, params updates stop: {exc}")
    finally:
        await subscriber.close()


async def read_message(body: Awaitable[bytes], events: EventPublisher) -> dict[str, Any] | None:
    """The segment's JSON object; None (and an error event) for anything else."""
    try:
        data = await body
    except TrickleError as exc:
        events.error(f"a control message did not arrive whole: {exc}")
        return None
    if not data.strip():  # an empty segment (a publisher's unused preconnect)
        return None
    try:
        decoded = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        events.error(f"a control message is not JSON: {exc}")
        return None
    if not isinstance(decoded, dict):
        events.error(f"a control message is not a JSON object: {type(decoded).__name__}")
        return None
    return decoded
