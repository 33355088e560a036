"""The studio page in headless Chromium against a real livediff server: a live session's life.

The server runs PromptTint (tests/web/prompt_tint.py), a real transform that tints frames by a
hash of the prompt, so a prompt typed in the page is checked twice: in the session's params on
the server and in the colour of the video that comes back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from livediff.testing.servers import LiveServer
from tests.web.conftest import DIFFUSION_PARAMS_TINT, PROMPT_TINT
from tests.web.pagekit import (
    eventually,
    mean_colour,
    only_session,
    start_live,
    wait_playing,
    wait_state,
)
from tests.web.prompt_tint import tint_colour

pytestmark = pytest.mark.browser

OUTPUT_SIZE = 256
#: What each line of the stats overlay must show once the session runs.
STATS_PATTERNS = {
    "fps_out": r"^\d+\.\d fps$",
    "fps_in": r"^\d+\.\d fps$",
    "latency": r"^\d+ ms$",
    "rtt": r"^\d+\.\d ms$",
    "bitrate": r"^↓ [\d.]+ [kM]b/s ↑ [\d.]+ [kM]b/s$",
    "dropped": r"^\d+$",
}
STATS_SHOW_NUMBERS_JS = """(patterns) => Object.entries(patterns).every(([key, pattern]) => {
  const value = document.querySelector(`[data-testid="stats"] [data-stat="${key}"] dd`);
  return value !== null && new RegExp(pattern).test(value.textContent);
})"""


@pytest.fixture
def tint_server(serve: Callable[..., LiveServer]) -> LiveServer:
    return serve(pipeline=PROMPT_TINT, width=OUTPUT_SIZE, height=OUTPUT_SIZE)


def stat_value(page: Any, key: str) -> str:
    return str(page.locator(f'[data-testid="stats"] [data-stat="{key}"] dd').inner_text())


def distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return math.dist(a, b)


def test_live_session_plays_with_stats(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any], artifacts: Path
) -> None:
    # The diffusion pipeline's own params (and so its full panel), on a tinting transform.
    server = serve(pipeline=DIFFUSION_PARAMS_TINT, width=OUTPUT_SIZE, height=OUTPUT_SIZE)
    page = open_page(server.url, viewport=(1440, 900))
    page.get_by_test_id("prompt").fill("ink wash mountains")
    start_live(page)

    output = wait_playing(page, "output-video")
    camera = wait_playing(page, "input-video")
    assert (output.width, output.height) == (OUTPUT_SIZE, OUTPUT_SIZE)
    assert (camera.width, camera.height) == (320, 240)
    # The prompt typed before Start is the session's initial params.
    assert only_session(server.service).session.params.prompt == "ink wash mountains"

    stats = page.get_by_test_id("stats")
    stats.wait_for(state="visible")
    page.wait_for_function(STATS_SHOW_NUMBERS_JS, arg=STATS_PATTERNS, timeout=10_000, polling=200)
    assert float(stat_value(page, "fps_out").split()[0]) > 0
    assert float(stat_value(page, "fps_in").split()[0]) > 0
    page.screenshot(path=artifacts / "studio-live.png")


def test_prompt_change_reaches_server_and_pixels(
    tint_server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(tint_server.url)
    start_live(page)
    record = only_session(tint_server.service)
    old_colour, new_colour = tint_colour(""), tint_colour("neon tiger")
    assert distance(old_colour, new_colour) > 80, "pick prompts whose tints differ clearly"

    page.get_by_test_id("param-strength").fill("1")
    page.get_by_test_id("prompt").fill("neon tiger")
    eventually(
        lambda: (
            record.session.params.prompt == "neon tiger" and record.session.params.strength == 1.0
        ),
        what="the prompt and strength to reach the session",
    )
    # The same session (no reconnect), and the video now has the new prompt's colour.
    assert only_session(tint_server.service) is record
    eventually(
        lambda: distance(mean_colour(page), new_colour) < 30,
        what=f"the output to turn {new_colour} (it is {mean_colour(page)})",
    )

    # A value the server refuses: its message appears next to the control, nothing changes.
    page.locator('details[data-group="Output"] > summary').click()  # folded by default
    page.get_by_test_id("param-width").fill("300")
    page.get_by_test_id("param-width").press("Enter")
    error = page.get_by_test_id("error-width")
    error.wait_for(state="visible", timeout=10_000)
    assert "multiple of 8" in error.inner_text()
    assert record.session.params.width == OUTPUT_SIZE
    assert page.evaluate("document.body.dataset.state") == "live"


def test_fullscreen_then_stop_releases_the_session(
    tint_server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(tint_server.url)
    start_live(page)
    only_session(tint_server.service)
    page.get_by_test_id("fullscreen").click()
    page.wait_for_function("document.fullscreenElement?.id === 'output-screen'", timeout=5_000)
    page.keyboard.press("f")
    page.wait_for_function("document.fullscreenElement === null", timeout=5_000)

    page.get_by_test_id("stop").click()
    wait_state(page, "idle")
    eventually(lambda: not tint_server.service.records, what="the server to close the session")
    released = page.evaluate(
        """() => ({
          input: document.querySelector('[data-testid="input-video"]').srcObject,
          output: document.querySelector('[data-testid="output-video"]').srcObject,
          startEnabled: !document.querySelector('[data-testid="start"]').disabled,
        })"""
    )
    assert released == {"input": None, "output": None, "startEnabled": True}


def test_lost_connection_reconnects(tint_server: LiveServer, open_page: Callable[..., Any]) -> None:
    page = open_page(tint_server.url)
    page.get_by_test_id("prompt").fill("still here")
    start_live(page)
    first = only_session(tint_server.service).id

    response = httpx.delete(f"{tint_server.url}/v1/sessions/{first}")
    assert response.status_code == 204
    wait_state(page, "reconnecting", timeout_ms=10_000)
    assert "Reconnecting (1/3)" in page.get_by_test_id("message-text").inner_text()

    wait_state(page, "live", timeout_ms=20_000)
    wait_playing(page)
    second = only_session(tint_server.service)
    assert second.id != first
    assert second.session.params.prompt == "still here"


def test_record_downloads_a_playable_webm(
    tint_server: LiveServer, open_page: Callable[..., Any], artifacts: Path
) -> None:
    page = open_page(tint_server.url)
    start_live(page)
    page.get_by_test_id("record").click()
    page.wait_for_function(
        "() => document.querySelector('#rec-time').textContent >= '00:02'", timeout=10_000
    )
    with page.expect_download(timeout=10_000) as download_info:
        page.get_by_test_id("record").click()
    download = download_info.value
    assert download.suggested_filename.startswith("livediff-")
    assert download.suggested_filename.endswith(".webm")
    saved = artifacts / "recording.webm"
    download.save_as(saved)

    assert saved.read_bytes()[:4] == b"\x1a\x45\xdf\xa3", "not a WebM (EBML) file"
    with av.open(str(saved)) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert len(frames) >= 10
    assert (frames[-1].width, frames[-1].height) == (OUTPUT_SIZE, OUTPUT_SIZE)


def test_share_link_opens_a_whep_viewer(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any], artifacts: Path
) -> None:
    # PromptTint returns RGB frames, which the publisher's and the viewer's encoders share: this
    # once crashed the server (two threads converting one frame); it is converted once now.
    server = serve(pipeline=PROMPT_TINT, width=OUTPUT_SIZE, height=OUTPUT_SIZE)
    page = open_page(server.url)
    start_live(page)
    record = only_session(server.service)

    page.get_by_test_id("share").click()
    link = page.get_by_test_id("share-link").input_value()
    assert link == f"{server.url}/watch.html?session={record.id}"

    viewer = page.context.new_page()
    viewer.goto(link)
    played = wait_playing(viewer)
    assert (played.width, played.height) == (OUTPUT_SIZE, OUTPUT_SIZE)
    assert len(record.viewers) == 1
    viewer.get_by_test_id("viewer-stats").filter(has_text="fps").wait_for(timeout=5_000)
    viewer.screenshot(path=artifacts / "viewer.png")
