"""Glass-to-glass transport latency and server CPU: livediff (passthrough) against an
aiortc-example baseline.

A real aiortc client streams frames at 30 fps, each carrying its number drawn in the pixels
(livediff.testing.framecode), to a real server process, and reads the numbers back from the
returned video. Per frame: latency from handing the frame to the client's encoder to the
decoded frame arriving back. Both servers run as processes of their own on this machine, at the
same time, and every scenario runs on livediff and then on the baseline (side by side, so both
see the same load from whatever else shares the machine). Each server's CPU time over the
measured window (user + system, all its threads, from the operating system) gives its CPU
milliseconds per input frame.

Scenarios, each with the client's stock aiortc receiver and with livediff's marker-aware one
(as a browser's would behave: libwebrtc releases a frame on its marker bit):
- passthrough at 512x512 and 1280x720: p50/p95/p99 latency, output fps, frames lost, CPU.
- slow (512x512): the transform takes 100 ms per frame (fed at 30 fps). Latency in the first
  and the last two seconds shows whether it stays flat (livediff sheds frames) or grows (a queue).

    python benchmarks/transport.py                      # ~3 minutes, writes benchmarks/results/
    python benchmarks/transport.py --seconds 5 --slow-seconds 5 --codec h264
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

from common import (
    Column,
    ServerProcess,
    Table,
    baseline_bitrates,
    baseline_server,
    cpu_fields,
    edge_fields,
    latency_fields,
    livediff_server,
    load_json,
    machine,
    parse_size,
    pyplot,
    ratio,
    run_streams,
    running,
    save_json,
    save_plot,
    stream_stats,
)

SLOW_MS = 100.0


@dataclass(frozen=True)
class Scenario:
    size: tuple[int, int]
    delay_ms: float
    marker: bool
    seconds: float

    @property
    def name(self) -> str:
        return f"slow ({self.delay_ms:g} ms/frame)" if self.delay_ms else "passthrough"

    @property
    def size_name(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    @property
    def receiver(self) -> str:
        return "marker" if self.marker else "stock"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    chosen = []
    for index, size in enumerate(args.sizes):
        for marker in (False, True):
            chosen.append(Scenario(size, 0.0, marker, args.seconds))
            if index == 0 and args.slow_seconds > 0:
                chosen.append(Scenario(size, SLOW_MS, marker, args.slow_seconds))
    return chosen


async def measure(server: ServerProcess, scenario: Scenario, codec: str) -> dict[str, Any]:
    width, height = scenario.size
    params: dict[str, Any] = {"delay_ms": scenario.delay_ms}
    if server.kind == "livediff":
        params.update(width=width, height=height)
    streams, window = await run_streams(
        server,
        1,
        size=scenario.size,
        seconds=scenario.seconds,
        codec=codec,
        marker=scenario.marker,
        params=params,
    )
    stats = stream_stats(streams[0], window)
    return {
        "server": server.kind,
        "scenario": scenario.name,
        "size": scenario.size_name,
        "client_receiver": scenario.receiver,
        "codec": codec,
        "seconds": scenario.seconds,
        "frames_sent": stats.frames_sent,
        "frames_received": stats.frames_received,
        "frames_lost": stats.frames_lost,
        "fps_out": round(stats.frames_received / window.seconds, 2),
        **latency_fields(stats.latencies_ms),
        **edge_fields(stats.arrivals, window),
        **cpu_fields(window, stats.frames_sent),
    }


TABLE = Table(
    [
        Column("server", "server"),
        Column("size", "size", width=9),
        Column("scenario", "scenario", width=19),
        Column("client rx", "client_receiver"),
        Column("p50 ms", "latency_ms_p50", ".1f"),
        Column("p95 ms", "latency_ms_p95", ".1f"),
        Column("p99 ms", "latency_ms_p99", ".1f"),
        Column("first 2s", "latency_ms_first_2s", ".1f"),
        Column("last 2s", "latency_ms_last_2s", ".1f"),
        Column("fps out", "fps_out", ".1f"),
        Column("lost", "frames_lost", "d"),
        Column("CPU ms/frame", "server_cpu_ms_per_frame", ".2f"),
        Column("CPU %", "server_cpu_percent", ".0f"),
    ]
)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    env = baseline_bitrates(args.codec) if args.baseline_bitrates else None
    with running(livediff_server(env=env), baseline_server()) as servers:
        print(TABLE.header(), flush=True)
        for scenario in scenarios(args):
            for server in servers:
                await server.settle()
                row = await measure(server, scenario, args.codec)
                print(TABLE.row(row), flush=True)
                rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """livediff / baseline per scenario (below 1: livediff is lower)."""
    pairs: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = (row["size"], row["scenario"], row["client_receiver"])
        pairs.setdefault(key, {})[row["server"]] = row
    found = []
    for (size, scenario, receiver), both in pairs.items():
        ours, theirs = both.get("livediff"), both.get("baseline")
        if ours is None or theirs is None:
            continue
        found.append(
            {
                "size": size,
                "scenario": scenario,
                "client_receiver": receiver,
                **{
                    f"{key}_ratio": ratio(ours[key], theirs[key])
                    for key in ("latency_ms_p50", "latency_ms_p99", "server_cpu_ms_per_frame")
                },
            }
        )
    return found


def plot(rows: list[dict[str, Any]], info: dict[str, Any], name: str) -> None:
    plt = pyplot()
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12, 4.4))
    keys = list(dict.fromkeys((r["size"], r["scenario"], r["client_receiver"]) for r in rows))
    labels = [f"{size}\n{scen.split(' (')[0]}\n{rx} rx" for size, scen, rx in keys]
    colours = {"livediff": "tab:blue", "baseline": "tab:orange"}
    for offset, server in ((-0.2, "livediff"), (0.2, "baseline")):
        found = {
            (r["size"], r["scenario"], r["client_receiver"]): r
            for r in rows
            if r["server"] == server
        }
        xs = [i + offset for i, key in enumerate(keys) if key in found]
        chosen = [found[key] for key in keys if key in found]
        p50 = [r["latency_ms_p50"] for r in chosen]
        above = [r["latency_ms_p99"] - r["latency_ms_p50"] for r in chosen]
        latency.bar(xs, p50, 0.4, color=colours[server], label=f"{server} p50 (bar), p99 (tick)")
        latency.errorbar(xs, p50, yerr=[[0] * len(p50), above], fmt="none", ecolor="0.2", capsize=3)
        for x, r in zip(xs, chosen, strict=True):
            top = r["latency_ms_p99"] * 1.12
            latency.text(x, top, f"{r['latency_ms_p50']:.0f}", ha="center", fontsize=7)
        cpu_ms = [r["server_cpu_ms_per_frame"] for r in chosen]
        cpu.bar(xs, cpu_ms, 0.4, color=colours[server], label=server)
        for x, value in zip(xs, cpu_ms, strict=True):
            cpu.text(x, value + 0.1, f"{value:.1f}", ha="center", fontsize=7)
    for axes in (latency, cpu):
        axes.set_xticks(range(len(keys)), labels, fontsize=7)
        axes.grid(axis="y", alpha=0.3)
    latency.set_yscale("log")
    latency.set_ylim(top=max(r["latency_ms_p99"] for r in rows) * 6)
    cpu.set_ylim(top=max(r["server_cpu_ms_per_frame"] for r in rows) * 1.3)
    latency.set_ylabel("glass-to-glass latency, ms (log)")
    latency.set_title(f"Latency at 30 fps in ({rows[0]['codec'].upper()}; slow = 100 ms/frame)")
    latency.legend(loc="upper left", ncols=2)
    cpu.set_ylabel("server CPU ms per input frame")
    cpu.set_title("Server CPU per frame (whole process)")
    cpu.legend(loc="upper left", ncols=2)
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    save_plot(figure, name, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--slow-seconds", type=float, default=10.0, help="0: no slow scenario")
    parser.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[(512, 512), (1280, 720)],
        help="WxH sizes (the slow scenario runs at the first)",
    )
    parser.add_argument(
        "--baseline-bitrates",
        action="store_true",
        help="livediff's encoders at aiortc's bitrates (as the baseline's)",
    )
    parser.add_argument("--name", help="result name (default transport, transport-h264)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    name = args.name or ("transport" if args.codec == "vp8" else f"transport-{args.codec}")
    if args.replot:
        saved = load_json(name)
        plot(saved["results"], saved["machine"], name)
        return
    print("latency in ms, glass to glass; fps, lost and server CPU over the measured window")
    rows = asyncio.run(run(args))
    info = machine()
    found = ratios(rows)
    for r in found:
        print(
            f"livediff/baseline {r['size']} {r['scenario']} {r['client_receiver']} rx:"
            f" p50 x{r['latency_ms_p50_ratio']}, p99 x{r['latency_ms_p99_ratio']},"
            f" CPU/frame x{r['server_cpu_ms_per_frame_ratio']}"
        )
    config = {**vars(args), "sizes": [f"{w}x{h}" for w, h in args.sizes], "fps_in": 30}
    if args.baseline_bitrates:
        config["livediff_env"] = baseline_bitrates(args.codec)
    note = "one machine: both servers and the client share its cores"
    path = save_json(name, info, config, rows, ratios=found, note=note)
    plot(rows, info, name)
    print(f"saved {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
