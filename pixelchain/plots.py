"""PNG figures with PIL: image grids, completions laid out as in the PixelRNN paper, and the figures
of a run (``write_figures``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import ImageDataset
from .run_dir import RunDir


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


def draw_completions(model: torch.nn.Module, test: ImageDataset, path: str | Path, n: int, per_image: int,
                     generator: torch.Generator | None = None, naive: bool = False,
                     batch_size: int | None = None) -> Path:
    """completions figure of ``n`` test images spread over ``test`` (some splits are sorted by
    class), bottom half occluded, ``per_image`` completions each."""
    index = torch.linspace(0, len(test) - 1, n).long()
    x = test.images[index].to(model.device)
    labels = None if not getattr(model, "num_classes", None) else test.labels[index].repeat_interleave(per_image)
    observed = bottom_half_occluded(x)
    done = model.complete(x.repeat_interleave(per_image, 0), observed.repeat_interleave(per_image, 0),
                          generator=generator, labels=labels, naive=naive, progress=True, batch_size=batch_size)
    return save_completions(x, observed, done.view(n, per_image, *x.shape[1:]), model.num_levels, path)


def write_figures(model: torch.nn.Module, test: ImageDataset, run_dir: str | Path,
                  generator: torch.Generator | None = None, naive: bool = False) -> None:
    """A run's figures: samples.png (64 samples) and completions.png (8 test images, 4 each)."""
    run = RunDir(run_dir)
    labels = torch.arange(64, device=model.device) % model.num_classes if getattr(model, "num_classes", None) else None
    samples = model.sample(64, generator=generator, labels=labels, naive=naive, progress=True)
    save_samples(samples, model.num_levels, run.samples)
    draw_completions(model, test, run.completions, 8, 4, generator, naive)
