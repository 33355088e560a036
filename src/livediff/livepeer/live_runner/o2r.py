"""The O2R channel: the orchestrator's messages to this runner, one JSON object per segment.

``{"keep":"alive"}`` about every ten seconds, and ``{"event": "reserved" | "released",
"session": ..., "timestamp": ...}`` as sessions come and go. The channel closes when the
orchestrator drops the runner (unregister, TTL): then the next heartbeat learns the rest.
"""

from __future__ import annotations

import logging

from livediff.livepeer.live_runner.protocol import ProtocolError, parse_o2r
from livediff.livepeer.live_runner.reservations import Reservations
from livediff.livepeer.trickle import TrickleError, TrickleSubscriber

logger = logging.getLogger(__name__)

#: An O2R message larger than this is not one of the orchestrator's.
MAX_O2R_BYTES = 64 * 1024


async def follow_o2r(subscriber: TrickleSubscriber, reservations: Reservations) -> None:
    """Apply every session event of the channel until it ends."""
    try:
        while (segment := await subscriber.next_segment()) is not None:
            payload = await segment.read(MAX_O2R_BYTES)
            if not payload.strip():
                continue
            try:
                event = parse_o2r(payload)
            except ProtocolError as exc:
                logger.warning("O2R: %s", exc)
                continue
            if event is None:
                continue
            if event.event == "reserved":
                reservations.reserve(event.session)
            else:
                reservations.release(event.session, "the orchestrator released it")
        logger.info("O2R channel ended")
    except TrickleError as exc:
        logger.warning("O2R channel failed; heartbeats keep the sessions in step: %s", exc)
    finally:
        await subscriber.close()
