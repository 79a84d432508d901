"""The classifier registry: p(y | x) models, kept apart from the density models of ``pixelchain.models``.

    clf = pc.classifiers.create("resnet", image_shape=(1, 28, 28), num_levels=256, num_classes=10)
    pc.fit(clf, train, valid)            # the one trainer: maximises log p(y | x)
    clf.predict(x)                       # x int64 [B, C, H, W] in [0, K) -> labels [B]
"""

from __future__ import annotations

import inspect
from importlib import import_module

from .base import Classifier

CLASSIFIERS: dict[str, type[Classifier]] = {}

# One module per family; importing it registers its classifiers.
_FAMILIES = ["logistic", "resnet", "vgg"]


def register(name: str):
    """Class decorator: make a classifier available to ``create`` (and checkpoints) as ``name``."""

    def add(cls):
        if name in CLASSIFIERS:
            raise ValueError(f"classifier name {name!r} registered twice")
        cls.name = name
        CLASSIFIERS[name] = cls
        return cls

    return add


def list_classifiers() -> list[str]:
    """Registered classifier names."""
    _import_families()
    return sorted(CLASSIFIERS)


def create(name: str, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10,
           **hparams) -> Classifier:
    """Build the registered classifier ``name`` for images of ``image_shape`` (C, H, W) with K levels."""
    _import_families()
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; registered: {', '.join(sorted(CLASSIFIERS))}")
    cls = CLASSIFIERS[name]
    known = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "image_shape", "num_levels", "num_classes")]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}; its hyperparameters are {known}")
    return cls(image_shape=tuple(image_shape), num_levels=num_levels, num_classes=num_classes, **hparams)


def _import_families() -> None:
    for family in _FAMILIES:
        import_module(f"{__name__}.{family}")


__all__ = ["CLASSIFIERS", "Classifier", "create", "list_classifiers", "register"]
