"""TEST DOUBLE of ``runner.live.pipelines.loader`` (ai-runner v0.14.1), import guard included.

``parse_pipeline_params`` imports the params class under the same guard as the real loader: the
import (and validation) must finish within 0.5 s and must not newly import torch, streamdiffusion
or comfystream.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runner.live.pipelines.interface import BaseParams, Pipeline
from runner.live.pipelines.spec import PipelineSpec

EXPENSIVE_MODULES = ("torch", "streamdiffusion", "comfystream")


def _import_class(import_path: str) -> Any:
    module_name, class_name = import_path.rsplit(":", 1)
    return getattr(importlib.import_module(module_name), class_name)


def load_pipeline_class(pipeline_cls: str) -> type[Pipeline]:
    found: type[Pipeline] = _import_class(pipeline_cls)
    return found


def load_pipeline(pipeline_spec: PipelineSpec) -> Pipeline:
    return load_pipeline_class(pipeline_spec.pipeline_cls)()


@contextmanager
def _no_expensive_imports(timeout: float = 0.5) -> Iterator[None]:
    before = {name for name in EXPENSIVE_MODULES if name in sys.modules}
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        added = {name for name in EXPENSIVE_MODULES if name in sys.modules} - before
        if elapsed > timeout:
            raise TimeoutError(f"Import took {elapsed:.3f}s, exceeded timeout of {timeout}s.")
        if added:
            raise ImportError(f"Import imported expensive modules: {added}")


def parse_pipeline_params(spec: PipelineSpec, params: dict[str, Any]) -> BaseParams:
    """Validate ``params`` with the spec's params class (BaseParams when there is none)."""
    with _no_expensive_imports():
        if spec.params_cls is None:
            return BaseParams(**params)
        params_class = _import_class(spec.params_cls)
        parsed: BaseParams = params_class(**params)
        return parsed
