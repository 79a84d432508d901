"""PixelDefend's classifiers on Fashion-MNIST, trained by the library's one trainer.

    python -m benchmarks.train_classifiers resnet vgg --runs-dir runs/classifiers --max-time 720
    python -m benchmarks.ship --runs-dir runs/classifiers --prefix "" fmnist_resnet fmnist_vgg

Trains on the train split (the first 50,000 images), keeps the weights of the best validation NLL
(the last 10,000), reports test accuracy and writes RUN/result.json; resumable (``--resume``).
The ResNet is a ResNet-32 (widths 4/8/16, or 8/16/32 as `resnet_w8`, per-image standardisation); the VGG is
conv 32-32-pool-64-64-pool-fc 256 with dropout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import RECORDS, keep_record, machine, write_section
from pixelchain import runtime
from pixelchain.run_dir import RunDir, result_record

PRESETS = {  # name -> (classifier, hyperparameters, training settings)
    "resnet": ("resnet", {}, {"batch_size": 128, "lr": 2e-3, "lr_decay": 0.85}),
    "vgg": ("vgg", {}, {"batch_size": 128, "lr": 1e-3, "lr_decay": 0.85}),
    # twice the widths (4x the arithmetic): the 4/8/16 network plateaued near 91.4% on validation
    "resnet_w8": ("resnet", {"widths": (8, 16, 32)}, {"batch_size": 128, "lr": 2e-3, "lr_decay": 0.8}),
}
DATASET = "fashion_mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help=f"presets: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--runs-dir", default="runs/classifiers")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-time", type=float, default=720.0, help="seconds per run in this call")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast where the hardware runs it natively (the library's default)")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--table-only", action="store_true", help="train nothing: rewrite the table from the records")
    args = parser.parse_args()
    unknown = sorted(set(args.runs) - set(PRESETS))
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    runtime.configure_allocator()
    train, valid, test = (pc.data.load(DATASET, s) for s in ("train", "valid", "test"))
    for preset in [] if args.table_only else args.runs:
        name, hparams, settings = PRESETS[preset]
        label = f"fmnist_{preset}"
        torch.manual_seed(0)
        model = pc.classifiers.create(name, train.image_shape, train.num_levels, num_classes=10, **hparams)
        run_dir = Path(args.runs_dir) / label
        summary = pc.fit(model, train, valid, run_dir=run_dir, epochs=args.epochs, max_time=args.max_time,
                         resume=args.resume, amp=args.amp, progress=False, info={"dataset": {"name": DATASET}},
                         **settings)
        metrics = pc.evaluate(model, test)
        RunDir(run_dir).write_result(result_record(model, summary, metrics, run=label, dataset=DATASET,
                                                   hparams=hparams, train=settings, machine=machine(),
                                                   date=time.strftime("%Y-%m-%d")))
        keep_record(run_dir, "classifiers")
        print(f"{label}: test accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f} nats, "
              f"{summary['epoch']} epochs in {summary['elapsed']:.0f} s", flush=True)
    if not args.no_write:
        write_section("classifiers", table())


def table() -> str:
    """The classifiers' test accuracy from their records (benchmarks/records/classifiers/RUN/result.json)."""
    rows = ["| run | model | parameters | test accuracy | test NLL (nats) | epochs | training time | machine |",
            "|---|---|---|---|---|---|---|---|"]
    for path in sorted((RECORDS / "classifiers").glob("*/result.json")):
        r = json.loads(path.read_text())
        note = "" if r["finished"] else " (time budget reached)"
        rows.append(f"| {r['run']} | {r['model']} | {r['parameters']:,} | **{r['test']['accuracy']:.2%}** "
                    f"| {r['test']['nll']:.3f} | {r['steps'] * r['train']['batch_size'] / 50_000:.2f}{note} "
                    f"| {r['train_seconds'] / 60:.1f} min | {r['machine'].split(',')[0]}, {r['date']} |")
    return ("PixelDefend's Fashion-MNIST classifiers (shipped as `fmnist_resnet`, `fmnist_vgg`), trained by "
            "`python -m benchmarks.train_classifiers PRESET --amp --epochs E --max-time S` (bf16 autocast, one "
            "thread at nice 19 beside the session's other work; `resnet` 30 epochs / 4200 s, `vgg` 25 / 4000 s; "
            "`resnet_w8` 10 epochs / 2100 s at two threads), the best validation NLL's weights kept. `fmnist_resnet` "
            "ships the `fmnist_resnet_aug` run (until 2026-12-04 evening, the `resnet_w8` run it continued). "
            "`fmnist_vgg` (shipped) and `fmnist_resnet_w16` trained on a lent GPU "
            "by `python3 -m benchmarks.gpu_session run` (jobs `fmnist_vgg_long`: `pixelchain train vgg --epochs 40 "
            "--lr-decay 0.9 --seed 1`; `fmnist_resnet_w16`: widths 16/32/64), 8 minutes each beside 11 other runs; "
            "`fmnist_vgg_cpu` is the earlier CPU run. `fmnist_resnet_aug` continues `resnet_w8` "
            "from its 10th epoch with random flips and shifts (`pixelchain train resnet --dataset fashion_mnist "
            "--resume --augment --epochs 22 --lr 1.43e-3 --lr-decay 0.9 --warmup 100`, fresh Adam moments, one "
            "thread at nice 19); its training time includes about 93 minutes paused while quiet measurements ran. "
            "`fmnist_resnet_pd1` continues `fmnist_resnet` for 10 epochs on the clean training split plus 20,000 "
            "of its images purified by `fmnist_pixelcnn_pp` (10,000 at ε_def 16, 10,000 at 32; `python -m "
            "benchmarks.purified_classifier --per-eps 10000 --epochs 10 --lr 3e-4`, in two calls: 4 epochs, then "
            "resumed to 10). `fmnist_resnet_pd` (shipped beside `fmnist_resnet`, for PixelDefend) continues "
            "`fmnist_resnet_pd1` for 5 epochs with 20,000 more training images added, attacked by BIM (ε 8, against "
            "`fmnist_resnet_pd1`) and then purified (`--classifier fmnist_resnet_pd1 --attack-eps 8 --epochs 5 --lr "
            "2e-4`). `fmnist_resnet_pd2` (not shipped) continues `fmnist_resnet_pd` for 4 epochs with 40,000 more "
            "training images purified at ε_def 32 alone, 20,000 clean and 20,000 attacked by BIM (ε 8, against "
            "`fmnist_resnet_pd`) (`--classifier fmnist_resnet_pd --eps-defend 32 --per-eps 20000 --attack-eps 8 "
            "--epochs 4 --lr 2e-4`): on its validation images (clean / purified / BIM then purified, ε_def 32) it "
            "has 93.50% / 90.40% / 85.80% where `fmnist_resnet_pd` has 93.25% / 90.50% / 86.10%, so more purified "
            "images no longer raise the accuracy on purified ones. All three are validated on the clean validation "
            "split plus 1,000 of its images per purified set, ran at one thread at nice 5, and their training "
            "times leave out the purification (about 9 minutes per 20,000 images alone, 16 beside "
            "another attack job); their epochs column counts 50,000 images (their epochs held 70,000, 90,000 and "
            "90,000). "
            "Targets: ResNet >= 92%, VGG >= 93% test accuracy.\n\n"
            + "\n".join(rows))


if __name__ == "__main__":
    main()
