"""The Live Runner registry's wire format, as go-livepeer speaks it (torch-free, aiortc-free).

Read from go-livepeer (``ai/runner/live_runner.go``: ``LiveRunnerHeartbeatRequest``,
``LiveRunnerHeartbeatResponse``, ``LiveRunnerTrickleChannel``; ``server/ai_http.go``: the
handlers and the proxy's headers):

- a heartbeat *replaces* the whole registration: ``runner_url`` and ``app`` every time, and
  omitted fields reset (capacity to 1, version and metadata cleared);
- durations are Go duration strings (``"5s"``, ``"500ms"``, ``"1m30s"``);
- ``status`` must be lowercase and trimmed; only ``""`` and ``"ready"`` are discoverable;
- ``metadata`` is public, valid UTF-8, at most 1024 bytes;
- errors are plain text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The headers go-livepeer's reverse proxy adds to every request it forwards to a runner.
RUNNER_ROUTE_HEADER = "Livepeer-Runner-Route"
SESSION_ID_HEADER = "Livepeer-Session-Id"
SESSION_TOKEN_HEADER = "Livepeer-Session-Token"
SESSION_CONTROL_HEADER = "Livepeer-Session-Control"

MAX_METADATA_BYTES = 1024
READY = "ready"

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ProtocolError(ValueError):
    """The orchestrator answered something that is not its documented shape."""


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``time.Duration.String()``: ``"1m30s"``, ``"500ms"``)."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _DURATION_PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise ProtocolError(f"not a Go duration: {text!r}")
    return sign * sum(float(number) * _UNIT_S[unit] for number, unit in parts)


class ChannelDescriptor(BaseModel):
    """A trickle channel the orchestrator made: clients get ``url``, the runner uses
    ``internal_url`` (the runner-facing address) when there is one."""

    model_config = ConfigDict(extra="ignore")

    name: str
    channel_name: str = ""
    url: str
    internal_url: str = ""
    mime_type: str = ""

    @property
    def runner_url(self) -> str:
        return self.internal_url or self.url


class ChannelsReply(BaseModel):
    """The answer to ``POST /runner/{id}/session/{sid}/channels``."""

    model_config = ConfigDict(extra="ignore")

    channels: list[ChannelDescriptor]


class HeartbeatReply(BaseModel):
    """The registry's answer to a heartbeat (the secret and O2R only on first registration)."""

    model_config = ConfigDict(extra="ignore")

    runner_id: str = Field(min_length=1)
    orchestrator: str = ""
    heartbeat_interval: str
    heartbeat_ttl: str
    heartbeat_secret: str = ""
    o2r: ChannelDescriptor | None = None
    session_ids: list[str] | None = None

    @property
    def interval_s(self) -> float:
        return parse_go_duration(self.heartbeat_interval)

    @property
    def ttl_s(self) -> float:
        return parse_go_duration(self.heartbeat_ttl)


def parse_reply(body: bytes) -> HeartbeatReply:
    """A heartbeat reply, or :class:`ProtocolError` saying what is wrong with it."""
    try:
        reply = HeartbeatReply.model_validate_json(body)
        if reply.interval_s <= 0 or reply.ttl_s <= 0:
            raise ProtocolError("heartbeat_interval and heartbeat_ttl must be positive")
    except ValueError as exc:
        raise ProtocolError(f"malformed heartbeat reply: {exc}") from exc
    return reply


class SessionEvent(BaseModel):
    """An O2R message: ``reserved`` / ``released`` for a session (keep-alives are dropped)."""

    model_config = ConfigDict(extra="ignore")

    event: Literal["reserved", "released"]
    session: str = Field(min_length=1)


def parse_o2r(payload: bytes) -> SessionEvent | None:
    """The session event in one O2R segment; None for a keep-alive or an event of another
    kind (raises :class:`ProtocolError` for a segment that is not a JSON object)."""
    try:
        message: Any = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"O2R segment is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("O2R segment is not a JSON object")
    if message.get("event") not in ("reserved", "released"):
        return None
    try:
        return SessionEvent.model_validate(message)
    except ValueError as exc:
        raise ProtocolError(f"malformed O2R event: {exc}") from exc


def metadata_text(values: dict[str, Any]) -> str:
    """Public registration metadata as compact JSON, within the registry's 1024-byte limit
    (entries are dropped from the end until it fits)."""
    items = list(values.items())
    while items:
        text = json.dumps(dict(items), separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) <= MAX_METADATA_BYTES:
            return text
        items.pop()
    return ""
