"""PNG figures with PIL: image grids, and completions laid out as in the PixelRNN paper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_pixels(images: Tensor, num_levels: int) -> np.ndarray:
    """int levels [N, C, H, W] -> uint8 [N, H, W, 3] (greyscale repeated to RGB)."""
    x = (images.detach().cpu().double() * (255.0 / (num_levels - 1))).round().clamp(0, 255).byte()
    x = x.permute(0, 2, 3, 1).numpy()
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def grid(rows: list[np.ndarray], scale: int = 2, pad: int = 1, background: int = 128) -> Image.Image:
    """Lay out rows of RGB images (each [n, H, W, 3]) in a grid, scaled up by ``scale``."""
    H, W = rows[0].shape[1:3]
    ncols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (H + pad) + pad, ncols * (W + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y : y + H, x : x + W] = img
    image = Image.fromarray(canvas)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_samples(images: Tensor, num_levels: int, path: str | Path, ncols: int = 8, scale: int = 3) -> Path:
    """Save images [N, C, H, W] as a grid of ``ncols`` columns."""
    pixels = to_pixels(images, num_levels)
    rows = [pixels[i : i + ncols] for i in range(0, len(pixels), ncols)]
    grid(rows, scale).save(path)
    return Path(path)


def save_completions(originals: Tensor, observed: Tensor, completions: Tensor, num_levels: int,
                     path: str | Path, scale: int = 3) -> Path:
    """One row per image: original | occluded (missing part tinted red) | completions.

    originals [N, C, H, W], observed bool [N, C, H, W], completions [N, S, C, H, W].
    """
    orig = to_pixels(originals, num_levels)
    hidden = ~observed.cpu().any(dim=1).numpy()  # [N, H, W]: pixels with nothing observed
    occluded = orig.copy()
    occluded[hidden] = (occluded[hidden] * 0.3 + np.array([160, 0, 0])).astype(np.uint8)
    rows = []
    for i in range(len(orig)):
        done = to_pixels(completions[i], num_levels)
        rows.append(np.concatenate([orig[i : i + 1], occluded[i : i + 1], done]))
    grid(rows, scale).save(path)
    return Path(path)


def bottom_half_occluded(x: Tensor) -> Tensor:
    """The observed mask of the completion figures: top half kept, bottom half missing."""
    observed = torch.ones_like(x, dtype=torch.bool)
    observed[:, :, x.shape[2] // 2 :] = False
    return observed
