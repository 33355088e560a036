"""The params panel follows the running pipeline's JSON schema (no session needed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from livediff.testing.servers import LiveServer
from livediff.transforms.diffusion.params import DiffusionParams

pytestmark = pytest.mark.browser

STYLE_IMAGE = ["ip_adapter", "ip_adapter_style_image_url"]

#: Renders a ParamsForm for a given pipeline description into a fresh <form id="probe"> and
#: records every patch it emits in window.patches.
RENDER_JS = """async (pipeline) => {
  const { ParamsForm } = await import("/js/controls.js");
  const root = document.createElement("form");
  root.id = "probe";
  document.body.append(root);
  window.patches = [];
  const form = new ParamsForm(root, pipeline);
  form.addEventListener("change", (event) => window.patches.push(event.detail));
  return [...root.querySelectorAll("[data-param]")].map((field) => field.dataset.param);
}"""


def control_facts(page: Any, testid: str) -> dict[str, Any]:
    facts: dict[str, Any] = page.evaluate(
        """(testid) => {
          const control = document.querySelector(`#probe [data-testid="${testid}"]`);
          return {
            tag: control.tagName.toLowerCase(),
            type: control.type,
            value: control.value,
            min: control.getAttribute("min"),
            max: control.getAttribute("max"),
            step: control.getAttribute("step"),
            options: control.options ? [...control.options].map((o) => o.textContent) : null,
          };
        }""",
        testid,
    )
    return facts


def patches(page: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("window.patches")
    return found


def test_diffusion_params_get_their_controls(
    server: LiveServer, open_page: Callable[..., Any]
) -> None:
    defaults = DiffusionParams().model_dump(mode="json")
    pipeline = {
        "name": "diffusion",
        "params_schema": DiffusionParams.model_json_schema(),
        "defaults": defaults,
    }
    page = open_page(server.url)
    page.get_by_test_id("start").wait_for()
    names = page.evaluate(RENDER_JS, pipeline)
    # The IP-Adapter's params (being added to DiffusionParams) make the Style image group.
    style_image = [name for name in STYLE_IMAGE if name in DiffusionParams.model_fields]
    assert names == [
        "prompt",
        "negative_prompt",
        *style_image,
        "strength",
        "t_index_list",
        "guidance_scale",
        "delta",
        "cfg_type",
        "seed",
        "similarity_threshold",
        "controlnets",
        "cached_attention",
        "motion_noise",
        "do_add_noise",
        "image_preprocessing",
        "latent_preprocessing",
        "latent_postprocessing",
        "image_postprocessing",
        "prompt_clears_history",
        "width",
        "height",
        "model",
        "vae",
        "lora_dict",
        "use_lcm_lora",
        "lcm_lora_id",
        "use_safety_checker",
        "safety_checker_threshold",
    ]
    prompt = control_facts(page, "prompt")
    assert (prompt["tag"], prompt["value"]) == ("textarea", defaults["prompt"])
    # Exclusive bounds (strength > 0, similarity < 1) are kept off the sliders' ends.
    strength = control_facts(page, "param-strength")
    assert (strength["type"], strength["min"], strength["max"]) == ("range", "0.01", "1")
    assert control_facts(page, "param-similarity_threshold")["max"] == "0.99"
    assert control_facts(page, "param-cfg_type")["options"] == [
        "none",
        "self",
        "initialize",
        "full",
    ]
    assert control_facts(page, "param-width")["step"] == "64"

    probe = page.locator("#probe")
    probe.get_by_test_id("new-seed").click()
    probe.get_by_test_id("param-t_index_list").fill("32, 45")
    probe.get_by_test_id("param-t_index_list").press("Enter")
    probe.get_by_test_id("param-cfg_type").select_option("full")
    probe.get_by_test_id("prompt").press_sequentially("!", delay=10)
    page.wait_for_function("window.patches.length >= 4", timeout=5_000)
    sent = patches(page)
    assert [sorted(patch) for patch in sent] == [
        ["seed"],
        ["t_index_list"],
        ["cfg_type"],
        ["prompt"],
    ]
    assert sent[0]["seed"] != defaults["seed"]
    assert sent[1] == {"t_index_list": [32, 45]}
    assert sent[3] == {"prompt": defaults["prompt"] + "!"}
    # Every patch the page built is one the server's params model accepts.
    merged = dict(defaults)
    for patch in sent:
        merged.update(patch)
        DiffusionParams.model_validate(merged)

    probe.get_by_test_id("param-t_index_list").fill("32, many")
    probe.get_by_test_id("param-t_index_list").press("Enter")
    assert "numbers separated by commas" in probe.get_by_test_id("error-t_index_list").inner_text()


def test_passthrough_shows_only_its_controls(
    server: LiveServer, open_page: Callable[..., Any]
) -> None:
    page = open_page(server.url)
    page.get_by_test_id("param-delay_ms").wait_for()
    assert page.locator("#pipeline-name").inner_text() == "passthrough"
    assert page.get_by_test_id("prompt").count() == 0
    assert page.get_by_test_id("new-seed").count() == 0
    fields = page.evaluate(
        "[...document.querySelectorAll('#params-form [data-param]')].map((f) => f.dataset.param)"
    )
    assert fields == ["width", "height", "delay_ms"]
    delay = page.get_by_test_id("param-delay_ms")
    assert (delay.get_attribute("type"), delay.get_attribute("max")) == ("range", "2000")


def test_ice_servers_come_from_the_whip_link_headers(
    serve: Callable[..., LiveServer], open_page: Callable[..., Any]
) -> None:
    server = serve(
        ice_servers=["stun:stun.example.org:3478", "turn:turn.example.org:3478"],
        ice_username="studio",
        ice_credential="s3cret",
    )
    page = open_page(server.url)
    page.get_by_test_id("start").wait_for()
    servers = page.evaluate(
        """async () => {
          const { Api } = await import("/js/api.js");
          return new Api().iceServers();
        }"""
    )
    assert servers == [
        {"urls": "stun:stun.example.org:3478"},
        {"urls": "turn:turn.example.org:3478", "username": "studio", "credential": "s3cret"},
    ]
