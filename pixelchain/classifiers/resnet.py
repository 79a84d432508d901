"""ResNet for small images (He et al., 2016, the CIFAR variant): a 3x3 stem, three stages of
``blocks_per_stage`` basic blocks (two 3x3 convolutions with batch norm, identity or 1x1 strided
shortcut) at ``widths``, the second and third stage halving the resolution, global average
pooling and a linear layer. 6 * 5 + 2 = 32 layers by default, PixelDefend's ResNet-32 on
Fashion-MNIST (widths 4/8/16); images are standardised per image inside the model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from .base import Classifier, per_image_standardization


class BasicBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), the shortcut a strided 1x1 conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


@register("resnet")
class ResNet(Classifier):
    """Args: widths: channels of the three stages; blocks_per_stage: basic blocks per stage (n of 6n+2)."""

    def __init__(self, image_shape: tuple[int, int, int], num_levels: int, num_classes: int = 10,
                 widths: tuple[int, ...] = (4, 8, 16), blocks_per_stage: int = 5) -> None:
        super().__init__(image_shape, num_levels, num_classes)
        if len(widths) < 1 or any(int(w) < 1 for w in widths) or blocks_per_stage < 1:
            raise ValueError(f"widths must be positive and blocks_per_stage >= 1, got {widths}, {blocks_per_stage}")
        self.stem = nn.Sequential(nn.Conv2d(image_shape[0], widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def logits_from_unit(self, u: Tensor) -> Tensor:
        h = self.blocks(self.stem(per_image_standardization(u)))
        return self.fc(h.mean(dim=(2, 3)))
