"""Train one benchmark preset on static binarized MNIST, under a time budget, resumably.

    python -m benchmarks.train_bmnist gated_pixelcnn --max-time 480 --runs-dir runs/bench
    python -m benchmarks.train_bmnist gated_pixelcnn --max-time 480 --runs-dir runs/bench --resume
    python -m benchmarks.train_bmnist nade --max-time 3600 --runs-dir runs/bench --from-shipped

Each epoch logs validation and test NLL (nats) against training time in metrics.jsonl (the test
split never steers model selection: the best validation epoch's weights are kept). At the end the
best weights are scored on the test split and result.json, samples.png and completions.png are
written. ``python benchmarks/report.py`` turns the run directories into BENCHMARKS.md tables.

Run directories stay on the machine that trained them; the shipped checkpoint of a preset
(``bmnist_PRESET``, see ship.py) keeps its best weights and result.json, and
benchmarks/records/bmnist/PRESET its metrics.jsonl (see report.py), so ``--from-shipped``
continues it elsewhere: from those weights, its record and its position (epoch, step, time,
learning rate), with fresh Adam moments.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch

import pixelchain as pc
from benchmarks.common import (  # (importing benchmarks.common also points at the local data)
    RECORDS,
    Stopwatch,
    write_shipped_position,
)
from pixelchain import runtime
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.plots import write_figures
from pixelchain.run_dir import METRICS, RESULT, STATE, RunDir, result_record
from pixelchain.train import Interrupted

# name -> (model, hyperparameters, training settings). Sizes follow the papers where they give
# them for binarized MNIST, else are chosen to train in minutes on one GPU.
PRESETS = {
    "fvsbn": ("fvsbn", {}, {"batch_size": 100, "lr": 3e-3, "lr_decay": 0.95}),
    "fvsbn_l2": ("fvsbn", {}, {"batch_size": 100, "lr": 3e-3, "lr_decay": 0.95, "weight_decay": 3e-4}),
    "nade": ("nade", {"hidden": 500}, {"batch_size": 100, "lr": 2e-3, "lr_decay": 0.98}),
    # one random input order (raster order left MADE near 101 nats: its low-degree hidden units see
    # only the blank top rows)
    "made": ("made", {"hidden": (500,), "order_agnostic": True}, {"batch_size": 100, "lr": 1e-3}),
    # the paper's width, one mask in raster order with direct input-output connections (hidden units
    # sorted by degree: the masked products skip the masked-out half)
    "made_8000": ("made", {"hidden": (8000,), "direct": True},
                  {"batch_size": 100, "lr": 5e-4, "lr_decay": 0.97}),
    # the paper's best: two hidden layers of 8000, 32 connectivity masks cycled one per minibatch
    "made_32_masks": ("made_ensemble", {"hidden": (8000, 8000), "num_masks": 32, "direct": True},
                      {"batch_size": 100, "lr": 5e-4, "lr_decay": 0.98}),
    "pixelcnn": ("pixelcnn", {"channels": 64, "num_blocks": 12, "head_channels": 64},
                 {"batch_size": 64, "lr": 1e-3, "lr_decay": 0.96}),
    "gated_pixelcnn": ("gated_pixelcnn", {"channels": 64, "num_layers": 10, "head_channels": 64},
                       {"batch_size": 64, "lr": 1e-3, "lr_decay": 0.96}),
    "pixelcnn_pp": ("pixelcnn_pp", {"channels": 32, "num_resnet": 2, "num_scales": 3, "num_mixtures": 1,
                                    "dropout": 0.2}, {"batch_size": 64, "lr": 1e-3, "lr_decay": 0.97}),
    "row_lstm": ("row_lstm", {"channels": 32, "num_layers": 7}, {"batch_size": 128, "lr": 2e-3, "lr_decay": 0.96}),
    "diagonal_bilstm": ("diagonal_bilstm", {"channels": 32, "num_layers": 7},
                        {"batch_size": 128, "lr": 2e-3, "lr_decay": 0.96}),
    "transformer": ("transformer", {"dim": 128, "num_layers": 6, "num_heads": 4, "dropout": 0.1},
                    {"batch_size": 64, "lr": 5e-4, "lr_decay": 0.96, "grad_clip": 1.0}),
    # Small variants that see a few epochs in ~15 minutes of one CPU core (curves, shipped checkpoints).
    "pixelcnn_cpu": ("pixelcnn", {"channels": 32, "num_blocks": 6, "head_channels": 32},
                     {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.9}),
    "gated_pixelcnn_cpu": ("gated_pixelcnn", {"channels": 32, "num_layers": 6, "head_channels": 32},
                           {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.9}),
    "pixelcnn_pp_cpu": ("pixelcnn_pp", {"channels": 16, "num_resnet": 1, "num_scales": 3, "num_mixtures": 1,
                                        "dropout": 0.0}, {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.9}),
    "row_lstm_cpu": ("row_lstm", {"channels": 16, "num_layers": 3}, {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.9}),
    "diagonal_bilstm_cpu": ("diagonal_bilstm", {"channels": 16, "num_layers": 3},
                            {"batch_size": 32, "lr": 2e-3, "lr_decay": 0.9}),
    "transformer_cpu": ("transformer", {"dim": 32, "num_layers": 3, "num_heads": 2, "dropout": 0.0},
                        {"batch_size": 32, "lr": 1e-3, "lr_decay": 0.9, "grad_clip": 1.0}),
}


def variant(preset: str, hparams: dict | None = None, settings: dict | None = None) -> tuple[str, dict, dict]:
    """``preset`` with some hyperparameters or training settings changed."""
    name, base_hparams, base_settings = PRESETS[preset]
    return name, {**base_hparams, **(hparams or {})}, {**base_settings, **(settings or {})}


# `pixelcnn` overfits near 85 (its validation NLL rose from epoch 20 while training NLL fell): the
# same network regularised, to choose on validation (dropout in the residual blocks, L2 on the
# weights).
PRESETS.update({
    "pixelcnn_drop10": variant("pixelcnn", {"dropout": 0.1}),
    "pixelcnn_drop30": variant("pixelcnn", {"dropout": 0.3}),
    "pixelcnn_drop30_l2": variant("pixelcnn", {"dropout": 0.3}, {"weight_decay": 1e-5}),
})
# `gated_pixelcnn` overfits too: after 23 epochs its training NLL was 79.2 and falling, its validation
# NLL 84.0 and rising since epoch 15 (best 83.15). The same network with dropout on each layer's gated
# output.
PRESETS["gated_pixelcnn_drop20"] = variant("gated_pixelcnn", {"dropout": 0.2})
# The Transformer's bar (79.17) is pytorch-generative's ImageGPT at 8 blocks of 64 channels: that size
# beside `transformer` (6 x 128), so that GPU minutes say how small a model reaches it.
PRESETS["transformer_64x8"] = variant("transformer", {"dim": 64, "num_layers": 8, "num_heads": 2})
# name -> (preset, epochs): the preset refit on train + valid for the epochs its validated run chose
# (a protocol of the literature: model selection on valid, then the final fit on both).
REFITS = {"fvsbn_l2_refit": ("fvsbn_l2", 135)}


def start_from_shipped(preset: str, run_dir: Path, model: torch.nn.Module, settings: dict, train_images: int,
                       curve_images: int | None) -> None:
    """Make ``run_dir`` a resumable run holding the shipped checkpoint ``bmnist_PRESET``: its best
    weights, its metrics and its position, with fresh optimiser moments."""
    source = RunDir(PRETRAINED_DIR / f"bmnist_{preset}")
    if not (source / RESULT).is_file():
        raise SystemExit(f"no shipped checkpoint {source.path.name} to continue")
    result = source.read_result()
    if result["finished"]:
        raise SystemExit(f"{source.path.name} finished (early stopping or its epoch budget): nothing to continue")
    if result.get("curve_images") != curve_images:
        raise SystemExit(f"{source.path.name} scored its curve with --curve-images {result.get('curve_images')}; "
                         "pass the same so its record stays comparable")
    model.load_state_dict(pc.load(source.path).state_dict())
    run = RunDir(run_dir)
    run.write_config(source.read_config())
    run.write_weights(model.state_dict())
    record = RECORDS / "bmnist" / preset / METRICS
    if record.is_file():  # evaluations after the shipped step are dropped when the run resumes
        shutil.copy(record, run_dir / METRICS)
    write_shipped_position(run_dir, model, result, settings, train_images)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS) + sorted(REFITS))
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--max-time", type=float, default=600.0, help="training seconds in this call")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast where the hardware runs it natively (the library's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (pc.fit(compile=True))")
    parser.add_argument("--warmup", type=int, default=0,
                        help="steps of linear learning-rate warm-up whenever Adam's moments start fresh")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--from-shipped", action="store_true",
                        help="continue the shipped checkpoint bmnist_PRESET (when RUNS_DIR has no run of it yet)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--limit", type=int, help="use only this many images per split (smoke tests)")
    parser.add_argument("--eval-every", type=int, help="also evaluate every this many steps (slow models)")
    parser.add_argument("--curve-images", type=int,
                        help="score the curve's validation/test points on N images of each split (every k-th) "
                             "(slow models); the final test NLL always uses the whole test split")
    args = parser.parse_args(argv)

    runtime.configure_allocator()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    device = runtime.pick_device(args.device)
    base, epochs = REFITS.get(args.preset, (args.preset, args.epochs))
    name, hparams, settings = PRESETS[base]
    train, valid, test = (pc.data.load("binarized_mnist", s) for s in ("train", "valid", "test"))
    if args.limit:
        train, valid, test = (d.subset(slice(0, args.limit)) for d in (train, valid, test))
    refit = args.preset in REFITS
    if refit:  # no validation left to steer anything: a fixed number of epochs
        train, valid = train + valid, None
    torch.manual_seed(0)
    model = pc.create(name, train.image_shape, train.num_levels, **hparams).to(device)
    run_dir = Path(args.runs_dir) / args.preset
    curve_valid, curve_test = valid, test
    if args.curve_images and not refit:
        # every k-th image: the static test split is sorted by digit (its first thousand are zeros)
        curve_valid, curve_test = (d.subset(slice(0, None, max(1, len(d) // args.curve_images)))
                                   for d in (valid, test))
    resume = args.resume
    if args.from_shipped and not (run_dir / STATE).exists():
        start_from_shipped(args.preset, run_dir, model, settings, len(train), args.curve_images)
        resume = True
    watch = Stopwatch()
    summary = pc.fit(
        model, train, curve_valid, run_dir=run_dir, epochs=epochs, patience=args.patience,
        max_time=args.max_time, eval_every=args.eval_every, amp=args.amp, compile=args.compile, resume=resume,
        warmup=args.warmup, progress=sys.stdout.isatty(),
        info={"dataset": {"name": "binarized_mnist"}, "preset": args.preset},
        monitor={"test": curve_test}, **settings,
    )
    result = result_record(
        model, summary, pc.evaluate(model, test), preset=args.preset, hparams=hparams, train=settings, amp=args.amp,
        compile=args.compile, curve_images=args.curve_images, train_images=len(train),
        refit_on=train.split if refit else None,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    RunDir(run_dir).write_result(result)
    print(f"{args.preset}: test NLL {result['test']['nll']:.2f} nats after {summary['epoch']} epochs, "
          f"{summary['elapsed']:.0f} s ({result['parameters']:,} parameters, {watch.seconds:.0f} s "
          "this run)")
    if not args.no_figures:
        write_figures(model, test, run_dir, torch.Generator(device).manual_seed(0))
    assert math.isfinite(result["test"]["nll"])
    return result


if __name__ == "__main__":
    try:
        main()
    except Interrupted as stop:  # Ctrl-C or SIGTERM: the run checkpointed; exit 128 + signal, no traceback
        print(f"interrupted by signal {stop.signum}: checkpointed, continue with --resume", file=sys.stderr)
        sys.exit(128 + stop.signum)
