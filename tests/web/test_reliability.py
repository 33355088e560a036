"""The page and issue 12: a token in the URL fragment, and a session the server ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from livediff.testing.servers import LiveServer
from tests.server.faulty import FaultyTransform
from tests.web.conftest import PROMPT_TINT
from tests.web.pagekit import eventually, message_text, only_session, start_live

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def fresh_commands() -> Iterator[None]:
    FaultyTransform.reset()
    yield
    FaultyTransform.reset()


def test_a_token_in_the_fragment_is_used_and_leaves_the_address_bar(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline=PROMPT_TINT, width=128, height=128, token="frag-token")
    page = open_page(f"{server.url}/#token=frag-token")
    page.get_by_test_id("prompt").wait_for()
    assert page.evaluate("location.hash") == "" and page.evaluate("location.search") == ""
    assert page.evaluate("localStorage.getItem('livediff.token')") == "frag-token"
    start_live(page)
    only_session(server.service)


def test_the_page_says_why_the_server_ended_the_session(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline="tests.server.faulty:FaultyTransform", transform_error_limit=3)
    page = open_page(server.url)
    start_live(page)
    FaultyTransform.arm("raise", frames=10_000)
    eventually(
        lambda: "the server ended the session" in message_text(page),
        what="the end's reason on the page",
    )
    assert "failed on 3 frames in a row" in message_text(page)
