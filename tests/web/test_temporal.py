"""The panel's Temporal group: the diffusion pipeline's temporal-coherence params.

Object params (``cached_attention``, ``motion_noise``, the four processing blocks) get a card of
controls built from their own schema; an edit sends the whole object as one value. A processor's
``params`` (an open object in the schema) get the controls of its type.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from livediff.server.service import SessionRecord
from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.params import DiffusionParams
from tests.web.conftest import DIFFUSION_PARAMS_TINT
from tests.web.pagekit import eventually, only_session, start_live

pytestmark = pytest.mark.browser

TEMPORAL = [
    "cached_attention",
    "motion_noise",
    "do_add_noise",
    "image_preprocessing",
    "latent_preprocessing",
    "latent_postprocessing",
    "image_postprocessing",
    "prompt_clears_history",
]

#: Renders a ParamsForm (window.form) into a fresh <form id="probe">; its patches go to
#: window.patches. Returns the names of the Temporal group's params, in the panel's order.
RENDER_JS = """async (pipeline) => {
  const { ParamsForm } = await import("/js/controls.js");
  const root = document.createElement("form");
  root.id = "probe";
  document.body.append(root);
  window.patches = [];
  window.form = new ParamsForm(root, pipeline);
  window.form.addEventListener("change", (event) => window.patches.push(event.detail));
  const group = root.querySelector('[data-group="Temporal"]');
  return [...group.querySelectorAll("[data-param]")].map((field) => field.dataset.param);
}"""

#: Shows a 422's detail in the form as the studio does (api.js's fieldError); returns what
#: could not be placed next to a control.
SHOW_ERRORS_JS = """async (detail) => {
  const { fieldError } = await import("/js/api.js");
  return window.form.showErrors(detail.map(fieldError));
}"""

BANK = "param-cached_attention"
FEEDBACK = "param-image_postprocessing-processors-0"


def diffusion_pipeline() -> dict[str, Any]:
    return {
        "name": "diffusion",
        "params_schema": DiffusionParams.model_json_schema(),
        "defaults": DiffusionParams().model_dump(mode="json"),
    }


def open_temporal(page: Any, scope: str = "") -> None:
    page.locator(f'{scope} [data-group="Temporal"] > summary').click()


def wait_patches(page: Any, count: int) -> list[dict[str, Any]]:
    page.wait_for_function("(count) => window.patches.length >= count", arg=count, timeout=5_000)
    sent: list[dict[str, Any]] = page.evaluate("window.patches")
    return sent


def refusal(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The 422 detail the server answers for ``params`` (pydantic's errors under its prefix)."""
    with pytest.raises(ValidationError) as caught:
        DiffusionParams.model_validate(params)
    errors = caught.value.errors(include_url=False, include_context=False)
    return [
        {"loc": ["body", "params", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in errors
    ]


def test_temporal_params_get_cards_and_send_whole_objects(
    server: LiveServer, open_page: Callable[..., Any], artifacts: Path
) -> None:
    defaults = DiffusionParams().model_dump(mode="json")
    page = open_page(server.url, viewport=(1280, 1600))
    page.get_by_test_id("start").wait_for()
    assert page.evaluate(RENDER_JS, diffusion_pipeline()) == TEMPORAL
    probe = page.locator("#probe")
    open_temporal(page, "#probe")

    # The feature bank is off by default: its card is dimmed, its controls keep their values.
    bank = probe.get_by_test_id("object-cached_attention")
    assert "off" in str(bank.get_attribute("class"))
    assert not probe.get_by_test_id(f"{BANK}-enabled").is_checked()
    frames = probe.get_by_test_id(f"{BANK}-max_frames")
    assert [frames.get_attribute(key) for key in ("type", "min", "max")] == ["range", "1", "4"]
    assert probe.get_by_test_id(f"{BANK}-interval").get_attribute("type") == "number"
    assert probe.get_by_test_id("param-motion_noise-min_strength").input_value() == "0.3"
    # No JSON box anywhere in the group.
    assert probe.locator('[data-group="Temporal"] textarea').count() == 0

    probe.get_by_test_id(f"{BANK}-enabled").check()
    frames.fill("3")
    assert "off" not in str(bank.get_attribute("class"))

    # A processor added to image_postprocessing: its type, and the params of that type.
    assert probe.get_by_test_id("count-image_postprocessing-processors").inner_text() == "0 of 8"
    probe.get_by_test_id("add-image_postprocessing-processors").click()
    kinds = probe.get_by_test_id(f"{FEEDBACK}-type")
    assert [option.inner_text() for option in kinds.locator("option").all()] == ["feedback"]
    strength = probe.get_by_test_id(f"{FEEDBACK}-params-feedback_strength")
    assert strength.input_value() == "0.5"
    strength.fill("0.3")

    sent = wait_patches(page, 4)
    bank_on = {"enabled": True, "max_frames": 1, "interval": 1}
    processor = {"type": "feedback", "enabled": True, "params": {"feedback_strength": 0.5}}
    block = {"enabled": True, "processors": [processor]}
    assert sent == [
        {"cached_attention": bank_on},
        {"cached_attention": {**bank_on, "max_frames": 3}},
        {"image_postprocessing": block},
        {
            "image_postprocessing": {
                **block,
                "processors": [{**processor, "params": {"feedback_strength": 0.3}}],
            }
        },
    ]
    merged = dict(defaults)
    for patch in sent:
        merged.update(patch)
        DiffusionParams.model_validate(merged)
    page.mouse.move(0, 0)
    probe.locator('[data-group="Temporal"]').screenshot(path=artifacts / "temporal.png")

    # A 422 inside a processor's params is shown at that control, not in the message bar.
    too_strong = {**block, "processors": [{**processor, "params": {"feedback_strength": 2}}]}
    detail = refusal({**merged, "image_postprocessing": too_strong})
    assert detail[0]["loc"][2:] == [
        "image_postprocessing",
        "processors",
        0,
        "params",
        "feedback_strength",
    ]
    assert page.evaluate(SHOW_ERRORS_JS, detail) == []
    error = probe.get_by_test_id("error-image_postprocessing-processors-0-params-feedback_strength")
    assert "less than or equal to 1" in error.inner_text()
    assert strength.get_attribute("aria-invalid") == "true"
    # The motion check (min above max) is about the object as a whole: said under its card.
    backwards = {**defaults["motion_noise"], "min_strength": 0.9, "max_strength": 0.2}
    assert page.evaluate(SHOW_ERRORS_JS, refusal({**merged, "motion_noise": backwards})) == []
    assert (
        "min_strength must not be above max_strength"
        in probe.get_by_test_id("error-motion_noise").inner_text()
    )

    # An edit clears the block's errors.
    strength.fill("0.4")
    wait_patches(page, 5)
    assert error.inner_text() == ""
    assert strength.get_attribute("aria-invalid") == "false"


def session_params(record: SessionRecord) -> DiffusionParams:
    params = record.session.params
    assert isinstance(params, DiffusionParams)
    return params


def test_temporal_edits_reach_the_session_and_refusals_show_at_their_control(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(pipeline=DIFFUSION_PARAMS_TINT, width=128, height=128)
    page = open_page(server.url, viewport=(1280, 1600))
    start_live(page)
    record = only_session(server.service)
    open_temporal(page)

    page.get_by_test_id(f"{BANK}-enabled").check()
    page.get_by_test_id(f"{BANK}-max_frames").fill("2")
    eventually(
        lambda: (
            session_params(record).cached_attention.model_dump()
            == {"enabled": True, "max_frames": 2, "interval": 1}
        ),
        what="the feature bank to reach the session",
    )

    # Out of range: the server's 422 names cached_attention.interval, shown at that control.
    interval = page.get_by_test_id(f"{BANK}-interval")
    interval.fill("2000")
    interval.press("Enter")
    error = page.get_by_test_id("error-cached_attention-interval")
    error.wait_for(state="visible", timeout=10_000)
    assert "less than or equal to 1440" in error.inner_text()
    assert interval.get_attribute("aria-invalid") == "true"
    assert page.get_by_test_id("message").is_hidden(), "a placed error needs no message bar"
    assert session_params(record).cached_attention.interval == 1

    interval.fill("12")
    interval.press("Enter")
    eventually(
        lambda: session_params(record).cached_attention.interval == 12,
        what="the corrected interval to reach the session",
    )
    assert error.is_hidden()

    page.get_by_test_id("add-image_postprocessing-processors").click()
    page.get_by_test_id(f"{FEEDBACK}-params-feedback_strength").fill("0.25")
    eventually(
        lambda: session_params(record).image_postprocessing.strengths() == (0.25,),
        what="the feedback processor to reach the session",
    )
    page.get_by_test_id("param-prompt_clears_history").check()
    eventually(
        lambda: session_params(record).prompt_clears_history,
        what="prompt_clears_history to reach the session",
    )
    assert page.evaluate("document.body.dataset.state") == "live"
