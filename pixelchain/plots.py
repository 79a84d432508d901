"""PNG figures with PIL: image grids, completions laid out as in the PixelRNN paper, histograms, and
the figures of a run (``write_figures``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from . import masks
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


def check_grid(n: int, image_shape: tuple[int, int, int], ncols: int = 8, scale: int = 3) -> None:
    """ValueError unless a grid of ``n`` images (``save_samples``'s) stays within the pixels Pillow
    (and image viewers) accept: checked before the images are drawn."""
    _, H, W = image_shape
    if Image.MAX_IMAGE_PIXELS is None:  # the user lifted Pillow's limit
        return
    pixels = -(-n // ncols) * min(n, ncols) * H * W * scale * scale
    if pixels > Image.MAX_IMAGE_PIXELS:
        most = Image.MAX_IMAGE_PIXELS // (H * W * scale * scale) // ncols * ncols
        raise ValueError(f"a PNG grid of {n} images of {H}x{W} would hold {pixels:,} pixels, more than the "
                         f"{Image.MAX_IMAGE_PIXELS:,} Pillow accepts: draw at most {most}")


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


def draw_completions(model: torch.nn.Module, test: ImageDataset, path: str | Path, n: int, per_image: int,
                     generator: torch.Generator | None = None, naive: bool = False,
                     batch_size: int | None = None) -> Path:
    """completions figure of ``n`` test images spread over ``test`` (some splits are sorted by
    class), bottom half occluded, ``per_image`` completions each."""
    if n > len(test):
        raise ValueError(f"{n} images to complete, but {test!r} holds {len(test)}")
    check_grid(n * (per_image + 2), model.image_shape, ncols=per_image + 2)
    index = torch.linspace(0, len(test) - 1, n).long()
    x = test.images[index].to(model.device)
    labels = None if not getattr(model, "num_classes", None) else test.labels[index].repeat_interleave(per_image)
    observed = ~masks.missing("bottom", tuple(x.shape)).to(x.device)  # the top half kept
    done = model.complete(x.repeat_interleave(per_image, 0), observed.repeat_interleave(per_image, 0),
                          generator=generator, labels=labels, naive=naive, progress=True, batch_size=batch_size)
    return save_completions(x, observed, done.view(n, per_image, *x.shape[1:]), model.num_levels, path)


def write_figures(model: torch.nn.Module, test: ImageDataset, run_dir: str | Path,
                  generator: torch.Generator | None = None, naive: bool = False) -> None:
    """A run's figures: samples.png (64 samples) and completions.png (8 test images, 4 each; not for
    a model without conditionals, ``has_conditionals``)."""
    run = RunDir(run_dir)
    labels = torch.arange(64, device=model.device) % model.num_classes if getattr(model, "num_classes", None) else None
    samples = model.sample(64, generator=generator, labels=labels, naive=naive, progress=True)
    save_samples(samples, model.num_levels, run.samples)
    if model.has_conditionals:
        draw_completions(model, test, run.completions, 8, 4, generator, naive)


def save_before_after(before: Tensor, after: Tensor, num_levels: int, path: str | Path, ncols: int = 8,
                      scale: int = 3) -> Path:
    """Rows of ``ncols`` images [N, C, H, W] each followed by a row of the same images after, e.g.,
    purification: before, after, before, after, ..."""
    a, b = to_pixels(before, num_levels), to_pixels(after, num_levels)
    rows = []
    for i in range(0, len(a), ncols):
        rows += [a[i : i + ncols], b[i : i + ncols]]
    grid(rows, scale).save(path)
    return Path(path)


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def save_histogram(groups: dict[str, Tensor], path: str | Path, xlabel: str = "bits/dim", bins: int = 50,
                   size: tuple[int, int] = (640, 400)) -> Path:
    """Overlaid step histograms (densities: each group's area is 1) of 1-D values, one colour per group,
    over a common range; e.g. bits/dim of clean vs attacked images."""
    values = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in groups.items()}
    values = {k: v[torch.isfinite(v)] for k, v in values.items() if len(v)}
    if not values:
        raise ValueError("nothing to plot: every group is empty")
    lo = min(float(v.min()) for v in values.values())
    hi = max(float(v.max()) for v in values.values())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    dens = {k: np.histogram(v.numpy(), edges, density=True)[0] for k, v in values.items()}
    top = max(float(d.max()) for d in dens.values()) * 1.1 or 1.0
    width, height = size
    left, right, upper, bottom = 60, 20, 20, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - lo) / (hi - lo) * (width - left - right),
                height - bottom - y / top * (height - upper - bottom))

    draw.line([px(lo, 0), px(hi, 0)], fill="black")
    draw.line([px(lo, 0), px(lo, top)], fill="black")
    for t in np.linspace(lo, hi, 6):
        x, y = px(t, 0)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x - 12, y + 6), f"{t:.2f}", fill="black", font=font)
    for t in np.linspace(0, top, 5):
        x, y = px(lo, t)
        draw.line([(x - 4, y), (x, y)], fill="black")
        draw.text((4, y - 6), f"{t:.2g}", fill="black", font=font)
    draw.text((width // 2 - 20, height - 16), xlabel, fill="black", font=font)
    for i, d in enumerate(dens.values()):
        points = [px(edges[0], 0)]
        for j, h in enumerate(d):
            points += [px(edges[j], h), px(edges[j + 1], h)]
        points.append(px(edges[-1], 0))
        draw.line(points, fill=COLOURS[i % len(COLOURS)], width=2)
    labels = [f"{name} (n={len(values[name])})" for name in dens]
    box = max(draw.textlength(label, font=font) for label in labels) + 28
    draw.rectangle([width - right - box, upper, width - right, upper + 6 + 16 * len(labels)], fill="white",
                   outline="grey")
    for i, label in enumerate(labels):
        x0, y0 = width - right - box + 6, upper + 5 + 16 * i
        draw.rectangle([x0, y0, x0 + 10, y0 + 10], fill=COLOURS[i % len(COLOURS)])
        draw.text((x0 + 16, y0 - 1), label, fill="black", font=font)
    image.save(path)
    return Path(path)


def heat_colours(values: np.ndarray, top: float) -> np.ndarray:
    """Values [...] in [0, top] -> uint8 RGB [..., 3] from black through red and yellow to white."""
    t = np.clip(values / max(top, 1e-12), 0, 1)[..., None]
    rgb = np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], axis=-1), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def heatmap(images: Tensor, log_prob_map: Tensor, num_levels: int, path: str | Path, ncols: int = 4,
                 scale: int = 4) -> Path:
    """Each image beside its per-pixel surprise, -log2 p(x_d | x_<d) summed over channels (black 0
    bits, white the largest in the figure): where the model did not expect what it saw.
    images [N, C, H, W], log_prob_map [N, C, H, W] in nats (``model.log_prob_map``)."""
    bits = (-log_prob_map.detach().cpu().double().sum(1) / np.log(2)).numpy()  # [N, H, W]
    pixels, maps = to_pixels(images, num_levels), heat_colours(bits, float(bits.max()))
    pairs = [np.stack([pixels[i], maps[i]]) for i in range(len(pixels))]
    rows = [np.concatenate(pairs[i : i + ncols]) for i in range(0, len(pairs), ncols)]
    grid(rows, scale).save(path)
    return Path(path)
