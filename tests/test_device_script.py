"""The GPU run (benchmarks/device/run.sh) and the engine benchmark it runs, checked on the CPU.

The benchmark swaps the transform's stage clock on the worker thread only (issue 18, defect 7:
from the event loop it raced with the batch in flight); a case whose session the engine ends, or
that gives no result in time, fails with its reason and the run goes on; and the script's dry run
writes every file the GPU run writes, with well-formed rows.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from livediff.engine import Engine
from livediff.engine.threads import THREAD_CHECKS, WrongThreadError

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "benchmarks" / "device" / "run.sh"
SIZE = 64


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/gpu_engine.py as a module (benchmarks/ is no package)."""
    if str(REPO / "benchmarks") not in sys.path:  # its sibling engine_cases, as when run
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_engine", REPO / "benchmarks/gpu_engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def arguments(bench: ModuleType, tmp_path: Path, *extra: str) -> Any:
    args = bench.parse(["--device", "cpu", "--size", str(SIZE), "--controlnets", *extra])
    args.depth_model = str(tmp_path / "no-depth-model")  # no case here uses one
    args.ip_adapter_folder = tmp_path / "ip-adapter"
    return args


@pytest.fixture
async def engine(bench: ModuleType, tmp_path: Path) -> AsyncIterator[Engine]:
    """The benchmark's eager engine on the tiny random model, 64 px, up to 2 sessions."""
    args = arguments(bench, tmp_path, "--sessions", "1", "2")
    report = bench.Report(tmp_path / "load.json", {}, {})
    started = await bench.start_engine(args, False, report)
    assert started is not None, report.data["failed"]
    yield started
    await started.stop()


def one_step(bench: ModuleType, sessions: int) -> Any:
    return bench.Case("steps=1", {"t_index_list": bench.STEP_INDICES[1]}, sessions)


async def test_the_stage_clock_is_swapped_on_the_worker_thread(
    bench: ModuleType, engine: Engine
) -> None:
    unet_batch: Any = engine.transform.unet_batch  # type: ignore[attr-defined]
    swapped_on: list[str] = []

    class Recorded(type(unet_batch)):  # type: ignore[misc]
        """Records the thread of every write of ``clock``."""

        @property
        def clock(self) -> Any:
            return self.__dict__["clock"]

        @clock.setter
        def clock(self, value: Any) -> None:
            swapped_on.append(threading.current_thread().name)
            self.__dict__["clock"] = value

    unet_batch.__class__ = Recorded
    row = await bench.measure(engine, one_step(bench, 2), bench.camera(SIZE), 3)
    assert swapped_on == ["livediff-worker", "livediff-worker"]  # on, then off
    assert unet_batch.clock is None
    assert {"upload", "frame"} <= row["stages_ms"].keys()  # two plain sessions: a frame graph
    assert row["sessions"] == 2 and row["failed_frames"] == 0 and row["fps_total"] > 0


@pytest.mark.skipif(not THREAD_CHECKS, reason="thread checks are off (python -O)")
async def test_the_stage_clock_is_refused_from_the_event_loop(
    bench: ModuleType, engine: Engine
) -> None:
    with pytest.raises(WrongThreadError, match="set_stage_clock runs on the worker thread only"):
        bench.set_stage_clock(engine, None)


async def test_a_case_whose_session_the_engine_ends_fails_with_the_reason(
    bench: ModuleType, engine: Engine, tmp_path: Path
) -> None:
    def missing_package(jobs: list[Any]) -> list[Any]:
        raise ModuleNotFoundError("No module named 'kornia'")

    await engine.on_worker(lambda: setattr(engine.transform, "process", missing_package))
    args = arguments(bench, tmp_path, "--steps", "1", "--sessions", "1", "2")
    report = bench.Report(tmp_path / "rows.json", {}, {})
    await asyncio.wait_for(bench.measure_cases(engine, args, False, report), 60)
    written = json.loads(report.path.read_text())
    assert [row["case"] for row in written["failed"]] == ["steps=1", "sessions=2"]
    for row in written["failed"]:
        assert row["error"] == (
            f"session ended: the transform failed on {bench.ERROR_LIMIT} frames in a row:"
            " ModuleNotFoundError(\"No module named 'kornia'\")"
        )
    assert written["livediff"] == []


async def test_a_case_without_a_result_in_time_fails_and_the_next_one_runs(
    bench: ModuleType, engine: Engine, tmp_path: Path
) -> None:
    process = engine.transform.process

    def holding_two_steps(jobs: list[Any]) -> list[Any]:
        """Outputs of 2-step sessions never come (the worker itself stays responsive)."""
        images = process(jobs)
        return [
            None if len(job.params.t_index_list) == 2 else image
            for job, image in zip(jobs, images, strict=True)
        ]

    await engine.on_worker(lambda: setattr(engine.transform, "process", holding_two_steps))
    args = arguments(bench, tmp_path, "--steps", "2", "--sessions", "1", "2", "--frames", "2")
    # the held case waits it out; the next one takes under 1 s alone, seconds on a loaded machine
    args.row_timeout = 10.0
    report = bench.Report(tmp_path / "rows.json", {}, {})
    await asyncio.wait_for(bench.measure_cases(engine, args, False, report), 60)
    assert report.data["failed"] == [
        {"case": "steps=2", "compiled": False, "error": "no result within 10.0 s"}
    ]
    assert [row["case"] for row in report.data["livediff"]] == ["sessions=2"]


def run_script(
    out: Path, *options: str, frames: int = 2, threads: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "FRAMES": str(frames)}
    if threads is not None:  # torch's threads in each step, unless the caller chose
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return subprocess.run(
        ["bash", str(RUN_SH), *options],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("suite", ["engine", "next", "models", "video", "compiled", "frame"])
def test_each_suite_fits_the_deadline(suite: str, tmp_path: Path) -> None:
    done = run_script(tmp_path, "--plan", "--suite", suite)
    assert done.returncode == 0, done.stdout + done.stderr
    planned = re.search(
        r"^plan: setup \(30 s\), .+: (\d+) s$", (tmp_path / "run.txt").read_text(), re.M
    )
    assert planned is not None
    assert int(planned.group(1)) <= 450


def test_an_unknown_suite_is_refused(tmp_path: Path) -> None:
    done = run_script(tmp_path, "--suite", "nope", "--dry-run")
    assert done.returncode == 2
    assert "no suite 'nope'" in done.stderr


ROW_KEYS = {"case", "sessions", "steps", "fps_total", "ms_per_frame", "stages_ms", "compiled"}


def check_report(path: Path, compiled: bool) -> dict[str, Any]:
    report = json.loads(path.read_text())
    assert report["failed"] == []
    assert report["livediff"], f"no rows in {path.name}"
    for row in report["livediff"]:
        assert row.keys() >= ROW_KEYS
        assert row["compiled"] is compiled
        assert row["fps_total"] > 0 and row["ms_per_frame"] > 0 and row["failed_frames"] == 0
        check_stages(row, report["config"]["frame_graph_steps"] if compiled else None)
    return report


def check_stages(row: dict[str, Any], planned_steps: list[int] | None) -> None:
    """A row's stages are the staged path's (encode, UNet, decode) or a frame graph's: the
    frame graph's when it is on, the case is plain and its step count has a frame graph
    (``planned_steps``; None: every one, as eager)."""
    stages = row["stages_ms"].keys()
    staged, framed = {"encode", "unet", "decode"} <= stages, "frame" in stages
    assert staged != framed, f"{row['case']}: stages {sorted(stages)}"
    plain = row.get("controlnets", "none") == "none" and not row["case"].startswith("ip")
    planned = planned_steps is None or row["steps"] in planned_steps
    assert framed == (row["frame_graph"] and plain and planned), row


#: The suites whose dry runs the tests below check, in their order (a suite missing here that a
#: test names runs after these).
DRY_RUN_ORDER = ("engine", "next", "models", "compiled", "video", "frame")
#: The longest dry run (the video suite's: a third of the five's time, one after the other):
#: started first when runs go side by side, so that the others fill the other core meanwhile.
LONGEST_DRY_RUN = "video"


def dry_run_options(suite: str) -> tuple[str, ...]:
    """The engine suite's dry run as a person runs it (the default suite), the others by name."""
    return ("--dry-run",) if suite == "engine" else ("--dry-run", "--suite", suite)


def checks_dry_run(suite: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Marks a test as one that checks SUITE's dry run (the ``dry_runs`` fixture runs it)."""

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.dry_run_suite = suite  # type: ignore[attr-defined]
        return test

    return mark


class DryRuns:
    """The dry runs of the suites whose tests were selected, all started at once and run
    ``workers`` at a time, each in its own folder.

    A dry run keeps about one core busy (python start-up and tiny models: user time is its wall
    time), so on 2 cores two side by side take about half the time of one after the other, each
    with one torch thread (not two each: four threads would share the 2 cores)."""

    def __init__(self, suites: list[str], folders: dict[str, Path]) -> None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.workers = max(1, min(len(suites), cores))
        if self.workers > 1:  # the longest first (one at a time: in the tests' order, so that
            # each test waits for its own run only)
            suites = sorted(suites, key=lambda suite: suite != LONGEST_DRY_RUN)
        self.folders = folders
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dry-run")
        threads = max(1, cores // self.workers)
        self.runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {
            suite: self.pool.submit(
                run_script, folders[suite], *dry_run_options(suite), threads=threads
            )
            for suite in suites
        }

    def result(self, suite: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        """The finished run of SUITE and its folder: the test's own wait."""
        return self.runs[suite].result(), self.folders[suite]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def dry_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DryRuns]:
    """At the first dry-run test: the dry runs of every suite a selected test checks."""
    wanted = {getattr(item, "function", None) for item in request.session.items}
    checked = {getattr(test, "dry_run_suite", "") for test in wanted} - {""}
    suites = [suite for suite in DRY_RUN_ORDER if suite in checked]
    suites += sorted(checked - set(suites))
    folders = {suite: tmp_path_factory.mktemp(f"dry-run-{suite}") for suite in suites}
    runs = DryRuns(suites, folders)
    yield runs
    runs.close()


def finished(dry_runs: DryRuns, suite: str) -> Path:
    """The folder of SUITE's dry run, once it ended well."""
    done, out = dry_runs.result(suite)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


@pytest.mark.slow
@checks_dry_run("engine")
def test_the_dry_run_writes_every_file_with_well_formed_rows(dry_runs: DryRuns) -> None:
    out = finished(dry_runs, "engine")
    assert sorted(path.name for path in out.iterdir()) == [
        "engine-compiled.json",
        "engine-compiled.txt",
        "engine-eager.json",
        "engine-eager.txt",
        "run.txt",
        "tests.txt",
    ]
    steps = (out / "run.txt").read_text()
    for name in ("tests", "engine-eager", "engine-compiled"):
        assert any(line.startswith(name) and line.endswith(" ok") for line in steps.splitlines())
    eager = check_report(out / "engine-eager.json", compiled=False)
    cases = [row["case"] for row in eager["livediff"]]
    assert "controlnets=canny+depth" in cases and "sessions=8" in cases
    assert [row["steps"] for row in eager["diffusers"]] == [1, 2, 4]
    compiled = check_report(out / "engine-compiled.json", compiled=True)
    assert [row["case"] for row in compiled["livediff"]] == [
        "steps=1",
        "steps=2",
        "steps=4",
        "sessions=2",
        "sessions=4",
    ]
    assert compiled["config"]["buckets"] == [1, 4]


@pytest.mark.slow
@checks_dry_run("next")
def test_the_next_suites_dry_run_measures_every_temporal_setting(dry_runs: DryRuns) -> None:
    out = finished(dry_runs, "next")
    assert sorted(path.name for path in out.iterdir()) == [
        "engine-compiled-2-8.json",
        "engine-compiled-2-8.txt",
        "fp8.json",
        "fp8.txt",
        "run.txt",
        "temporal.json",
        "temporal.png",
        "temporal.txt",
    ]
    check_report(out / "engine-compiled-2-8.json", compiled=True)
    fp8 = check_report(out / "fp8.json", compiled=False)
    assert [row["unet"] for row in fp8["livediff"]] == ["bf16", "fp8"]
    assert fp8["fp8_layers"]["linears"] > 0 and fp8["fp8"][0]["psnr_db"] > 0
    temporal = json.loads((out / "temporal.json").read_text())
    rows = {row["setting"]: row for row in temporal["results"]}
    assert {"off", "bank-1", "bank-2", "bank-4", "temporalnet", "motion-noise"} <= rows.keys()
    for name, row in rows.items():
        assert row["ms_per_frame"] > 0, (name, row)
        assert "failed" not in row and "skipped" not in row, (name, row)


@pytest.mark.slow
@checks_dry_run("models")
def test_the_models_suites_dry_run_measures_sdxl(dry_runs: DryRuns) -> None:
    out = finished(dry_runs, "models")
    assert sorted(path.name for path in out.iterdir()) == [
        "lora.json",
        "lora.txt",
        "run.txt",
        "sdxl-1024.json",
        "sdxl-1024.txt",
        "sdxl-512.json",
        "sdxl-512.txt",
    ]
    small = check_report(out / "sdxl-512.json", compiled=False)
    assert small["config"]["preset"] == "tiny-sdxl"
    cases = [row["case"] for row in small["livediff"]]
    assert {"controlnets=canny", "ip_adapter=on", "sessions=4"} <= set(cases)
    assert [row["steps"] for row in small["diffusers"]] == [1]
    large = check_report(out / "sdxl-1024.json", compiled=False)
    assert large["config"]["size"] == 128 and not large.get("diffusers")
    lora = json.loads((out / "lora.json").read_text())["results"]
    assert lora["fused_recompiles"] == 0 and lora["fused_unet_ms"] > 0


@pytest.mark.slow
@checks_dry_run("compiled")
def test_the_compiled_suites_dry_run_measures_compiled_controlnets_and_fp8(
    dry_runs: DryRuns,
) -> None:
    out = finished(dry_runs, "compiled")
    assert sorted(path.name for path in out.iterdir()) == [
        "compiled-controlnets.json",
        "compiled-controlnets.txt",
        "fp8-compiled.json",
        "fp8-compiled.txt",
        "run.txt",
    ]
    controls = check_report(out / "compiled-controlnets.json", compiled=True)
    rows = {row["case"]: row for row in controls["livediff"]}
    assert {"controlnets=none", "controlnets=canny", "sessions=4"} <= rows.keys()
    assert rows["controlnets=canny"]["stages_ms"]["controlnet"] > 0
    assert controls["config"]["buckets"] == [1, 4]
    fp8 = check_report(out / "fp8-compiled.json", compiled=True)
    assert [row["unet"] for row in fp8["livediff"]] == ["bf16", "fp8"]
    assert fp8["fp8"][0]["compiled"] is True and fp8["fp8"][0]["psnr_db"] > 0


VIDEO_ROW_KEYS = {
    "case",
    "mode",
    "size",
    "steps",
    "sessions",
    "fps_per_session",
    "fps_total",
    "chunk_ms_p50",
    "first_chunk_ms",
    "first_frame_ms",
    "gpu_memory_gib",
    "dropped",
    "failed_frames",
}


@pytest.mark.slow
@checks_dry_run("video")
def test_the_video_suites_dry_run_measures_every_case(dry_runs: DryRuns) -> None:
    out = finished(dry_runs, "video")
    assert sorted(path.name for path in out.iterdir()) == [
        "run.txt",
        "video-480x832.json",
        "video-480x832.txt",
        "video-512.json",
        "video-512.txt",
    ]
    for name, size in (("video-480x832", "64x112"), ("video-512", "64x64")):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["failed"] == [] and report["config"]["preset"] == "tiny"
        assert report["load"]["load_s"] > 0
        rows = report["results"]
        rules = ("clean", "last_step") if name == "video-480x832" else ("clean",)
        assert [(r["mode"], r["cache_write"], r["steps"], r["sessions"]) for r in rows] == [
            (mode, rule, steps, sessions)
            for mode in ("saturating", "source")
            for rule in rules
            if rule == "clean" or mode == "saturating"
            for steps in (1, 4)
            for sessions in (1, 2)
        ]
        for row in rows:
            assert row.keys() >= VIDEO_ROW_KEYS, row
            assert row["size"] == size and row["failed_frames"] == 0
            assert row["fps_per_session"] > 0 and row["chunk_ms_p50"] > 0
            assert row["fps_total"] == pytest.approx(row["fps_per_session"] * row["sessions"], 0.01)
            assert 0 < row["first_chunk_ms"] < row["first_frame_ms"]
            assert row["gpu_memory_gib"] is None  # the CPU
            assert row["source_fps"] == (24.0 if row["mode"] == "source" else None)


@pytest.mark.slow
@checks_dry_run("frame")
def test_the_frame_suites_dry_run_measures_each_engine_with_the_frame_graph_off_and_on(
    dry_runs: DryRuns,
) -> None:
    out = finished(dry_runs, "frame")
    assert sorted(path.name for path in out.iterdir()) == [
        "frame-compiled.json",
        "frame-compiled.txt",
        "frame-eager.json",
        "frame-eager.txt",
        "run.txt",
    ]
    for name, compiled in (("frame-eager", False), ("frame-compiled", True)):
        report = check_report(out / f"{name}.json", compiled=compiled)
        rows = report["livediff"]
        assert [row["frame_graph"] for row in rows] == [False] * (len(rows) // 2) + [True] * (
            len(rows) // 2
        )
        assert all("frame" in row["stages_ms"] for row in rows if row["frame_graph"])
        assert set(report["load_s"]) == {
            f"{'compiled' if compiled else 'eager'}-staged",
            "compiled" if compiled else "eager",
        }
