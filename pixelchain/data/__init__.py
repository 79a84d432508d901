"""Datasets as ImageDataset: ``load(name, split)`` finds, verifies (or downloads) and parses the files.

Datasets (``list_datasets()``), all with splits "train", "valid", "test" and "train+valid":

- digits: scikit-learn's bundled 8x8 digits, 1x8x8, 17 levels, labels; train/valid/test = the first
  1257 / next 270 / last 270 in the file's order. Never downloads.
- mnist, fashion_mnist: 1x28x28, 256 levels, labels; valid = the last 10,000 training images.
- binarized_mnist: Larochelle & Murray's static binarisation, 1x28x28, 2 levels, 50k/10k/10k, no labels.
- caltech101_silhouettes: 28x28 split 1, 1x28x28, 2 levels, labels 0..100; flipped so that 1 = object
  (the file stores 0 = silhouette), 4100/2264/2307.
- cifar10: 3x32x32, 256 levels, labels; valid = the last 5,000 training images.

Your own images (a folder, an image file, a .npy/.npz, an array): ``from_images(source, split)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import sources
from .dataset import ImageDataset
from .download import DataError, fetch
from .images import from_images
from .transforms import check_options, quantize, transform

__all__ = ["DataError", "ImageDataset", "from_images", "list_datasets", "load", "quantize"]


def list_datasets() -> list[str]:
    """The names ``load`` accepts."""
    return list(sources.SOURCES)


def load(
    name: str,
    split: str = "train",
    *,
    num_levels: int | None = None,
    binarize: str | None = None,
    download: bool | None = None,
    root: str | Path | None = None,
) -> ImageDataset:
    """Dataset ``name``'s ``split`` as int64 images [N, C, H, W] (and int64 labels [N] if it has them).

    num_levels: quantise to fewer levels (floor(x * num_levels / K)). binarize: "threshold" (x >= K/2)
    or "dynamic" (Bernoulli(x / (K - 1)), see ImageDataset), for greyscale sets of more than 2 levels.
    download: allow downloading missing files (default: unless $PIXELCHAIN_OFFLINE is set).
    root: a folder searched first (see pixelchain.data.download for the search order).
    Raises ValueError for unknown names, splits or options, DataError when the files are not at hand.
    """
    if name not in sources.SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose from {list_datasets()}")
    if split not in sources.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(sources.SPLITS)}")
    source = sources.SOURCES[name]
    check_options(source.num_levels, source.shape[0], num_levels, binarize)

    parts: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    images, labels = [], []
    for s in split.split("+"):
        part, rows = source.splits[s]
        if part not in parts:
            paths = [fetch(source, f, root, download) for f in source.files[part]]
            parts[part] = source.read(paths, part)
        x, y = parts[part]
        if x.shape[1:] != source.shape:
            raise DataError(f"{name}: expected images of shape {source.shape}, the files hold {x.shape[1:]}")
        images.append(x[rows])
        labels.append(None if y is None else y[rows])

    ds = ImageDataset(
        images=torch.from_numpy(np.concatenate(images).astype(np.int64)),
        num_levels=source.num_levels,
        labels=None if labels[0] is None else torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        name=name,
        split=split,
    )
    return transform(ds, num_levels, binarize)
