"""Readers for the on-disk formats: IDX, .amat text, MATLAB .mat, CIFAR python pickles.

Every reader takes a path (plain, or gzip'ed when the name ends in ".gz"), returns numpy arrays and
raises ValueError naming the file when the content is not what the format promises.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import scipy.io


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): uint8 array of the shape in its header."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, ">u4", count=ndim, offset=4).tolist())
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {payload.size} values")
    return payload.reshape(shape)


def read_amat(path: Path, width: int = 784) -> np.ndarray:
    """A binary .amat text file (one example per line, ``width`` values 0/1): uint8 [N, width]."""
    with _open(path) as f:
        text = f.read()
    # fast path: the published layout "v v ... v\n" is 2 bytes per value; check it as a byte grid
    if text and len(text) % (2 * width) == 0:
        grid = np.frombuffer(text, np.uint8).reshape(-1, 2 * width)
        values, seps = grid[:, 0::2], grid[:, 1::2]
        if (
            ((values == ord("0")) | (values == ord("1"))).all()
            and (seps[:, :-1] == ord(" ")).all()
            and (seps[:, -1] == ord("\n")).all()
        ):
            return values - ord("0")
    # general path: any whitespace and number spelling ("1", "1.0", "1e+00"); errors name the line
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = np.array(line.split(), dtype=np.float64)
            ok = row.shape == (width,) and np.isin(row, (0, 1)).all()
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{path}, line {i}: expected {width} values in {{0, 1}}, got {line[:60]!r}...")
        rows.append(row)
    return np.array(rows, np.uint8).reshape(-1, width)


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """The variables of a MATLAB (v5) .mat file."""
    with _open(path) as f:
        return scipy.io.loadmat(f)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch: images uint8 [N, 3, 32, 32] and labels int64 [N].

    Unpickling can run arbitrary code, so call this only on a file whose checksum matched.
    """
    with _open(path) as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {images.shape}, {labels.shape}")
    return images.reshape(-1, 3, 32, 32), labels
