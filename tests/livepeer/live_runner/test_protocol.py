"""The registry's wire format as go-livepeer writes it: Go durations, heartbeat replies, O2R
messages, channel descriptors and the 1 KiB metadata limit; malformed input is a clear error."""

from __future__ import annotations

import json

import pytest

from livediff.livepeer.live_runner.protocol import (
    MAX_METADATA_BYTES,
    ProtocolError,
    metadata_text,
    parse_go_duration,
    parse_o2r,
    parse_reply,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("20s", 20.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h0m0s", 3600.0),
     ("1.5s", 1.5), ("0", 0.0), ("250us", 0.00025), ("2µs", 0.000002)],
)  # fmt: skip
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "five seconds", "5s junk", "1m 30s"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ProtocolError, match="Go duration"):
        parse_go_duration(text)


def bootstrap_reply(**changes: object) -> bytes:
    reply = {
        "runner_id": "runner_abc",
        "orchestrator": "http://orch:8935",
        "heartbeat_interval": "5s",
        "heartbeat_ttl": "20s",
        "heartbeat_secret": "hs",
        "o2r": {
            "name": "o2r",
            "channel_name": "runner_abc-o2r",
            "url": "https://public/ai/trickle/runner_abc-o2r",
            "internal_url": "http://orch:8935/ai/trickle/runner_abc-o2r",
            "mime_type": "application/json",
        },
        "session_ids": ["s1"],
    }
    return json.dumps({**reply, **changes}).encode()


def test_a_bootstrap_reply() -> None:
    reply = parse_reply(bootstrap_reply())
    assert (reply.runner_id, reply.interval_s, reply.ttl_s) == ("runner_abc", 5.0, 20.0)
    assert reply.o2r is not None
    assert reply.o2r.runner_url == "http://orch:8935/ai/trickle/runner_abc-o2r"
    assert reply.session_ids == ["s1"]


def test_a_follow_up_reply_has_no_secret_and_no_channel() -> None:
    body = {"runner_id": "r", "heartbeat_interval": "5s", "heartbeat_ttl": "20s",
            "session_ids": []}  # fmt: skip
    reply = parse_reply(json.dumps(body).encode())
    assert reply.heartbeat_secret == "" and reply.o2r is None and reply.session_ids == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", bootstrap_reply(heartbeat_interval="soon"),
     bootstrap_reply(heartbeat_ttl="0s"), bootstrap_reply(runner_id="")],
)  # fmt: skip
def test_malformed_replies_say_so(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed heartbeat reply"):
        parse_reply(body)


def test_o2r_messages() -> None:
    assert parse_o2r(b'{"keep":"alive"}') is None
    event = parse_o2r(b'{"event":"reserved","session":"s9","timestamp":"2026-12-06T05:00:00Z"}')
    assert event is not None and (event.event, event.session) == ("reserved", "s9")
    assert parse_o2r(b'{"event":"resized","session":"s9"}') is None  # a future kind: ignored
    with pytest.raises(ProtocolError):
        parse_o2r(b"[1, 2]")
    with pytest.raises(ProtocolError):
        parse_o2r(b'{"event":"released"}')


def test_metadata_stays_within_the_registrys_limit() -> None:
    small = metadata_text({"pipeline": "diffusion", "width": 512})
    assert json.loads(small) == {"pipeline": "diffusion", "width": 512}
    big = metadata_text({"pipeline": "diffusion", "notes": "é" * 2000})
    assert len(big.encode()) <= MAX_METADATA_BYTES and json.loads(big) == {"pipeline": "diffusion"}
