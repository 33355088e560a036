"""The params a Livepeer stream carries, as every Livepeer door reads them (torch-free).

Livepeer sends a stream's params as one flat object: the transform's own fields beside a few
that only ai-runner's machinery reads (:data:`LIVEPEER_ONLY_FIELDS`). Every door strips those
before the engine validates the rest, and every door words a refusal the same way and refuses
only for the exceptions in :data:`PARAMS_REFUSALS`: anything else is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from livediff.engine.errors import EngineUnavailableError, ModelInUseError

#: Fields of ai-runner's ``BaseParams`` that only ai-runner reads: accepted, never passed on.
LIVEPEER_ONLY_FIELDS = frozenset({"show_reloading_frame"})

#: What the engine raises when a params set is refused (bad values, a model that cannot load, a
#: reload while other sessions use the model, no engine to apply them): the stream goes on.
PARAMS_REFUSALS: tuple[type[Exception], ...] = (
    ValidationError,
    ModelInUseError,
    EngineUnavailableError,
)


#: Livepeer's StreamDiffusion names of fields the transforms call otherwise: ``model_id`` (the
#: diffusion model in ai-runner's ``StreamDiffusionParams``) is the diffusion transform's
#: ``model``. A Livepeer door reads Livepeer's name; sent beside ours, it wins.
LIVEPEER_NAMES = {"model_id": "model"}


def transform_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A stream's params without the fields only Livepeer's own machinery reads, and with
    Livepeer's names of the transforms' fields turned into theirs (:data:`LIVEPEER_NAMES`)."""
    values = {key: value for key, value in params.items() if key not in LIVEPEER_ONLY_FIELDS}
    for livepeer, ours in LIVEPEER_NAMES.items():
        if livepeer in values:
            values[ours] = values.pop(livepeer)
    return values


def refusal_message(exc: BaseException) -> str:
    """A short reason: pydantic's errors as 'field: message', others as they are."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'params'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
    return str(exc)
