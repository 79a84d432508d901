"""A small VGG-style network (Simonyan & Zisserman, 2015): per stage two 3x3 convolutions with
batch norm and ReLU, then 2x2 max pooling; a hidden fully connected layer with dropout, then the
logits. Default: conv 32-32-pool-64-64-pool-fc 256."""

from __future__ import annotations

from torch import Tensor, nn

from . import register
from .base import Classifier, per_image_standardization


@register("vgg")
class VGG(Classifier):
    """Args: widths: channels per stage (each stage halves the resolution); hidden: fc units; dropout."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 64), hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__(image_shape, num_levels, num_classes)
        C, H, W = self.image_shape
        if len(widths) < 1 or any(int(w) < 1 for w in widths) or hidden < 1 or not 0 <= dropout < 1:
            raise ValueError(f"widths and hidden must be positive and dropout in [0, 1), "
                             f"got {widths}, {hidden}, {dropout}")
        if H >> len(widths) < 1 or W >> len(widths) < 1:
            raise ValueError(f"{len(widths)} pooling stages do not fit images of {H}x{W}")
        layers, channels = [], C
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * (H >> len(widths)) * (W >> len(widths)), hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def logits_from_unit(self, u: Tensor) -> Tensor:
        return self.classifier(self.features(per_image_standardization(u)))
