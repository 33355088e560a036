"""Params classes that ai-runner validates stream params with. Torch-free, by ai-runner's rule.

ai-runner imports the class named in ``PipelineSpec.params_cls`` under a guard: the import must
take under 0.5 s and must not newly import torch. So this module imports only pydantic models:
ai-runner's ``BaseParams`` and livediff's torch-free transform params.

Each class is ai-runner's ``BaseParams`` (``width``/``height`` 384..1024 in steps of 64,
``show_reloading_frame``) combined with a transform's own params, whose fields, defaults and
validators it inherits unchanged, so that a stream's params mean on the network what they mean to
``livediff serve``. Unknown keys are rejected (``extra="forbid"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict
from runner.live.pipelines import BaseParams

from livediff.config import Settings
from livediff.transforms.diffusion.params import DiffusionParams
from livediff.transforms.passthrough import PassthroughParams


class LivediffParams(BaseParams, DiffusionParams):  # type: ignore[misc]  # ai-runner is untyped
    """Stream params of the diffusion pipeline: prompt, negative_prompt, seed, strength or
    t_index_list, guidance_scale, delta, cfg_type, similarity_threshold, model, vae, plus
    ai-runner's width, height and show_reloading_frame."""

    model_config = ConfigDict(extra="forbid")


class PassthroughRunnerParams(BaseParams, PassthroughParams):  # type: ignore[misc]
    """Stream params of the passthrough pipeline (``delay_ms`` imitates a slow model)."""

    model_config = ConfigDict(extra="forbid")


#: Runner params class for each built-in transform, as ai-runner's 'module:Class' path.
PARAMS_CLASSES: dict[str, str] = {
    "diffusion": f"{__name__}:LivediffParams",
    "passthrough": f"{__name__}:PassthroughRunnerParams",
}


def params_class_path(pipeline: str) -> str | None:
    """The params class for a transform name; None (ai-runner's BaseParams) for other transforms,
    whose params the pipeline then validates itself."""
    return PARAMS_CLASSES.get(pipeline)


def runner_settings(**overrides: Any) -> Settings:
    """livediff's settings (``LIVEDIFF_*``) as the runner uses them: the default output size is
    ai-runner's, because its decoder sizes input frames by the same default."""
    sizes = {name: BaseParams.model_fields[name].default for name in ("width", "height")}
    return Settings(**{**sizes, **overrides})


#: Stream params that also configure the engine itself: the model to load and the default size.
ENGINE_FIELDS = ("model", "vae", "width", "height")


def settings_for_params(settings: Settings, params: Mapping[str, Any]) -> Settings:
    """``settings`` with the model and size a stream's params name, so that ``initialize``
    loads that model first (not the configured default, which may not even be downloaded)."""
    chosen = {name: params[name] for name in ENGINE_FIELDS if params.get(name) is not None}
    return Settings(**{**settings.model_dump(exclude_unset=True), **chosen}) if chosen else settings
