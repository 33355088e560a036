"""A test double of go-livepeer's Live Runner orchestrator side (offchain), for livediff's client.

Written from go-livepeer's source at 176aa41 (v0.9.0+, 2026-08-18), not from its doc alone:

- ``ai/runner/live_runner.go``, ``LiveRunnerRegistry``: ``Heartbeat`` (bootstrap with the
  ``-orchSecret``, then the derived ``heartbeat_secret``), ``normalizeHeartbeat`` and
  ``ValidateLiveRunnerMetadata`` (the 400s), ``Unregister``, ``ReserveSession``,
  ``ReleaseSession``, ``RunnerEndpointForSession``/``SessionTokenForSession``/
  ``ValidSessionToken``, ``CreateTrickleChannel``/``DeleteTrickleChannel``
  (``normalizeTrickleChannelName``), ``Runners`` (discovery), ``expiryLoop``/
  ``removeExpiredRunners``/``removeRunnerWithRunnerLocked`` (the sweep), ``writeO2RLoop`` and
  ``sendSessionEvent`` (the O2R channel), ``deriveSecret`` (HMAC-SHA256 of a random seed,
  lowercase unpadded base32) and ``randomStr`` (``runner_xxxxxxxx``, ``session_xxxxxxxx``);
- ``server/ai_http.go``: the handlers (``LiveRunnerHeartbeat``, ``UnregisterLiveRunner``,
  ``DiscoverLiveRunners``, ``ReserveLiveRunnerSession``, ``StopLiveRunnerSession``,
  ``StopLiveRunnerSessionInternal``, ``Create``/``DeleteLiveRunnerTrickleChannel(s)``,
  ``ProxyLiveRunnerSession`` and ``proxyLiveRunner``, the reverse proxy and its four headers),
  ``respondWithLiveRunnerError`` (plain-text errors, Go's ``http.Error``);
- ``trickle/local_publisher.go``: O2R messages are written one per segment, seq 0, 1, 2...

The Go behaviour a client meets, kept here on purpose (some of it surprising):

- the request body is validated *before* the secret is looked at (a bad body is a 400 even with a
  wrong secret); JSON keys match case-insensitively, unknown keys are ignored, ``null`` is the
  zero value;
- follow-up heartbeats carry ``runner_id`` in the body (the path has none) and replace the whole
  registration: omitted fields reset (capacity 0 or absent -> 1, version/metadata/gpu cleared);
  the reply then has no ``heartbeat_secret`` and no ``o2r``; ``session_ids`` is always present;
- a known runner whose last heartbeat is older than the TTL gets 404 ``runner not found`` until
  the sweep (every heartbeat *interval*) removes it; after that its heartbeats take the bootstrap
  path and get 401 ``invalid registration authorization``. A bootstrap with the orch secret for a
  runner id that is still registered gets 401 ``invalid heartbeat authorization``, and in the 404
  window it gets 404 as well;
- removing a runner (unregister, sweep) closes its O2R channel *before* releasing its sessions,
  so no ``released`` events are written then; session channels are deleted with their session;
- a runner that is not ready (status other than ``""``/``"ready"``) keeps its sessions, but
  reserve, proxy and callbacks answer 404 ``runner not found`` and discovery leaves it out;
- ``POST /apps/{runner}/session/{sid}/stop`` is 204 for an unknown session of a live runner
  (``ReleaseSession`` is a no-op then); only an unknown runner is a 404;
- the O2R descriptor has no ``internal_url`` (Go leaves it empty, ``omitempty``): its ``url`` is
  already the runner-facing one; session channel descriptors have both;
- ``GET /discovery`` omits the ``runners`` key when none is ready (``omitempty``);
- ``app_url`` has no trailing slash: a request for exactly it gets Go's ServeMux 301 to
  ``.../app/`` (relative links of a page served at the app root need that slash);
- at most 25 channels *per request*, not per session; a failing entry leaves the earlier ones made.

What it leaves out: payments (402 challenges, ``/payment``, on-chain discovery prices; with
``onchain_prices=True`` only ``price_info`` is validated as an on-chain node does), WebSocket
proxying, single-shot proxying (``/apps/{runner}/app/...``), session-scoped proxy URLs
(``POST /runner/.../proxy``, ``-liveRunnerProxyUrl``, ``proxy: true`` app URLs), static runners
(``/registerLiveRunners``, health polling), label routing, GPU hardware lookup for an integer
``gpu``. Trickle channels live in :class:`~livediff.testing.trickle_server.FakeTrickleServer`
(its own port, channels at ``/<name>`` rather than ``/ai/trickle/<name>``: clients must treat
channel URLs as opaque). The proxy drops the upstream ``Date``/``Server`` headers, which uvicorn
adds itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import posixpath
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from livediff.testing.servers import ThreadedServer, serve_app
from livediff.testing.trickle_server import FakeTrickleServer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# -- go-livepeer's constants (ai/runner/live_runner.go, server/ai_http.go) -------------------------
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0  # defaultLiveRunnerHeartbeatInterval
DEFAULT_HEARTBEAT_TTL_S = 20.0  # defaultLiveRunnerHeartbeatTTL
DEFAULT_O2R_INTERVAL_S = 10.0  # defaultLiveRunnerO2RInterval
O2R_KEEPALIVE = '{"keep":"alive"}'  # liveRunnerO2RKeepaliveMessage
O2R_NAME = "o2r"  # LiveRunnerTrickleOrchestratorToRunner
O2R_QUEUE = 32  # make(chan string, 32)
ID_RANDOM_BYTES = 5  # liveRunnerIDRandomBytes
SEED_BYTES = 32  # liveRunnerSeedBytes
MAX_METADATA_BYTES = 1024  # maxMetadataBytes
MAX_CHANNELS_PER_REQUEST = 25  # maxLiveRunnerTrickleChannelsPerRequest
DEFAULT_CHANNEL_MIME = "application/octet-stream"
PERSISTENT, SINGLE_SHOT, SINGLE_SHOT_ALIAS = "persistent", "single-shot", "single_shot"
PRICE_UNITS = ("hour", "720p", "fixed")
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_-]+")  # liveRunnerChannelNamePattern

ROUTE_HEADER = "Livepeer-Runner-Route"
SESSION_ID_HEADER = "Livepeer-Session-Id"
SESSION_TOKEN_HEADER = "Livepeer-Session-Token"
SESSION_CONTROL_HEADER = "Livepeer-Session-Control"
LIVEPEER_HEADERS = (ROUTE_HEADER, SESSION_ID_HEADER, SESSION_TOKEN_HEADER, SESSION_CONTROL_HEADER)

# What Go's httputil.ReverseProxy drops (hop-by-hop, and the X-Forwarded-* a Rewrite hook drops).
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade".split()
)
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-host"}
NOT_FORWARDED |= {b"x-forwarded-proto"} | {name.lower().encode() for name in LIVEPEER_HEADERS}
NOT_RETURNED = HOP_BY_HOP | {b"date", b"server"}  # uvicorn writes its own Date and Server
PROXY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class LiveRunnerError(Exception):
    """go-livepeer's ``RunnerError``: answered as ``http.Error(w, message, status)``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> LiveRunnerError:
    return LiveRunnerError(400, message)


def runner_not_found() -> LiveRunnerError:
    return LiveRunnerError(404, "runner not found")


# -- Go's encodings -----------------------------------------------------------------------------
_SUB_SECOND_UNITS = (("ms", 1_000_000), ("µs", 1_000), ("ns", 1))


def go_duration(seconds: float) -> str:
    """``time.Duration.String()``: ``5s``, ``500ms``, ``1.5s``, ``1m0s``, ``1h0m0s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns < 1_000_000_000:
        unit, size = next((unit, size) for unit, size in _SUB_SECOND_UNITS if ns >= size)
        return sign + _with_fraction(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _with_fraction(rest, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    return f"{sign}{minutes}m{text}" if minutes else sign + text


def _with_fraction(value: int, size: int) -> str:
    whole, fraction = divmod(value, size)
    digits = str(fraction).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def rfc3339(moment: datetime) -> str:
    """A UTC ``time.Time`` as Go's JSON writes it (RFC 3339, fraction trimmed, ``Z``)."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def _base32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def derive_secret(seed: bytes, label: str) -> str:
    """``deriveSecret``: lowercase, unpadded base32 of HMAC-SHA256(seed, label)."""
    return _base32(hmac.new(seed, label.encode(), hashlib.sha256).digest())


def random_str(n: int = ID_RANDOM_BYTES) -> str:
    return _base32(secrets.token_bytes(n))


def valid_secret(got: str, want: str) -> bool:
    return hmac.compare_digest(got.encode("utf-8", "surrogateescape"), want.encode())


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- JSON as encoding/json decodes it into Go structs ---------------------------------------------
FieldDecoder = Callable[[str, Any], Any]


def decode_json(body: bytes) -> Any:
    """The first JSON value of a body, as ``json.NewDecoder(r.Body).Decode`` reads it (invalid
    UTF-8 becomes U+FFFD, trailing bytes are ignored, an empty body is ``EOF``)."""
    text = body.decode("utf-8", errors="replace").lstrip()
    if not text:
        raise bad_request("EOF")
    decoder = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constant)
    try:
        return decoder.raw_decode(text)[0]
    except json.JSONDecodeError as exc:
        raise bad_request(f"invalid character in JSON: {exc.msg}") from exc


def _no_constant(name: str) -> Any:
    raise bad_request(f"invalid character {name[0]!r} looking for beginning of value")


def _json_kind(value: Any) -> str:
    kinds = ((bool, "bool"), (str, "string"), (dict, "object"), (list, "array"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), "number")


def _type_error(value: Any, target: str) -> LiveRunnerError:
    return bad_request(f"json: cannot unmarshal {_json_kind(value)} into {target}")


def go_struct(name: str, value: Any, fields: dict[str, FieldDecoder]) -> dict[str, Any]:
    """``json.Unmarshal`` into struct ``name``: keys matched case-insensitively, unknown keys
    ignored, ``null`` leaves the zero value, a wrong type is an error naming the field."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _type_error(value, f"Go value of type {name}")
    folded = {key.lower(): item for key, item in value.items()}
    return {key: decode(f"{name}.{key}", folded.get(key)) for key, decode in fields.items()}


def go_string(where: str, value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise _type_error(value, f"Go struct field {where} of type string")


def go_bool(where: str, value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise _type_error(value, f"Go struct field {where} of type bool")


def go_int(where: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error(value, f"Go struct field {where} of type int")


def go_number(where: str, value: Any) -> str:
    """A ``json.Number`` (a number, or a string holding one)."""
    if value is None:
        return ""
    if isinstance(value, str | int | Decimal) and not isinstance(value, bool):
        return str(value)
    raise _type_error(value, f"Go struct field {where} of type json.Number")


def go_list(item: FieldDecoder) -> FieldDecoder:
    """A decoder of a Go slice of ``item`` (``null`` is an empty slice)."""

    def decode(where: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise _type_error(value, f"Go struct field {where} of type slice")
        return [item(where, entry) for entry in value]

    return decode


go_strings = go_list(go_string)


GPU_FIELDS: dict[str, FieldDecoder] = {"id": go_string, "name": go_string, "vram_mb": go_int}
PRICE_FIELDS: dict[str, FieldDecoder] = {
    "price": go_number,
    "currency": go_string,
    "unit": go_string,
}


def go_gpu(where: str, value: Any) -> dict[str, Any] | None:
    """``LiveRunnerGPU.UnmarshalJSON``: a device index (only its id here: no ghw lookup) or an
    object ``{id, name, vram_mb}``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return {"id": str(value), "name": "", "vram_mb": 0}
    return go_struct("runner.gpuAlias", value, GPU_FIELDS)


def go_price(where: str, value: Any) -> dict[str, str]:
    return go_struct("runner.LiveRunnerPriceInfo", value, PRICE_FIELDS)


HEARTBEAT_FIELDS: dict[str, FieldDecoder] = {
    "runner_id": go_string,
    "label": go_string,
    "proxy": go_bool,
    "runner_url": go_string,
    "version": go_string,
    "metadata": go_string,
    "status": go_string,
    "mode": go_string,
    "gpu": go_gpu,
    "app": go_string,
    "capacity": go_int,
    "price_info": go_price,
    "session_ids": go_strings,
}


def omit_empty(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value}


@dataclass
class HeartbeatRequest:
    """``LiveRunnerHeartbeatRequest``: the whole registration a heartbeat carries."""

    runner_id: str = ""
    label: str = ""
    proxy: bool = False
    runner_url: str = ""
    version: str = ""
    metadata: str = ""
    status: str = ""
    mode: str = ""
    gpu: dict[str, Any] | None = None
    app: str = ""
    capacity: int = 0
    price_info: dict[str, str] = field(default_factory=dict)
    session_ids: list[str] = field(default_factory=list)

    @classmethod
    def from_body(cls, body: bytes) -> HeartbeatRequest:
        decoded = decode_json(body)
        return cls(**go_struct("runner.LiveRunnerHeartbeatRequest", decoded, HEARTBEAT_FIELDS))

    @property
    def ready(self) -> bool:
        return self.status in ("", "ready")  # isReadyStatus

    def gpu_json(self) -> dict[str, Any]:
        return omit_empty(self.gpu or {})  # LiveRunnerGPU's fields are all omitempty

    def as_json(self) -> dict[str, Any]:
        """As Go's ``json.Marshal`` writes it (its ``omitempty`` tags)."""
        price = {"price": self.price_info.get("price") or "0"}
        price |= omit_empty({k: self.price_info.get(k, "") for k in ("currency", "unit")})
        optional = {"runner_id": self.runner_id, "label": self.label, "proxy": self.proxy}
        described = {"version": self.version, "metadata": self.metadata, "status": self.status}
        return {
            **omit_empty(optional),
            "runner_url": self.runner_url,
            **omit_empty({**described, "mode": self.mode}),
            **({} if self.gpu is None else {"gpu": self.gpu_json()}),
            "app": self.app,
            "capacity": self.capacity,
            "price_info": price,
            **omit_empty({"session_ids": self.session_ids}),
        }


# -- normalizeHeartbeat --------------------------------------------------------------------------
def normalize_heartbeat(runner_id: str, req: HeartbeatRequest, onchain: bool) -> HeartbeatRequest:
    """``normalizeHeartbeat``: the 400s, then defaults (mode persistent, capacity 0 -> 1)."""
    check_runner_url(req.runner_url)
    if not req.app or req.app != req.app.strip():
        raise bad_request("app must be trimmed")
    check_metadata(req.metadata)
    if req.status != req.status.strip().lower():
        raise bad_request("status must be lowercase and trimmed")
    mode = normalize_mode(req.mode)
    if req.capacity < 0:
        raise bad_request("capacity must be >= 0")
    price = normalize_price(req.price_info) if onchain else req.price_info
    gpu = None if req.gpu is None else dict(req.gpu)
    capacity = req.capacity or 1
    return replace(
        req, runner_id=runner_id, mode=mode, capacity=capacity, price_info=price, gpu=gpu
    )


def check_runner_url(raw: str) -> None:
    """``url.ParseRequestURI`` with a host and an http(s) scheme."""
    try:
        parts = urlsplit(raw)
        _ = parts.port
    except ValueError as exc:
        raise bad_request("invalid runner_url") from exc
    has_host = bool(parts.netloc.rpartition("@")[2])
    clean = not any(char.isspace() or ord(char) < 0x20 for char in raw)
    if parts.scheme not in ("http", "https") or not has_host or not clean:
        raise bad_request("invalid runner_url")


def check_metadata(metadata: str) -> None:
    """``ValidateLiveRunnerMetadata`` (Go's decoder has already made bad UTF-8 U+FFFD)."""
    if len(metadata.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise bad_request(f"metadata must be at most {MAX_METADATA_BYTES} bytes")
    lone_surrogate = any(0xD800 <= ord(char) <= 0xDFFF for char in metadata)
    if "\ufffd" in metadata or lone_surrogate:
        raise bad_request("metadata must not contain Unicode replacement character U+FFFD")


def normalize_mode(mode: str) -> str:
    mode = SINGLE_SHOT if mode == SINGLE_SHOT_ALIAS else mode or PERSISTENT
    if mode not in (PERSISTENT, SINGLE_SHOT):
        raise bad_request(f'mode must be "{PERSISTENT}" or "{SINGLE_SHOT}"')
    return mode


def normalize_price(price_info: dict[str, str]) -> dict[str, str]:
    """``normalizeLiveRunnerPriceInfo`` (on-chain only): positive USD price, hour/720p/fixed."""
    price = price_info.get("price", "").strip()
    if not price:
        raise bad_request("price_info.price is required")
    try:
        positive = Decimal(price).is_finite() and Decimal(price) > 0
    except InvalidOperation:
        positive = False
    if not positive:
        raise bad_request("price_info.price must be a positive decimal")
    currency = price_info.get("currency", "").strip().lower() or "usd"
    if currency != "usd":
        raise bad_request("price_info.currency must be usd")
    unit = price_info.get("unit", "").strip().lower() or "hour"
    if unit not in PRICE_UNITS:
        raise bad_request("price_info.unit must be hour, 720p, or fixed")
    return {"price": price_info["price"], "currency": currency, "unit": unit}


def normalize_channel_name(session_id: str, name: str) -> tuple[str, str]:
    """``normalizeTrickleChannelName``: (name, ``<session_id>-<name>``)."""
    name = name.strip().replace("/", "-")
    if not name:
        raise bad_request("trickle channel name is required")
    if not CHANNEL_NAME.fullmatch(name):
        raise bad_request(
            "trickle channel name may only contain alphanumerics, underscores, or hyphens"
        )
    return name, f"{session_id}-{name}"


# -- records -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelDescriptor:
    """``LiveRunnerTrickleChannel``: give clients ``url``; the runner uses ``internal_url``."""

    name: str
    channel_name: str
    url: str
    internal_url: str
    mime_type: str

    def as_json(self) -> dict[str, str]:
        body = {"name": self.name, "channel_name": self.channel_name, "url": self.url}
        body |= omit_empty({"internal_url": self.internal_url})  # omitempty
        return body | {"mime_type": self.mime_type}


@dataclass(frozen=True)
class Urls:
    """Where each audience reaches the double (Go: ``-serviceAddr`` vs ``-liveRunnerAddr``)."""

    public: str  # ServiceURI: discovery, app_url, control_url
    runner_facing: str  # LiveRunnerURI: heartbeat "orchestrator", Livepeer-Session-Control
    trickle_public: str  # descriptors' "url"
    trickle_internal: str  # descriptors' "internal_url" and the O2R "url"


class O2RChannel:
    """A runner's orchestrator-to-runner channel (``liveRunnerTrickleChannel`` with
    ``writeO2RLoop``): one JSON message per trickle segment, ``{"keep":"alive"}`` every
    ``interval_s``, at most 32 messages queued, nothing queued once closed."""

    def __init__(
        self,
        descriptor: ChannelDescriptor,
        trickle: FakeTrickleServer,
        loop: asyncio.AbstractEventLoop,
        client: httpx.AsyncClient,
        interval_s: float,
    ) -> None:
        self.descriptor = descriptor
        self.sent: list[Any] = []  # what was written, keep-alives included (for tests)
        self.closed = False
        self._trickle, self._loop, self._client = trickle, loop, client
        self._interval_s = interval_s
        self._seq = 0
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        asyncio.run_coroutine_threadsafe(self._run(), loop)

    def queue_json(self, message: dict[str, Any]) -> bool:
        """``queueJSON``: False (nothing queued) once the channel is closed."""
        if self.closed:
            logger.debug("O2R %s is closed; dropped %s", self.descriptor.channel_name, message)
            return False
        return self._post(compact_json(message))

    def close(self) -> None:
        """``close``: stop the writer (queued messages are dropped), delete the channel."""
        if self.closed:
            return
        self.closed = True
        self._post(None)
        self._trickle.delete_channel(self.descriptor.channel_name)

    def _post(self, message: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._put, message)
        except RuntimeError:  # the double's loop has ended
            logger.debug("O2R %s: the loop is gone", self.descriptor.channel_name)
            return False
        return True

    def _put(self, message: str | None) -> None:
        if message is not None and self._queue.qsize() >= O2R_QUEUE:
            logger.warning("O2R %s write queue is full", self.descriptor.channel_name)
            return
        self._queue.put_nowait(message)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = loop.time() + self._interval_s
        while not self.closed:
            try:
                timeout = max(0.0, tick - loop.time())
                message = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                message, tick = O2R_KEEPALIVE, tick + self._interval_s
            if message is None or self.closed or not await self._write(message):
                return

    async def _write(self, message: str) -> bool:
        """One segment (``TrickleLocalPublisher.Write``); False once the channel is gone."""
        url = f"{self.descriptor.url}/{self._seq}"
        try:
            response = await self._client.post(url, content=message.encode(), timeout=5.0)
        except httpx.HTTPError as exc:
            logger.warning("O2R %s: writing failed: %r", self.descriptor.channel_name, exc)
            return True
        if response.status_code == 404:  # trickle.StreamNotFoundErr
            return False
        self._seq += 1
        self.sent.append(json.loads(message))
        return True


@dataclass
class SessionRecord:
    """``liveRunnerSession``: when it was made, and its trickle channels by name."""

    session_id: str
    order: int
    channels: dict[str, ChannelDescriptor] = field(default_factory=dict)


@dataclass
class RunnerRecord:
    """``liveRunner`` (dynamic): its secrets, its latest registration, sessions and O2R."""

    seed: bytes
    heartbeat_secret: str
    request: HeartbeatRequest
    body: bytes
    o2r: O2RChannel
    last_heartbeat: float  # time.monotonic()
    heartbeats: int = 1
    removed: bool = False
    sessions: dict[str, SessionRecord] = field(default_factory=dict)

    def session_ids(self) -> list[str]:
        """``sessionIDsLocked``: the orchestrator's sessions, oldest first."""
        ordered = sorted(self.sessions.values(), key=lambda session: session.order)
        return [session.session_id for session in ordered]

    def session_token(self, session_id: str) -> str:
        return derive_secret(self.seed, "session:" + session_id)


@dataclass(frozen=True)
class RunnerSnapshot:
    """A copy of one registration, for assertions."""

    runner_id: str
    heartbeat: dict[str, Any]  # the registration as the registry keeps it (after normalizing)
    body: Any  # the last accepted heartbeat body, as the runner sent it
    status: str
    ready: bool
    expired: bool
    capacity: int
    session_ids: list[str]
    channels: dict[str, list[str]]  # session id -> its channel names
    heartbeats: int  # accepted heartbeats, the bootstrap included
    heartbeat_secret: str
    o2r: dict[str, str]


@dataclass(frozen=True)
class CallRecord:
    """One HTTP request the double answered (recorded when its answer ended)."""

    method: str
    path: str
    status: int
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Reservation:
    """A reserved session: what the client is told, and what the proxy tells the runner."""

    runner_id: str
    session_id: str
    app_url: str
    control_url: str
    token: str
    session_control: str

    @property
    def headers(self) -> dict[str, str]:
        """The four headers the proxy adds to requests of this session."""
        return {
            ROUTE_HEADER: self.runner_id,
            SESSION_ID_HEADER: self.session_id,
            SESSION_TOKEN_HEADER: self.token,
            SESSION_CONTROL_HEADER: self.session_control,
        }


O2ROpener = Callable[[str, bytes], O2RChannel]


# -- the registry ----------------------------------------------------------------------------------
class LiveRunnerRegistryDouble:
    """``LiveRunnerRegistry`` for dynamic runners: thread-safe, synchronous (its trickle calls
    block on the trickle server's loop, so the HTTP handlers call it in worker threads)."""

    def __init__(
        self,
        *,
        secret: str,
        heartbeat_interval_s: float,
        heartbeat_ttl_s: float,
        onchain_prices: bool,
        trickle: FakeTrickleServer,
        open_o2r: O2ROpener,
    ) -> None:
        self.secret = secret
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.onchain_prices = onchain_prices
        self.trickle = trickle
        self.urls = Urls("", "", "", "")
        self._open_o2r = open_o2r
        self._runners: dict[str, RunnerRecord] = {}
        self._lock = threading.RLock()
        self._order = itertools.count()

    # -- heartbeats ---------------------------------------------------------------------------
    def heartbeat(self, body: bytes, auth: str) -> dict[str, Any]:
        """``Heartbeat``: bootstrap a new runner or replace a known one's registration."""
        req = HeartbeatRequest.from_body(body)
        runner_id = req.runner_id.strip() or "runner_" + random_str()
        req = normalize_heartbeat(runner_id, req, self.onchain_prices)
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is None:
                return self._register(req, body, auth)
            return self._update(runner, req, body, auth)

    def _register(self, req: HeartbeatRequest, body: bytes, auth: str) -> dict[str, Any]:
        if not self.secret:
            raise LiveRunnerError(404, "dynamic live runner registration is disabled")
        if not valid_secret(auth, self.secret):
            raise LiveRunnerError(401, "invalid registration authorization")
        seed = secrets.token_bytes(SEED_BYTES)
        o2r = self._open_o2r(req.runner_id, seed)
        secret = derive_secret(seed, "heartbeat")
        runner = RunnerRecord(seed, secret, req, body, o2r, time.monotonic())
        self._runners[req.runner_id] = runner
        logger.info("live runner registered runner_id=%s app=%s", req.runner_id, req.app)
        return self._reply(runner, first=True)

    def _update(
        self, runner: RunnerRecord, req: HeartbeatRequest, body: bytes, auth: str
    ) -> dict[str, Any]:
        if runner.removed or self._expired(runner):
            raise runner_not_found()
        if not valid_secret(auth, runner.heartbeat_secret):
            raise LiveRunnerError(401, "invalid heartbeat authorization")
        runner.request, runner.body = req, body
        runner.last_heartbeat = time.monotonic()
        runner.heartbeats += 1
        return self._reply(runner, first=False)

    def _reply(self, runner: RunnerRecord, *, first: bool) -> dict[str, Any]:
        """``LiveRunnerHeartbeatResponse`` (the secret and O2R only on first registration)."""
        reply: dict[str, Any] = {
            "runner_id": runner.request.runner_id,
            "orchestrator": self.urls.runner_facing,
            "heartbeat_interval": go_duration(self.heartbeat_interval_s),
            "heartbeat_ttl": go_duration(self.heartbeat_ttl_s),
        }
        if first:
            reply["heartbeat_secret"] = runner.heartbeat_secret
            reply["o2r"] = runner.o2r.descriptor.as_json()
        return reply | {"session_ids": runner.session_ids()}

    def unregister(self, runner_id: str, auth: str) -> None:
        """``Unregister``: 404 unknown or expired, 401 wrong heartbeat secret."""
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is None or runner.removed or self._expired(runner):
                raise runner_not_found()
            if not valid_secret(auth, runner.heartbeat_secret):
                raise LiveRunnerError(401, "invalid authorization")
            self._remove(runner_id, runner, "unregister")

    # -- expiry ----------------------------------------------------------------------------------
    def _expired(self, runner: RunnerRecord) -> bool:
        """``liveRunnerExpiredLocked``."""
        return time.monotonic() - runner.last_heartbeat > self.heartbeat_ttl_s

    def remove_expired(self) -> list[str]:
        """``removeExpiredRunners`` (one sweep): the ids removed."""
        with self._lock:
            expired = [
                rid for rid, r in self._runners.items() if not r.removed and self._expired(r)
            ]
            for runner_id in expired:
                self._remove(runner_id, self._runners[runner_id], "heartbeat timeout")
            return expired

    def expire(self, runner_id: str) -> None:
        """Make the last heartbeat older than the TTL (the 404 window, until the next sweep)."""
        with self._lock:
            self._get(runner_id).last_heartbeat = time.monotonic() - self.heartbeat_ttl_s - 1e-3

    def forget(self, runner_id: str) -> bool:
        """Remove a runner as the sweep would; False if it was not registered."""
        with self._lock:
            runner = self._runners.get(runner_id)
            if runner is not None:
                self._remove(runner_id, runner, "forgotten by the test")
            return runner is not None

    def forget_all(self) -> None:
        with self._lock:
            for runner_id in list(self._runners):
                self.forget(runner_id)

    def close_all(self) -> None:
        """``LiveRunnerRegistry.Stop``: close every O2R channel."""
        with self._lock:
            for runner in self._runners.values():
                runner.o2r.close()

    def _remove(self, runner_id: str, runner: RunnerRecord, reason: str) -> None:
        """``removeRunnerWithRunnerLocked``: O2R closed first, so no ``released`` events."""
        runner.removed = True
        logger.info("live runner deregistered runner_id=%s reason=%s", runner_id, reason)
        runner.o2r.close()
        for session_id in list(runner.sessions):
            self._release(runner, session_id)
        if self._runners.get(runner_id) is runner:
            del self._runners[runner_id]

    # -- sessions --------------------------------------------------------------------------------
    def _get(self, runner_id: str) -> RunnerRecord:
        runner = self._runners.get(runner_id)
        if runner is None:
            raise KeyError(f"no runner {runner_id!r} is registered")
        return runner

    def _live(self, runner_id: str) -> RunnerRecord:
        """``lockLiveRunner``: 404 unless registered and not expired."""
        runner = self._runners.get(runner_id)
        if runner is None or runner.removed or self._expired(runner):
            raise runner_not_found()
        return runner

    def _ready(self, runner_id: str) -> RunnerRecord:
        runner = self._live(runner_id)
        if not runner.request.ready:
            raise runner_not_found()
        return runner

    def _session(self, runner_id: str, session_id: str) -> tuple[RunnerRecord, SessionRecord]:
        """``liveRunnerSessionLocked``: 404 for a not-ready runner or an unknown session."""
        runner = self._ready(runner_id)
        session = runner.sessions.get(session_id)
        if session is None:
            raise LiveRunnerError(404, "runner session not found")
        return runner, session

    def reserve(self, runner_id: str) -> dict[str, str]:
        """``ReserveLiveRunnerSession`` offchain: ``{session_id, app_url, control_url}``."""
        with self._lock:
            runner = self._ready(runner_id)
            if runner.request.mode != PERSISTENT:
                raise bad_request("only persistent runners have sessions")
            if len(runner.sessions) >= runner.request.capacity:
                raise LiveRunnerError(503, "no capacity available for runner")
            session_id = "session_" + random_str()
            while session_id in runner.sessions:
                session_id = "session_" + random_str()
            runner.sessions[session_id] = SessionRecord(session_id, next(self._order))
            runner.o2r.queue_json(session_event("reserved", session_id))
        control_url = f"{self.urls.public}/apps/{runner_id}/session/{session_id}"
        return {
            "session_id": session_id,
            "app_url": control_url + "/app",
            "control_url": control_url,
        }

    def release(self, runner_id: str, session_id: str) -> None:
        """``ReleaseSession``: 404 only for the runner; an unknown session is a no-op."""
        with self._lock:
            self._release(self._live(runner_id), session_id)

    def _release(self, runner: RunnerRecord, session_id: str) -> None:
        """``releaseSessionLocked``: the ``released`` event, then the channels go."""
        session = runner.sessions.get(session_id)
        if session is not None:
            runner.o2r.queue_json(session_event("released", session_id))
            for channel in session.channels.values():
                self.trickle.delete_channel(channel.channel_name)
            session.channels.clear()
        runner.sessions.pop(session_id, None)

    def check_token(self, runner_id: str, session_id: str, token: str) -> None:
        """``ValidSessionToken``: 404 (runner, session) before 401 (token)."""
        with self._lock:
            runner, _ = self._session(runner_id, session_id)
            if not valid_secret(token, runner.session_token(session_id)):
                raise LiveRunnerError(401, "invalid authorization")

    def stop_session(self, runner_id: str, session_id: str, token: str) -> None:
        """``StopLiveRunnerSessionInternal``: the runner releases its own session."""
        with self._lock:
            self.check_token(runner_id, session_id, token)
            self.release(runner_id, session_id)

    def proxy_target(self, runner_id: str, session_id: str) -> tuple[str, str, str]:
        """(runner_url, session token, session control URL) for a live session, else 404."""
        with self._lock:
            runner, _ = self._session(runner_id, session_id)
            token = runner.session_token(session_id)
            return runner.request.runner_url, token, self.session_control(runner_id, session_id)

    def session_control(self, runner_id: str, session_id: str) -> str:
        return f"{self.urls.runner_facing}/runner/{runner_id}/session/{session_id}"

    def session_token(self, runner_id: str, session_id: str) -> str:
        with self._lock:
            return self._get(runner_id).session_token(session_id)

    # -- session trickle channels --------------------------------------------------------------
    def create_channel(
        self, runner_id: str, session_id: str, name: str, mime_type: str
    ) -> ChannelDescriptor:
        """``CreateTrickleChannel``: idempotent by name (the first descriptor is returned)."""
        name, channel_name = normalize_channel_name(session_id, name)
        mime_type = mime_type if mime_type.strip() else DEFAULT_CHANNEL_MIME
        with self._lock:
            _, session = self._session(runner_id, session_id)
            existing = session.channels.get(name)
            if existing is not None:
                return existing
            self.trickle.create_channel(channel_name, mime_type)
            public, internal = self.urls.trickle_public, self.urls.trickle_internal
            channel = ChannelDescriptor(
                name,
                channel_name,
                f"{public}/{channel_name}",
                f"{internal}/{channel_name}",
                mime_type,
            )
            session.channels[name] = channel
            return channel

    def delete_channel(self, runner_id: str, session_id: str, name: str) -> None:
        """``DeleteTrickleChannel``: 404 ``trickle channel not found`` for an unknown name."""
        name, channel_name = normalize_channel_name(session_id, name)
        with self._lock:
            _, session = self._session(runner_id, session_id)
            if session.channels.pop(name, None) is None:
                raise LiveRunnerError(404, "trickle channel not found")
            self.trickle.delete_channel(channel_name)

    # -- discovery and snapshots ------------------------------------------------------------------
    def discovery(self) -> list[dict[str, Any]]:
        """``DiscoverLiveRunners``: one entry; ``runners`` omitted when none is ready."""
        with self._lock:
            runners = [
                self._discovery_runner(runner)
                for runner in self._runners.values()
                if not runner.removed and not self._expired(runner) and runner.request.ready
            ]
        return [{"address": self.urls.public, **omit_empty({"runners": runners})}]

    def _discovery_runner(self, runner: RunnerRecord) -> dict[str, Any]:
        """``LiveRunnerDiscoveryRunner`` offchain (no ``price_info``); never the runner_url."""
        req = runner.request
        kind = "session" if req.mode == PERSISTENT else "app"
        used = len(runner.sessions)
        described = {"version": req.version, "metadata": req.metadata, "mode": req.mode}
        return {
            "url": f"{self.urls.public}/apps/{req.runner_id}/{kind}",
            **({} if req.gpu is None else {"gpu": req.gpu_json()}),
            "app": req.app,
            **omit_empty(described),
            "capacity": req.capacity,
            "capacity_used": used,
            "capacity_available": req.capacity - used,
        }

    def snapshot(self) -> dict[str, RunnerSnapshot]:
        with self._lock:
            return {rid: self._snapshot(runner) for rid, runner in self._runners.items()}

    def _snapshot(self, runner: RunnerRecord) -> RunnerSnapshot:
        req = runner.request
        channels = {sid: list(s.channels) for sid, s in runner.sessions.items()}
        return RunnerSnapshot(
            runner_id=req.runner_id,
            heartbeat=req.as_json(),
            body=first_json_value(runner.body),
            status=req.status,
            ready=req.ready,
            expired=self._expired(runner),
            capacity=req.capacity,
            session_ids=runner.session_ids(),
            channels=channels,
            heartbeats=runner.heartbeats,
            heartbeat_secret=runner.heartbeat_secret,
            o2r=runner.o2r.descriptor.as_json(),
        )


def first_json_value(body: bytes) -> Any:
    text = body.decode("utf-8", errors="replace").lstrip()
    return json.JSONDecoder().raw_decode(text)[0]


def session_event(event: str, session_id: str) -> dict[str, str]:
    """``sendSessionEvent``'s message."""
    return {"event": event, "session": session_id, "timestamp": rfc3339(datetime.now(UTC))}


# -- HTTP ----------------------------------------------------------------------------------------
def go_error(status: int, message: str) -> Response:
    """Go's ``http.Error``: the message and a newline, as plain text."""
    headers = {"X-Content-Type-Options": "nosniff"}
    return PlainTextResponse(message + "\n", status_code=status, headers=headers)


def json_response(value: Any) -> Response:
    return Response(compact_json(value), media_type="application/json")


async def on_runner_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LiveRunnerError)
    return go_error(exc.status, exc.message)


async def on_not_found(request: Request, exc: Exception) -> Response:
    return go_error(404, "404 page not found")  # Go's ServeMux


def decode_channels(body: bytes, item: FieldDecoder) -> list[Any]:
    """``{"channels": [...]}``: 400 when empty or longer than 25 (per request)."""
    fields = {"channels": go_list(item)}
    channels: list[Any] = go_struct("server.channelsRequest", decode_json(body), fields)["channels"]
    if not channels:
        raise bad_request("channels is required")
    if len(channels) > MAX_CHANNELS_PER_REQUEST:
        raise bad_request(f"channels cannot contain more than {MAX_CHANNELS_PER_REQUEST} entries")
    return channels


def channel_request(where: str, value: Any) -> dict[str, str]:
    return go_struct(where, value, {"name": go_string, "mime_type": go_string})


def join_path(*elements: str) -> str:
    """Go's ``url.JoinPath("/", elements...)``: joined, cleaned, a trailing slash kept."""
    joined = "/" + posixpath.normpath("/" + "/".join(e for e in elements if e)).lstrip("/")
    if elements and elements[-1].endswith("/") and not joined.endswith("/"):
        joined += "/"
    return joined


def forwarded_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request headers Go's ReverseProxy passes on (with a ``Rewrite`` hook)."""
    drop = NOT_FORWARDED | connection_listed(raw)
    return [(key, value) for key, value in raw if key.lower() not in drop]


def returned_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = NOT_RETURNED | connection_listed(raw)
    return [(key.lower(), value) for key, value in raw if key.lower() not in drop]


def connection_listed(raw: list[tuple[bytes, bytes]]) -> set[bytes]:
    listed = (value for key, value in raw if key.lower() == b"connection")
    return {token.strip().lower() for value in listed for token in value.split(b",")}


async def relay(answer: httpx.Response) -> AsyncIterator[bytes]:
    """The runner's answer as it arrives (bytes as sent: no decoding); closed however it ends."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await answer.aclose()


async def request_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


class RecordCalls:
    """ASGI middleware: appends a :class:`CallRecord` for every HTTP request."""

    def __init__(self, app: Any, calls: list[CallRecord]) -> None:
        self.app = app
        self.calls = calls

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            record = CallRecord(scope["method"], scope["path"], status, time.monotonic())
            self.calls.append(record)


class OrchestratorRoutes:
    """The handlers of ``server/ai_http.go`` that a Live Runner and its clients call."""

    def __init__(self, double: LiveOrchestratorDouble) -> None:
        self.double = double

    @property
    def registry(self) -> LiveRunnerRegistryDouble:
        return self.double.registry

    def routes(self) -> list[Route]:
        session = "/apps/{runner_id}/session/{session_id}"
        callbacks = "/runner/{runner_id}/session/{session_id}"
        return [
            Route("/runners/heartbeat", self.heartbeat, methods=["POST"]),
            Route("/runners/{runner_id}/unregister", self.unregister, methods=["POST"]),
            Route(callbacks + "/channels", self.create_channels, methods=["POST"]),
            Route(callbacks + "/channels", self.delete_channels, methods=["DELETE"]),
            Route(callbacks + "/stop", self.runner_stop, methods=["POST"]),
            Route("/discovery", self.discovery, methods=["GET"]),
            Route("/apps/{runner_id}/session", self.reserve, methods=["POST"]),
            Route(session + "/stop", self.client_stop, methods=["POST"]),
            Route(session + "/app", self.app_root, methods=PROXY_METHODS),
            Route(session + "/app/{app_path:path}", self.proxy, methods=PROXY_METHODS),
        ]

    async def heartbeat(self, request: Request) -> Response:
        body, auth = await request.body(), request.headers.get("authorization", "")
        return json_response(await asyncio.to_thread(self.registry.heartbeat, body, auth))

    async def unregister(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        runner_id = request.path_params["runner_id"]
        await asyncio.to_thread(self.registry.unregister, runner_id, auth)
        return Response(status_code=204)

    async def discovery(self, request: Request) -> Response:
        return json_response(await asyncio.to_thread(self.registry.discovery))

    async def reserve(self, request: Request) -> Response:
        runner_id = request.path_params["runner_id"]
        return json_response(await asyncio.to_thread(self.registry.reserve, runner_id))

    async def client_stop(self, request: Request) -> Response:
        ids = request.path_params["runner_id"], request.path_params["session_id"]
        await asyncio.to_thread(self.registry.release, *ids)
        return Response(status_code=204)

    async def runner_stop(self, request: Request) -> Response:
        ids = request.path_params["runner_id"], request.path_params["session_id"]
        token = request.headers.get(SESSION_TOKEN_HEADER, "")
        await asyncio.to_thread(self.registry.stop_session, *ids, token)
        return Response(status_code=204)

    async def create_channels(self, request: Request) -> Response:
        ids = request.path_params["runner_id"], request.path_params["session_id"]
        token = request.headers.get(SESSION_TOKEN_HEADER, "")
        body = await request.body()
        made = await asyncio.to_thread(self._create_channels, *ids, token, body)
        return json_response({"channels": [channel.as_json() for channel in made]})

    def _create_channels(
        self, runner_id: str, session_id: str, token: str, body: bytes
    ) -> list[ChannelDescriptor]:
        self.registry.check_token(runner_id, session_id, token)
        wanted = decode_channels(body, channel_request)
        return [
            self.registry.create_channel(runner_id, session_id, item["name"], item["mime_type"])
            for item in wanted
        ]

    async def delete_channels(self, request: Request) -> Response:
        ids = request.path_params["runner_id"], request.path_params["session_id"]
        token = request.headers.get(SESSION_TOKEN_HEADER, "")
        body = await request.body()
        names = await asyncio.to_thread(self._delete_channels, *ids, token, body)
        return json_response({"deleted": names})

    def _delete_channels(
        self, runner_id: str, session_id: str, token: str, body: bytes
    ) -> list[str]:
        self.registry.check_token(runner_id, session_id, token)
        names: list[str] = decode_channels(body, go_string)
        for name in names:
            self.registry.delete_channel(runner_id, session_id, name)
        return names

    async def app_root(self, request: Request) -> Response:
        """Go's ServeMux sends ``.../app`` to the subtree ``.../app/`` (301, query kept)."""
        location = request.url.path + "/"
        if request.url.query:
            location += "?" + request.url.query
        body = f'<a href="{location}">Moved Permanently</a>.\n\n'
        return Response(
            body, status_code=301, headers={"Location": location}, media_type="text/html"
        )

    async def proxy(self, request: Request) -> Response:
        """``ProxyLiveRunnerSession`` + ``proxyLiveRunner``: streamed both ways."""
        ids = request.path_params["runner_id"], request.path_params["session_id"]
        endpoint, token, control = await asyncio.to_thread(self.registry.proxy_target, *ids)
        upstream_request = upstream(request, endpoint, (*ids, token, control))
        try:
            answer = await self.double.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return go_error(502, f"{request.method} {upstream_request.url}: {exc!r}")
        response = StreamingResponse(relay(answer), status_code=answer.status_code)
        response.raw_headers = returned_headers(answer.headers.raw)
        return response


def upstream(request: Request, endpoint: str, livepeer: tuple[str, str, str, str]) -> httpx.Request:
    """The request ``httputil.ReverseProxy`` sends: ``runner_url`` + the app path, the query as
    it came, the client's headers (hop-by-hop ones dropped) and the four Livepeer headers set."""
    target = httpx.URL(endpoint)
    path = join_path(target.path, request.path_params["app_path"])
    url = target.copy_with(path=path, query=request.scope["query_string"] or None)
    headers = forwarded_headers(request.headers.raw)
    headers += [(k.encode(), v.encode()) for k, v in zip(LIVEPEER_HEADERS, livepeer, strict=True)]
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
    content = request_body(request) if has_body else None
    return httpx.Request(request.method, url, headers=headers, content=content)


# -- the double ------------------------------------------------------------------------------------
class LiveOrchestratorDouble:
    """go-livepeer's orchestrator as a Live Runner meets it (offchain), on 127.0.0.1.

    ``url`` is the runner-facing base (``-liveRunnerAddr``); ``public_url`` the client-facing one
    (``-serviceAddr``): the same unless ``public_host`` is given (e.g. ``"localhost"``), which
    also gives trickle descriptors a ``url`` that differs from their ``internal_url``.
    """

    def __init__(
        self,
        secret: str = "orch-secret",
        *,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
        keepalive_s: float = DEFAULT_O2R_INTERVAL_S,
        sweep_interval_s: float | None = None,
        public_host: str | None = None,
        onchain_prices: bool = False,
        trickle: FakeTrickleServer | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        # Go sweeps on a ticker of the heartbeat interval (expiryLoop)
        self.sweep_interval_s = sweep_interval_s or heartbeat_interval_s
        self.public_host = public_host
        self.url = ""
        self.public_url = ""
        self._own_trickle = trickle is None
        self.trickle = trickle or FakeTrickleServer()
        self.registry = LiveRunnerRegistryDouble(
            secret=secret,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_ttl_s=heartbeat_ttl_s,
            onchain_prices=onchain_prices,
            trickle=self.trickle,
            open_o2r=self._open_o2r,
        )
        self._server: ThreadedServer | None = None
        self._calls: list[CallRecord] = []
        self._o2r: dict[
            str, O2RChannel
        ] = {}  # the latest O2R of each runner id, kept after removal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> Self:
        if self._own_trickle:
            self.trickle.start()
        app = Starlette(
            routes=OrchestratorRoutes(self).routes(),
            middleware=[Middleware(RecordCalls, calls=self._calls)],
            exception_handlers={LiveRunnerError: on_runner_error, 404: on_not_found},
            lifespan=self._lifespan,
        )
        app.router.redirect_slashes = False  # Go's ServeMux has no such redirects
        self._server = serve_app(app, name="live-orchestrator-double")
        self.url = self._server.url
        self.public_url = self._with_host(self.url)
        trickle_public = self._with_host(self.trickle.url)
        self.registry.urls = Urls(self.public_url, self.url, trickle_public, self.trickle.url)
        return self

    def _with_host(self, url: str) -> str:
        if self.public_host is None:
            return url
        return str(httpx.URL(url).copy_with(host=self.public_host)).rstrip("/")

    def stop(self) -> None:
        if self._server is None:
            return
        self.registry.close_all()
        self._server.stop()
        self._server = None
        if self._own_trickle:
            self.trickle.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        timeout = httpx.Timeout(None, connect=5.0)
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        sweeper = asyncio.ensure_future(self._sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            await self._client.aclose()

    async def _sweep_forever(self) -> None:
        """``expiryLoop``."""
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            await asyncio.to_thread(self.registry.remove_expired)

    @property
    def client(self) -> httpx.AsyncClient:
        """The double's own HTTP client (its loop only): the proxy and the O2R writers use it."""
        assert self._client is not None, "the orchestrator double is not running"
        return self._client

    def _open_o2r(self, runner_id: str, seed: bytes) -> O2RChannel:
        """``createBootstrapTrickleChannel``: ``<runner_id>-<16 derived chars>-o2r``."""
        assert self._loop is not None, "the orchestrator double is not running"
        channel_name = f"{runner_id}-{derive_secret(seed, 'trickle:' + O2R_NAME)[:16]}-{O2R_NAME}"
        self.trickle.create_channel(channel_name, "application/json")
        url = f"{self.trickle.url}/{channel_name}"
        descriptor = ChannelDescriptor(O2R_NAME, channel_name, url, "", "application/json")
        o2r = O2RChannel(descriptor, self.trickle, self._loop, self.client, self.keepalive_s)
        self._o2r[runner_id] = o2r
        return o2r

    # -- for tests (thread-safe) ------------------------------------------------------------------
    @property
    def runners(self) -> dict[str, RunnerSnapshot]:
        """The registrations now (expired ones too until the sweep removes them)."""
        return self.registry.snapshot()

    def runner(self, runner_id: str) -> RunnerSnapshot:
        return self.runners[runner_id]

    def heartbeats(self, runner_id: str) -> int:
        """Accepted heartbeats of a registered runner (bootstrap included), else 0."""
        found = self.runners.get(runner_id)
        return 0 if found is None else found.heartbeats

    def reserve(self, runner_id: str) -> Reservation:
        """As ``POST /apps/{runner_id}/session`` (raises :class:`LiveRunnerError` as it answers)."""
        reply = self.registry.reserve(runner_id)
        session_id = reply["session_id"]
        return Reservation(
            runner_id=runner_id,
            session_id=session_id,
            app_url=reply["app_url"],
            control_url=reply["control_url"],
            token=self.registry.session_token(runner_id, session_id),
            session_control=self.registry.session_control(runner_id, session_id),
        )

    def release(self, runner_id: str, session_id: str) -> None:
        """As ``POST /apps/{runner_id}/session/{session_id}/stop``."""
        self.registry.release(runner_id, session_id)

    def session_token(self, runner_id: str, session_id: str) -> str:
        return self.registry.session_token(runner_id, session_id)

    def forget(self, runner_id: str) -> bool:
        """Drop a runner as the TTL sweep does (O2R closed, sessions released silently); its
        next heartbeat gets 401 and it must bootstrap again."""
        return self.registry.forget(runner_id)

    def restart(self) -> None:
        """An orchestrator restart: every runner, session and channel is forgotten."""
        self.registry.forget_all()

    def expire(self, runner_id: str) -> None:
        """Age a runner past its TTL without sweeping it: 404s until the next sweep."""
        self.registry.expire(runner_id)

    def sweep(self) -> list[str]:
        """Run one TTL sweep now; the runner ids removed."""
        return self.registry.remove_expired()

    def o2r_messages(self, runner_id: str) -> list[Any]:
        """The JSON messages written so far on the latest O2R channel of ``runner_id`` (also
        after the runner was removed); KeyError if it never registered."""
        return list(self._o2r[runner_id].sent)

    def calls(self, path_prefix: str = "", method: str | None = None) -> list[CallRecord]:
        """The requests answered so far (e.g. ``calls("/runners/heartbeat")``), oldest first."""
        return [
            call
            for call in list(self._calls)
            if call.path.startswith(path_prefix) and method in (None, call.method)
        ]

    def wait_for(self, condition: Callable[[], T | None], timeout_s: float = 5.0) -> T:
        """Poll ``condition`` until it returns something truthy; TimeoutError after the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"the orchestrator double waited {timeout_s} s in vain")
            time.sleep(0.02)

    def discovery(self) -> list[dict[str, Any]]:
        return self.registry.discovery()
