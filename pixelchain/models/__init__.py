"""The density-model registry: every model family registers its class under a name here
(classifiers have their own, pixelchain.classifiers)."""

from __future__ import annotations

import inspect
from importlib import import_module

from torch import nn

from .base import AutoregressiveModel

MODELS: dict[str, type[nn.Module]] = {}

# One module per family; importing it registers its models.
_FAMILIES = ["fully_visible", "nade", "made", "pixelcnn", "pixelcnnpp", "pixelrnn", "transformer"]


def register(name: str):
    """Class decorator: make a model available to ``create`` and the CLI as ``name``."""

    def add(cls):
        if name in MODELS:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return add


def list_models(kind: str | None = None) -> list[str]:
    """Registered density-model names (classifiers: pixelchain.classifiers); ``kind`` filters by kind."""
    _import_families()
    return sorted(n for n, cls in MODELS.items() if kind is None or cls.kind == kind)


def create(name: str, image_shape: tuple[int, int, int], num_levels: int, **hparams) -> nn.Module:
    """Build the registered model ``name`` for images of ``image_shape`` (C, H, W) with K levels."""
    _import_families()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "image_shape", "num_levels")]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}; its hyperparameters are {known}")
    return cls(image_shape=tuple(image_shape), num_levels=num_levels, **hparams)


def _import_families() -> None:
    for family in _FAMILIES:
        import_module(f"{__name__}.{family}")


__all__ = ["AutoregressiveModel", "MODELS", "create", "list_models", "register"]
