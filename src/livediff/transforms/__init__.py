"""Transforms and the registry that finds them by name.

Nothing here imports torch: a transform's module is imported only when it is selected.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from livediff.transforms.base import AnyJob, AnyTransform, Job, Transform, TransformParams

__all__ = [
    "BUILTIN_TRANSFORMS",
    "AnyJob",
    "AnyTransform",
    "Job",
    "Transform",
    "TransformParams",
    "resolve_transform",
]

#: Built-in transforms: name -> "module:Class".
BUILTIN_TRANSFORMS: dict[str, str] = {
    "passthrough": "livediff.transforms.passthrough:PassthroughTransform",
    "diffusion": "livediff.transforms.diffusion.transform:DiffusionTransform",
    "video": "livediff.transforms.video.transform:VideoTransform",
}

ENTRY_POINT_GROUP = "livediff.transforms"


class UnknownTransformError(LookupError):
    """The pipeline name matches no built-in, entry point or importable 'module:Class'."""


def _import_class(target: str) -> type[AnyTransform]:
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        found = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise UnknownTransformError(f"cannot import transform {target!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Transform)):
        raise UnknownTransformError(f"{target!r} is not a livediff Transform subclass")
    return found


def available_transforms() -> dict[str, str]:
    """Built-ins plus installed entry points ('livediff.transforms' group)."""
    found = dict(BUILTIN_TRANSFORMS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
    return found


def resolve_transform(name: str) -> type[AnyTransform]:
    """The transform class for a pipeline name or a 'package.module:Class' path."""
    known = available_transforms()
    if name in known:
        return _import_class(known[name])
    if ":" in name:
        return _import_class(name)
    choices = ", ".join(sorted(known))
    raise UnknownTransformError(f"unknown pipeline {name!r}; choose one of: {choices}")
