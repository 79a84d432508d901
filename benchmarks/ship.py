"""Ship the small benchmark checkpoints with the package, and their figures with the docs.

    python -m benchmarks.ship --runs-dir runs/bench --prefix bmnist_ fvsbn nade made ...
    python -m benchmarks.ship --runs-dir runs/bench_fv --prefix "" fvsbn_caltech logistic_regression_mnist

Copies each run's config.json and model.safetensors (the best-validation weights) into
pixelchain/checkpoints/PREFIX+RUN/ with result.json (its test figures, and the NLL of the first
100 test images as loaded from there, which the tests recompute), so ``pc.load(name)`` and
``pixelchain sample NAME`` work without training; its samples and completions (drawn anew, seed 0)
go to docs/figures/PREFIX+RUN_*.png, indexed with each run's test NLL in docs/figures/README.md.
Refuses runs whose weights exceed ``--max-mb``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks import common  # noqa: F401  (local dataset copies)
from pixelchain.checkpoint import CONFIG, PRETRAINED_DIR, WEIGHTS
from pixelchain.cli import write_figures

CHECK_IMAGES = 100
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--prefix", default="bmnist_")
    parser.add_argument("--max-mb", type=float, default=8.0)
    args = parser.parse_args()
    for run in args.runs:
        source = Path(args.runs_dir) / run
        name = args.prefix + run
        weights = source / WEIGHTS
        if not (source / "result.json").is_file() or not weights.is_file():
            raise SystemExit(f"{source}: no result.json / {WEIGHTS}; finish the run first")
        size = weights.stat().st_size / 2**20
        if size > args.max_mb:
            raise SystemExit(f"{source}: {size:.1f} MB of weights is over --max-mb {args.max_mb}")
        target = PRETRAINED_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        for file in (CONFIG, WEIGHTS):
            shutil.copy(source / file, target / file)
        result = json.loads((source / "result.json").read_text())
        model = pc.load(target)
        dataset = json.loads((target / CONFIG).read_text())["dataset"]["name"]
        first = pc.data.load(dataset, "test").subset(slice(0, CHECK_IMAGES))
        result["check"] = {"test_images": CHECK_IMAGES, **pc.evaluate(model, first)}  # tests compare to this
        (target / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if model.kind == "density":
            with tempfile.TemporaryDirectory() as tmp:
                write_figures(model, {"name": dataset}, Path(tmp), torch.Generator().manual_seed(0))
                FIGURES.mkdir(parents=True, exist_ok=True)
                for figure in ("samples.png", "completions.png"):
                    shutil.copy(Path(tmp) / figure, FIGURES / f"{name}_{figure}")
        print(f"{name}: {size:.1f} MB -> {target}")
    write_index()


def write_index() -> None:
    """docs/figures/README.md: every shipped checkpoint's completions and samples."""
    lines = ["# Figures of the shipped checkpoints", "",
             "Written by `python -m benchmarks.ship`. Completions: each row is a test image, the same image "
             "with its bottom half occluded, then completions sampled by the model (the PixelRNN paper's "
             "figure). `pixelchain complete NAME` and `pixelchain sample NAME` redraw them.", ""]
    for name in sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "result.json").is_file()):
        result = json.loads((PRETRAINED_DIR / name / "result.json").read_text())
        test = result.get("test") or {"nll": result["test_nll"]}
        score = f"test accuracy {test['accuracy']:.2%}" if "accuracy" in test else f"test NLL {test['nll']:.2f} nats"
        lines.append(f"## {name}\n\n{result['model']}, {score}\n")
        for figure in ("completions", "samples"):
            if (FIGURES / f"{name}_{figure}.png").is_file():
                lines.append(f"![{name} {figure}]({name}_{figure}.png)\n")
    (FIGURES / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
