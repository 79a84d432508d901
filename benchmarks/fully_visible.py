"""The first chapter's models on real data, trained on a CPU.

    python -m benchmarks.fully_visible --runs-dir runs/bench_fv [--max-time 1200]

* ``fvsbn`` on Caltech-101 Silhouettes (28x28 split 1): test NLL in nats;
* ``fully_visible`` (K = 256 softmax per pixel, W_d in R^{256 x d}) on MNIST: nats and bits/dim;
* ``logistic_regression`` on MNIST: test accuracy (target >= 92%).
(FVSBN on static binarized MNIST comes from train_bmnist.py.) Writes BENCHMARKS.md's
"fully_visible" section from the runs' records (benchmarks/records/fully_visible/RUN/result.json,
copied there after each run); each run is resumable (``--resume``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import RECORDS, Stopwatch, keep_record, machine, write_section
from pixelchain import runtime
from pixelchain.checkpoint import build
from pixelchain.plots import write_figures
from pixelchain.run_dir import RESULT, RunDir, result_record

RUNS = {
    "fvsbn_caltech": ("fvsbn", "caltech101_silhouettes", {}, {"batch_size": 50, "lr": 3e-3, "lr_decay": 0.97,
                                                             "weight_decay": 1e-3}),
    "fully_visible_mnist": ("fully_visible", "mnist", {}, {"batch_size": 100, "lr": 1e-3, "lr_decay": 0.9}),
    "logistic_regression_mnist": ("logistic_regression", "mnist", {"num_classes": 10},
                                  {"batch_size": 100, "lr": 1e-3, "lr_decay": 0.9}),
}


TRAIN_IMAGES = {"caltech101_silhouettes": 4100, "mnist": 50_000}  # training split sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs/bench_fv")
    parser.add_argument("--max-time", type=float, default=1200.0, help="seconds per run in this call")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="train nothing: rewrite the table from the records")
    args = parser.parse_args()
    runtime.configure_allocator()
    for label in [] if args.table_only else args.only or RUNS:
        name, dataset, hparams, settings = RUNS[label]
        train, valid, test = (pc.data.load(dataset, s) for s in ("train", "valid", "test"))
        torch.manual_seed(0)
        model = build(name, train.image_shape, train.num_levels, **hparams)
        run_dir = Path(args.runs_dir) / label
        with Stopwatch() as watch:
            summary = pc.fit(model, train, valid, run_dir=run_dir, epochs=args.epochs, patience=8,
                             max_time=args.max_time, resume=args.resume, progress=False, checkpoint_seconds=600,
                             info={"dataset": {"name": dataset}}, **settings)
            metrics = pc.evaluate(model, test)
            record = result_record(model, summary, metrics, run=label, dataset=dataset, train=settings,
                                   machine=machine(), date=time.strftime("%Y-%m-%d"))
            RunDir(run_dir).write_result(record)
            keep_record(run_dir, "fully_visible")
            if model.kind == "density":
                write_figures(model, test, run_dir, torch.Generator().manual_seed(0))
        print(label, metrics, f"{watch.seconds:.0f} s", flush=True)

    rows = ["| run | model | dataset | training (batch, lr, decay per epoch, L2 on weights) | test | epochs "
            "| training time | machine |", "|---|---|---|---|---|---|---|---|"]
    for label in RUNS:
        record = RunDir(RECORDS / "fully_visible" / label)
        if not (record / RESULT).exists():
            continue
        r = record.read_result()
        m = r["test"]
        score = (f"accuracy **{m['accuracy']:.2%}**, NLL {m['nll']:.3f} nats" if "accuracy" in m
                 else f"**{m['nll']:.2f} nats**, {m['bits_per_dim']:.3f} bits/dim")
        epochs = r["steps"] * r["train"]["batch_size"] / TRAIN_IMAGES[r["dataset"]] if "steps" in r else r["epochs"]
        note = "" if r["finished"] else " (time budget reached)"
        t = r["train"]
        training = f"{t['batch_size']}, {t['lr']:g}, {t.get('lr_decay', 1):g}, {t.get('weight_decay', 0):g}"
        rows.append(f"| {label} | {r['model']} | {r['dataset']} | {training} | {score} | {epochs:.2f}{note} "
                    f"| {r['train_seconds'] / 60:.1f} min | {r['machine'].split(',')[0]}, {r['date']} |")
    write_section("fully_visible", "Each run was trained by `python -m benchmarks.fully_visible --only RUN "
                  "--max-time S [--resume]` (one thread, beside other runs), on the machine in its row.\n\n"
                  + "\n".join(rows))


if __name__ == "__main__":
    main()
