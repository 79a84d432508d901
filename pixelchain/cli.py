"""The command line: ``pixelchain train | eval | sample | complete | attack | detect | purify | compress |
decompress | list``.

    pixelchain train gated_pixelcnn --dataset binarized_mnist --run-dir runs/gated --epochs 20
    pixelchain train fvsbn --dataset binarized_mnist --resume --run-dir runs/fvsbn
    pixelchain eval runs/gated
    pixelchain sample runs/gated -n 64
    pixelchain complete runs/gated
    pixelchain attack fmnist_resnet fashion_mnist:test[:1000] --method bim --eps 8 --out adv/
    pixelchain attack fmnist_resnet fashion_mnist:test[:100] --method bpda --purifier fmnist_pixelcnn_pp --eps-def 32
    pixelchain detect fmnist_pixelcnn_pp adv/adversarial.npy --score bpd --out detect/
    pixelchain purify fmnist_pixelcnn_pp adv/adversarial.npy --eps 16 --classifier fmnist_resnet --labels adv/labels.npy
    pixelchain compress fmnist_pixelcnn_pp fashion_mnist:test[:1000] --out test.pxc
    pixelchain decompress test.pxc --out restored/ --png
Under ``torchrun --nproc_per_node=N pixelchain train ...`` training is data-parallel.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import adaptive, attacks, checkpoint, codec, data, defend, masks, ood, plots, runtime, score
from .classifiers import Classifier, list_classifiers
from .io import (  # noqa: F401 - importable from here too
    count_images,
    dataset_record,
    dataset_split,
    load_split,
    read_images,
    read_integers,
    read_labels,
    read_model_images,
)
from .models import describe, list_models
from .models.base import DECODE_BATCH, check_images
from .run_dir import STATE, RunDir, result_record
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
        except (RecursionError, MemoryError):
            raise ValueError(f"--set {key}: the value is nested too deeply to read") from None
    return hparams


def model_dataset(spec: str | None, run: str, model: torch.nn.Module) -> dict:
    """--dataset of eval / complete (default: the run's), your own images read at the model's
    levels and channels."""
    if not spec:
        return run_dataset(run)
    if spec in data.list_datasets():
        return {"name": spec}
    return {**dataset_record(spec, grey=model.image_shape[0] == 1), "num_levels": model.num_levels}


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


def refuse_overwrite(force: bool, *paths: Path | str | None) -> None:
    """ValueError naming the first of ``paths`` that exists, unless --force: a command never replaces
    what a user saved without being asked. Called before the command's work, not after."""
    for path in paths:
        if path is not None and Path(path).exists() and not force:
            raise ValueError(f"{path} exists: choose another --out or pass --force to overwrite it")


def output_path(run: str, out: str | None, filename: str, force: bool = False) -> Path:
    """--out (a PNG, or .npy / .npz for arrays; an existing one only with ``force``), else
    NAME_FILENAME in the current directory (never the run's own figures nor the installed package),
    numbered rather than overwriting a file. Its folder and format are checked before decoding."""
    if out is not None:
        path = Path(out)
        refuse_overwrite(force, path)
    else:
        stem, suffix = f"{checkpoint.resolve(run).name}_{Path(filename).stem}", Path(filename).suffix
        path, i = Path(stem + suffix), 0
        while path.exists():
            i += 1
            path = Path(f"{stem}-{i}{suffix}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist: create it or choose another --out")
    if not score.is_array_path(path) and path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {path}: write .npy or .npz (arrays of levels) or an image (.png)")
    return path


def class_labels(model: torch.nn.Module, args, n: int, images: str | None = None) -> torch.Tensor | None:
    """Labels [n] for a class-conditional model from --label (or IMAGES' --labels / split), None
    for another; ValueError in terms of the flags."""
    given = args.label is not None or getattr(args, "labels", None) is not None
    if model.num_classes is None:
        if given:
            raise ValueError(f"--label: {args.run} is not class-conditional (train one with --set num_classes=N)")
        return None
    if args.label is not None:
        if not 0 <= args.label < model.num_classes:
            raise ValueError(f"--label must lie in [0, {model.num_classes}), got {args.label}")
        return torch.full((n,), args.label)
    if images is None:
        raise ValueError(f"{args.run} is class-conditional: pass --label in [0, {model.num_classes})")
    return read_labels(images, args.labels, n)


def model_images(model: torch.nn.Module, args, spec: str | None = None) -> torch.Tensor:
    """IMAGES (``spec``, default ``args.images``) in the model's levels by io.read_model_images's
    rule (--num-levels / --binarize as ``train`` maps a dataset; else deeper images quantised),
    their shape and levels checked before any work."""
    spec = args.images if spec is None else spec
    x = read_model_images(spec, model.image_shape[0], model.num_levels, args.num_levels, args.binarize)
    check_images(x[:1], model.image_shape, model.num_levels)
    return x


def save_output(path: Path, images: torch.Tensor, num_levels: int, labels: torch.Tensor | None = None) -> None:
    """Arrays (.npy: levels; .npz: images and labels) or a PNG grid."""
    if score.is_array_path(path):
        score.save_array(path, images, num_levels, labels)
    else:
        plots.save_samples(images, num_levels, path)


# ----------------------------------------------------------------------------- commands
def train_options(args: argparse.Namespace, recorded: dict) -> TrainOptions:
    """The options given as flags; those not given are the run's recorded ones when resuming, else
    TrainOptions' defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions) if hasattr(args, f.name)}
    return TrainOptions(**{**recorded, **given})


def refuse_changes(config: dict, args: argparse.Namespace) -> None:
    """A resumed run keeps its model and data: refuse a --dataset, --num-levels, --binarize or model
    that differs from the run's, naming the difference (as --set is refused)."""
    recorded = config.get("dataset") or {}
    given = {"model": args.model, "dataset": args.dataset, "num_levels": args.num_levels, "binarize": args.binarize,
             "grey": args.grey}
    runs = {"model": config["model"], "dataset": recorded.get("name"), "num_levels": recorded.get("num_levels"),
            "binarize": recorded.get("binarize"), "grey": recorded.get("grey")}
    if recorded.get("path") is not None and args.dataset is not None:  # the user's images: compare their paths
        given["dataset"] = str(Path(args.dataset).resolve())
        runs["dataset"] = recorded["path"]
    if runs["dataset"] is None:  # an old config that records no dataset: nothing to compare with
        del given["dataset"]
    changed = [k for k, v in given.items() if v is not None and v != runs[k]]
    if changed:
        said = ", ".join(f"{k} {given[k]!r} (the run's: {runs[k]!r})" for k in changed)
        raise ValueError(f"{said}: a resumed run keeps its model and data; start a new run to change them")


def cmd_train(args) -> None:
    run_dir = Path(args.run_dir or f"runs/{args.model}_{Path(args.dataset or 'digits').stem}")
    hparams = parse_hparams(args.set)
    recorded = {}
    if not args.resume:
        RunDir(run_dir).refuse_existing(args.overwrite)  # before loading data, not after
    if args.resume:  # rebuild exactly what the run was started with
        if not (run_dir / STATE).is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir / STATE} does not exist")
        config = checkpoint.read_config(run_dir)
        refuse_changes(config, args)
        kept = {k: v for k, v in config["args"].items() if k not in ("image_shape", "num_levels")}
        changed = {k: v for k, v in hparams.items() if kept.get(k) != (list(v) if isinstance(v, tuple) else v)}
        if changed:
            raise ValueError(f"--set {', '.join(f'{k}={v!r}' for k, v in changed.items())}: a resumed run keeps "
                             f"its model ({config['model']}, {kept}); start a new run to change it")
        hparams, args.model = kept, config["model"]
        recorded = TrainOptions.recorded(config.get("train", {}))
        dataset = config.get("dataset") or {"name": args.dataset or "digits"}
    else:
        dataset = dataset_record(args.dataset or "digits", args.num_levels, args.binarize, args.grey, args.resize)
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
        summary = fit(model, train, valid, run_dir=run_dir, resume=args.resume, overwrite=args.overwrite,
                      info={"dataset": dataset}, options=options)
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
            print(f"wrote {run.samples}" + (f" and {run.completions}" if model.has_conditionals else ""))


def cmd_eval(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    if args.images is not None:
        return eval_images(model, args)
    if args.num_levels is not None or args.binarize is not None:
        if args.dataset not in data.list_datasets():
            raise ValueError("--num-levels and --binarize map IMAGES or a built-in --dataset; the run's own dataset "
                             "is mapped as it was trained")
        dataset = {"name": args.dataset, "num_levels": args.num_levels, "binarize": args.binarize}
    else:
        dataset = model_dataset(args.dataset, args.run, model)
    if args.label is not None or args.labels is not None:
        raise ValueError("--label/--labels go with IMAGES; a dataset split brings its own labels")
    print(report(evaluate(model, load_split(dataset, args.split), progress=True), args.split))


def eval_images(model: torch.nn.Module, args) -> None:
    """``eval MODEL IMAGES``: per-image NLL and bits/dim (``--out`` CSV), and the mean."""
    if model.kind != "density":
        raise ValueError(f"{args.run} is a {model.kind}: eval IMAGES scores images under a density model")
    x = model_images(model, args)
    labels = class_labels(model, args, len(x), args.images)
    out = None if args.out is None else Path(args.out)
    if out is not None and not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist: create it or choose another --out")
    refuse_overwrite(args.force, out, args.heatmap)
    log_probs = score.log_prob(model, x, labels, args.batch_size, progress=True)
    bpd = -log_probs / (model.num_dims * math.log(2))
    for i in range(min(args.show, len(x))):
        print(f"{i},{-log_probs[i]:.4f} nats,{bpd[i]:.4f} bits/dim")
    if out is not None:
        score.write_csv(out, log_probs, model.num_dims)
    if args.heatmap is not None:
        maps = score.log_prob_map(model, x[: args.grid], None if labels is None else labels[: args.grid])
        plots.heatmap(x[: args.grid], maps, model.num_levels, args.heatmap)
    written = [str(p) for p in (out, args.heatmap) if p is not None]
    print(f"{args.images}: mean NLL {-log_probs.mean():.3f} nats, {bpd.mean():.4f} bits/dim ({len(x)} images)"
          + (f" -> {', '.join(written)}" if written else ""))


def cmd_sample(args) -> None:
    device = runtime.pick_device(args.device)
    model = density_model(args.run, device)
    out = output_path(args.run, args.out, "samples.png", args.force)
    if not score.is_array_path(out):
        plots.check_grid(args.n, model.image_shape)
    labels = class_labels(model, args, args.n)
    start = time.perf_counter()
    # a CPU generator: image i depends on --seed and i only, not on --batch-size or the device
    samples = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed),
                           labels=None if labels is None else labels.to(device), temperature=args.temperature,
                           naive=args.naive, progress=True, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    save_output(out, samples, model.num_levels, labels)
    print(f"{args.n} samples in {elapsed:.2f} s -> {out}")


def cmd_complete(args) -> None:
    device = runtime.pick_device(args.device)
    model = density_model(args.run, device)
    out = output_path(args.run, args.out, "completions.png", args.force)
    if args.images is None:  # -n images spread over the split (some are sorted by class)
        if args.num_levels is not None or args.binarize is not None:
            raise ValueError("--num-levels and --binarize map IMAGES; the run's dataset is mapped as it was trained")
        test = load_split(model_dataset(args.dataset, args.run, model), args.split)
        if (args.n or 8) > len(test):
            raise ValueError(f"-n {args.n}: the {args.split} split holds {len(test)} images")
        index = torch.linspace(0, len(test) - 1, args.n or 8).long()
        x = test.images[index]
        labels = class_labels(model, args, len(x)) if args.label is not None or model.num_classes is None else (
            test.labels[index])
    else:
        x = model_images(model, args)[: args.n]
        labels = class_labels(model, args, len(x), args.images)
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU, as in sample
    observed = ~masks.missing(args.mask, tuple(x.shape), generator)
    S = args.per_image
    # the completions are held at once (the decoders' memory stays bounded by --batch-size)
    runtime.check_fits(3 * len(x) * S * model.num_dims * 8, f"{S} completions of {len(x)} images", device)
    if not score.is_array_path(out):
        plots.check_grid(min(len(x), args.grid) * (S + 2), model.image_shape, ncols=S + 2)
    done = model.complete(x.repeat_interleave(S, 0).to(device), observed.repeat_interleave(S, 0), generator,
                          args.temperature, None if labels is None else labels.repeat_interleave(S).to(device),
                          args.naive, progress=True, batch_size=args.batch_size)
    if score.is_array_path(out):  # image i's completions are rows i*S .. i*S + S - 1
        score.save_array(out, done, model.num_levels, None if labels is None else labels.repeat_interleave(S),
                         observed.repeat_interleave(S, 0))
    else:
        k = min(len(x), args.grid)
        plots.save_completions(x[:k], observed[:k], done[: k * S].view(k, S, *x.shape[1:]).cpu(),
                               model.num_levels, out)
    print(f"{S} completion(s) of each of {len(x)} images, --mask {args.mask} missing -> {out}")


def reference_images(args, model: torch.nn.Module) -> tuple[torch.Tensor, str]:
    """The clean images p-values rank against, and how to name them: --reference, else the valid
    split of the run's dataset as it trained on it (levels, binarisation, its own images), its first
    DETECT_REFERENCE images."""
    if args.reference:
        return model_images(model, args, args.reference), args.reference
    dataset = run_dataset(args.run)
    return load_split(dataset, "valid").images[:DETECT_REFERENCE], f"{dataset['name']}:valid[:{DETECT_REFERENCE}]"


DETECT_REFERENCE = 2000  # default reference of detect: the first this many valid images (p-values in 1/2001 steps)


def cmd_detect(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    background_name = args.background or ood.BACKGROUNDS.get(args.run)
    background = None
    if background_name and (args.score == "ratio" or args.score == "combined" and "ratio" in ood.COMBINED):
        background = checkpoint.load(background_name, runtime.pick_device(args.device))
    # the images are checked before the reference's work
    x = model_images(model, args)
    out = Path(args.out)
    refuse_overwrite(args.force, out / "p_values.csv", out / "bits_per_dim.png")
    reference, reference_name = reference_images(args, model)
    detector = ood.Detector(model, reference, args.score, background=background, codec=args.codec,
                            batch_size=args.batch_size, progress=True)
    features = detector.features(x)
    score = detector.score(features)
    p = detector.p_values(features, score)
    bpd = features.bpd
    out.mkdir(parents=True, exist_ok=True)
    rows = enumerate(zip(bpd.tolist(), score.tolist(), p.tolist(), strict=True))
    lines = ["index,bits_per_dim,score,p_value"] + [f"{i},{b:.6f},{s:.6f},{q:.6f}" for i, (b, s, q) in rows]
    (out / "p_values.csv").write_text("\n".join(lines) + "\n")
    plots.save_histogram({args.images: bpd, f"reference {reference_name}": detector.reference_bpd},
                         out / "bits_per_dim.png")
    for line in lines[1 : 1 + args.show]:
        print(line)
    joins = f" of {', '.join(detector.components)}" if args.score == "combined" else ""
    print(f"{len(x)} images: mean {bpd.mean():.4f} bits/dim (reference: {len(reference)} images, mean "
          f"{detector.reference_bpd.mean():.4f}); batch typicality test p = "
          f"{ood.batch_typicality(bpd, detector.reference_bpd, generator=torch.Generator().manual_seed(0)):.4f}; "
          f"score {args.score}{joins}: p <= {args.alpha} for {(p <= args.alpha).double().mean():.2%} of them "
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
    x = model_images(classifier, args)
    y = read_labels(args.images, args.labels, len(x))
    out = Path(args.out)
    written = ["adversarial.npy", "labels.npy", "before_after.png"]
    refuse_overwrite(args.force, *(out / name for name in written + (
        ["robust.npy", "curve.csv"] if args.method in adaptive.METHODS else [])))
    if args.method in adaptive.METHODS:
        return adaptive_attack(args, classifier, x, y)
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
    # the clean images' own accuracy once purified, not the curve's step 0 (in the attack's bookkeeping
    # an image may also count against another original within eps of it); the attack reuses the cache
    clean = defend.accuracy(classifier, defended(x), y)
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
          f"purification {clean:.2%} clean, {result.accuracy:.2%} robust (worst case over iterates and "
          f"restarts; {defended.images} images purified) -> {out / 'adversarial.npy'}, {out / 'robust.npy'}, "
          f"{out / 'curve.csv'}")


def cmd_purify(args) -> None:
    model = checkpoint.load(args.run, runtime.pick_device(args.device))
    x = model_images(model, args)
    if args.classifier:  # its errors (a density model, labels missing or mismatched) before decoding
        classifier = load_classifier(args.classifier, runtime.pick_device(args.device))
        y = read_labels(args.images, args.labels, len(x))
    out = Path(args.out)
    refuse_overwrite(args.force, out / "purified.npy", out / "before_after.png")
    out.mkdir(parents=True, exist_ok=True)  # before decoding, not after
    start = time.perf_counter()
    if args.adaptive is None:
        purified = defend.purify(model, x, args.eps, batch_size=args.batch_size, naive=args.naive)
    else:  # half the reference ranks, the other half sets the threshold at the false-alarm rate
        reference = reference_images(args, model)[0]
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


def cmd_compress(args) -> None:
    model, _ = codec.resolve_model(args.run)  # its errors (a classifier, a missing run) before reading images
    x = read_images(args.images, model.image_shape[0])
    out = Path(args.out)
    refuse_overwrite(args.force, out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} does not exist: create it or choose another --out")
    start = time.perf_counter()
    blob = codec.compress(args.run, x, batch_size=args.batch_size, progress=True)
    elapsed = time.perf_counter() - start
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(blob)
    partial.replace(out)
    payload, rest = codec.payload_bits(blob)
    print(f"{len(x)} images in {elapsed:.1f} s ({len(x) / elapsed:.1f} images/s): {len(blob):,} bytes, "
          f"{payload / x.numel():.4f} bits/dim coded + {rest // 8} bytes of header -> {out}")


def cmd_decompress(args) -> None:
    out = Path(args.out)
    npy = out / "images.npy"
    refuse_overwrite(args.force, npy, *([out / "00000.png"] if args.png else []))
    blob = Path(args.file).read_bytes()
    start = time.perf_counter()
    images = codec.decompress(blob, args.model, progress=True)
    elapsed = time.perf_counter() - start
    levels = int(codec.read_header(blob)[0]["num_levels"])
    out.mkdir(parents=True, exist_ok=True)
    save_levels(npy, images, levels)
    if args.png:  # greyscale stays one channel, so the folder reads back as the same images (256 levels)
        for i, pixels in enumerate(plots.to_pixels(images, levels)):
            Image.fromarray(pixels[..., 0] if images.shape[1] == 1 else pixels).save(out / f"{i:05d}.png")
    print(f"{len(images)} images in {elapsed:.1f} s ({len(images) / elapsed:.1f} images/s) -> {npy}"
          + (f" and {len(images)} PNGs" if args.png else ""))


def cmd_list(args) -> None:
    if args.model is not None:
        if args.model not in list_models():
            raise ValueError(f"unknown model {args.model!r}; models: {', '.join(list_models())}")
        print(describe(args.model))
        print("pass hyperparameters as --set NAME=VALUE to train (Python: keywords of pc.create)")
        return
    print("models:     ", ", ".join(list_models()), " (pixelchain list MODEL: its hyperparameters)")
    print("classifiers:", ", ".join(list_classifiers()))
    print("datasets:   ", ", ".join(data.list_datasets()))
    print("pretrained (test scores on the dataset's test split):")
    for c in checkpoint.pretrained(details=True):
        score_ = (f"{c['test_nll']:.2f} nats, {c['test_bits_per_dim']:.4f} bits/dim" if "test_bits_per_dim" in c
                  else f"accuracy {c['test_accuracy']:.2%}" if "test_accuracy" in c else "no test score")
        print(f"  {c['name']:<28} {c['model']:<20} {c['dataset'] or '?':<24} {c['num_levels']:>3} levels  "
              f"{score_:<32} {c['parameters'] or 0:>10,} parameters  {c['megabytes']:.1f} MB")


def ranged(convert: Callable[[str], float], low: float, high: float = math.inf, what: str = "") -> Callable:
    """An argparse type: ``convert(text)`` within [low, high], else an error saying what it expects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive = ranged(int, 1, what="an integer >= 1")
nonnegative = ranged(int, 0, what="an integer >= 0")
probability = ranged(float, 0, 1, what="a number in [0, 1]")


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
    # options every command shares, and those of the commands that run a model
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars (in a log that is not a terminal "
                        "they update at most once every 30 s)")
    on_device = argparse.ArgumentParser(add_help=False, parents=[common])
    on_device.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (the default)")
    # how IMAGES reach a model's levels (io.read_model_images): one rule for every command
    mapped = argparse.ArgumentParser(add_help=False)
    mapped.add_argument("--num-levels", type=int, help="map IMAGES to this many levels, as train maps a dataset "
                        "(default: images deeper than the model's levels are quantised to them)")
    mapped.add_argument("--binarize", choices=["threshold", "dynamic"], help="binarise IMAGES, as train does")
    # the commands that write files: an existing one is replaced only when asked
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--force", action="store_true", help="overwrite the output files if they exist")

    p = sub.add_parser("train", parents=[on_device],
                       help="train a model by maximum likelihood, then report the test NLL")
    p.add_argument("model", choices=list_models() + list_classifiers())
    p.add_argument("--dataset", help=f"a built-in dataset ({', '.join(data.list_datasets())}; default: digits, "
                   "resuming: the run's), or your own images: a folder of them, an image file, a .npy/.npz of levels "
                   "(valid and test splits carved out, 10%% each)")
    p.add_argument("--num-levels", type=int, help="quantise the dataset to this many levels")
    p.add_argument("--binarize", choices=["threshold", "dynamic"])
    p.add_argument("--grey", action="store_true", default=None, help="your own images: read them as greyscale")
    p.add_argument("--resize", metavar="HxW", help="your own images: resize them all to H x W")
    p.add_argument("--run-dir", help="default: runs/MODEL_DATASET")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a model hyperparameter")
    add_option_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (options not given are the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace a model or run already in --run-dir")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=cmd_train)

    images_help = ("NAME:SPLIT[A:B] (e.g. fashion_mnist:test[:1000]), a .npy of integers [N,C,H,W] or [N,H,W], "
                   "or a PNG folder")
    p = sub.add_parser("eval", parents=[on_device, writes],
                       help="NLL of a trained model on a split, or of one's own IMAGES (per image)")
    p.add_argument("run", help="run directory or shipped checkpoint name")
    p.add_argument("images", nargs="?", help=f"images to score, per image: {images_help}")
    p.add_argument("--split", default="test", help="without IMAGES: the split of the run's dataset (default: test)")
    p.add_argument("--dataset", help="without IMAGES: a built-in dataset or your own images (default: the run's)")
    p.add_argument("--num-levels", type=int, help="quantise IMAGES (or --dataset) to this many levels, as train does")
    p.add_argument("--binarize", choices=["threshold", "dynamic"], help="binarise IMAGES (or --dataset), as train does")
    p.add_argument("--label", type=int, help="class of every image, for a class-conditional model")
    p.add_argument("--labels", help="classes of IMAGES, a .npy of integers [N] (default: the dataset split's)")
    p.add_argument("--out", help="CSV of IMAGES' scores: index,nll_nats,bits_per_dim")
    p.add_argument("--show", type=int, default=10, help="print the first this many images' scores")
    p.add_argument("--heatmap", help="PNG: each of the first --grid images beside its per-pixel bits (-log2 p)")
    p.add_argument("--grid", type=positive, default=16, help="images in --heatmap")
    p.add_argument("--batch-size", type=positive, default=256)
    p.set_defaults(func=cmd_eval)

    seed_help = ("seed of the draws (default: 0); image i depends on the seed and i only, not on -n, "
                 "--batch-size or the device")
    temperature_help = "divides the logits (default: 1); 0: the most likely value at each step (greedy)"
    p = sub.add_parser("sample", parents=[on_device, writes],
                       help="draw samples into a PNG grid, or arrays (.npy / .npz)")
    p.add_argument("run")
    p.add_argument("-n", type=positive, default=64, help="number of samples (default: 64)")
    p.add_argument("--batch-size", type=positive, default=DECODE_BATCH, help=f"images decoded at once "
                   f"(default: {DECODE_BATCH})")
    p.add_argument("--temperature", type=float, default=1.0, help=temperature_help)
    p.add_argument("--label", type=int, help="class, for class-conditional models (--set num_classes=N)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--naive", action="store_true", help="reference decoder: a full forward pass per step")
    p.add_argument("--out", help="a PNG grid, or .npy (levels [N, C, H, W]) / .npz (images, labels); default: "
                   "RUN_samples.png here, numbered rather than overwritten")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("complete", parents=[on_device, mapped, writes],
                       help="complete images with a region missing (--mask): test images or IMAGES")
    p.add_argument("run")
    p.add_argument("images", nargs="?", help=f"images to complete (default: -n of the run's test split): "
                   f"{images_help}")
    p.add_argument("--mask", default="bottom", help="the missing region: top, bottom, left, right, centre, "
                   "random:P (each pixel with probability P), or a .npy, nonzero = missing, [H,W], [N,H,W] or "
                   "[N,C,H,W] (default: bottom). In raster order, pixels after a missing one do not condition "
                   "it (README)")
    p.add_argument("-n", type=positive, help="number of images (default: 8 of the split; all of IMAGES)")
    p.add_argument("--per-image", type=positive, default=4, help="completions per image (default: 4)")
    p.add_argument("--batch-size", type=positive, default=DECODE_BATCH, help="images decoded at once")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset")
    p.add_argument("--label", type=int, help="class of every image, for a class-conditional model")
    p.add_argument("--labels", help="classes of IMAGES, a .npy of integers [N] (default: the dataset split's)")
    p.add_argument("--temperature", type=float, default=1.0, help=temperature_help)
    p.add_argument("--seed", type=int, default=0, help=seed_help.replace("-n, ", ""))
    p.add_argument("--naive", action="store_true")
    p.add_argument("--grid", type=positive, default=16, help="images in the PNG (default: 16)")
    p.add_argument("--out", help="a PNG (original | occluded | completions), or .npy (completions [N*S, C, H, W], "
                   "image i's S in rows i*S...) / .npz (also observed, labels); default: RUN_completions.png here")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("attack", parents=[on_device, mapped, writes],
                       help="adversarial examples for a classifier (ART; pip install -e '.[defend]')")
    p.add_argument("classifier", help="classifier: run directory or shipped checkpoint name (e.g. fmnist_resnet)")
    p.add_argument("images", help=images_help)
    p.add_argument("--labels", help="true labels, a .npy of integers [N] (default: the dataset split's)")
    p.add_argument("--method", choices=attacks.ATTACKS + adaptive.METHODS, default="fgsm",
                   help="bpda, apgd-ce, apgd-dlr: adaptive attacks through PixelDefend (need --purifier)")
    p.add_argument("--eps", type=nonnegative, default=8, help="L-inf radius in levels (0-255 units for 256 levels)")
    p.add_argument("--out", default="adversarial", help="folder for adversarial.npy, labels.npy, before_after.png "
                   "(adaptive methods: also robust.npy, curve.csv)")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--grid", type=positive, default=16, help="images in the before/after figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the random noise and random starts")
    p.add_argument("--purifier", help="adaptive methods: PixelDefend's density model (e.g. fmnist_pixelcnn_pp)")
    p.add_argument("--eps-def", type=nonnegative, default=32, help="adaptive methods: PixelDefend's eps, levels")
    p.add_argument("--steps", type=positive, default=100, help="adaptive methods: steps (iterations) per restart")
    p.add_argument("--restarts", type=positive, default=1, help="adaptive methods: random starts")
    p.add_argument("--step-size", type=positive, default=1, help="bpda: step in levels")
    p.add_argument("--no-random-start", action="store_true", help="bpda: start from the image itself")
    p.add_argument("--route", choices=adaptive.ROUTES, default="identity",
                   help="gradient through the purifier: identity (BPDA) or the smooth surrogate")
    p.add_argument("--temperature", type=ranged(float, 1e-6, what="a number > 0"), default=adaptive.TEMPERATURE,
                   help="the surrogate's softmax temperature")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("detect", parents=[on_device, mapped, writes],
                       help="out-of-distribution / adversarial detection: scores and p-values under a "
                       "density model")
    p.add_argument("run", help="density model: run directory or shipped checkpoint name")
    p.add_argument("images", help=images_help)
    p.add_argument("--reference", help="held-out clean images the p-values rank against (default: the model's "
                   f"dataset, valid split, its first {DETECT_REFERENCE})")
    p.add_argument("--score", choices=ood.SCORES, default="combined",
                   help="out-of-distribution score (see pixelchain.ood; higher = more atypical)")
    p.add_argument("--background", help="background model of the ratio score (default: the shipped one paired "
                   "with RUN, e.g. fmnist_background for fmnist_pixelcnn_pp)")
    p.add_argument("--codec", choices=ood.CODECS, default="png", help="lossless codec of the complexity score")
    p.add_argument("--out", default="detect", help="folder for p_values.csv and bits_per_dim.png")
    p.add_argument("--alpha", type=probability, default=0.05, help="report the share of images with p <= alpha")
    p.add_argument("--show", type=nonnegative, default=10, help="print the first this many p-values")
    p.add_argument("--batch-size", type=positive, default=256)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("purify", parents=[on_device, mapped, writes],
                       help="PixelDefend purification: each pixel the most likely value within eps")
    p.add_argument("run", help="density model: run directory or shipped checkpoint name")
    p.add_argument("images", help=images_help)
    p.add_argument("--eps", type=nonnegative, default=16, help="window radius in levels (0-255 units for 256 levels)")
    p.add_argument("--out", default="purified", help="folder for purified.npy and before_after.png")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--grid", type=positive, default=16, help="images in the before/after figure")
    p.add_argument("--adaptive", type=probability, metavar="FALSE_ALARM",
                   help="adaptive PixelDefend: purify only images with p <= a threshold that purifies this share "
                   "of clean --reference images (e.g. 0.05); the others stay unchanged")
    p.add_argument("--reference", help="clean images for --adaptive (default: the model's dataset, valid split)")
    p.add_argument("--naive", action="store_true", help="reference decoder: a full forward pass per step")
    p.add_argument("--classifier", help="also report this classifier's accuracy before and after purification")
    p.add_argument("--labels", help="true labels for --classifier, a .npy of integers [N] (default: the dataset "
                   "split's)")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("compress", parents=[common, writes],
                       help="lossless compression of images with a density model (pip install "
                       "'pixelchain[compress]')")
    p.add_argument("run", help="density model: run directory or shipped checkpoint name")
    p.add_argument("images", help=images_help)
    p.add_argument("--out", required=True, help="the compressed file")
    p.add_argument("--batch-size", type=positive, default=codec.DEFAULT_CHUNK,
                   help="images coded at once (recorded in the file; decompression uses the same)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", parents=[common, writes],
                       help="restore the images of a compressed file: DIR/images.npy (levels)")
    p.add_argument("file", help="a file written by pixelchain compress")
    p.add_argument("--out", required=True, help="folder for images.npy (and the PNGs with --png)")
    p.add_argument("--model", help="the model it was compressed with, when not a shipped checkpoint")
    p.add_argument("--png", action="store_true", help="also one PNG per image (levels scaled to 0-255)")
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("list", parents=[common],
                       help="registered models, datasets and shipped checkpoints (with their scores); "
                       "list MODEL: its hyperparameters and defaults")
    p.add_argument("model", nargs="?", help="a model: its hyperparameters and their defaults")
    p.set_defaults(func=cmd_list)
    return parser


def configure_progress(quiet: bool) -> None:
    """tqdm's bars in this process: none when ``quiet``; when stderr is not a terminal (a log
    file) an update at most every 30 s instead of ten a second, so logs are not flooded."""
    import tqdm.std

    init = tqdm.std.tqdm.__dict__.get("_pixelchain_init", tqdm.std.tqdm.__init__)  # tqdm's own
    tqdm.std.tqdm._pixelchain_init = tqdm.std.tqdm.__init__ = init
    if quiet:
        tqdm.std.tqdm.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, "disable": True})
    elif not sys.stderr.isatty():
        tqdm.std.tqdm.__init__ = lambda self, *a, **kw: init(self, *a, **{"mininterval": 30, **kw})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runtime.configure_allocator()
    configure_progress(args.quiet)
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
