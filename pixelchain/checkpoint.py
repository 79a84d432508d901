"""Saving and loading models: ``config.json`` (what to build) + ``model.safetensors`` (the weights).

Loading reads JSON and safetensors only, so it never executes code from the checkpoint, and it
verifies the weights' digest. A name (not a path) that is not a directory is looked up among the
checkpoints shipped with the package (``pretrained()`` lists them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import runtime
from .run_dir import CONFIG, WEIGHTS, RunDir

PRETRAINED_DIR = Path(__file__).parent / "checkpoints"


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


def save(model: nn.Module, run_dir: str | Path, **info: Any) -> Path:
    """Write ``config.json`` (model, constructor arguments, ``info`` such as the dataset) and
    ``model.safetensors`` into ``run_dir``; returns the directory."""
    run = RunDir(run_dir)
    run.write_config({**model_config(model), **info})
    run.write_weights(model.state_dict())
    return run.path


def load_weights(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """``model.load_state_dict(state)``, ignoring buffers the model derives (masks: files written
    before they were derived hold them) and the unused weights that files of earlier versions hold
    (``model.unused_weights()``, where a model names them); ValueError names ``source`` when the
    tensors do not fit."""
    derived = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    if hasattr(model, "unused_weights"):
        derived |= model.unused_weights() - set(model.state_dict())
    try:
        model.load_state_dict({k: v for k, v in state.items() if k not in derived})
    except RuntimeError as error:
        raise ValueError(f"{source} does not match the model in {CONFIG}: {error}") from None


def pretrained(details: bool = False) -> list[str] | list[dict]:
    """Names of the checkpoints shipped with the package (``pc.load(name)`` loads one); with
    ``details`` one dict each: name, model, dataset, num_levels, test_nll (nats), test_bits_per_dim
    (or test_accuracy for a classifier), parameters, megabytes (of the weights file)."""
    names = sorted(p.name for p in PRETRAINED_DIR.glob("*") if (p / CONFIG).is_file())
    return [describe_pretrained(n) for n in names] if details else names


def describe_pretrained(name: str) -> dict:
    """What ``pretrained(details=True)`` says of one shipped checkpoint (read from its JSON)."""
    run = RunDir(PRETRAINED_DIR / name)
    config, result = run.read_config(), json.loads((run / "result.json").read_text())
    test = result.get("test", {})
    info = {"name": name, "model": config["model"], "dataset": config.get("dataset", {}).get("name"),
            "num_levels": config["args"]["num_levels"], "test_nll": test.get("nll"),
            "parameters": result.get("parameters"), "megabytes": (run / WEIGHTS).stat().st_size / 1e6}
    info.update({f"test_{k}": v for k, v in test.items() if k in ("bits_per_dim", "accuracy")})
    return info


def resolve(path_or_name: str | Path) -> Path:
    """A run directory, or the shipped checkpoint of that name (a name, never a path into the
    package's folder)."""
    path = Path(path_or_name)
    if (path / CONFIG).is_file():
        return path
    if str(path_or_name) in pretrained():
        return PRETRAINED_DIR / str(path_or_name)
    raise FileNotFoundError(
        f"{path_or_name}: no {CONFIG} there, and no shipped checkpoint of that name "
        f"(shipped: {', '.join(pretrained()) or 'none'})"
    )


def is_shipped(path_or_name: str | Path) -> bool:
    """Whether ``path_or_name`` resolves to a checkpoint inside the installed package."""
    return resolve(path_or_name).resolve().is_relative_to(PRETRAINED_DIR.resolve())


def read_config(path_or_name: str | Path) -> dict:
    return RunDir(resolve(path_or_name)).read_config()


def build(name: str, image_shape: tuple[int, int, int], num_levels: int, **args) -> nn.Module:
    """A registered density model or classifier ``name`` (the two registries share no name)."""
    from . import classifiers, models

    if name in classifiers.list_classifiers():
        return classifiers.create(name, image_shape, num_levels, **args)
    return models.create(name, image_shape, num_levels, **args)


def load(path_or_name: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a run directory (or shipped checkpoint) with its saved weights, in
    ``eval()`` mode, ready for use (dropout off: the same images score the same); ``fit`` sets
    training mode itself. ``map_location``: a device, checked as ``--device`` is."""
    run = RunDir(resolve(path_or_name))
    config = run.read_config()
    args = dict(config["args"])
    try:
        model = build(config["model"], args.pop("image_shape"), args.pop("num_levels"), **args)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{run / CONFIG} does not describe a model this version builds: {error}") from None
    map_location = runtime.pick_device(str(map_location))
    load_weights(model, run.read_weights(map_location), run / WEIGHTS)
    return model.to(map_location).eval()
