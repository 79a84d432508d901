"""The classifier registry: p(y | x) models, kept apart from the density models of ``pixelchain.models``.

    clf = pc.classifiers.create("resnet", image_shape=(1, 28, 28), num_levels=256, num_classes=10)
    pc.fit(clf, train, valid)            # the one trainer: maximises log p(y | x)
    clf.predict(x)                       # x int64 [B, C, H, W] in [0, K) -> labels [B]
"""

from __future__ import annotations

from ..registry import Registry
from .base import Classifier

# One module per family; importing it registers its classifiers.
REGISTRY = Registry("classifier", __name__, ["logistic", "resnet", "vgg"],
                    fixed=("image_shape", "num_levels", "num_classes"))
CLASSIFIERS = REGISTRY.classes
register = REGISTRY.register


def list_classifiers() -> list[str]:
    """Registered classifier names."""
    return REGISTRY.names()


def create(name: str, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10,
           **hparams) -> Classifier:
    """Build the registered classifier ``name`` for images of ``image_shape`` (C, H, W) with K levels."""
    return REGISTRY.create(name, image_shape=tuple(image_shape), num_levels=num_levels, num_classes=num_classes,
                           **hparams)


__all__ = ["CLASSIFIERS", "Classifier", "create", "list_classifiers", "register"]
