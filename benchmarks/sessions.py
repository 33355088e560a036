"""Concurrent sessions: 1, 2, 4 and 8 cameras on one server at once.

Every camera streams 30 fps (passthrough, at 256x256 and 512x512) to one server, livediff
(``--max-sessions 8``) and then the baseline, both up at once (side by side); all cameras are
clients in this process. Per session count: frames out per second per session (mean and the
slowest session), glass-to-glass p50/p99 over all sessions' frames, frames lost, and the
server's CPU per input frame (its process CPU time over the window / all frames sent to it).
Client and server share this machine's cores: where they run out, the per-session fps drops
and latency climbs, for the client's codecs as much as for the server's.

    python benchmarks/sessions.py                     # ~2 minutes
    python benchmarks/sessions.py --counts 1 4 16 --sizes 512 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import (
    Column,
    ServerProcess,
    Table,
    baseline_bitrates,
    baseline_server,
    cpu_fields,
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

NAME = "sessions"


async def measure(
    server: ServerProcess, count: int, size: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if server.kind == "livediff":
        params.update(width=size[0], height=size[1])
    streams, window = await run_streams(
        server, count, size=size, seconds=args.seconds, codec=args.codec, params=params
    )
    stats = [stream_stats(stream, window) for stream in streams]
    fps = [s.frames_received / window.seconds for s in stats]
    sent = sum(s.frames_sent for s in stats)
    return {
        "server": server.kind,
        "size": f"{size[0]}x{size[1]}",
        "sessions": count,
        "fps_in_per_session": round(sent / count / window.seconds, 2),
        "fps_per_session": round(sum(fps) / count, 2),
        "fps_slowest_session": round(min(fps), 2),
        "frames_sent": sent,
        "frames_lost": sum(s.frames_lost for s in stats),
        **latency_fields([ms for s in stats for ms in s.latencies_ms]),
        **cpu_fields(window, sent),
    }


TABLE = Table(
    [
        Column("server", "server"),
        Column("size", "size"),
        Column("sessions", "sessions", "d"),
        Column("fps in", "fps_in_per_session", ".1f"),
        Column("fps/session", "fps_per_session", ".1f"),
        Column("slowest", "fps_slowest_session", ".1f"),
        Column("p50 ms", "latency_ms_p50", ".1f"),
        Column("p99 ms", "latency_ms_p99", ".1f"),
        Column("lost", "frames_lost", "d"),
        Column("CPU ms/frame", "server_cpu_ms_per_frame", ".2f"),
        Column("CPU %", "server_cpu_percent", ".0f"),
    ]
)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    env = baseline_bitrates(args.codec) if args.baseline_bitrates else None
    livediff = livediff_server("--max-sessions", str(max(args.counts)), env=env)
    with running(livediff, baseline_server()) as servers:
        print(TABLE.header(), flush=True)
        for size in args.sizes:
            for count in args.counts:
                for server in servers:
                    await server.settle()
                    row = await measure(server, count, size, args)
                    print(TABLE.row(row), flush=True)
                    rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for size, count in dict.fromkeys((r["size"], r["sessions"]) for r in rows):
        both = {r["server"]: r for r in rows if (r["size"], r["sessions"]) == (size, count)}
        if "livediff" in both and "baseline" in both:
            ours, theirs = both["livediff"], both["baseline"]
            found.append(
                {
                    "size": size,
                    "sessions": count,
                    **{
                        f"{key}_ratio": ratio(ours[key], theirs[key])
                        for key in ("fps_per_session", "latency_ms_p99", "server_cpu_ms_per_frame")
                    },
                }
            )
    return found


def plot(
    rows: list[dict[str, Any]], info: dict[str, Any], config: dict[str, Any], name: str
) -> None:
    plt = pyplot()
    figure, panels = plt.subplots(1, 3, figsize=(13, 4.2))
    panes = (
        ("fps_per_session", "frames out per second, per session (mean)", "linear"),
        ("latency_ms_p99", "p99 glass-to-glass latency, ms (log)", "log"),
        ("server_cpu_ms_per_frame", "server CPU ms per input frame", "linear"),
    )
    colours = {"livediff": "tab:blue", "baseline": "tab:orange"}
    markers = ["o", "s", "^", "D"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    counts = sorted({r["sessions"] for r in rows})
    for axes, (key, label, scale) in zip(panels, panes, strict=True):
        for server in ("livediff", "baseline"):
            for index, size in enumerate(sizes):
                chosen = sorted(
                    (r for r in rows if r["server"] == server and r["size"] == size),
                    key=lambda r: r["sessions"],
                )
                if not chosen:
                    continue
                axes.plot(
                    [r["sessions"] for r in chosen],
                    [r[key] for r in chosen],
                    marker=markers[index % len(markers)],
                    linestyle="-" if index == 0 else "--",
                    color=colours[server],
                    label=f"{server} {size}",
                )
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(c) for c in counts])
        axes.set_yscale(scale)
        axes.set_xlabel("concurrent sessions")
        axes.set_title(label)
        axes.grid(alpha=0.3, which="both")
    panels[0].axhline(30, color="0.5", linestyle=":", linewidth=0.8)
    panels[0].set_ylim(bottom=0)
    panels[2].set_ylim(bottom=0)
    panels[0].legend(loc="lower left")
    bitrates = ", livediff at aiortc's bitrates" if config.get("baseline_bitrates") else ""
    figure.suptitle(
        f"Sessions on one server, passthrough, 30 fps each ({config['codec'].upper()}{bitrates},"
        " client and server on the same cores)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    save_plot(figure, name, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(256, 256), (512, 512)])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    parser.add_argument(
        "--baseline-bitrates",
        action="store_true",
        help="livediff's encoders at aiortc's bitrates (as the baseline's); result sessions-*",
    )
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    name = NAME + ("-baseline-bitrates" if args.baseline_bitrates else "")
    if args.replot:
        saved = load_json(name)
        plot(saved["results"], saved["machine"], saved["config"], name)
        return
    print("per-session fps and glass-to-glass latency (ms); server CPU over the window")
    rows = asyncio.run(run(args))
    info = machine()
    found = ratios(rows)
    for r in found:
        print(
            f"livediff/baseline {r['size']} x{r['sessions']}: fps x{r['fps_per_session_ratio']},"
            f" p99 x{r['latency_ms_p99_ratio']}, CPU/frame x{r['server_cpu_ms_per_frame_ratio']}"
        )
    config = {
        **vars(args),
        "sizes": [f"{w}x{h}" for w, h in args.sizes],
        "fps_in": 30,
        "client_receiver": "marker",
        "pipeline": "passthrough",
    }
    if args.baseline_bitrates:
        config["livediff_env"] = baseline_bitrates(args.codec)
    path = save_json(name, info, config, rows, ratios=found)
    plot(rows, info, config, name)
    print(f"saved {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
