"""Backpressure: latency over time when the transform is slower than the camera.

The client streams 30 fps to a server whose transform takes 50, 100 or 200 ms per frame
(livediff's passthrough with ``delay_ms``; the baseline sleeps inline in ``recv()`` as the
aiortc example's model would run). A server that sheds frames keeps latency flat near the
transform time; one that queues them grows latency every second, without end. Each transform
time runs on livediff and then on the baseline, both servers up at once (side by side). The
client's receiver is the marker-aware one (as a browser's behaves) unless ``--receiver stock``.

Per run: latency percentiles of the frames that arrive back in the window (what a viewer sees
then; frames sent in it may never come back from a queue), the medians of the first and last
two seconds, the growth (least-squares slope of latency over arrival time, ms per s),
frames out per second and server CPU per input frame; and every frame's (arrival, latency)
from the camera's first frame on, for the plot.

    python benchmarks/backpressure.py                 # ~1.5 minutes
    python benchmarks/backpressure.py --delays 100 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import (
    WARMUP_S,
    ClientStream,
    Column,
    ServerProcess,
    Table,
    Window,
    baseline_server,
    cpu_fields,
    edge_fields,
    growth_ms_per_s,
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

NAME = "backpressure"


async def measure(
    server: ServerProcess, delay_ms: float, args: argparse.Namespace
) -> dict[str, Any]:
    params: dict[str, Any] = {"delay_ms": delay_ms}
    if server.kind == "livediff":
        params.update(width=args.size[0], height=args.size[1])
    streams, window = await run_streams(
        server,
        1,
        size=args.size,
        seconds=args.seconds,
        codec=args.codec,
        marker=args.receiver == "marker",
        params=params,
    )
    stats = stream_stats(streams[0], window)
    return {
        "server": server.kind,
        "transform_ms": delay_ms,
        "frames_sent": stats.frames_sent,
        "frames_received": stats.frames_received,
        "frames_lost": stats.frames_lost,
        "fps_out": round(len(stats.arrivals) / window.seconds, 2),
        **latency_fields([ms for _, ms in stats.arrivals]),
        **edge_fields(stats.arrivals, window),
        "growth_ms_per_s": growth_ms_per_s(stats.arrivals),
        **cpu_fields(window, stats.frames_sent),
        "series": series(streams[0], window),
    }


def series(stream: ClientStream, window: Window) -> list[list[float]]:
    """[seconds since the camera's first frame, latency ms] per frame back before the end."""
    sent_at = stream.source.sent_at
    began = min(sent_at.values())
    points = []
    for number, latency in stream.recorder.latencies(stream.source):
        arrived = sent_at[number] + latency
        if arrived < window.end:
            points.append([round(arrived - began, 3), round(latency * 1000, 1)])
    return sorted(points)


TABLE = Table(
    [
        Column("server", "server"),
        Column("transform", "transform_ms", ".0f"),
        Column("p50 ms", "latency_ms_p50", ".1f"),
        Column("p99 ms", "latency_ms_p99", ".1f"),
        Column("first 2s", "latency_ms_first_2s", ".1f"),
        Column("last 2s", "latency_ms_last_2s", ".1f"),
        Column("growth ms/s", "growth_ms_per_s", ".1f"),
        Column("fps out", "fps_out", ".1f"),
        Column("lost", "frames_lost", "d"),
        Column("CPU ms/frame", "server_cpu_ms_per_frame", ".2f"),
    ]
)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with running(livediff_server(), baseline_server()) as servers:
        print(TABLE.header(), flush=True)
        for delay_ms in args.delays:
            for server in servers:
                await server.settle()
                row = await measure(server, delay_ms, args)
                print(TABLE.row(row), flush=True)
                rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for delay_ms in dict.fromkeys(r["transform_ms"] for r in rows):
        both = {r["server"]: r for r in rows if r["transform_ms"] == delay_ms}
        if "livediff" in both and "baseline" in both:
            ours, theirs = both["livediff"], both["baseline"]
            found.append(
                {
                    "transform_ms": delay_ms,
                    "latency_ms_p50_ratio": ratio(ours["latency_ms_p50"], theirs["latency_ms_p50"]),
                    "latency_ms_last_2s_ratio": ratio(
                        ours["latency_ms_last_2s"], theirs["latency_ms_last_2s"]
                    ),
                }
            )
    return found


def plot(rows: list[dict[str, Any]], info: dict[str, Any], config: dict[str, Any]) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 5))
    delays = list(dict.fromkeys(r["transform_ms"] for r in rows))
    colours = dict(zip(delays, ["tab:green", "tab:blue", "tab:purple", "tab:red"], strict=False))
    for row in rows:
        if not row["series"]:
            continue
        xs, ys = zip(*row["series"], strict=True)
        livediff = row["server"] == "livediff"
        axes.plot(
            xs,
            ys,
            linestyle="-" if livediff else "--",
            linewidth=1.6 if livediff else 1.3,
            color=colours.get(row["transform_ms"], "0.3"),
            label=f"{row['server']}, {row['transform_ms']:g} ms/frame",
        )
    for delay_ms in delays:
        axes.axhline(delay_ms, color=colours.get(delay_ms, "0.3"), linestyle=":", linewidth=0.8)
    axes.set_yscale("log")
    warmup = config.get("warmup_s", 1.0)
    axes.axvspan(0, warmup, color="0.9", zorder=0)
    axes.text(
        warmup / 2,
        0.98,
        "warm-up",
        transform=axes.get_xaxis_transform(),
        ha="center",
        va="top",
        fontsize=7,
        color="0.4",
    )
    axes.set_xlabel("seconds since the camera's first frame (when the frame came back)")
    axes.set_ylabel("glass-to-glass latency, ms (log); dotted: the transform time")
    width, height = config["size"]
    axes.set_title(
        f"Slow transforms at 30 fps in ({width}x{height}, {config['codec'].upper()},"
        f" {config['receiver']} client receiver): livediff solid, baseline dashed"
    )
    axes.grid(alpha=0.3, which="both")
    axes.legend(ncols=2, loc="upper left")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    save_plot(figure, NAME, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[50.0, 100.0, 200.0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="WxH")
    parser.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    parser.add_argument("--receiver", choices=["marker", "stock"], default="marker")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.replot:
        saved = load_json(NAME)
        plot(saved["results"], saved["machine"], saved["config"])
        return
    print("latency in ms, glass to glass; 30 fps in")
    rows = asyncio.run(run(args))
    info = machine()
    found = ratios(rows)
    for r in found:
        print(
            f"livediff/baseline at {r['transform_ms']:g} ms/frame:"
            f" p50 x{r['latency_ms_p50_ratio']}, last 2 s x{r['latency_ms_last_2s_ratio']}"
        )
    config = {**vars(args), "fps_in": 30, "warmup_s": WARMUP_S}
    path = save_json(NAME, info, config, rows, ratios=found)
    plot(rows, info, config)
    print(f"saved {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
