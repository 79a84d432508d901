"""The peer, pytorch-generative (EugenHotaj), measured beside pixelchain in one process.

None of the peer's code is here: ``import_peer`` imports ``pytorch_generative.models`` from a
checkout you fetched (``--peer PATH``, outside this repository), without running its top-level
``__init__`` (which needs torchvision and tensorboard): an empty package object whose
``__path__`` is the peer's package folder stands in for it. The architectures are the sizes the
peer's own ``reproduce()`` functions use; its loss is theirs (BCE with logits summed over pixels).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# our registry name and hyperparameters -> the peer's class and constructor arguments
MODELS = {
    "nade": ({"hidden": 500}, "NADE", {"input_dim": 784, "hidden_dim": 500}),
    "made": ({"hidden": (8000,)}, "MADE", {"input_dim": 784, "hidden_dims": [8000], "n_masks": 1}),
    "fvsbn": ({}, "FullyVisibleBeliefNetwork", {"n_dims": 784}),
    "pixelcnn": ({"channels": 16, "num_blocks": 15, "head_channels": 32}, "PixelCNN",
                 {"in_channels": 1, "out_channels": 1, "n_residual": 15, "residual_channels": 16,
                  "head_channels": 32}),
    "gated_pixelcnn": ({"channels": 128, "num_layers": 10, "head_channels": 32}, "GatedPixelCNN",
                       {"in_channels": 1, "out_channels": 1, "n_gated": 10, "gated_channels": 128,
                        "head_channels": 32}),
    "transformer": ({"dim": 64, "num_layers": 8, "num_heads": 2}, "ImageGPT",
                    {"in_channels": 1, "out_channels": 1, "in_size": 28, "n_transformer_blocks": 8,
                     "n_attention_heads": 2, "n_embedding_channels": 64}),
}


def import_peer(root: str | Path) -> types.ModuleType:
    """``pytorch_generative.models`` from the checkout at ``root``."""
    package = Path(root) / "pytorch_generative"
    if not package.is_dir():
        raise SystemExit(f"no pytorch_generative/ under {root}: fetch EugenHotaj/pytorch-generative there")
    stub = types.ModuleType("pytorch_generative")
    stub.__path__ = [str(package)]
    sys.modules["pytorch_generative"] = stub
    return importlib.import_module("pytorch_generative.models")


def commit(root: str | Path) -> str:
    """The peer checkout's commit (short), or 'unknown commit' when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def build(models: types.ModuleType, name: str) -> nn.Module:
    """The peer's model for our ``name`` (seeded like ours), after one forward pass (its samplers
    read the image shape that the first forward pass records)."""
    _, cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = getattr(models, cls)(**kwargs)
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    return model


def loss(model: nn.Module, x: Tensor) -> Tensor:
    """The peer's training loss on binary x [B, 1, 28, 28] (floats): BCE with logits summed over
    pixels, averaged over the batch, as its reproduce() functions train."""
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return F.binary_cross_entropy_with_logits(out.reshape(len(x), -1), x.reshape(len(x), -1),
                                              reduction="none").sum(1).mean()


def sample(model: nn.Module, n: int) -> Tensor:
    """The peer's own sampler (a full forward pass per pixel, NADE's running activation)."""
    with torch.no_grad():
        return model.sample(n_samples=n)
