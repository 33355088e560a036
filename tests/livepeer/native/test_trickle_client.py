"""The trickle client against the server double, and the double's go-livepeer rules."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

from livediff.livepeer.trickle import CURRENT_SEQ, TrickleError, TricklePublisher, TrickleSubscriber
from livediff.testing.trickle_server import FakeTrickleServer


async def read_all(subscriber: TrickleSubscriber) -> list[tuple[int, bytes]]:
    """Every non-empty segment until the channel ends (a publisher's unused preconnect leaves
    an empty one, as go-livepeer's does)."""
    got = []
    while (segment := await subscriber.next_segment()) is not None:
        data = await segment.read(1 << 20)
        if data:
            got.append((segment.seq, data))
    return got


async def write_segments(publisher: TricklePublisher, count: int, pause: float = 0.0) -> None:
    for index in range(count):
        segment = publisher.next_segment()
        for part in range(3):
            segment.write(f"{index}.{part};".encode())
            await asyncio.sleep(pause)
        segment.close()


def subscriber(client: httpx.AsyncClient, url: str, **options: object) -> TrickleSubscriber:
    return TrickleSubscriber(client, url, retry_delay_s=0.01, **options)  # type: ignore[arg-type]


async def test_segments_stream_while_written_and_next_requests_open_early(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("live", "video/mp2t")
    reader = subscriber(client, url)
    publisher = TricklePublisher(client, url, "video/mp2t")
    first = asyncio.ensure_future(reader.next_segment())
    await asyncio.sleep(0.1)  # the GET for the live edge waits for the first segment
    segment = publisher.next_segment()
    segment.write(b"first part;")
    opened = await asyncio.wait_for(first, 5)
    assert opened is not None and opened.seq == 0
    chunks = opened.chunks()
    assert await anext(chunks) == b"first part;"  # before the POST has ended
    segment.write(b"second part;")
    assert await anext(chunks) == b"second part;"
    await asyncio.sleep(0.2)  # a segment lasts a while (a GOP): the next GET opens meanwhile
    segment.close()
    await chunks.aclose()
    rest = asyncio.ensure_future(read_all(reader))
    await write_segments(publisher, 2, pause=0.02)
    await publisher.close()
    await asyncio.sleep(0.1)
    trickle.delete_channel("live")
    assert await asyncio.wait_for(rest, 5) == [(1, b"0.0;0.1;0.2;"), (2, b"1.0;1.1;1.2;")]
    posts = trickle.records("POST", "live")
    gets = trickle.records("GET", "live")
    for current, following in itertools.pairwise(posts):
        assert following.started < current.ended  # the next POST was open before this ended
    for current, following in itertools.pairwise(gets[:4]):  # the GETs of segments with data
        assert following.started < current.ended  # and so was the next GET


async def test_a_seq_outside_the_ring_jumps_to_latest(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("ring")
    publisher = TricklePublisher(client, url, "text/plain", preconnect=False)
    await write_segments(publisher, 8, pause=0.01)  # one after the other, as publishers do
    await publisher.close()
    response = await client.get(f"{url}/0")
    assert response.status_code == 470 and response.headers["Lp-Trickle-Latest"] == "8"
    reader = subscriber(client, url, start_seq=0)
    waiting = asyncio.ensure_future(reader.next_segment())
    await asyncio.sleep(0.1)
    await write_segments(publisher, 1)
    segment = await asyncio.wait_for(waiting, 5)
    assert segment is not None and segment.seq == 8  # where 470 said, not 0
    assert await segment.read(100) == b"0.0;0.1;0.2;"
    await reader.close()


async def test_current_seq_reads_the_newest_message(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("control", "application/json")
    publisher = TricklePublisher(client, url, "application/json", preconnect=False)
    await write_segments(publisher, 3, pause=0.01)
    await publisher.close()
    reader = subscriber(client, url, start_seq=CURRENT_SEQ)
    segment = await reader.next_segment()
    assert segment is not None and (segment.seq, await segment.read(100)) == (2, b"2.0;2.1;2.2;")
    await reader.close()


async def test_the_end_is_404_or_closed_while_waiting(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("ending")
    reader = subscriber(client, url)
    waiting = asyncio.ensure_future(reader.next_segment())
    await asyncio.sleep(0.1)
    trickle.delete_channel("ending")  # the waiting GET is answered Lp-Trickle-Closed
    assert await asyncio.wait_for(waiting, 5) is None
    assert reader.ended
    gone = subscriber(client, url)
    assert await gone.next_segment() is None  # 404: the channel no longer exists
    assert (await client.get(f"{url}/0")).status_code == 404


async def test_transient_errors_are_retried_a_bounded_number_of_times(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("flaky")
    trickle.inject("GET", "flaky", 503, times=2)
    reader = subscriber(client, url, retries=3)
    waiting = asyncio.ensure_future(reader.next_segment())
    await asyncio.sleep(0.2)
    publisher = TricklePublisher(client, url, "text/plain")
    await write_segments(publisher, 1)
    segment = await asyncio.wait_for(waiting, 5)
    assert segment is not None and await segment.read(100) == b"0.0;0.1;0.2;"
    await reader.close()
    trickle.inject("GET", "flaky", 500, times=10)
    failing = subscriber(client, url, retries=2, start_seq=0)
    with pytest.raises(TrickleError, match="gave up after 3 tries"):
        await failing.next_segment()
    await publisher.close()


async def test_a_publisher_sends_a_failed_segment_again_and_learns_a_channel_is_gone(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    url = trickle.create_channel("out", "video/mp2t")
    trickle.inject("POST", "out", 503, times=2)
    publisher = TricklePublisher(client, url, "video/mp2t", retry_delay_s=0.01)
    await write_segments(publisher, 2)
    await publisher.close()
    written = {seq: data for seq, data in trickle.segment_bytes("out").items() if data}
    assert written == {0: b"0.0;0.1;0.2;", 1: b"1.0;1.1;1.2;"}  # whole, not doubled
    assert publisher.published >= 2 and publisher.failures == 0
    orphan = TricklePublisher(client, f"{trickle.url}/nobody-made-this", "video/mp2t")
    await write_segments(orphan, 1)
    deadline = time.monotonic() + 5
    while not (orphan.gone or orphan.failures) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert orphan.gone or orphan.failures  # 404: the runner never creates channels
    assert "nobody-made-this" not in trickle.channels
    await orphan.close()


async def test_the_double_keeps_go_livepeers_rules(
    trickle: FakeTrickleServer, client: httpx.AsyncClient
) -> None:
    assert (await client.post(f"{trickle.url}/made-up", content=b"")).status_code == 404
    assert (await client.post(f"{trickle.url}/made-up/0", content=b"x")).status_code == 404
    assert (await client.get(f"{trickle.url}/made-up/0")).status_code == 404
    url = trickle.create_channel("rules")
    assert (await client.get(f"{url}/5")).status_code == 470  # too far ahead
    next_seq = await client.get(f"{url}/next")
    assert next_seq.text == "0" and next_seq.headers["Lp-Trickle-Latest"] == "0"
    posted = await client.post(f"{url}/0", content=b"abc")
    assert posted.status_code == 200 and posted.headers["Lp-Trickle-Seq"] == "0"
    got = await client.get(f"{url}/0")
    assert got.content == b"abc" and got.headers["Lp-Trickle-Seq"] == "0"
    assert (await client.delete(url)).status_code == 200
    assert (await client.get(f"{url}/0")).status_code == 404
    streams = trickle.create_stream("whole")
    trickle.delete_channel(streams.names[0])  # the input: the other three go with it
    assert not set(streams.names) & set(trickle.channels)
