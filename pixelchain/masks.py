"""Which pixels completion leaves to the model: ``--mask`` of ``pixelchain complete``.

A mask names the *missing* region; ``observed`` (what ``model.complete`` takes) is its complement.

    top | bottom | left | right    that half of every image is missing
    centre                         the central square of half the height and width is missing
    random:P                       each pixel missing with probability P (seeded)
    FILE.npy                       nonzero = missing: [H, W], [N, H, W] or [N, C, H, W] (broadcast)

In raster order the pixels after the first missing one do not condition it (the model has not
seen them yet): with ``top`` missing, the whole image is sampled afresh and the bottom kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NAMED = ("top", "bottom", "left", "right", "centre")


def missing(spec: str, shape: tuple[int, int, int, int], generator: torch.Generator | None = None) -> Tensor:
    """The missing pixels of images of ``shape`` [N, C, H, W] under ``spec`` (see the module):
    bool [N, C, H, W], True where the model fills in. ValueError for a spec it cannot read."""
    N, C, H, W = shape
    out = torch.zeros(N, C, H, W, dtype=torch.bool)
    if spec in ("centre", "center"):
        out[:, :, H // 4 : H // 4 + (H + 1) // 2, W // 4 : W // 4 + (W + 1) // 2] = True
    elif spec == "top":
        out[:, :, : H // 2] = True
    elif spec == "bottom":
        out[:, :, H // 2 :] = True
    elif spec == "left":
        out[:, :, :, : W // 2] = True
    elif spec == "right":
        out[:, :, :, W // 2 :] = True
    elif spec.startswith("random:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0 <= p <= 1:
            raise ValueError(f"--mask {spec}: random:P needs a probability P in [0, 1]")
        out[:] = (torch.rand(N, 1, H, W, generator=generator) < p).expand(N, C, H, W)
    elif spec.endswith(".npy"):
        out[:] = from_file(Path(spec), shape)
    else:
        raise ValueError(f"--mask {spec!r}: expected one of {', '.join(NAMED)}, random:P, or a .npy file")
    return out


def from_file(path: Path, shape: tuple[int, int, int, int]) -> Tensor:
    """A .npy mask (nonzero = missing) broadcast to ``shape`` [N, C, H, W]; never unpickles."""
    array = np.load(path, allow_pickle=False)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{path}: a mask holds booleans or integers (nonzero = missing), got dtype {array.dtype}")
    mask = torch.from_numpy(array != 0)
    if mask.dim() == 3:  # [N, H, W]
        mask = mask[:, None]
    try:
        return mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"{path}: a mask of shape {list(array.shape)} does not fit images {list(shape)}; "
                         "use [H, W], [N, H, W] or [N, C, H, W]") from None


def observed_like(observed: Tensor, x: Tensor) -> Tensor:
    """``observed`` broadcast to x's shape [B, C, H, W] (an [H, W] or [1, 1, H, W] mask serves every
    image), on x's device; ValueError unless it is a bool tensor that broadcasts."""
    if not isinstance(observed, Tensor) or observed.dtype != torch.bool:
        got = f"{observed.dtype} {list(observed.shape)}" if isinstance(observed, Tensor) else type(observed).__name__
        raise ValueError(f"observed must be a bool tensor of shape {list(x.shape)} or one that broadcasts to it "
                         f"([H, W], [1, 1, H, W], ...), got {got}")
    try:
        return observed.to(x.device).expand(x.shape)
    except RuntimeError:
        raise ValueError(f"observed of shape {list(observed.shape)} does not broadcast to {list(x.shape)}") from None
