"""Logistic regression: p(y | x) = softmax(W x / (K - 1) + b), the conditional categorical model
of the first chapter, trained by maximum likelihood (cross-entropy)."""

from __future__ import annotations

from torch import Tensor, nn

from . import register
from .base import Classifier


@register("logistic_regression")
class LogisticRegression(Classifier):
    """p(y | x) = softmax(W u + b) with u = x / (K - 1) flattened."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10) -> None:
        super().__init__(image_shape, num_levels, num_classes)
        self.linear = nn.Linear(self.num_dims, num_classes)

    def logits_from_unit(self, u: Tensor) -> Tensor:
        return self.linear(u.flatten(1))
