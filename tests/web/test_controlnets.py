"""The ControlNet list in the studio's panel, against a real server.

The panel builds it from the params schema (``controlnets``: an array of ``$ref``'d ControlNetSpec
objects); every change sends the whole list as one patch, which replaces the session's list. Most
tests run ControlNetEcho (tests/web/controlnet_echo.py: DiffusionParams' ``controlnets`` field,
frames passed through, model ids under ``missing/`` refused like an unloadable ControlNet); the
last one runs the real diffusion pipeline on a tiny random model and a ControlNet made for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from livediff.config import Settings
from livediff.server.service import SessionRecord
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.control_params import MAX_CONTROLNETS, ControlNetSpec
from livediff.transforms.diffusion.params import DiffusionParams
from tests.web.controlnet_echo import UNLOADABLE, ControlNetEcho, ControlNetEchoParams
from tests.web.pagekit import eventually, only_session, start_live, wait_playing, wait_state

pytestmark = pytest.mark.browser

ECHO = f"{ControlNetEcho.__module__}:{ControlNetEcho.__name__}"
SIZE = 128
CANNY = "lllyasviel/control_v11p_sd15_canny"
DEPTH = "lllyasviel/control_v11f1p_sd15_depth"
GUIDANCE_ORDER = "control_guidance_start must not be after control_guidance_end"
#: Tall enough that the panel shows two ControlNets without scrolling (for its screenshot).
TALL = (1280, 1800)


@pytest.fixture
def echo_server(serve: Callable[..., LiveServer]) -> LiveServer:
    return serve(pipeline=ECHO, width=SIZE, height=SIZE)


def entry(model_id: str, **changes: Any) -> dict[str, Any]:
    """A ControlNet entry as the server keeps it: the schema's defaults, then ``changes``."""
    return {**ControlNetSpec(model_id=model_id).model_dump(mode="json"), **changes}


def session_controlnets(record: SessionRecord) -> list[dict[str, Any]]:
    params = record.session.params
    assert isinstance(params, ControlNetEchoParams | DiffusionParams)
    return [spec.model_dump(mode="json") for spec in params.controlnets]


def wait_controlnets(record: SessionRecord, expected: list[dict[str, Any]], what: str) -> None:
    try:
        eventually(lambda: session_controlnets(record) == expected, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the session has {session_controlnets(record)}") from None


def control(page: Any, index: int, name: str) -> Any:
    """The control of ``name`` (e.g. "model_id", "preprocessor_params-low_threshold") in entry
    ``index`` of the panel's ControlNet list."""
    return page.get_by_test_id(f"param-controlnets-{index}-{name}")


def focused(page: Any) -> str | None:
    testid: str | None = page.evaluate("document.activeElement?.dataset.testid ?? null")
    return testid


def add_controlnet(page: Any, model_id: str) -> None:
    """Add, then type the model id into the field Add focuses and press Enter (keyboard only)."""
    count = page.locator(".entry").count()
    page.get_by_test_id("add-controlnets").click()
    assert focused(page) == f"param-controlnets-{count}-model_id"
    page.keyboard.type(model_id)
    page.keyboard.press("Enter")


def test_controlnet_edits_reach_the_session(
    echo_server: LiveServer, open_page: Callable[..., Any], artifacts: Path
) -> None:
    page = open_page(echo_server.url, viewport=TALL)
    start_live(page)
    record = only_session(echo_server.service)
    assert page.get_by_test_id("count-controlnets").inner_text() == f"0 of {MAX_CONTROLNETS}"

    # Add: a new entry with the schema's defaults; it waits on the page for its model id.
    page.get_by_test_id("add-controlnets").click()
    assert focused(page) == "param-controlnets-0-model_id"
    assert page.get_by_test_id("note-controlnets-0").is_visible()
    assert control(page, 0, "preprocessor").input_value() == '"canny"'
    assert control(page, 0, "preprocessor_params-low_threshold").input_value() == "100"
    assert session_controlnets(record) == []
    page.keyboard.type(DEPTH)
    page.keyboard.press("Enter")
    wait_controlnets(record, [entry(DEPTH)], "the new ControlNet to reach the session")
    assert page.get_by_test_id("note-controlnets-0").is_hidden()

    # Depth takes its own params (the canny thresholds go, the detect resolution comes).
    control(page, 0, "preprocessor").select_option("depth")
    depth = entry(DEPTH, preprocessor="depth", preprocessor_params={"detect_resolution": 518})
    wait_controlnets(record, [depth], "the depth preprocessor to reach the session")
    assert control(page, 0, "preprocessor_params-low_threshold").count() == 0
    resolution = control(page, 0, "preprocessor_params-detect_resolution")
    bounds = [resolution.get_attribute(key) for key in ("min", "max", "step")]
    assert bounds == ["140", "1036", "14"]

    # A slider moved by keyboard, then one set directly.
    control(page, 0, "conditioning_scale").focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    eventually(
        lambda: session_controlnets(record)[0]["conditioning_scale"] == pytest.approx(1.2),
        what="the conditioning scale moved by keyboard to reach the session",
    )
    control(page, 0, "control_guidance_end").fill("0.8")
    depth.update(conditioning_scale=pytest.approx(1.2), control_guidance_end=0.8)
    wait_controlnets(record, [depth], "the guidance end to reach the session")

    # Enabled is a switch in the entry's head: Space toggles it.
    control(page, 0, "enabled").focus()
    page.keyboard.press("Space")
    depth.update(enabled=False)
    wait_controlnets(record, [depth], "enabled off to reach the session")
    assert "off" in str(page.get_by_test_id("entry-controlnets-0").get_attribute("class"))

    add_controlnet(page, CANNY)
    wait_controlnets(record, [depth, entry(CANNY)], "a second ControlNet to reach the session")
    control(page, 1, "preprocessor_params-high_threshold").fill("180")
    second = entry(CANNY, preprocessor_params={"low_threshold": 100.0, "high_threshold": 180.0})
    wait_controlnets(record, [depth, second], "the second entry's threshold to reach the session")
    assert page.get_by_test_id("count-controlnets").inner_text() == f"2 of {MAX_CONTROLNETS}"
    page.mouse.move(0, 0)
    page.locator(".panel").screenshot(path=artifacts / "controlnets.png")

    # Remove the first: the second becomes ControlNet 1, and keeps the keyboard focus.
    page.get_by_test_id("remove-controlnets-0").click()
    wait_controlnets(record, [second], "the removal to reach the session")
    assert focused(page) == "remove-controlnets-0"
    assert page.get_by_test_id("entry-controlnets-0").get_by_text("ControlNet 1").is_visible()
    assert control(page, 0, "model_id").input_value() == CANNY
    page.keyboard.press("Enter")
    wait_controlnets(record, [], "the last removal to reach the session")
    assert focused(page) == "add-controlnets"
    assert page.evaluate("document.body.dataset.state") == "live"


def test_at_most_max_controlnets_can_be_added(
    echo_server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(echo_server.url)
    add = page.get_by_test_id("add-controlnets")
    for index in range(MAX_CONTROLNETS):
        add_controlnet(page, f"controlnet-{index}")
    assert add.is_disabled()
    assert add.get_attribute("title") == f"At most {MAX_CONTROLNETS}"
    page.get_by_test_id(f"remove-controlnets-{MAX_CONTROLNETS - 1}").click()
    assert add.is_enabled()


def test_refused_values_are_explained_next_to_their_controls(
    echo_server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(echo_server.url)
    start_live(page)
    record = only_session(echo_server.service)

    # The pipeline cannot load this ControlNet: the 422 names controlnets.0.model_id.
    missing = f"{UNLOADABLE}controlnet"
    add_controlnet(page, missing)
    error = page.get_by_test_id("error-controlnets-0-model_id")
    error.wait_for(state="visible", timeout=10_000)
    assert f"no ControlNet can be loaded from '{missing}'" in error.inner_text()
    assert control(page, 0, "model_id").get_attribute("aria-invalid") == "true"
    assert session_controlnets(record) == []
    assert page.get_by_test_id("message").is_hidden(), "a placed error needs no message bar"

    control(page, 0, "model_id").fill(CANNY)
    control(page, 0, "model_id").press("Enter")
    wait_controlnets(record, [entry(CANNY)], "the corrected model id to reach the session")
    assert error.is_hidden()

    # The canny check (low above high) is about the preprocessor params as a whole.
    control(page, 0, "preprocessor_params-low_threshold").fill("250")
    params_error = page.get_by_test_id("error-controlnets-0-preprocessor_params")
    params_error.wait_for(state="visible", timeout=10_000)
    assert "low_threshold must not be above high_threshold" in params_error.inner_text()
    assert session_controlnets(record) == [entry(CANNY)]
    control(page, 0, "preprocessor_params-high_threshold").fill("255")
    thresholds = {"low_threshold": 250.0, "high_threshold": 255.0}
    wait_controlnets(record, [entry(CANNY, preprocessor_params=thresholds)], "valid thresholds")
    assert params_error.is_hidden()

    # A start after the end is about the entry as a whole: said under it.
    control(page, 0, "control_guidance_start").fill("0.9")
    control(page, 0, "control_guidance_end").fill("0.5")
    entry_error = page.get_by_test_id("error-controlnets-0")
    entry_error.wait_for(state="visible", timeout=10_000)
    assert GUIDANCE_ORDER in entry_error.inner_text()

    # An emptied model id is caught on the page: nothing is sent.
    sent = session_controlnets(record)
    control(page, 0, "model_id").fill("")
    control(page, 0, "model_id").press("Enter")
    assert page.get_by_test_id("error-controlnets-0-model_id").inner_text() == "Enter the model."
    assert session_controlnets(record) == sent
    assert page.evaluate("document.body.dataset.state") == "live"


def test_controlnets_set_before_start_on_a_phone_open_the_session(
    echo_server: LiveServer, open_page: Callable[..., Any], artifacts: Path
) -> None:
    page = open_page(echo_server.url, viewport=(390, 844))
    add_controlnet(page, CANNY)
    add_controlnet(page, DEPTH)
    control(page, 1, "preprocessor").select_option("depth")
    control(page, 1, "control_guidance_start").fill("0.25")

    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    for index in (0, 1):
        for testid in (
            f"remove-controlnets-{index}",
            f"param-controlnets-{index}-model_id",
            f"param-controlnets-{index}-control_guidance_start",
            f"param-controlnets-{index}-control_guidance_end",
        ):
            locator = page.get_by_test_id(testid)
            locator.scroll_into_view_if_needed()
            box = locator.bounding_box()
            assert box is not None, f"{testid} is not shown"
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{testid} sticks out: {box}"
    page.screenshot(path=artifacts / "controlnets-phone.png", full_page=True)

    expected = [
        entry(CANNY),
        entry(
            DEPTH,
            preprocessor="depth",
            preprocessor_params={"detect_resolution": 518},
            control_guidance_start=0.25,
        ),
    ]
    start_live(page)
    record = only_session(echo_server.service)
    assert session_controlnets(record) == expected, "the offer carries the ControlNets"

    # The page remembers them (changed from the defaults) for the next visit.
    page.get_by_test_id("stop").click()
    wait_state(page, "idle")
    page.reload()
    control(page, 1, "model_id").wait_for()
    assert control(page, 0, "model_id").input_value() == CANNY
    assert control(page, 1, "preprocessor").input_value() == '"depth"'
    assert control(page, 1, "preprocessor_params-detect_resolution").input_value() == "518"
    assert control(page, 1, "control_guidance_start").input_value() == "0.25"
    page.get_by_test_id("reset").click()
    assert page.locator(".entry").count() == 0


# -- the real diffusion pipeline ------------------------------------------------------------------
DIFFUSION_SIZE = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from livediff.testing.models import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> str:
    """A random ControlNet made for the tiny model's UNet, saved in diffusers layout."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet_class: Any = UNet2DConditionModel
    controlnet_class: Any = ControlNetModel
    unet = unet_class.from_pretrained(tiny_model.model / "unet")
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    controlnet_class.from_unet(unet).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_the_diffusion_pipeline_takes_controlnets_from_the_panel(
    serve: Callable[..., LiveServer],
    tiny_model: Any,
    tiny_controlnet: str,
    open_page: Callable[..., Any],
) -> None:
    from livediff.testing.models import tiny_options

    # A server with an allow-list of model ids serves only those it names.
    allow_list = "allow_models" in Settings.model_fields
    allowed = {"allow_models": [tiny_controlnet]} if allow_list else {}
    server = serve(**tiny_options(tiny_model, DIFFUSION_SIZE), **allowed)
    page = open_page(server.url)
    page.get_by_test_id("add-controlnets").wait_for()
    schema = DiffusionParams.model_json_schema()
    assert schema["properties"]["controlnets"]["items"] == {"$ref": "#/$defs/ControlNetSpec"}
    start_live(page)
    record = only_session(server.service)

    if allow_list:
        # A model id the server does not serve is refused, and said so under the model id.
        add_controlnet(page, str(Path(tiny_controlnet).parent / "another-controlnet"))
        error = page.get_by_test_id("error-controlnets-0-model_id")
        error.wait_for(state="visible", timeout=20_000)
        assert "not an allowed model" in error.inner_text()
        assert session_controlnets(record) == []
        control(page, 0, "model_id").fill(tiny_controlnet)
        control(page, 0, "model_id").press("Enter")
    else:
        add_controlnet(page, tiny_controlnet)
    control(page, 0, "preprocessor").select_option("passthrough")
    # the preprocessor's description replaces the canny sliders once the card re-renders
    page.get_by_test_id("entry-controlnets-0").get_by_text("as it is").wait_for(
        state="visible", timeout=10_000
    )
    expected = entry(tiny_controlnet, preprocessor="passthrough", preprocessor_params={})
    wait_controlnets(record, [expected], "the ControlNet to reach the diffusion session")
    wait_playing(page, timeout_ms=60_000)

    control(page, 0, "control_guidance_start").fill("0.7")
    started = [{**expected, "control_guidance_start": 0.7}]
    # the valid edit lands first (an edit right after it could share its debounced patch)
    wait_controlnets(record, started, "control_guidance_start to reach the session")
    control(page, 0, "control_guidance_end").fill("0.2")
    entry_error = page.get_by_test_id("error-controlnets-0")
    entry_error.wait_for(state="visible", timeout=20_000)
    assert GUIDANCE_ORDER in entry_error.inner_text()
    assert session_controlnets(record) == started  # the refused edit changed nothing
    loads = server.service.engine.metrics.registry.get_sample_value("livediff_model_loads_total")
    assert loads == 1, "ControlNet changes must not reload the model"
