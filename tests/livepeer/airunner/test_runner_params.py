"""The params classes ai-runner validates with: torch-free, fast to import, same fields as serve."""

from __future__ import annotations

import json
import sys

import pytest
from pydantic import ValidationError
from runner.live.pipelines import BaseParams

from livediff.livepeer.airunner.params import (
    LivediffParams,
    PassthroughRunnerParams,
    runner_settings,
)
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.passthrough import PassthroughParams
from tests.livepeer.airunner.conftest import run_runner

HEAVY = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors")

#: Runs in a fresh interpreter: ai-runner's loader parses params with the class named in the
#: spec, under its guard (the import must take under 0.5 s and must not newly import torch).
GUARDED_PARSE = """
import json, sys
from runner.live.pipelines import PipelineSpec
from runner.live.pipelines.loader import parse_pipeline_params

loaded_before = set(sys.modules)
spec = PipelineSpec(name="livediff", pipeline_cls="x:Y", params_cls=sys.argv[1])
params = parse_pipeline_params(spec, {"width": 640, "height": 384})
print(json.dumps({
    "class": type(params).__name__,
    "resolution": params.get_output_resolution(),
    "new_modules": sorted(set(sys.modules) - loaded_before),
}))
"""


@pytest.mark.parametrize(
    "params_cls",
    [
        "livediff.livepeer.airunner.params:LivediffParams",
        "livediff.livepeer.airunner.params:PassthroughRunnerParams",
    ],
)
def test_ai_runner_imports_the_params_class_under_its_guard(params_cls: str) -> None:
    done = run_runner([sys.executable, "-c", GUARDED_PARSE, params_cls])
    assert done.returncode == 0, done.stderr  # the guard raises on torch or on > 0.5 s
    parsed = json.loads(done.stdout)
    assert parsed["class"] == params_cls.rsplit(":", 1)[1]
    assert parsed["resolution"] == [640, 384]
    heavy = [m for m in parsed["new_modules"] if m.split(".")[0] in HEAVY]
    assert heavy == [], f"the params import pulled in {heavy}"


def test_livediff_params_carry_the_diffusion_fields_with_serve_defaults() -> None:
    own = set(DiffusionParams.model_fields) - {"width", "height"}
    assert own <= set(LivediffParams.model_fields)
    defaults = LivediffParams()
    serve_defaults = DiffusionParams()
    for name in own:
        assert getattr(defaults, name) == getattr(serve_defaults, name), name
    assert isinstance(defaults, BaseParams)
    assert defaults.get_output_resolution() == (512, 512)
    assert defaults.show_reloading_frame is True


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"width": 320}, "width"),  # ai-runner's bounds: 384..1024
        ({"height": 1000}, "height"),  # multiple of 64
        ({"t_index_list": [30, 10]}, "t_index_list"),  # diffusion's own validator
        ({"strength": 0}, "strength"),
        ({"prompt_strength": 1}, "prompt_strength"),  # unknown keys are refused
    ],
)
def test_livediff_params_refuse_bad_values_naming_the_field(
    values: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        LivediffParams(**values)
    assert [error["loc"][0] for error in raised.value.errors()] == [field]


def test_a_prompt_blend_and_steps_validate_as_for_serve() -> None:
    params = LivediffParams(prompt=[["a fox", 1.0], ["a wolf", 0.5]], t_index_list=[10, 30])
    assert params.weighted_prompts() == (("a fox", 1.0), ("a wolf", 0.5))
    assert params.steps() == (10, 30)


def test_passthrough_runner_params_carry_delay_ms() -> None:
    assert set(PassthroughParams.model_fields) <= set(PassthroughRunnerParams.model_fields)
    assert PassthroughRunnerParams(delay_ms=40).delay_ms == 40
    with pytest.raises(ValidationError):
        PassthroughRunnerParams(delay_ms=-1)


def test_runner_settings_keep_ai_runners_default_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """ai-runner's decoder sizes input by its own default; livediff's must not differ."""
    monkeypatch.setenv("LIVEDIFF_WIDTH", "768")
    monkeypatch.setenv("LIVEDIFF_MAX_BATCH", "2")
    settings = runner_settings()
    assert (settings.width, settings.height, settings.max_batch) == (512, 512, 2)
