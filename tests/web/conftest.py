"""Fixtures for the page's tests: Debian's Chromium driven by Playwright, with a fake camera.

The camera is a .y4m file written here; Chromium plays it in a loop as its only video input.
One browser serves all the tests here; every test gets a fresh context (its own storage and
camera permission) and fails if the page threw an uncaught error.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livediff.config import Settings
from livediff.testing.servers import LiveServer, start_server
from tests.web.prompt_tint import DiffusionParamsTint, GatedTint, PromptTint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PROMPT_TINT = f"{PromptTint.__module__}:{PromptTint.__name__}"
DIFFUSION_PARAMS_TINT = f"{DiffusionParamsTint.__module__}:{DiffusionParamsTint.__name__}"
GATED_TINT = f"{GatedTint.__module__}:{GatedTint.__name__}"
CAMERA_SIZE = (320, 240)
CAMERA_FPS = 30


def write_y4m(path: Path, width: int, height: int, frames: int, fps: int) -> Path:
    """A colourful moving pattern as YUV 4:2:0 in a .y4m file (Chromium's fake camera format)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    half_y, half_x = y[::2, ::2], x[::2, ::2]
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            phase = 2 * np.pi * index / frames
            luma = (
                128
                + 60 * np.sin(x / 23 + phase) * np.cos(y / 31 - phase)
                + 40 * np.sin((x + y) / 41 + 2 * phase)
            )
            u = 128 + 70 * np.sin(half_x / 37 + phase)
            v = 128 + 70 * np.cos(half_y / 29 - phase)
            out.write(b"FRAME\n")
            for plane in (luma, u, v):
                out.write(np.clip(plane, 16, 240).astype(np.uint8).tobytes())
    return path


@pytest.fixture(scope="session")
def camera_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    width, height = CAMERA_SIZE
    folder = tmp_path_factory.mktemp("camera")
    return write_y4m(folder / "camera.y4m", width, height, frames=60, fps=CAMERA_FPS)


@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Any]:
    """Playwright (sync API) for this package: one per thread, so every browser launches here."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="package")
def browser(playwright_driver: Any, camera_file: Path) -> Iterator[Any]:
    """Headless Chromium with a fake camera, for the tests of this package; camera permission is
    given per context."""
    launched = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM), args=chromium_args(camera_file)
    )
    yield launched
    launched.close()


def chromium_args(camera_file: Path) -> list[str]:
    """Chromium's flags for the tests: no sandbox, and ``camera_file`` as the camera."""
    return [
        "--no-sandbox",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera_file}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ]


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Factory: ``open_page(url, camera=True, viewport=(1280, 800))`` -> a loaded Playwright page.

    Each page lives in its own context (fresh storage); the test fails if a page had an
    uncaught JavaScript error.
    """
    contexts: list[Any] = []
    errors: list[str] = []

    def _open(url: str, *, camera: bool = True, viewport: tuple[int, int] = (1280, 800)) -> Any:
        context = browser.new_context(
            permissions=["camera"] if camera else [],
            viewport={"width": viewport[0], "height": viewport[1]},
            accept_downloads=True,
        )
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(f"{url}: {error}"))
        page.goto(url)
        return page

    yield _open
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/web/ (git-ignored): screenshots and recordings the tests leave behind."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def copy_artifact(source: Path, artifacts: Path, name: str) -> Path:
    target = artifacts / name
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def serve_loading() -> Iterator[Callable[..., LiveServer]]:
    """Like ``serve``, but returns as soon as HTTP is up, while the transform may still load
    (GET /health says LOADING). A gated transform's gate is opened before the server stops."""
    started: list[LiveServer] = []

    def _serve(**overrides: Any) -> LiveServer:
        live = start_server(Settings(**overrides), wait_for_model=False)
        started.append(live)
        return live

    yield _serve
    for live in started:
        gate = getattr(live.service.engine.transform, "gate", None)
        if isinstance(gate, threading.Event):
            gate.set()
        live.stop()
