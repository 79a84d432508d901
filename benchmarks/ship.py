"""Ship the small benchmark checkpoints with the package, and their figures with the docs.

    python -m benchmarks.ship --runs-dir runs/bench --prefix bmnist_ fvsbn_per_pixel nade made ...
    python -m benchmarks.ship --runs-dir runs/bench_fv --prefix "" fvsbn_caltech logistic_regression_mnist
    python -m benchmarks.ship --refresh     # rewrite the shipped ones in the current format

Copies each run's config.json and best-validation weights (derived buffers such as masks left out,
a digest recorded) into pixelchain/checkpoints/PREFIX+RUN/ with result.json (its test figures, and
the NLL of the first 100 test images, which the tests recompute) and check.safetensors (those 100
images, so the check runs where the dataset is not at hand), so ``pc.load(name)`` and
``pixelchain sample NAME`` work without training; its samples and completions (drawn anew, seed 0)
go to docs/figures/PREFIX+RUN_*.png, indexed with each run's test NLL in docs/figures/README.md.
Ship one checkpoint per family and dataset, the best; refuses runs whose weights exceed ``--max-mb``.
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
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.io import load_split
from pixelchain.plots import write_figures
from pixelchain.run_dir import CONFIG, WEIGHTS, RunDir

CHECK_IMAGES = 100
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--prefix", default="bmnist_")
    parser.add_argument("--max-mb", type=float, default=8.0)
    parser.add_argument("--refresh", action="store_true",
                        help="rewrite every shipped checkpoint's weights and check images; its check must hold")
    args = parser.parse_args()
    for run in args.runs:
        source = Path(args.runs_dir) / run
        weights = source / WEIGHTS
        if not (source / "result.json").is_file() or not weights.is_file():
            raise SystemExit(f"{source}: no result.json / {WEIGHTS}; finish the run first")
        target = PRETRAINED_DIR / (args.prefix + run)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / CONFIG, target / CONFIG)
        result = json.loads((source / "result.json").read_text())
        ship(target, pc.load(source), result, args.max_mb)
    for name in pc.pretrained() if args.refresh else []:
        target = PRETRAINED_DIR / name
        result = RunDir(target).read_result()
        recorded = result["check"]["nll"]
        ship(target, pc.load(target), result, args.max_mb, figures=False)
        if abs(result["check"]["nll"] - recorded) > 1e-3:
            raise SystemExit(f"{name}: the check NLL moved from {recorded} to {result['check']['nll']}")
    write_index()


def ship(target: Path, model: torch.nn.Module, result: dict, max_mb: float, figures: bool = True) -> None:
    """Write ``model``'s weights, its check images and ``result`` (with the check's NLL) into
    ``target`` (which holds the run's config.json), and its figures into docs/figures."""
    run = RunDir(target)
    run.write_weights(model.state_dict())
    size = (target / WEIGHTS).stat().st_size / 2**20
    if size > max_mb:
        shutil.rmtree(target)
        raise SystemExit(f"{target.name}: {size:.1f} MB of weights is over --max-mb {max_mb}")
    test = load_split(run.read_config()["dataset"], "test")
    first = test.subset(slice(0, CHECK_IMAGES))
    run.write_check(first.images, first.labels)
    result["check"] = {"test_images": CHECK_IMAGES, **pc.evaluate(model, first)}  # tests compare to this
    run.write_result(result)
    if figures and model.kind == "density":
        with tempfile.TemporaryDirectory() as tmp:
            write_figures(model, test, tmp, torch.Generator().manual_seed(0))
            FIGURES.mkdir(parents=True, exist_ok=True)
            for figure in ("samples.png", "completions.png"):
                shutil.copy(Path(tmp) / figure, FIGURES / f"{target.name}_{figure}")
    print(f"{target.name}: {size:.1f} MB -> {target}")


def write_index() -> None:
    """docs/figures/README.md: every shipped checkpoint's completions and samples."""
    lines = ["# Figures of the shipped checkpoints", "",
             "Written by `python -m benchmarks.ship`. Completions: each row is a test image, the same image "
             "with its bottom half occluded, then completions sampled by the model (the PixelRNN paper's "
             "figure). `pixelchain complete NAME` and `pixelchain sample NAME` redraw them.", ""]
    for name in sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "result.json").is_file()):
        result = json.loads((PRETRAINED_DIR / name / "result.json").read_text())
        test = result["test"]
        score = f"test accuracy {test['accuracy']:.2%}" if "accuracy" in test else f"test NLL {test['nll']:.2f} nats"
        lines.append(f"## {name}\n\n{result['model']}, {score}\n")
        for figure in ("completions", "samples"):
            if (FIGURES / f"{name}_{figure}.png").is_file():
                lines.append(f"![{name} {figure}]({name}_{figure}.png)\n")
    (FIGURES / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
