"""TEST DOUBLE of ``runner.live.pipelines.spec`` (ai-runner v0.14.1)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator


class PipelineSpec(BaseModel):
    """Where to import a pipeline and its params class from ('pkg.module:Class')."""

    name: str = ""
    pipeline_cls: str
    params_cls: str | None = None
    initial_params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, values: Any) -> Any:
        if isinstance(values, dict) and not values.get("name") and "pipeline_cls" in values:
            class_name = str(values["pipeline_cls"]).rsplit(":", 1)[-1]
            values = {**values, "name": class_name.lower().removesuffix("pipeline")}
        return values


def builtin_pipeline_spec(name: str) -> PipelineSpec | None:
    """The runtime's own pipelines; the double has none."""
    return None
