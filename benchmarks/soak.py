"""Soak: sessions opened and closed in churn, then streams for minutes; does anything leak?

One real ``livediff serve`` (passthrough, ``--debug-endpoints``, no rate limit) on 127.0.0.1;
every client is a peer in this process. Phases:

1. warm-up: 4 cameras stream for a few seconds (codec pools, executor threads start), then the
   baseline is taken;
2. churn: ``--sessions`` sessions (200) in ``--rounds`` rounds (2), 8 open at a time, each
   until its first frame comes back, then ended: half with DELETE, a quarter by closing the
   client peer (DTLS goodbye, no DELETE), a quarter by vanishing (the client's ICE just stops;
   the server notices when consent checks fail, ~30 s). A leak grows every round; a high-water
   mark (allocator pools, the most sessions alive at once) grows in the first only;
3. streaming: 4 cameras at 30 fps for ``--stream-seconds`` (120), frames lost counted;
4. after each phase the server's RSS, OS threads and open fds (from /proc of its pid), its
   asyncio tasks, Python objects and sessions (GET /v1/debug/stats) are read once it is idle.

    python benchmarks/soak.py                      # ~4 minutes
    python benchmarks/soak.py --sessions 40 --stream-seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from common import (
    Column,
    ServerProcess,
    Table,
    livediff_server,
    machine,
    run_streams,
    running,
    save_json,
    stream_stats,
)
from prometheus_client.parser import text_string_to_metric_families

from livediff.testing.peers import (
    FrameRecorder,
    NumberedVideoTrack,
    accept_answer,
    add_camera,
    client_peer,
    local_offer,
)

NAME = "soak"
#: How each churned session ends, by its index modulo 4.
ENDINGS = ("delete", "close", "delete", "vanish")
#: Churned sessions open at once (vanished ones hold their slot until consent fails, ~30 s).
CONCURRENCY = 8
#: Most seconds to wait for the server to let go of every session after a phase.
SETTLE_TIMEOUT_S = 120.0


@dataclass
class Churn:
    """What the churn phase did, and what went wrong on the client side."""

    opened: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDINGS, 0))
    failures: list[str] = field(default_factory=list)
    busy_retries: int = 0


async def snapshot(server: ServerProcess, http: httpx.AsyncClient, phase: str) -> dict[str, Any]:
    """The server's process figures (from /proc, via psutil) and its own (debug stats)."""
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    stats = (await http.get(f"{server.url}/v1/debug/stats")).json()
    return {
        "phase": phase,
        "rss_mib": round(process.memory_info().rss / 2**20, 1),
        "threads": process.num_threads(),
        "open_fds": process.num_fds(),
        "asyncio_tasks": stats["asyncio_tasks"],
        "python_objects": stats["python_objects"],
        "sessions": stats["sessions"],
        "worker_sessions": stats["worker_sessions"],
        "viewers": stats["viewers"],
        "background_tasks": stats["background_tasks"],
        "ended_sessions": stats["ended_sessions"],
    }


async def settle(server: ServerProcess, http: httpx.AsyncClient) -> float:
    """Seconds until the server holds no session and is idle again."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_TIMEOUT_S:
        stats = (await http.get(f"{server.url}/v1/debug/stats")).json()
        if stats["sessions"] == 0 and stats["worker_sessions"] == 0:
            break
        await asyncio.sleep(0.5)
    await server.settle()
    return round(time.monotonic() - started, 1)


async def open_session(
    server: ServerProcess, http: httpx.AsyncClient, pc: RTCPeerConnection, churn: Churn
) -> str:
    """POST the peer's offer (again while the server is full); the session id."""
    body = {"sdp": await local_offer(pc), "params": {"width": 128, "height": 128}}
    for _ in range(600):
        response = await http.post(f"{server.url}/v1/sessions", json=body)
        if response.status_code != 503:
            break
        churn.busy_retries += 1
        await asyncio.sleep(0.25)  # vanished clients hold their slots until consent fails
    response.raise_for_status()
    answer = response.json()
    await accept_answer(pc, answer["sdp"])
    return str(answer["session_id"])


async def end_session(
    server: ServerProcess, http: httpx.AsyncClient, pc: RTCPeerConnection, sid: str, how: str
) -> None:
    if how == "delete":
        (await http.delete(f"{server.url}/v1/sessions/{sid}")).raise_for_status()
    elif how == "vanish":  # no goodbye of any kind: the client's ICE goes silent
        for transceiver in pc.getTransceivers():
            await transceiver.receiver.transport.transport.stop()
    await pc.close()


async def churn_one(
    server: ServerProcess, http: httpx.AsyncClient, index: int, churn: Churn
) -> None:
    how = ENDINGS[index % len(ENDINGS)]
    pc = client_peer()
    recorder = FrameRecorder()
    tasks: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.ensure_future(recorder.consume(track)))

    add_camera(pc, NumberedVideoTrack(128, 128), marker_buffer=True)
    try:
        sid = await open_session(server, http, pc, churn)
        await recorder.wait_for(1, timeout=30)
        await end_session(server, http, pc, sid, how)
        churn.opened[how] += 1
    except Exception as exc:  # counted and reported: the soak goes on
        churn.failures.append(f"session {index} ({how}): {exc!r}")
        await pc.close()
    finally:
        for task in tasks:
            task.cancel()


async def run_churn(server: ServerProcess, http: httpx.AsyncClient, count: int) -> Churn:
    churn = Churn()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(index: int) -> None:
        async with gate:
            await churn_one(server, http, index, churn)

    await asyncio.gather(*(limited(index) for index in range(count)))
    return churn


def server_errors(text: str) -> dict[str, dict[str, float]]:
    """livediff_errors_total by kind and livediff_requests_rejected_total by reason/status."""
    found: dict[str, dict[str, float]] = {"errors": {}, "rejected": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "livediff_errors_total":
                found["errors"][sample.labels["kind"]] = sample.value
            elif sample.name == "livediff_requests_rejected_total":
                key = f"{sample.labels['reason']} {sample.labels['status']}"
                found["rejected"][key] = sample.value
    return found


def sized(side: int) -> dict[str, int]:
    return {"width": side, "height": side}


async def run_stream_phase(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    size = (args.size, args.size)
    streams, window = await run_streams(
        server, 4, size=size, seconds=args.stream_seconds, params=sized(args.size)
    )
    stats = [stream_stats(stream, window) for stream in streams]
    sent = sum(s.frames_sent for s in stats)
    lost = sum(s.frames_lost for s in stats)
    return {
        "streams": 4,
        "seconds": round(window.seconds, 1),
        "frames_sent": sent,
        "frames_received": sum(s.frames_received for s in stats),
        "frames_lost": lost,
        "lost_percent": round(100 * lost / sent, 2) if sent else 0.0,
        "server_cpu_percent": round(window.cpu_s * 100 / window.seconds, 1),
    }


TABLE = Table(
    [
        Column("phase", "phase", width=16),
        Column("RSS MiB", "rss_mib", ".1f"),
        Column("threads", "threads", "d"),
        Column("fds", "open_fds", "d"),
        Column("tasks", "asyncio_tasks", "d"),
        Column("objects", "python_objects", "d"),
        Column("sessions", "sessions", "d"),
        Column("worker", "worker_sessions", "d"),
        Column("background", "background_tasks", "d"),
        Column("ended kept", "ended_sessions", "d"),
    ]
)


async def warm_up(server: ServerProcess, http: httpx.AsyncClient, side: int) -> float:
    await run_streams(server, 4, size=(side, side), seconds=3, params=sized(side))
    return await settle(server, http)


async def churn_rounds(
    server: ServerProcess, http: httpx.AsyncClient, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``--rounds`` churns of ``--sessions / --rounds`` each: (snapshots, round summaries).
    A leak grows with every round; a high-water mark (allocator pools) grows only once."""
    snapshots, rounds = [], []
    per_round = args.sessions // args.rounds
    for number in range(1, args.rounds + 1):
        started = time.monotonic()
        churn = await run_churn(server, http, per_round)
        seconds = round(time.monotonic() - started, 1)
        settled = await settle(server, http)
        snapshots.append(await snapshot(server, http, f"churn {number}/{args.rounds}"))
        print(TABLE.row(snapshots[-1]), flush=True)
        rounds.append(
            {
                "sessions": per_round,
                "seconds": seconds,
                "settle_s": settled,
                "ended_by": churn.opened,
                "client_failures": churn.failures,
                "busy_retries": churn.busy_retries,
            }
        )
    return snapshots, rounds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = livediff_server("--max-sessions", "64", "--debug-endpoints", "--session-rate", "0")
    with running(server):
        async with httpx.AsyncClient(timeout=30) as http:
            snapshots = [await snapshot(server, http, "start")]
            warm_settle = await warm_up(server, http, args.size)
            snapshots.append(await snapshot(server, http, "baseline (warm)"))
            print(TABLE.header(), *(TABLE.row(s) for s in snapshots), sep="\n", flush=True)
            churned, rounds = await churn_rounds(server, http, args)
            snapshots += churned
            streaming = await run_stream_phase(server, args)
            streaming["settle_s"] = await settle(server, http)
            snapshots.append(await snapshot(server, http, "after streaming"))
            print(TABLE.row(snapshots[-1]), flush=True)
            metrics = server_errors((await http.get(f"{server.url}/metrics")).text)
    return {
        "snapshots": snapshots,
        "warm_up_settle_s": warm_settle,
        "churn": rounds,
        "streaming": streaming,
        "server_errors": metrics["errors"],
        "requests_rejected": metrics["rejected"],
        "growth_after_vs_baseline": growth(snapshots[1], snapshots[-1]),
        "growth_last_churn_round": growth(snapshots[-3], snapshots[-2]) if args.rounds > 1 else {},
    }


def growth(baseline: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    keys = ("rss_mib", "threads", "open_fds", "asyncio_tasks", "python_objects", "sessions")
    return {key: round(after[key] - baseline[key], 1) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200, help="sessions in the churn")
    parser.add_argument("--rounds", type=int, default=2, help="churn rounds the sessions share")
    parser.add_argument(
        "--stream-seconds", type=float, default=120.0, help="how long the 4 cameras stream"
    )
    parser.add_argument("--size", type=int, default=256, help="streamed frame side, pixels")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    streaming = results["streaming"]
    for number, done in enumerate(results["churn"], start=1):
        print(
            f"churn {number}: {done['sessions']} sessions in {done['seconds']} s, ended by"
            f" {done['ended_by']}, {len(done['client_failures'])} client failures"
        )
    print(
        f"streaming: 4 x {streaming['seconds']} s, {streaming['frames_sent']} frames sent,"
        f" {streaming['frames_lost']} lost ({streaming['lost_percent']} %)"
    )
    print(f"server errors: {results['server_errors']}")
    print(f"last churn round grew: {results['growth_last_churn_round']}")
    print(f"after streaming vs the warm baseline: {results['growth_after_vs_baseline']}")
    config = {**vars(args), "pipeline": "passthrough", "endings": list(ENDINGS)}
    path = save_json(NAME, machine(), config, results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
