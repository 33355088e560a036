"""What the page's tests do and read in the browser, and how they wait for the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livediff.server.service import LivediffService, SessionRecord

#: Playback facts of a <video>: size, clock and frames decoded (standard APIs only).
PLAYBACK_JS = """(testid) => {
  const video = document.querySelector(`[data-testid="${testid}"]`);
  const quality = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  return {
    width: video.videoWidth,
    height: video.videoHeight,
    time: video.currentTime,
    frames: quality ? quality.totalVideoFrames : 0,
    paused: video.paused,
  };
}"""

ADVANCED_JS = """([testid, time, frames]) => {
  const video = document.querySelector(`[data-testid="${testid}"]`);
  const quality = video.getVideoPlaybackQuality();
  return video.videoWidth > 0 && video.currentTime > time && quality.totalVideoFrames > frames;
}"""

#: The mean RGB of the frame a <video> shows now, read back through a canvas.
MEAN_COLOUR_JS = """(testid) => {
  const video = document.querySelector(`[data-testid="${testid}"]`);
  const canvas = document.createElement("canvas");
  canvas.width = 32;
  canvas.height = 32;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(video, 0, 0, 32, 32);
  const data = context.getImageData(0, 0, 32, 32).data;
  const sums = [0, 0, 0];
  for (let i = 0; i < data.length; i += 4) {
    sums[0] += data[i];
    sums[1] += data[i + 1];
    sums[2] += data[i + 2];
  }
  return sums.map((total) => total / (data.length / 4));
}"""


@dataclass(frozen=True)
class Playback:
    width: int
    height: int
    time: float
    frames: int
    paused: bool


def playback(page: Any, testid: str = "output-video") -> Playback:
    return Playback(**page.evaluate(PLAYBACK_JS, testid))


def wait_playing(page: Any, testid: str = "output-video", timeout_ms: int = 20_000) -> Playback:
    """Waits until the video shows frames and keeps going: its clock and decoded frames rise."""
    page.wait_for_function(ADVANCED_JS, arg=[testid, 0, 0], timeout=timeout_ms, polling=100)
    first = playback(page, testid)
    page.wait_for_function(
        ADVANCED_JS,
        arg=[testid, first.time + 0.5, first.frames + 10],
        timeout=timeout_ms,
        polling=100,
    )
    return playback(page, testid)


def mean_colour(page: Any, testid: str = "output-video") -> tuple[float, float, float]:
    red, green, blue = page.evaluate(MEAN_COLOUR_JS, testid)
    return red, green, blue


def wait_state(page: Any, state: str, timeout_ms: int = 20_000) -> None:
    """Waits for the studio's state (body[data-state]): idle, connecting, live, reconnecting..."""
    page.wait_for_function(
        "(state) => document.body.dataset.state === state",
        arg=state,
        timeout=timeout_ms,
        polling=50,
    )


def start_live(page: Any) -> None:
    """Presses Start and waits until the restyled video plays."""
    page.get_by_test_id("start").click()
    wait_state(page, "live")
    wait_playing(page)


def eventually(
    check: Callable[[], Any], timeout_s: float = 10.0, what: str = "the condition"
) -> Any:
    """Polls ``check`` until it returns something truthy; fails naming ``what`` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def only_session(service: LivediffService) -> SessionRecord:
    """The one open session (fails if there are none or several)."""
    records = list(service.records.values())
    assert len(records) == 1, f"expected one open session, found {len(records)}"
    return records[0]


def message_text(page: Any) -> str:
    """The text of the page's message bar once it is visible."""
    message = page.get_by_test_id("message")
    message.wait_for(state="visible", timeout=15_000)
    return str(page.get_by_test_id("message-text").inner_text())
