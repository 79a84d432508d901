"""The command line: ``pixelchain train | eval | sample | complete | list``.

    pixelchain train gated_pixelcnn --dataset binarized_mnist --run-dir runs/gated --epochs 20
    pixelchain train fvsbn --dataset binarized_mnist --resume --run-dir runs/fvsbn
    pixelchain eval runs/gated
    pixelchain sample runs/gated -n 64
    pixelchain complete runs/gated
Under ``torchrun --nproc_per_node=N pixelchain train ...`` training is data-parallel.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, data, plots, runtime
from .models import create, list_models
from .train import TrainingDiverged, evaluate, fit


def parse_hparams(pairs: list[str]) -> dict:
    """['channels=64', 'hidden=(500, 500)'] -> {'channels': 64, 'hidden': (500, 500)}."""
    hparams = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects NAME=VALUE, got {pair!r}")
        try:
            hparams[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            hparams[key] = value
    return hparams


def load_split(dataset: dict, split: str) -> data.ImageDataset:
    return data.load(dataset["name"], split, num_levels=dataset.get("num_levels"), binarize=dataset.get("binarize"))


def run_dataset(run: str) -> dict:
    config = checkpoint.read_config(run)
    if "dataset" not in config:
        raise SystemExit(f"{run}: its config names no dataset; pass --dataset")
    return config["dataset"]


def write_figures(model, dataset: dict, run_dir: Path, generator: torch.Generator, naive: bool = False) -> None:
    """samples.png (64 samples) and completions.png (8 test images, bottom half occluded, 4 each)."""
    test = load_split(dataset, "test")
    labels = None
    if getattr(model, "num_classes", None):
        labels = torch.arange(64) % model.num_classes
    samples = model.sample(64, generator=generator, labels=labels, naive=naive, progress=True)
    plots.save_samples(samples, model.num_levels, run_dir / "samples.png")
    complete(model, test, run_dir / "completions.png", 8, 4, generator, naive)


def complete(model, test, path: Path, n: int, per_image: int, generator, naive: bool) -> None:
    index = torch.linspace(0, len(test) - 1, n).long()  # spread out: some test splits are sorted by class
    x = test.images[index].to(model.device)
    labels = None if not getattr(model, "num_classes", None) else test.labels[index].repeat_interleave(per_image)
    observed = plots.bottom_half_occluded(x)
    repeated = x.repeat_interleave(per_image, 0)
    done = model.complete(repeated, observed.repeat_interleave(per_image, 0), generator=generator,
                          labels=labels, naive=naive, progress=True)
    plots.save_completions(x, observed, done.view(n, per_image, *x.shape[1:]), model.num_levels, path)


def report(metrics: dict, split: str) -> str:
    line = f"{split} NLL: {metrics['nll']:.3f} nats"
    if "bits_per_dim" in metrics:
        line += f", {metrics['bits_per_dim']:.4f} bits/dim"
    if "accuracy" in metrics:
        line += f", accuracy {metrics['accuracy']:.4f}"
    return line + f" ({metrics['n']} images)"


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> None:
    dataset = {"name": args.dataset, "num_levels": args.num_levels, "binarize": args.binarize}
    train, valid = load_split(dataset, "train"), load_split(dataset, "valid")
    run_dir = Path(args.run_dir or f"runs/{args.model}_{args.dataset}")
    device = runtime.pick_device(args.device)
    torch.manual_seed(args.seed)
    hparams = parse_hparams(args.set)
    if args.resume:  # rebuild exactly what the run was started with
        config = checkpoint.read_config(run_dir)
        hparams = {k: v for k, v in config["args"].items() if k not in ("image_shape", "num_levels")}
        args.model = config["model"]
    if args.model == "logistic_regression":
        hparams.setdefault("num_classes", int(train.labels.max()) + 1)
    try:
        model = create(args.model, train.image_shape, train.num_levels, **hparams).to(device)
    except ValueError as error:
        hint = "; --binarize or --num-levels change the levels" if "levels" in str(error) else ""
        raise ValueError(f"{args.model} on {args.dataset} ({train.num_levels} levels): {error}{hint}") from None
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {params:,} parameters on {device}; {train!r}; run directory {run_dir}")
    summary = fit(
        model, train, valid, run_dir=run_dir, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_decay=args.lr_decay, grad_clip=args.grad_clip, patience=args.patience, max_steps=args.max_steps,
        max_time=args.max_time, checkpoint_seconds=args.checkpoint_seconds, eval_every=args.eval_every, seed=args.seed,
        compile=args.compile, amp=args.amp, resume=args.resume, info={"dataset": dataset},
    )
    test_metrics = evaluate(model, load_split(dataset, "test"))  # sharded: every process takes part
    if rank != 0:
        return
    print(f"trained {summary['step']} steps in {summary['elapsed']:.0f} s ({summary['images_per_s']:.0f} images/s)"
          + ("" if summary["finished"] else "; not finished: run again with --resume to continue"))
    print(report(test_metrics, "test"))
    with open(run_dir / "test_metrics.json", "w") as f:
        json.dump(test_metrics, f)
    if model.kind == "density" and not args.no_figures:
        write_figures(model, dataset, run_dir, torch.Generator(device).manual_seed(args.seed))
        print(f"wrote {run_dir / 'samples.png'} and {run_dir / 'completions.png'}")


def cmd_eval(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    dataset = {"name": args.dataset} if args.dataset else run_dataset(args.run)
    print(report(evaluate(model, load_split(dataset, args.split), progress=True), args.split))


def default_output(run: str, filename: str) -> Path:
    """Figures go into the run directory; for a shipped checkpoint, NAME_FILENAME in the current one."""
    run_dir = checkpoint.resolve(run)
    if run_dir.parent == checkpoint.PRETRAINED_DIR:
        return Path(f"{run_dir.name}_{filename}")
    return run_dir / filename


def cmd_sample(args) -> None:
    device = runtime.pick_device(args.device)
    model = checkpoint.load(args.run, device)
    labels = None if args.label is None else torch.full((args.n,), args.label, device=device)
    start = time.perf_counter()
    samples = model.sample(args.n, generator=torch.Generator(device).manual_seed(args.seed), labels=labels,
                           temperature=args.temperature, naive=args.naive, progress=True)
    elapsed = time.perf_counter() - start
    out = Path(args.out or default_output(args.run, "samples.png"))
    plots.save_samples(samples, model.num_levels, out)
    print(f"{args.n} samples in {elapsed:.2f} s -> {out}")


def cmd_complete(args) -> None:
    device = runtime.pick_device(args.device)
    model = checkpoint.load(args.run, device)
    test = load_split({"name": args.dataset} if args.dataset else run_dataset(args.run), args.split)
    out = Path(args.out or default_output(args.run, "completions.png"))
    complete(model, test, out, args.n, args.per_image, torch.Generator(device).manual_seed(args.seed), args.naive)
    print(f"completions of {args.n} {args.split} images, bottom half occluded -> {out}")


def cmd_list(args) -> None:
    print("models:     ", ", ".join(list_models()))
    print("datasets:   ", ", ".join(data.list_datasets()))
    print("pretrained: ", ", ".join(checkpoint.pretrained()) or "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelchain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model by maximum likelihood, then report the test NLL")
    p.add_argument("model", choices=list_models())
    p.add_argument("--dataset", default="digits", choices=data.list_datasets())
    p.add_argument("--num-levels", type=int, help="quantise the dataset to this many levels")
    p.add_argument("--binarize", choices=["threshold", "dynamic"])
    p.add_argument("--run-dir", help="default: runs/MODEL_DATASET")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a model hyperparameter")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=1.0, help="learning-rate factor per epoch")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--patience", type=int, help="stop after this many epochs without improvement")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help="seconds; the run stays resumable")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0)
    p.add_argument("--eval-every", type=int, help="also evaluate every this many steps inside an epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="NLL of a trained model on a split")
    p.add_argument("run", help="run directory or shipped checkpoint name")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset", help="default: the run's dataset")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="draw samples into a PNG grid")
    p.add_argument("run")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--label", type=int, help="class, for class-conditional models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive", action="store_true", help="reference decoder: a full forward pass per step")
    p.add_argument("--out")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("complete", help="complete test images whose bottom half is occluded")
    p.add_argument("run")
    p.add_argument("-n", type=int, default=8, help="number of images")
    p.add_argument("--per-image", type=int, default=4, help="completions per image")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive", action="store_true")
    p.add_argument("--out")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("list", help="registered models, datasets and shipped checkpoints")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runtime.configure_allocator()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        import torch.distributed as dist

        device = runtime.pick_device(getattr(args, "device", "auto"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        args.func(args)
    except (data.DataError, FileNotFoundError, FileExistsError, ValueError, TrainingDiverged) as error:
        print(f"pixelchain {args.command}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    if distributed:  # gloo can abort at interpreter teardown after the work is done: leave at once
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
