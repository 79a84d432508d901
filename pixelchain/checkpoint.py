"""Run directories: ``config.json`` (what to build) + ``model.safetensors`` (the weights).

Loading reads JSON and safetensors only, so it never executes code from the checkpoint.
A name that is not a directory is looked up among the checkpoints shipped with the package
(``pretrained()`` lists them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG, WEIGHTS = "config.json", "model.safetensors"
PRETRAINED_DIR = Path(__file__).parent / "checkpoints"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def model_config(model: nn.Module) -> dict:
    """The JSON that rebuilds ``model``: its registered name and constructor arguments."""
    from . import __version__

    if not getattr(model, "name", "") or not hasattr(model, "init_args"):
        raise ValueError("only registered pixelchain models (pc.create / pixelchain.models) can be saved")
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in model.init_args.items()}
    try:
        json.dumps(args)
    except TypeError as error:
        raise ValueError(f"{model.name}: constructor arguments are not JSON-serialisable: {error}") from None
    return {"model": model.name, "args": args, "pixelchain_version": __version__}


def save_weights(model: nn.Module, path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def save(model: nn.Module, run_dir: str | Path, **info) -> Path:
    """Write ``config.json`` (model, constructor arguments, ``info`` such as the dataset) and
    ``model.safetensors`` into ``run_dir``; returns the directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**model_config(model), **info}
    atomic_write(run_dir / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    save_weights(model, run_dir / WEIGHTS)
    return run_dir


def pretrained() -> list[str]:
    """Names of the checkpoints shipped with the package (``pc.load(name)`` loads one)."""
    return sorted(p.name for p in PRETRAINED_DIR.glob("*") if (p / CONFIG).is_file())


def resolve(path_or_name: str | Path) -> Path:
    """A run directory, or the shipped checkpoint of that name."""
    path = Path(path_or_name)
    if (path / CONFIG).is_file():
        return path
    if (PRETRAINED_DIR / str(path_or_name) / CONFIG).is_file():
        return PRETRAINED_DIR / str(path_or_name)
    raise FileNotFoundError(
        f"{path_or_name}: no {CONFIG} there, and no shipped checkpoint of that name "
        f"(shipped: {', '.join(pretrained()) or 'none'})"
    )


def read_config(path_or_name: str | Path) -> dict:
    path = resolve(path_or_name) / CONFIG
    try:
        config = json.loads(path.read_text())
        config["model"], config["args"]  # noqa: B018 - the keys every config has
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is corrupt or not a pixelchain config ({error})") from None
    return config


def load(path_or_name: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a run directory (or shipped checkpoint) with its saved weights."""
    from .models import create

    run_dir = resolve(path_or_name)
    config = read_config(run_dir)
    args = dict(config["args"])
    model = create(config["model"], args.pop("image_shape"), args.pop("num_levels"), **args)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the run has no saved weights yet")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is corrupt or not a safetensors file ({error})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not match the model in {CONFIG}: {error}") from None
    return model.to(map_location)
