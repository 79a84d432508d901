"""ImageDataset: the one in-memory form every dataset takes before it reaches a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageDataset:
    """Images as integers in [0, num_levels), shape [N, C, H, W], dtype int64.

    ``labels`` (int64 [N]) is present for labelled datasets. When ``intensities`` is set
    (float [N, C, H, W] in [0, 1]), the dataset is *dynamically binarised*: every call to
    :meth:`batch` draws fresh pixels ~ Bernoulli(intensity); ``images`` then holds one fixed
    draw (seeded), so evaluation is reproducible but not comparable with the static sets.
    """

    images: Tensor
    num_levels: int
    labels: Tensor | None = None
    name: str = ""
    split: str = ""
    intensities: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.int64 or self.images.dim() != 4:
            raise ValueError(
                f"ImageDataset.images must be int64 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {self.num_levels}")
        if len(self.images) and (self.images.min() < 0 or self.images.max() >= self.num_levels):
            raise ValueError(
                f"image values must lie in [0, {self.num_levels}), found "
                f"[{int(self.images.min())}, {int(self.images.max())}]"
            )
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The images at ``index`` (int64 [B, C, H, W]); a fresh binarisation if dynamic."""
        if self.intensities is None:
            return self.images[index]
        return torch.bernoulli(self.intensities[index], generator=generator).long()

    def __getitem__(self, index: int | slice | Tensor | list[int]) -> Tensor | ImageDataset:
        """``ds[i]``: image i, int64 [C, H, W]; ``ds[a:b]``, ``ds[indices]``: an ImageDataset of
        those examples (``subset``)."""
        if isinstance(index, int) or (isinstance(index, Tensor) and index.dim() == 0):
            return self.images[index]
        return self.subset(torch.as_tensor(index) if isinstance(index, list) else index)

    def subset(self, index: Tensor | slice) -> ImageDataset:
        """A new dataset holding the selected examples (same levels and name)."""
        return ImageDataset(
            images=self.images[index],
            num_levels=self.num_levels,
            labels=None if self.labels is None else self.labels[index],
            name=self.name,
            split=self.split,
            intensities=None if self.intensities is None else self.intensities[index],
        )

    def __add__(self, other: ImageDataset) -> ImageDataset:
        """The examples of both, in order (e.g. train + valid to refit after model selection)."""
        if other.image_shape != self.image_shape or other.num_levels != self.num_levels:
            raise ValueError(f"cannot join {self!r} and {other!r}: different image shapes or levels")
        if (self.labels is None) != (other.labels is None) or (self.intensities is None) != (other.intensities is None):
            raise ValueError(f"cannot join {self!r} and {other!r}: only one has labels or intensities")

        def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])

        return ImageDataset(join(self.images, other.images), self.num_levels, join(self.labels, other.labels),
                            self.name, f"{self.split}+{other.split}", join(self.intensities, other.intensities))

    def __repr__(self) -> str:
        dynamic = ", dynamically binarised" if self.intensities is not None else ""
        return (
            f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.image_shape}, num_levels={self.num_levels}{dynamic})"
        )
