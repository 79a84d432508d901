"""The dataset catalogue: per dataset its files, payload checksums, download mirrors and split rule.

A checksum is of the file's *payload*: the bytes after gunzip for a copy stored as ``<name>.gz``, the
raw bytes otherwise. So a plain copy, the canonical .gz and a recompressed .gz (Debian's) all verify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import parsers

SPLITS = ("train", "valid", "test", "train+valid")
ALL = slice(None)


@dataclass(frozen=True)
class File:
    """One file of a dataset, found as ``name`` or gzip'ed as ``name + ".gz"`` in a data folder."""

    name: str  # relative path, e.g. "train-images-idx3-ubyte" or "cifar-10-batches-py/data_batch_1"
    digest: str  # hex digest of the payload
    algo: str = "sha256"
    urls: tuple[str, ...] = ()  # mirrors, tried in order
    archive: File | None = None  # the archive it is extracted from when no copy is found
    max_bytes: int = 64 << 20  # a download larger than this (as sent) is refused


Reader = Callable[[list[Path], str], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Source:
    """A dataset: its files grouped into parts, how a part is read, and which rows form a split."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_levels: int
    files: dict[str, tuple[File, ...]]  # part -> the files it is read from
    read: Reader  # (paths of a part's files, part) -> (images uint8 [N, C, H, W], labels [N] or None)
    splits: dict[str, tuple[str, slice]]  # split -> (part, its rows)
    system_dirs: tuple[str, ...] = ()


def _holdout(train: str, n_train: int, test: str) -> dict[str, tuple[str, slice]]:
    """train = the first n_train rows of part ``train``, valid = the rest of it, test = part ``test``."""
    return {"train": (train, slice(0, n_train)), "valid": (train, slice(n_train, None)), "test": (test, ALL)}


# ---------------------------------------------------------------------------------------- readers


def _read_digits(paths: list[Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # slow import, so only here

    digits = load_digits()  # bundled with scikit-learn: values 0..16, in the file's order
    return digits.images.astype(np.uint8)[:, None], digits.target


def _read_idx(paths: list[Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (parsers.read_idx(p) for p in paths)
    return images[:, None], labels


def _read_amat(paths: list[Path], part: str) -> tuple[np.ndarray, None]:
    return parsers.read_amat(paths[0]).reshape(-1, 1, 28, 28), None


def _read_caltech(paths: list[Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    """Flipped so that 1 = object (like MNIST's ink): the file stores 0 = silhouette, 1 = background.

    Rows are column-major (MATLAB): reshape(28, 28, order="F") is reshape(28, 28).T, an upright image.
    Labels are shifted from 1..101 to 0..100.
    """
    mat = parsers.read_mat(paths[0])
    images = mat[f"{part}_data"].reshape(-1, 28, 28).transpose(0, 2, 1)
    return 1 - images[:, None], mat[f"{part}_labels"].ravel().astype(np.int64) - 1


def _read_cifar(paths: list[Path], part: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*(parsers.read_cifar_batch(p) for p in paths), strict=True)
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------- catalogue
# sha256 of the decompressed payloads, computed from copies of the files and cross-checked:
# MNIST: the .gz files' sha256/md5 and decompressed md5 equal the published ones.
# Fashion-MNIST: from Debian's dataset-fashion-mnist (recompressed, so the .gz md5s differ from the
#   published ones); the decompressed md5s equal torchvision's published raw md5s (f4a8712d...,
#   9018921c..., 8181f547..., 15d48437...).
# Binarized MNIST: the md5s of the decompressed .amat equal the ones published for the original
#   downloads (db28b1a6...).
# Caltech-101 Silhouettes: md5 4483e9c1... equals the published one.
# CIFAR-10: the md5s published for the archive and its batches (no copy was at hand).

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MIRRORS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",)
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
BINARIZED_URL = "https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BINARIZED_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
CALTECH = File(
    "caltech101_silhouettes_28_split1.mat",
    "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a",
    urls=("https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",),
)
CIFAR_ARCHIVE = File(
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "md5",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    max_bytes=256 << 20,  # 163 MiB
)
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _idx_source(name: str, sha256: dict[str, str], mirrors: tuple[str, ...], system_dirs=()) -> Source:
    """An MNIST-layout dataset: 4 gzip'ed IDX files; valid = the last 10,000 training images."""

    def files(part: str) -> tuple[File, ...]:
        names = (f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte")
        return tuple(File(n, sha256[n], urls=tuple(f"{m}{n}.gz" for m in mirrors)) for n in names)

    parts = {"train": files("train"), "t10k": files("t10k")}
    return Source(name, (1, 28, 28), 256, parts, _read_idx, _holdout("train", 50_000, "t10k"), system_dirs)


def _cifar_batch(name: str) -> File:
    return File(f"cifar-10-batches-py/{name}", CIFAR_MD5[name], "md5", archive=CIFAR_ARCHIVE)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "digits", (1, 8, 8), 17, {"all": ()}, _read_digits,
            {
                "train": ("all", slice(0, 1257)),
                "valid": ("all", slice(1257, 1527)),
                "test": ("all", slice(1527, None)),
            },
        ),
        _idx_source("mnist", MNIST_SHA256, MNIST_MIRRORS),
        Source(
            "binarized_mnist", (1, 28, 28), 2,
            {
                s: (File(f"binarized_mnist_{s}.amat", h, urls=(f"{BINARIZED_URL}binarized_mnist_{s}.amat",),
                         max_bytes=128 << 20),)  # train: 78 MiB of text
                for s, h in BINARIZED_SHA256.items()
            },
            _read_amat, {s: (s, ALL) for s in ("train", "valid", "test")},
        ),
        _idx_source("fashion_mnist", FASHION_SHA256, FASHION_MIRRORS, ("/usr/share/datasets/fashion-mnist",)),
        Source(
            "caltech101_silhouettes", (1, 28, 28), 2, {p: (CALTECH,) for p in ("train", "val", "test")},
            _read_caltech, {"train": ("train", ALL), "valid": ("val", ALL), "test": ("test", ALL)},
        ),
        Source(
            "cifar10", (3, 32, 32), 256,
            {
                "train": tuple(_cifar_batch(f"data_batch_{i}") for i in range(1, 6)),
                "test": (_cifar_batch("test_batch"),),
            },
            _read_cifar, _holdout("train", 45_000, "test"),
        ),
    )
}
