"""The density-model registry: every model family registers its class under a name here
(classifiers have their own, pixelchain.classifiers)."""

from __future__ import annotations

from torch import nn

from ..registry import Registry
from .base import AutoregressiveModel

# One module per family; importing it registers its models.
REGISTRY = Registry("model", __name__, ["fully_visible", "nade", "made", "pixelcnn", "pixelcnnpp", "pixelrnn",
                                        "transformer"], fixed=("image_shape", "num_levels"))
MODELS = REGISTRY.classes
register = REGISTRY.register


def list_models(kind: str | None = None) -> list[str]:
    """Registered density-model names (classifiers: pixelchain.classifiers); ``kind`` filters by kind."""
    return [n for n in REGISTRY.names() if kind is None or MODELS[n].kind == kind]


def create(name: str, image_shape: tuple[int, int, int], num_levels: int, **hparams) -> nn.Module:
    """Build the registered model ``name`` for images of ``image_shape`` (C, H, W) with K levels;
    ``hparams`` are the family's hyperparameters (``pixelchain list MODEL``, ``hyperparameters(name)``;
    ``num_classes=N`` makes the Gated PixelCNN class-conditional). The families and their defaults:
    """
    return REGISTRY.create(name, image_shape=tuple(image_shape), num_levels=num_levels, **hparams)


def hyperparameters(name: str) -> dict:
    """The hyperparameters of model ``name`` and their defaults."""
    return REGISTRY.hyperparameters(name)


def describe(name: str) -> str:
    """Model ``name``: its summary and hyperparameters with defaults (``pixelchain list MODEL``)."""
    return REGISTRY.describe(name)


create.__doc__ += "\n" + "\n\n".join("    " + describe(n).replace("\n", "\n    ") for n in list_models())


__all__ = ["AutoregressiveModel", "MODELS", "create", "describe", "hyperparameters", "list_models", "register"]
