"""What the page says when things go wrong, and how it reads on a phone and by keyboard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from livediff.testing.servers import LiveServer
from tests.web.conftest import GATED_TINT, PROMPT_TINT
from tests.web.pagekit import eventually, message_text, only_session, start_live, wait_state
from tests.web.prompt_tint import GatedTint

pytestmark = pytest.mark.browser


def test_camera_denied_says_how_to_allow_it(
    server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(server.url, camera=False)
    page.get_by_test_id("start").click()
    assert "Camera access was denied" in message_text(page)
    wait_state(page, "idle")
    assert page.get_by_test_id("start").is_enabled()
    assert not server.service.records


def test_token_is_asked_for_and_then_used(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline=PROMPT_TINT, width=128, height=128, token="open-sesame")
    page = open_page(server.url)
    page.get_by_test_id("start").click()
    assert "needs an access token" in message_text(page)
    wait_state(page, "idle")

    page.locator("#message .message-action").click()
    page.get_by_test_id("token").fill("open-sesame")
    page.get_by_test_id("token-save").click()
    start_live(page)
    only_session(server.service)
    assert page.evaluate("localStorage.getItem('livediff.token')") == "open-sesame"

    # ?token= works too, and leaves the address bar (so it is not shared by accident).
    linked = open_page(f"{server.url}/?token=from-link")
    linked.get_by_test_id("prompt").wait_for()
    assert linked.evaluate("location.search") == ""
    assert linked.evaluate("localStorage.getItem('livediff.token')") == "from-link"


def test_missing_camera_says_so(server: LiveServer, open_page: Callable[..., Any]) -> None:
    page = open_page(server.url)
    page.get_by_test_id("prompt").or_(page.get_by_test_id("param-delay_ms")).wait_for()
    # A camera that was listed and has gone since (its id no longer opens anything).
    page.evaluate(
        """() => {
          const select = document.querySelector('[data-testid="camera"]');
          select.add(new Option("Unplugged camera", "no-such-camera"));
          select.value = "no-such-camera";
        }"""
    )
    page.get_by_test_id("start").click()
    assert "camera is not available any more" in message_text(page)
    wait_state(page, "idle")
    assert not server.service.records


def test_full_server_says_busy(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline=PROMPT_TINT, width=128, height=128, max_sessions=1)
    first = open_page(server.url)
    first.get_by_test_id("start").click()
    eventually(lambda: server.service.records, what="the first session")

    second = open_page(server.url)
    second.get_by_test_id("start").click()
    text = message_text(second)
    assert "cannot take a new session right now" in text
    assert "all 1 session slots are in use" in text
    assert "Try again in 5 s" in text
    wait_state(second, "idle")


def test_start_while_the_model_loads_waits_for_it(
    serve_loading: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve_loading(pipeline=GATED_TINT, width=128, height=128)
    assert server.service.engine.health() == "LOADING"
    page = open_page(server.url)
    page.get_by_test_id("start").click()
    assert "still loading" in message_text(page)
    wait_state(page, "idle")
    assert not server.service.records

    transform = server.service.engine.transform
    assert isinstance(transform, GatedTint)
    transform.gate.set()
    wait_state(page, "live")  # started by itself once the model was ready
    only_session(server.service)


def test_unreachable_server_is_named(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline=PROMPT_TINT, width=128, height=128)
    page = open_page(server.url)
    page.get_by_test_id("prompt").wait_for()
    server.stop()
    page.get_by_test_id("start").click()
    assert "Cannot reach the livediff server" in message_text(page)
    wait_state(page, "idle")


def test_phone_layout_and_keyboard_start(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any], artifacts: Path
) -> None:
    server = serve(pipeline=PROMPT_TINT, width=256, height=256)
    page = open_page(server.url, viewport=(390, 844))
    page.get_by_test_id("prompt").wait_for()

    # Keyboard only: Tab reaches Start, Enter presses it.
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.dataset.testid") == "start":
            break
    else:
        pytest.fail("Tab never reached the Start button")
    page.keyboard.press("Enter")
    wait_state(page, "live")
    only_session(server.service)

    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    for testid in ("output-video", "input-video", "start", "stop", "prompt", "stats"):
        box = page.get_by_test_id(testid).bounding_box()
        assert box is not None, f"{testid} is not shown"
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{testid} sticks out: {box}"
    page.screenshot(path=artifacts / "studio-phone.png", full_page=True)
