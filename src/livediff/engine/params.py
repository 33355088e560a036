"""How params are built and checked before any transform sees them: pure, so any thread may ask.

A session's params are values over a base (its current params, or the defaults of what is
loaded), validated by the transform's params model, and every model id they name must be on the
allow-list. Nothing here reads state that changes: the defaults come in as an argument (the
worker publishes them, see :class:`livediff.engine.worker_side.ModelSnapshot`) and the allow-list
is fixed when the engine is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from livediff.config import Settings
from livediff.transforms import AnyTransform, TransformParams


class ParamsRules:
    """The transform's params model and the model ids a server allows, applied to values."""

    def __init__(self, settings: Settings, transform: AnyTransform) -> None:
        self._kind = type(transform)
        self.params_model = transform.params_model
        #: Model ids params may name: the configured ones, the transform's defaults and
        #: ``allow_models``; nothing else reaches the transform's loader.
        self.allowed_models = self._models_allowed(settings)

    def configured_defaults(self, settings: Settings) -> dict[str, Any]:
        """What a session's params start from before anything is loaded."""
        return self._kind.default_params(settings)

    def _models_allowed(self, settings: Settings) -> frozenset[str]:
        configured = {settings.model, settings.vae, *settings.allow_models}
        return frozenset(configured | self._kind.configured_model_ids(settings))

    def validate(
        self,
        values: Mapping[str, Any],
        defaults: Mapping[str, Any],
        base: TransformParams | None = None,
    ) -> TransformParams:
        """``values`` over ``base`` (or over ``defaults``), validated by the params model, whose
        model ids must be on the allow-list (raises pydantic.ValidationError naming the bad
        field)."""
        start = base.model_dump() if base is not None else defaults
        params = self.params_model.model_validate({**start, **values})
        refusals = self._models_refused(params)
        if refusals:
            raise ValidationError.from_exception_data(type(params).__name__, refusals)
        return params

    def _models_refused(self, params: TransformParams) -> list[InitErrorDetails]:
        return [
            {
                "type": PydanticCustomError(
                    "model_not_allowed",
                    "{value} is not an allowed model on this server; start it with"
                    " --allow-model {value} (or add it to LIVEDIFF_ALLOW_MODELS) to allow it",
                    {"value": value},
                ),
                "loc": loc,
                "input": value,
            }
            for loc, value in self._kind.model_ids(params).items()
            if value not in self.allowed_models
        ]
