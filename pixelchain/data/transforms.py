"""Fewer levels: quantisation, and static (threshold) or dynamic (sampled) binarisation; and the
label-preserving augmentation a classifier trains with (random flips and shifts)."""

from __future__ import annotations

import torch
from torch import Tensor

from .dataset import ImageDataset

BINARIZE = ("threshold", "dynamic")
SEED = 0  # the one fixed draw of a dynamically binarised set


def quantize(images: Tensor, from_levels: int, to_levels: int) -> Tensor:
    """Integer images [...] in [0, from_levels) -> floor(x * to_levels / from_levels) in [0, to_levels)."""
    return images * to_levels // from_levels


def check_options(native_levels: int, channels: int, num_levels: int | None, binarize: str | None) -> None:
    """Raise ValueError unless the options make sense for a dataset of these levels and channels."""
    if num_levels is not None and binarize is not None:
        raise ValueError("pass num_levels or binarize, not both (binarize already gives 2 levels)")
    if num_levels is not None and not 2 <= num_levels <= native_levels:
        raise ValueError(f"num_levels must be in [2, {native_levels}] for this dataset, got {num_levels}")
    if binarize is not None and binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")
    if binarize is not None and (channels != 1 or native_levels <= 2):
        raise ValueError(
            f"binarize applies to greyscale sets with more than 2 levels; this one has {channels} "
            f"channel(s) and {native_levels} levels"
        )


def transform(ds: ImageDataset, num_levels: int | None = None, binarize: str | None = None) -> ImageDataset:
    """``ds`` quantised to ``num_levels``, or binarised by ``binarize`` ("threshold" or "dynamic").

    threshold: x >= K/2 -> 1. dynamic: intensities x / (K - 1) (float32), images one seeded draw of
    Bernoulli(intensities); :meth:`ImageDataset.batch` then draws afresh. K = ds.num_levels.
    """
    check_options(ds.num_levels, ds.image_shape[0], num_levels, binarize)
    k, intensities = ds.num_levels, None
    if num_levels is not None:
        images, k = quantize(ds.images, k, num_levels), num_levels
    elif binarize == "threshold":
        images, k = (2 * ds.images >= k).long(), 2
    elif binarize == "dynamic":
        intensities = ds.images.float() / (k - 1)
        images = torch.bernoulli(intensities, generator=torch.Generator().manual_seed(SEED)).long()
        k = 2
    else:
        return ds
    return ImageDataset(images, k, ds.labels, ds.name, ds.split, intensities)


def augment(images: Tensor, generator: torch.Generator | None = None, shift: int = 2) -> Tensor:
    """Each image of ``images`` (int64 [B, C, H, W]) mirrored left-right with probability 1/2 and
    translated by up to ``shift`` pixels in each direction (a uniform draw per image and axis), the
    uncovered border filled with level 0: the augmentation a classifier of centred, roughly
    left-right symmetric images (Fashion-MNIST) trains with. Draws come from ``generator`` (CPU)."""
    B, C, H, W = images.shape
    flip = torch.rand(B, generator=generator) < 0.5
    offsets = torch.randint(0, 2 * shift + 1, (2, B), generator=generator)
    out = torch.where(flip.view(B, 1, 1, 1).to(images.device), images.flip(3), images)
    padded = torch.nn.functional.pad(out, (shift, shift, shift, shift))
    rows = (offsets[0].view(B, 1) + torch.arange(H)).to(images.device)  # [B, H]
    cols = (offsets[1].view(B, 1) + torch.arange(W)).to(images.device)  # [B, W]
    batch = torch.arange(B, device=images.device).view(B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(B, H, 1), cols.view(B, 1, W)].permute(0, 3, 1, 2).contiguous()
