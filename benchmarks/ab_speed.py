"""A preset's training and evaluation speed at the working tree against a git revision's model file,
interleaved in one process (the two see the same load, so their ratio means something on a shared
machine), with the same weights and batches.

    python -m benchmarks.ab_speed diagonal_bilstm_cpu --against main
    python -m benchmarks.ab_speed made_32_masks --set hidden=1000,1000 --against main --eval-images 1024

Train = ``--steps`` optimiser steps (forward, backward, Adam) on consecutive training batches of
the preset's size; eval = ``log_prob`` of ``--eval-images`` validation images in batches of
256 (what ``pc.evaluate`` runs). Only the model's file comes from the revision (its classes
registered under other names); everything else is the working tree's. One thread; the best of
``--rounds``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

import pixelchain as pc
import pixelchain.models as registry
from benchmarks.common import Stopwatch
from benchmarks.train_bmnist import PRESETS
from pixelchain import runtime
from pixelchain.train import adam

ROOT = Path(__file__).resolve().parents[1]


def model_at(revision: str, name: str) -> type:
    """The class registered as ``name`` in ``revision``'s version of its model file."""
    registry.list_models()  # imports every family
    cls = registry.MODELS[name]
    path = Path(sys.modules[cls.__module__].__file__).relative_to(ROOT)
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    classes: dict[str, type] = {}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
            registry, "register", lambda key: lambda c: classes.setdefault(key, c)):
        file = Path(tmp) / path.name
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(f"{cls.__module__}_at_{revision}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return classes[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--against", default="main", help="git revision")
    parser.add_argument("--set", default="", help="hyperparameters to override: name=v1[,v2...];name=...")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runtime.configure_allocator()
    torch.set_num_threads(1)
    name, hparams, settings = PRESETS[args.preset]
    for item in filter(None, args.set.split(";")):
        key, value = item.split("=")
        values = [int(v) for v in value.split(",")]
        hparams = {**hparams, key: tuple(values) if "," in value else values[0]}
    train = pc.data.load("binarized_mnist", "train").images
    valid = pc.data.load("binarized_mnist", "valid").images[: args.eval_images]
    torch.manual_seed(0)
    models = {"working tree": pc.create(name, (1, 28, 28), 2, **hparams)}
    models[args.against] = model_at(args.against, name)((1, 28, 28), 2, **hparams)
    models[args.against].load_state_dict(models["working tree"].state_dict())
    optimisers = {k: adam(m, settings["lr"]) for k, m in models.items()}
    batch = settings["batch_size"]

    def train_steps(key: str) -> None:
        model, optimiser = models[key].train(), optimisers[key]
        for s in range(args.steps):
            x = train[s * batch : (s + 1) * batch]
            optimiser.zero_grad()
            (-model.log_likelihood(model(x), x).mean()).backward()
            optimiser.step()

    def evaluate(key: str) -> None:
        with torch.no_grad():
            for batch in valid.split(256):
                models[key].eval().log_prob(batch)

    work = {"train": train_steps} | ({"eval": evaluate} if args.eval_images else {})
    seconds = {(k, w): [] for k in models for w in work}
    for _ in range(args.rounds):
        for what, run in work.items():
            for key in models:
                with Stopwatch() as t:
                    run(key)
                seconds[key, what].append(t.seconds)
    print(f"{args.preset} {hparams}, batch {batch}, one thread, best of {args.rounds} interleaved rounds:")
    for what in work:
        images = args.steps * batch if what == "train" else len(valid)
        new, old = min(seconds["working tree", what]), min(seconds[args.against, what])
        print(f"  {what}: working tree {images / new:.1f} img/s, {args.against} {images / old:.1f} img/s, "
              f"ratio {old / new:.2f}x")


if __name__ == "__main__":
    main()
