"""The studio over HTTPS (``--tls-cert``/``--tls-key``), as a creator on another machine uses it.

Browsers give the camera only to secure pages, so away from localhost the studio must be served
over https. Chromium here trusts the test's self-signed certificate by its public key
(``--ignore-certificate-errors-spki-list``), which keeps the page a secure context: the camera,
the API and WHIP/WHEP all go through the one TLS port.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livediff.server.tls import LOCAL_NAMES, SelfSigned, write_self_signed
from livediff.testing.servers import LiveServer
from tests.web.conftest import CHROMIUM, PROMPT_TINT, chromium_args
from tests.web.pagekit import eventually, mean_colour, only_session, start_live
from tests.web.prompt_tint import tint_colour

pytestmark = pytest.mark.browser

OUTPUT_SIZE = 256
PROMPT = "neon tiger"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    folder = tmp_path_factory.mktemp("tls")
    return write_self_signed(folder / "cert.pem", folder / "key.pem", LOCAL_NAMES, days=1)


@pytest.fixture(scope="module")
def browser(playwright_driver: Any, camera_file: Path, certificate: SelfSigned) -> Iterator[Any]:
    """This module's Chromium: the package's, trusting the test certificate's public key."""
    trust = f"--ignore-certificate-errors-spki-list={certificate.spki_sha256}"
    launched = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM), args=[*chromium_args(camera_file), trust]
    )
    yield launched
    launched.close()


def test_the_studio_streams_over_https(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any], certificate: SelfSigned
) -> None:
    server = serve(
        pipeline=PROMPT_TINT,
        width=OUTPUT_SIZE,
        height=OUTPUT_SIZE,
        tls_cert=str(certificate.cert),
        tls_key=str(certificate.key),
    )
    assert server.url.startswith("https://")
    page = open_page(server.url)
    assert page.url.startswith("https://") and page.evaluate("window.isSecureContext")
    page.get_by_test_id("prompt").fill(PROMPT)
    start_live(page)  # the camera, POST /v1/sessions and the processed video, all over https

    record = only_session(server.service)
    assert record.session.params.model_dump()["prompt"] == PROMPT
    page.get_by_test_id("param-strength").fill("1")  # live, over the params data channel
    colour = tint_colour(PROMPT)
    eventually(
        lambda: math.dist(mean_colour(page), colour) < 30,
        what=f"the output to turn {colour} (it is {mean_colour(page)})",
    )
    assert record.session.stats.frames_processed > 0
