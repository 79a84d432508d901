"""Classifier: what every p(y | x) model shares (input checks, likelihood, prediction).

A subclass builds its network and implements ``logits_from_unit(u)``: float images
[B, C, H, W] in [0, 1] -> class logits [B, num_classes]. Integer images in [0, K) enter through
``forward``, which scales them to [0, 1]; attacks (pixelchain.attacks) differentiate
``logits_from_unit`` with respect to the float image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..heads import sample_inverse_cdf
from ..models.base import RecordsInitArgs, check_images


class Classifier(RecordsInitArgs, nn.Module):
    """p(y | x) over ``num_classes`` labels for images of ``image_shape`` with ``num_levels`` levels."""

    name = ""  # registry name, set by @register
    kind = "classifier"

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, num_classes: int) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_levels, self.num_classes = int(num_levels), int(num_classes)

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def logits_from_unit(self, u: Tensor) -> Tensor:
        """Class logits [B, num_classes] of float images u [B, C, H, W] in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Class logits [B, num_classes] of int64 images x [B, C, H, W] in [0, K)."""
        dtype = next(self.parameters()).dtype
        return self.logits_from_unit(x.to(dtype) / (self.num_levels - 1))

    def check_input(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Validate a batch (and labels, if given) and return it as int64; ValueError names the problem."""
        x = check_images(x, self.image_shape, self.num_levels)
        if labels is not None:
            labels = torch.as_tensor(labels, device=x.device)
            if labels.shape != (len(x),) or labels.is_floating_point():
                raise ValueError(f"labels must be integers of shape [{len(x)}], "
                                 f"got {labels.dtype} {list(labels.shape)}")
            labels = labels.long()
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return x, labels

    def log_likelihood(self, logits: Tensor, x: Tensor, labels: Tensor) -> Tensor:
        """log p(labels | x) [B] in nats from the output of ``forward`` (what training maximises)."""
        return logits.log_softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)

    def log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        """log p(labels | x): [B], nats."""
        x, labels = self.check_input(x, labels)
        if labels is None:
            raise ValueError("log_prob needs labels [B]")
        return self.log_likelihood(self(x), x, labels)

    def predict(self, x: Tensor) -> Tensor:
        """The most likely label of each image: [B]."""
        return self(self.check_input(x)[0]).argmax(-1)

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw labels y ~ p(y | x) by inverse CDF of uniforms: [B]."""
        logits = self(self.check_input(x)[0])
        uniform = torch.rand(len(logits), generator=generator, dtype=torch.float64)
        return sample_inverse_cdf(logits.log_softmax(-1), uniform.to(logits.device))

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, num_levels={self.num_levels}, num_classes={self.num_classes}"


def per_image_standardization(u: Tensor) -> Tensor:
    """(u - mean) / max(std, 1 / sqrt(D)) per image, as tf.image.per_image_standardization: [B, ...]."""
    flat = u.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True).clamp_min(1.0 / math.sqrt(flat.shape[1]))
    return ((flat - mean) / std).view_as(u)
