"""Trickle's wire facts (go-livepeer ``trickle/``): headers, statuses, special sequence numbers."""

from __future__ import annotations

import httpx

#: The segment a response carries (and, on a publish, the one the server wrote).
SEQ_HEADER = "Lp-Trickle-Seq"
#: The sequence number the server will write next (sent with 470 and on catch-up reads).
LATEST_HEADER = "Lp-Trickle-Latest"
#: Present when the channel ended while the request waited.
CLOSED_HEADER = "Lp-Trickle-Closed"
#: The segment asked for is not in the server's ring (too old, or too far ahead).
SEQ_NOT_FOUND = 470
#: Subscribe from the next segment to be written (the live edge).
NEXT_SEQ = -1
#: Subscribe from the segment being written now (0 if none was yet).
CURRENT_SEQ = -2


class TrickleError(RuntimeError):
    """A trickle request kept failing after its retries, or the server answered nonsense."""


def is_closed(response: httpx.Response) -> bool:
    """The server says the channel ended (404: it is gone; ``Lp-Trickle-Closed``: it ended)."""
    return response.status_code == httpx.codes.NOT_FOUND or CLOSED_HEADER in response.headers


def header_int(response: httpx.Response, name: str) -> int | None:
    """An integer header, or None when it is absent or not a number."""
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def is_transient(status: int) -> bool:
    """Statuses worth asking again for: server errors, throttling, timeouts."""
    return status >= 500 or status in (httpx.codes.REQUEST_TIMEOUT, httpx.codes.TOO_MANY_REQUESTS)
