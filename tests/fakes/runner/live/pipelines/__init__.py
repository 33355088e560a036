"""TEST DOUBLE of ``runner.live.pipelines`` (ai-runner v0.14.1)."""

from runner.live.pipelines.interface import BaseParams, Pipeline
from runner.live.pipelines.spec import PipelineSpec, builtin_pipeline_spec

__all__ = ["BaseParams", "Pipeline", "PipelineSpec", "builtin_pipeline_spec"]
