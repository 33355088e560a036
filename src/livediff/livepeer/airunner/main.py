"""The ``livediff-airunner`` command: livediff as the ai-runner live pipeline named ``livediff``.

In the orchestrator image (``CMD ["livediff-airunner"]``):

- ``livediff-airunner`` serves ai-runner's API on ``HOST``:``PORT`` (default 0.0.0.0:8000), which
  go-livepeer drives for ``"pipeline": "live-video-to-video", "model_id": "livediff"``;
- ``PREPARE_MODELS=1 livediff-airunner`` (or ``--prepare-models``) downloads what the transform
  needs into ``MODEL_DIR`` and exits. Prepare mode always goes online (``HF_HUB_OFFLINE=0``):
  fetching is its job, while the image keeps ``HF_HUB_OFFLINE=1`` for serving.

The transform and its defaults come from the ``LIVEDIFF_*`` settings, as for ``livediff serve``
(``LIVEDIFF_PIPELINE=diffusion`` in the image).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from livediff.config import Settings
from livediff.livepeer.airunner.params import params_class_path, runner_settings
from livediff.transforms import resolve_transform
from livediff.transforms.diffusion.models import ModelUnavailableError

if TYPE_CHECKING:
    from runner.live.pipelines import PipelineSpec

logger = logging.getLogger(__name__)

#: The pipeline's name: go-livepeer's ``model_id`` (and the container's ``MODEL_ID``) must match.
PIPELINE_NAME = "livediff"
PIPELINE_CLASS = "livediff.livepeer.airunner.pipeline:LivediffPipeline"


def preparing(argv: Sequence[str]) -> bool:
    """True in ai-runner's prepare mode (``PREPARE_MODELS=1`` or ``--prepare-models``)."""
    return os.getenv("PREPARE_MODELS") == "1" or "--prepare-models" in argv


def initial_params(settings: Settings) -> dict[str, Any]:
    """The selected transform's defaults (``livediff serve``'s, from the settings), as JSON.

    ai-runner starts the pipeline with them and returns to them when a stream ends.
    """
    transform = resolve_transform(settings.pipeline)
    transform.check_available(settings)
    params = transform.params_model.model_validate(transform.default_params(settings))
    return params.model_dump(mode="json")


def build_spec(settings: Settings | None = None) -> PipelineSpec:
    """ai-runner's ``PipelineSpec`` for livediff with the configured transform."""
    from runner.live.pipelines import PipelineSpec

    chosen = settings or runner_settings()
    return PipelineSpec(
        name=PIPELINE_NAME,
        pipeline_cls=PIPELINE_CLASS,
        params_cls=params_class_path(chosen.pipeline),
        initial_params=initial_params(chosen),
    )


def spec_or_exit() -> PipelineSpec:
    """The spec, or exit 2 with a message that says what to fix."""
    try:
        return build_spec()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"livediff-airunner: invalid {field}: {error['msg']}", file=sys.stderr)
    except ModelUnavailableError as exc:
        print(f"livediff-airunner: {exc}", file=sys.stderr)
        print(
            "livediff-airunner: in the orchestrator image, prepare models by running the image once"
            " with PREPARE_MODELS=1 and the models folder mounted at /models",
            file=sys.stderr,
        )
    except LookupError as exc:
        print(f"livediff-airunner: {exc}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Prepare models or serve, as ai-runner's ``start_app`` decides from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if preparing(args) and os.environ.get("HF_HUB_OFFLINE", "0") != "0":
        logger.warning("prepare mode: setting HF_HUB_OFFLINE=0 to download models")
        os.environ["HF_HUB_OFFLINE"] = "0"
    from runner.app import start_app

    start_app(pipeline=spec_or_exit())
