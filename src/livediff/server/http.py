"""HTTP plumbing shared by the routers: body limits, content types, auth and error bodies."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from itertools import accumulate
from typing import Any

from fastapi import HTTPException, Request
from prometheus_client import Counter
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livediff.config import Settings
from livediff.server.errors import RateLimitedError, error_detail
from livediff.server.limits import RateLimiter, retry_after

#: Where a route notes why it refused a request (in the request's ``state``).
REJECTION_KEY = "livediff_rejection"
#: The reason of a refusal that noted none, by HTTP status.
DEFAULT_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_params",
    429: "rate_limited",
    503: "unavailable",
}


class Refusal(HTTPException):
    """An HTTPException that names its reason for ``livediff_requests_rejected_total``."""

    def __init__(
        self, status_code: int, detail: Any, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.reason = reason


def note_rejection(request: Request, reason: str) -> None:
    """Say why this request is refused (read by :class:`RejectionCounter`)."""
    setattr(request.state, REJECTION_KEY, reason)


class RejectionCounter:
    """Counts every answer of status 400 or more under ``prefixes`` by reason and status.

    The reason is what the route noted (:func:`note_rejection`), else a name for the status;
    answers that other middleware sends itself (the body limit's 413) are counted too.
    """

    def __init__(self, app: ASGIApp, counter: Counter, prefixes: Iterable[str]) -> None:
        self.app = app
        self.counter = counter
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(self.prefixes):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                status = int(message["status"])
                noted = scope.get("state", {}).get(REJECTION_KEY)
                reason = noted or DEFAULT_REASONS.get(status, "refused")
                self.counter.labels(reason, str(status)).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is larger than ``limit`` bytes.

    It checks Content-Length first and counts streamed bytes as they arrive, so an oversized
    body is never held in memory. The rest of the body is read and discarded (up to
    ``drain_factor`` times the limit) before the answer, so that the client, still sending, reads
    a 413 rather than a reset connection. Only paths under ``prefixes`` are guarded, so the
    middleware can sit in someone else's app without touching its routes.
    """

    def __init__(
        self, app: ASGIApp, limit: int, prefixes: Iterable[str], drain_factor: int = 16
    ) -> None:
        self.app = app
        self.limit = limit
        self.drain_factor = drain_factor
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._drain(receive, already=0)
            await self._reject(send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not response_started:
                await self._drain(receive, already=received)
                await self._reject(send)

    async def _drain(self, receive: Receive, already: int) -> None:
        """Read and drop what is left of the body, up to the drain cap."""
        seen = already
        while seen <= self.limit * self.drain_factor:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body exceeds the limit of {self.limit} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLargeError(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_media_type(request: Request, expected: str) -> None:
    """415 unless the request's Content-Type is ``expected``."""
    found = media_type(request)
    if found != expected:
        raise HTTPException(
            status_code=415,
            detail=f"Content-Type must be {expected}, not {found or 'missing'}",
            headers={"Accept": expected},
        )


#: A JSON string (its closing quote optional, so that a match never fails and the scan stays
#: linear even on an unterminated one) and the runs of anything but brackets.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in the JSON ``text``, found without parsing it (and so
    without recursion): brackets inside strings do not count. Meant for text that is then
    parsed; on broken JSON the figure is a bound, not an exact depth."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets.encode())), default=0)


class JSONDepthError(ValueError):
    """JSON nesting arrays and objects deeper than the limit."""


def load_json(raw: bytes, max_depth: int) -> Any:
    """Parse ``raw`` (UTF-8, -16 or -32, like :func:`json.loads`); ValueError when it is not
    JSON, JSONDepthError when it nests deeper than ``max_depth`` (checked before parsing)."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    depth = json_depth(text)
    if depth > max_depth:
        raise JSONDepthError(
            f"nests arrays and objects {depth} levels deep; at most {max_depth} are accepted"
            " (max_json_depth)"
        )
    return json.loads(text)


async def read_json_object(request: Request, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object (415 for another content type, 400 for broken JSON or JSON
    nested deeper than ``max_depth``)."""
    require_media_type(request, "application/json")
    try:
        value = load_json(await request.body(), max_depth)
    except JSONDepthError as exc:
        raise Refusal(400, f"the body {exc}", "json_too_deep") from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refusal(400, f"the body is not valid JSON: {exc}", "bad_json") from exc
    if not isinstance(value, dict):
        raise Refusal(400, "the body must be a JSON object", "bad_json")
    return value


async def read_text(request: Request, expected: str) -> str:
    """The body as UTF-8 text of type ``expected`` (415 otherwise)."""
    require_media_type(request, expected)
    try:
        return (await request.body()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(status_code=400, detail=f"the body is not UTF-8: {exc}") from exc


def validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> HTTPException:
    """422 with pydantic's errors, each naming its field (``loc``) under ``prefix``."""
    return HTTPException(status_code=422, detail=json_safe(error_detail(exc, prefix)))


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data, with the non-finite numbers that JSON lacks (NaN, Infinity,
    which a refused input may echo) as strings."""
    return json.loads(to_json(value, inf_nan_mode="strings", fallback=repr))


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def bearer_auth(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """A dependency that demands ``Authorization: Bearer <token>`` when a token is set.

    The given token is compared in constant time, as a SHA-256 digest, so that neither its
    content nor its length shows in how long the answer takes.
    """
    token = _digest(settings.token.get_secret_value()) if settings.token else None

    async def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        matches = hmac.compare_digest(_digest(given.strip()), token)
        if scheme.lower() != "bearer" or not matches:
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": 'Bearer realm="livediff"'},
            )

    return check


def rate_limit(limiter: RateLimiter) -> Callable[[Request], Awaitable[None]]:
    """A dependency that takes one of the client address's tokens (429 when none is left)."""
    per_minute = limiter.rate_per_s * 60

    async def check(request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        wait_s = limiter.take(client)
        if wait_s > 0:
            seconds = retry_after(wait_s)
            raise RateLimitedError(
                f"{client} opens sessions and viewers faster than {per_minute:g} a minute"
                f" (burst {limiter.burst}; session_rate_per_min, session_burst): retry in"
                f" {seconds} s",
                seconds,
            )

    return check
