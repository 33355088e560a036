"""Health states, and the `livediff serve` command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from livediff.cli import build_parser, main, settings_from_args
from livediff.config import Settings
from livediff.engine import EngineUnavailableError
from livediff.server.service import LivediffService
from tests.server.faulty import GatedLoadTransform


async def test_health_reports_loading_then_idle() -> None:
    GatedLoadTransform.gate.clear()
    service = LivediffService(Settings(), transform=GatedLoadTransform(Settings()))
    loaded = service.engine.worker.start()
    try:
        assert service.engine.health() == "LOADING"
        with pytest.raises(EngineUnavailableError, match="loading"):
            service.engine.check_can_open()
        GatedLoadTransform.gate.set()
        loaded.result(10)
        assert service.engine.health() == "IDLE"
    finally:
        GatedLoadTransform.gate.set()
        await service.shutdown()


async def test_health_reports_error_when_the_model_cannot_load() -> None:
    class Broken(GatedLoadTransform):
        def load(self) -> None:
            raise OSError("weights missing")

    service = LivediffService(Settings(), transform=Broken(Settings()))
    with pytest.raises(OSError):
        service.engine.worker.start().result(10)
    try:
        assert service.engine.health() == "ERROR"
        with pytest.raises(EngineUnavailableError, match="weights missing"):
            service.engine.check_can_open()
    finally:
        await service.shutdown()


def test_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEDIFF_MAX_SESSIONS", "3")
    monkeypatch.setenv("LIVEDIFF_PORT", "9000")
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "8123",
            "--cors-origin",
            "https://a.example",
            "https://b.example",
            "--ice-server",
            "stun:stun.example.org",
            "--token",
            "abc",
            "--width",
            "256",
        ]
    )
    settings = settings_from_args(args)
    assert settings.port == 8123 and settings.max_sessions == 3 and settings.width == 256
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.ice_servers == ["stun:stun.example.org"]
    assert settings.token is not None and settings.token.get_secret_value() == "abc"


def test_bad_options_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--width", "100"]) == 2
    assert "invalid width" in capsys.readouterr().err
    assert main(["serve", "--pipeline", "nosuch"]) == 2
    assert "unknown pipeline 'nosuch'" in capsys.readouterr().err


def test_livediff_serve_runs_as_a_command() -> None:
    port = _free_port()
    env = {**os.environ, "LIVEDIFF_MAX_SESSIONS": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "livediff", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health").json()["status"]
                if status != "LOADING":
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert status == "IDLE"
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM (exit status -15).
        assert process.wait(20) in (0, -signal.SIGTERM)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_reliability_options_reach_the_settings() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--allow-model",
            "org/one",
            "--allow-model",
            "/models/two",
            "--log-format",
            "json",
            "--debug-endpoints",
            "--max-input-pixels",
            "921600",
            "--max-viewers",
            "2",
            "--session-rate",
            "12.5",
            "--session-burst",
            "3",
        ]
    )
    settings = settings_from_args(args)
    assert settings.allow_models == ["org/one", "/models/two"]
    assert settings.log_format == "json" and settings.debug_endpoints
    assert (settings.max_input_pixels, settings.max_viewers) == (921_600, 2)
    assert (settings.session_rate_per_min, settings.session_burst) == (12.5, 3)
    assert settings_from_args(build_parser().parse_args(["serve"])).allow_models == []
