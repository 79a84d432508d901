"""Scoring one's own images: per-image log p(x) and bits/dim, and arrays and tables out
(``pixelchain eval MODEL IMAGES``, ``--out`` of ``sample`` / ``complete``). Images reach a model's
levels through ``io.read_model_images``.

    x = io.read_model_images("photos/", 1, model.num_levels)   # 8-bit files -> the model's levels
    nll = -score.log_prob(model, x)                            # float64 [N], nats
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .io import ARRAY_SUFFIXES


def check_density(model: nn.Module, what: str = "model") -> nn.Module:
    """``model`` when it is a density model, else ValueError naming it (``what``: how to call it)."""
    if getattr(model, "kind", None) != "density":
        raise ValueError(f"the {what} {getattr(model, 'name', type(model).__name__)!r} is not a density model")
    return model


@contextmanager
def eval_mode(model: nn.Module):
    """The model in ``eval()`` mode for the block, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def log_prob(model: nn.Module, x: Tensor, labels: Tensor | None = None, batch_size: int = 256,
             progress: bool = False) -> Tensor:
    """log p(x) in nats of every image, ``batch_size`` at a time on the model's device, in
    ``eval()`` mode and without building a graph: x int64 [N, C, H, W] -> float64 [N] (CPU)."""
    with eval_mode(model):
        xs = x.split(batch_size)
        parts = zip(xs, [None] * len(xs) if labels is None else labels.split(batch_size), strict=True)
        out = [model.log_prob(xb.to(model.device), None if lb is None else lb.to(model.device)).double().cpu()
               for xb, lb in tqdm(list(parts), desc="evaluating", disable=not progress, leave=False)]
    return torch.cat(out)


@torch.no_grad()
def log_prob_map(model: nn.Module, x: Tensor, labels: Tensor | None = None, batch_size: int = 256,
                 progress: bool = False) -> Tensor:
    """log p(x_d | x_<d) per dimension in nats, ``batch_size`` images at a time, in ``eval()`` mode,
    no graph: [N, C, H, W] -> float32 [N, C, H, W] (CPU)."""
    with eval_mode(model):
        xs = x.split(batch_size)
        parts = zip(xs, [None] * len(xs) if labels is None else labels.split(batch_size), strict=True)
        out = [model.log_prob_map(xb.to(model.device), None if lb is None else lb.to(model.device)).cpu()
               for xb, lb in tqdm(list(parts), desc="log p", disable=not progress, leave=False)]
    return torch.cat(out) if out else torch.zeros(0, *x.shape[1:])


def write_csv(path: Path, log_probs: Tensor, num_dims: int) -> None:
    """index,nll_nats,bits_per_dim: one line per image."""
    nll = (-log_probs).tolist()
    lines = ["index,nll_nats,bits_per_dim"] + [f"{i},{v:.6f},{v / (num_dims * math.log(2)):.6f}"
                                                for i, v in enumerate(nll)]
    path.write_text("\n".join(lines) + "\n")


def is_array_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ARRAY_SUFFIXES


def save_array(path: str | Path, images: Tensor, num_levels: int, labels: Tensor | None = None,
               observed: Tensor | None = None) -> Path:
    """Levels as ``.npy`` ([N, C, H, W], uint8 when they fit, else int64) or ``.npz`` (``images``,
    and ``labels`` [N] / ``observed`` bool where given)."""
    path = Path(path)
    dtype = np.uint8 if num_levels <= 256 else np.int64
    arrays = {"images": images.detach().cpu().numpy().astype(dtype)}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy().astype(np.int64)
    if observed is not None:
        arrays["observed"] = observed.detach().cpu().numpy().astype(bool)
    if path.suffix.lower() == ".npz":
        np.savez(path, **arrays)
    else:
        np.save(path, arrays["images"])
    return path
