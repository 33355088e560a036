"""The ``livediff-airunner`` entry point: the spec it builds, prepare mode and serve mode."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from runner.live.pipelines import PipelineSpec
from runner.live.pipelines.loader import load_pipeline_class, parse_pipeline_params

from livediff.livepeer.airunner.main import PIPELINE_NAME, build_spec
from livediff.livepeer.airunner.params import runner_settings
from tests.livepeer.airunner.conftest import USING_DOUBLE, run_runner, runner_env


def runner_command() -> list[str]:
    """The installed console script, else the module (an install older than the script)."""
    script = shutil.which("livediff-airunner", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "livediff.livepeer.airunner"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_spec_names_livediff_and_its_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEDIFF_PIPELINE", "passthrough")
    spec = build_spec()
    assert isinstance(spec, PipelineSpec)
    assert spec.name == PIPELINE_NAME == "livediff"
    assert load_pipeline_class(spec.pipeline_cls).__name__ == "LivediffPipeline"
    assert spec.initial_params == {"width": 512, "height": 512, "delay_ms": 0.0}
    parsed = parse_pipeline_params(spec, spec.initial_params)
    assert type(parsed).__name__ == "PassthroughRunnerParams"


def test_a_transform_without_a_runner_params_class_uses_ai_runners_base(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIVEDIFF_PIPELINE", "tests.livepeer.airunner.transforms:GainTransform")
    spec = build_spec(runner_settings())
    assert spec.params_cls is None
    assert spec.initial_params == {
        "width": 512,
        "height": 512,
        "gain": 1.0,
        "model": "dim",
        "fail": False,
    }


def test_prepare_mode_prepares_into_model_dir_online_and_exits(tmp_path: Path) -> None:
    done = run_runner(
        runner_command(),
        PREPARE_MODELS="1",
        HF_HUB_OFFLINE="1",  # as the image sets it: prepare mode must go online anyway
        MODEL_DIR=str(tmp_path),
        LIVEDIFF_PIPELINE="tests.livepeer.airunner.transforms:PreparedTransform",
    )
    assert done.returncode == 0, done.stderr
    expected = {"model": "stabilityai/sd-turbo", "hf_hub_offline": "0"}
    for step in ("prepared", "loaded"):  # the transform's hook, then one load and warm-up
        assert json.loads((tmp_path / f"{step}.json").read_text()) == expected, step
    assert (
        "the tests.livepeer.airunner.transforms:PreparedTransform transform is prepared"
        in done.stderr
    )


def test_serve_mode_loads_the_pipeline_and_reports_idle(tmp_path: Path) -> None:
    port = free_port()
    env = runner_env(HOST="127.0.0.1", PORT=str(port), LIVEDIFF_PIPELINE="passthrough")
    log = tmp_path / "runner.log"
    with log.open("w") as sink:
        # its own process group: the real ai-runner serves the pipeline from a child process
        # (infer.py on port 8888), which must end with it
        process = subprocess.Popen(
            runner_command(), env=env, stdout=sink, stderr=sink, start_new_session=True
        )
        try:
            statuses = poll_health(f"http://127.0.0.1:{port}/health", process)
        finally:
            returncode = end_group(process)
    output = log.read_text()
    assert statuses[-1] == "IDLE", output
    assert set(statuses) <= {"LOADING", "IDLE"}, output
    # uvicorn shuts down gracefully on SIGTERM, then ends by that signal (newer releases)
    assert returncode in (0, -signal.SIGTERM), output
    if USING_DOUBLE:  # the double runs the pipeline in this process, so its log shows here
        assert "livediff pipeline stopped" in output


def end_group(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM to the process's whole group, then SIGKILL to whatever is left; its exit code."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        returncode = process.wait(10)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the runner
        os.killpg(group, signal.SIGKILL)
    return returncode


#: ai-runner's /health answer while its pipeline process is not answering yet.
NOT_UP_YET = {"detail": {"msg": "Failed to retrieve pipeline status."}}


def poll_health(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> list[str]:
    """Statuses seen until IDLE (or the process ends, or time runs out). Connection errors and
    ai-runner's 500 "Failed to retrieve pipeline status." mean it is not up yet."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            response = httpx.get(url, timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code == 500 and response.json() == NOT_UP_YET:
            time.sleep(0.1)
            continue
        assert response.status_code == 200, response.text
        status = str(response.json()["status"])
        seen.append(status)
        if status == "IDLE":
            break
        time.sleep(0.1)
    return seen


def test_an_unknown_pipeline_is_a_clear_error() -> None:
    done = run_runner(runner_command(), LIVEDIFF_PIPELINE="stable-dreams")
    assert done.returncode == 2
    assert "livediff-airunner: unknown pipeline 'stable-dreams'" in done.stderr
