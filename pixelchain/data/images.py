"""Datasets of the user's own images: ``from_images(path_or_array, split)``.

The source is a folder of image files (any format Pillow reads), one image file, a ``.npy`` /
``.npz`` of integer levels (see ``pixelchain.io``), or an integer array / tensor [N, C, H, W] or
[N, H, W]. Levels are the data's own: an image file's depth (2, 256 or 65536), an ``.npz``'s
``num_levels``, else an array's largest value + 1; ``num_levels`` / ``binarize`` transform them as
for the built-in sets. Splits are carved out deterministically: a permutation of the N images
seeded with ``SPLIT_SEED``, its first ``HELD_OUT`` share the test split, the next the valid split,
the rest train; the same files in the same order give the same splits on every machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .dataset import ImageDataset
from .transforms import transform

SPLIT_SEED = 0
HELD_OUT = 0.1  # the share of the images in each of the valid and test splits
SPLITS = ("train", "valid", "test", "train+valid", "all")


def split_rows(n: int, split: str) -> Tensor:
    """The rows of ``split`` among n images (int64, in the images' order)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    if split == "all":
        return torch.arange(n)
    if n < 3:
        raise ValueError(f"{n} images: at least 3 are needed to carve out a valid and a test split")
    k = max(1, round(n * HELD_OUT))
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    parts = {"test": permutation[:k], "valid": permutation[k : 2 * k], "train": permutation[2 * k :]}
    rows = torch.cat([parts[s] for s in split.split("+")])
    return rows.sort().values


@lru_cache(maxsize=1)
def _read(path: Path, stamp: tuple, grey: bool | None, resize: tuple[int, int] | None):
    """(images, labels or None, levels or None) of a folder, image file or array file; kept for the
    next call on the same unchanged data (``stamp``: names and modification times), so a run's
    train, valid and test splits read the files once."""
    from .. import io

    if path.suffix.lower() in io.ARRAY_SUFFIXES:
        return io.read_array(path)
    if resize is not None and (len(resize) != 2 or not all(isinstance(s, int) and s > 0 for s in resize)):
        raise ValueError(f"resize must be two positive integers (H, W), got {resize!r}")
    array, levels = io.read_image_files(io.image_files(path) if path.is_dir() else [path], 1 if grey else None,
                                        resize)
    return array, None, levels


def _stamp(path: Path) -> tuple:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_mtime_ns) for f in files)


def from_images(
    source: str | Path | np.ndarray | Tensor,
    split: str = "all",
    *,
    num_levels: int | None = None,
    binarize: str | None = None,
    grey: bool | None = None,
    resize: tuple[int, int] | None = None,
    labels: np.ndarray | Tensor | None = None,
) -> ImageDataset:
    """The user's images as an ImageDataset (``split``: "train", "valid", "test", "train+valid" or
    "all"). grey: read image files as greyscale (None: colour if any file is). resize (H, W):
    resize image files of different sizes (otherwise refused). labels: int [N], for arrays (an
    ``.npz`` may carry its own). ValueError names whatever cannot be read."""
    from .. import io

    levels, name = None, "images"
    if isinstance(source, (str, Path)):
        path, name = Path(source), Path(source).stem or "images"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such folder or file")
        if not (path.is_dir() or path.suffix.lower() in io.ARRAY_SUFFIXES or io.is_image_file(path)):
            raise ValueError(f"{path}: not a folder of images, an image file, or a .npy/.npz array")
        array, file_labels, levels = _read(path.resolve(), _stamp(path), grey, None if resize is None else
                                           tuple(resize))
        labels = file_labels if labels is None else labels
    else:
        array = source.numpy() if isinstance(source, Tensor) else np.asarray(source)
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4 or array.shape[1] not in (1, 3) or 0 in array.shape:
            raise ValueError(f"images must be [N, C, H, W] (C 1 or 3) or [N, H, W], got {list(array.shape)}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"images must hold integer levels, got dtype {array.dtype}")
        if array.min() < 0:
            raise ValueError(f"images hold negative values ({array.min()}); levels are integers >= 0")
    if grey and array.shape[1] != 1:
        raise ValueError(f"grey: the arrays have {array.shape[1]} channels; convert them before")
    largest = int(array.max())
    levels = levels if levels is not None else max(2, largest + 1)
    if largest >= levels:
        raise ValueError(f"values up to {largest}, beyond the data's {levels} levels")
    rows = split_rows(len(array), split)
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels)).long()
        if labels.shape != (len(array),):
            raise ValueError(f"labels must be [{len(array)}], got {list(labels.shape)}")
        labels = labels[rows]
    images = torch.from_numpy(array[rows.numpy()].astype(np.int64))
    return transform(ImageDataset(images, levels, labels, name, split), num_levels, binarize)
