"""The image's two modes, checked without a Docker engine: the entry script's choice of command,
the Dockerfile's entry point, and the static Live Runner registration example."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.livepeer.airunner.test_image import instructions

REPO = Path(__file__).resolve().parents[3]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
RUNNERS = REPO / "docker" / "runners.json"


@pytest.fixture
def commands(tmp_path: Path) -> Path:
    """``livediff`` and ``livediff-airunner`` stand-ins that print how they were called."""
    for name in ("livediff", "livediff-airunner"):
        script = tmp_path / name
        script.write_text(f'#!/bin/sh\necho "{name} $*"\n')
        script.chmod(0o755)
    return tmp_path


def entry(commands: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{commands}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("env", "args", "runs"),
    [
        ({}, (), "livediff-airunner"),
        ({"LIVEDIFF_RUNNER": "ai-runner"}, ("livediff-airunner",), "livediff-airunner"),
        (
            {"LIVEDIFF_RUNNER": "native"},
            ("livediff-airunner",),
            "livediff runner --host 0.0.0.0 --port 8000",
        ),
        (
            {"LIVEDIFF_RUNNER": "native", "HOST": "127.0.0.1", "PORT": "9000"},
            ("livediff-airunner",),
            "livediff runner --host 127.0.0.1 --port 9000",
        ),
        (
            {"LIVEDIFF_RUNNER": "native", "PREPARE_MODELS": "1"},
            ("livediff-airunner",),
            "livediff-airunner",
        ),
        (
            {"LIVEDIFF_RUNNER": "native"},
            ("livediff-airunner", "--prepare-models"),
            "livediff-airunner --prepare-models",
        ),
        ({"LIVEDIFF_RUNNER": "native"}, ("livediff", "serve"), "livediff serve"),
        (
            {"LIVEDIFF_RUNNER": "live-runner"},
            ("livediff-airunner",),
            "livediff serve --host 0.0.0.0 --port 8000",
        ),
        (
            {"LIVEDIFF_RUNNER": "live-runner", "PREPARE_MODELS": "1"},
            ("livediff-airunner",),
            "livediff-airunner",
        ),
    ],
)
def test_the_entry_script_runs_the_chosen_face(
    commands: Path, env: dict[str, str], args: tuple[str, ...], runs: str
) -> None:
    done = entry(commands, *args, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == runs


def test_an_unknown_mode_is_refused(commands: Path) -> None:
    done = entry(commands, LIVEDIFF_RUNNER="both")
    assert done.returncode == 2 and "'ai-runner', 'native' or 'live-runner'" in done.stderr


def test_the_image_enters_through_the_script_and_defaults_to_ai_runner() -> None:
    found = instructions()
    assert ("ENTRYPOINT", '["/usr/local/bin/livediff-entrypoint"]') in found
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/livediff-entrypoint") in found
    env = " ".join(rest for keyword, rest in found if keyword == "ENV")
    assert "LIVEDIFF_RUNNER=ai-runner" in env
    assert os.access(ENTRYPOINT, os.X_OK)  # COPY keeps the mode: the image runs it as it is


def test_the_live_runner_example_registers_the_native_runners_ready_check() -> None:
    config = json.loads(RUNNERS.read_text())
    [runner] = config["runners"]
    assert {"label", "runner_url", "health_url", "app", "capacity", "price_info"} <= set(runner)
    assert runner["health_url"] == "/ready" and runner["healthy_status_code"] == 200
    assert runner["mode"] == "persistent" and runner["routing"] == "label"
    assert len(runner["metadata"].encode()) <= 1024  # go-livepeer's limit
