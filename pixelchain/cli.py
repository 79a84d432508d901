"""The command line: ``pixelchain train | eval | sample | complete | attack | detect | purify | list``.

    pixelchain train gated_pixelcnn --dataset binarized_mnist --run-dir runs/gated --epochs 20
    pixelchain train fvsbn --dataset binarized_mnist --resume --run-dir runs/fvsbn
    pixelchain eval runs/gated
    pixelchain sample runs/gated -n 64
    pixelchain complete runs/gated
    pixelchain attack fmnist_resnet fashion_mnist:test[:1000] --method bim --eps 8 --out adv/
    pixelchain attack fmnist_resnet fashion_mnist:test[:100] --method bpda --purifier fmnist_pixelcnn_pp --eps-def 32
    pixelchain detect fmnist_pixelcnn_pp adv/adversarial.npy --out detect/
    pixelchain purify fmnist_pixelcnn_pp adv/adversarial.npy --eps 16 --classifier fmnist_resnet --labels adv/labels.npy
Under ``torchrun --nproc_per_node=N pixelchain train ...`` training is data-parallel.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import adaptive, attacks, checkpoint, data, defend, plots, runtime
from .classifiers import Classifier, list_classifiers
from .models import list_models
from .models.base import DECODE_BATCH
from .run_dir import RunDir, result_record
from .train import TrainingDiverged, TrainOptions, evaluate, fit


def parse_hparams(pairs: list[str]) -> dict:
    """['channels=64', 'hidden=(500, 500)'] -> {'channels': 64, 'hidden': (500, 500)}."""
    hparams = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects NAME=VALUE, got {pair!r}")
        try:
            hparams[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            hparams[key] = value
    return hparams


def load_split(dataset: dict, split: str) -> data.ImageDataset:
    return data.load(dataset["name"], split, num_levels=dataset.get("num_levels"), binarize=dataset.get("binarize"))


def run_dataset(run: str) -> dict:
    config = checkpoint.read_config(run)
    if not isinstance(config.get("dataset"), dict) or "name" not in config["dataset"]:
        raise ValueError(f"{run}: its config names no dataset; pass --dataset")
    return config["dataset"]


def report(metrics: dict, split: str) -> str:
    line = f"{split} NLL: {metrics['nll']:.3f} nats"
    if "bits_per_dim" in metrics:
        line += f", {metrics['bits_per_dim']:.4f} bits/dim"
    if "accuracy" in metrics:
        line += f", accuracy {metrics['accuracy']:.4f}"
    return line + f" ({metrics['n']} images)"


def density_model(run: str, device: torch.device) -> torch.nn.Module:
    """The model of ``run``, which must be a density model (sample, complete)."""
    model = checkpoint.load(run, device)
    if model.kind != "density":
        raise ValueError(f"{run} is a {model.kind} ({model.name}): only density models sample and complete")
    return model


def output_path(run: str, out: str | None, filename: str) -> Path:
    """--out, or the run directory's figure; for a shipped checkpoint NAME_FILENAME in the current
    directory (never the installed package). Its folder must exist: checked before decoding."""
    if out is not None:
        path = Path(out)
    elif checkpoint.is_shipped(run):
        path = Path(f"{Path(run).name}_{filename}")
    else:
        path = checkpoint.resolve(run) / filename
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist: create it or choose another --out")
    return path


# ----------------------------------------------------------------------------- commands
def train_options(args: argparse.Namespace, recorded: dict) -> TrainOptions:
    """The options given as flags; those not given are the run's recorded ones when resuming, else
    TrainOptions' defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions) if hasattr(args, f.name)}
    return TrainOptions(**{**recorded, **given})


def cmd_train(args) -> None:
    run_dir = Path(args.run_dir or f"runs/{args.model}_{args.dataset}")
    hparams = parse_hparams(args.set)
    recorded = {}
    if args.resume:  # rebuild exactly what the run was started with
        config = checkpoint.read_config(run_dir)
        kept = {k: v for k, v in config["args"].items() if k not in ("image_shape", "num_levels")}
        changed = {k: v for k, v in hparams.items() if kept.get(k) != (list(v) if isinstance(v, tuple) else v)}
        if changed:
            raise ValueError(f"--set {', '.join(f'{k}={v!r}' for k, v in changed.items())}: a resumed run keeps "
                             f"its model ({config['model']}, {kept}); start a new run to change it")
        hparams, args.model = kept, config["model"]
        recorded = TrainOptions.recorded(config.get("train", {}))
        dataset = config.get("dataset") or {"name": args.dataset}
    else:
        dataset = {"name": args.dataset, "num_levels": args.num_levels, "binarize": args.binarize}
    options = train_options(args, recorded)
    options.validate()
    device = runtime.pick_device(args.device)
    train, valid = load_split(dataset, "train"), load_split(dataset, "valid")
    torch.manual_seed(options.seed)
    if args.model in list_classifiers():
        hparams.setdefault("num_classes", int(train.labels.max()) + 1)
    try:
        model = checkpoint.build(args.model, train.image_shape, train.num_levels, **hparams).to(device)
    except (ValueError, TypeError) as error:
        hint = "; --binarize or --num-levels change the levels" if "levels" in str(error) else ""
        raise ValueError(f"{args.model} on {dataset['name']} ({train.num_levels} levels): {error}{hint}") from None
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {params:,} parameters on {device}; {train!r}; run directory {run_dir}")
    run = RunDir(run_dir)
    with run.lock() if rank == 0 else contextlib.nullcontext():
        summary = fit(model, train, valid, run_dir=run_dir, resume=args.resume, info={"dataset": dataset},
                      options=options)
        test_metrics = evaluate(model, load_split(dataset, "test"))  # sharded: every process takes part
        if rank != 0:
            return
        print(f"trained {summary['step']} steps in {summary['elapsed']:.0f} s ({summary['images_per_s']:.0f} "
              "images/s)" + ("" if summary["finished"] else "; not finished: run again with --resume to continue"))
        print(report(test_metrics, "test"))
        run.write_result(result_record(model, summary, test_metrics, dataset=dataset))
        if model.kind == "density" and not args.no_figures:
            plots.write_figures(model, load_split(dataset, "test"), run_dir,
                                torch.Generator(device).manual_seed(options.seed))
            print(f"wrote {run.samples} and {run.completions}")


def cmd_eval(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    dataset = {"name": args.dataset} if args.dataset else run_dataset(args.run)
    print(report(evaluate(model, load_split(dataset, args.split), progress=True), args.split))


def cmd_sample(args) -> None:
    device = runtime.pick_device(args.device)
    model = density_model(args.run, device)
    out = output_path(args.run, args.out, "samples.png")
    labels = None if args.label is None else torch.full((args.n,), args.label, device=device)
    start = time.perf_counter()
    samples = model.sample(args.n, generator=torch.Generator(device).manual_seed(args.seed), labels=labels,
                           temperature=args.temperature, naive=args.naive, progress=True, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    plots.save_samples(samples, model.num_levels, out)
    print(f"{args.n} samples in {elapsed:.2f} s -> {out}")


def cmd_complete(args) -> None:
    device = runtime.pick_device(args.device)
    model = density_model(args.run, device)
    out = output_path(args.run, args.out, "completions.png")
    test = load_split({"name": args.dataset} if args.dataset else run_dataset(args.run), args.split)
    plots.draw_completions(model, test, out, args.n, args.per_image, torch.Generator(device).manual_seed(args.seed),
                           args.naive, args.batch_size)
    print(f"completions of {args.n} {args.split} images, bottom half occluded -> {out}")


def read_images(spec: str, channels: int) -> torch.Tensor:
    """Images int64 [N, C, H, W] from ``spec``: a dataset split ``NAME:SPLIT`` or ``NAME:SPLIT[A:B]``
    (e.g. ``fashion_mnist:test[:1000]``), a ``.npy`` file of integers [N, C, H, W] or [N, H, W], or a
    folder of PNGs (sorted by name; read as greyscale when ``channels`` is 1, else RGB)."""
    path = Path(spec)
    if spec.endswith(".npy"):
        array = read_integers(path, "images")
        if array.ndim == 3:
            array = array[:, None]
        return torch.from_numpy(array.astype(np.int64))
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise ValueError(f"{spec}: no .png files in the folder")
        mode = "L" if channels == 1 else "RGB"
        arrays = [np.asarray(Image.open(f).convert(mode)) for f in files]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{spec}: the PNGs differ in size")
        array = np.stack(arrays)
        return torch.from_numpy(array[:, None] if channels == 1 else array.transpose(0, 3, 1, 2)).long()
    split, rows = dataset_split(spec)
    return split.images[rows]


def read_labels(spec: str, labels: str | None, count: int) -> torch.Tensor:
    """int64 [count] labels of the images ``spec``: from ``labels`` (a .npy of integers [N]) when
    given, else the labels of a dataset split ``NAME:SPLIT[A:B]``."""
    if labels is not None:
        y = torch.from_numpy(read_integers(Path(labels), "labels").astype(np.int64))
        where = labels
    elif spec.endswith(".npy") or Path(spec).is_dir():
        raise ValueError(f"{spec} carries no labels: pass --labels FILE.npy (integers [N])")
    else:
        split, rows = dataset_split(spec)
        if split.labels is None:
            raise ValueError(f"{spec}: this dataset has no labels")
        y, where = split.labels[rows], spec
    if y.shape != (count,):
        raise ValueError(f"{where}: expected labels of shape [{count}] (one per image), got {list(y.shape)}")
    return y


def read_integers(path: Path, what: str) -> np.ndarray:
    """A .npy array of integers (``what`` names it in errors); never unpickles."""
    array = np.load(path, allow_pickle=False)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: {what} must be integers, got dtype {array.dtype}")
    return array


def dataset_split(spec: str) -> tuple[data.ImageDataset, slice]:
    """``NAME:SPLIT[A:B]`` -> the split and the slice of its rows."""
    match = re.fullmatch(r"(\w+):([\w+]+)(?:\[(-?\d*):(-?\d*)\])?", spec)
    if not match:
        raise ValueError(f"{spec!r} is not a .npy file, a folder of PNGs, or NAME:SPLIT[A:B]")
    name, split, a, b = match.groups()
    return data.load(name, split), slice(int(a) if a else None, int(b) if b else None)


def reference_spec(args) -> str:
    if args.reference:
        return args.reference
    config = checkpoint.read_config(args.run)
    if "dataset" not in config:
        raise SystemExit(f"{args.run}: its config names no dataset; pass --reference")
    return f"{config['dataset']['name']}:valid"


def cmd_detect(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    x = read_images(args.images, model.image_shape[0])
    reference = read_images(reference_spec(args), model.image_shape[0])
    bpd = defend.bits_per_dim(model, x, args.batch_size)
    reference_bpd = defend.bits_per_dim(model, reference, args.batch_size)
    p = defend.p_values(bpd, reference_bpd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = enumerate(zip(bpd.tolist(), p.tolist(), strict=True))
    lines = ["index,bits_per_dim,p_value"] + [f"{i},{b:.6f},{q:.6f}" for i, (b, q) in rows]
    (out / "p_values.csv").write_text("\n".join(lines) + "\n")
    plots.save_histogram({args.images: bpd, f"reference {reference_spec(args)}": reference_bpd},
                         out / "bits_per_dim.png")
    for line in lines[1 : 1 + args.show]:
        print(line)
    print(f"{len(x)} images: mean {bpd.mean():.4f} bits/dim (reference: {len(reference)} images, mean "
          f"{reference_bpd.mean():.4f}); p <= {args.alpha}: {(p <= args.alpha).double().mean():.2%} of them "
          f"-> {out / 'p_values.csv'}, {out / 'bits_per_dim.png'}")


def load_classifier(name: str, device: torch.device) -> Classifier:
    model = checkpoint.load(name, device)
    if not isinstance(model, Classifier):
        raise ValueError(f"{name} is a density model ({type(model).__name__}); a classifier is needed here, "
                         "e.g. fmnist_resnet")
    return model


def save_levels(path: Path, x: torch.Tensor, num_levels: int) -> None:
    """Save int64 levels as .npy: uint8 when they fit."""
    np.save(path, x.cpu().numpy().astype(np.uint8 if num_levels <= 256 else np.int64))


def cmd_attack(args) -> None:
    classifier = load_classifier(args.classifier, runtime.pick_device(args.device))
    x = read_images(args.images, classifier.image_shape[0])
    y = read_labels(args.images, args.labels, len(x))
    if args.method in adaptive.METHODS:
        return adaptive_attack(args, classifier, x, y)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x_adv = attacks.attack(classifier, x, y, args.method, args.eps, batch_size=args.batch_size,
                           generator=torch.Generator().manual_seed(args.seed))
    elapsed = time.perf_counter() - start
    save_levels(out / "adversarial.npy", x_adv, classifier.num_levels)
    np.save(out / "labels.npy", y.numpy())
    plots.save_before_after(x[: args.grid], x_adv[: args.grid], classifier.num_levels, out / "before_after.png")
    print(f"{args.method} (eps {args.eps}) on {len(x)} images in {elapsed:.1f} s: accuracy "
          f"{defend.accuracy(classifier, x, y):.2%} -> {defend.accuracy(classifier, x_adv, y):.2%} "
          f"-> {out / 'adversarial.npy'}, {out / 'labels.npy'}, {out / 'before_after.png'}")


def adaptive_attack(args, classifier: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
    """--method bpda / apgd-ce / apgd-dlr: the attack on classifier(purify(x)) (pixelchain.adaptive)."""
    if not args.purifier:
        raise ValueError(f"--method {args.method} attacks through PixelDefend: pass --purifier (a density model)")
    if args.steps < 1 or args.restarts < 1 or args.step_size < 1:
        raise ValueError("--steps, --restarts and --step-size must be >= 1")
    model = density_model(args.purifier, runtime.pick_device(args.device))
    defend.check_pair(classifier, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defended = adaptive.Defended(lambda v: defend.purify(model, v, args.eps_def, batch_size=args.batch_size,
                                                         progress=False), classifier)
    start = time.perf_counter()
    if args.method == "bpda":
        result = adaptive.pgd(classifier, defended, x, y, args.eps, steps=args.steps, step_size=args.step_size,
                              restarts=args.restarts, random_start=not args.no_random_start, route=args.route,
                              model=model, eps_def=args.eps_def, temperature=args.temperature,
                              batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    else:
        result = adaptive.apgd(classifier, defended, x, y, args.eps, loss=args.method.split("-")[1], steps=args.steps,
                               restarts=args.restarts, route=args.route, model=model, eps_def=args.eps_def,
                               temperature=args.temperature, seed=args.seed)
    elapsed = time.perf_counter() - start
    save_levels(out / "adversarial.npy", result.x_adv, classifier.num_levels)
    np.save(out / "labels.npy", y.numpy())
    np.save(out / "robust.npy", result.robust.numpy())
    (out / "curve.csv").write_text("step,robust_accuracy\n" + "".join(f"{s},{a:.6f}\n" for s, a in result.curve))
    plots.save_before_after(x[: args.grid], result.x_adv[: args.grid], classifier.num_levels,
                            out / "before_after.png")
    print(f"{args.method} ({args.route} gradient; eps {args.eps}, eps_def {args.eps_def}, {args.steps} steps of "
          f"{args.step_size}, {args.restarts} restarts) on {len(x)} images in {elapsed:.1f} s: accuracy after "
          f"purification {result.curve[0][1]:.2%} clean, {result.accuracy:.2%} robust (worst case over iterates and "
          f"restarts; {result.purified} images purified) -> {out / 'adversarial.npy'}, {out / 'robust.npy'}, "
          f"{out / 'curve.csv'}")


def cmd_purify(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    x = read_images(args.images, model.image_shape[0])
    if args.classifier:  # its errors (a density model, labels missing or mismatched) before decoding
        classifier = load_classifier(args.classifier, runtime.pick_device(args.device))
        y = read_labels(args.images, args.labels, len(x))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before decoding, not after
    start = time.perf_counter()
    if args.adaptive is None:
        purified = defend.purify(model, x, args.eps, batch_size=args.batch_size, naive=args.naive)
    else:  # half the reference ranks, the other half sets the threshold at the false-alarm rate
        reference = read_images(reference_spec(args), model.image_shape[0])
        reference_bpd = defend.bits_per_dim(model, reference[::2], args.batch_size)
        clean_p = defend.p_values(defend.bits_per_dim(model, reference[1::2], args.batch_size), reference_bpd)
        threshold = defend.choose_threshold(clean_p, args.adaptive)
        purified, touched = defend.adaptive_purify(model, x, args.eps, reference_bpd, threshold,
                                                   batch_size=args.batch_size, naive=args.naive)
        print(f"adaptive: p <= {threshold:.4f} purified ({touched.double().mean():.0%} of the images)")
    elapsed = time.perf_counter() - start
    save_levels(out / "purified.npy", purified, model.num_levels)
    plots.save_before_after(x[: args.grid], purified[: args.grid], model.num_levels, out / "before_after.png")
    changed = (purified != x).flatten(1).any(1).double().mean()
    print(f"purified {len(x)} images (eps {args.eps}) in {elapsed:.1f} s ({len(x) / elapsed:.2f} images/s); "
          f"{changed:.0%} changed -> {out / 'purified.npy'}, {out / 'before_after.png'}")
    if args.classifier:
        print(f"{args.classifier}: accuracy {defend.accuracy(classifier, x, y):.2%} before purification, "
              f"{defend.accuracy(classifier, purified, y):.2%} after")


def cmd_list(args) -> None:
    print("models:     ", ", ".join(list_models()))
    print("classifiers:", ", ".join(list_classifiers()))
    print("datasets:   ", ", ".join(data.list_datasets()))
    print("pretrained: ", ", ".join(checkpoint.pretrained()) or "none")


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


_FLAG_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field (``max_time`` -> ``--max-time``). Flags not given stay out
    of the namespace, so a resumed run keeps its recorded options."""
    for f in dataclasses.fields(TrainOptions):
        flag, shown = "--" + f.name.replace("_", "-"), f.metadata["help"]
        shown += "" if f.default is None else f" (default: {f.default})"
        if f.type == "bool":  # --amp / --no-amp: a resumed run's recorded choice can be turned either way
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=_FLAG_TYPES[f.type], default=argparse.SUPPRESS, help=shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelchain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model by maximum likelihood, then report the test NLL")
    p.add_argument("model", choices=list_models() + list_classifiers())
    p.add_argument("--dataset", default="digits", choices=data.list_datasets())
    p.add_argument("--num-levels", type=int, help="quantise the dataset to this many levels")
    p.add_argument("--binarize", choices=["threshold", "dynamic"])
    p.add_argument("--run-dir", help="default: runs/MODEL_DATASET")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a model hyperparameter")
    add_option_flags(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (options not given are the run's)")
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
    p.add_argument("-n", type=positive, default=64)
    p.add_argument("--batch-size", type=positive, default=DECODE_BATCH, help="images decoded at once")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--label", type=int, help="class, for class-conditional models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive", action="store_true", help="reference decoder: a full forward pass per step")
    p.add_argument("--out")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("complete", help="complete test images whose bottom half is occluded")
    p.add_argument("run")
    p.add_argument("-n", type=positive, default=8, help="number of images")
    p.add_argument("--per-image", type=positive, default=4, help="completions per image")
    p.add_argument("--batch-size", type=positive, default=DECODE_BATCH, help="images decoded at once")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive", action="store_true")
    p.add_argument("--out")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_complete)

    images_help = ("NAME:SPLIT[A:B] (e.g. fashion_mnist:test[:1000]), a .npy of integers [N,C,H,W] or [N,H,W], "
                   "or a PNG folder")
    p = sub.add_parser("attack", help="adversarial examples for a classifier (ART; pip install -e '.[defend]')")
    p.add_argument("classifier", help="classifier: run directory or shipped checkpoint name (e.g. fmnist_resnet)")
    p.add_argument("images", help=images_help)
    p.add_argument("--labels", help="true labels, a .npy of integers [N] (default: the dataset split's)")
    p.add_argument("--method", choices=attacks.ATTACKS + adaptive.METHODS, default="fgsm",
                   help="bpda, apgd-ce, apgd-dlr: adaptive attacks through PixelDefend (need --purifier)")
    p.add_argument("--eps", type=int, default=8, help="L-inf radius in levels (0-255 units for 256 levels)")
    p.add_argument("--out", default="adversarial", help="folder for adversarial.npy, labels.npy, before_after.png "
                   "(adaptive methods: also robust.npy, curve.csv)")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--grid", type=int, default=16, help="images in the before/after figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the random noise and random starts")
    p.add_argument("--purifier", help="adaptive methods: PixelDefend's density model (e.g. fmnist_pixelcnn_pp)")
    p.add_argument("--eps-def", type=int, default=32, help="adaptive methods: PixelDefend's eps, levels")
    p.add_argument("--steps", type=int, default=100, help="adaptive methods: steps (iterations) per restart")
    p.add_argument("--restarts", type=int, default=1, help="adaptive methods: random starts")
    p.add_argument("--step-size", type=int, default=1, help="bpda: step in levels")
    p.add_argument("--no-random-start", action="store_true", help="bpda: start from the image itself")
    p.add_argument("--route", choices=adaptive.ROUTES, default="identity",
                   help="gradient through the purifier: identity (BPDA) or the smooth surrogate")
    p.add_argument("--temperature", type=float, default=adaptive.TEMPERATURE,
                   help="the surrogate's softmax temperature")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("detect", help="PixelDefend detection: bits/dim and p-values of images under a density model")
    p.add_argument("run", help="density model: run directory or shipped checkpoint name")
    p.add_argument("images", help=images_help)
    p.add_argument("--reference", help="held-out clean images the p-values rank against (default: the model's "
                   "dataset, valid split)")
    p.add_argument("--out", default="detect", help="folder for p_values.csv and bits_per_dim.png")
    p.add_argument("--alpha", type=float, default=0.05, help="report the share of images with p <= alpha")
    p.add_argument("--show", type=int, default=10, help="print the first this many p-values")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("purify", help="PixelDefend purification: each pixel the most likely value within eps")
    p.add_argument("run", help="density model: run directory or shipped checkpoint name")
    p.add_argument("images", help=images_help)
    p.add_argument("--eps", type=int, default=16, help="window radius in levels (0-255 units for 256 levels)")
    p.add_argument("--out", default="purified", help="folder for purified.npy and before_after.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=16, help="images in the before/after figure")
    p.add_argument("--adaptive", type=float, metavar="FALSE_ALARM",
                   help="adaptive PixelDefend: purify only images with p <= a threshold that purifies this share "
                   "of clean --reference images (e.g. 0.05); the others stay unchanged")
    p.add_argument("--reference", help="clean images for --adaptive (default: the model's dataset, valid split)")
    p.add_argument("--naive", action="store_true", help="reference decoder: a full forward pass per step")
    p.add_argument("--classifier", help="also report this classifier's accuracy before and after purification")
    p.add_argument("--labels", help="true labels for --classifier, a .npy of integers [N] (default: the dataset "
                   "split's)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_purify)

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
    except (data.DataError, OSError, ValueError, ImportError, TrainingDiverged) as error:
        print(f"pixelchain {args.command}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM while training: the usual 128 + signal
        sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))
    if distributed:  # gloo can abort at interpreter teardown after the work is done: leave at once
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
