"""Hypothesis strategies for hostile input: mutated SDP offers and JSON params bodies.

Offers start from real ones (made by aiortc, see :func:`real_offers`) and are then broken the
way a buggy client or an attacker would: bytes flipped, lines dropped, duplicated, swapped or
cut, attribute values and numbers replaced by garbage or huge numbers, whole kinds of lines
(ICE credentials, fingerprints, rtpmaps, mids, ...) removed. Params bodies are JSON texts with
what :func:`json.dumps` refuses to write by default: NaN and Infinity, nesting far deeper than
any client needs, huge strings and numbers, and values of the wrong type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aiortc.mediastreams import AudioStreamTrack
from hypothesis import strategies as st

from livediff.testing.peers import NumberedVideoTrack, add_camera, client_peer, local_offer


@dataclass(frozen=True)
class RealOffers:
    """Offers as clients send them: a camera (sendrecv video), the same with audio and the
    params data channel, and a WHEP viewer's (recvonly video)."""

    camera: str
    full: str
    viewer: str

    @property
    def publishers(self) -> tuple[str, str]:
        return (self.camera, self.full)


async def real_offers() -> RealOffers:
    camera = client_peer()
    add_camera(camera, NumberedVideoTrack(64, 64))
    full = client_peer()
    add_camera(full, NumberedVideoTrack(64, 64))
    full.addTransceiver(AudioStreamTrack(), direction="sendrecv")
    full.createDataChannel("params")
    viewer = client_peer()
    viewer.addTransceiver("video", direction="recvonly")
    try:
        return RealOffers(
            camera=await local_offer(camera),
            full=await local_offer(full),
            viewer=await local_offer(viewer),
        )
    finally:
        for pc in (camera, full, viewer):
            await pc.close()


#: Attributes aiortc reads, so that inserted lines reach its parser's branches.
ATTRIBUTES = (
    "candidate",
    "end-of-candidates",
    "extmap",
    "fingerprint",
    "fmtp",
    "group",
    "ice-lite",
    "ice-options",
    "ice-pwd",
    "ice-ufrag",
    "inactive",
    "max-message-size",
    "mid",
    "msid",
    "msid-semantic",
    "recvonly",
    "rtcp",
    "rtcp-fb",
    "rtcp-mux",
    "rtpmap",
    "sctp-port",
    "sctpmap",
    "sendonly",
    "sendrecv",
    "setup",
    "ssrc",
    "ssrc-group",
)
#: Line kinds that a mutation may remove all of.
DROPPABLE = (
    "a=candidate",
    "a=extmap",
    "a=fingerprint",
    "a=fmtp",
    "a=group",
    "a=ice-pwd",
    "a=ice-ufrag",
    "a=mid",
    "a=rtcp",
    "a=rtpmap",
    "a=sctp",
    "a=sendrecv",
    "a=setup",
    "a=ssrc",
    "c=",
    "m=audio",
    "m=application",
)

huge_numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(["99999999999999999999", "9" * 5000, "-1", "256", "1e9", "0x10", "NaN"]),
)
garbage = st.one_of(
    st.text(max_size=40),
    huge_numbers,
    st.sampled_from(
        ["", " ", ":", "x y z", "a" * 5000, "IN IP4", "IN IP7 nowhere", "sha-256", "sha-256 zz"]
    ),
)


@st.composite
def mutated_offers(draw: st.DrawFn, offers: tuple[str, ...]) -> str:
    """One of ``offers`` with one to four mutations."""
    lines = draw(st.sampled_from(offers)).split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        lines = draw(_mutation(lines, index))
    return "\r\n".join(lines)


def _mutation(lines: list[str], index: int) -> st.SearchStrategy[list[str]]:
    line = lines[index]
    before, after = lines[:index], lines[index + 1 :]
    text = "\r\n".join(lines)
    numbers = list(re.finditer(r"\d+", line))
    return st.one_of(
        st.just([*before, *after]),  # delete the line
        st.just([*before, line, line, *after]),  # duplicate it
        st.integers(0, len(lines) - 1).map(lambda other: _swap(lines, index, other)),
        st.integers(0, len(text)).map(lambda cut: text[:cut].split("\r\n")),  # truncate
        st.tuples(st.integers(0, max(len(line) - 1, 0)), st.characters(codec="utf-8")).map(
            lambda flip: [*before, line[: flip[0]] + flip[1] + line[flip[0] + 1 :], *after]
        ),
        garbage.map(lambda value: [*before, line.split(":", 1)[0] + ":" + value, *after]),
        st.tuples(st.sampled_from(numbers or [None]), huge_numbers).map(
            lambda swap: [*before, _replace(line, *swap), *after]
        ),
        st.sampled_from(DROPPABLE).map(lambda kind: [x for x in lines if not x.startswith(kind)]),
        st.tuples(st.sampled_from(ATTRIBUTES), st.sampled_from(["", ":"]), garbage).map(
            lambda new: [*before, "a=" + "".join(new), line, *after]
        ),
        st.tuples(st.integers(0, 3), garbage).map(lambda new: _replace_field(lines, *new)),
    )


def _swap(lines: list[str], first: int, second: int) -> list[str]:
    swapped = list(lines)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    return swapped


def _replace(line: str, number: re.Match[str] | None, value: str) -> str:
    if number is None:
        return line
    return line[: number.start()] + value + line[number.end() :]


def _replace_field(lines: list[str], field: int, value: str) -> list[str]:
    """Replace one field (kind, port, protocol or first format) of the first m-line."""
    for index, line in enumerate(lines):
        if line.startswith("m="):
            fields = line[2:].split(" ")
            fields[min(field, len(fields) - 1)] = value
            return [*lines[:index], "m=" + " ".join(fields), *lines[index + 1 :]]
    return lines


# -- params ---------------------------------------------------------------------------------

PARAM_NAMES = ("width", "height", "delay_ms", "prompt", "seed", "model")
huge_values = st.one_of(
    st.integers(1000, 300_000).map(lambda size: "x" * size),  # past every max_length
    st.integers(20, 4000).map(lambda digits: 10**digits),  # past every bound (JSON has no limit)
    st.sampled_from([1e308, -1e308, 5e-324]),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    huge_values,
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """Arrays or objects nested 1 to 50 000 deep (strings with brackets inside, sometimes)."""
    depth = draw(st.integers(1, 50_000))
    opening, closing = draw(
        st.sampled_from([("[", "]"), ('{"a":', "}"), ('["[{",', "]"), ('{"}":', "}")])
    )
    return opening * depth + draw(st.sampled_from(["1", "NaN", '"]]"', "[]"])) + closing * depth


@st.composite
def params_bodies(draw: st.DrawFn) -> str:
    """A JSON text for a params object: hostile values under real and unknown names."""
    names = st.sampled_from(PARAM_NAMES) | st.text(max_size=12)
    fields = draw(st.dictionaries(names, json_values.map(_dumps) | deep_json(), max_size=4))
    body = "{" + ", ".join(f"{json.dumps(name)}: {value}" for name, value in fields.items()) + "}"
    return draw(st.sampled_from([body, body, body, _dumps(draw(json_values)), draw(deep_json())]))


def _dumps(value: object) -> str:
    """JSON as a lax client writes it: NaN and Infinity as bare words."""
    return json.dumps(value, allow_nan=True)
