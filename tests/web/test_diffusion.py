"""The studio driving the real diffusion pipeline (a tiny random model saved in diffusers layout,
loaded as a user's --model folder would be)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from livediff.testing.models import ModelFolders, tiny_options, write_model_folder
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.transform import DiffusionTransform
from tests.web.pagekit import eventually, only_session, start_live

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SIZE = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFolders:
    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


def test_the_studio_drives_the_diffusion_pipeline(
    serve: Callable[..., LiveServer], tiny_model: ModelFolders, open_page: Callable[..., Any]
) -> None:
    server = serve(**tiny_options(tiny_model, SIZE))
    transform = server.service.engine.transform
    assert isinstance(transform, DiffusionTransform)
    page = open_page(server.url)
    page.get_by_test_id("prompt").fill("a watercolour harbour")
    page.get_by_test_id("param-t_index_list").fill("20, 35")
    start_live(page)
    record = only_session(server.service)
    assert record.session.params.prompt == "a watercolour harbour"
    assert record.session.params.t_index_list == [20, 35]

    page.get_by_test_id("prompt").fill("a neon city at night")
    page.get_by_test_id("new-seed").click()
    eventually(
        lambda: (
            record.session.params.prompt == "a neon city at night"
            and record.session.params.seed != 2
        ),
        what="the new prompt and seed to reach the session",
    )
    registry = server.service.engine.metrics.registry
    loads = registry.get_sample_value("livediff_model_loads_total")
    assert loads == 1, "a prompt or seed change must not reload the model"

    # The pipeline's own validator refuses decreasing steps; the page says so at the control.
    page.get_by_test_id("param-t_index_list").fill("30, 10")
    page.get_by_test_id("param-t_index_list").press("Enter")
    error = page.get_by_test_id("error-t_index_list")
    error.wait_for(state="visible", timeout=10_000)
    assert "strictly increasing" in error.inner_text()
    assert record.session.params.t_index_list == [20, 35]
    assert page.evaluate("document.body.dataset.state") == "live"


def test_the_studio_restyles_a_camera_with_the_video_pipeline(
    serve: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory, open_page: Any
) -> None:
    """``--pipeline video`` on the tiny Wan model: the page's fake camera goes in, the causal
    pipeline's chunks come back and play, and a prompt typed in the panel reaches the session."""
    from livediff.testing.video_models import write_tiny_wan_folder
    from livediff.transforms.video.transform import VideoTransform

    folder = tmp_path_factory.mktemp("tiny-wan-studio") / "model"
    write_tiny_wan_folder(folder, seed=0)
    server = serve(pipeline="video", model=str(folder), device="cpu", width=SIZE, height=SIZE)
    assert isinstance(server.service.engine.transform, VideoTransform)
    page = open_page(server.url)
    page.get_by_test_id("prompt").fill("a watercolour harbour")
    start_live(page)
    record = only_session(server.service)
    assert record.session.params.prompt == "a watercolour harbour"
    page.get_by_test_id("prompt").fill("a neon city at night")
    eventually(
        lambda: record.session.params.prompt == "a neon city at night",
        what="the new prompt to reach the video session",
    )
    assert record.session.stats.report()["frames_out"] > 0
    assert page.evaluate("document.body.dataset.state") == "live"
