"""``livediff runner``: the native runner as its own process, configured as go-livepeer does it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_idle(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            seen.append(str(httpx.get(f"{url}/health", timeout=5).json()["status"]))
        if seen and seen[-1] == "IDLE":
            break
        time.sleep(0.1)
    return seen


def test_livediff_runner_serves_the_contract_with_the_orchestrators_environment() -> None:
    port = free_port()
    env = {**os.environ, "MODEL_ID": "my-pipeline", "PIPELINE": "live-video-to-video"}
    command = [sys.executable, "-m", "livediff", "runner", "--pipeline", "passthrough"]
    command += ["--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        statuses = wait_idle(url, process)
        assert statuses and statuses[-1] == "IDLE", statuses
        version = httpx.get(f"{url}/version", timeout=5).json()
        assert version["model_id"] == "my-pipeline"
        refused = httpx.post(
            f"{url}/live-video-to-video",
            json={"subscribe_url": "http://x/a", "publish_url": "http://x/b", "model_id": "z"},
            timeout=5,
        )
        assert refused.status_code == 400 and "my-pipeline" in refused.json()["detail"]["msg"]
    finally:
        os.killpg(os.getpgid(process.pid), signal.SIGTERM)
        returncode = process.wait(30)
    assert returncode in (0, -signal.SIGTERM)


def test_the_runner_command_is_listed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "livediff", "--help"], capture_output=True, text=True, check=True
    )
    assert "runner" in done.stdout
