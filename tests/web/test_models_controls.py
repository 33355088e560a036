"""The panel's Models, Safety and Style image groups: LoRAs, the safety filter, the IP-Adapter.

``lora_dict`` (a dict of weights by LoRA id) gets a key-value editor whose rows send the whole
dict as one value; ``ip_adapter_style_image_url`` gets a drop zone: an image file dropped (on it,
or anywhere on the page) or chosen is shrunk in the browser and sent as a JPEG data URL.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.params import DiffusionParams
from tests.web.conftest import DIFFUSION_PARAMS_TINT
from tests.web.pagekit import eventually, only_session, start_live

pytestmark = pytest.mark.browser

STYLE_URL = "ip_adapter_style_image_url"
MAX_SIDE = 512

#: Renders a ParamsForm (window.form) into a fresh <form id="probe">; its patches go to
#: window.patches. Returns {group: [param, ...]} in the panel's order.
RENDER_JS = """async (pipeline) => {
  const { ParamsForm } = await import("/js/controls.js");
  const root = document.createElement("form");
  root.id = "probe";
  root.addEventListener("submit", (event) => event.preventDefault());  // as the studio's form
  document.body.append(root);
  window.patches = [];
  window.form = new ParamsForm(root, pipeline);
  window.form.addEventListener("change", (event) => window.patches.push(event.detail));
  return Object.fromEntries(
    [...root.querySelectorAll("[data-group]")].map((group) => [
      group.dataset.group,
      [...group.querySelectorAll("[data-param]")].map((field) => field.dataset.param),
    ]),
  );
}"""

SHOW_ERRORS_JS = """async (detail) => {
  const { fieldError } = await import("/js/api.js");
  return window.form.showErrors(detail.map(fieldError));
}"""

#: Drops a file built in the page on the element of ``target`` (a CSS selector): a PNG of
#: width x height (a gradient), or a text file when ``width`` is 0.
DROP_JS = """async ([target, name, width, height]) => {
  let file;
  if (width) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const gradient = context.createLinearGradient(0, 0, width, height);
    gradient.addColorStop(0, "#8b5cf6");
    gradient.addColorStop(1, "#f59e0b");
    context.fillStyle = gradient;
    context.fillRect(0, 0, width, height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    file = new File([blob], name, { type: "image/png" });
  } else {
    file = new File(["not a picture"], name, { type: "text/plain" });
  }
  const transfer = new DataTransfer();
  transfer.items.add(file);
  const init = { dataTransfer: transfer, bubbles: true, cancelable: true };
  const over = new DragEvent("dragover", init);
  document.querySelector(target).dispatchEvent(over);
  const drop = new DragEvent("drop", init);
  document.querySelector(target).dispatchEvent(drop);
  return { overTaken: over.defaultPrevented, dropTaken: drop.defaultPrevented };
}"""

WEIGHT_TYPES = [
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
]

#: A params schema with the IP-Adapter's two params, as the diffusion pipeline is to take them.
STYLE_SCHEMA: dict[str, Any] = {
    "$defs": {
        "IPAdapterConfig": {
            "additionalProperties": False,
            "properties": {
                "type": {"default": "regular", "enum": ["regular", "faceid"], "type": "string"},
                "scale": {"default": 1.0, "maximum": 10, "minimum": 0, "type": "number"},
                "weight_type": {"default": "linear", "enum": WEIGHT_TYPES, "type": "string"},
                "enabled": {"default": False, "type": "boolean"},
            },
            "title": "IPAdapterConfig",
            "type": "object",
        }
    },
    "properties": {
        "prompt": {"default": "a cat", "maxLength": 1000, "type": "string"},
        "ip_adapter": {
            "anyOf": [{"$ref": "#/$defs/IPAdapterConfig"}, {"type": "null"}],
            "default": None,
        },
        STYLE_URL: {
            "anyOf": [{"maxLength": 10_000_000, "type": "string"}, {"type": "null"}],
            "default": None,
            "description": "The style image: an http(s) URL or a data:image/...;base64 URL.",
        },
    },
    "type": "object",
}
STYLE_DEFAULTS: dict[str, Any] = {
    "prompt": "a cat",
    "ip_adapter": {"type": "regular", "scale": 1.0, "weight_type": "linear", "enabled": False},
    STYLE_URL: None,
}


def real_pipeline() -> dict[str, Any]:
    return {
        "name": "diffusion",
        "params_schema": DiffusionParams.model_json_schema(),
        "defaults": DiffusionParams().model_dump(mode="json"),
    }


def style_pipeline() -> dict[str, Any]:
    return {"name": "style", "params_schema": STYLE_SCHEMA, "defaults": STYLE_DEFAULTS}


def render(page: Any, pipeline: dict[str, Any]) -> dict[str, list[str]]:
    page.get_by_test_id("start").wait_for()
    groups: dict[str, list[str]] = page.evaluate(RENDER_JS, pipeline)
    return groups


def open_group(page: Any, name: str) -> None:
    group = page.locator(f'#probe details[data-group="{name}"]')
    if group.get_attribute("open") is None:
        group.locator("> summary").click()


def wait_patches(page: Any, count: int) -> list[dict[str, Any]]:
    page.wait_for_function("(count) => window.patches.length >= count", arg=count, timeout=5_000)
    sent: list[dict[str, Any]] = page.evaluate("window.patches")
    return sent


def no_new_patch(page: Any, count: int) -> None:
    """Waits a moment, then checks that no more than ``count`` patches went out."""
    page.wait_for_timeout(400)
    assert page.evaluate("window.patches.length") == count, page.evaluate("window.patches")


def refusal(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The 422 detail the server answers for ``params`` (pydantic's errors under its prefix)."""
    with pytest.raises(ValidationError) as caught:
        DiffusionParams.model_validate(params)
    errors = caught.value.errors(include_url=False, include_context=False)
    return [
        {"loc": ["body", "params", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in errors
    ]


def decoded(url: str) -> Image.Image:
    """The image of a ``data:image/jpeg;base64,...`` URL."""
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64", head
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    assert image.format == "JPEG"
    return image


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def lora(page: Any, index: int, part: str) -> Any:
    """Row ``index`` of the LoRA editor: its "key", "weight" (slider) or "value" (number box)."""
    return page.locator("#probe").get_by_test_id(f"param-lora_dict-{index}-{part}")


def open_real(page: Any) -> dict[str, list[str]]:
    """The real DiffusionParams panel in #probe, its Models and Safety groups open."""
    groups = render(page, real_pipeline())
    open_group(page, "Models")
    open_group(page, "Safety")
    return groups


def add_lora(page: Any, lora_id: str) -> None:
    """Add, then type the id into the row Add focuses and press Enter (keyboard only)."""
    count = page.locator("#probe .pair").count()
    page.locator("#probe").get_by_test_id("add-lora_dict").click()
    assert page.evaluate("document.activeElement.dataset.testid") == (
        f"param-lora_dict-{count}-key"
    )
    page.keyboard.type(lora_id)
    page.keyboard.press("Enter")


def set_weight(page: Any, index: int, weight: str) -> None:
    lora(page, index, "value").fill(weight)
    lora(page, index, "value").press("Enter")


def test_loras_and_safety_get_their_own_controls(
    server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(server.url, viewport=(1280, 1600))
    groups = open_real(page)
    assert groups["Models"] == ["model", "vae", "lora_dict", "use_lcm_lora", "lcm_lora_id"]
    assert groups["Safety"] == ["use_safety_checker", "safety_checker_threshold"]
    probe = page.locator("#probe")
    for name in ("Models", "Safety"):
        assert probe.locator(f'[data-group="{name}"] textarea').count() == 0, name

    # The safety filter: a switch and a 0-1 slider.
    safety = probe.get_by_test_id("param-use_safety_checker")
    assert (safety.get_attribute("type"), safety.is_checked()) == ("checkbox", False)
    threshold = probe.get_by_test_id("param-safety_checker_threshold")
    bounds = [threshold.get_attribute(key) for key in ("type", "min", "max", "step")]
    assert bounds == ["range", "0", "1", "0.01"]
    assert threshold.input_value() == "0.5"
    assert probe.get_by_test_id("param-use_lcm_lora").get_attribute("type") == "checkbox"
    lcm_id = probe.get_by_test_id("param-lcm_lora_id")
    assert lcm_id.input_value() == DiffusionParams().lcm_lora_id

    # The LoRA editor starts empty; a new row's weight is a -5..5 slider and a number box.
    assert probe.get_by_test_id("count-lora_dict").inner_text() == "0 of 8"
    probe.get_by_test_id("add-lora_dict").click()
    assert probe.get_by_test_id("note-lora_dict-0").is_visible()
    weight = lora(page, 0, "weight")
    assert [weight.get_attribute(key) for key in ("min", "max", "step")] == ["-5", "5", "0.05"]
    assert lora(page, 0, "value").input_value() == "1"

    safety.check()
    threshold.fill("0.8")
    sent = wait_patches(page, 2)
    assert sent == [{"use_safety_checker": True}, {"safety_checker_threshold": 0.8}]
    no_new_patch(page, 2)  # the row without an id was not sent


def test_lora_rows_send_the_whole_dict(server: LiveServer, open_page: Callable[..., Any]) -> None:
    page = open_page(server.url, viewport=(1280, 1600))
    open_real(page)
    probe = page.locator("#probe")
    add_lora(page, "acme/watercolor")
    assert probe.get_by_test_id("note-lora_dict-0").is_hidden()
    add_lora(page, "acme/ink")
    lora(page, 0, "weight").fill("0.75")
    assert lora(page, 0, "value").input_value() == "0.75"
    set_weight(page, 1, "-1.5")
    assert lora(page, 1, "weight").input_value() == "-1.5"
    sent = wait_patches(page, 4)
    assert sent == [
        {"lora_dict": {"acme/watercolor": 1}},
        {"lora_dict": {"acme/watercolor": 1, "acme/ink": 1}},
        {"lora_dict": {"acme/watercolor": 0.75, "acme/ink": 1}},
        {"lora_dict": {"acme/watercolor": 0.75, "acme/ink": -1.5}},
    ]
    merged = DiffusionParams().model_dump(mode="json")
    for patch in sent:
        merged.update(patch)
        DiffusionParams.model_validate(merged)
    assert probe.get_by_test_id("count-lora_dict").inner_text() == "2 of 8"

    # Removed one by one (focus staying in the editor); no rows left sends null.
    probe.get_by_test_id("remove-lora_dict-0").click()
    probe.get_by_test_id("remove-lora_dict-0").click()
    sent = wait_patches(page, 6)
    assert sent[4:] == [{"lora_dict": {"acme/ink": -1.5}}, {"lora_dict": None}]
    assert page.evaluate("document.activeElement.dataset.testid") == "add-lora_dict"

    # A row without an id stays on the page unsent, also when its weight moves or it goes.
    probe.get_by_test_id("add-lora_dict").click()
    set_weight(page, 0, "3")
    probe.get_by_test_id("remove-lora_dict-0").click()
    # The same id twice is refused at the row, nothing sent.
    add_lora(page, "acme/ink")
    add_lora(page, "acme/ink")
    assert "Listed twice" in probe.get_by_test_id("error-lora_dict-0").inner_text()
    sent = wait_patches(page, 7)
    assert sent[6:] == [{"lora_dict": {"acme/ink": 1}}]
    no_new_patch(page, 7)


def test_a_refused_lora_shows_at_its_row(server: LiveServer, open_page: Callable[..., Any]) -> None:
    page = open_page(server.url, viewport=(1280, 1600))
    open_real(page)
    probe = page.locator("#probe")
    add_lora(page, "acme/ink")
    add_lora(page, "x")
    set_weight(page, 1, "9")
    sent = wait_patches(page, 3)
    assert sent[-1] == {"lora_dict": {"acme/ink": 1, "x": 9}}
    detail = refusal({**DiffusionParams().model_dump(mode="json"), **sent[-1]})
    assert [error["loc"] for error in detail] == [["body", "params", "lora_dict", "x"]]
    assert page.evaluate(SHOW_ERRORS_JS, detail) == []
    assert "less than or equal to 5" in probe.get_by_test_id("error-lora_dict-1").inner_text()
    assert lora(page, 1, "value").get_attribute("aria-invalid") == "true"
    assert "invalid" in str(probe.get_by_test_id("pair-lora_dict-1").get_attribute("class"))
    assert probe.get_by_test_id("error-lora_dict-0").inner_text() == ""
    assert lora(page, 0, "key").get_attribute("aria-invalid") != "true"
    # An error about an id no row has: under the editor.
    gone = [{"loc": ["body", "params", "lora_dict", "gone/lora"], "msg": "not found"}]
    assert page.evaluate(SHOW_ERRORS_JS, gone) == []
    assert probe.get_by_test_id("error-lora_dict").inner_text() == "gone/lora: not found"

    # The next edit clears them.
    set_weight(page, 1, "2")
    sent = wait_patches(page, 4)
    assert sent[-1] == {"lora_dict": {"acme/ink": 1, "x": 2}}
    assert probe.get_by_test_id("error-lora_dict-1").inner_text() == ""
    assert probe.get_by_test_id("error-lora_dict").inner_text() == ""
    assert lora(page, 1, "value").get_attribute("aria-invalid") == "false"


def style_pipeline_for(schema: str) -> dict[str, Any]:
    """The built schema, or the real one (skipping the test while it lacks the style image)."""
    if schema == "built":
        return style_pipeline()
    if STYLE_URL not in DiffusionParams.model_fields:
        pytest.skip("DiffusionParams has no ip_adapter_style_image_url yet")
    return real_pipeline()


def open_style(page: Any, pipeline: dict[str, Any]) -> Any:
    """The panel of ``pipeline`` in #probe; returns the probe, its Style image group checked."""
    groups = render(page, pipeline)
    assert groups["Style image"] == ["ip_adapter", STYLE_URL]
    open_group(page, "Style image")
    probe = page.locator("#probe")
    assert probe.locator('[data-group="Style image"] textarea').count() == 0
    return probe


DROP_ZONE = f'#probe [data-testid="drop-{STYLE_URL}"]'


@pytest.mark.parametrize("schema", ["built", "real"])
def test_a_dropped_style_image_is_sent_small(
    schema: str, server: LiveServer, open_page: Callable[..., Any]
) -> None:
    pipeline = style_pipeline_for(schema)
    page = open_page(server.url, viewport=(1280, 1600))
    probe = open_style(page, pipeline)
    # The IP-Adapter's own card: kind, scale, weight type and its switch.
    kinds = probe.get_by_test_id("param-ip_adapter-type").locator("option").all_inner_texts()
    assert kinds == ["regular", "faceid"]
    assert probe.get_by_test_id("param-ip_adapter-weight_type").locator("option").count() == 15
    switch = probe.get_by_test_id("param-ip_adapter-enabled")
    adapter_on = bool((pipeline["defaults"].get("ip_adapter") or {}).get("enabled"))
    assert switch.is_checked() == adapter_on
    thumb = probe.get_by_test_id(f"thumb-{STYLE_URL}")
    assert thumb.is_hidden()

    # A 1200 x 800 PNG dropped on the zone: a JPEG at most 512 px long, the adapter switched on.
    taken = page.evaluate(DROP_JS, [DROP_ZONE, "big.png", 1200, 800])
    assert taken == {"overTaken": True, "dropTaken": True}
    sent = wait_patches(page, 1)
    url = sent[0][STYLE_URL]
    assert decoded(url).size == (MAX_SIDE, 341)
    assert len(url) < 1_000_000
    expected = [STYLE_URL] if adapter_on else ["ip_adapter", STYLE_URL]
    assert sorted(sent[0]) == expected
    if not adapter_on:
        assert sent[0]["ip_adapter"]["enabled"] is True
    assert switch.is_checked()
    thumb.wait_for(state="visible")
    assert page.evaluate("(img) => img.naturalWidth", thumb.element_handle()) == MAX_SIDE
    caption = probe.get_by_test_id(f"caption-{STYLE_URL}").inner_text()
    assert "big.png, 512 \u00d7 341" in caption
    if schema == "real":
        DiffusionParams.model_validate({**pipeline["defaults"], **sent[0]})

    # A text file is refused in the page: a message, nothing sent, the image kept.
    page.evaluate(DROP_JS, [DROP_ZONE, "notes.txt", 0, 0])
    assert "notes.txt is not an image" in probe.get_by_test_id(f"error-{STYLE_URL}").inner_text()
    no_new_patch(page, 1)
    assert thumb.is_visible()


@pytest.mark.parametrize("schema", ["built", "real"])
def test_a_style_image_from_the_picker_or_an_address(
    schema: str, server: LiveServer, open_page: Callable[..., Any]
) -> None:
    pipeline = style_pipeline_for(schema)
    page = open_page(server.url, viewport=(1280, 1600))
    probe = open_style(page, pipeline)
    # The picker is a button (keyboard users); a small picture keeps its size.
    pick = probe.get_by_test_id(f"pick-{STYLE_URL}")
    assert pick.evaluate("(button) => button.tagName") == "BUTTON"
    probe.get_by_test_id(f"file-{STYLE_URL}").set_input_files(
        files=[{"name": "small.png", "mimeType": "image/png", "buffer": png_bytes(100, 60)}]
    )
    sent = wait_patches(page, 1)
    assert decoded(sent[0][STYLE_URL]).size == (100, 60)

    # An http(s) address typed in; anything else is refused at the box.
    error = probe.get_by_test_id(f"error-{STYLE_URL}")
    address = probe.get_by_test_id(f"param-{STYLE_URL}")
    address.fill("ftp://example.com/style.png")
    address.press("Enter")
    assert "http(s) address" in error.inner_text()
    assert address.get_attribute("aria-invalid") == "true"
    no_new_patch(page, 1)
    address.fill("https://example.com/style.png")
    address.press("Enter")
    sent = wait_patches(page, 2)
    assert sent[1] == {STYLE_URL: "https://example.com/style.png"}
    assert error.inner_text() == ""
    if schema == "real":
        DiffusionParams.model_validate({**pipeline["defaults"], **sent[0], **sent[1]})
    # Remove: no style image.
    probe.get_by_test_id(f"clear-{STYLE_URL}").click()
    sent = wait_patches(page, 3)
    assert sent[2] == {STYLE_URL: pipeline["defaults"][STYLE_URL]}
    assert probe.get_by_test_id(f"thumb-{STYLE_URL}").is_hidden()
    assert address.input_value() == ""


def test_an_image_dropped_anywhere_on_the_page_becomes_the_style_image(
    server: LiveServer, open_page: Callable[..., Any]
) -> None:
    """The studio itself, with a pipeline description that has the style image (routed)."""
    page = open_page(server.url, viewport=(1280, 900))
    page.get_by_test_id("param-delay_ms").wait_for()
    # Passthrough takes no style image: no drop zone, and the page leaves a dropped file alone.
    assert page.get_by_test_id(f"drop-{STYLE_URL}").count() == 0
    taken = page.evaluate(DROP_JS, ["#output-screen", "big.png", 64, 64])
    assert taken == {"overTaken": False, "dropTaken": False}

    body = json.dumps(style_pipeline())
    page.route(
        "**/v1/pipeline",
        lambda route: route.fulfill(status=200, content_type="application/json", body=body),
    )
    page.reload()
    zone = page.get_by_test_id(f"drop-{STYLE_URL}")
    zone.wait_for()
    taken = page.evaluate(DROP_JS, ["#output-screen", "big.png", 900, 1800])
    assert taken == {"overTaken": True, "dropTaken": True}
    thumb = page.get_by_test_id(f"thumb-{STYLE_URL}")
    thumb.wait_for(state="visible")
    assert thumb.is_visible()
    # Saved for the next session: the data URL and the adapter switched on.
    saved = page.wait_for_function(
        "() => JSON.parse(localStorage.getItem('livediff.params.style') || '{}')"
        ".ip_adapter_style_image_url ?? null"
    ).json_value()
    assert decoded(saved).size == (256, MAX_SIDE)
    assert page.get_by_test_id("param-ip_adapter-enabled").is_checked()

    page.evaluate(DROP_JS, ["#output-screen", "notes.txt", 0, 0])
    assert "notes.txt is not an image" in page.get_by_test_id(f"error-{STYLE_URL}").inner_text()


def test_a_style_image_dropped_on_the_studio_reaches_the_session(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    """The real schema, live: the drop's patch (image and adapter on) reaches the session."""
    if STYLE_URL not in DiffusionParams.model_fields:
        pytest.skip("DiffusionParams has no ip_adapter_style_image_url yet")
    server = serve(pipeline=DIFFUSION_PARAMS_TINT, width=128, height=128)
    page = open_page(server.url, viewport=(1280, 900))
    start_live(page)
    record = only_session(server.service)
    taken = page.evaluate(DROP_JS, ["#output-screen", "wide.png", 2048, 1024])
    assert taken == {"overTaken": True, "dropTaken": True}

    def applied() -> str | None:
        params = record.session.params
        assert isinstance(params, DiffusionParams)
        url = str(params.ip_adapter_style_image_url)
        return url if url.startswith("data:") and params.ip_adapter.enabled else None

    url = eventually(applied, what="the dropped style image to reach the session")
    assert decoded(url).size == (MAX_SIDE, 256)
    assert page.get_by_test_id("message").is_hidden()
    assert page.evaluate("document.body.dataset.state") == "live"
